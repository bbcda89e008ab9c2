"""The whole plan of each region, made before the graph is touched (docs/design.md,
"Planning"): how many mini-sequences it runs in and their lengths, whether a loss region
skips its ignored rows (and the compaction that does it), whether its backward runs in its
forward loop (the loss form), whether a loss loop's logits go into the reused buffer, and
its loops with their chunk subgraphs built and checked. The rewrite only executes it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ..options import MstOptions
from ..report import POLICY, Kind
from .compaction import Compaction, plan_compaction
from .ignored_rows import IgnoredRows, find_ignored_rows
from .loss_form import LossForm, loss_form
from .region import CannotChunk, Region, checkpoint_tags
from .rules import element_size, per_token_numel
from .subgraphs import ChunkPass, Loop, build_loop, loop_nodes
from .symbolic import Size, from_data, guard, hint, is_symbolic


@dataclasses.dataclass
class ChunkPlan:
    region: Region
    chunks: int
    # tokens per chunk, at most two distinct values (regular, last); symbolic sizes when the
    # token count is (symbolic.py)
    lengths: list[Size]
    name: str = "mst_region"  # the prefix of its loops' subgraph names
    # a loss region run over the rows whose label is kept only (ignored_rows.py), or None
    ignored: IgnoredRows | None = None
    ignored_note: str = ""  # loss regions: the report's line on ignored rows
    compaction: Compaction | None = None  # how the kept rows are found (compaction.py)
    form: LossForm | None = None  # the backward run in the forward loop (loss_form.py)
    # a loss loop on the CPU: its products at least this large into the reused buffer
    workspace_min_bytes: int | None = None
    loops: list[Loop] = dataclasses.field(default_factory=list)
    # per chunk as it runs, the name of its length's subgraph: the length's text when planned
    # (a symbolic length's text changes when the shape environment later learns more)
    keys: list[str] = dataclasses.field(default_factory=list)

    @property
    def chunk_len(self) -> Size:
        return self.lengths[0]

    @property
    def dynamic(self) -> bool:
        return is_symbolic(self.region.tokens)

    @property
    def run_lengths(self) -> list[Size]:
        """The lengths of the chunks as they run: with a compaction, the kept rows' (read
        from the data), else `lengths`."""
        return self.compaction.lengths if self.compaction is not None else self.lengths

    def distinct_lengths(self) -> dict[str, Size]:
        """The distinct chunk lengths, in order (one subgraph each), by their keys."""
        seen: dict[str, Size] = {}
        for key, length in zip(self.keys, self.run_lengths, strict=True):
            seen.setdefault(key, length)
        return seen


def plan_region(region: Region, options: MstOptions, name: str,
                chunk_passes: Sequence[ChunkPass]) -> ChunkPlan:
    """Everything about rewriting `region`, decided and its chunk subgraphs built; raises
    CannotChunk where it is not to be rewritten."""
    plan = plan_chunks(region, options)
    plan.name = name
    plan.ignored, plan.ignored_note = _ignored_rows(region, options)
    plan.compaction = plan_compaction(region, plan.chunks, plan.ignored)
    plan.keys = (plan.compaction.keys if plan.compaction is not None
                 else [str(n) for n in plan.lengths])
    outputs = region.outputs(region.forward) + region.outputs(region.backward)
    if not region.declared:
        plan.form = loss_form(region.seed.graph, region, loop_nodes(region, outputs))
    if plan.form is not None:
        # the backward is linear in the scalar tangent: it runs with tangent 1 in the forward
        # loop, no forward value is recomputed, and the gradients are scaled by the tangent.
        # A checkpointed loss loop runs again in the backward, after the loop's end let the
        # reused buffer go: it would keep the last chunk's
        if checkpoint_tags(region) is None:
            plan.workspace_min_bytes = options.workspace_min_bytes
        plan.loops = [build_loop(plan, f"{name}_loss", outputs, True, chunk_passes)]
    else:
        plan.loops = [
            build_loop(plan, f"{name}_{part_name}", region.outputs(part), False, chunk_passes)
            for part_name, part in (("fwd", region.forward), ("bwd", region.backward))
            if region.outputs(part)
        ]
    return plan


def _ignored_rows(region: Region, options: MstOptions) -> tuple[IgnoredRows | None, str]:
    """Whether a loss region skips the rows whose label is ignored, and the report's line."""
    if region.kind != Kind.LOSS:
        return None, ""
    if not options.skip_ignored_rows:
        return None, "computed (skip_ignored_rows=False)"
    found = find_ignored_rows(region)
    if isinstance(found, IgnoredRows):
        return found, (f"skipped: rows whose label ({found.mask.labels.name}) is "
                       f"{found.mask.ignore_index} are not computed")
    return None, f"computed: {found}"


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
        longest = _longest_auto_chunk(region, options)
        chunks = min(max(_width_ratio(region), math.ceil(tokens / longest)),
                     tokens // shortest_chunk(region, options))
    chunks = max(1, min(chunks, tokens))
    if chunks == 1:
        raise CannotChunk("the chunk count is 1: nothing to split", POLICY)
    return chunks


def _width_ratio(region: Region) -> int:
    widest = max(int(per_token_numel(n, region.layouts[n], region.tokens)) for n in region.nodes)
    return math.ceil(widest / region.input_width)


def _longest_auto_chunk(region: Region, options: MstOptions) -> int:
    """The most tokens an "auto" chunk has: as many as the region's input is wide (so one
    chunk's intermediate is about the size of the region's weights, whatever the length),
    and no fewer than min_chunk_len. Without it a chunk's intermediates grew with the
    sequence and were the largest term of a long sequence's peak (decision 36)."""
    return max(options.min_chunk_len, region.input_width)


def shortest_chunk(region: Region, options: MstOptions) -> int:
    """The fewest tokens an "auto" chunk has: min_chunk_len, halved down to a quarter of it
    while one chunk's widest intermediate would be larger than max_chunk_bytes: memory decides
    there, not matmul size."""
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
        chunks = _chunks_of_at_most(tokens, max(1, options.memory_budget // per_token))
    else:
        ratio = _width_ratio(region)
        shortest = shortest_chunk(region, options)
        longest = _longest_auto_chunk(region, options)
        if guard(tokens > ratio * longest):
            chunks = _chunks_of_at_most(tokens, longest)
        elif guard(tokens >= ratio * shortest):
            chunks = ratio
        else:
            chunks = _power_of_two_at_most(max(1, at // shortest))
            guard(tokens >= chunks * shortest)
            guard(tokens < 2 * chunks * shortest)
    if not guard(tokens >= 2 * chunks):
        # A size of 1 is special to PyTorch (broadcasting): a chunk length that is 1 at the
        # compiled length would be guarded equal to 1 as the graph is built, pinning the
        # length. Fewer chunks of at least 2 tokens, for the lengths that need it only.
        chunks = at // 2
        guard(tokens < 2 * (chunks + 1))
    if chunks <= 1 or not guard(tokens >= 2 * chunks):
        raise CannotChunk("the chunk count is 1: nothing to split", POLICY)
    length = tokens // chunks
    return ChunkPlan(region, chunks, [length] * (chunks - 1) + [tokens - (chunks - 1) * length])


def _chunks_of_at_most(tokens: Size, length: int) -> int:
    """The power of two n of chunks of at most `length` tokens each at the compiled length,
    guarded to the bucket (n / 2) x length < T <= n x length it serves."""
    chunks = _power_of_two_at_least(math.ceil(hint(tokens) / length))
    guard(tokens <= chunks * length)
    if chunks > 1:
        guard(tokens > chunks // 2 * length)
    return chunks


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)
