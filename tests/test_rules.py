"""Every token rule, on hand-built one-op FX graphs, in both directions.

For each case the layouts are derived from the output (`argument_layouts`) and from each
token-carrying argument (`output_layout`); both must agree with the case. Then the rule's
claim is checked on real numbers: the op applied to each chunk of tokens (token-carrying
arguments cut, the others whole, shape arguments and squeezes adjusted as a chunk subgraph
does) gives that chunk of the whole output, or, for a Summed output, chunks that sum to it.
Refusals are cases too: where chunking would be wrong, neither direction may accept it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Sequence

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, Node

from mst_compile.passes.layout import REPLICATED, SUMMED, Chunked, Layout
from mst_compile.passes.rules import (
    OPS,
    argument_layouts,
    output_layout,
    rule_of,
    squeezed_dims,
    tensor_args,
)

aten = torch.ops.aten
prims = torch.ops.prims
B, S, D, V = 2, 5, 3, 7
T = B * S  # tokens
LENGTHS = (3, 4, 3)  # chunk lengths: chunks cross the batch rows


def r(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def ids(*shape, high=V):
    return torch.randint(0, high, shape)


@dataclasses.dataclass
class Case:
    """`op(*args, **kwargs)`, its arguments' token layouts (by position; tensors not listed
    are Replicated) and the output's; `out=None` with `naive` set: the rule must refuse."""

    name: str
    op: object
    args: tuple
    layouts: dict
    out: Layout | None
    kwargs: dict = dataclasses.field(default_factory=dict)
    naive: Layout | None = None  # refusals: the layout a careless rule would give the output
    tokens: int = T


def c(*dims: int) -> Chunked:
    return Chunked(dims)


BSD = c(0, 1)  # [B, S, d] fed by x.view(B * S, d)
ROWS = c(0)  # [T, d]


def _unary(op, x=None):
    return Case(str(op), op, (r(B, S, D) if x is None else x,), {0: BSD}, BSD)


def _binary(op):
    return [
        Case(f"{op} both chunked", op, (r(B, S, D), r(B, S, D)), {0: BSD, 1: BSD}, BSD),
        Case(f"{op} weight broadcast", op, (r(B, S, D), r(D)), {0: BSD}, BSD),
        Case(f"{op} per-token scale", op, (r(B, S, D), r(B, S, 1)), {0: BSD, 1: BSD}, BSD),
    ]


