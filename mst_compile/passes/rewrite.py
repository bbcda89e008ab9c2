"""Rewrite one region into its mini-sequence loops, as planned (docs/design.md, "Rewrite").

The plan (planning.py) holds everything decided about the region, its loops' chunk
subgraphs built and checked; this executes it: the compaction's token numbers and the
loss form's unit-tangent copies emitted, each loop's chunk calls inserted after its inputs
(loops.py), every operand and assembled output checked against its shape (checks.py), and
only then do the region's users switch to the new values. A failure before that removes
everything inserted: a rewrite is all or nothing.
"""

from __future__ import annotations

import dataclasses

from torch.fx import Graph, GraphModule, Node

from .checks import check_loop_operands
from .compaction import emit_compaction
from .graph import fill_fake_values, topological
from .loops import emit_loop, register_subgraphs
from .loss_form import unit_tangent_copies
from .planning import ChunkPlan
from .region import Region, checkpoint_tags
from .rules import matmul_flops
from .symbolic import GraphSymbols, SizeArgs, is_size_node


@dataclasses.dataclass
class Rewritten:
    replacements: dict[Node, Node]  # each region output -> the value now standing for it
    recompute_flops: int  # matmul FLOPs of the forward values the backward loop recomputes


def rewrite_region(
    gm: GraphModule, plan: ChunkPlan, backward: set[Node], replaced: dict[Node, Node]
) -> Rewritten:
    """Replace the region of `plan` in `gm` by its loops (`backward`: the graph's
    tangent-dependent nodes; `replaced`: earlier regions' outputs, which the plan may read,
    -> the values now standing for them)."""
    region = plan.region
    forward = set(region.forward)
    backward_loops = [loop for loop in plan.loops
                      if not loop.scale and not set(loop.outputs) <= forward]
    flops = sum(matmul_flops(n) for loop in backward_loops for n in loop.nodes if n in forward)
    replacements = _insert_loops(gm, plan, backward, replaced)
    _sizes_read_elsewhere(gm.graph, region)
    for out, value in replacements.items():
        out.replace_all_uses_with(value, delete_user_cb=lambda u: u not in region.layouts)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    return Rewritten(replacements, flops)


def _insert_loops(
    gm: GraphModule, plan: ChunkPlan, backward: set[Node], replaced: dict[Node, Node]
) -> dict[Node, Node]:
    """Insert the loops into the graph and check what they pass and return. Returns each
    region output -> the value replacing it. On any error, removes everything it inserted
    and raises."""
    graph = gm.graph
    before = set(graph.nodes)
    registered: list[str] = []
    form = plan.form
    try:
        if form is not None and any(x in replaced for x in form.tangent_inputs):
            raise RuntimeError("an earlier region replaced a value this loss form reads")
        copies = unit_tangent_copies(graph, form) if form is not None else {}
        substitutes = {**replaced, **copies}
        if plan.compaction is not None:
            emit_compaction(graph, plan.region, plan.compaction)
        replacements: dict[Node, Node] = {}
        for loop in plan.loops:
            attrs = register_subgraphs(gm, plan, loop, registered)
            replacements.update(emit_loop(
                graph, plan, loop, attrs, substitutes, form.tangent if form else None
            ))
        for copy in reversed(list(copies.values())):
            if not copy.users:
                graph.erase_node(copy)
        inserted = topological([n for n in graph.nodes if n not in before])
        fill_fake_values(gm, inserted)
        check_loop_operands(gm, inserted, replacements)
        _tag_as_checkpointed(plan.region, inserted, backward)
    except Exception:
        for node in reversed(topological([n for n in graph.nodes if n not in before])):
            graph.erase_node(node)
        shared = gm.meta.get("mst_subgraphs", {})
        for attr in registered:
            delattr(gm, attr)
            for key in [k for k, v in shared.items() if v == attr]:
                del shared[key]
        raise
    return replacements


def _sizes_read_elsewhere(graph: Graph, region: Region) -> None:
    """Sizes the graph reads from region values (`sym_size`, made where a size is read from
    the data) are read from the values the region's sizes come from instead: the region's
    values go."""
    members = set(region.layouts)
    readers = [u for n in region.nodes for u in n.users if u not in members and is_size_node(u)]
    if not readers:
        return
    symbols = GraphSymbols(graph, exclude=members)
    for reader in readers:
        with graph.inserting_before(reader):
            value = SizeArgs(graph, symbols=symbols).arg(reader.meta["val"])
        reader.replace_all_uses_with(value)
        graph.erase_node(reader)


def _tag_as_checkpointed(region: Region, inserted: list[Node], backward: set[Node]) -> None:
    """A region inside one checkpointed block: the inserted nodes the forward could compute
    (the chunks of its inputs, the forward loop) carry its checkpoint tags too, so the
    partitioner recomputes them in the backward like the rest of the block instead of saving
    the chunks of the block's values."""
    values = checkpoint_tags(region)
    if values is None:
        return
    backward = set(backward)
    for node in inserted:  # in topological order: a node reading a backward value is one
        if any(a in backward for a in node.all_input_nodes):
            backward.add(node)
        elif node.op == "call_function":
            node.meta.update(values)
