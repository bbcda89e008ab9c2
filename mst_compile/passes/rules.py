"""Token-axis rules, as data: one record per ATen op (docs/design.md, "Rules").

A rule's dim map says, for each tensor argument (by position), what each of its dims becomes
in the output:

- an int: that output dim (a token there stays a token there);
- SUM: summed over (a contraction, a sum): tokens there make the output Summed;
- BLOCKED: lined up with the output dim of the same index, but output position i does not
  read argument position i (a partial slice, a shorter scatter index): a token dim there, or
  a token dim of the output at that index, ends the region;
- None: no token may be there, and the argument is not read position by position along any
  output dim (a max-reduced dim, a size-1 dim broadcast, the gathered dim of a table).

An argument with no dim mapped to an output token dim is constant along it: Replicated.
From the one map the analysis derives the layout of the output from an argument
(`output_layout`) and of the arguments from the output (`argument_layouts`), keeping the order
of the token dims (layout.py). An op with no record ends a region; never guess.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.fx import Node

from ..declare import TokenWise, declared_op
from .layout import REPLICATED, SCALED, SUMMED, Chunked, Layout, make_chunked, view_token_dims
from .symbolic import above_one, hint, is_one, is_size_node, is_symbolic, same_size

aten = torch.ops.aten
prims = torch.ops.prims


class _Marker(str):
    pass


SUM = _Marker("sum")
BLOCKED = _Marker("blocked")
DimTarget = int | str | None
ArgKey = int | tuple[int, int]  # argument position, or (position, index) inside a list argument
DimMap = dict[ArgKey, list[DimTarget]]  # tensor argument -> target of each of its dims

# How an op's output depends on a tangent that reaches it through its tensor arguments: the
# loss form (loss_form.py) scales gradients computed with tangent 1, exact only if every op
# between the tangent and the gradients is linear in it.
EACH = "each"  # linear in each tensor argument with the others fixed (mul, mm, unary linear ops)
FIRST = "first"  # linear in the first tensor argument; the others must not carry the tangent
SUM_OF = "sum"  # linear in all tensor arguments together (add, sub, cat, where): each float
# argument carries the tangent or is a constant zero


@dataclasses.dataclass(frozen=True)
class OpFacts:
    """What mst knows about one ATen op: the one record every pass reads (no pass keeps a
    list of ops of its own). An op without a record has no facts: no token rule, so it ends
    any region, and no other property is assumed of it."""

    # --- the token rule: how the tokens of its arguments map to its output's
    dims: Callable[[Node], DimMap] | None = None  # the dim map; None: no token rule...
    view: bool = False  # ...unless a reshape: tokens follow the element count (view_token_dims)
    token_arg: int | None = None  # an amplifier (matmul): the position of its token input
    reduces: bool = False  # reduces each token's wide values (softmax's max and sum, gather)
    aliases: bool = False  # the output may be a view of an argument (a chunk subgraph copies
    # such an output before returning it)
    squeezes: bool = False  # removes size-1 dims (a chunk names the ones the whole removes)
    # --- how its output depends on its arguments
    linear: str | None = None  # EACH / FIRST / SUM_OF: how it is linear in its float tensor
    # arguments (the loss form scales by the tangent; zeros propagate the same way)
    adds: bool = False  # an elementwise sum or difference of its tensor arguments
    keeps_order: bool = False  # a one-element-per-token value read through it keeps its order
    converts: bool = False  # a dtype conversion (a mask becomes 0/1 numbers)
    mask: str | None = None  # compares to a constant: "kept" (x != v), "ignored" (x == v);
    # or "negates" a mask
    fill_arg: int | None = None  # a factory filled with the number at this position
    routes: bool = False  # picks the top entries per row (an MoE router's experts)
    mixes_tokens: bool = False  # attention: every output token reads many input tokens
    attention: str | None = None  # "forward": q, k, v its arguments 0-2, its output its
    # result 0; "backward": q, k, v its arguments 1-3, the forward's output at `out_arg`
    out_arg: int | None = None
    causal_arg: int | None = None  # attention's is_causal flag, where it takes a mask at...
    mask_arg: int | str | None = None  # ...this position or keyword
    per_key_mask: bool = False  # applies is_causal and a per-key mask [B, 1, 1, S] together
    # exactly as the one combined mask (checked on the CPU kernel, forward and backward,
    # fully masked rows included)
    flops: Callable[[Node], int] | None = None  # a matmul's multiply-adds x 2
    # --- its size arguments: rewritten for each chunk, where the sizes follow the tokens
    shape_arg: int | None = None  # a shape (views, expand, factories)
    factory: bool = False  # makes a new tensor of the shape at `shape_arg`
    expands: bool = False  # broadcasts its argument to the shape at `shape_arg`
    strides_arg: int | None = None  # the strides of a strided factory
    length_arg: int | None = None  # a 1-D length (iota, arange)
    dim_arg: int | None = None  # the dim it takes part of (slice, split, select, narrow)

    @property
    def has_rule(self) -> bool:
        return self.dims is not None or self.view


Rule = OpFacts  # a record with a token rule, as `rule_of` returns it


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


def _arg(node: Node, pos: int, name: str, default: object = None) -> object:
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


# --- dim maps -----------------------------------------------------------------------------


def pointwise(node: Node) -> DimMap:
    """Broadcasting elementwise op: dims align from the right; a size-1 dim broadcasts."""
    out = shape_of(node)
    maps: DimMap = {}
    for pos, arg in tensor_args(node):
        shape = shape_of(arg)
        offset = len(out) - len(shape)
        maps[pos] = [offset + i if same_size(size, out[offset + i]) else None
                     for i, size in enumerate(shape)]
    return maps


def _reduction(kind: DimTarget) -> Callable[[Node], DimMap]:
    def rule(node: Node) -> DimMap:
        rank = len(shape_of(node.args[0]))
        dims = _arg(node, 1, "dim")
        keepdim = _arg(node, 2, "keepdim", False)
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
    # A token contraction would add the bias once per chunk: not allowed.
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


def _position_by_position(node: Node, arg: Node) -> list[DimTarget]:
    """Dims of `arg` lined up with the output's (same rank): a dim of the output's size maps
    through, a different size covers other positions (BLOCKED)."""
    out = shape_of(node)
    return [i if same_size(size, out[i]) else BLOCKED for i, size in enumerate(shape_of(arg))]


def gather(node: Node) -> DimMap:
    """out[..i..] = self[..index[..i..]..] along `dim`: the index maps through; self is read
    at data-dependent positions along `dim` (a table: whole, never tokens) and position by
    position along the others."""
    dim = node.args[1] % len(shape_of(node))
    table = _position_by_position(node, node.args[0])
    table[dim] = None
    return {0: table, 2: list(range(len(shape_of(node))))}


def scatter(node: Node) -> DimMap:
    """self with src (or a value) written at index along `dim`: tokens may pass along every
    other dim where index (and src) cover self position by position; never along `dim`."""
    dim = node.args[1] % len(shape_of(node))
    maps: DimMap = {}
    for pos, arg in tensor_args(node):
        targets = _position_by_position(node, arg)
        targets[dim] = BLOCKED
        maps[pos] = targets
    return maps


def _identity_except(rank: int, dim: int | None, mark: DimTarget = None) -> list[DimTarget]:
    return [d if d != dim else mark for d in range(rank)]


def slice_(node: Node) -> DimMap:
    """Slicing keeps a dim only where it takes all of it: a partial slice along a token dim
    would read other tokens' positions (BLOCKED)."""
    shape = shape_of(node.args[0])
    dim = _arg(node, 1, "dim", 0) % len(shape)
    whole = same_size(shape[dim], shape_of(node)[dim]) and _arg(node, 4, "step", 1) == 1
    return {0: _identity_except(len(shape), None if whole else dim, BLOCKED)}


