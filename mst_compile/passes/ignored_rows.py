"""Ignored rows: tokens whose label is the ignore index never reach the vocabulary projection
(docs/design.md, "Ignored rows").

In a loss region, a row (token) whose label is `ignore_index` contributes nothing to the
loss or to any gradient when every way the region's values reach the rest of the graph is
masked by `label != ignore_index`. This module proves that on the graph, without knowing
which loss it is, and names the labels the mask comes from; the rewrite then runs the
region over the kept rows only (compaction.py, rewrite.py).

The proof, for one mask (a label tensor L read in the region's token order, and a value i):

- a value is **zero on ignored rows** (Z) if it is `where(L != i, x, 0)` or `where(L == i,
  0, x)` with the mask lined up with the tokens, or comes from Z values by ops that keep a
  zero a zero (a product with a Z factor, a sum of Z terms, views, a negation, a matmul or a
  sum over the tokens, whose ignored terms are then zero). Region inputs are traced back
  through the ops outside the region that compute them; region values forward, in order.
- every Summed output of the region (weight gradients, loss sums) must be Z: ignored rows
  add nothing to it.
- every token-wise output must be Z (then zero is its value on ignored rows), or masked
  downstream: every path from it through the rest of the graph, token by token, meets a
  `where` with that mask before anything else reads it (then its value on ignored rows is
  never read). A value returned by the graph, or reduced over the tokens first, is neither.

"Lined up with the tokens": the mask has one element per token and its row-major order is
the region's token order (its layout's token dims are its leading dims, in order), and it is
computed from L by views that keep the row-major order, so every such mask is the same
predicate `L.reshape(T) != i` over the tokens.

A zero times a non-finite value is not zero: like eager, the proof assumes the values it
multiplies by a Z value are finite on ignored rows (an eager run where they are not gives a
NaN gradient there). The skipped rows of an output masked downstream get the values of a
computed row, so what the rest of the graph computes from them is as finite as in eager.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .layout import SUMMED, Chunked, Layout
from .loss_form import is_zero_constant
from .region import Region
from .rules import (
    EACH,
    argument_layouts,
    facts_of,
    output_layout,
    shape_of,
    tensor_args,
    zero_where,
)

aten = torch.ops.aten

MAX_DEPTH = 32  # how far back an input is traced outside the region


@dataclasses.dataclass(frozen=True)
class Mask:
    labels: Node  # the tensor the mask reads, one element per token, in token order
    ignore_index: int


@dataclasses.dataclass
class IgnoredRows:
    """The region may skip the rows `mask` says are ignored. Its token-wise outputs in
    `zero_outputs` are zero there; its other token-wise outputs are masked downstream (the
    rewrite gives their skipped rows the values of a computed row: real, finite values)."""

    mask: Mask
    zero_outputs: set[Node]


def find_ignored_rows(region: Region) -> IgnoredRows | str:
    """The ignored rows the loss region `region` may skip, or the reason it may not."""
    candidates = _candidate_masks(region)
    if not candidates:
        return "no mask of an ignore_index on labels lined up with the tokens reaches the loss"
    reasons = []
    for mask in candidates:
        result = _Proof(region, mask).run()
        if isinstance(result, IgnoredRows):
            return result
        reasons.append(result)
    return reasons[0]


def _candidate_masks(region: Region) -> list[Mask]:
    """The (labels, ignore index) pairs of the masks in the graph with one element per token."""
    found: dict[Mask, None] = {}
    for node in region.seed.graph.nodes:
        mask = _mask_of(node, region)
        if mask is not None:
            found[mask[0]] = None
    return list(found)


def _mask_of(node: Node, region: Region) -> tuple[Mask, bool] | None:
    """(mask, True where kept) if `node` compares labels with one element per token to a
    constant; None otherwise."""
    kept = True
    if facts_of(node).mask == "negates":
        node, kept = node.args[0], False
    mask = facts_of(node).mask
    if mask not in ("kept", "ignored"):
        return None
    labels, value = node.args[0], node.args[1]
    val = labels.meta.get("val") if isinstance(labels, Node) else None
    if not (isinstance(val, torch.Tensor) and not val.dtype.is_floating_point
            and isinstance(value, int) and statically_known_true(val.numel() == region.tokens)):
        return None
    while facts_of(labels).keeps_order:
        labels = labels.args[0]
    return Mask(labels, value), (mask == "kept") == kept


class _Proof:
    def __init__(self, region: Region, mask: Mask):
        self.region, self.mask = region, mask
        self.zero: dict[Node, bool] = {}

    def run(self) -> IgnoredRows | str:
        region = self.region
        self.zero = {
            x: isinstance(lay, Chunked) and self._traced_zero(x, lay, MAX_DEPTH)
            for x, lay in region.inputs.items()
        }
        for node in region.nodes:
            self.zero[node] = self._zero_by_op(
                node, lambda a: self.zero.get(a, False), lambda a: region.layouts.get(a) or region.inputs.get(a)
            )
        outputs = region.outputs(region.forward) + region.outputs(region.backward)
        for out in outputs:
            layout = region.layouts[out]
            if self.zero[out]:
                continue
            if layout is SUMMED:
                return (f"{out.name} ({out.target}) sums over the tokens values that are not "
                        "zero on ignored rows")
            reason = self._masked_downstream(out, layout, MAX_DEPTH)
            if reason:
                return reason
        return IgnoredRows(self.mask, {out for out in outputs if self.zero[out]})

    def _traced_zero(self, node: Node, layout: Layout, depth: int) -> bool:
        """Whether `node` (outside the region, with `layout`) is zero on ignored rows, traced
        back through the ops that compute it."""
        if depth == 0 or node.op != "call_function" or not isinstance(layout, Chunked):
            return False
        layouts = argument_layouts(node, layout, self.region.tokens)
        if layouts is None:
            return False
        by_node = {a: layouts[k] for k, a in tensor_args(node) if k in layouts}
        return self._zero_by_op(
            node,
            lambda a: a in by_node and self._traced_zero(a, by_node[a], depth - 1),
            by_node.get,
        )

    def _zero_by_op(
        self, node: Node, is_zero: Callable[[Node], bool], layout_of: Callable[[Node], Layout | None]
    ) -> bool:
        """Whether `node` is zero on ignored rows, given which of its arguments are."""
        if node.op != "call_function":
            return False
        if node.target is aten.where.self:
            cond, a, b = node.args[:3]
            kept = self._lined_up_mask(cond, layout_of(cond)) if isinstance(cond, Node) else None
            a_zero = _is_zero_value(a) or (isinstance(a, Node) and is_zero(a))
            b_zero = _is_zero_value(b) or (isinstance(b, Node) and is_zero(b))
            return (kept is True and b_zero) or (kept is False and a_zero) or (a_zero and b_zero)
        if (facts_of(node).converts and isinstance(node.args[0], Node)
                and self._lined_up_mask(node.args[0], layout_of(node.args[0])) is True):
            return True  # the kept-rows mask as numbers: 0 on ignored rows
        # zero where its arguments are, by how it is linear in them (rules.py)
        return zero_where(node, lambda a: _is_zero_value(a) or (isinstance(a, Node) and is_zero(a)))

    def _lined_up_mask(self, cond: Node, layout: Layout | None) -> bool | None:
        """True / False if `cond` is this mask (kept / ignored rows) lined up with the tokens,
        None if it is not."""
        found = _mask_of(cond, self.region)
        if found is None or found[0] != self.mask or not _token_order_is_row_major(cond, layout):
            return None
        return found[1]

    def _masked_downstream(self, node: Node, layout: Layout, depth: int) -> str:
        """'' if every use of `node` outside the region meets this mask (a `where`, or a
        product with a value that is zero on ignored rows) before anything reads its values
        across tokens; otherwise why not."""
        for user in node.users:
            if user in self.region.layouts:
                continue
            if user.op == "output":
                return f"{node.name} ({node.target}) is returned by the graph, ignored rows included"
            if depth == 0:
                return f"{node.name}: its uses are too far from a mask of the ignored rows"
            out_layout = output_layout(user, node, layout, self.region.tokens)
            if not isinstance(out_layout, Chunked):
                return (f"{node.name} ({node.target}) reaches {user.name} ({user.target}), "
                        "which mixes tokens, before a mask of the ignored rows")
            if facts_of(user).linear == EACH and self._other_factor_zero(user, node, out_layout):
                continue  # multiplied by a factor that is zero on ignored rows
            if user.target is aten.where.self:
                layouts = argument_layouts(user, out_layout, self.region.tokens)
                cond, a, b = user.args[:3]
                kept = self._lined_up_mask(cond, layouts.get(0)) if layouts and isinstance(cond, Node) else None
                if (kept is True and node is a and _is_zero_value(b) and node is not b) or (
                    kept is False and node is b and _is_zero_value(a) and node is not a
                ):
                    continue
            reason = self._masked_downstream(user, out_layout, depth - 1)
            if reason:
                return reason
        return ""


    def _other_factor_zero(self, product: Node, node: Node, layout: Chunked) -> bool:
        """Whether another factor of `product` (a token-wise product of `node`) is zero on
        ignored rows, so that the values of `node` there (zeros, when skipped) are not read."""
        layouts = argument_layouts(product, layout, self.region.tokens)
        if layouts is None:
            return False
        return any(
            a is not node and self._traced_zero(a, layouts[k], MAX_DEPTH)
            for k, a in tensor_args(product) if k in layouts
        )


def _token_order_is_row_major(node: Node, layout: Layout | None) -> bool:
    """Whether `node` has one element per token and its row-major order is the token order."""
    if not isinstance(layout, Chunked):
        return False
    shape = shape_of(node)
    return layout.sliceable(shape) and all(
        statically_known_true(s == 1) for d, s in enumerate(shape)
        if d not in layout.dims and not layout.dims[0] <= d <= layout.dims[-1]
    )


def _is_zero_value(value: object) -> bool:
    if isinstance(value, (int, float)):
        return value == 0
    return isinstance(value, Node) and is_zero_constant(value)
