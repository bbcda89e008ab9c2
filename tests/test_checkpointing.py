"""Activation checkpointing of blocks composes with mst: same numbers, same regions."""

from __future__ import annotations

import torch
from numerics import check_against_eager
from tiny_models import HIDDEN, LAYERS, hf_model

from mst_compile.demo_models import LlamaConfig, LlamaProxy

VOCAB = 512


def test_checkpointed_blocks_match_eager():
    torch.manual_seed(0)
    model = LlamaProxy(LlamaConfig(vocab_size=VOCAB, hidden=HIDDEN, intermediate=4 * HIDDEN,
                                   layers=LAYERS, heads=4, activation_checkpointing=True))
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, micro_batches=2)
    assert report.count("mlp", "training") == 2 and report.count("loss", "training") == 1


def test_hf_gradient_checkpointing_matches_eager():
    model = hf_model("llama", VOCAB)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # else HF warns inside forward: a graph break
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