POS = r(B, S, D).abs() + 0.5
MASK = torch.rand(B, S, D) > 0.5
CASES: list[Case] = [
    *[_unary(op) for op in (
        aten.abs.default, aten.neg.default, aten.exp.default, aten.expm1.default,
        aten.sigmoid.default, aten.tanh.default, aten.erf.default, aten.relu.default,
        aten.gelu.default, aten.silu.default, aten.sign.default, aten.square.default,
        aten.sin.default, aten.cos.default, aten.floor.default, aten.round.default,
        aten.exp2.default, aten.clone.default, aten.alias.default)],
    *[_unary(op, POS) for op in (aten.log.default, aten.log1p.default, aten.sqrt.default,
                                 aten.rsqrt.default, aten.reciprocal.default)],
    *[case for op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                      aten.maximum.default, aten.minimum.default, aten.ne.Tensor,
                      aten.eq.Tensor, aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor,
                      aten.le.Tensor, aten.gelu_backward.default, aten.silu_backward.default,
                      aten.sigmoid_backward.default, aten.tanh_backward.default)
      for case in _binary(op)],
    *[Case(str(op), op, (r(B, S, D), 0.5), {0: BSD}, BSD) for op in (
        aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.ne.Scalar,
        aten.eq.Scalar, aten.gt.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar,
        aten.clamp_min.default, aten.clamp_max.default, aten.fill.Scalar)],
    Case("threshold_backward", aten.threshold_backward.default, (r(B, S, D), r(B, S, D), 0.0),
         {0: BSD, 1: BSD}, BSD),
    Case("pow scalar", aten.pow.Tensor_Scalar, (r(B, S, D), 2), {0: BSD}, BSD),
    Case("pow tensor", aten.pow.Tensor_Tensor, (POS, r(D)), {0: BSD}, BSD),
    Case("clamp", aten.clamp.default, (r(B, S, D), -0.5, 0.5), {0: BSD}, BSD),
    Case("lerp", aten.lerp.Scalar, (r(B, S, D), r(B, S, D), 0.3), {0: BSD, 1: BSD}, BSD),
    Case("where", aten.where.self, (MASK, r(B, S, D), r(D)), {0: BSD, 1: BSD}, BSD),
    Case("masked_fill", aten.masked_fill.Scalar, (r(B, S, D), MASK, 0.0), {0: BSD, 1: BSD}, BSD),
    Case("masked_fill tensor", aten.masked_fill.Tensor, (r(B, S, D), MASK, torch.tensor(2.0,
         dtype=torch.float64)), {0: BSD, 1: BSD}, BSD),
    *[Case(str(op), op, (MASK, torch.rand(B, S, D) > 0.3), {0: BSD, 1: BSD}, BSD)
      for op in (aten.logical_and.default, aten.logical_or.default, aten.bitwise_and.Tensor,
                 aten.bitwise_or.Tensor)],
    *[Case(str(op), op, (MASK,), {0: BSD}, BSD)
      for op in (aten.logical_not.default, aten.bitwise_not.default)],
    Case("to_copy", aten._to_copy.default, (r(B, S, D),), {0: BSD}, BSD,
         {"dtype": torch.float32}),
    Case("convert", prims.convert_element_type.default, (r(B, S, D), torch.float32), {0: BSD}, BSD),
    Case("partly broadcast", aten.add.Tensor, (r(B, S, D), r(1, S, D)), {0: BSD}, None,
         naive=BSD),
    Case("tokens in two arrangements", aten.add.Tensor, (r(S, B, D), r(S, B, D)),
         {0: c(1, 0), 1: c(0, 1)}, None, naive=c(1, 0)),
    # matmuls
    Case("mm", aten.mm.default, (r(T, D), r(D, V)), {0: ROWS}, ROWS),
    Case("mm tokens as columns", aten.mm.default, (r(V, D), r(D, T)), {1: c(1)}, c(1)),
    Case("mm weight gradient", aten.mm.default, (r(D, T), r(T, V)), {0: c(1), 1: ROWS}, SUMMED),
    Case("addmm", aten.addmm.default, (r(V), r(T, D), r(D, V)), {1: ROWS}, ROWS),
    Case("addmm over tokens adds the bias per chunk", aten.addmm.default,
         (r(D, V), r(D, T), r(T, V)), {1: c(1), 2: ROWS}, None, naive=SUMMED),
    Case("bmm", aten.bmm.default, (r(3, T, D), r(3, D, V)), {0: c(1)}, c(1)),
    Case("bmm batch of tokens and groups", aten.bmm.default, (r(B, S, D), r(B, D, V)),
         {0: BSD}, None, naive=BSD),
    # reductions
    Case("sum features", aten.sum.dim_IntList, (r(B, S, D), [-1]), {0: BSD}, BSD),
    Case("sum features keepdim", aten.sum.dim_IntList, (r(B, S, D), [2], True), {0: BSD}, BSD),
    Case("sum tokens", aten.sum.dim_IntList, (r(B, S, D), [0, 1]), {0: BSD}, SUMMED),
    Case("sum over the batch only", aten.sum.dim_IntList, (r(B, S, D), [0]), {0: BSD}, None,
         naive=c(0)),
    Case("sum all", aten.sum.default, (r(B, S, D),), {0: BSD}, SUMMED),
    Case("amax features", aten.amax.default, (r(B, S, D), [-1], True), {0: BSD}, BSD),
    Case("amin features", aten.amin.default, (r(B, S, D), [-1]), {0: BSD}, BSD),
    Case("amax over tokens", aten.amax.default, (r(T, D), [0]), {0: ROWS}, None, naive=SUMMED),
    Case("mean features", aten.mean.dim, (r(B, S, D), [-1]), {0: BSD}, BSD),
    Case("mean over the sequence", aten.mean.dim, (r(T, D), [0]), {0: ROWS}, None,
         naive=SUMMED),
    # reordering and shapes
    Case("permute", aten.permute.default, (r(B, S, D), [2, 0, 1]), {0: BSD}, c(1, 2)),
    Case("transpose to sequence first", aten.transpose.int, (r(B, S, D), 0, 1), {0: BSD}, c(1, 0)),
    Case("transpose tokens apart", aten.transpose.int, (r(B, S, D), 1, 2), {0: BSD}, c(0, 2)),
    Case("view merges tokens", aten.view.default, (r(B, S, D), [T, D]), {0: BSD}, ROWS),
    Case("view splits features", aten.view.default, (r(T, 6), [T, 2, 3]), {0: ROWS}, ROWS),
    Case("reshape splits tokens", aten.reshape.default, (r(T, D), [B, S, D]), {0: ROWS}, BSD),
    Case("unsafe_view", aten._unsafe_view.default, (r(B, S, D), [T, D]), {0: BSD}, ROWS),
    Case("view of reordered tokens", aten.reshape.default, (r(S, B, D), [T, D]), {0: c(1, 0)},
         None, naive=ROWS),
    Case("view mixes tokens and features", aten.view.default, (r(T, D), [D, T]), {0: ROWS},
         None, naive=c(1)),
    Case("unsqueeze", aten.unsqueeze.default, (r(T, D), 1), {0: ROWS}, ROWS),
    Case("squeeze dim", aten.squeeze.dim, (r(B, S, 1), -1), {0: BSD}, BSD),
    Case("squeeze dims", aten.squeeze.dims, (r(B, S, 1, D), [2]), {0: BSD}, BSD),
    Case("squeeze all (leading token dims are 1 in a chunk)", aten.squeeze.default,
         (r(B, S, 1),), {0: BSD}, BSD),
    Case("squeeze of a token dim is a no-op", aten.squeeze.dim, (r(B, S, D), 0), {0: BSD}, BSD),
    Case("expand", aten.expand.default, (r(T, 1), [T, V]), {0: ROWS}, ROWS),
    Case("repeat features", aten.repeat.default, (r(B, S, D), [1, 1, 2]), {0: BSD}, BSD),
    Case("repeat along tokens", aten.repeat.default, (r(T, D), [2, 1]), {0: ROWS}, None,
         naive=ROWS),
    Case("view_as_complex (rotary pairs)", aten.view_as_complex.default,
         (r(B, S, D, 2, dtype=torch.float32),), {0: BSD}, BSD),
    Case("view_as_real", aten.view_as_real.default,
         (torch.randn(B, S, D, dtype=torch.complex64),), {0: BSD}, BSD),
    Case("expand a constant over tokens", aten.expand.default, (r(1, D), [T, D]), {}, ROWS),
    # gathers and scatters (the cross-entropy's)
    Case("gather the target", aten.gather.default, (r(T, V), 1, ids(T, 1)), {0: ROWS, 2: ROWS}, ROWS),
    Case("gather a table by token ids", aten.gather.default, (r(V, D), 0, ids(T, D)),
         {2: ROWS}, ROWS),
    Case("gather along tokens", aten.gather.default, (r(T, D), 0, ids(T, D, high=T)),
         {0: ROWS, 2: ROWS}, None, naive=ROWS),
    Case("scatter the target", aten.scatter.value, (torch.zeros(T, V, dtype=torch.float64), 1,
         ids(T, 1), -1.0), {0: ROWS, 2: ROWS}, ROWS),
    Case("scatter src", aten.scatter.src, (r(T, V), 1, ids(T, 1), r(T, 1)),
         {0: ROWS, 2: ROWS, 3: ROWS}, ROWS),
    Case("scatter along tokens", aten.scatter.value, (r(T, D), 0, ids(T, D, high=T), 1.0),
         {0: ROWS, 2: ROWS}, None, naive=ROWS),
    Case("scatter with a shorter index", aten.scatter.value, (r(T, D), 1, ids(4, 1, high=D), 1.0),
         {0: ROWS}, None, naive=ROWS),
    # slices, splits, cat
    Case("slice features", aten.slice.Tensor, (r(T, 6), 1, 0, 3), {0: ROWS}, ROWS),
    Case("slice all tokens", aten.slice.Tensor, (r(T, D), 0, 0, 2**62), {0: ROWS}, ROWS),
    Case("slice a positional table to the sequence", aten.slice.Tensor, (r(16, D), 0, 0, T),
         {}, None, naive=ROWS),
    Case("slice every other token", aten.slice.Tensor, (r(2 * T, D), 0, 0, 2 * T, 2), {}, None,
         naive=ROWS),
    Case("split", aten.split.Tensor, (r(T, 6), 3, -1), {0: ROWS}, ROWS),
    Case("split with sizes", aten.split_with_sizes.default, (r(T, 6), [2, 4], 1), {0: ROWS}, ROWS),
    Case("cat features", aten.cat.default, ([r(T, D), r(T, 2)], 1), {(0, 0): ROWS, (0, 1): ROWS}, ROWS),
    Case("cat along tokens", aten.cat.default, ([r(4, D), r(T - 4, D)], 0), {}, None, naive=ROWS),
    # factories (the cross-entropy backward's zeros)
    *[Case(str(op), op, ([T, V],), {}, ROWS, {"dtype": torch.float64})
      for op in (aten.zeros.default, aten.ones.default, aten.empty.memory_format)],
    Case("full", aten.full.default, ([T, V], 0.5), {}, ROWS, {"dtype": torch.float64}),
]
GETITEM_OF = {"split", "split with sizes"}


