"""Rewrite one region into mini-sequence loops (docs/design.md, "Rewrite").

Each part of a region becomes one loop: the forward part computes the region's forward
outputs; the backward part recomputes the forward values it needs, chunk by chunk, and
produces the input gradients (concatenated) and weight gradients (accumulated in fp32).
Every chunk is an `invoke_subgraph` call of a subgraph built once per distinct chunk length,
so Inductor compiles each once and runs the calls one after another.

A rewrite is all or nothing: the chunk subgraphs are built and checked before the graph is
touched, the loops are inserted and their operands checked, and only then do the region's
users switch over. A failure before that removes what was inserted (`RegionRewriteError`).
"""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
from torch._dynamo.utils import detect_fake_mode
from torch.fx import Graph, GraphModule, Node, map_arg
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .analysis import Region
from .layout import SUMMED, Chunked, Layout
from .loss_form import LossForm, loss_form, unit_tangent_copies
from .planning import ChunkPlan
from .rules import SQUEEZES, rule_of, shape_of, squeezed_dims
from .symbolic import Size, SizeArgs, graph_symbols, is_size_node, symbol_nodes, token_symbols

aten = torch.ops.aten
prims = torch.ops.prims
invoke_subgraph = torch.ops.higher_order.invoke_subgraph


class LayoutMismatch(RuntimeError):
    """A value of a chunk subgraph, or an operand passed to one, does not have the shape its
    layout implies: the analysis and the graph disagree, so the region is not rewritten."""


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


@dataclasses.dataclass
class Loop:
    """One loop over the chunks computing `outputs` from `nodes`."""

    name: str
    nodes: list[Node]
    outputs: list[Node]
    inputs: list[Node]  # values from outside the loop, in first-use order
    subgraphs: dict[str, GraphModule]  # str(chunk length) -> its subgraph
    scale: bool = False  # multiply the backward outputs by the loss tangent (loss form)


@dataclasses.dataclass
class Rewritten:
    grads_in_forward: bool  # the loss form: one forward loop computing loss and gradients
    replacements: dict[Node, Node]  # each region output -> the value now standing for it


def rewrite_region(gm: GraphModule, plan: ChunkPlan, name: str) -> Rewritten:
    """Replace the region of `plan` in `gm` by its loops."""
    region = plan.region
    outputs = region.outputs(region.forward) + region.outputs(region.backward)
    form = loss_form(gm.graph, region, loop_nodes(plan, outputs))
    if form is not None:
        # The backward is linear in the scalar tangent: run it with tangent 1 in the forward
        # loop, no forward value is recomputed, and scale the gradients by the tangent later.
        parts = [(f"{name}_loss", outputs, True)]
    else:
        parts = [
            (f"{name}_{part_name}", region.outputs(part), False)
            for part_name, part in (("fwd", region.forward), ("bwd", region.backward))
            if region.outputs(part)
        ]
    loops = [_build_loop(plan, loop_name, outs, scale) for loop_name, outs, scale in parts]
    replacements = _insert_loops(gm, plan, loops, form)
    for out, value in replacements.items():
        out.replace_all_uses_with(value, delete_user_cb=lambda u: u not in region.layouts)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    return Rewritten(form is not None, replacements)