def split(node: Node) -> DimMap:
    shape = shape_of(node.args[0])
    dim = _arg(node, 2, "dim", 0) % len(shape)
    return {0: _identity_except(len(shape), dim, BLOCKED)}


def cat(node: Node) -> DimMap:
    rank = len(shape_of(node))
    dim = _arg(node, 1, "dim", 0) % rank
    return {(0, j): _identity_except(rank, dim, BLOCKED) for j in range(len(node.args[0]))}


def getitem(node: Node) -> DimMap:
    """An output of a multi-output op (split): dims map one to one."""
    if not isinstance(node.args[0].meta.get("val"), (list, tuple)):
        return {}
    return {0: _identity_except(len(shape_of(node)), None)}


def unsqueeze(node: Node) -> DimMap:
    rank = len(shape_of(node))
    dim = node.args[1] % rank
    return {0: [d if d < dim else d + 1 for d in range(rank - 1)]}


def squeezed_dims(node: Node) -> list[int]:
    """The dims a squeeze removes: those asked for that have size 1 in the whole value. A
    chunk's leading token dims have size 1 too, so the chunk subgraph names them explicitly."""
    shape = shape_of(node.args[0])
    rank = len(shape)
    asked = _arg(node, 1, "dim")
    if asked is None:
        asked = range(rank)
    elif isinstance(asked, int):
        asked = [asked]
    return sorted({d % rank for d in asked if is_one(shape[d % rank])})


