"""Gradients of pieces as one join (joins.py): q, k and v selected from one view of a fused
projection's output get gradients that autograd writes into zeros of the whole and sums; mst
makes them one `cat`, made in the projection's layout, so the backward keeps one `[S, 3d]`
buffer where Inductor made two (the join and its copy). Numbers against eager, the rewrite
named in the report, and what it leaves alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import check_against_eager, summary
from tiny_models import HIDDEN, LAYERS, llama_proxy
from torch import nn

VOCAB = 512
HEADS = 4


def _joins(report) -> list[str]:
    return [line for g in report.graphs for line in g.rewrites if "made in that layout" in line]


def _code(report) -> str:
    return "".join(g.code for g in report.graphs)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_proxy_qkv_gradient_is_one_join(checkpointing, autocast):
    """The proxy's `q, k, v = qkv.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)`: per layer one
    join of the three gradients in `[b, s, 3, h, d]`, no `select_scatter` left; two
    accumulated micro-batches, through Inductor."""
    model = llama_proxy(VOCAB)
    model.cfg.activation_checkpointing = checkpointing
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, autocast=autocast,
                                 micro_batches=2,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3})
    joins = _joins(report)
    assert len(joins) == LAYERS, summary(report)
    assert all(f"[2, 37, 3, {HEADS}, {HIDDEN // HEADS}]" in j for j in joins), joins
    assert "select_scatter" not in _code(report), summary(report)


class TwoOfThree(nn.Module):
    """q and v selected from a `[b, s, 3, h, d]` view, the third slot unused: the gradients
    written into zeros do not cover the whole, so their sum is no join and stays."""

    def __init__(self, d: int = HIDDEN):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(VOCAB, d), nn.Linear(d, 3 * d), nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        b, s, d = x.shape
        q, _, v = self.qkv(x).view(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, q * 0.5, v, is_causal=True)
        logits = self.head(x + y.transpose(1, 2).reshape(b, s, d))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_pieces_that_do_not_cover_the_whole_are_left():
    torch.manual_seed(0)
    report = check_against_eager(TwoOfThree(), vocab=VOCAB, batch=2, seq=33,
                                 options={"strict": True, "min_bytes": 0, "compiler": "eager"})
    assert not _joins(report), summary(report)
    assert "select_scatter" in _code(report), summary(report)
