"""Rewrite one region into mini-sequence loops (docs/design.md, "Rewrite").

Each part of a region becomes one loop: the forward part computes the region's forward
outputs; the backward part recomputes the forward values it needs, chunk by chunk, and
produces the input gradients (concatenated) and weight gradients (accumulated in fp32).
Every chunk is an `invoke_subgraph` call of a subgraph built once per distinct chunk length,
so Inductor compiles each once and runs the calls one after another. The views between a
value and its token rows are in rows.py; a loss region run over its kept rows only gets its
chunks' token numbers from compaction.py.

A rewrite is all or nothing: the chunk subgraphs are built and checked before the graph is
touched, the loops are inserted and their operands checked, and only then do the region's
users switch over. A failure before that removes what was inserted (`RegionRewriteError`).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import sympy
import torch
from torch._dynamo.utils import detect_fake_mode
from torch.fx import Graph, GraphModule, Node, map_arg
from torch.fx.experimental.symbolic_shapes import (
    statically_known_true,
)
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .. import ops
from .analysis import Region, tangent_dependent
from .graph import fill_fake_values, order_key, topological
from .compaction import Compaction, emit_compaction, plan_compaction, unwritten_rows
from .layout import SCALED, SUMMED, Chunked, Layout
from .log_softmax import gradient_after_statistics
from .loss_form import LossForm, loss_form, unit_tangent_copies
from .one_hot_sum import sum_one_hot_rows
from .planning import ChunkPlan
from .resize import Shapes, chunk_args
from .rows import (
    chunk_from_rows,
    index_rows,
    joined_rows,
    rows_dim,
    rows_of_chunk,
    rows_shape,
    token_rows,
    value_from_rows,
)
from .rules import SQUEEZES, rule_of, shape_of, squeezed_dims
from .symbolic import (
    GraphSymbols,
    Size,
    SizeArgs,
    free_symbols,
    hint,
    is_size_node,
    sorted_symbols,
)
from .workspace import products_into_workspace

aten = torch.ops.aten
prims = torch.ops.prims
invoke_subgraph = torch.ops.higher_order.invoke_subgraph
# grouped matmuls of MoE experts, by name (transformers registers its op when imported):
# input [m, k] sorted by expert, weights [experts, k, n]
GROUPED_MATMULS = ("aten._grouped_mm.default", "transformers.grouped_mm_fallback.default")
auto_functionalized = torch.ops.higher_order.auto_functionalized


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
    # summed outputs that are a matmul (a weight gradient) -> its two operands: each chunk
    # returns them and the loop adds their product into one accumulator in place
    products: dict[Node, tuple[Node, Node]]
    accumulated: list[Node]  # the other summed outputs: the loop adds each chunk's in place
    returns: list[Node]  # what each chunk subgraph returns, in order
    subgraphs: dict[str, GraphModule]  # str(chunk length) -> its subgraph
    scale: bool = False  # multiply the backward outputs by the loss tangent (loss form)
    # a compacted loop with token-wise outputs: each chunk returns its token numbers last,
    # where the loop writes its output rows (decision 25)
    writes_rows: bool = False

    @property
    def ordered(self) -> bool:
        """Whether each call after the first takes an order token (decision 24): the loop
        sums outputs, which Inductor's scheduler would otherwise be free to add late."""
        return bool(self.products or self.accumulated)


@dataclasses.dataclass
class Rewritten:
    grads_in_forward: bool  # the loss form: one forward loop computing loss and gradients
    replacements: dict[Node, Node]  # each region output -> the value now standing for it
    recompute_flops: int  # matmul FLOPs of the forward values the backward loop recomputes