def squeeze(node: Node) -> DimMap:
    removed = set(squeezed_dims(node))
    targets: list[DimTarget] = []
    out_dim = 0
    for d in range(len(shape_of(node.args[0]))):
        if d in removed:
            targets.append(None)
        else:
            targets.append(out_dim)
            out_dim += 1
    return {0: targets}


def view_as_complex(node: Node) -> DimMap:
    """[..., n, 2] real -> [..., n] complex: the pairs' dim goes, the others map through."""
    rank = len(shape_of(node.args[0]))
    return {0: [*range(rank - 1), None]}


def view_as_real(node: Node) -> DimMap:
    """[..., n] complex -> [..., n, 2] real: every dim maps through."""
    return {0: list(range(len(shape_of(node.args[0]))))}


def repeat(node: Node) -> DimMap:
    """Tiling: a dim repeated once maps through; a dim repeated more reads every position
    again (BLOCKED). Extra leading repeats add output dims."""
    reps = list(node.args[1])
    rank = len(shape_of(node.args[0]))
    offset = len(reps) - rank
    return {0: [d + offset if reps[d + offset] == 1 else BLOCKED for d in range(rank)]}


def expand(node: Node) -> DimMap:
    return {0: pointwise(node)[0]}


def factory(node: Node) -> DimMap:
    return {}


# --- matmul FLOPs -----------------------------------------------------------------------


def mm_flops(node: Node) -> int:
    """2 * m * k * n of `mm` (and of a grouped matmul of MoE experts: each of the m rows
    [m, k] times its expert's [k, n])."""
    rows = math.prod(hint(size) for size in shape_of(node.args[0]))  # m * k
    return 2 * rows * hint(shape_of(node.args[1])[-1])


def bmm_flops(node: Node, first: int = 0) -> int:
    """2 * b * m * k * n of `bmm` (of `baddbmm`, whose batches are its arguments 1 and 2)."""
    (b, m, k), (_, _, n) = (shape_of(a) for a in node.args[first:first + 2])
    return 2 * hint(b) * hint(m) * hint(k) * hint(n)


# --- the table ----------------------------------------------------------------------------

