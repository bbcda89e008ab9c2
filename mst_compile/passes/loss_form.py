"""The loss form of a region (docs/design.md, "Loss form"): one forward loop that computes
the loss and its gradients together, used only where that is exact.

A region whose backward depends on nothing but the scalar loss tangent g (the LM head and
its loss) can run its backward with g = 1 inside the forward loop, without recomputing any
forward value, and scale the gradients by the real g afterwards. That is exact only if every
op between g and the gradients is linear in g (a property of each rule); a clipping or
normalising backward, or a gradient that adds a constant, gets the two-loop form instead.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from .graph import ancestors
from .region import Region
from .rules import EACH, FIRST, SUM_OF, facts_of, rule_of, tensor_args

aten = torch.ops.aten


@dataclasses.dataclass
class LossForm:
    tangent: Node  # the scalar loss tangent
    tangent_inputs: list[Node]  # outside values the loop reads that depend on it, in graph order


def loss_form(graph: Graph, region: Region, loop: list[Node]) -> LossForm | None:
    """The loss form of `region` computing `loop`, or None if it would not be exact."""
    tangent = scalar_tangent(region, graph)
    if tangent is None:
        return None
    needed = tangent_inputs(graph, loop, tangent, region)
    if needed is None or not linear_in_tangent(tangent, needed, loop):
        return None
    return LossForm(tangent, needed)


def scalar_tangent(region: Region, graph: Graph) -> Node | None:
    """The one 0-dim tangent (the loss's) that the region's backward depends on, if that is
    the only tangent it depends on."""
    if not region.backward:
        return None
    upstream = ancestors(region.backward)
    tangents = [
        n for n in graph.find_nodes(op="placeholder")
        if n.name.startswith("tangents") and n in upstream
    ]
    if len(tangents) != 1 or tangents[0].meta["val"].dim() != 0:
        return None
    return tangents[0]


def tangent_inputs(graph: Graph, nodes: list[Node], tangent: Node, region: Region) -> list[Node] | None:
    """The outside values the loop reads that depend on `tangent`, with their ancestors that
    do, in graph order; None if one of them depends on the region itself (an MLP's output
    gradient comes through the rest of the model: it cannot move into the forward)."""
    node_set = set(nodes)
    depends: set[Node] = {tangent}
    for node in graph.nodes:
        if node not in region.layouts and any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    needed = {a for n in nodes for a in n.all_input_nodes if a not in node_set and a in depends}
    needed |= {a for a in ancestors(list(needed)) if a in depends}
    if any(a in region.layouts for a in ancestors(list(needed))):
        return None
    return [n for n in graph.nodes if n in needed]


def linear_in_tangent(tangent: Node, needed: list[Node], loop: list[Node]) -> bool:
    """Whether every value computed from `tangent` (the outside values `needed`, then the
    loop's) is a linear function of it, by the `linear` property of each op's rule."""
    carries = {tangent}
    for node in needed + loop:
        if node is tangent or not any(a in carries for a in node.all_input_nodes):
            continue
        if not _linear_op(node, carries):
            return False
        carries.add(node)
    return True


def _linear_op(node: Node, carries: set[Node]) -> bool:
    rule = rule_of(node)
    if rule is None or rule.linear is None:
        return False
    args = [a for _, a in tensor_args(node)]
    if any(a in carries for a in node.all_input_nodes if a not in args):
        return False  # the tangent reaches a keyword or size argument
    carrying = [a for a in args if a in carries]
    if rule.linear == EACH:
        return len(carrying) == 1
    if rule.linear == FIRST:
        return carrying == args[:1]
    if rule.linear == SUM_OF:  # every float argument carries it or is zero; masks do not
        return all(
            (a in carries or is_zero_constant(a)) if _is_float(a) else a not in carries for a in args
        )
    return False


def _is_float(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def is_zero_constant(node: Node) -> bool:
    """A constant zero tensor (the untaken branch of a `where`)."""
    pos = facts_of(node).fill_arg
    if pos is None or len(node.args) <= pos:
        return False
    value = node.args[pos]
    return isinstance(value, (int, float)) and value == 0


def unit_tangent_copies(graph: Graph, form: LossForm) -> dict[Node, Node]:
    """Copies of the tangent inputs computed with tangent 1 (the tangent itself -> a 1).
    Returns original -> copy."""
    tangent = form.tangent
    val = tangent.meta["val"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        one = graph.call_function(
            aten.full.default, ([], 1.0), {"dtype": val.dtype, "device": val.device, "pin_memory": False}
        )
    copies: dict[Node, Node] = {tangent: one}
    for node in form.tangent_inputs:
        if node is not tangent:
            with graph.inserting_after(node):
                copies[node] = graph.node_copy(node, lambda a: copies.get(a, a))
    return copies