def _build_loop(plan: ChunkPlan, name: str, outputs: list[Node], scale: bool) -> Loop:
    """The loop's chunk subgraphs, built and checked without touching the graph."""
    nodes = loop_nodes(plan, outputs)
    node_set = set(nodes)
    inputs: list[Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if is_size_node(arg):
                continue  # a size in a shape argument: each chunk computes its own
            if arg not in node_set and arg not in inputs:
                inputs.append(arg)
    symbols = symbol_args(plan.region)
    subgraphs = {
        str(length): _build_subgraph(nodes, inputs, outputs, length, plan.region, symbols)
        for length in plan.distinct_lengths()
    }
    return Loop(name, nodes, outputs, inputs, subgraphs, scale)


def _insert_loops(
    gm: GraphModule, plan: ChunkPlan, loops: list[Loop], form: LossForm | None
) -> dict[Node, Node]:
    """Insert the loops into the graph and check what they pass and return. Returns each
    region output -> the value replacing it. On any error, removes everything it inserted
    and raises."""
    graph = gm.graph
    before = set(graph.nodes)
    registered: list[str] = []
    try:
        substitutes = unit_tangent_copies(graph, form) if form is not None else {}
        replacements: dict[Node, Node] = {}
        for loop in loops:
            attrs = _register_subgraphs(gm, plan, loop, registered)
            replacements.update(
                _emit_loop(graph, plan, loop, attrs, substitutes, form.tangent if form else None)
            )
        for copy in reversed(list(substitutes.values())):
            if not copy.users:
                graph.erase_node(copy)
        inserted = _topological([n for n in graph.nodes if n not in before])
        fill_fake_values(gm, inserted)
        _check_loop_operands(gm, inserted, replacements)
    except Exception:
        for node in reversed(_topological([n for n in graph.nodes if n not in before])):
            graph.erase_node(node)
        shared = gm.meta.get("mst_subgraphs", {})
        for attr in registered:
            delattr(gm, attr)
            for key in [k for k, v in shared.items() if v == attr]:
                del shared[key]
        raise
    return replacements


def _topological(nodes: list[Node]) -> list[Node]:
    """`nodes` with every node after the ones of them it reads (nodes inserted after one
    anchor are not in graph order until the graph is sorted)."""
    members = set(nodes)
    done: set[Node] = set()
    order: list[Node] = []

    def visit(node: Node) -> None:
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if n in done:
                continue
            if expanded:
                done.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in n.all_input_nodes if a in members and a not in done)

    for node in nodes:
        visit(node)
    return order


def _register_subgraphs(gm: GraphModule, plan: ChunkPlan, loop: Loop, registered: list[str]) -> dict[str, str]:
    """Register the loop's subgraphs on `gm`. Identical chunk subgraphs (the same MLP in
    every layer) are registered once, so Inductor compiles them once: compile time does not
    grow with the number of layers. Returns str(length) -> attribute name."""
    shared: dict[str, str] = gm.meta.setdefault("mst_subgraphs", {})
    attrs: dict[str, str] = {}
    for i, (length, sub) in enumerate(loop.subgraphs.items()):
        key = structural_key(sub)
        if key not in shared:
            attr = f"{loop.name}_chunk{i}" if plan.dynamic else f"{loop.name}_len{length}"
            sub.meta["produced_by_mst"] = True
            gm.register_module(attr, sub)
            shared[key] = attr
            registered.append(attr)
        attrs[length] = shared[key]
    return attrs


