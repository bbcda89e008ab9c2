"""Compare a model compiled with backend="mst" against the same model run eagerly.

`check_against_eager` is the one numerics oracle of the test suite: every rewrite must leave
the loss / outputs and every parameter gradient unchanged up to floating-point reassociation
(docs/design.md, "Failure policy").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mst_compile.report import Report, collect_reports

FP32_RTOL = 1e-4
BF16_RTOL = 2e-2

# The devices a test runs on: `-m cuda` selects the CUDA cases (Triton code), which skip
# where no CUDA device is (CI); the CPU cases run everywhere.
CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
])
DEVICES = ["cpu", CUDA]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    a, b = actual.detach().double(), expected.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def summary(report: Report) -> str:
    """The report without the rewritten code."""
    return str(report).split("\n\n# ----")[0]


def make_batch(vocab: int, batch: int, seq: int, generator: torch.Generator,
               with_labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random token ids and next-token labels with ignored (-100) positions: the first two
    tokens of every row and about 20% at random (always leaving most tokens valid)."""
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    if not with_labels:
        return ids, None
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    ignore = torch.rand(batch, seq, generator=generator) < 0.2
    ignore[:, :2] = True
    labels[ignore] = -100
    return ids, labels


def _outputs(out: Any) -> dict[str, torch.Tensor]:
    """The tensors a forward returned: a bare tensor, or an HF ModelOutput's loss, logits,
    MoE auxiliary loss and router logits (one per layer)."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    found = {k: getattr(out, k) for k in ("loss", "logits", "aux_loss")
             if isinstance(getattr(out, k, None), torch.Tensor)}
    for i, router in enumerate(getattr(out, "router_logits", None) or ()):
        found[f"router_logits[{i}]"] = router
    return found


def _call(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor | None, hf: bool) -> Any:
    if hf:
        return model(input_ids=ids, labels=labels) if labels is not None else model(input_ids=ids)
    return model(ids, labels) if labels is not None else model(ids)


def check_against_eager(
    model: nn.Module,
    *,
    vocab: int,
    batch: int = 2,
    seq: int = 37,
    training: bool = True,
    autocast: torch.dtype | None = None,
    micro_batches: int = 1,
    chunks: int | str = 4,
    options: Mapping[str, Any] | None = None,
    hf: bool = False,
    labels: bool | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = True,
    seed: int = 0,
    device: str = "cpu",
    reference: str = "eager",
) -> Report:
    """Compile a deepcopy of `model` with backend="mst" and check it against `model` run eagerly.

    training: forward + backward of the loss (labels with -100 positions) on `micro_batches`
        fresh batches, gradients accumulated over all of them; compares every loss / logits
        output of every micro-batch and, at the end, every parameter gradient. With
        labels=False the model returns logits and the loss is computed eagerly outside it.
        Otherwise: forward under torch.no_grad() (logits, or the loss when labels=True).
    labels: pass labels to the model (default: when training).
    autocast: None for fp32, or a dtype for torch.autocast(device, dtype=...) around the
        forwards (tolerance BF16_RTOL instead of FP32_RTOL).
    device: where both copies of the model and the inputs live ("cuda": Triton code).
    reference: "eager", or "inductor": the model compiled by Inductor alone, which isolates
        what mst's rewrite changes from how Inductor's own kernels round (bf16 on a GPU).
    options: the backend options; default {"strict": True, "min_bytes": 0, "chunks": chunks}.

    Returns the merged report of every backend call made by the compiled model.
    """
    if labels is None:
        labels = training
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p != 0:
            raise AssertionError(f"dropout {m} makes eager and compiled runs incomparable")
    if options is None:
        options = {"strict": True, "min_bytes": 0, "chunks": chunks}
    rtol = FP32_RTOL if autocast is None else BF16_RTOL

    torch._dynamo.reset()
    eager = model.to(device)
    compiled_model = copy.deepcopy(model)
    eager.zero_grad(set_to_none=True)
    compiled_model.zero_grad(set_to_none=True)
    compiled = torch.compile(compiled_model, backend="mst", options=dict(options),
                             dynamic=dynamic, fullgraph=fullgraph)

    if reference == "inductor":
        reference_model = torch.compile(eager, dynamic=dynamic, fullgraph=fullgraph)
    elif reference == "eager":
        reference_model = eager
    else:
        raise ValueError(f"reference must be 'eager' or 'inductor', not {reference!r}")
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    errors: dict[str, float] = {}  # every relative error measured, for diagnostics

    def forward(m: nn.Module, ids: torch.Tensor,
                lab: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            return _outputs(_call(m, ids, lab, hf))

    with collect_reports() as reports:
        for step in range(micro_batches if training else 1):
            ids, lab = make_batch(vocab, batch, seq, gen, labels or training)
            ids, lab = ids.to(device), None if lab is None else lab.to(device)
            if training and labels:
                ref, got = forward(reference_model, ids, lab), forward(compiled, ids, lab)
                loss_key = "loss" if "loss" in ref else "out"
                assert ref[loss_key].dim() == 0, "training needs a scalar loss"
                ref[loss_key].backward()
                got[loss_key].backward()
            elif training:  # the model returns logits; the loss is computed eagerly outside
                ref, got = forward(reference_model, ids, None), forward(compiled, ids, None)
                for out in (ref, got):
                    logits = out["logits" if "logits" in out else "out"]
                    out["outside loss"] = F.cross_entropy(
                        logits.float().flatten(0, 1), lab.flatten(), ignore_index=-100)
                    out["outside loss"].backward()
            else:
                with torch.no_grad():
                    ref, got = forward(reference_model, ids, lab), forward(compiled, ids, lab)
            assert ref.keys() == got.keys(), (ref.keys(), got.keys())
            for key in ref:
                assert got[key].shape == ref[key].shape, (key, got[key].shape, ref[key].shape)
                assert got[key].dtype == ref[key].dtype, (key, got[key].dtype, ref[key].dtype)
                err = rel_err(got[key], ref[key])
                errors[f"{key}[{step}]"] = err
                if not err <= rtol:
                    failures.append(f"micro-batch {step}: {key} rel err {err:.3g} > {rtol}")

    if training:
        compiled_params = dict(compiled_model.named_parameters())
        names = [n for n, _ in eager.named_parameters()]
        assert names == list(compiled_params), "deepcopy changed the parameter set"
        for name, p in eager.named_parameters():
            q = compiled_params[name]
            if p.grad is None or q.grad is None:
                if (p.grad is None) != (q.grad is None):
                    failures.append(f"grad of {name}: eager {'None' if p.grad is None else 'set'}, "
                                    f"compiled {'None' if q.grad is None else 'set'}")
                continue
            err = rel_err(q.grad, p.grad)
            errors[f"grad {name}"] = err
            if not err <= rtol:
                failures.append(f"grad of {name}: rel err {err:.3g} > {rtol}")
        assert any(p.grad is not None for p in eager.parameters()), "no gradients at all"

    report = Report([g for r in reports for g in r.graphs])
    report.errors = errors  # type: ignore[attr-defined]
    if failures:
        raise AssertionError("mst differs from eager:\n  " + "\n  ".join(failures)
                             + f"\nreport:\n{summary(report)}")
    if fullgraph and dynamic is False:
        assert len(reports) == 1, f"expected one backend call, got {len(reports)} (recompiled?)"
    return report


def padded_batch(vocab: int, batch: int, seq: int, generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """A batch as a supervised fine-tuning collator makes it: rows of different lengths padded
    at the end (attention_mask 0, label -100), the prompt (the first quarter of each row)
    masked with -100, and the rest of the labels the ids (HF shifts them)."""
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    lengths = torch.randint(max(2, seq // 2), seq + 1, (batch,), generator=generator)
    lengths[0] = seq  # the longest row sets the padded length
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    labels = torch.where(mask, ids, -100)
    labels[:, : seq // 4] = -100
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def check_training_loop(
    model: nn.Module,
    *,
    vocab: int,
    shapes: list[tuple[int, int]],
    options: Mapping[str, Any] | None = None,
    hf: bool = False,
    rtol: float = FP32_RTOL,
    seed: int = 0,
) -> tuple[Report, int]:
    """Train a deepcopy of `model` compiled with backend="mst" (default dynamic: Dynamo makes
    the shapes symbolic once they change, as in a user's loop) one step per (batch, length) in
    `shapes`, and `model` eagerly on the same batches: after every step the loss and every
    parameter gradient must match (gradients are zeroed between steps). HF models get padded
    batches with a masked prompt (`padded_batch`); others ids and labels (`make_batch`).

    Returns the merged report of every backend call and the number of calls (compiles)."""
    if options is None:
        options = {"strict": True, "min_bytes": 0}
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="mst", options=dict(options))
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    compiled_params = dict(compiled_model.named_parameters())
    with collect_reports() as reports:
        for step, (batch, seq) in enumerate(shapes):
            if hf:
                inputs = padded_batch(vocab, batch, seq, gen)
            else:
                ids, lab = make_batch(vocab, batch, seq, gen, True)
                inputs = {"ids": ids, "labels": lab}
            model.zero_grad(set_to_none=True)
            compiled_model.zero_grad(set_to_none=True)
            losses = []
            for m in (model, compiled):
                out = m(**inputs)
                loss = out.loss if hf else out
                loss.backward()
                losses.append(loss.detach())
            where = f"step {step} ({batch} x {seq})"
            if not rel_err(losses[1], losses[0]) <= rtol:
                failures.append(f"{where}: loss rel err {rel_err(losses[1], losses[0]):.3g}")
            for name, p in model.named_parameters():
                q = compiled_params[name]
                if (p.grad is None) != (q.grad is None):
                    failures.append(f"{where}: grad of {name} set in one run only")
                elif p.grad is not None and not rel_err(q.grad, p.grad) <= rtol:
                    failures.append(f"{where}: grad of {name} rel err {rel_err(q.grad, p.grad):.3g}")
    report = Report([g for r in reports for g in r.graphs])
    if failures:
        raise AssertionError("mst differs from eager:\n  " + "\n  ".join(failures)
                             + f"\nreport:\n{summary(report)}")
    return report, len(reports)
