"""Choose how many mini-sequences each region runs in (DESIGN section 5)."""

from __future__ import annotations

import dataclasses
import math

from ..options import MstOptions
from ..report import POLICY
from .analysis import CannotChunk, Region, amplifier_input
from .rules import element_size


@dataclasses.dataclass
class ChunkPlan:
    region: Region
    chunks: int
    lengths: list[int]  # tokens per chunk; at most two distinct values (regular, tail)

    @property
    def chunk_len(self) -> int:
        return self.lengths[0]


def plan_chunks(region: Region, options: MstOptions) -> ChunkPlan:
    tokens = region.tokens
    total = region.bytes_per_token() * tokens
    if total < options.min_bytes:
        raise CannotChunk(
            f"intermediate is {total} bytes, below min_bytes={options.min_bytes}: too small to pay off",
            POLICY,
        )
    if options.chunks != "auto":
        chunks = int(options.chunks)
    elif options.memory_budget is not None:
        # The longest chunk that fits the budget (a rounded-up chunk must not exceed it).
        fits = max(1, options.memory_budget // region.bytes_per_token())
        chunks = math.ceil(tokens / fits)
    else:
        # One chunk's intermediates (all of them, not only the widest) about the size of the
        # region's input; measured: an MLP at I/d = 4 chunks peaked 60 MB higher than at 16.
        input_bytes = region.input_width * element_size(amplifier_input(region.seed))
        chunks = min(math.ceil(region.bytes_per_token() / input_bytes),
                     tokens // options.min_chunk_len)
    chunks = max(1, min(chunks, tokens))
    if chunks == 1:
        raise CannotChunk("the chunk count is 1: nothing to split", POLICY)
    length = math.ceil(tokens / chunks)
    lengths = [length] * (tokens // length)
    if tokens % length:
        lengths.append(tokens % length)
    return ChunkPlan(region, len(lengths), lengths)
