"""Attention keeps for its backward no more than it reads (attention_saves.py): v read out of
a fused projection's output is copied, so that output is not kept; the backward reads
attention's output through the model's transposed copy of it. Numbers against eager, the
rewrites named in the report, and what a training step saves for its backward, against
Inductor alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import check_against_eager, summary
from tiny_models import HIDDEN, LAYERS, hf_checkpointing, hf_from_config, hf_model, llama_proxy
from torch import nn

from mst_compile.demo_models import LlamaProxy

VOCAB = 512


def _notes(report, what: str) -> list[str]:
    return [line for g in report.graphs for line in g.rewrites if what in line]


def _proxy(checkpointing: bool) -> LlamaProxy:
    model = llama_proxy(VOCAB)
    model.cfg.activation_checkpointing = checkpointing
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_projection_numbers(checkpointing, autocast):
    """Rotary q and k, v a view of the fused QKV output: attention reads a copy of v; its
    backward reads its output through the output projection's input. Two accumulated
    micro-batches, ignored labels, through Inductor."""
    report = check_against_eager(_proxy(checkpointing), vocab=VOCAB, batch=2, seq=37,
                                 autocast=autocast, micro_batches=2,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3})
    copies, outputs = _notes(report, "reads a copy of"), _notes(report, "through its copy")
    assert len(copies) == 2 and len(outputs) == 2, summary(report)
    assert all("not a view of mm" in c and f"[{2 * 37}, {3 * HIDDEN}]" in c for c in copies), (
        copies)


def _saved_storages(model: nn.Module, backend: str, tokens: int) -> list[int]:
    """Element counts of the activations (not parameters) one compiled training step keeps
    for its backward, one per storage."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    ids = torch.randint(0, VOCAB, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = compiled(ids, ids)
    loss.backward()
    return sorted(storages.values(), reverse=True)


def test_the_fused_output_is_not_saved():
    """Inductor alone saves each layer's fused QKV output [S, 3d] (v is a view of it) and
    attention's output twice (as it is and transposed); mst saves a copy of v instead of the
    first, and the output once."""
    tokens = 64
    fused = tokens * 3 * HIDDEN
    inductor = _saved_storages(_proxy(False), "inductor", tokens)
    mst = _saved_storages(_proxy(False), "mst", tokens)
    assert inductor.count(fused) == LAYERS and fused not in mst, (inductor, mst)
    # per layer: 3 widths of the fused output kept for a copy of v (1); o not kept beside
    # its transposed copy (1)
    assert sum(inductor) - sum(mst) == LAYERS * 3 * tokens * HIDDEN, (inductor, mst)


class GPT2Attention(nn.Module):
    """q, k and v all views of the fused output (no rotary embedding): a copy would free
    nothing, so none is made; attention's output, laid out as its query, is
    `[b, S, h, d]` in memory already, so the model makes no transposed copy of it."""

    def __init__(self, d: int = HIDDEN, heads: int = 4):
        super().__init__()
        self.embed, self.heads = nn.Embedding(VOCAB, d), heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, d))
        logits = self.head(x)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_views_covering_the_fused_output_are_left():
    torch.manual_seed(0)
    report = check_against_eager(GPT2Attention(), vocab=VOCAB, batch=2, seq=33)
    assert not _notes(report, "attention"), summary(report)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "hf-checkpointing"])
def test_hf_llama_through_its_forward(checkpointing):
    """Separate q, k, v projections: nothing to copy; attention's output is `[b, S, h, d]`
    in memory already (laid out as its query, rotated in the model's layout), so
    `attn_output.transpose(1, 2).contiguous()` copies nothing: both rewrites rightly find
    nothing, and the numbers stay eager's."""
    model = hf_model("llama", VOCAB)
    if checkpointing:
        model = hf_checkpointing(model)
    report = check_against_eager(model, vocab=VOCAB, hf=True, batch=2, seq=40, chunks=3)
    assert not _notes(report, "reads a copy of") and not _notes(report, "through its copy"), (
        summary(report))


def test_inference_is_left_alone():
    report = check_against_eager(_proxy(False), vocab=VOCAB, training=False, seq=21)
    assert not [line for g in report.graphs for line in g.rewrites if "attention" in line], (
        summary(report))


def test_hf_gpt2_query_copied_in_its_own_order():
    """HF GPT-2 with 2 key-value heads of 4: q a view of the fused `c_attn` output, k and v
    repeated for the query heads (copies). A contiguous copy of q would change how attention
    lays out its output, and the graph's view of that output, traced on the old strides,
    fails when the graph runs op by op; the copy keeps q's stride order instead."""
    model = hf_from_config("gpt2", vocab=VOCAB)
    report = check_against_eager(model, vocab=VOCAB, hf=True, batch=2, seq=37,
                                 options={"strict": True, "min_bytes": 0, "chunks": 4,
                                          "compiler": "eager"})
    copies = _notes(report, "reads a copy of")
    assert len(copies) == 2 and all(f"[{2 * 37}, {3 * HIDDEN}]" in c for c in copies), (
        summary(report))
