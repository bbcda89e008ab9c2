"""Compaction: a loss region run over the rows whose label is kept (ignored_rows.py proves
it may; docs/design.md, "Ignored rows"). The kept tokens' numbers are read from the labels at
run time, in chunks whose two lengths are sizes read from the data; each chunk subgraph
gathers its own rows and writes its output rows into the whole outputs (rewrite.py), which
start as `unwritten_rows`."""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
from torch._dynamo.utils import detect_fake_mode
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import (
    _constrain_range_for_size,
    compute_unbacked_bindings,
)

from .ignored_rows import IgnoredRows
from .layout import Chunked
from .region import Region
from .rows import index_rows, rows_dim, rows_shape
from .symbolic import GraphSymbols, Size, SizeArgs, free_symbols, hint

aten = torch.ops.aten
prims = torch.ops.prims


@dataclasses.dataclass
class Compaction:
    """A loss region run over its kept rows only (ignored_rows.py): the tokens whose label is
    not the ignore index, in order, in `chunks` chunks: chunks - 1 of `regular` rows
    (kept // chunks) and a last one of the rest (`tail`, fewer than regular + chunks). Both
    lengths are read from the data at run time (unbacked sizes): no kept-row count recompiles.
    """

    ignored: IgnoredRows
    chunks: int
    regular: torch.SymInt
    tail: torch.SymInt
    # symbol -> `unbacked_bindings` of the node that will compute it (made when the size is)
    bindings: dict[sympy.Symbol, dict]
    nodes: dict[sympy.Symbol, Node] = dataclasses.field(default_factory=dict)  # once emitted
    # a length's key -> the token numbers of the chunks of that length, one chunk after the
    # other ([(chunks - 1) * regular] and [tail]): each chunk subgraph gathers its own rows.
    # Flat, so every call is passed the same buffer (Inductor copied a [chunks - 1, regular]
    # view for each call: its strides differ from the ones Inductor gives such a shape)
    rows: dict[str, Node] = dataclasses.field(default_factory=dict)
    numbers: Node | None = None  # [chunks - 1, 1]: row i of it is chunk i's number in `rows`
    # the lengths' text when planned: their keys (the text of a size changes as the shape
    # environment learns more)
    regular_key: str = dataclasses.field(init=False)
    tail_key: str = dataclasses.field(init=False)

    @property
    def lengths(self) -> list[torch.SymInt]:
        """The chunks' lengths in the order they run: the tail first, since it has at least
        one row (regular is 0 when fewer rows than chunks are kept) and `unwritten_rows`
        reads the first chunk's first row."""
        return [self.tail] + [self.regular] * (self.chunks - 1)

    @property
    def keys(self) -> list[str]:
        """Per chunk, the name of its length (`rows`' keys), fixed when planned."""
        return [self.tail_key] + [self.regular_key] * (self.chunks - 1)

    def __post_init__(self) -> None:
        self.regular_key, self.tail_key = str(self.regular), str(self.tail)

    def chunks_of(self, length: Size) -> int:
        """How many chunks have `length` rows (the rows of `rows[key]`), when planned."""
        return [str(n) for n in self.lengths].count(str(length))


def plan_compaction(region: Region, chunks: int, ignored: IgnoredRows | None) -> Compaction | None:
    """The compaction of a loss region of `chunks` chunks that skips the `ignored` rows."""
    if ignored is None:
        return None
    vals = [n.meta.get("val") for n in region.seed.graph.find_nodes(op="placeholder")]
    fake_mode = detect_fake_mode([v for v in vals if v is not None])
    # Inductor propagates fake values through the forward graph again: sizes read from the
    # data (`_local_scalar_dense`) must be allowed there, as Dynamo allows them for `.item()`
    # under capture_scalar_outputs
    fake_mode.allow_scalar_outputs = True
    shape_env = fake_mode.shape_env
    bindings: dict[sympy.Symbol, dict] = {}
    # Inductor plans memory (and orders the chunk calls and accumulations) by size hints:
    # those of these sizes are their values when no row is ignored, the largest chunks
    tokens, k = hint(region.tokens), chunks
    per_chunk = max(tokens, 1) // k
    regular = _size_from_data(shape_env, bindings, per_chunk)
    tail = _size_from_data(shape_env, bindings, tokens - (k - 1) * per_chunk)
    return Compaction(ignored, chunks, regular, tail, bindings)


