"""Chunk subgraphs: what one chunk of a loop computes, built and checked without touching
the graph (docs/design.md, "Rewrite").

A loop computes some of a region's outputs from its nodes (`loop_nodes`: for a backward
loop, the forward values it recomputes too). Each distinct chunk length gets one subgraph:
the loop's nodes copied with the chunk's shapes (Chunked values keep their rank, their token
dims 1, ..., 1, n), sizes computed from the size symbols it is passed, every value checked
against its layout. Summed outputs that are one matmul over the tokens (a weight gradient)
come back as the matmul's two operands: the loop adds their product in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import sympy
import torch
from torch._dynamo.utils import detect_fake_mode
from torch.fx import Graph, GraphModule, Node, map_arg
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .checks import LayoutMismatch, check_value
from .layout import SUMMED, Chunked, Layout
from .region import Region
from .resize import Shapes, chunk_args
from .rows import chunk_from_rows, index_rows, rows_dim, rows_shape
from .rules import rule_of, shape_of, squeezed_dims
from .symbolic import (
    GraphSymbols,
    Size,
    SizeArgs,
    free_symbols,
    is_size_node,
    is_symbolic,
    sorted_symbols,
)

if TYPE_CHECKING:
    from .planning import ChunkPlan

aten = torch.ops.aten
prims = torch.ops.prims
# a pass on a built chunk subgraph: rewrites it in place, returns how many changes it made
ChunkPass = Callable[[Graph, "ChunkPlan", "Loop"], int]


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
    # where the loop writes its output rows (no join of the chunks' outputs)
    writes_rows: bool = False

    @property
    def ordered(self) -> bool:
        """Whether each call after the first takes an order token: the loop sums outputs,
        which Inductor's scheduler would otherwise be free to add late (holding every
        chunk's results at once)."""
        return bool(self.products or self.accumulated)


