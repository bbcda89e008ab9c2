"""How each mode turns the demo model into the function a step calls.

A mode is named by a spec string: a name, optionally followed by options, e.g. `mst`,
`mst:chunks=8`, `mst_ref:mlp_chunks=4,loss_chunks=63`. Every builder gets the same freshly
seeded workload model (benchmarks.workload.CausalLM; activation checkpointing, when measured,
is already switched on in it) and returns `forward(ids, labels=None)`: the mean loss with
labels, the last position's logits without (an inference prefill).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .reference import MstReferenceModel
from .workload import CausalLM

Forward = Callable[..., torch.Tensor]

CORE_MODES = ("eager", "inductor", "inductor_autochunk", "mst")
EXTRA_MODES = ("inductor_linear_ce", "mst_ref")
COMPILED = ("inductor", "inductor_autochunk", "mst", "inductor_linear_ce")  # have a compile time
BASELINE = "inductor"  # ratios in the report are relative to this mode

DESCRIPTIONS = {
    "eager": "plain PyTorch eager",
    "inductor": "torch.compile, default backend (Inductor)",
    "inductor_autochunk": "torch.compile with torch._inductor.config.auto_chunker.enable = True",
    "mst": 'torch.compile(backend="mst")',
    "inductor_linear_ce": (
        "torch.compile; LM head + loss by F.linear_cross_entropy with LinearCrossEntropyOptions() "
        "(chunked; a graph break, the op runs eager)"
    ),
    "mst_ref": "eager, hand-written mini-sequence MLP and LM head + loss (MST reference style)",
}


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModeSpec:
        name, _, rest = text.strip().partition(":")
        if name not in DESCRIPTIONS:
            raise ValueError(f"unknown mode {name!r}; known: {', '.join(DESCRIPTIONS)}")
        options = []
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"mode option {item!r} in {text!r} is not key=value")
            options.append((key.strip(), _parse_value(value.strip())))
        return cls(name, tuple(options))

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.options)}]"

    @property
    def spec(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}:{','.join(f'{k}={v}' for k, v in self.options)}"


def _parse_value(value: str) -> Any:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def unavailable_reason(name: str, workload_name: str | None = None) -> str | None:
    """Why the installed torch (or the workload) cannot run mode `name`, or None if it can."""
    if name in ("inductor_linear_ce", "mst_ref") and workload_name and workload_name.startswith("hf-"):
        return (f"{name} replaces the model's forward; the {workload_name} workload is the "
                "model's own forward")
    if name == "inductor_autochunk":
        try:
            torch._inductor.config.auto_chunker.enable  # noqa: B018
        except AttributeError:
            return f"torch {torch.__version__} has no torch._inductor.config.auto_chunker"
    if name == "inductor_linear_ce" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    return None


def available_modes() -> list[str]:
    return [m for m in CORE_MODES + EXTRA_MODES if unavailable_reason(m) is None]


def build(spec: ModeSpec, model: CausalLM) -> Forward:
    reason = unavailable_reason(spec.name)
    if reason:
        raise RuntimeError(reason)
    options = dict(spec.options)
    return _BUILDERS[spec.name](model, options)


def _eager(model: CausalLM, options: dict) -> Forward:
    _no_options("eager", options)
    return model


def _compiled(model: CausalLM, **kwargs: Any) -> Forward:
    """torch.compile of the workload model; a model called through its own forward (the
    user's path) is compiled in place, as a user's `model.compile(...)` does."""
    if getattr(model, "compiles_in_place", False):
        model.model.compile(**kwargs)
        return model
    return torch.compile(model, **kwargs)


def _inductor(model: CausalLM, options: dict) -> Forward:
    _no_options("inductor", options)
    return _compiled(model)


def _inductor_autochunk(model: CausalLM, options: dict) -> Forward:
    # A fresh process per mode: setting the global config touches no other mode.
    torch._inductor.config.auto_chunker.enable = True
    for key, value in options.items():  # e.g. num_chunk=8
        setattr(torch._inductor.config.auto_chunker, key, value)
    return _compiled(model)


def _mst(model: CausalLM, options: dict) -> Forward:
    return _compiled(model, backend="mst", options=options)


class LinearCrossEntropyModel(nn.Module):
    """The workload model with its LM head and loss replaced by F.linear_cross_entropy."""

    def __init__(self, base: CausalLM, options: dict):
        super().__init__()
        self.base = base
        self.lce_options = nn.LinearCrossEntropyOptions(**options)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.base.hidden(ids)
        if labels is None:
            return self.base.next_token_logits(h)
        return F.linear_cross_entropy(
            h.flatten(0, 1),
            self.base.lm_head.weight,
            labels.flatten(),
            ignore_index=-100,
            options=self.lce_options,
        )


def _inductor_linear_ce(model: CausalLM, options: dict) -> Forward:
    return torch.compile(LinearCrossEntropyModel(model, options))


def _mst_ref(model: CausalLM, options: dict) -> Forward:
    return MstReferenceModel(model, **options)


def _no_options(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"mode {name!r} takes no options, got {options}")


_BUILDERS: dict[str, Callable[[CausalLM, dict], Forward]] = {
    "eager": _eager,
    "inductor": _inductor,
    "inductor_autochunk": _inductor_autochunk,
    "mst": _mst,
    "inductor_linear_ce": _inductor_linear_ce,
    "mst_ref": _mst_ref,
}