def _graph(case: Case) -> tuple[Node, dict]:
    """A graph with one node for `case.op`; its tensor arguments are placeholders."""
    graph = Graph()
    fake = FakeTensorMode()
    real: dict[Node, torch.Tensor] = {}

    def place(value):
        if isinstance(value, torch.Tensor):
            ph = graph.placeholder(f"arg{len(real)}")
            ph.meta["val"] = fake.from_tensor(value)
            real[ph] = value
            return ph
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [place(v) for v in value]
        return value

    args = tuple(place(a) for a in case.args)
    node = graph.call_function(case.op, args, dict(case.kwargs))
    fake_args = [ph.meta["val"] if isinstance(ph, Node) else ph for ph in args]
    fake_args = [[p.meta["val"] for p in a] if isinstance(a, list) and a and isinstance(a[0], Node)
                 else a for a in fake_args]
    with fake:
        node.meta["val"] = case.op(*fake_args, **case.kwargs)
    if case.name in GETITEM_OF:
        item = graph.call_function(operator.getitem, (node, 1))
        item.meta["val"] = node.meta["val"][1]
    return node, real


def _layouts_of(node: Node, case: Case) -> dict:
    return {pos: case.layouts.get(pos, REPLICATED) for pos, _ in tensor_args(node)}


def _accepted_from_output(node: Node, case: Case, out: Layout) -> bool:
    derived = argument_layouts(node, out, case.tokens)
    return derived is not None and derived == _layouts_of(node, case)


