"""Activation checkpointing of blocks composes with mst: same numbers, same regions."""

from __future__ import annotations

import pytest
import torch
from numerics import check_against_eager
from tiny_models import HIDDEN, LAYERS, hf_checkpointing, hf_model

import mst_compile
from mst_compile.demo_models import LlamaConfig, LlamaProxy

VOCAB = 512


def test_checkpointed_blocks_match_eager():
    torch.manual_seed(0)
    model = LlamaProxy(LlamaConfig(vocab_size=VOCAB, hidden=HIDDEN, intermediate=4 * HIDDEN,
                                   layers=LAYERS, heads=4, activation_checkpointing=True))
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, micro_batches=2)
    assert report.count("mlp", "training") == 2 and report.count("loss", "training") == 1


def test_hf_gradient_checkpointing_matches_eager():
    model = hf_checkpointing(hf_model("llama", VOCAB))
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, hf=True)
    assert report.count("mlp", "training") == 2 and report.count("loss", "training") == 1


def test_a_checkpointed_block_saves_nothing_of_its_chunks():
    """Activation checkpointing tags the forward of a block for recomputation. The nodes
    mst inserts for a region inside it (the chunks of the MLP's input, its forward loop)
    carry the tags too (decision 27): untagged, the partitioner saved the chunks of each
    MLP's input and the last block's output. What the forward saves of the sequence's size
    ([tokens, hidden]) is each block's input and the head's input gradient (the loss form
    computes it in the forward)."""
    torch.manual_seed(0)
    model = LlamaProxy(LlamaConfig(vocab_size=VOCAB, hidden=HIDDEN, intermediate=4 * HIDDEN,
                                   layers=LAYERS, heads=4, activation_checkpointing=True))
    compiled = torch.compile(model, backend="mst", options={"chunks": 4, "min_bytes": 0, "strict": True})
    tokens = 64
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    compiled(ids, ids.roll(-1, 1)).backward()  # compiles
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(ids, ids.roll(-1, 1))
    loss.backward()
    sequence_sized = sum(1 for nbytes in saved.values() if nbytes == tokens * HIDDEN * 4)
    assert sequence_sized == LAYERS + 1, saved


class _State:
    used = False


def test_a_break_at_a_checkpoint_side_effect_is_reported(monkeypatch):
    """A checkpointed function with a Python side effect (as transformers >= 5.25's attention
    layers have): unless Dynamo is told to skip it in the recompute, Dynamo breaks the graph
    there and the checkpointed code runs uncompiled; mst warns once, naming the setting."""
    from torch.utils.checkpoint import checkpoint

    from mst_compile import backend

    monkeypatch.setattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint",
                        False)
    monkeypatch.setattr(backend, "_warned", set())
    w = torch.randn(8, 8, requires_grad=True)

    def layer(x):
        _State.used = True
        return torch.relu(x @ w)

    def step(x):
        return checkpoint(layer, x.sin(), use_reentrant=False).cos().sum()

    compiled = torch.compile(step, backend="mst", options={"min_bytes": 0})
    with pytest.warns(UserWarning, match="skip_fwd_side_effects_in_bwd_under_checkpoint"), \
            mst_compile.collect_reports() as reports:
        compiled(torch.randn(4, 8)).backward()
    assert any(backend.CHECKPOINT_BREAK in g.note for r in reports for g in r.graphs)
