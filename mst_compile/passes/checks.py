"""The checks a rewrite makes before it changes the graph: every value of a chunk subgraph
has the shape its token layout implies, every operand passed to a chunk the shape of the
subgraph's input, every assembled output the shape and dtype of the value it replaces. A
mismatch means the analysis and the graph disagree: the region is not rewritten."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .layout import SCALED, Chunked, Layout
from .symbolic import Size, same_shape

invoke_subgraph = torch.ops.higher_order.invoke_subgraph


class LayoutMismatch(RuntimeError):
    """A value of a chunk subgraph, or an operand passed to one, does not have the shape its
    layout implies: the analysis and the graph disagree, so the region is not rewritten."""


def check_value(chunk_val: object, node: Node, layout: Layout, length: Size) -> None:
    """The value of `node` in a chunk subgraph has the shape and dtype its layout implies
    (a Scaled value's shape follows from its ops: resize.py)."""
    if layout is SCALED:
        return
    full = node.meta["val"]
    pairs = zip(chunk_val, full) if isinstance(full, (list, tuple)) else [(chunk_val, full)]
    for got, whole in pairs:
        if not isinstance(whole, torch.Tensor):
            continue
        want = layout.chunk_shape(whole.shape, length) if isinstance(layout, Chunked) else list(whole.shape)
        if not (isinstance(got, torch.Tensor) and got.dtype == whole.dtype and same_shape(got.shape, want)):
            shape = list(got.shape) if isinstance(got, torch.Tensor) else got
            raise LayoutMismatch(
                f"in a chunk of {length} tokens, {node.name} ({node.target}) is {shape}, "
                f"but its layout {layout} over {list(whole.shape)} implies {want}"
            )


def check_loop_operands(gm: GraphModule, inserted: list[Node], replacements: dict[Node, Node]) -> None:
    """Every operand passed to a chunk subgraph has the shape of the subgraph's placeholder,
    and every assembled output the shape and dtype of the value it replaces."""
    for node in inserted:
        if node.target is not invoke_subgraph:
            continue
        sub = getattr(gm, node.args[0].target)
        for arg, ph in zip(node.args[2:], sub.graph.find_nodes(op="placeholder")):
            got, want = arg.meta.get("val"), ph.meta.get("val")
            if isinstance(want, torch.Tensor) and not (
                isinstance(got, torch.Tensor) and same_shape(got.shape, want.shape)
            ):
                raise LayoutMismatch(
                    f"{node.args[1]} is passed {arg.name} of shape "
                    f"{list(got.shape) if isinstance(got, torch.Tensor) else got} for its input "
                    f"{ph.name} of shape {list(want.shape)}"
                )
    for out, value in replacements.items():
        got, want = value.meta["val"], out.meta["val"]
        if got.dtype != want.dtype or not same_shape(got.shape, want.shape):
            raise LayoutMismatch(
                f"{out.name} comes back from its chunks as {got.dtype}{list(got.shape)}, "
                f"not {want.dtype}{list(want.shape)}"
            )
