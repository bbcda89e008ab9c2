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

import sympy
import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .region import CannotChunk
from .rules import facts_of
from .symbolic import (
    Size,
    SizeArgs,
    above_one,
    is_one,
    is_size_node,
    is_symbolic,
    same_shape,
    same_size,
)

aten = torch.ops.aten

def _is_forward(node: Node) -> bool:
    """A forward op of the block (a backward one carries `fwd_nn_module_stack` instead)."""
    return "nn_module_stack" in node.meta


def _chunk_shapes(pairs: list[tuple[list[Size], list[Size]]], whole: list[Size]) -> list[list[Size]]:
    """The distinct chunk shapes of the values of whole shape `whole`."""
    found: list[list[Size]] = []
    for shape, chunk in pairs:
        if same_shape(shape, whole) and not any(same_shape(chunk, f) for f in found):
            found.append(chunk)
    return found


def token_multiple(size: Size | float, tokens: Size) -> int | None:
    """k if a size is k times the token count (T * k, k >= 1), else None. With a symbolic
    count, only a size that is provably such a multiple: a number in the graph is not."""
    if not is_symbolic(tokens):
        if is_symbolic(size) or not isinstance(size, numbers.Number) or isinstance(size, bool):
            return None
        return int(size // tokens) if size >= tokens and size % tokens == 0 else None
    if not is_symbolic(size):
        return None
    ratio = sympy.simplify(size.node.expr / tokens.node.expr)
    return int(ratio) if ratio.is_Integer and ratio >= 1 else None


class Shapes:
    """The whole and chunk shapes of the block's values copied so far, for factories."""

    def __init__(self, tokens: Size, length: Size):
        self.tokens, self.length = tokens, length
        self.known: list[tuple[list[Size], list[Size]]] = []
        # the autograd sequence number of a forward op -> the shapes of its values: a
        # backward factory with the same number makes the gradient of one of them
        self.by_op: dict[int, list[tuple[list[Size], list[Size]]]] = {}

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

    def multiple(self, size: Size | float) -> int | None:
        return token_multiple(size, self.tokens)

    def may_hold_tokens(self, size: Size | float) -> bool:
        """Whether a size is a multiple of the token count (T * k)."""
        return self.multiple(size) is not None

    def twin(self, whole: list[Size]) -> list[Size] | None:
        """The chunk shape of the block's values of this whole shape, if they all agree."""
        twins = _chunk_shapes(self.known, whole)
        return list(twins[0]) if len(twins) == 1 else None

    def factory(self, whole: list[Size], node: Node) -> list[Size]:
        related = [] if _is_forward(node) else self.by_op.get(node.meta.get("seq_nr"), [])
        twins = _chunk_shapes(related, whole)
        if len(twins) != 1:
            twins = _chunk_shapes(self.known, whole)
            if len(twins) > 1:
                # a value of the block that follows the chunk, and one of the same shape by
                # coincidence that does not (a weight [d, E] when there are d tokens): the
                # one that follows the chunk on dims holding the tokens is the factory's
                scaled = [t for t in twins if not same_shape(t, whole)]
                if len(scaled) == 1 and all(
                        same_size(a, b) or self.multiple(b) is not None
                        for a, b in zip(scaled[0], whole)):
                    twins = scaled
                else:
                    raise CannotChunk(f"{_name(node)} makes a {whole} tensor, and values of "
                                      "that shape in the block change differently with the "
                                      "chunk: ambiguous")
        if twins:
            return list(twins[0])
        scaled = {d: k for d, size in enumerate(whole) if (k := self.multiple(size)) is not None}
        if len(scaled) > 1:
            raise CannotChunk(f"{_name(node)} makes a {whole} tensor with several dims that "
                              f"are multiples of the token count {self.tokens}: ambiguous")
        out = list(whole)
        for d, k in scaled.items():
            out[d] = k * self.length
        return out


def chunk_args(node: Node, new: Node, shapes: Shapes, sizes: SizeArgs) -> None:
    """Rewrite the sizes of `new`, the chunk copy of `node`, in place: numbers, and with
    dynamic shapes the size nodes `node` reads (emitted into the chunk graph by `sizes`)."""
    facts, args = facts_of(node), list(new.args)
    tokens, length = shapes.tokens, shapes.length
    values = _values(node.args)  # the whole graph's arguments, sizes as their values
    if facts.view:
        args[facts.shape_arg] = sizes.shape(_view_shape(
            _shape(node.args[0]), _shape(new.args[0]), _shape(node), tokens, length, node))
    elif facts.expands:
        args[facts.shape_arg] = sizes.shape(
            _expand_shape(node, values[facts.shape_arg], _shape(new.args[0]), shapes))
    elif facts.factory:
        pos = facts.shape_arg
        shape = shapes.factory(list(values[pos]), node)
        args[pos] = sizes.shape(shape)
        if facts.strides_arg is not None:
            args[facts.strides_arg] = sizes.shape(
                _contiguous_strides(shape, list(values[facts.strides_arg]), node))
    elif facts.length_arg is not None:
        pos = facts.length_arg
        args[pos] = sizes.arg(shapes.factory([values[pos]], node)[0])
        _no_token_sizes(node, (values[:pos], values[pos + 1:], node.kwargs), shapes)
    elif facts.dim_arg is not None:
        _check_dim_slice(node, new, args, values, sizes)
    else:
        _no_token_sizes(node, (values, node.kwargs), shapes)
    new.args = tuple(args)


def _no_token_sizes(node: Node, values: object, shapes: Shapes) -> None:
    """Refuses an op that reads a size (a number, or a size node's value) that may stand for
    the tokens, or any symbolic size: mst would not know how to rewrite it for a chunk."""
    for value in _sizes(values):
        if shapes.may_hold_tokens(value):
            raise CannotChunk(f"{_name(node)} reads the size {value}, a multiple of the "
                              f"token count {shapes.tokens}: it may stand for the tokens")
        if is_symbolic(value):
            raise CannotChunk(f"{_name(node)} reads the symbolic size {value}")


def _values(args: object) -> object:
    """`args` with every size node replaced by its value."""
    if isinstance(args, (list, tuple)):
        return type(args)(_values(a) for a in args)
    if isinstance(args, Node) and is_size_node(args):
        return args.meta["val"]
    return args


def _view_shape(
    whole_in: list[Size], chunk_in: list[Size], whole_out: list[Size], tokens: Size,
    length: Size, node: Node,
) -> list[Size]:
    out = list(whole_out)
    for ins, outs in _view_groups(whole_in, whole_out, node):
        before = math.prod(whole_in[i] for i in ins)
        after = math.prod(chunk_in[i] for i in ins)
        if same_size(before, after):
            continue
        if not same_size(before * length, after * tokens) or token_multiple(before, tokens) is None:
            raise CannotChunk(f"{_name(node)} views {whole_in} as {whole_out}, regrouping only "
                              "part of the tokens")
        first = next(i for i in ins if not same_size(whole_in[i], chunk_in[i]))
        if not all(is_one(whole_in[i]) for i in ins[: ins.index(first)]):
            raise CannotChunk(f"{_name(node)} views {whole_in} as {whole_out}: the tokens are "
                              "not the leading dims of the dims it regroups")
        if len(outs) == 1:  # merged into one dim: T * k values
            lead, factor = outs, token_multiple(whole_out[outs[0]], tokens)
        else:  # split: the leading dims hold exactly the T tokens, the rest the factor
            product, lead = 1, None
            for k, o in enumerate(outs):
                product *= whole_out[o]
                if same_size(product, tokens):
                    lead = outs[: k + 1]
                    break
            factor = 1
        token_dims = [o for o in (lead or []) if above_one(whole_out[o])]
        if not token_dims or factor is None:
            raise CannotChunk(f"{_name(node)} views {whole_in} as {whole_out}: its leading dims "
                              f"do not hold the {tokens} tokens")
        for o in token_dims[:-1]:
            out[o] = 1
        out[token_dims[-1]] = length * factor
    return out


def _view_groups(a: Sequence[Size], b: Sequence[Size], node: Node) -> list[tuple[list[int], list[int]]]:
    """The dims of `a` and `b` in groups of equal products, in order (a view's regrouping).
    Size-1 dims left over at the end are groups of their own (`[T * k] -> [T * k, 1]` keeps
    the tokens' group as it is)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ins, outs = [i], [j]
        pa, pb = a[i], b[j]
        i, j = i + 1, j + 1
        while not same_size(pa, pb):
            if statically_known_true(pa < pb) and i < len(a):
                ins.append(i)
                pa *= a[i]
                i += 1
            elif statically_known_true(pb < pa) and j < len(b):
                outs.append(j)
                pb *= b[j]
                j += 1
            else:
                raise CannotChunk(f"{_name(node)} views {list(a)} as {list(b)}: which dims it "
                                  "regroups is not known at every length")
        groups.append((ins, outs))
    groups.extend(([d], []) for d in range(i, len(a)))
    groups.extend(([], [d]) for d in range(j, len(b)))
    return groups


def _expand_shape(node: Node, asked: list[Size], chunk_in: list[Size], shapes: Shapes) -> list[Size]:
    """The chunk's sizes of an expand to `asked` (-1: keep the argument's size)."""
    whole_in, whole_out = _shape(node.args[0]), _shape(node)
    out = list(asked)
    twin = shapes.twin(whole_out)  # a value of the same shape: [B, S, d] broadcast from [d]
    broadcast = None
    offset = len(whole_out) - len(whole_in)
    for d in range(len(whole_out)):
        j = d - offset
        if j >= 0 and same_size(whole_in[j], whole_out[d]):
            out[d] = -1 if _is_minus_one(asked[d]) else chunk_in[j]
        elif twin is not None:
            out[d] = twin[d]
        elif shapes.may_hold_tokens(whole_out[d]):
            # a broadcast dim that may hold the tokens: sized like a factory's
            broadcast = broadcast or shapes.factory(whole_out, node)
            out[d] = broadcast[d]
        elif is_symbolic(whole_out[d]):
            raise CannotChunk(f"{_name(node)} broadcasts to the symbolic size {whole_out[d]}")
    return out


def _is_minus_one(size: Size) -> bool:
    return not is_symbolic(size) and size == -1


def _contiguous_strides(sizes: list[Size], whole_strides: list[Size], node: Node) -> list[Size]:
    if not same_shape(whole_strides, _contiguous_of(_shape(node))):
        raise CannotChunk(f"{_name(node)} makes a non-contiguous tensor")
    return _contiguous_of(sizes)


def _contiguous_of(shape: list[Size]) -> list[Size]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step = step * size if not is_one(size) and not same_size(size, 0) else step
    return strides[::-1]


def _check_dim_slice(node: Node, new: Node, args: list, values: tuple, sizes: SizeArgs) -> None:
    pos = facts_of(node).dim_arg
    source = node.args[0]
    rank = len(_shape(source))
    dim = (values[pos] if len(values) > pos else 0) % rank
    whole, chunk = _shape(source)[dim], _shape(new.args[0])[dim]
    if same_size(whole, chunk):
        if any(is_symbolic(v) for v in _sizes(values[1:])):
            raise CannotChunk(f"{_name(node)} reads a symbolic size")
        return
    if node.target is aten.slice.Tensor:
        start = values[2] if len(values) > 2 else 0
        end = values[3] if len(values) > 3 else None
        step = values[4] if len(values) > 4 else 1
        if ((start is None or same_size(start, 0))
                and (end is None or statically_known_true(end >= whole)) and step == 1):
            args[3:4] = [sizes.arg(chunk)] if len(args) > 3 else []
            return
    raise CannotChunk(f"{_name(node)} takes part of dim {dim}, whose size follows the chunk")


def _sizes(*values: object):
    """The numbers and symbolic sizes in nested arguments (bools and tensors left out)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _sizes(*value)
        elif isinstance(value, dict):
            yield from _sizes(*value.values())
        elif isinstance(value, torch.SymInt) or (
                isinstance(value, numbers.Number) and not isinstance(value, bool)):
            yield value


def _shape(node: Node) -> list[Size]:
    """The shape of a node's value: the whole one for a node of the graph, the chunk's for
    one of the chunk subgraph."""
    val = node.meta["val"]
    return list((val[0] if isinstance(val, (list, tuple)) else val).shape)


def _name(node: Node) -> str:
    return f"{node.target} ({node.name})"
