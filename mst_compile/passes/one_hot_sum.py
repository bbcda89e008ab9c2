"""The row sum of a one-hot gradient is its one value.

A cross-entropy backward scatters each row's gradient into zeros at the label (`nll_loss`'s
backward), scales it, and the log-softmax backward then sums each row over the vocabulary:

    grad = scatter(zeros[rows, V], 1, label[rows, 1], -1.0) * scale[rows, 1]
    total = grad.sum(1, keepdim=True)              # = -1.0 * scale

Inductor computes that sum as a reduction over the whole vocabulary for every row, a loop of
tokens x V steps that in a chunk with a data-dependent row count (ignored rows skipped) also
checks its vector tail on every step. Each row holds one value and zeros, so the sum is that
value, exactly: this rewrite gives it directly, and the loop goes.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten


def sum_one_hot_rows(graph: Graph) -> int:
    """Replace every row sum of a scaled one-hot scatter in `graph` (whose values are
    propagated) by its value; returns how many. The caller propagates the new nodes'."""
    replaced = 0
    for total in list(graph.find_nodes(op="call_function", target=aten.sum.dim_IntList)):
        value = _one_hot_row_sum(total)
        if value is None:
            continue
        with graph.inserting_before(total):
            new = graph.call_function(aten.mul.Tensor, value)
        total.replace_all_uses_with(new)
        graph.erase_node(total)
        replaced += 1
    return replaced


def _one_hot_row_sum(total: Node) -> tuple | None:
    """(scale, value) if `total` is `sum(scatter(zeros, d, index, value) * scale, [d],
    keepdim=True)` with one index per row and `scale` already of the sum's shape."""
    summed, dims = total.args[:2]
    keepdim = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
    if not keepdim or total.kwargs.get("dtype") is not None or len(dims) != 1:
        return None
    if summed.target is not aten.mul.Tensor or len(summed.args) != 2:
        return None
    for scattered, scale in (summed.args, summed.args[::-1]):
        if isinstance(scattered, Node) and scattered.target is aten.scatter.value:
            break
    else:
        return None
    zeros, dim, index, value = scattered.args
    out, ndim = _val(total), _val(scattered).dim()
    if (
        not isinstance(scale, Node) or not _is_zeros(zeros) or isinstance(value, Node)
        or dim % ndim != dims[0] % ndim or _val(index).shape != out.shape
        or _val(scale).shape != out.shape or _val(scale).dtype != out.dtype
    ):
        return None
    return (scale, value)


def _is_zeros(node: object) -> bool:
    return (
        isinstance(node, Node) and node.target is aten.full.default and node.args[1] == 0
    )


def _val(node: Node) -> torch.Tensor:
    return node.meta["val"]