def _size_from_data(shape_env, bindings: dict[sympy.Symbol, dict], expected: int) -> torch.SymInt:
    """A new size known only at run time, `expected` as Inductor's hint. The node that
    computes it must carry `meta["unbacked_bindings"]`, made at once (the shape env allows
    one pending size) and kept in `bindings` until that node exists."""
    size = shape_env.create_unbacked_symint()
    _constrain_range_for_size(size)
    bindings[size.node.expr] = compute_unbacked_bindings(shape_env, size)
    overrides = getattr(shape_env, "var_to_hint_override", None)  # torch >= 2.10
    if overrides is not None:
        overrides[size.node.expr] = expected
    return size


def emit_compaction(graph: Graph, region: Region, compaction: Compaction) -> None:
    """The token numbers of each chunk's rows: the kept tokens in order (a stable sort puts
    them first), `regular` per chunk and the rest in the last one. With no token kept, one
    (ignored) row is computed all the same: it adds nothing to the region's sums, and its
    values fill the skipped rows of the outputs masked downstream."""
    mask, k = compaction.ignored.mask, compaction.chunks
    device = mask.labels.meta["val"].device
    call = graph.call_function

    def size_from_data(value: Node, size: torch.SymInt) -> Node:
        node = call(aten._local_scalar_dense.default, (value,))
        node.meta["val"] = size
        node.meta["unbacked_bindings"] = compaction.bindings[size.node.expr]
        compaction.nodes[size.node.expr] = node
        return node

    def positions(start: Node | int, length: Node) -> Node:
        iota = call(prims.iota.default, (length,), {"start": 0, "step": 1, "dtype": torch.int64,
                                                    "device": device, "requires_grad": False})
        return iota if start == 0 else call(aten.add.Tensor, (iota, start))

    symbols = GraphSymbols(graph)
    anchor = max([mask.labels, *symbols.sources(free_symbols(region.tokens))],
                 key={n: i for i, n in enumerate(graph.nodes)}.__getitem__)
    with graph.inserting_before(anchor.next):
        sizes = SizeArgs(graph, symbols=symbols)
        flat = call(aten.reshape.default, (mask.labels, [sizes.arg(region.tokens)]))
        kept = call(prims.convert_element_type.default,
                    (call(aten.ne.Scalar, (flat, mask.ignore_index)), torch.int32))
        sort = call(aten.sort.stable, (kept,), {"stable": True, "dim": 0, "descending": True})
        order = call(operator.getitem, (sort, 1))  # kept tokens first, each group in order
        count = call(aten.clamp_min.default, (call(aten.sum.default, (kept,)), 1))
        regular_t = call(aten.div.Tensor_mode, (count, k), {"rounding_mode": "floor"})
        tail_t = call(aten.sub.Tensor, (count, call(aten.mul.Tensor, (regular_t, k - 1))))
        regular = size_from_data(regular_t, compaction.regular)
        tail = size_from_data(tail_t, compaction.tail)
        before_tail = call(operator.mul, (regular, k - 1))
        rows = [index_rows(graph, order, 0, positions(0, before_tail)),
                index_rows(graph, order, 0, positions(before_tail, tail))]
        compaction.rows = {compaction.regular_key: rows[0], compaction.tail_key: rows[1]}
        compaction.numbers = call(aten.reshape.default, (positions(0, k - 1), [k - 1, 1]))


def unwritten_rows(
    graph: Graph, sizes: SizeArgs, first: Node, out: Node, layout: Chunked, compaction: Compaction,
) -> Node:
    """The rows of every token of `out` before the chunks write theirs (`ops.put_rows`):
    zeros where the output is zero on ignored rows, else (the output is masked downstream)
    copies of the first computed row, real values as finite as eager's. `first` holds the
    rows of the first chunk to run (the tail: `Compaction.lengths`)."""
    dim = rows_dim(out, layout)
    shape = sizes.shape(rows_shape(out, layout))
    if out in compaction.ignored.zero_outputs:
        return graph.call_function(
            aten.full.default, (shape, 0),
            {"dtype": out.meta["val"].dtype, "device": out.meta["val"].device, "pin_memory": False},
        )
    zero = graph.call_function(
        aten.full.default, ([1], 0),
        {"dtype": torch.int64, "device": out.meta["val"].device, "pin_memory": False},
    )
    row = index_rows(graph, first, dim, zero)  # at least one row is computed
    return graph.call_function(aten.clone.default, (graph.call_function(aten.expand.default, (row, shape)),))