POINTWISE_LINEAR_EACH = [aten.mul.Tensor, aten.mul.Scalar, aten.neg.default]
POINTWISE_LINEAR_SUM = [aten.where.self]
POINTWISE_LINEAR_FIRST = [
    aten.div.Tensor, aten.div.Scalar, aten.threshold_backward.default,
    aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
    aten.tanh_backward.default,
]
POINTWISE_OTHER = [
    aten.abs.default, aten.add.Scalar, aten.sub.Scalar, aten.exp.default, aten.expm1.default,
    aten.log.default, aten.log1p.default, aten.sigmoid.default, aten.tanh.default,
    aten.erf.default, aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.sqrt.default, aten.rsqrt.default,
    aten.reciprocal.default, aten.sign.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.maximum.default, aten.minimum.default,
    aten.ne.Tensor, aten.eq.Tensor, aten.gt.Scalar, aten.gt.Tensor,
    aten.lt.Scalar, aten.lt.Tensor, aten.ge.Scalar, aten.ge.Tensor, aten.le.Scalar,
    aten.le.Tensor, aten.logical_and.default, aten.logical_or.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.fill.Scalar, aten.lerp.Scalar, aten.square.default,
    aten.sin.default, aten.cos.default, aten.floor.default, aten.round.default,
    aten.exp2.default,
]
# views through which a value with one element per token keeps the tokens' order
ORDER_KEEPING = [aten.view.default, aten.reshape.default, aten._unsafe_view.default]
# attention ops, by name (some exist only in some builds): forwards, and backwards with the
# position of the forward's output among their arguments; where they take a mask, the
# positions of is_causal and of the mask
_FORWARD = {"mixes_tokens": True, "attention": "forward"}
_BACKWARD = {"mixes_tokens": True, "attention": "backward"}
ATTENTION = {
    "aten._scaled_dot_product_flash_attention_for_cpu.default": OpFacts(
        **_FORWARD, causal_arg=4, mask_arg="attn_mask", per_key_mask=True),
    "aten._scaled_dot_product_flash_attention.default": OpFacts(**_FORWARD),
    "aten._scaled_dot_product_efficient_attention.default": OpFacts(
        **_FORWARD, causal_arg=6, mask_arg=3),
    "aten._scaled_dot_product_cudnn_attention.default": OpFacts(**_FORWARD),
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": OpFacts(
        **_BACKWARD, out_arg=4, causal_arg=7, mask_arg="attn_mask"),
    "aten._scaled_dot_product_flash_attention_backward.default": OpFacts(**_BACKWARD, out_arg=4),
    "aten._scaled_dot_product_efficient_attention_backward.default": OpFacts(
        **_BACKWARD, out_arg=5, causal_arg=11, mask_arg=4),
    "aten._scaled_dot_product_cudnn_attention_backward.default": OpFacts(**_BACKWARD, out_arg=4),
}
# other ops without a token rule known to mix tokens (attention's kernels), by name
TOKEN_MIXERS = [
    "aten._flash_attention_forward.default", "aten._flash_attention_backward.default",
    "aten._efficient_attention_forward.default", "aten._efficient_attention_backward.default",
    "flex_attention", "flex_attention_backward",
]
# grouped matmuls of MoE experts, by name (transformers registers its op when imported):
# input [m, k] sorted by expert, weights [experts, k, n]
GROUPED_MATMULS = ["aten._grouped_mm.default", "transformers.grouped_mm_fallback.default"]