def rewrite_region(
    gm: GraphModule, plan: ChunkPlan, name: str, workspace_min_bytes: int | None = None
) -> Rewritten:
    """Replace the region of `plan` in `gm` by its loops. A loss form's products of at least
    `workspace_min_bytes` on the CPU are written into a reused buffer (decision 28)."""
    compaction = plan_compaction(gm, plan)
    if compaction is not None:
        plan = dataclasses.replace(plan, lengths=compaction.lengths)
    region = plan.region
    outputs = region.outputs(region.forward) + region.outputs(region.backward)
    form = None if region.declared else loss_form(gm.graph, region, loop_nodes(plan, outputs))
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
    # A checkpointed loss loop runs again in the backward, after `copy_after` let the
    # workspace go: it would keep the last chunk's buffer (decision 28)
    if _checkpoint_tags(region) is not None:
        workspace_min_bytes = None
    loops = [
        _build_loop(plan, loop_name, outs, scale, compaction, workspace_min_bytes if scale else None)
        for loop_name, outs, scale in parts
    ]
    forward = set(region.forward)
    backward_loops = [loop for loop in loops if not loop.scale and not set(loop.outputs) <= forward]
    flops = sum(matmul_flops(n) for loop in backward_loops for n in loop.nodes if n in forward)
    replacements = _insert_loops(gm, plan, loops, form, compaction)
    _sizes_read_elsewhere(gm.graph, region)
    for out, value in replacements.items():
        out.replace_all_uses_with(value, delete_user_cb=lambda u: u not in region.layouts)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    return Rewritten(form is not None, replacements, flops)


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


# What activation checkpointing marks on each forward node of a checkpointed block: the
# partitioner recomputes those in the backward instead of saving them.
CHECKPOINT_TAGS = ("recompute", "ac_graph_id")


def _checkpoint_tags(region: Region) -> dict | None:
    """The checkpoint tags of a region inside one checkpointed block (its tagged forward
    nodes all carry the same), else None."""
    tags = {tuple(n.meta.get(key) for key in CHECKPOINT_TAGS) for n in region.forward}
    tags.discard((None, None))  # the parts of the backward formulas that read only forward values
    return dict(zip(CHECKPOINT_TAGS, tags.pop())) if len(tags) == 1 else None


def _tag_as_checkpointed(graph: Graph, region: Region, inserted: list[Node]) -> None:
    """A region inside one checkpointed block: the inserted nodes the forward could compute
    (the chunks of its inputs, the forward loop) carry its checkpoint tags too, so the
    partitioner recomputes them in the backward like the rest of the block instead of saving
    the chunks of the block's values (decision 27)."""
    values = _checkpoint_tags(region)
    if values is None:
        return
    backward = tangent_dependent(graph)
    for node in inserted:
        if node.op == "call_function" and node not in backward:
            node.meta.update(values)


def matmul_flops(node: Node) -> int:
    """2 * m * k * n of a matmul node (at the compiled length): `mm`, `bmm`, and a grouped
    matmul of MoE experts (each of the m rows [m, k] times its expert's [k, n]); 0 for any
    other node."""
    if node.target is aten.mm.default or str(node.target) in GROUPED_MATMULS:
        rows = math.prod(hint(size) for size in shape_of(node.args[0]))  # m * k
        return 2 * rows * hint(shape_of(node.args[1])[-1])
    if node.target is aten.bmm.default:
        (b, m, k), (_, _, n) = (shape_of(a) for a in node.args[:2])
        return 2 * hint(b) * hint(m) * hint(k) * hint(n)
    return 0


def _build_loop(
    plan: ChunkPlan,
    name: str,
    outputs: list[Node],
    scale: bool,
    compaction: Compaction | None,
    workspace_min_bytes: int | None,
) -> Loop:
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
    symbols = GraphSymbols(plan.region.seed.graph)
    if compaction is not None:  # their nodes are emitted later
        for length in (compaction.regular, compaction.tail):
            symbols.add(length)
    layouts = plan.region.layouts
    products = _products(outputs, {**plan.region.inputs, **layouts}, node_set)
    accumulated = [o for o in outputs if layouts[o] is SUMMED and o not in products]
    returns: list[Node] = []
    for out in outputs:
        operands = products.get(out, (out,))
        # a compacted chunk gathers its rows of an input itself: an operand that is an input
        # comes back from it too
        returns.extend(x for x in operands if (compaction or x not in inputs) and x not in returns)
    writes_rows = compaction is not None and any(isinstance(layouts[o], Chunked) for o in outputs)
    loop = Loop(name, nodes, outputs, inputs, products, accumulated, returns, {}, scale, writes_rows)
    loop.subgraphs = {
        str(length): _build_subgraph(
            nodes, inputs, outputs, returns, length, plan.region, symbols,
            compaction.chunks_of(length) if compaction else None, loop.ordered, writes_rows,
            workspace_min_bytes,
        )
        for length in plan.distinct_lengths()
    }
    return loop