def loop_nodes(region: Region, outputs: list[Node]) -> list[Node]:
    """Region nodes the outputs depend on, in graph order (for the backward part this
    includes the forward values it recomputes)."""
    layouts = region.layouts
    needed: set[Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(a for a in node.all_input_nodes if a in layouts)
    return [n for n in region.nodes if n in needed]


def build_loop(
    plan: ChunkPlan, name: str, outputs: list[Node], scale: bool, chunk_passes: Sequence[ChunkPass]
) -> Loop:
    """The loop computing `outputs`, its chunk subgraphs built and checked without touching
    the graph."""
    compaction = plan.compaction
    nodes = loop_nodes(plan.region, outputs)
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
        key: build_subgraph(loop, plan, length, symbols, chunk_passes)
        for key, length in plan.distinct_lengths().items()
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


def build_subgraph(
    loop: Loop, plan: ChunkPlan, length: Size, symbols: GraphSymbols,
    chunk_passes: Sequence[ChunkPass],
) -> GraphModule:
    """The subgraph of one chunk of `length` tokens, with every value's shape checked against
    its layout. Its first inputs are the size symbols its other inputs' sizes and its
    length are made of (`meta["size_symbols"]`, from the outer graph's `symbols`): the
    chunk's sizes are computed from them inside. It returns `returns` (the `outputs` and
    the operands of the products).

    A compacted loss region's chunk (`plan.compaction`) gathers its rows itself: it takes
    each token-wise input whole (its merged rows), then the token numbers of the chunks of
    its length ([chunks * length]) and its own number among them ([1]), so the outer graph
    holds no per-chunk gather. Where the loop has token-wise outputs (`loop.writes_rows`) it
    also returns its token numbers, last: the loop writes the chunk's output rows there.

    Where the loop sums outputs (`loop.ordered`), its last input is an order token it does
    not read: the loop passes the one made after the previous chunk's sums and outputs.
    Then `chunk_passes` run on it (exact rewrites for Inductor, the reused logits buffer)."""
    region = plan.region
    sub = Graph()
    block = Shapes(region.tokens, length) if region.declared else None
    env, whole, numbers, example_inputs = _input_placeholders(sub, loop, plan, length, block)
    needed, inner = _size_placeholders(sub, symbols, length, example_inputs)
    sizes = SizeArgs(sub, inner)
    row_numbers = None
    if numbers:  # a compacted chunk gathers its rows
        gathered = plan.compaction.chunks_of(length)
        table = sub.call_function(aten.reshape.default, (numbers[0], [gathered, sizes.arg(length)]))
        picked = sub.call_function(aten.index.Tensor, (table, [numbers[1]]))
        row_numbers = sub.call_function(aten.reshape.default, (picked, [sizes.arg(length)]))
        for x, placeholder in whole.items():
            layout = region.inputs[x]
            rows = index_rows(sub, placeholder, rows_dim(x, layout), row_numbers)
            env[x] = chunk_from_rows(sub, sizes, rows, x, layout, length)
    if loop.ordered:
        token = sub.placeholder("after_previous_chunk")
        token.meta["val"] = next(v for v in example_inputs if isinstance(v, torch.Tensor)).new_empty(
            [1], dtype=torch.float32
        )
        example_inputs.append(token.meta["val"])
    sizes.arg(length)  # a symbolic length is computed once, before the nodes that read it
    fake_mode = detect_fake_mode(example_inputs)

    _copy_nodes(sub, loop, region, env, inner, block, sizes, length, fake_mode)

    results = _returned_values(sub, loop, region, env)
    if loop.writes_rows:
        results.append(row_numbers)  # where the loop writes the chunk's output rows
    sub.output(tuple(results))
    sub.eliminate_dead_code()  # a matmul whose operands are returned instead
    sub.lint()
    sub_gm = GraphModule(torch.nn.Module(), sub)
    sub_gm.meta["size_symbols"] = needed
    FakeTensorProp(sub_gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
    if sum(chunk_pass(sub, plan, loop) for chunk_pass in chunk_passes):
        sub.eliminate_dead_code()
        sub_gm.recompile()
        FakeTensorProp(sub_gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
    live = set(sub.nodes)
    for node in loop.nodes:
        if env[node] in live:
            check_value(env[node].meta.get("val"), node, region.layouts[node], length)
    return sub_gm


def _size_placeholders(
    sub: Graph, symbols: GraphSymbols, length: Size, example_inputs: list
) -> tuple[list[sympy.Symbol], dict[sympy.Symbol, Node]]:
    """The size symbols the chunk's inputs and length are made of, as its first inputs
    (Inductor binds a subgraph's sizes from its own inputs): (the symbols, symbol ->
    placeholder). Their values go first in `example_inputs`."""
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
    return needed, inner


def _input_placeholders(
    sub: Graph, loop: Loop, plan: ChunkPlan, length: Size, block: Shapes | None
) -> tuple[dict[Node, Node], dict[Node, Node], list[Node], list]:
    """The chunk's inputs: (env: each input -> its chunk's placeholder, whole: the inputs
    passed whole to a compacted chunk, which gathers their rows, numbers: a compacted chunk's
    row-number placeholders, the example values of all of them)."""
    region, compaction = plan.region, plan.compaction
    gathered = compaction.chunks_of(length) if compaction is not None else None
    numbers: list[Node] = []
    env: dict[Node, Node] = {}
    example_inputs = []
    whole: dict[Node, Node] = {}  # inputs passed whole, their rows gathered here
    for x in loop.inputs:
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
    return env, whole, numbers, example_inputs


def _copy_nodes(
    sub: Graph, loop: Loop, region: Region, env: dict[Node, Node], inner: dict[sympy.Symbol, Node],
    block: Shapes | None, sizes: SizeArgs, length: Size, fake_mode,
) -> None:
    """Copy the loop's nodes into the chunk, each shape argument and a declared block's sizes
    made the chunk's."""
    for node in loop.nodes:
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
        elif rule is not None and rule.squeezes:
            # a chunk's leading token dims have size 1: squeeze only what the whole value does
            new.target = aten.squeeze.dims
            new.args = (new.args[0], squeezed_dims(node))
            new.kwargs = {}
        env[node] = new


def _returned_values(sub: Graph, loop: Loop, region: Region, env: dict[Node, Node]) -> list[Node]:
    """What the chunk returns for `loop.returns`, copied where the loop needs a buffer of its
    own or a fresh chunk."""
    outputs, returns = loop.outputs, loop.returns
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
    return results


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


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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


def _shape_only(arg: Node, inner: dict[sympy.Symbol, Node]) -> Node | int:
    """Stands in for a size the region reads in a shape argument, which is replaced after the
    copy (analysis.check_symbolic: it reads them nowhere else): a symbolic one, or a size
    input Dynamo specialised to a number after passing it (its value is a number)."""
    val = arg.meta.get("val")
    if isinstance(val, (int, torch.SymInt)) and not is_symbolic(val):
        return int(val)
    if not inner or not is_size_node(arg):
        raise KeyError(arg.name)
    return next(iter(inner.values()))