OPS: dict[object, OpFacts] = {
    **{op: OpFacts(pointwise, linear=EACH) for op in POINTWISE_LINEAR_EACH},
    **{op: OpFacts(pointwise, linear=SUM_OF) for op in POINTWISE_LINEAR_SUM},
    **{op: OpFacts(pointwise, linear=FIRST) for op in POINTWISE_LINEAR_FIRST},
    **{op: OpFacts(pointwise) for op in POINTWISE_OTHER},
    aten.add.Tensor: OpFacts(pointwise, linear=SUM_OF, adds=True),
    aten.sub.Tensor: OpFacts(pointwise, linear=SUM_OF, adds=True),
    aten.ne.Scalar: OpFacts(pointwise, mask="kept"),
    aten.eq.Scalar: OpFacts(pointwise, mask="ignored"),
    aten.logical_not.default: OpFacts(pointwise, mask="negates"),
    aten.bitwise_not.default: OpFacts(pointwise, mask="negates"),
    aten._to_copy.default: OpFacts(pointwise, linear=EACH, converts=True, keeps_order=True),
    prims.convert_element_type.default: OpFacts(pointwise, linear=EACH, converts=True,
                                                keeps_order=True),
    aten.clone.default: OpFacts(pointwise, linear=EACH, keeps_order=True),
    aten.alias.default: OpFacts(pointwise, linear=EACH, aliases=True, keeps_order=True),
    aten.mm.default: OpFacts(mm, token_arg=0, linear=EACH, flops=mm_flops),
    aten.addmm.default: OpFacts(addmm, token_arg=1),
    aten.bmm.default: OpFacts(bmm, linear=EACH, flops=bmm_flops),
    aten.baddbmm.default: OpFacts(flops=lambda node: bmm_flops(node, first=1)),
    aten.sum.dim_IntList: OpFacts(_reduction(SUM), reduces=True, linear=EACH),
    aten.sum.default: OpFacts(sum_all, reduces=True, linear=EACH),
    aten.amax.default: OpFacts(_reduction(None), reduces=True),
    aten.amin.default: OpFacts(_reduction(None), reduces=True),
    # a mean over tokens would divide by the chunk's count: tokens may not be reduced
    aten.mean.dim: OpFacts(_reduction(None), reduces=True, linear=EACH),
    aten.permute.default: OpFacts(permute, linear=EACH, aliases=True),
    aten.transpose.int: OpFacts(transpose, linear=EACH, aliases=True),
    aten.gather.default: OpFacts(gather, reduces=True, linear=EACH),
    aten.scatter.value: OpFacts(scatter),
    aten.scatter.src: OpFacts(scatter, linear=SUM_OF),
    aten.unsqueeze.default: OpFacts(unsqueeze, linear=EACH, aliases=True, keeps_order=True),
    **{op: OpFacts(squeeze, linear=EACH, aliases=True, squeezes=True, keeps_order=True)
       for op in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)},
    aten.expand.default: OpFacts(expand, shape_arg=1, expands=True, linear=EACH, aliases=True),
    aten.repeat.default: OpFacts(repeat, linear=EACH),
    aten.view_as_complex.default: OpFacts(view_as_complex, linear=EACH, aliases=True),
    aten.view_as_real.default: OpFacts(view_as_real, linear=EACH, aliases=True),
    **{op: OpFacts(view=True, shape_arg=1, linear=EACH, aliases=True, keeps_order=True)
       for op in ORDER_KEEPING},
    aten.slice.Tensor: OpFacts(slice_, dim_arg=1, linear=EACH, aliases=True),
    aten.split.Tensor: OpFacts(split, dim_arg=2, linear=EACH, aliases=True),
    aten.split_with_sizes.default: OpFacts(split, dim_arg=2, linear=EACH, aliases=True),
    aten.select.int: OpFacts(dim_arg=1),
    aten.narrow.default: OpFacts(dim_arg=1),
    aten.cat.default: OpFacts(cat, linear=SUM_OF),
    operator.getitem: OpFacts(getitem, linear=EACH, aliases=True),
    aten.full.default: OpFacts(factory, shape_arg=0, factory=True, fill_arg=1),
    aten.zeros.default: OpFacts(factory, shape_arg=0, factory=True),
    aten.ones.default: OpFacts(factory, shape_arg=0, factory=True),
    aten.empty.memory_format: OpFacts(factory, shape_arg=0, factory=True),
    aten.scalar_tensor.default: OpFacts(fill_arg=0),
    aten.empty_strided.default: OpFacts(shape_arg=0, factory=True, strides_arg=1),
    **{op: OpFacts(shape_arg=1, factory=True) for op in (
        aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
        aten.new_ones.default)},
    aten.new_empty_strided.default: OpFacts(shape_arg=1, factory=True, strides_arg=2),
    prims.iota.default: OpFacts(length_arg=0),
    aten.arange.default: OpFacts(length_arg=0),
    **{op: OpFacts(routes=True) for op in (aten.topk.default, aten.max.dim, aten.argmax.default)},
    **{name: OpFacts(mixes_tokens=True) for name in TOKEN_MIXERS},
    **ATTENTION,
    **{name: OpFacts(flops=mm_flops) for name in GROUPED_MATMULS},
}
NO_FACTS = OpFacts()