def _products(outputs: list[Node], layouts: dict[Node, Layout], nodes: set[Node]) -> dict[Node, tuple[Node, Node]]:
    """The summed outputs that are one matmul over the tokens (maybe converted to another
    dtype) -> its operands. A chunk's share of such an output is the product of its chunks
    of the operands."""
    found = {}
    for out in outputs:
        node = out.args[0] if out.target is prims.convert_element_type.default else out
        if layouts[out] is SUMMED and node.target is aten.mm.default and node in nodes:
            a, b = node.args
            if isinstance(layouts.get(a), Chunked) and isinstance(layouts.get(b), Chunked):
                found[out] = (a, b)
    return found


def _insert_loops(
    gm: GraphModule, plan: ChunkPlan, loops: list[Loop], form: LossForm | None,
    compaction: Compaction | None,
) -> dict[Node, Node]:
    """Insert the loops into the graph and check what they pass and return. Returns each
    region output -> the value replacing it. On any error, removes everything it inserted
    and raises."""
    graph = gm.graph
    before = set(graph.nodes)
    registered: list[str] = []
    try:
        substitutes = unit_tangent_copies(graph, form) if form is not None else {}
        if compaction is not None:
            emit_compaction(graph, plan, compaction)
        replacements: dict[Node, Node] = {}
        for loop in loops:
            attrs = _register_subgraphs(gm, plan, loop, registered)
            replacements.update(_emit_loop(
                graph, plan, loop, attrs, substitutes, form.tangent if form else None, compaction
            ))
        for copy in reversed(list(substitutes.values())):
            if not copy.users:
                graph.erase_node(copy)
        inserted = topological([n for n in graph.nodes if n not in before])
        fill_fake_values(gm, inserted)
        _check_loop_operands(gm, inserted, replacements)
        _tag_as_checkpointed(graph, plan.region, inserted)
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
    compaction: Compaction | None,
) -> dict[Node, Node]:
    """The chunk calls of one loop, after its last input. Returns output -> assembled value."""
    region = plan.region
    input_layouts = [region.inputs[a] for a in loop.inputs]
    output_layouts = [region.layouts[o] for o in loop.outputs]
    passed = [substitutes.get(x, x) for x in loop.inputs]
    symbols = GraphSymbols(graph)
    size_sources = symbols.sources(
        {s for sub in loop.subgraphs.values() for s in sub.meta["size_symbols"]})
    anchor = max(passed + size_sources + ([compaction.numbers] if compaction else []),
                 key=order_key(graph))
    replacements: dict[Node, Node] = {}
    with graph.inserting_before(anchor.next):  # in the order they are made
        sizes = SizeArgs(graph, compaction.nodes if compaction else None, symbols)
        tokens = {
            x: token_rows(graph, sizes, x, lay, region.tokens)
            for x, lay in zip(passed, input_layouts)
            if isinstance(lay, Chunked)
        }
        sums: dict[Node, Node | None] = dict.fromkeys([*loop.products, *loop.accumulated])
        chunk_values: list[list[Node]] = [[] for _ in loop.outputs]
        written: list[Node | None] = [None for _ in loop.outputs]  # compacted: the rows so far

        splits: dict[Node, Node] = {}

        def chunk_of(x: Node, lay: Chunked, index: int, length: Size) -> Node:
            """Chunk `index` of `x`, `length` tokens: one of the views a split of its rows
            into the chunks' lengths makes (exactly those lengths, also where they are read
            from the data, which a slice's bounds would clamp)."""
            if x not in splits:
                splits[x] = graph.call_function(
                    aten.split_with_sizes.default,
                    (tokens[x], sizes.shape(plan.lengths), rows_dim(x, lay)))
            piece = graph.call_function(operator.getitem, (splits[x], index))
            return chunk_from_rows(graph, sizes, piece, x, lay, length)

        seen: dict[str, int] = {}  # str(length) -> chunks of that length so far
        after: list[Node] = []
        for index, length in enumerate(plan.lengths):
            if compaction is None:
                args = [chunk_of(x, lay, index, length) if isinstance(lay, Chunked) else x
                        for x, lay in zip(passed, input_layouts)]
            else:  # each chunk gathers its kept rows (_build_subgraph)
                number = seen[str(length)] = seen.get(str(length), -1) + 1
                args = [tokens.get(x, x) for x in passed] + [
                    compaction.rows[str(length)],
                    graph.call_function(aten.select.int, (compaction.numbers, 0, number)),
                ]
            if loop.ordered:
                # chunk k + 1 runs after chunk k's results are taken and accumulated
                # (decision 24)
                args.append(graph.call_function(ops.order_token._opoverload, (passed[0], after)))
            attr = attrs[str(length)]
            lead = [sizes.arg(symbols.values[s]) for s in loop.subgraphs[str(length)].meta["size_symbols"]]
            call = graph.call_function(
                invoke_subgraph,
                (graph.get_attr(attr), f"mst_{attr}", *lead, *args),
            )
            # a chunk's inputs, where passed as its chunks (gathered ones come back from it)
            results = dict(zip(loop.inputs, args)) if compaction is None else {}
            results.update((r, graph.call_function(operator.getitem, (call, j))) for j, r in enumerate(loop.returns))
            if loop.writes_rows:
                row_numbers = graph.call_function(operator.getitem, (call, len(loop.returns)))
            for j, (out, lay) in enumerate(zip(loop.outputs, output_layouts)):
                if isinstance(lay, Chunked) and compaction is None:
                    chunk_values[j].append(results[out])
                elif isinstance(lay, Chunked):
                    # written into the whole output's rows in place: no join (decision 25)
                    rows = rows_of_chunk(graph, sizes, results[out], length, out, lay)
                    if written[j] is None:
                        written[j] = unwritten_rows(graph, sizes, rows, out, lay, compaction)
                    written[j] = _in_place(
                        graph, ops.put_rows, out=written[j], dim=rows_dim(out, lay), index=row_numbers, value=rows
                    )
            for out, (a, b) in loop.products.items():
                sums[out] = _add_product(graph, sums[out], results[a], results[b], out, value_dtype(a))
            for out in loop.accumulated:
                sums[out] = _add_value(graph, sums[out], results[out], out)
            after = [*sums.values(), *(v[-1] for v in chunk_values if v), *filter(None, written)]

        backward = set(region.outputs(region.backward))
        values: dict[Node, Node] = {}
        for j, (out, lay, chunks) in enumerate(zip(loop.outputs, output_layouts, chunk_values)):
            if isinstance(lay, Chunked):
                rows = written[j] if compaction else joined_rows(graph, sizes, chunks, plan.lengths, out, lay)
                values[out] = value_from_rows(graph, sizes, rows, out, lay)
            else:
                values[out] = sums[out]
        if loop.scale:
            # The loss form computes the gradients in the forward. Its forward outputs are
            # copies made after them, so the partitioner cannot move the last chunk's sums
            # into the backward and save that chunk's operands for them (decision 26).
            made = [values[out] for out in loop.outputs if out in backward]
            for out in loop.outputs:
                if out not in backward and made:
                    values[out] = graph.call_function(ops.copy_after._opoverload, (values[out], made))
        for out, lay in zip(loop.outputs, output_layouts):
            value = values[out]
            if loop.scale and out in backward:
                value = graph.call_function(aten.mul.Tensor, (value, tangent))
            if lay is SUMMED and value_dtype(out) != accumulator_dtype(value_dtype(out)):
                value = graph.call_function(
                    prims.convert_element_type.default, (value, value_dtype(out))
                )
            replacements[out] = value
    return replacements


