"""Token-axis propagation rules, as data: a table from ATen op to how its dims correspond.

A rule maps a node to, for each tensor argument (by position), what each of its dims becomes
in the output: an output dim index, SUM (summed over: a contraction or a sum-reduction, so a
token dim there makes the output Summed), or None (broadcast, gathered, max-reduced, ...: a
token dim there is not allowed). From that one map the analysis derives the layout of the
output from an argument (`output_layout`) and of the arguments from the output
(`argument_layouts`). An op with no entry ends a region; never guess.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch.fx import Node

from .layout import REPLICATED, SUMMED, Chunked, Layout, make_chunked, view_token_dims
from .symbolic import is_size_node

aten = torch.ops.aten
prims = torch.ops.prims

SUM = "sum"
DimTarget = int | str | None
ArgKey = int | tuple[int, int]  # argument position, or (position, index) inside a list argument
DimMap = dict[ArgKey, list[DimTarget]]  # tensor argument -> target of each of its dims


def shape_of(node: Node) -> list[int]:
    """The shape of a node's value; for a multi-output op (split), of its first output: the
    outputs differ only along the split dim, which never carries tokens."""
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        val = val[0]
    return list(val.shape)


def numel_of(node: Node) -> int:
    val = node.meta["val"]
    return sum(v.numel() for v in val) if isinstance(val, (list, tuple)) else val.numel()


def element_size(node: Node) -> int:
    val = node.meta["val"]
    return (val[0] if isinstance(val, (list, tuple)) else val).element_size()


def tensor_args(node: Node) -> list[tuple[ArgKey, Node]]:
    """Node arguments by position, (i) or (i, j) in a list; symbolic sizes (SymInt nodes in a
    shape argument) are not tensors and are left out."""
    found: list[tuple[ArgKey, Node]] = []
    for i, a in enumerate(node.args):
        if isinstance(a, Node):
            found.append((i, a))
        elif isinstance(a, (list, tuple)):
            found.extend(((i, j), b) for j, b in enumerate(a) if isinstance(b, Node))
    return [(k, a) for k, a in found if not is_size_node(a)]


# --- dim maps -----------------------------------------------------------------------------


def pointwise(node: Node) -> DimMap:
    """Broadcasting elementwise op: dims align from the right; a size-1 dim broadcasts."""
    out = shape_of(node)
    maps: DimMap = {}
    for pos, arg in tensor_args(node):
        shape = shape_of(arg)
        offset = len(out) - len(shape)
        maps[pos] = [offset + i if size == out[offset + i] else None for i, size in enumerate(shape)]
    return maps


def _reduction(kind: DimTarget) -> Callable[[Node], DimMap]:
    def rule(node: Node) -> DimMap:
        shape = shape_of(node.args[0])
        rank = len(shape)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or dims == []:
            reduced = set(range(rank))
        else:
            dims = [dims] if isinstance(dims, int) else dims
            reduced = {d % rank for d in dims}
        targets: list[DimTarget] = []
        out_dim = 0
        for d in range(rank):
            if d in reduced:
                targets.append(kind)
                out_dim += 1 if keepdim else 0
            else:
                targets.append(out_dim)
                out_dim += 1
        return {0: targets}

    return rule


def sum_all(node: Node) -> DimMap:
    return {0: [SUM] * len(shape_of(node.args[0]))}


def mm(node: Node) -> DimMap:
    return {0: [0, SUM], 1: [SUM, 1]}


def bmm(node: Node) -> DimMap:
    return {0: [0, 1, SUM], 1: [0, SUM, 2]}


def addmm(node: Node) -> DimMap:
    # A token contraction would add the bias once per chunk: not allowed (None).
    maps = pointwise(node)
    return {0: maps[0], 1: [0, None], 2: [None, 1]}


def permute(node: Node) -> DimMap:
    perm = [p % len(node.args[1]) for p in node.args[1]]
    targets: list[DimTarget] = [None] * len(perm)
    for out_dim, in_dim in enumerate(perm):
        targets[in_dim] = out_dim
    return {0: targets}


def transpose(node: Node) -> DimMap:
    rank = len(shape_of(node.args[0]))
    a, b = node.args[1] % rank, node.args[2] % rank
    targets: list[DimTarget] = list(range(rank))
    targets[a], targets[b] = b, a
    return {0: targets}


def _same_dims_except(node: Node, arg_pos: int, dim: int | None) -> list[DimTarget]:
    """Dims equal in size to the output's map straight through; `dim` and others do not."""
    shape, out = shape_of(node.args[arg_pos]), shape_of(node)
    dim = None if dim is None else dim % len(out)
    return [i if i != dim and size == out[i] else None for i, size in enumerate(shape)]


