"""Rewrite one region into mini-sequence loops (DESIGN section 4).

Each part of a region becomes one loop: the forward part computes the region's forward
outputs; the backward part recomputes the forward values it needs, chunk by chunk, and
produces the input gradients (concatenated) and weight gradients (accumulated in fp32).
Every chunk is an `invoke_subgraph` call of a subgraph built once per distinct chunk length,
so Inductor compiles each once and runs the calls one after another.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch._dynamo.utils import detect_fake_mode
from torch.fx import Graph, GraphModule, Node, map_arg
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .analysis import Region, ancestors
from .layout import SUMMED, Chunked, Layout
from .planning import ChunkPlan
from .rules import chunk_shape_args, shape_of
from .symbolic import Size, SizeArgs, is_size_node, symbol_nodes, token_symbols

aten = torch.ops.aten
prims = torch.ops.prims
invoke_subgraph = torch.ops.higher_order.invoke_subgraph


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def loop_nodes(plan: ChunkPlan, outputs: list[Node]) -> list[Node]:
    """Region nodes the outputs depend on, in graph order (for the backward part this
    includes the forward values it recomputes)."""
    layouts = plan.region.layouts
    needed: set[Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(a for a in node.all_input_nodes if a in layouts)
    return [n for n in plan.region.nodes if n in needed]


def rewrite_region(gm: GraphModule, plan: ChunkPlan, name: str) -> bool:
    """Replace the region of `plan` in `gm` by its loops. Returns whether the loss form was
    used: one loop in the forward computing the loss and its gradients."""
    region = plan.region
    graph = gm.graph
    tangent = scalar_tangent(region, graph)
    outputs = region.outputs(region.forward) + region.outputs(region.backward)
    needed = tangent_inputs(graph, loop_nodes(plan, outputs), tangent, region) if tangent else None
    if needed is not None:
        # The backward is linear in the scalar tangent: run it with tangent 1 in the forward
        # loop, no forward value is recomputed, and scale the gradients by the tangent later.
        unit = _unit_tangent_copies(graph, needed, tangent)
        scale = {o: tangent for o in region.outputs(region.backward)}
        _emit_loop(gm, plan, loop_nodes(plan, outputs), outputs, f"{name}_loss", unit, scale)
    else:
        for part_name, part in (("fwd", region.forward), ("bwd", region.backward)):
            if region.outputs(part):
                nodes = loop_nodes(plan, region.outputs(part))
                _emit_loop(gm, plan, nodes, region.outputs(part), f"{name}_{part_name}")
    for node in reversed(region.nodes):
        graph.erase_node(node)
    if needed is not None:
        for node in reversed(list(unit)):
            if not node.users:
                graph.erase_node(node)
    return needed is not None


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


def _unit_tangent_copies(graph: Graph, needed: list[Node], tangent: Node) -> dict[Node, Node]:
    """Copies of `needed` computed with tangent 1. Returns original -> copy."""
    val = tangent.meta["val"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        one = graph.call_function(
            aten.full.default, ([], 1.0), {"dtype": val.dtype, "device": val.device, "pin_memory": False}
        )
    copies: dict[Node, Node] = {tangent: one}
    for node in needed:
        if node is not tangent:
            with graph.inserting_after(node):
                copies[node] = graph.node_copy(node, lambda a: copies.get(a, a))
    del copies[tangent]
    return copies


def order_key(graph: Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def _emit_loop(
    gm: GraphModule,
    plan: ChunkPlan,
    nodes: list[Node],
    outputs: list[Node],
    name: str,
    substitutes: dict[Node, Node] | None = None,
    scale: dict[Node, Node] | None = None,
) -> None:
    """One loop over the chunks computing `outputs` from `nodes`. `substitutes` replaces some
    inputs by other values; `scale` multiplies some outputs by a scalar afterwards."""
    substitutes = substitutes or {}
    scale = scale or {}
    region = plan.region
    graph = gm.graph
    node_set = set(nodes)
    inputs: list[Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if is_size_node(arg):
                continue  # a size in a shape argument: each chunk computes its own
            if arg not in node_set and arg not in inputs:
                inputs.append(arg)
    input_layouts = [region.inputs[a] for a in inputs]
    output_layouts = [region.layouts[o] for o in outputs]

    # Identical chunk subgraphs (the same MLP in every layer) are registered once, so
    # Inductor compiles them once: compile time does not grow with the number of layers.
    symbols = symbol_args(graph, region)  # {} unless the token count is symbolic
    shared: dict[str, str] = gm.meta.setdefault("mst_subgraphs", {})
    attr_of_length: dict[str, str] = {}
    for i, length in enumerate(plan.distinct_lengths()):
        sub = _build_subgraph(
            nodes, inputs, input_layouts, outputs, output_layouts, length, region, symbols
        )
        key = structural_key(sub)
        if key not in shared:
            shared[key] = f"{name}_chunk{i}" if plan.dynamic else f"{name}_len{length}"
            sub.meta["produced_by_mst"] = True
            gm.register_module(shared[key], sub)
        attr_of_length[str(length)] = shared[key]

    passed = [substitutes.get(x, x) for x in inputs]
    anchor = max(passed, key=order_key(graph))
    with graph.inserting_after(anchor):
        sizes = SizeArgs(graph, symbols)
        merged = {
            x: graph.call_function(
                aten.reshape.default, (x, sizes.shape(lay.merged_shape(shape_of(x))))
            )
            for x, lay in zip(passed, input_layouts)
            if isinstance(lay, Chunked)
        }
        accumulators = [
            _zeros(graph, o) for o, lay in zip(outputs, output_layouts) if lay is SUMMED
        ]
        chunk_values: list[list[Node]] = [[] for _ in outputs]
        start = 0
        for length in plan.lengths:
            args = []
            for x, lay in zip(passed, input_layouts):
                if isinstance(lay, Chunked):
                    bounds = sizes.arg(start), sizes.arg(start + length)
                    piece = graph.call_function(
                        aten.slice.Tensor, (merged[x], lay.dims[0], *bounds)
                    )
                    args.append(graph.call_function(
                        aten.reshape.default,
                        (piece, sizes.shape(lay.chunk_shape(shape_of(x), length))),
                    ))
                else:
                    args.append(x)
            attr = attr_of_length[str(length)]
            lead = list(symbols.values())
            call = graph.call_function(
                invoke_subgraph,
                (graph.get_attr(attr), f"mst_{attr}", *lead, *args, *accumulators),
            )
            results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
            accumulators = []
            for i, (res, lay) in enumerate(zip(results, output_layouts)):
                if lay is SUMMED:
                    accumulators.append(res)
                else:
                    chunk_values[i].append(res)
            start += length

        summed = iter(accumulators)
        for out, lay, chunks in zip(outputs, output_layouts, chunk_values):
            if isinstance(lay, Chunked):
                full = shape_of(out)
                pieces = [
                    graph.call_function(
                        aten.reshape.default, (c, sizes.shape(_merged_chunk_shape(lay, full, n)))
                    )
                    for c, n in zip(chunks, plan.lengths)
                ]
                cat = graph.call_function(aten.cat.default, (pieces, lay.dims[0]))
                value = graph.call_function(aten.reshape.default, (cat, sizes.shape(full)))
            else:
                value = next(summed)
            if out in scale:
                value = graph.call_function(aten.mul.Tensor, (value, scale[out]))
            if lay is SUMMED and value_dtype(out) != accumulator_dtype(value_dtype(out)):
                value = graph.call_function(
                    prims.convert_element_type.default, (value, value_dtype(out))
                )
            out.replace_all_uses_with(value, delete_user_cb=lambda u: u not in region.layouts)


def structural_key(sub: GraphModule) -> str:
    """The subgraph's ops, wiring and value metadata, independent of node names."""
    index: dict[Node, int] = {}
    lines = []
    for i, node in enumerate(sub.graph.nodes):
        index[node] = i
        args = map_arg((node.args, node.kwargs), lambda a: f"%{index[a]}")
        target = "" if node.op == "placeholder" else node.target  # a placeholder's is its name
        lines.append(f"{node.op}|{target}|{args!r}|{_meta_key(node.meta.get('val'))}")
    return "\n".join(lines)