def _accepted_from_arguments(node: Node, case: Case, out: Layout) -> bool:
    chunked = [(pos, a) for pos, a in tensor_args(node) if isinstance(case.layouts.get(pos), Chunked)]
    return bool(chunked) and all(
        output_layout(node, a, case.layouts[pos], case.tokens) == out for pos, a in chunked
    )


# --- token chunks, written independently of the rewrite -----------------------------------


def _token_major(layout: Chunked, rank: int) -> list[int]:
    return list(layout.dims) + [d for d in range(rank) if d not in layout.dims]


def cut(value: torch.Tensor, layout: Chunked, start: int, stop: int) -> torch.Tensor:
    """Tokens [start, stop) of `value` (token t at the row-major position of t over the
    layout's dims, most significant first), in the chunk layout: token dims 1, ..., 1, n."""
    order = _token_major(layout, value.dim())
    major = value.permute(order)
    k = len(layout.dims)
    rows = major.reshape(-1, *major.shape[k:])[start:stop]
    chunk = rows.reshape(*([1] * (k - 1)), stop - start, *major.shape[k:])
    inverse = [order.index(d) for d in range(value.dim())]
    return chunk.permute(inverse)


def _run_chunk(case: Case, node: Node, start: int, stop: int):
    """`case.op` on the chunk [start, stop) the way a chunk subgraph runs it."""
    def chunk_arg(value, pos):
        layout = case.layouts.get(pos)
        return cut(value, layout, start, stop) if isinstance(layout, Chunked) else value

    args = []
    for i, a in enumerate(case.args):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            args.append([chunk_arg(v, (i, j)) for j, v in enumerate(a)])
        elif isinstance(a, torch.Tensor):
            args.append(chunk_arg(a, i))
        else:
            args.append(a)
    rule = rule_of(node)
    if rule.shape_arg is not None and isinstance(case.out, Chunked):
        args[rule.shape_arg] = case.out.chunk_shape(_shape(node), stop - start)
    if rule.squeezes:
        return aten.squeeze.dims(args[0], squeezed_dims(node))
    return case.op(*args, **case.kwargs)


