"""Token-axis states of graph values (docs/design.md, "Layouts"): Chunked, Replicated, Summed.

A region's N tokens are numbered by the rows of its seed matmul's input. A Chunked value
carries them on some of its dims, listed in order from the most to the least significant:
token t sits at the position whose row-major flattening over `dims` *in that order* is t.
`[B, S, d]` fed by `x.view(B * S, d)` has dims (0, 1); its transpose `[S, B, d]` has dims
(1, 0): the same tokens, a different arrangement, and the two must never be confused. Only
dims of size > 1 are listed, so `[1, S, d]` and `[S, d]` both carry their tokens on one dim.

Inside a chunk subgraph a value keeps its rank: its token dims become 1, ..., 1, n (the most
significant ones 1, the least significant n), so every dim argument of the copied ops stays
valid and a chunk of n consecutive tokens needs no more than a reshape, whatever the order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from .symbolic import above_one, is_one, same_size


@dataclasses.dataclass(frozen=True)
class Chunked:
    dims: tuple[int, ...]  # token dims, most significant first

    def chunk_shape(self, shape: Sequence[int], length: int) -> list[int]:
        """The shape of one chunk of `length` tokens of a value of `shape`."""
        out = list(shape)
        for d in self.dims[:-1]:
            out[d] = 1
        out[self.dims[-1]] = length
        return out

    def sliceable(self, shape: Sequence[int]) -> bool:
        """Whether the tokens are one block of consecutive dims in row-major order (size-1
        dims may sit between): then a reshape merges them into one dim, sliced without a copy."""
        first, last = self.dims[0], self.dims[-1]
        ordered = list(self.dims) == sorted(self.dims)
        return ordered and all(
            is_one(shape[d]) for d in range(first, last + 1) if d not in self.dims
        )

    def merged_shape(self, shape: Sequence[int]) -> list[int]:
        """`shape` with the token dims merged into one (at the first token dim); only for a
        `sliceable` layout."""
        first, last = self.dims[0], self.dims[-1]
        return list(shape[:first]) + [math.prod(shape[first : last + 1])] + list(shape[last + 1 :])

    def token_major_order(self, rank: int) -> list[int]:
        """A permutation putting the token dims first, most significant first, then the
        other dims in order: after it, a reshape merges the tokens into dim 0."""
        return list(self.dims) + [d for d in range(rank) if d not in self.dims]


@dataclasses.dataclass(frozen=True)
class _Singleton:
    name: str

    def __repr__(self) -> str:
        return self.name


REPLICATED = _Singleton("Replicated")  # independent of the tokens: passed whole to every chunk
SUMMED = _Singleton("Summed")  # the full value is the sum over chunks
# inside a declared token-wise block: sizes follow the chunk's, positions are the block's own
# (sorted by expert, ...); never a region input or output (passes/blocks.py)
SCALED = _Singleton("Scaled")

Layout = Chunked | _Singleton


def make_chunked(dims: Sequence[int], shape: Sequence[int], tokens: int) -> Chunked | None:
    """A Chunked layout over `dims` of `shape` in the given order (most significant first),
    if those dims carry exactly `tokens` tokens; None otherwise (some tokens missing, or a
    dim listed twice)."""
    dims = [d for d in dims if above_one(shape[d])]
    if not dims or len(set(dims)) != len(dims):
        return None
    if not same_size(math.prod(shape[d] for d in dims), tokens):
        return None
    return Chunked(tuple(dims))


def view_token_dims(
    src_shape: Sequence[int], src: Chunked, dst_shape: Sequence[int]
) -> list[int] | None:
    """Where the token dims of a value of `src_shape` land after a view to `dst_shape`, most
    significant first. A view keeps row-major order, so the tokens must be one block of
    consecutive dims in order (`sliceable`), and become one in `dst_shape` with the same
    number of elements before them; otherwise the view mixes tokens with features or
    renumbers them."""
    if not src.sliceable(src_shape):
        return None
    first, last = src.dims[0], src.dims[-1]
    before = math.prod(src_shape[:first])
    through = before * math.prod(src_shape[first : last + 1])
    prefix = 1
    start = end = None
    for i, size in enumerate(dst_shape):
        if start is None and same_size(prefix, before):
            start = i
        prefix *= size
        if start is not None and same_size(prefix, through):
            end = i + 1
            break
    if start is None or end is None:
        return None
    return [d for d in range(start, end) if above_one(dst_shape[d])]
