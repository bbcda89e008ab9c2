"""Sizes inside a declared token-wise block, for one chunk (docs/design.md, "Declared
token-wise blocks").

Inside a block mst has no token rule for every op (routing sorts the tokens, experts run in
opaque kernels), so its values carry no Chunked layout: they are Scaled, their sizes follow
the chunk's. A static graph holds those sizes as numbers (`view(x, [8192, 256])`,
`iota(8192)`), written for all T tokens. `chunk_args` rewrites the numbers of one copied op
for a chunk of n tokens, from the shapes its arguments have in the chunk, and refuses
(CannotChunk) wherever the number it should write is not certain:

- views: the dims of each group of dims the view merges or splits keep their sizes, except
  in the group holding the tokens, which must lead it on both sides: merged into one dim of
  T * k values it becomes n * k ([T, k] -> [T * k] gives [n * k]); split, its leading dims
  holding exactly the T tokens become 1, ..., 1, n as in a Chunked layout and the others
  keep their sizes ([T * k] -> [T, k] gives [n, k]). Tokens behind another dim ([E, T],
  [2 * T] -> [2, T]) or only part of them in a group are refused.
- expand: an expanded dim takes its argument's chunk size; a broadcast dim takes the size
  of a value of the block with the same whole shape if all such values agree, else keeps
  its size unless it is a multiple of T (then it is sized like a factory's).
- factories (full, zeros, empty, iota, arange, new_*): a backward factory makes the gradient
  of a value of the forward op it comes from (the same autograd `seq_nr`): the value of
  that op with the same whole shape gives the chunk shape. Otherwise any value of the block
  with the same whole shape does, if all such values agree; otherwise the one dim that is a
  multiple of T scales (T * k -> n * k), and two such dims are refused as ambiguous.
- slice, split, select, narrow along a dim whose size follows the chunk: only a whole slice.
- any other op reading a number that is a multiple of T: refused (it may mean the tokens).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch.fx import Node

from .analysis import CannotChunk

aten = torch.ops.aten
prims = torch.ops.prims

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
FACTORIES = {  # op -> position of its size argument
    aten.full.default: 0, aten.zeros.default: 0, aten.ones.default: 0,
    aten.empty.memory_format: 0, aten.empty_strided.default: 0,
    aten.new_zeros.default: 1, aten.new_empty.default: 1, aten.new_full.default: 1,
    aten.new_ones.default: 1, aten.new_empty_strided.default: 1,
}
LENGTHS = {prims.iota.default: 0, aten.arange.default: 0}  # op -> position of a 1-D length
DIM_SLICES = {  # op -> position of its dim argument
    aten.slice.Tensor: 1, aten.split.Tensor: 2, aten.split_with_sizes.default: 2,
    aten.select.int: 1, aten.narrow.default: 1,
}


def _is_forward(node: Node) -> bool:
    """A forward op of the block (a backward one carries `fwd_nn_module_stack` instead)."""
    return "nn_module_stack" in node.meta


def _chunk_shapes(pairs: list[tuple[list[int], list[int]]], whole: list[int]) -> set[tuple[int, ...]]:
    return {tuple(chunk) for shape, chunk in pairs if shape == whole}


class Shapes:
    """The whole and chunk shapes of the block's values copied so far, for factories."""

    def __init__(self, tokens: int, length: int):
        self.tokens, self.length = tokens, length
        self.known: list[tuple[list[int], list[int]]] = []
        # the autograd sequence number of a forward op -> the shapes of its values: a
        # backward factory with the same number makes the gradient of one of them
        self.by_op: dict[int, list[tuple[list[int], list[int]]]] = {}

    def add(self, whole: object, chunk: object, seq_nr: int | None = None) -> None:
        if isinstance(whole, torch.Tensor) and isinstance(chunk, torch.Tensor):
            pair = (list(whole.shape), list(chunk.shape))
            self.known.append(pair)
            if seq_nr is not None:
                self.by_op.setdefault(seq_nr, []).append(pair)
        elif isinstance(whole, (list, tuple)) and isinstance(chunk, (list, tuple)):
            for w, c in zip(whole, chunk):
                self.add(w, c, seq_nr)

    def add_op(self, node: Node, new: Node) -> None:
        """`node`'s value and arguments, copied as `new` (values already computed)."""
        seq_nr = node.meta.get("seq_nr")
        self.add(node.meta["val"], new.meta["val"], seq_nr)
        if seq_nr is not None and _is_forward(node):
            for old, copy in zip(node.all_input_nodes, new.all_input_nodes):
                self.add(old.meta.get("val"), copy.meta.get("val"), seq_nr)

    def may_hold_tokens(self, size: float) -> bool:
        """Whether a number is a multiple of the token count (T * k)."""
        return size >= self.tokens and size % self.tokens == 0

    def twin(self, whole: list[int]) -> list[int] | None:
        """The chunk shape of the block's values of this whole shape, if they all agree."""
        twins = _chunk_shapes(self.known, whole)
        return list(twins.pop()) if len(twins) == 1 else None

    def factory(self, whole: list[int], node: Node) -> list[int]:
        related = [] if _is_forward(node) else self.by_op.get(node.meta.get("seq_nr"), [])
        twins = _chunk_shapes(related, whole)
        if len(twins) != 1:
            twins = _chunk_shapes(self.known, whole)
            if len(twins) > 1:
                raise CannotChunk(f"{_name(node)} makes a {whole} tensor, and values of that "
                                  "shape in the block change differently with the chunk: ambiguous")
        if twins:
            return list(twins.pop())
        scaled = [d for d, size in enumerate(whole) if self.may_hold_tokens(size)]
        if len(scaled) > 1:
            raise CannotChunk(f"{_name(node)} makes a {whole} tensor with several dims that "
                              f"are multiples of the token count {self.tokens}: ambiguous")
        out = list(whole)
        for d in scaled:
            out[d] = whole[d] // self.tokens * self.length
        return out


