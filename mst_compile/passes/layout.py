"""Token-axis states of graph values (DESIGN section 3): Chunked, Replicated, Summed.

A Chunked value carries the region's N tokens on some of its dimensions: the dims whose
row-major flattening is the token index. Only dims of size > 1 are listed, so a [1, S, d]
tensor and an [S, d] tensor both carry their tokens on one dim. Inside a chunk subgraph the
value keeps its rank: the token dims become [1, ..., 1, n], so dim indices in the graph stay
valid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Chunked:
    dims: tuple[int, ...]

    def chunk_shape(self, shape: Sequence[int], length: int) -> list[int]:
        """The shape of one chunk of `length` tokens of a value of `shape`."""
        out = list(shape)
        for d in self.dims[:-1]:
            out[d] = 1
        out[self.dims[-1]] = length
        return out

    def merged_shape(self, shape: Sequence[int]) -> list[int]:
        """`shape` with the token dims merged into one (at the first token dim)."""
        first, last = self.dims[0], self.dims[-1]
        return list(shape[:first]) + [math.prod(shape[first : last + 1])] + list(shape[last + 1 :])


@dataclasses.dataclass(frozen=True)
class _Singleton:
    name: str

    def __repr__(self) -> str:
        return self.name


REPLICATED = _Singleton("Replicated")  # independent of the tokens: passed whole to every chunk
SUMMED = _Singleton("Summed")  # the full value is the sum over chunks

Layout = Chunked | _Singleton


def make_chunked(dims: Sequence[int], shape: Sequence[int], tokens: int) -> Layout | None:
    """A Chunked layout over `dims` of `shape`, if those dims carry exactly `tokens` tokens
    and are contiguous (size-1 dims may sit between them). Replicated if no dim is > 1."""
    dims = sorted(d for d in dims if shape[d] > 1)
    if not dims:
        return REPLICATED if tokens > 1 else None
    if math.prod(shape[d] for d in dims) != tokens:
        return None
    if any(shape[d] != 1 for d in range(dims[0], dims[-1] + 1) if d not in dims):
        return None
    return Chunked(tuple(dims))


def view_token_dims(
    src_shape: Sequence[int], src_dims: Sequence[int], dst_shape: Sequence[int]
) -> list[int] | None:
    """Where the token dims of a value of `src_shape` land after a view to `dst_shape`.

    The flattened token rows must form a block of whole dims in `dst_shape` with the same
    number of elements before them; otherwise the view mixes tokens with features."""
    first, last = src_dims[0], src_dims[-1]
    before = math.prod(src_shape[:first])
    through = before * math.prod(src_shape[first : last + 1])
    prefix = 1
    start = end = None
    for i, size in enumerate(dst_shape):
        if prefix == before and start is None:
            start = i
        prefix *= size
        if prefix == through and start is not None:
            end = i + 1
            break
    if start is None or end is None:
        return None
    return [d for d in range(start, end) if dst_shape[d] > 1]
