"""An attention mask that is provably causal is not made: transformers builds a [batch, 1, S,
S] mask under torch.compile with gradient checkpointing (it cannot rule out packed
sequences), and SDPA then cannot run causal. mst proves the mask is `kv <= q` and has SDPA
run causal with no mask, forward and backward; a mask that is not (padding, packed
sequences) is left as it is. Numbers against eager either way."""

from __future__ import annotations

import copy

import pytest
import torch
from numerics import check_against_eager, summary
from tiny_models import hf_checkpointing, hf_model

import mst_compile

VOCAB = 512


def _llama() -> torch.nn.Module:
    return hf_checkpointing(hf_model("llama", VOCAB))


def _mask_rewrites(report) -> list[str]:
    return [line for g in report.graphs for line in g.rewrites if "attention mask" in line]


@pytest.mark.parametrize("compiler", ["inductor", "eager"])
def test_hf_causal_mask_is_not_made(compiler):
    report = check_against_eager(_llama(), vocab=VOCAB, hf=True, batch=2, seq=40, chunks=3,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3,
                                          "compiler": compiler})
    rewrites = _mask_rewrites(report)
    assert len(rewrites) == 2 and all("is causal" in r for r in rewrites), summary(report)
    code = "\n".join(g.code for g in report.graphs)
    assert "b8[2, 1, 40, 40]" not in code and "f32[2, 1, 40, 40]" not in code


class PaddedLlama(torch.nn.Module):
    """HF Llama called with an attention mask whose second row is padded, or with position
    ids that restart (two packed sequences in a row)."""

    def __init__(self, how: str):
        super().__init__()
        self.model, self.how = _llama(), how

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, s = ids.shape
        if self.how == "padding":
            mask = torch.ones_like(ids)
            mask[1, s // 2:] = 0
            return self.model(input_ids=ids, labels=labels, attention_mask=mask).loss
        positions = torch.arange(s).repeat(b, 1)
        positions[:, s // 2:] -= s // 2
        return self.model(input_ids=ids, labels=labels, position_ids=positions).loss


@pytest.mark.parametrize("compiler", ["inductor", "eager"])
def test_a_padding_mask_is_kept_per_key(compiler):
    """causal & padding[b, kv]: SDPA runs causal with the [batch, 1, 1, S] padding mask
    only (the second row padded at its end, as a right-padding collator makes it)."""
    report = check_against_eager(PaddedLlama("padding"), vocab=VOCAB, batch=2, seq=40,
                                 chunks=3, options={"strict": True, "min_bytes": 0,
                                                    "chunks": 3, "compiler": compiler})
    rewrites = _mask_rewrites(report)
    assert rewrites and all("per-key mask" in r for r in rewrites), summary(report)
    code = "\n".join(g.code for g in report.graphs)
    assert "f32[2, 1, 40, 40]" not in code and "f32[2, 1, 1, 40]" in code


def test_a_mask_that_is_not_causal_is_left():
    """Position ids that restart (two packed sequences in a row): not causal."""
    report = check_against_eager(PaddedLlama("packed"), vocab=VOCAB, batch=2, seq=40,
                                 chunks=3, options={"strict": True, "min_bytes": 0,
                                                    "chunks": 3, "compiler": "eager"})
    assert not _mask_rewrites(report), summary(report)


def test_left_padding_gives_eager_numbers_too():
    """Left padding (the first row's start padded): rows with no key to attend are what the
    combined mask gives, so the logits of every kept row match eager."""
    torch.manual_seed(0)
    model = _llama()
    ids = torch.randint(0, VOCAB, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    labels = torch.where(mask.bool(), ids, -100)
    compiled = torch.compile(copy.deepcopy(model), backend="mst",
                             options={"strict": True, "min_bytes": 0, "chunks": 2})
    with mst_compile.collect_reports() as reports:
        got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    kept = mask.bool()
    assert torch.allclose(got.logits[kept], want.logits[kept], rtol=1e-4, atol=1e-5)
    assert any("per-key mask" in line for r in reports for g in r.graphs for line in g.rewrites)
