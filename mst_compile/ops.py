"""Operators that mst's rewritten graphs call at run time.

`accumulate(acc, value)`: acc += value, in place (a summed output that is not one matmul: a
bias gradient, an MoE's expert-weight gradient, a loss sum).
`accumulate_matmul(acc, a, b)`: acc += a @ b, in place. A chunk loop adds each chunk's weight
gradient (a matmul contracting the chunk's tokens) into one accumulator with it, so no chunk
makes a new [out, in] tensor (the weight gradient of a vocabulary head is not made whole
per chunk). The graph calls it through
`auto_functionalized`, the form Inductor turns back into the in-place call when nothing else
reads the old accumulator, and into a copy and the call otherwise: never a wrong value.
`fence(x)`: a copy of x that Inductor cannot fuse through (passes/log_softmax.py).
`put_rows(out, dim, index, value)`: out.index_copy_(dim, index, value), in place: a compacted
loss chunk's output rows written into the whole output (no join of the chunks' rows).
`order_token(like, after)`: a one-element tensor that depends on the tensors `after`. A chunk
loop passes the one made after chunk k's sums and outputs to chunk k + 1's call, so Inductor's
scheduler runs each accumulation before the next chunk (otherwise it may run them late and
hold every chunk's results at once).
`copy_after(value, after)`: a copy of value made after the tensors `after`. The loss form's
forward outputs are made after its gradients, so the partitioner keeps every chunk's
accumulation in the forward graph (otherwise it moves the last one into the backward and
saves that chunk's operands for it). It ends the loss form's loop, so it also
lets go of the loop's workspaces.
`mm_in_workspace(a, b)`: a @ b, written into a buffer kept for the next call. A loss chunk's
logits on the CPU are made with it: glibc maps every buffer over 32 MiB anew and unmaps it
when it is freed, so each chunk would fault in the pages of a new [rows, vocabulary] buffer. The buffer is reused only when nothing else holds it (its storage's use
count), so a chunk never writes over a value still in use; otherwise the call makes a new
one, as `mm` does.
"""

from __future__ import annotations

import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Rows of a mixed-precision product computed at once: the product is made in the operands'
# dtype (as an unchunked graph makes it) and added to the float32 accumulator tile by tile,
# so the temporary is at most this large instead of the accumulator's size.
_TILE_BYTES = 16 * 2**20


@torch.library.custom_op("mst_compile::accumulate", mutates_args=("acc",))
def accumulate(acc: torch.Tensor, value: torch.Tensor) -> None:
    """acc += value in place; acc has value's dtype, or float32 for a low-precision value."""
    acc.add_(value)


@accumulate.register_fake
def _(acc: torch.Tensor, value: torch.Tensor) -> None:
    return None


@torch.library.custom_op("mst_compile::accumulate_matmul", mutates_args=("acc",))
def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place; acc has a's dtype, or float32 for a low-precision a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    rows = max(1, _TILE_BYTES // max(1, b.shape[1] * a.element_size()))
    for start in range(0, a.shape[0], rows):
        acc[start:start + rows].add_(torch.mm(a[start:start + rows], b))


@accumulate_matmul.register_fake
def _(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


@torch.library.custom_op("mst_compile::fence", mutates_args=())
def fence(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that Inductor cannot fuse through: what reads it runs in a later kernel
    than what computes x (used on per-row statistics, [rows, 1], so the copy is small)."""
    return x.clone()


@fence.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("mst_compile::put_rows", mutates_args=("out",))
def put_rows(out: torch.Tensor, dim: int, index: torch.Tensor, value: torch.Tensor) -> None:
    """out.index_copy_(dim, index, value) in place."""
    out.index_copy_(dim, index, value)


@put_rows.register_fake
def _(out: torch.Tensor, dim: int, index: torch.Tensor, value: torch.Tensor) -> None:
    return None


@torch.library.custom_op("mst_compile::copy_after", mutates_args=())
def copy_after(value: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    """A copy of `value` made after `after` (which it does not read); the workspaces are let
    go (the loss form's loop, which ends here, has made its products)."""
    release_workspaces()
    return value.clone()


@copy_after.register_fake
def _(value: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(value)


@torch.library.custom_op("mst_compile::order_token", mutates_args=())
def order_token(like: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    """An uninitialised one-element float32 tensor on `like`'s device, made after `after`
    (read by no one: it only orders what takes it after what it was made after)."""
    return torch.empty(1, device=like.device)


@order_token.register_fake
def _(like: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty(1, device=like.device)


class _Workspace:
    """One buffer and how to tell whether anything but this holds it: every tensor over its
    storage counts as a use (views, Inductor's `reinterpret_tensor`). A Python storage
    object alone does not (it holds one use for good, counted in `_alone`): nothing in a
    compiled graph keeps only that."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.empty(numel, dtype=dtype, device=device)
        self._storage = StorageWeakRef(self.buffer.untyped_storage())
        self._alone = self._uses()  # the use count while only this holds the buffer

    def _uses(self) -> int:
        return torch._C._storage_Use_Count(self._storage.cdata)

    def free(self) -> bool:
        return self._uses() == self._alone


_workspaces: dict[tuple[torch.device, torch.dtype], _Workspace] = {}
_workspaces_lock = threading.Lock()


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of `numel` elements: the one kept for that device and dtype when nothing else
    holds it and it is large enough, else a new one (kept in its place unless that one is in
    use)."""
    key = (device, dtype)
    with _workspaces_lock:
        kept = _workspaces.get(key)
        if kept is not None and not kept.free():
            return torch.empty(numel, dtype=dtype, device=device)
        if kept is None or kept.buffer.numel() < numel:
            kept = _workspaces[key] = _Workspace(numel, dtype, device)
        return kept.buffer[:numel]


def release_workspaces() -> None:
    """Drop the kept buffers (one still in use lives on with its holder)."""
    with _workspaces_lock:
        _workspaces.clear()


@torch.library.custom_op("mst_compile::mm_in_workspace", mutates_args=())
def mm_in_workspace(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, written into `workspace`'s buffer."""
    rows, cols = a.shape[0], b.shape[1]
    return torch.mm(a, b, out=workspace(rows * cols, a.dtype, a.device).view(rows, cols))


@mm_in_workspace.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))