def facts_of(node: Node) -> OpFacts:
    """The record of `node`'s op (by op, or by name for ops some builds lack); NO_FACTS for
    an op mst knows nothing of, or a node that is no op."""
    if node.op != "call_function":
        return NO_FACTS
    return OPS.get(node.target) or OPS.get(str(node.target)) or NO_FACTS


def mixes_tokens(node: Node) -> bool:
    return facts_of(node).mixes_tokens


def matmul_flops(node: Node) -> int:
    """2 * m * k * n of a matmul node (at the compiled length); 0 for any other node."""
    flops = facts_of(node).flops
    return flops(node) if flops is not None else 0


def zero_where(node: Node, is_zero: Callable[[object], bool]) -> bool:
    """Whether `node`'s output is zero wherever (on the rows where) its arguments are, by
    how it is linear in its float tensor arguments: in each of them (a product, a matmul, a
    view), zero where any is; in the first one, zero where it is; in all of them together (a
    sum), zero where every argument, tensor or number, is. `is_zero` answers for an argument
    (a node, or a number)."""
    facts = facts_of(node)
    floats = [a for _, a in tensor_args(node) if _is_float(a)]
    if facts.linear == EACH:
        return any(is_zero(a) for a in floats)
    if facts.linear == FIRST:
        return isinstance(node.args[0], Node) and is_zero(node.args[0])
    if facts.linear == SUM_OF:  # a number added (x + 1) is a term too
        terms = [a for a in node.args[:2] if facts.adds and isinstance(a, (int, float))]
        return bool(floats) and all(is_zero(a) for a in [*floats, *terms])
    return False


