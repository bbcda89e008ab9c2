"""Loss variants after the vocabulary projection stay exact under chunking."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from numerics import FP32_RTOL, rel_err
from torch import nn

import mst_compile

VOCAB, HIDDEN = 300, 32


class Head(nn.Module):
    """Norm, vocabulary projection and a loss written the way users write them."""

    def __init__(self, variant: str):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.proj = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.variant = variant
        self.register_buffer("class_weight", torch.rand(VOCAB) + 0.5)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.proj(self.norm(h)).float().flatten(0, 1)
        y = y.flatten()
        if self.variant == "sum":
            return F.cross_entropy(logits, y, reduction="sum")
        if self.variant == "none":
            return F.cross_entropy(logits, y, reduction="none").sum() * 0.5
        if self.variant == "label_smoothing":
            return F.cross_entropy(logits, y, label_smoothing=0.1)
        if self.variant == "class_weights":
            return F.cross_entropy(logits, y, weight=self.class_weight)
        if self.variant == "softcap":
            return F.cross_entropy(30 * torch.tanh(logits / 30), y)
        if self.variant == "scaled":
            return F.cross_entropy(logits * 0.7, y)
        if self.variant == "z_loss":
            z = torch.logsumexp(logits, -1).pow(2).mean()
            return F.cross_entropy(logits, y) + 1e-4 * z
        raise ValueError(self.variant)


@pytest.mark.parametrize("variant", ["sum", "none", "label_smoothing", "class_weights",
                                     "softcap", "scaled", "z_loss"])
def test_loss_variant_matches_eager(variant):
    torch.manual_seed(0)
    model = Head(variant)
    compiled_model = copy.deepcopy(model)
    h = torch.randn(2, 37, HIDDEN, requires_grad=True)
    h2 = h.detach().clone().requires_grad_()
    y = torch.randint(0, VOCAB, (2, 37))
    y[0, :4] = -100
    compiled = torch.compile(compiled_model, backend="mst",
                             options={"chunks": 4, "min_bytes": 0, "strict": True})
    expected, actual = model(h, y), compiled(h2, y)
    expected.backward()
    actual.backward()
    report = mst_compile.last_report()
    assert [r.kind for r in report.regions] == ["loss"]
    assert rel_err(actual, expected) <= FP32_RTOL
    assert rel_err(h2.grad, h.grad) <= FP32_RTOL
    for p, q in zip(compiled_model.parameters(), model.parameters()):
        assert rel_err(p.grad, q.grad) <= FP32_RTOL
