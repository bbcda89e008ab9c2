"""A loss chunk writes its logits gradient over the logits.

A loss-form chunk (loss_form.py) computes the cross entropy and its gradient in one graph:
the row statistics (max, log of the sum of exponentials), the target's log-probability, and
the gradient `softmax - one-hot`, all reading the [rows, vocabulary] logits. Inductor fuses
them into one kernel in which the logits are still read by other parts when the gradient is
written, so it writes the gradient into a new buffer of the logits' size (and the
log-softmax over the logits), where Inductor's own backward kernel writes it over the saved
logits: one chunk's new buffer, written once per chunk, costs the loss kernels twice their
time at the full vocabulary.

Here the gradient side reads the row statistics through `ops.fence`, so it runs in a second
kernel, after everything else that reads the logits; there Inductor writes it in place.
The graph is ATen after Inductor's decompositions: a log-softmax is
`shifted - log(sum(exp(shifted)))` with `shifted = x - amax(x)`.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from .. import ops

aten = torch.ops.aten


def gradient_after_statistics(graph: Graph) -> int:
    """Give every wide reader of a log-softmax (one that makes a value of its shape: the
    gradient) its own copy that reads the row statistics through a fence; returns how many
    log-softmaxes were split. The caller propagates the new nodes' fake values (the
    graph's own are propagated: shapes are compared)."""
    split = 0
    for node in list(graph.find_nodes(op="call_function", target=aten.sub.Tensor)):
        parts = _log_softmax_parts(node)
        if parts is None or any(u.op == "output" for u in node.users):
            continue
        wide = [u for u in node.users if _shape(u) == _shape(node)]
        if not wide:
            continue
        x, amax, log = parts
        with graph.inserting_before(node.next):  # in order, before any reader
            fenced_max = graph.call_function(ops.fence._opoverload, (amax,))
            fenced_log = graph.call_function(ops.fence._opoverload, (log,))
            shifted = graph.call_function(aten.sub.Tensor, (x, fenced_max))
            again = graph.call_function(aten.sub.Tensor, (shifted, fenced_log))
        for reader in wide:
            reader.replace_input_with(node, again)
        split += 1
    return split


def _log_softmax_parts(node: Node) -> tuple[Node, Node, Node] | None:
    """(x, amax(x), log(sum(exp(x - amax)))) if `node` is the decomposed log-softmax."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, Node) for a in node.args):
        return None
    shifted, log = node.args
    if log.target is not aten.log.default or not isinstance(log.args[0], Node):
        return None
    total = log.args[0]
    if total.target is not aten.sum.dim_IntList or not isinstance(total.args[0], Node):
        return None
    exp = total.args[0]
    if exp.target is not aten.exp.default or exp.args[0] is not shifted:
        return None
    if shifted.target is not aten.sub.Tensor or len(shifted.args) != 2:
        return None
    x, amax = shifted.args
    if not isinstance(amax, Node) or amax.target is not aten.amax.default or amax.args[0] is not x:
        return None
    return x, amax, log


def _shape(node: Node) -> object:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