def _emit_loop(
    graph: Graph,
    plan: ChunkPlan,
    loop: Loop,
    attrs: dict[str, str],
    substitutes: dict[Node, Node],
    tangent: Node | None,
) -> dict[Node, Node]:
    """The chunk calls of one loop, after its last input. Returns output -> assembled value."""
    region = plan.region
    input_layouts = [region.inputs[a] for a in loop.inputs]
    output_layouts = [region.layouts[o] for o in loop.outputs]
    symbols = symbol_args(region)
    passed = [substitutes.get(x, x) for x in loop.inputs]
    anchor = max(passed, key=order_key(graph))
    replacements: dict[Node, Node] = {}
    with graph.inserting_after(anchor):
        sizes = SizeArgs(graph, graph_symbols(graph))
        tokens = {
            x: _token_rows(graph, sizes, x, lay, region.tokens)
            for x, lay in zip(passed, input_layouts)
            if isinstance(lay, Chunked)
        }
        accumulators = [
            _zeros(graph, o) for o, lay in zip(loop.outputs, output_layouts) if lay is SUMMED
        ]
        chunk_values: list[list[Node]] = [[] for _ in loop.outputs]
        start = 0
        for length in plan.lengths:
            args = [
                _chunk_of(graph, sizes, tokens[x], x, lay, start, length)
                if isinstance(lay, Chunked) else x
                for x, lay in zip(passed, input_layouts)
            ]
            attr = attrs[str(length)]
            lead = list(symbols.values())
            call = graph.call_function(
                invoke_subgraph,
                (graph.get_attr(attr), f"mst_{attr}", *lead, *args, *accumulators),
            )
            results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(loop.outputs))]
            accumulators = []
            for i, (res, lay) in enumerate(zip(results, output_layouts)):
                if lay is SUMMED:
                    accumulators.append(res)
                else:
                    chunk_values[i].append(res)
            start += length

        summed = iter(accumulators)
        backward = set(region.outputs(region.backward))
        for out, lay, chunks in zip(loop.outputs, output_layouts, chunk_values):
            if isinstance(lay, Chunked):
                value = _assemble(graph, sizes, chunks, plan.lengths, out, lay)
            else:
                value = next(summed)
            if loop.scale and out in backward:
                value = graph.call_function(aten.mul.Tensor, (value, tangent))
            if lay is SUMMED and value_dtype(out) != accumulator_dtype(value_dtype(out)):
                value = graph.call_function(
                    prims.convert_element_type.default, (value, value_dtype(out))
                )
            replacements[out] = value
    return replacements


def _token_rows(graph: Graph, sizes: SizeArgs, x: Node, layout: Chunked, tokens: Size) -> Node:
    """`x` with its tokens merged into one dim, sliced chunk by chunk: in place where the
    tokens are consecutive dims in order (a view), else token-major first (a copy of this
    region input)."""
    shape = shape_of(x)
    if layout.sliceable(shape):
        return graph.call_function(aten.reshape.default, (x, sizes.shape(layout.merged_shape(shape))))
    order = layout.token_major_order(len(shape))
    permuted = graph.call_function(aten.permute.default, (x, order))
    rest = [shape[d] for d in order[len(layout.dims):]]
    return graph.call_function(aten.reshape.default, (permuted, sizes.shape([tokens, *rest])))


def _chunk_of(
    graph: Graph, sizes: SizeArgs, rows: Node, x: Node, layout: Chunked, start: Size, length: Size
) -> Node:
    """Chunk [start, start + length) of the tokens of `x` (its merged rows), in the chunk
    layout: token dims 1, ..., 1, length."""
    shape = shape_of(x)
    dim = layout.dims[0] if layout.sliceable(shape) else 0
    piece = graph.call_function(aten.slice.Tensor, (rows, dim, sizes.arg(start), sizes.arg(start + length)))
    chunk_shape = layout.chunk_shape(shape, length)
    if layout.sliceable(shape):
        return graph.call_function(aten.reshape.default, (piece, sizes.shape(chunk_shape)))
    order = layout.token_major_order(len(shape))
    major = graph.call_function(aten.reshape.default, (piece, sizes.shape([chunk_shape[d] for d in order])))
    return graph.call_function(aten.permute.default, (major, _inverse(order)))


def _assemble(
    graph: Graph, sizes: SizeArgs, chunks: list[Node], lengths: list[Size], out: Node, layout: Chunked
) -> Node:
    """The whole value from its chunks, in the layout of `out`."""
    full = shape_of(out)
    if layout.sliceable(full):
        merged = layout.merged_shape(full)
        dim = layout.dims[0]
        pieces = [
            graph.call_function(aten.reshape.default, (c, sizes.shape(_with(merged, dim, n))))
            for c, n in zip(chunks, lengths)
        ]
        cat = graph.call_function(aten.cat.default, (pieces, dim))
        return graph.call_function(aten.reshape.default, (cat, sizes.shape(full)))
    order = layout.token_major_order(len(full))
    rest = [full[d] for d in order[len(layout.dims):]]
    pieces = [
        graph.call_function(
            aten.reshape.default,
            (graph.call_function(aten.permute.default, (c, order)), sizes.shape([n, *rest])),
        )
        for c, n in zip(chunks, lengths)
    ]
    cat = graph.call_function(aten.cat.default, (pieces, 0))
    major = graph.call_function(aten.reshape.default, (cat, sizes.shape([full[d] for d in order])))
    return graph.call_function(aten.permute.default, (major, _inverse(order)))