def _meta_key(val: object) -> str:
    if isinstance(val, torch.Tensor):
        return f"{val.dtype}{tuple(val.shape)}{val.stride()}{val.device}"
    if isinstance(val, (list, tuple)):
        return "(" + ",".join(_meta_key(v) for v in val) + ")"
    return repr(val)


def value_dtype(node: Node) -> torch.dtype:
    return node.meta["val"].dtype


def _merged_chunk_shape(layout: Chunked, full: list[int], length: int) -> list[int]:
    merged = layout.merged_shape(full)
    merged[layout.dims[0]] = length
    return merged


def _zeros(graph: Graph, like: Node) -> Node:
    val = like.meta["val"]
    return graph.call_function(
        aten.full.default,
        (list(val.shape), 0),
        {"dtype": accumulator_dtype(val.dtype), "device": val.device, "pin_memory": False},
    )


def symbol_args(graph: Graph, region: Region) -> dict[sympy.Symbol, Node]:
    """The size symbols of a symbolic token count and the graph's placeholders holding them
    ({} for a static count)."""
    symbols = token_symbols(region.tokens)
    return dict(zip(symbols, symbol_nodes(graph, symbols) or []))


def _build_subgraph(
    nodes: list[Node],
    inputs: list[Node],
    input_layouts: list[Layout],
    outputs: list[Node],
    output_layouts: list[Layout],
    length: Size,
    region: Region,
    symbols: dict[sympy.Symbol, Node],
) -> GraphModule:
    """The subgraph of one chunk of `length` tokens. With a symbolic token count its first
    inputs are the size symbols: the chunk's sizes are computed from them inside."""
    sub = Graph()
    env: dict[Node, Node] = {}
    example_inputs = []
    inner: dict[sympy.Symbol, Node] = {}
    for symbol, outer in symbols.items():
        inner[symbol] = env[outer] = sub.placeholder(f"size_{symbol}")
        example_inputs.append(outer.meta["val"])
    sizes = SizeArgs(sub, inner)
    for x, lay in zip(inputs, input_layouts):
        env[x] = sub.placeholder(x.name)
        val = x.meta["val"]
        if isinstance(lay, Chunked):
            val = val.new_empty(lay.chunk_shape(val.shape, length))
        example_inputs.append(val)
    accumulators = []
    for out, lay in zip(outputs, output_layouts):
        if lay is SUMMED:
            accumulators.append(sub.placeholder(f"{out.name}_acc"))
            val = out.meta["val"]
            example_inputs.append(val.new_empty(val.shape, dtype=accumulator_dtype(val.dtype)))
    sizes.arg(length)  # a symbolic length is computed once, before the nodes that read it

    for node in nodes:
        new = sub.node_copy(node, lambda a: env[a] if a in env else _shape_only(a, inner))
        shape_pos = chunk_shape_args(node)
        layout = region.layouts[node]
        if shape_pos is not None and isinstance(layout, Chunked):
            args = list(new.args)
            args[shape_pos] = sizes.shape(layout.chunk_shape(shape_of(node), length))
            new.args = tuple(args)
        env[node] = new

    results = []
    acc = iter(accumulators)
    for out, lay in zip(outputs, output_layouts):
        value = env[out]
        if lay is SUMMED:
            if value_dtype(out) != accumulator_dtype(value_dtype(out)):
                value = sub.call_function(
                    prims.convert_element_type.default, (value, accumulator_dtype(value_dtype(out)))
                )
            value = sub.call_function(aten.add.Tensor, (next(acc), value))
        else:
            # Outputs leave the subgraph as fresh contiguous chunks: an output that is a view
            # of a subgraph intermediate (a slice of a fused projection) is not returned as is.
            value = sub.call_function(
                aten.clone.default, (value,), {"memory_format": torch.contiguous_format}
            )
        results.append(value)
    sub.output(tuple(results))
    sub.lint()
    sub_gm = GraphModule(torch.nn.Module(), sub)
    fake_mode = detect_fake_mode(example_inputs)
    FakeTensorProp(sub_gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
    return sub_gm


def _shape_only(arg: Node, inner: dict[sympy.Symbol, Node]) -> Node:
    """Stands in for a symbolic size the region reads in a shape argument, which is replaced
    after the copy (analysis.check_symbolic: it reads them nowhere else)."""
    if not inner or not is_size_node(arg):
        raise KeyError(arg.name)
    return next(iter(inner.values()))


def fill_fake_values(gm: GraphModule) -> None:
    """Give the nodes a rewrite added their `meta["val"]`, in graph order. Cheaper than a
    fake-tensor pass over the whole graph, which would re-run every chunk subgraph."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = detect_fake_mode([v for v in vals if v is not None])
    for node in gm.graph.nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        if node.target is invoke_subgraph:
            sub = getattr(gm, node.args[0].target)
            node.meta["val"] = tuple(o.meta["val"] for o in sub.graph.output_node().args[0])
            continue
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
