"""Emitting a loop into the graph: its chunk subgraphs registered (identical ones once),
each chunk's inputs cut from the whole values (a split into the chunk lengths) or, for a
compacted loss region, gathered by the chunk itself, one `invoke_subgraph` call per chunk,
and the outputs assembled: token-wise ones joined (or written row by row, compacted), summed
ones added into one accumulator in place (fp32 for bf16/fp16 values)."""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from .. import ops
from .compaction import unwritten_rows
from .graph import order_key
from .layout import SUMMED, Chunked
from .planning import ChunkPlan
from .rows import chunk_from_rows, joined_rows, rows_dim, rows_of_chunk, token_rows, value_from_rows
from .subgraphs import Loop, accumulator_dtype, structural_key, value_dtype
from .symbolic import GraphSymbols, Size, SizeArgs

aten = torch.ops.aten
prims = torch.ops.prims
invoke_subgraph = torch.ops.higher_order.invoke_subgraph
auto_functionalized = torch.ops.higher_order.auto_functionalized


def register_subgraphs(gm: GraphModule, plan: ChunkPlan, loop: Loop, registered: list[str]) -> dict[str, str]:
    """Register the loop's subgraphs on `gm`. Identical chunk subgraphs (the same MLP in
    every layer) are registered once, so Inductor compiles them once: compile time does not
    grow with the number of layers. Returns a length's key -> attribute name."""
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


def emit_loop(
    graph: Graph,
    plan: ChunkPlan,
    loop: Loop,
    attrs: dict[str, str],
    substitutes: dict[Node, Node],
    tangent: Node | None,
) -> dict[Node, Node]:
    """The chunk calls of one loop, after its last input. Returns output -> assembled value."""
    region, compaction = plan.region, plan.compaction
    input_layouts = [region.inputs[a] for a in loop.inputs]
    passed = [substitutes.get(x, x) for x in loop.inputs]
    symbols = GraphSymbols(graph)
    size_sources = symbols.sources(
        {s for sub in loop.subgraphs.values() for s in sub.meta["size_symbols"]})
    anchor = max(passed + size_sources + ([compaction.numbers] if compaction else []),
                 key=order_key(graph))
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
                    (tokens[x], sizes.shape(plan.run_lengths), rows_dim(x, lay)))
            piece = graph.call_function(operator.getitem, (splits[x], index))
            return chunk_from_rows(graph, sizes, piece, x, lay, length)

        seen: dict[str, int] = {}  # a length's key -> chunks of that length so far
        after: list[Node] = []
        for index, (key, length) in enumerate(zip(plan.keys, plan.run_lengths, strict=True)):
            if compaction is None:
                args = [chunk_of(x, lay, index, length) if isinstance(lay, Chunked) else x
                        for x, lay in zip(passed, input_layouts)]
            else:  # each chunk gathers its kept rows (_build_subgraph)
                number = seen[key] = seen.get(key, -1) + 1
                args = [tokens.get(x, x) for x in passed] + [
                    compaction.rows[key],
                    graph.call_function(aten.select.int, (compaction.numbers, 0, number)),
                ]
            if loop.ordered:
                # chunk k + 1 runs after chunk k's results are taken and accumulated
                args.append(graph.call_function(ops.order_token._opoverload, (passed[0], after)))
            attr = attrs[key]
            lead = [sizes.arg(symbols.values[s]) for s in loop.subgraphs[key].meta["size_symbols"]]
            call = graph.call_function(
                invoke_subgraph,
                (graph.get_attr(attr), f"mst_{attr}", *lead, *args),
            )
            # a chunk's inputs, where passed as its chunks (gathered ones come back from it)
            results = dict(zip(loop.inputs, args)) if compaction is None else {}
            results.update((r, graph.call_function(operator.getitem, (call, j))) for j, r in enumerate(loop.returns))
            row_numbers = (graph.call_function(operator.getitem, (call, len(loop.returns)))
                           if loop.writes_rows else None)
            _take_chunk(graph, sizes, plan, loop, results, length, row_numbers,
                        chunk_values, written, sums)
            after = [*sums.values(), *(v[-1] for v in chunk_values if v), *filter(None, written)]

        return _assembled(graph, sizes, plan, loop, chunk_values, written, sums, tangent)


def _take_chunk(
    graph: Graph, sizes: SizeArgs, plan: ChunkPlan, loop: Loop, results: dict[Node, Node],
    length: Size, row_numbers: Node | None, chunk_values: list[list[Node]],
    written: list[Node | None], sums: dict[Node, Node | None],
) -> None:
    """Take one chunk's results: token-wise outputs kept for the join (or, compacted, written
    into the whole output's rows in place), summed ones added into their accumulators."""
    compaction = plan.compaction
    for j, out in enumerate(loop.outputs):
        lay = plan.region.layouts[out]
        if isinstance(lay, Chunked) and compaction is None:
            chunk_values[j].append(results[out])
        elif isinstance(lay, Chunked):
            # written into the whole output's rows in place: no join
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


def _assembled(
    graph: Graph, sizes: SizeArgs, plan: ChunkPlan, loop: Loop, chunk_values: list[list[Node]],
    written: list[Node | None], sums: dict[Node, Node | None], tangent: Node | None,
) -> dict[Node, Node]:
    """Each output of the loop -> its whole value: token-wise ones joined (or the rows
    written), summed ones their accumulator, scaled by the loss tangent in the loss form and
    cast back to the output's dtype."""
    region, compaction = plan.region, plan.compaction
    output_layouts = [region.layouts[o] for o in loop.outputs]
    backward = set(region.outputs(region.backward))
    values: dict[Node, Node] = {}
    for j, (out, lay, chunks) in enumerate(zip(loop.outputs, output_layouts, chunk_values)):
        if isinstance(lay, Chunked):
            rows = written[j] if compaction else joined_rows(graph, sizes, chunks, plan.run_lengths, out, lay)
            values[out] = value_from_rows(graph, sizes, rows, out, lay)
        else:
            values[out] = sums[out]
    if loop.scale:
        # The loss form computes the gradients in the forward. Its forward outputs are
        # copies made after them, so the partitioner cannot move the last chunk's sums
        # into the backward and save that chunk's operands for them.
        made = [values[out] for out in loop.outputs if out in backward]
        for out in loop.outputs:
            if out not in backward and made:
                values[out] = graph.call_function(ops.copy_after._opoverload, (values[out], made))
    replacements: dict[Node, Node] = {}
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
