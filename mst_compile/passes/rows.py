"""A value's tokens as rows: the views between a value in its token layout and its merged
token rows (`[tokens, ...]`), which the chunk loops slice, gather, join and scatter."""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

from .layout import Chunked
from .rules import shape_of
from .symbolic import Size, SizeArgs

aten = torch.ops.aten


def rows_dim(x: Node, layout: Chunked) -> int:
    """The dim holding the tokens of `x` once merged by `token_rows`."""
    return layout.dims[0] if layout.sliceable(shape_of(x)) else 0


def index_rows(graph: Graph, rows: Node, dim: int, index: Node) -> Node:
    """rows.index_select(dim, index), in the ops Inductor lowers."""
    return graph.call_function(aten.index.Tensor, (rows, [None] * dim + [index]))


def token_rows(graph: Graph, sizes: SizeArgs, x: Node, layout: Chunked, tokens: Size) -> Node:
    """`x` with its tokens merged into one dim, sliced chunk by chunk (or passed whole to
    chunks that gather their rows): in place where the tokens are consecutive dims in order
    (a view), else token-major first (a copy of this region input)."""
    shape = shape_of(x)
    if layout.sliceable(shape):
        return graph.call_function(aten.reshape.default, (x, sizes.shape(layout.merged_shape(shape))))
    order = layout.token_major_order(len(shape))
    permuted = graph.call_function(aten.permute.default, (x, order))
    rest = [shape[d] for d in order[len(layout.dims):]]
    return graph.call_function(aten.reshape.default, (permuted, sizes.shape([tokens, *rest])))


def rows_shape(x: Node, layout: Chunked) -> list[Size]:
    """The shape of `token_rows(x)`."""
    shape = shape_of(x)
    if layout.sliceable(shape):
        return layout.merged_shape(shape)
    order = layout.token_major_order(len(shape))
    return [math.prod(shape[d] for d in layout.dims), *(shape[d] for d in order[len(layout.dims):])]


def chunk_from_rows(
    graph: Graph, sizes: SizeArgs, piece: Node, x: Node, layout: Chunked, length: Size
) -> Node:
    """`length` merged rows of `x` in the chunk layout: token dims 1, ..., 1, length."""
    shape = shape_of(x)
    chunk_shape = layout.chunk_shape(shape, length)
    if layout.sliceable(shape):
        return graph.call_function(aten.reshape.default, (piece, sizes.shape(chunk_shape)))
    order = layout.token_major_order(len(shape))
    major = graph.call_function(aten.reshape.default, (piece, sizes.shape([chunk_shape[d] for d in order])))
    return graph.call_function(aten.permute.default, (major, _inverse(order)))


def rows_of_chunk(
    graph: Graph, sizes: SizeArgs, chunk: Node, length: Size, out: Node, layout: Chunked
) -> Node:
    """A chunk of `out` (in the chunk layout, `length` tokens) as merged rows."""
    full = shape_of(out)
    if layout.sliceable(full):
        shape = _with(layout.merged_shape(full), layout.dims[0], length)
        return graph.call_function(aten.reshape.default, (chunk, sizes.shape(shape)))
    order = layout.token_major_order(len(full))
    rest = [full[d] for d in order[len(layout.dims):]]
    permuted = graph.call_function(aten.permute.default, (chunk, order))
    return graph.call_function(aten.reshape.default, (permuted, sizes.shape([length, *rest])))


def joined_rows(
    graph: Graph, sizes: SizeArgs, chunks: list[Node], lengths: list[Size], out: Node, layout: Chunked
) -> Node:
    """The chunks of `out` (in the chunk layout) joined into its merged rows."""
    pieces = [rows_of_chunk(graph, sizes, c, n, out, layout) for c, n in zip(chunks, lengths)]
    return graph.call_function(aten.cat.default, (pieces, rows_dim(out, layout)))


def value_from_rows(graph: Graph, sizes: SizeArgs, rows: Node, out: Node, layout: Chunked) -> Node:
    """The whole value from its merged rows, in the layout of `out`."""
    full = shape_of(out)
    if layout.sliceable(full):
        return graph.call_function(aten.reshape.default, (rows, sizes.shape(full)))
    order = layout.token_major_order(len(full))
    major = graph.call_function(aten.reshape.default, (rows, sizes.shape([full[d] for d in order])))
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