def _add_product(
    graph: Graph, total: Node | None, a: Node, b: Node, out: Node, dtype_ab: torch.dtype
) -> Node:
    """total + a @ b, in place into `total` (ops.accumulate_matmul): no new tensor of the
    output's size per chunk. The first chunk's product is the accumulator."""
    if total is None:
        return _as_accumulator(graph, graph.call_function(aten.mm.default, (a, b)), dtype_ab, out)
    return _in_place(graph, ops.accumulate_matmul, acc=total, a=a, b=b)


def _add_value(graph: Graph, total: Node | None, value: Node, out: Node) -> Node:
    """total + value, in place into `total` (ops.accumulate). The first chunk's value is the
    accumulator."""
    if total is None:
        return _as_accumulator(graph, value, value_dtype(out), out)
    return _in_place(graph, ops.accumulate, acc=total, value=value)


def _as_accumulator(graph: Graph, first: Node, dtype: torch.dtype, out: Node) -> Node:
    """The first chunk's share of `out`, of `dtype`, in the accumulator dtype."""
    acc_dtype = accumulator_dtype(value_dtype(out))
    if dtype == acc_dtype:
        return first
    return graph.call_function(prims.convert_element_type.default, (first, acc_dtype))


def _in_place(graph: Graph, op, **args: Node | int) -> Node:
    """`op(**args)`, an mst op that writes its first argument in place, through
    auto_functionalized (Inductor makes it in place when nothing else reads the old value):
    the new value of that argument."""
    written = graph.call_function(auto_functionalized, (op._opoverload,), args)
    return graph.call_function(operator.getitem, (written, 1))


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