def _shape(node: Node) -> list[int]:
    val = node.meta["val"]
    return list((val[0] if isinstance(val, (list, tuple)) else val).shape)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        return torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    return torch.equal(a, b)


@pytest.mark.parametrize("case", [k for k in CASES if k.out is not None], ids=lambda k: k.name)
def test_rule_is_exact_both_ways(case):
    torch.manual_seed(0)
    node, _ = _graph(case)
    assert _accepted_from_output(node, case, case.out), argument_layouts(node, case.out, case.tokens)
    if any(isinstance(lay, Chunked) for lay in case.layouts.values()):
        assert _accepted_from_arguments(node, case, case.out)
    whole = case.op(*case.args, **case.kwargs)
    bounds = [0, *itertools.accumulate(LENGTHS)]
    assert bounds[-1] == case.tokens
    pieces = [_run_chunk(case, node, a, b) for a, b in itertools.pairwise(bounds)]
    if case.op is aten.empty.memory_format:
        whole, pieces = torch.zeros_like(whole), [torch.zeros_like(p) for p in pieces]
    if isinstance(whole, (list, tuple)):  # split: check every output
        for i, w in enumerate(whole):
            _check_pieces(w, [p[i] for p in pieces], case.out, bounds)
    else:
        _check_pieces(whole, pieces, case.out, bounds)


def _check_pieces(whole, pieces, out: Layout, bounds: Sequence[int]) -> None:
    if out is SUMMED:
        assert _close(sum(pieces), whole)
        return
    for piece, (a, b) in zip(pieces, itertools.pairwise(bounds)):
        assert _close(piece, cut(whole, out, a, b)), (a, b)


@pytest.mark.parametrize("case", [k for k in CASES if k.out is None], ids=lambda k: k.name)
def test_rule_refuses_what_chunking_would_change(case):
    """The analysis accepts an op only where the argument layouts derived from its output
    are the ones its arguments have (output_layout only proposes)."""
    node, _ = _graph(case)
    assert not _accepted_from_output(node, case, case.naive)


def test_every_rule_has_a_case():
    covered = {k.op for k in CASES} | ({operator.getitem} if GETITEM_OF else set())
    with_rules = {op for op, facts in OPS.items() if facts.has_rule}
    assert with_rules - covered == set()


def test_getitem_of_a_split_maps_dims_one_to_one():
    case = next(k for k in CASES if k.name == "split")
    node, _ = _graph(case)
    item = next(iter(node.users))
    assert output_layout(item, node, ROWS, T) == ROWS
    assert argument_layouts(item, ROWS, T) == {0: ROWS}


def test_view_rule_needs_tokens_in_row_major_order():
    """[S, B, d] holding tokens b * S + s: merging dims 0 and 1 would number them s * B + b."""
    case = next(k for k in CASES if k.name == "view of reordered tokens")
    node, _ = _graph(case)
    assert output_layout(node, node.args[0], c(1, 0), T) is None
    assert output_layout(node, node.args[0], c(0, 1), T) == ROWS
    assert math.prod(_shape(node)[:1]) == T


# --- the other facts of each record, on numbers -------------------------------------------

FACT_CASES = {k.op: k for k in CASES if k.out is not None}  # one working case per op


def _is_float(a: object) -> bool:
    return isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())


def _floats(case: Case) -> list[int]:
    """Positions of the float tensor arguments (a list of them counts as one)."""
    return [i for i, a in enumerate(case.args)
            if _is_float(a) or (isinstance(a, list) and a and all(map(_is_float, a)))]


def _scaled(case: Case, positions: list[int], factor: float) -> tuple:
    def scale(a):
        return [x * factor for x in a] if isinstance(a, list) else a * factor
    return tuple(scale(a) if i in positions else a for i, a in enumerate(case.args))


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@pytest.mark.parametrize("op", [op for op, f in OPS.items() if f.linear and op in FACT_CASES],
                         ids=str)