def _is_float(node: Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[0] if val else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def rule_of(node: Node) -> OpFacts | None:
    """The facts of `node`'s op if they include a token rule (the op's own, or one a
    declaration gives it), else None."""
    if node.op != "call_function" or "val" not in node.meta:
        return None
    facts = facts_of(node)
    if facts.has_rule:
        return facts
    declaration = declared_op(node.target)
    if declaration is not None and _declaration_problem(node, declaration) is None:
        return _declared_rule(node, declaration)
    return None


def declared_op_problem(node: Node) -> str | None:
    """Why a node of an op declared token-wise (mst_compile.token_wise) cannot follow its
    declaration: a declared token dim its output or a token argument does not have."""
    declaration = declared_op(node.target)
    return None if declaration is None else _declaration_problem(node, declaration)


def _declaration_problem(node: Node, declaration: TokenWise) -> str | None:
    out = shape_of(node)
    dims = declaration.token_dims(len(out))
    shapes = [("its output", out)] + [
        (f"argument {pos} ({arg.name})", shape_of(arg)) for pos, arg in _token_args(node, declaration)
    ]
    for what, shape in shapes:
        if not dims or max(dims) >= len(shape) or not all(same_size(shape[d], out[d]) for d in dims):
            return (f"{node.target} ({node.name}) is declared token-wise along dims "
                    f"{dims}, but {what} has shape {shape} (output {out})")
    return None


def _token_args(node: Node, declaration: TokenWise) -> list[tuple[ArgKey, Node]]:
    return [(pos, arg) for pos, arg in tensor_args(node)
            if declaration.args is None or pos in declaration.args]


def _declared_rule(node: Node, declaration: TokenWise) -> OpFacts:
    """The token rule of a declared op: its token arguments' `dims` map to the same output
    dims, the other arguments are read whole (Replicated)."""
    token_args = _token_args(node, declaration)
    token_dims = declaration.token_dims(len(shape_of(node)))

    def dims(node: Node) -> DimMap:
        maps: DimMap = {pos: [None] * len(shape_of(arg)) for pos, arg in tensor_args(node)}
        for pos, _ in token_args:
            for d in token_dims:
                maps[pos][d] = d
        return maps

    first = token_args[0][1] if token_args else None
    seeds = (token_dims == (0,) and first is not None and len(shape_of(first)) == 2
             and len(shape_of(node)) == 2 and isinstance(token_args[0][0], int))
    returns = node.target._schema.returns
    aliases = bool(returns and returns[0].alias_info)
    return OpFacts(dims, token_arg=token_args[0][0] if seeds else None, aliases=aliases)


def has_rule(node: Node) -> bool:
    return rule_of(node) is not None


def rule_name(node: Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


# --- derivations --------------------------------------------------------------------------


def output_layout(node: Node, arg: Node, arg_layout: Layout, tokens: int) -> Layout | None:
    """The layout of `node`'s output given the layout of its argument `arg` (the other
    arguments are checked by `argument_layouts`)."""
    rule = rule_of(node)
    if not isinstance(arg_layout, Chunked) or rule is None:
        return None
    if rule.view:
        dims = view_token_dims(shape_of(arg), arg_layout, shape_of(node))
        return None if dims is None else make_chunked(dims, shape_of(node), tokens)
    maps = rule.dims(node)
    positions = [p for p, a in tensor_args(node) if a is arg and p in maps]
    if not positions:
        return None
    layouts = set()
    for pos in positions:
        targets = [maps[pos][d] for d in arg_layout.dims]
        if all(t is SUM for t in targets):
            layouts.add(SUMMED)
        elif all(isinstance(t, int) for t in targets):
            layouts.add(make_chunked(targets, shape_of(node), tokens))
        else:
            return None
    return layouts.pop() if len(layouts) == 1 else None


def argument_layouts(
    node: Node, out_layout: Layout, tokens: int, known: Mapping[Node, Layout] | None = None
) -> dict[ArgKey, Layout] | None:
    """The layout of every tensor argument of `node` given its output layout; None if some
    argument cannot be given one (its tokens would be partly broadcast, read at other
    positions, added once per chunk, ...). `known`: layouts arguments already have, which
    settle which summed dims carry the tokens when more dims than those are summed."""
    rule = rule_of(node)
    if rule is None:
        return None
    if rule.view:
        if not isinstance(out_layout, Chunked):
            return None
        src = node.args[0]
        dims = view_token_dims(shape_of(node), out_layout, shape_of(src))
        layout = None if dims is None else make_chunked(dims, shape_of(src), tokens)
        return None if layout is None else {0: layout}
    maps = rule.dims(node)
    result: dict[ArgKey, Layout] = {}
    for pos, arg in tensor_args(node):
        if pos not in maps:
            return None
        layout = _argument_layout(
            maps[pos], shape_of(arg), out_layout, tokens, (known or {}).get(arg)
        )
        if layout is None:
            return None
        result[pos] = layout
    return result


def _argument_layout(
    targets: list[DimTarget], shape: list[int], out_layout: Layout, tokens: int,
    known: Layout | None,
) -> Layout | None:
    if out_layout is SUMMED:
        # Every argument must carry all tokens on summed dims: one that does not would be
        # counted once per chunk (an addmm's bias). A sum does not depend on the order.
        summed = [d for d, t in enumerate(targets) if t is SUM and above_one(shape[d])]
        if isinstance(known, Chunked) and set(known.dims) <= set(summed):
            return known
        carrying = [
            dims for k in range(1, len(summed) + 1) for dims in itertools.combinations(summed, k)
            if same_size(math.prod(shape[d] for d in dims), tokens)
        ]
        return make_chunked(carrying[0], shape, tokens) if len(carrying) == 1 else None
    if not isinstance(out_layout, Chunked):
        return None
    dims = []
    for token_dim in out_layout.dims:
        if token_dim < len(targets) and targets[token_dim] is BLOCKED:
            return None
        found = [d for d, t in enumerate(targets) if t == token_dim and isinstance(t, int)]
        if len(found) > 1:
            return None
        dims += found
    if not dims:
        return REPLICATED
    if len(dims) != len(out_layout.dims):
        return None  # constant along some token dims only: partly broadcast
    return make_chunked(dims, shape, tokens)


def per_token_numel(node: Node, layout: Layout, tokens: int) -> int:
    """Elements per token of a Chunked or Scaled value (a number: its other dims are)."""
    if not (isinstance(layout, Chunked) or layout is SCALED):
        return 0
    per_token = numel_of(node) // tokens
    # a value whose size does not follow the token count (a Scaled block's weights) has none
    return 0 if is_symbolic(per_token) else int(per_token)


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