def chunk_args(node: Node, new: Node, shapes: Shapes) -> None:
    """Rewrite the size numbers of `new`, the chunk copy of `node`, in place."""
    target, args = node.target, list(new.args)
    tokens, length = shapes.tokens, shapes.length
    if target in VIEWS:
        args[1] = _view_shape(_shape(node.args[0]), _shape(new.args[0]), _shape(node), tokens, length, node)
    elif target is aten.expand.default:
        args[1] = _expand_shape(node, _shape(node.args[0]), _shape(new.args[0]), shapes)
    elif target in FACTORIES:
        pos = FACTORIES[target]
        args[pos] = shapes.factory(list(args[pos]), node)
        if target in (aten.empty_strided.default, aten.new_empty_strided.default):
            args[pos + 1] = _contiguous_strides(args[pos], list(node.args[pos + 1]), node)
    elif target in LENGTHS:
        pos = LENGTHS[target]
        args[pos] = shapes.factory([args[pos]], node)[0]
    elif target in DIM_SLICES:
        _check_dim_slice(node, new, args)
    else:
        for value in _numbers(node.args, node.kwargs):
            if shapes.may_hold_tokens(value):
                raise CannotChunk(f"{_name(node)} reads the number {value}, a multiple of the "
                                  f"token count {tokens}: it may stand for the tokens")
    new.args = tuple(args)