def test_linear_facts_hold(op):
    """EACH: linear in each float tensor argument; FIRST: in the first; SUM_OF: in all of them
    together. The loss form and the zeros of ignored rows rest on these."""
    case, linear = FACT_CASES[op], OPS[op].linear
    floats = _floats(case)
    groups = {"each": [[i] for i in floats], "first": [[0]], "sum": [floats]}[linear]
    whole = _outputs(op(*case.args, **case.kwargs))
    for positions in groups:
        scaled = _outputs(op(*_scaled(case, positions, 2.0), **case.kwargs))
        for a, b in zip(scaled, whole):
            assert torch.allclose(a, 2 * b), (op, positions)


@pytest.mark.parametrize("op", [op for op, f in OPS.items() if f.keeps_order], ids=str)
def test_order_keeping_ops_keep_one_value_per_token_in_order(op):
    labels = torch.arange(T).reshape(B, S, 1)
    args = {aten.view.default: (labels, [T]), aten.reshape.default: (labels, [T]),
            aten._unsafe_view.default: (labels, [T]), aten.unsqueeze.default: (labels, 1),
            aten.squeeze.dim: (labels, -1), aten.squeeze.dims: (labels, [2]),
            aten.squeeze.default: (labels,), aten.alias.default: (labels,),
            aten.clone.default: (labels,), aten._to_copy.default: (labels,),
            prims.convert_element_type.default: (labels, torch.float64)}[op]
    assert torch.equal(op(*args).reshape(-1).long(), labels.reshape(-1))


@pytest.mark.parametrize("op", [op for op, f in OPS.items() if f.mask], ids=str)
def test_mask_facts(op):
    x = ids(B, S)
    mask = OPS[op].mask
    if mask == "negates":
        m = x > 3
        assert torch.equal(op(m), ~m)
    else:
        assert torch.equal(op(x, 3), (x != 3) if mask == "kept" else (x == 3))


@pytest.mark.parametrize("op", [op for op, f in OPS.items() if f.adds], ids=str)
def test_adds_is_an_elementwise_sum_or_difference(op):
    a, b = r(T, D), r(T, D)
    assert torch.allclose(op(a, b), a + b if op is aten.add.Tensor else a - b)


@pytest.mark.parametrize("op", [op for op, f in OPS.items()
                                if f.fill_arg is not None or f.factory], ids=str)
def test_factories_make_their_shape_and_fill(op):
    facts = OPS[op]
    base = r(2, 3)
    args = {aten.full.default: ([T, V], 0.5), aten.scalar_tensor.default: (0.5,),
            aten.empty_strided.default: ([T, V], [V, 1]),
            aten.new_full.default: (base, [T, V], 0.5),
            aten.new_empty_strided.default: (base, [T, V], [V, 1])}.get(op)
    if args is None:
        args = (base, [T, V]) if facts.shape_arg == 1 else ([T, V],)
    out = op(*args)
    if facts.shape_arg is not None:
        assert list(out.shape) == list(args[facts.shape_arg])
    if facts.strides_arg is not None:
        assert list(out.stride()) == list(args[facts.strides_arg])
    if facts.fill_arg is not None:
        assert torch.all(out == args[facts.fill_arg])


def test_size_arguments_of_expand_lengths_and_dims():
    assert OPS[aten.expand.default].expands
    assert list(aten.expand.default(r(T, 1), [T, V]).shape) == [T, V]
    for op in (op for op, f in OPS.items() if f.length_arg is not None):
        out = (prims.iota.default(T, start=0, step=1, dtype=torch.int64, device="cpu",
                                  requires_grad=False) if op is prims.iota.default else op(T))
        assert out.numel() == T
    x = r(T, 6)
    for op, args in ((aten.slice.Tensor, (x, 1, 0, 3)), (aten.split.Tensor, (x, 3, 1)),
                     (aten.split_with_sizes.default, (x, [2, 4], 1)),
                     (aten.select.int, (x, 1, 2)), (aten.narrow.default, (x, 1, 1, 2))):
        dim = args[OPS[op].dim_arg]
        out = _outputs(op(*args))[0]
        if op is aten.select.int:  # the dim taken part of goes
            assert list(out.shape) == [T]
        else:  # only the dim taken part of changes
            assert out.shape[0] == T and out.shape[dim] < x.shape[dim]