def _build_subgraph(
    nodes: list[Node],
    inputs: list[Node],
    outputs: list[Node],
    returns: list[Node],
    length: Size,
    region: Region,
    symbols: GraphSymbols,
    gathered: int | None = None,
    ordered: bool = False,
    writes_rows: bool = False,
    workspace_min_bytes: int | None = None,
) -> GraphModule:
    """The subgraph of one chunk of `length` tokens, with every value's shape checked against
    its layout. Its first inputs are the size symbols its other inputs' sizes and its
    length are made of (`meta["size_symbols"]`, from the outer graph's `symbols`): the
    chunk's sizes are computed from them inside. It returns `returns` (the `outputs` and
    the operands of the products).

    With `gathered` (a compacted loss region with that many chunks of this length), the
    chunk gathers its rows itself: it takes each token-wise input whole (its merged rows),
    then the token numbers of the `gathered` chunks ([gathered * length]) and its own number
    among them ([1]), so the outer graph holds no per-chunk gather (decision 23). With
    `writes_rows` (the loop has token-wise outputs) it also returns its token numbers, last:
    the loop writes the chunk's output rows there (decision 25).

    With `ordered` (the loop sums outputs), its last input is an order token it does not
    read: the loop passes the one made after the previous chunk's sums and outputs
    (decision 24). With `workspace_min_bytes`, its CPU products of at least that size are
    written into a reused buffer (decision 28)."""
    sub = Graph()
    env: dict[Node, Node] = {}
    example_inputs = []
    block = Shapes(region.tokens, length) if region.declared else None
    whole: dict[Node, Node] = {}  # inputs passed whole, their rows gathered here
    for x in inputs:
        layout = region.inputs[x]
        placeholder = sub.placeholder(x.name)
        chunk_val = _chunk_val(x.meta["val"], layout, length)
        if gathered is not None and isinstance(layout, Chunked):
            placeholder.meta["val"] = x.meta["val"].new_empty(rows_shape(x, layout))
            whole[x] = placeholder
        else:
            placeholder.meta["val"] = chunk_val
            env[x] = placeholder
        example_inputs.append(placeholder.meta["val"])
        if block is not None:
            block.add(x.meta["val"], chunk_val)
    if gathered is not None:
        numbers = [sub.placeholder("chunk_rows"), sub.placeholder("chunk_number")]
        some_input = next(iter(whole.values())).meta["val"]
        for placeholder, shape in zip(numbers, ([gathered * length], [1])):
            placeholder.meta["val"] = some_input.new_empty(shape, dtype=torch.int64)
            example_inputs.append(placeholder.meta["val"])
    # the size symbols come first: Inductor binds a subgraph's sizes from its own inputs
    needed = sorted_symbols(free_symbols(length, *example_inputs))
    missing = symbols.missing(set(needed))
    if missing:
        raise LayoutMismatch(f"a chunk of {length} tokens has sizes of {missing}, which the "
                             "graph does not hold")
    inner: dict[sympy.Symbol, Node] = {}
    with sub.inserting_before(next(iter(sub.nodes), None)):
        for symbol in needed:
            inner[symbol] = sub.placeholder(f"size_{symbol}")
            inner[symbol].meta["val"] = symbols.values[symbol]
    example_inputs[:0] = [symbols.values[s] for s in needed]
    sizes = SizeArgs(sub, inner)
    if gathered is not None:
        table = sub.call_function(aten.reshape.default, (numbers[0], [gathered, sizes.arg(length)]))
        picked = sub.call_function(aten.index.Tensor, (table, [numbers[1]]))
        row_numbers = sub.call_function(aten.reshape.default, (picked, [sizes.arg(length)]))
        for x, placeholder in whole.items():
            layout = region.inputs[x]
            rows = index_rows(sub, placeholder, rows_dim(x, layout), row_numbers)
            env[x] = chunk_from_rows(sub, sizes, rows, x, layout, length)
    if ordered:
        token = sub.placeholder("after_previous_chunk")
        token.meta["val"] = next(v for v in example_inputs if isinstance(v, torch.Tensor)).new_empty(
            [1], dtype=torch.float32
        )
        example_inputs.append(token.meta["val"])
    sizes.arg(length)  # a symbolic length is computed once, before the nodes that read it
    fake_mode = detect_fake_mode(example_inputs)

    for node in nodes:
        new = sub.node_copy(node, lambda a: env[a] if a in env else _shape_only(a, inner))
        layout = region.layouts[node]
        rule = rule_of(node)
        if block is not None:
            # a declared block's op: its sizes for this chunk, from its arguments' (resize.py)
            with sub.inserting_before(new):  # the chunk's sizes are computed before it
                chunk_args(node, new, block, sizes)
            new.meta["val"] = _fake_run(new, fake_mode)
            block.add_op(node, new)
        elif rule.shape_arg is not None and isinstance(layout, Chunked):
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
    bases = [_base(env[out]) for out in returns]
    for out in returns:
        value = env[out]
        if region.layouts.get(out) is SUMMED and (
            _base(value).op == "placeholder" or bases.count(_base(value)) > 1
        ):
            # the loop adds into the first chunk's value in place: it must be a buffer of
            # its own, neither a subgraph input nor shared with another returned value
            value = sub.call_function(aten.clone.default, (value,))
        elif out in outputs and isinstance(region.layouts[out], Chunked) and _may_alias(out):
            # An output that may be a view of a subgraph intermediate (a slice of a fused
            # projection) leaves as a fresh chunk: Inductor would return the view as is.
            value = sub.call_function(
                aten.clone.default, (value,), {"memory_format": torch.contiguous_format}
            )
        elif _base(value).op == "placeholder":
            # a matmul operand that is a view of an input is copied; a view of a value the
            # chunk computed is returned as it is (copying a logits gradient costs its size)
            value = sub.call_function(aten.clone.default, (value,))
        results.append(value)
    if writes_rows:
        results.append(row_numbers)  # where the loop writes the chunk's output rows
    sub.output(tuple(results))
    sub.eliminate_dead_code()  # a matmul whose operands are returned instead
    sub.lint()
    sub_gm = GraphModule(torch.nn.Module(), sub)
    sub_gm.meta["size_symbols"] = needed
    FakeTensorProp(sub_gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
    # the loss chunk's cross entropy, rewritten for Inductor on the chunk's shapes (decision 22)
    if sum_one_hot_rows(sub) + gradient_after_statistics(sub):
        sub.eliminate_dead_code()
        sub_gm.recompile()
        FakeTensorProp(sub_gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
    if workspace_min_bytes is not None and products_into_workspace(sub, workspace_min_bytes):
        sub_gm.recompile()
    live = set(sub.nodes)
    for node in nodes:
        if env[node] in live:
            _check_value(env[node].meta.get("val"), node, region.layouts[node], length)
    return sub_gm


def _may_alias(node: Node) -> bool:
    """Whether `node`'s value may be a view of its argument (an op with no rule, in a
    declared block: it may)."""
    rule = rule_of(node)
    return rule is None or rule.aliases


def _fake_run(node: Node, fake_mode) -> object:
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with fake_mode:
        return node.target(*args, **kwargs)


def _base(value: Node) -> Node:
    """The value `value` (in a chunk subgraph) is a view of, through the ops that view their
    first argument; `value` itself if it is no view."""
    while (value.op == "call_function" and value.args and isinstance(value.args[0], Node)
           and _views_argument(value)):
        value = value.args[0]
    return value


def _views_argument(node: Node) -> bool:
    """Whether `node`'s value may be a view of its first argument: by its rule, or by its
    schema for an op with no rule (in a declared block)."""
    rule = rule_of(node)
    if rule is not None:
        return rule.aliases
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info)


def _chunk_val(val: torch.Tensor, layout: Layout, length: Size) -> torch.Tensor:
    if isinstance(layout, Chunked):
        return val.new_empty(layout.chunk_shape(val.shape, length))
    return val


def _check_value(chunk_val: object, node: Node, layout: Layout, length: Size) -> None:
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
