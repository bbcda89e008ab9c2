"""`explain`: run a model once through the mst pipeline and return what it did."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from .backend import mst_backend
from .options import MstOptions
from .report import Report, collect_reports


def explain(
    model: torch.nn.Module,
    *args: Any,
    options: Mapping[str, Any] | MstOptions | None = None,
    **kwargs: Any,
) -> Report:
    """Compile `model` with backend="mst", run its forward on the given inputs (and its
    backward when it returns a scalar that requires grad), and return the report.

    The model is left as it was: parameter gradients are restored afterwards. Under
    `torch.no_grad()` the inference graph is explained; otherwise the training graph.
    """
    opts = MstOptions.from_dict(options)
    saved_grads = {p: p.grad for p in model.parameters()}
    backend = functools.partial(mst_backend, options=opts)
    compiled = torch.compile(model, backend=backend)
    try:
        with collect_reports() as reports:
            out = compiled(*args, **kwargs)
            loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
            if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad:
                loss.backward()
    finally:
        for p, g in saved_grads.items():
            p.grad = g
    if not reports:
        # Dynamo ran the model without compiling: its recompile limit for this forward was
        # reached (each explain adds a cache entry), or the model has nothing to trace.
        raise RuntimeError(
            "explain: no graph reached the mst backend, so there is nothing to report. If this "
            "process already compiled this model many times, Dynamo's recompile limit was hit: "
            "call torch._dynamo.reset() first."
        )
    return Report([g for r in reports for g in r.graphs])
