"""Choose how many mini-sequences each region runs in (DESIGN section 5)."""

from __future__ import annotations

import dataclasses
import math

from ..options import MstOptions
from ..report import POLICY
from .analysis import CannotChunk, Region
from .rules import per_token_numel


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
        widest = max(per_token_numel(n, region.layouts[n], tokens) for n in region.nodes)
        chunks = min(math.ceil(widest / region.input_width), tokens // options.min_chunk_len)
    chunks = max(1, min(chunks, tokens))
    if chunks == 1:
        raise CannotChunk("the chunk count is 1: nothing to split", POLICY)
    length = math.ceil(tokens / chunks)
    lengths = [length] * (tokens // length)
    if tokens % length:
        lengths.append(tokens % length)
    return ChunkPlan(region, len(lengths), lengths)