def _with(shape: list[Size], dim: int, size: Size) -> list[Size]:
    out = list(shape)
    out[dim] = size
    return out


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return inverse


def order_key(graph: Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


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


def _zeros(graph: Graph, like: Node) -> Node:
    val = like.meta["val"]
    return graph.call_function(
        aten.full.default,
        (list(val.shape), 0),
        {"dtype": accumulator_dtype(val.dtype), "device": val.device, "pin_memory": False},
    )


def symbol_args(region: Region) -> dict[sympy.Symbol, Node]:
    """The size symbols of a symbolic token count and the graph's placeholders holding them,
    passed to every chunk subgraph ({} for a static count)."""
    symbols = token_symbols(region.tokens)
    return dict(zip(symbols, symbol_nodes(region.seed.graph, symbols) or []))


def _build_subgraph(
    nodes: list[Node],
    inputs: list[Node],
    outputs: list[Node],
    length: Size,
    region: Region,
    symbols: dict[sympy.Symbol, Node],
) -> GraphModule:
    """The subgraph of one chunk of `length` tokens, with every value's shape checked against
    its layout. With a symbolic token count its first inputs are the size symbols: the
    chunk's sizes are computed from them inside."""
    sub = Graph()
    env: dict[Node, Node] = {}
    example_inputs = []
    inner: dict[sympy.Symbol, Node] = {}
    for symbol, outer in symbols.items():
        inner[symbol] = env[outer] = sub.placeholder(f"size_{symbol}")
        example_inputs.append(outer.meta["val"])
    sizes = SizeArgs(sub, inner)
    for x in inputs:
        env[x] = sub.placeholder(x.name)
        example_inputs.append(_chunk_val(x.meta["val"], region.inputs[x], length))
    accumulators = []
    for out in outputs:
        if region.layouts[out] is SUMMED:
            accumulators.append(sub.placeholder(f"{out.name}_acc"))
            val = out.meta["val"]
            example_inputs.append(val.new_empty(val.shape, dtype=accumulator_dtype(val.dtype)))
    sizes.arg(length)  # a symbolic length is computed once, before the nodes that read it

    for node in nodes:
        new = sub.node_copy(node, lambda a: env[a] if a in env else _shape_only(a, inner))
        layout = region.layouts[node]
        rule = rule_of(node)
        if rule.shape_arg is not None and isinstance(layout, Chunked):
            args = list(new.args)
            args[rule.shape_arg] = sizes.shape(layout.chunk_shape(shape_of(node), length))
            new.args = tuple(args)
        elif node.target in SQUEEZES:
            # a chunk's leading token dims have size 1: squeeze only what the whole value does
            new.target = aten.squeeze.dims
            new.args = (new.args[0], squeezed_dims(node))
            new.kwargs = {}
        env[node] = new

    results = []
    acc = iter(accumulators)
    for out in outputs:
        value = env[out]
        if region.layouts[out] is SUMMED:
            if value_dtype(out) != accumulator_dtype(value_dtype(out)):
                value = sub.call_function(
                    prims.convert_element_type.default, (value, accumulator_dtype(value_dtype(out)))
                )
            value = sub.call_function(aten.add.Tensor, (next(acc), value))
        elif rule_of(out).aliases:
            # An output that may be a view of a subgraph intermediate (a slice of a fused
            # projection) leaves as a fresh chunk: Inductor would return the view as is.
            value = sub.call_function(
                aten.clone.default, (value,), {"memory_format": torch.contiguous_format}
            )
        results.append(value)
    sub.output(tuple(results))
    sub.lint()
    sub_gm = GraphModule(torch.nn.Module(), sub)
    fake_mode = detect_fake_mode(example_inputs)
    FakeTensorProp(sub_gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
    for node in nodes:
        _check_value(env[node].meta.get("val"), node, region.layouts[node], length)
    return sub_gm


def _chunk_val(val: torch.Tensor, layout: Layout, length: Size) -> torch.Tensor:
    if isinstance(layout, Chunked):
        return val.new_empty(layout.chunk_shape(val.shape, length))
    return val


def _check_value(chunk_val: object, node: Node, layout: Layout, length: Size) -> None:
    """The value of `node` in a chunk subgraph has the shape and dtype its layout implies."""
    full = node.meta["val"]
    pairs = zip(chunk_val, full) if isinstance(full, (list, tuple)) else [(chunk_val, full)]
    for got, whole in pairs:
        if not isinstance(whole, torch.Tensor):
            continue
        want = layout.chunk_shape(whole.shape, length) if isinstance(layout, Chunked) else list(whole.shape)
        if not (isinstance(got, torch.Tensor) and got.dtype == whole.dtype and _same_shape(got.shape, want)):
            shape = list(got.shape) if isinstance(got, torch.Tensor) else got
            raise LayoutMismatch(
                f"in a chunk of {length} tokens, {node.name} ({node.target}) is {shape}, "
                f"but its layout {layout} over {list(whole.shape)} implies {want}"
            )


def _same_shape(got, want) -> bool:
    return len(got) == len(want) and all(statically_known_true(a == b) for a, b in zip(got, want))


def _check_loop_operands(gm: GraphModule, inserted: list[Node], replacements: dict[Node, Node]) -> None:
    """Every operand passed to a chunk subgraph has the shape of the subgraph's placeholder,
    and every assembled output the shape and dtype of the value it replaces."""
    for node in inserted:
        if node.target is not invoke_subgraph:
            continue
        sub = getattr(gm, node.args[0].target)
        for arg, ph in zip(node.args[2:], sub.graph.find_nodes(op="placeholder")):
            got, want = arg.meta.get("val"), ph.meta.get("val")
            if isinstance(want, torch.Tensor) and not (
                isinstance(got, torch.Tensor) and _same_shape(got.shape, want.shape)
            ):
                raise LayoutMismatch(
                    f"{node.args[1]} is passed {arg.name} of shape "
                    f"{list(got.shape) if isinstance(got, torch.Tensor) else got} for its input "
                    f"{ph.name} of shape {list(want.shape)}"
                )
    for out, value in replacements.items():
        got, want = value.meta["val"], out.meta["val"]
        if got.dtype != want.dtype or not _same_shape(got.shape, want.shape):
            raise LayoutMismatch(
                f"{out.name} comes back from its chunks as {got.dtype}{list(got.shape)}, "
                f"not {want.dtype}{list(want.shape)}"
            )


def _shape_only(arg: Node, inner: dict[sympy.Symbol, Node]) -> Node:
    """Stands in for a symbolic size the region reads in a shape argument, which is replaced
    after the copy (analysis.check_symbolic: it reads them nowhere else)."""
    if not inner or not is_size_node(arg):
        raise KeyError(arg.name)
    return next(iter(inner.values()))


def fill_fake_values(gm: GraphModule, nodes: list[Node] | None = None) -> None:
    """Give `nodes` (default: every node a rewrite added) their `meta["val"]`, in graph order.
    Cheaper than a fake-tensor pass over the whole graph, which would re-run every chunk
    subgraph."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = detect_fake_mode([v for v in vals if v is not None])
    for node in gm.graph.nodes if nodes is None else nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        if node.target is invoke_subgraph:
            sub = getattr(gm, node.args[0].target)
            node.meta["val"] = tuple(o.meta["val"] for o in sub.graph.output_node().args[0])
            continue
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
