"""The matmul work of one training step, counted without running it: the denominator of
mst's recompute floor (the extra matmul FLOPs its backward loops recompute, over the step's)."""

from __future__ import annotations

import contextlib
from unittest import mock

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
        with counter, _no_packed_sequence_check():
            model(ids.to("meta"), labels.to("meta")).backward()
    except (RuntimeError, NotImplementedError):
        return None
    return counter.get_total_flops()


def _no_packed_sequence_check():
    """transformers' causal-mask builder reads the position ids on the host to find packed
    sequences (`.item()`, which meta tensors cannot answer); the inputs here are one
    sequence per row, and the mask costs no matmul work either way."""
    try:
        from transformers import masking_utils
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return contextlib.nullcontext()
    return mock.patch.object(masking_utils, "find_packed_sequence_indices", return_value=None)
