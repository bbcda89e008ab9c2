"""Choose how many mini-sequences each region runs in (docs/design.md, "Planning")."""

from __future__ import annotations

import dataclasses
import math

from ..options import MstOptions
from ..report import POLICY
from .analysis import CannotChunk, Region
from .ignored_rows import IgnoredRows
from .rules import element_size, per_token_numel
from .symbolic import Size, from_data, guard, hint, is_symbolic


@dataclasses.dataclass
class ChunkPlan:
    region: Region
    chunks: int
    # tokens per chunk, at most two distinct values (regular, last); symbolic sizes when the
    # token count is (symbolic.py)
    lengths: list[Size]
    # a loss region run over the rows whose label is kept only (ignored_rows.py), or None
    ignored: IgnoredRows | None = None
    ignored_note: str = ""  # loss regions: the report's line on ignored rows

    @property
    def chunk_len(self) -> Size:
        return self.lengths[0]

    @property
    def dynamic(self) -> bool:
        return is_symbolic(self.region.tokens)

    def distinct_lengths(self) -> list[Size]:
        """The distinct chunk lengths, in order (one subgraph each)."""
        seen: dict[str, Size] = {}
        for length in self.lengths:
            seen.setdefault(str(length), length)
        return list(seen.values())


def plan_chunks(region: Region, options: MstOptions) -> ChunkPlan:
    tokens = region.tokens
    if is_symbolic(tokens) and not from_data(tokens):
        return _plan_symbolic(region, options)
    # a count read from the data (a `nonzero`'s) cannot be guarded: the chunk count is chosen
    # at the count expected of it (symbolic.hint) and serves every count, down to chunks of
    # no token
    at = hint(tokens)
    chunks = _chunk_count(region, options, at)
    if is_symbolic(tokens):
        length = tokens // chunks
        return ChunkPlan(region, chunks, [length] * (chunks - 1) + [tokens - (chunks - 1) * length])
    length = math.ceil(tokens / chunks)
    lengths = [length] * (tokens // length)
    if tokens % length:
        lengths.append(tokens % length)
    return ChunkPlan(region, len(lengths), lengths)


def _chunk_count(region: Region, options: MstOptions, tokens: int) -> int:
    """The chunk count of `region` over `tokens` tokens (a number)."""
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
        chunks = min(_width_ratio(region), tokens // shortest_chunk(region, options))
    chunks = max(1, min(chunks, tokens))
    if chunks == 1:
        raise CannotChunk("the chunk count is 1: nothing to split", POLICY)
    return chunks


def _width_ratio(region: Region) -> int:
    widest = max(int(per_token_numel(n, region.layouts[n], region.tokens)) for n in region.nodes)
    return math.ceil(widest / region.input_width)


def shortest_chunk(region: Region, options: MstOptions) -> int:
    """The fewest tokens an "auto" chunk has: min_chunk_len, halved down to a quarter of it
    while one chunk's widest intermediate would be larger than max_chunk_bytes (decision 26)."""
    length = options.min_chunk_len
    if options.max_chunk_bytes is None:
        return length
    widest = max(
        int(per_token_numel(n, region.layouts[n], region.tokens)) * element_size(n) for n in region.nodes
    )
    while length > max(1, options.min_chunk_len // 4) and length * widest > options.max_chunk_bytes:
        length //= 2
    return length


def _plan_symbolic(region: Region, options: MstOptions) -> ChunkPlan:
    """The plan for a symbolic token count T: a chunk count n chosen at the compiled length and
    held by guards on T, so every length the guards admit runs this graph. The count follows
    the length in powers of two where the policy depends on it (memory_budget, and "auto"
    below its shortest-chunk cap): O(log T) compiles over all lengths, never one per length."""
    tokens = region.tokens
    per_token = int(region.bytes_per_token())  # per-token sizes are static
    if guard(per_token * tokens < options.min_bytes):
        raise CannotChunk(
            f"intermediate is {per_token * hint(tokens)} bytes at this length, below "
            f"min_bytes={options.min_bytes}: too small to pay off",
            POLICY,
        )
    at = hint(tokens)
    if options.chunks != "auto":
        chunks = int(options.chunks)
    elif options.memory_budget is not None:
        # Chunks of T // n tokens within the budget; the last one holds up to n - 1 more.
        fits = max(1, options.memory_budget // per_token)  # tokens per chunk
        chunks = _power_of_two_at_least(math.ceil(at / fits))
        guard(tokens <= chunks * fits)
        if chunks > 1:
            guard(tokens > chunks // 2 * fits)
    else:
        ratio = _width_ratio(region)
        shortest = shortest_chunk(region, options)
        if guard(tokens >= ratio * shortest):
            chunks = ratio
        else:
            chunks = _power_of_two_at_most(max(1, at // shortest))
            guard(tokens >= chunks * shortest)
            guard(tokens < 2 * chunks * shortest)
    if chunks == 1 or not guard(tokens >= chunks):
        raise CannotChunk("the chunk count is 1: nothing to split", POLICY)
    length = tokens // chunks
    return ChunkPlan(region, chunks, [length] * (chunks - 1) + [tokens - (chunks - 1) * length])


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)