def _view_shape(
    whole_in: list[int], chunk_in: list[int], whole_out: list[int], tokens: int, length: int,
    node: Node,
) -> list[int]:
    out = list(whole_out)
    for ins, outs in _view_groups(whole_in, whole_out):
        before = math.prod(whole_in[i] for i in ins)
        after = math.prod(chunk_in[i] for i in ins)
        if before == after:
            continue
        if before * length != after * tokens or before % tokens:
            raise CannotChunk(f"{_name(node)} views {whole_in} as {whole_out}, regrouping only "
                              "part of the tokens")
        first = next(i for i in ins if whole_in[i] != chunk_in[i])
        if any(whole_in[i] != 1 for i in ins[: ins.index(first)]):
            raise CannotChunk(f"{_name(node)} views {whole_in} as {whole_out}: the tokens are "
                              "not the leading dims of the dims it regroups")
        if len(outs) == 1:  # merged into one dim: T * k values
            lead, factor = outs, whole_out[outs[0]] // tokens
        else:  # split: the leading dims hold exactly the T tokens, the rest the factor
            product, lead = 1, None
            for k, o in enumerate(outs):
                product *= whole_out[o]
                if product == tokens:
                    lead = outs[: k + 1]
                    break
            factor = 1
        token_dims = [o for o in (lead or []) if whole_out[o] > 1]
        if not token_dims:
            raise CannotChunk(f"{_name(node)} views {whole_in} as {whole_out}: its leading dims "
                              f"do not hold the {tokens} tokens")
        for o in token_dims[:-1]:
            out[o] = 1
        out[token_dims[-1]] = length * factor
    return out


def _view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The dims of `a` and `b` in groups of equal products, in order (a view's regrouping)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ins, outs = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(i)
                pa *= a[i]
                i += 1
            else:
                outs.append(j)
                pb *= b[j]
                j += 1
        groups.append((ins, outs))
    if groups:  # trailing size-1 dims
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    return groups


def _expand_shape(node: Node, whole_in: list[int], chunk_in: list[int], shapes: Shapes) -> list[int]:
    whole_out = _shape(node)
    out = list(node.args[1])
    twin = shapes.twin(whole_out)  # a value of the same shape: [B, S, d] broadcast from [d]
    broadcast = None
    offset = len(whole_out) - len(whole_in)
    for d in range(len(whole_out)):
        j = d - offset
        if j >= 0 and whole_in[j] == whole_out[d]:
            out[d] = chunk_in[j] if out[d] != -1 else -1
        elif twin is not None:
            out[d] = twin[d]
        elif shapes.may_hold_tokens(whole_out[d]):
            # a broadcast dim that may hold the tokens: sized like a factory's
            broadcast = broadcast or shapes.factory(whole_out, node)
            out[d] = broadcast[d]
    return out


def _contiguous_strides(sizes: list[int], whole_strides: list[int], node: Node) -> list[int]:
    if whole_strides != _contiguous_of(_shape(node)):
        raise CannotChunk(f"{_name(node)} makes a non-contiguous tensor")
    return _contiguous_of(sizes)


def _contiguous_of(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _check_dim_slice(node: Node, new: Node, args: list) -> None:
    pos = DIM_SLICES[node.target]
    source = node.args[0]
    rank = len(_shape(source))
    dim = (args[pos] if len(args) > pos else 0) % rank
    whole, chunk = _shape(source)[dim], _shape(new.args[0])[dim]
    if whole == chunk:
        return
    if node.target is aten.slice.Tensor:
        start = args[2] if len(args) > 2 else 0
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        if start in (0, None) and (end is None or end >= whole) and step == 1:
            args[3:4] = [chunk] if len(args) > 3 else []
            return
    raise CannotChunk(f"{_name(node)} takes part of dim {dim}, whose size follows the chunk")


def _numbers(*values: object):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _numbers(*value)
        elif isinstance(value, dict):
            yield from _numbers(*value.values())
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            yield value


def _shape(node: Node) -> list[int]:
    """The shape of a node's value: the whole one for a node of the graph, the chunk's for
    one of the chunk subgraph."""
    val = node.meta["val"]
    return list((val[0] if isinstance(val, (list, tuple)) else val).shape)


def _name(node: Node) -> str:
    return f"{node.target} ({node.name})"
