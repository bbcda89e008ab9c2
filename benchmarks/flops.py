"""The matmul work of one training step, counted without running it: the denominator of
mst's recompute floor (the extra matmul FLOPs its backward loops recompute, over the step's)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import workload


def step_flops(workload_name: str, seq: int, checkpointing: bool = False) -> int | None:
    """FLOPs of one eager training step (forward + backward) of the workload at `seq`
    tokens, counted by torch's FlopCounterMode on meta tensors: no memory, no time. With
    activation checkpointing the recomputed forward is counted too. None where the model
    reads data on the host (an MoE's expert loop over the token counts): meta tensors
    hold none, and FlopCounterMode would not count an opaque expert op anyway."""
    work = workload.get(workload_name)
    with torch.device("meta"):
        model = work.make(checkpointing).to(dtype=work.dtype)
    ids, labels = work.make_inputs(seq)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(ids.to("meta"), labels.to("meta")).backward()
    except (RuntimeError, NotImplementedError):
        return None
    return counter.get_total_flops()