@pytest.mark.parametrize("op", [op for op, f in OPS.items() if f.flops is not None], ids=str)
def test_matmul_flops_are_twice_the_multiply_adds(op):
    from mst_compile.passes.rules import matmul_flops

    if isinstance(op, str):  # a grouped matmul by name: rows [m, k] times [experts, k, n]
        args, want = (r(T, D), r(3, D, V)), 2 * T * D * V
        target = torch.ops.aten._grouped_mm.default
    elif op is aten.mm.default:
        args, want, target = (r(T, D), r(D, V)), 2 * T * D * V, op
    elif op is aten.bmm.default:
        args, want, target = (r(3, T, D), r(3, D, V)), 2 * 3 * T * D * V, op
    else:  # baddbmm
        args, want, target = (r(3, T, V), r(3, T, D), r(3, D, V)), 2 * 3 * T * D * V, op
    graph, fake = Graph(), FakeTensorMode()
    nodes = []
    for i, a in enumerate(args):
        ph = graph.placeholder(f"a{i}")
        ph.meta["val"] = fake.from_tensor(a)
        nodes.append(ph)
    node = graph.call_function(target, tuple(nodes))
    node.meta["val"] = None
    assert matmul_flops(node) == want


def test_routing_mixing_and_aliasing_facts_name_real_ops():
    """Every op named by a fact exists in this build where it is an ATen op of every build,
    the routing ops pick per row, and ops said to alias do return views."""
    routes = [op for op, f in OPS.items() if f.routes]
    assert routes and all(isinstance(op, torch._ops.OpOverload) for op in routes)
    _, picked = aten.topk.default(r(T, V), 2)
    assert picked.shape == (T, 2) and picked.dtype == torch.int64
    mixers = [op for op, f in OPS.items() if f.mixes_tokens]
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in mixers
    assert hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu")
    x = r(B, S, D)
    for op in (aten.permute.default, aten.transpose.int, aten.view.default, aten.alias.default):
        assert OPS[op].aliases
        args = {aten.permute.default: (x, [2, 0, 1]), aten.transpose.int: (x, 0, 1),
                aten.view.default: (x, [T, D]), aten.alias.default: (x,)}[op]
        assert op(*args).untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert not OPS[aten.clone.default].aliases


@pytest.mark.parametrize("op", [op for op, f in OPS.items() if f.linear and op in FACT_CASES
                                and isinstance(FACT_CASES[op].out, Chunked)], ids=str)
def test_zeros_propagate_as_the_linear_fact_says(op):
    """`zero_where` (which the ignored-rows proof uses): the tokens where the arguments it
    names are zero are zero in the output too, on numbers."""
    from mst_compile.passes.rules import zero_where

    case = FACT_CASES[op]
    node, real = _graph(case)
    chunked = [p for p, a in tensor_args(node) if isinstance(case.layouts.get(p), Chunked)
               and real[a].is_floating_point()]
    if not chunked:
        pytest.skip("no token-carrying float argument")
    linear = OPS[op].linear
    floats = [p for p, a in tensor_args(node) if real[a].is_floating_point()]
    if linear == "sum" and set(floats) - set(chunked):
        pytest.skip("a float argument carries no tokens: zeros cannot be on them")
    zeroed = {"each": chunked[:1], "first": chunked[:1] if chunked[0] == 0 else [],
              "sum": chunked}[linear]
    if not zeroed:
        pytest.skip("the first argument carries no tokens")
    nodes = {p: a for p, a in tensor_args(node)}
    assert zero_where(node, lambda a: any(a is nodes[p] for p in zeroed))
    args = list(case.args)
    for p in zeroed:
        value = args[p] if isinstance(p, int) else args[p[0]][p[1]]
        value = value * (_token_ids(value.shape, case.layouts[p]) >= 3)  # tokens 0..2 zero
        if isinstance(p, int):
            args[p] = value
        else:
            args[p[0]] = [value if j == p[1] else v for j, v in enumerate(args[p[0]])]
    out = _outputs(op(*args, **case.kwargs))[0]
    assert torch.all(out[_token_ids(out.shape, case.out) < 3] == 0)


def _token_ids(shape, layout: Chunked) -> torch.Tensor:
    """The token number of every position of a value of `shape` (row-major over the
    layout's token dims, most significant first)."""
    ids_ = torch.zeros(tuple(shape), dtype=torch.long)
    step = 1
    for d in reversed(layout.dims):
        view = [1] * len(shape)
        view[d] = shape[d]
        ids_ = ids_ + torch.arange(shape[d]).view(view) * step
        step *= shape[d]
    return ids_