def gather(node: Node) -> DimMap:
    dim = node.args[1]
    return {0: _same_dims_except(node, 0, dim), 2: _same_dims_except(node, 2, None)}


def scatter(node: Node) -> DimMap:
    dim = node.args[1]
    maps = {0: _same_dims_except(node, 0, None), 2: _same_dims_except(node, 2, dim)}
    if len(node.args) > 3 and isinstance(node.args[3], Node):
        maps[3] = _same_dims_except(node, 3, dim)
    return maps


def _identity_except(rank: int, dim: int | None) -> list[DimTarget]:
    return [d if d != dim else None for d in range(rank)]


def slice_(node: Node) -> DimMap:
    """Slicing keeps a dim only where it takes all of it (a token dim slice ends a region)."""
    shape = shape_of(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    whole = shape[dim] == shape_of(node)[dim]
    return {0: _identity_except(len(shape), None if whole else dim)}


def split(node: Node) -> DimMap:
    shape = shape_of(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(shape)
    return {0: _identity_except(len(shape), dim)}


def cat(node: Node) -> DimMap:
    rank = len(shape_of(node))
    dim = (node.args[1] if len(node.args) > 1 else 0) % rank
    return {(0, j): _identity_except(rank, dim) for j in range(len(node.args[0]))}


def getitem(node: Node) -> DimMap:
    """An output of a multi-output op (split): dims map one to one."""
    if not isinstance(node.args[0].meta.get("val"), (list, tuple)):
        return {}
    return {0: _identity_except(len(shape_of(node)), None)}


def unsqueeze(node: Node) -> DimMap:
    rank = len(shape_of(node))
    dim = node.args[1] % rank
    return {0: [d if d < dim else d + 1 for d in range(rank - 1)]}


def squeeze(node: Node) -> DimMap:
    shape = shape_of(node.args[0])
    rank = len(shape)
    if len(node.args) < 2:
        dims = set(range(rank))
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = {d % rank for d in dims}
    targets: list[DimTarget] = []
    out_dim = 0
    for d, size in enumerate(shape):
        if d in dims and size == 1:
            targets.append(None)
        else:
            targets.append(out_dim)
            out_dim += 1
    return {0: targets}


def expand(node: Node) -> DimMap:
    return {0: pointwise(node)[0]}


def factory(node: Node) -> DimMap:
    return {}


VIEW = "view"  # views map tokens by element count, not dim by dim: see `view_token_dims`

POINTWISE_OPS = [
    aten.abs.default, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default,
    aten.exp.default, aten.expm1.default, aten.log.default, aten.log1p.default,
    aten.sigmoid.default, aten.tanh.default, aten.erf.default, aten.relu.default,
    aten.gelu.default, aten.silu.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
    aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default, aten.sign.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.maximum.default, aten.minimum.default, aten.where.self, aten.ne.Scalar, aten.ne.Tensor,
    aten.eq.Scalar, aten.eq.Tensor, aten.gt.Scalar, aten.gt.Tensor, aten.lt.Scalar,
    aten.lt.Tensor, aten.ge.Scalar, aten.ge.Tensor, aten.le.Scalar, aten.le.Tensor,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.fill.Scalar,
    aten.clone.default, aten.alias.default, aten._to_copy.default,
    prims.convert_element_type.default, aten.threshold_backward.default,
    aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
    aten.tanh_backward.default, aten.lerp.Scalar, aten.square.default, aten.sin.default,
    aten.cos.default, aten.floor.default, aten.round.default, aten.exp2.default,
]

RULES: dict[object, Callable[[Node], DimMap] | str] = {
    **{op: pointwise for op in POINTWISE_OPS},
    aten.mm.default: mm,
    aten.addmm.default: addmm,
    aten.bmm.default: bmm,
    aten.sum.dim_IntList: _reduction(SUM),
    aten.sum.default: sum_all,
    aten.amax.default: _reduction(None),
    aten.amin.default: _reduction(None),
    aten.mean.dim: _reduction(None),  # a token mean divides by the chunk: not linear as is
    aten.permute.default: permute,
    aten.transpose.int: transpose,
    aten.gather.default: gather,
    aten.scatter.value: scatter,
    aten.scatter.src: scatter,
    aten.unsqueeze.default: unsqueeze,
    aten.squeeze.dim: squeeze,
    aten.squeeze.dims: squeeze,
    aten.squeeze.default: squeeze,
    aten.expand.default: expand,
    aten.view.default: VIEW,
    aten.reshape.default: VIEW,
    aten._unsafe_view.default: VIEW,
    aten.slice.Tensor: slice_,
    aten.split.Tensor: split,
    aten.split_with_sizes.default: split,
    aten.cat.default: cat,
    operator.getitem: getitem,
    aten.full.default: factory,
    aten.zeros.default: factory,
    aten.ones.default: factory,
    aten.empty.memory_format: factory,
}

# Ops whose first or named argument is a shape, rewritten to the chunk's shape in a subgraph.
SHAPE_ARG_OPS = {
    aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1,
    aten.expand.default: 1, aten.full.default: 0, aten.zeros.default: 0, aten.ones.default: 0,
    aten.empty.memory_format: 0,
}


def has_rule(node: Node) -> bool:
    return node.op == "call_function" and node.target in RULES and "val" in node.meta


def rule_name(node: Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


# --- derivations --------------------------------------------------------------------------


def output_layout(node: Node, arg: Node, arg_layout: Layout, tokens: int) -> Layout | None:
    """The layout of `node`'s output given the layout of its argument `arg`."""
    if not isinstance(arg_layout, Chunked) or not has_rule(node):
        return None
    rule = RULES[node.target]
    if rule == VIEW:
        dims = view_token_dims(shape_of(arg), arg_layout.dims, shape_of(node))
        return None if dims is None else make_chunked(dims, shape_of(node), tokens)
    maps = rule(node)
    positions = [p for p, a in tensor_args(node) if a is arg and p in maps]
    if not positions:
        return None
    layouts = set()
    for pos in positions:
        targets = [maps[pos][d] for d in arg_layout.dims]
        if all(t == SUM for t in targets):
            layouts.add(SUMMED)
        elif all(isinstance(t, int) for t in targets):
            layouts.add(make_chunked(targets, shape_of(node), tokens))
        else:
            return None
    return layouts.pop() if len(layouts) == 1 else None


def argument_layouts(node: Node, out_layout: Layout, tokens: int) -> dict[ArgKey, Layout] | None:
    """The layout of every tensor argument of `node` given its output layout; None if some
    argument cannot be given one (the tokens would be partly broadcast, mixed, ...)."""
    if not has_rule(node):
        return None
    rule = RULES[node.target]
    result: dict[ArgKey, Layout] = {}
    if rule == VIEW:
        if not isinstance(out_layout, Chunked):
            return None
        src = node.args[0]
        dims = view_token_dims(shape_of(node), out_layout.dims, shape_of(src))
        layout = None if dims is None else make_chunked(dims, shape_of(src), tokens)
        return None if layout is None else {0: layout}
    maps = rule(node)
    for pos, arg in tensor_args(node):
        if pos not in maps:
            return None
        targets = maps[pos]
        if out_layout is SUMMED:
            dims = [d for d, t in enumerate(targets) if t == SUM]
        elif isinstance(out_layout, Chunked):
            dims = [d for d, t in enumerate(targets) if isinstance(t, int) and t in out_layout.dims]
        else:
            return None
        layout = make_chunked(dims, shape_of(arg), tokens) if dims else REPLICATED
        if layout is None:
            return None
        result[pos] = layout
    return result


def chunk_shape_args(node: Node) -> int | None:
    """Position of `node`'s shape argument, if it has one."""
    return SHAPE_ARG_OPS.get(node.target)


def per_token_numel(node: Node, layout: Layout, tokens: int) -> int:
    """Elements per token of a Chunked value."""
    return numel_of(node) // tokens if isinstance(layout, Chunked) else 0


def is_tensor_node(node: Node) -> bool:
    """A node whose value is a tensor or a list of tensors (split)."""
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def all_shapes_static(nodes: Sequence[Node]) -> bool:
    for n in nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape):
            return False
    return True
