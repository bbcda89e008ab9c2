"""The mst pipeline on an ATen graph (joint training graph or inference graph):
analyse -> plan -> rewrite. This is the one place that lists the steps.

Failure policy (docs/design.md, "Failure policy"): a region that cannot be chunked is skipped
with a reason; an unexpected error while analysing, planning or rewriting one region skips
that region as an INTERNAL_ERROR (with a warning naming it and its source line) and keeps the
others. Strict mode raises instead, on internal errors and on `unsupported` skips.
"""

from __future__ import annotations

import logging
import warnings

from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import GraphModule, Node

from ..options import MstOptions
from ..report import INTERNAL_ERROR, UNSUPPORTED, GraphReport, RegionReport, SkippedRegion
from .analysis import CannotChunk, Region, find_regions, tangent_dependent
from .blocks import find_blocks
from .ignored_rows import IgnoredRows, find_ignored_rows
from .planning import ChunkPlan, plan_chunks
from .graph import fill_fake_values, stack_line
from .rewrite import Rewritten, rewrite_region
from .token_pieces import undo_token_pieces
from .symbolic import hint

log = logging.getLogger("mst_compile")


class MstSkip(RuntimeError):
    """Raised in strict mode when a region mst found could not be rewritten."""


def run_mst_passes(gm: GraphModule, options: MstOptions) -> GraphReport:
    graph = gm.graph
    mode = "training" if tangent_dependent(graph) else "inference"
    report = GraphReport(mode)
    skip = _Skipper(report, mode, options.strict)

    report.merged = undo_token_pieces(graph)
    blocks, candidates = find_blocks(graph)
    regions, found = find_regions(graph, covered={n for b in blocks for n in b.layouts})
    regions = blocks + regions
    for c in candidates + found:
        skip(c.seed, c.category, c.reason, c.error)

    plans: list[ChunkPlan] = []
    for region in regions:
        try:
            plan = plan_chunks(region, options)
            _decide_ignored_rows(plan, options)
            plans.append(plan)
        except CannotChunk as e:
            skip(region.seed, e.category, str(e))
        except Exception as e:  # noqa: BLE001 (one region's bug must not cost the others)
            skip(region.seed, INTERNAL_ERROR, f"while planning: {type(e).__name__}: {e}", e)

    _raise_unexpected(report, options)

    for i, plan in enumerate(plans):
        try:
            done = rewrite_region(gm, plan, f"mst_region{i}", options.workspace_min_bytes)
        except CannotChunk as e:  # a size in a declared block it cannot rewrite (resize.py)
            skip(plan.region.seed, e.category, str(e))
            continue
        except Exception as e:  # noqa: BLE001 (the rewrite removed what it had inserted)
            skip(plan.region.seed, INTERNAL_ERROR, f"while rewriting: {type(e).__name__}: {e}", e)
            continue
        for later in plans[i + 1:]:
            _follow_replacements(later.region, done.replacements)
        report.regions.append(_region_report(plan, mode, done))
    _raise_unexpected(report, options)  # a declared block refused while rewriting
    if report.regions or report.merged:
        stable_topological_sort(graph)
        graph.lint()
        gm.recompile()
        fill_fake_values(gm)
        report.code = gm.print_readable(print_output=False)
    return report


def _raise_unexpected(report: GraphReport, options: MstOptions) -> None:
    """Strict mode: `unsupported` skips raise."""
    if options.strict:
        unexpected = [s for s in report.skipped if s.category == UNSUPPORTED]
        if unexpected:
            raise MstSkip("; ".join(f"{s.seed}: {s.reason}" for s in unexpected))


class _Skipper:
    """Records skipped regions; warns about internal errors, or raises them in strict mode."""

    def __init__(self, report: GraphReport, mode: str, strict: bool):
        self.report, self.mode, self.strict = report, mode, strict

    def __call__(self, seed: Node, category: str, reason: str, error: Exception | None = None) -> None:
        if category == INTERNAL_ERROR and self.strict:
            raise error if error is not None else RuntimeError(reason)
        stack_trace = seed.meta.get("stack_trace") or ""
        self.report.skipped.append(SkippedRegion(seed.name, self.mode, category, reason, stack_trace))
        if category == INTERNAL_ERROR:
            where = stack_line(stack_trace) or "no source line recorded"
            warnings.warn(
                f"mst_compile: internal error in the region grown from {seed.name} ({where}); "
                f"that region is left unchunked, the others are rewritten: {reason}",
                stacklevel=2,
            )
            log.warning("mst internal error in region %s", seed.name, exc_info=error)


def _decide_ignored_rows(plan: ChunkPlan, options: MstOptions) -> None:
    """Whether the loss region of `plan` skips the rows whose label is ignored
    (`plan.ignored`), and what the report says about it (`plan.ignored_note`)."""
    if plan.region.kind != "loss":
        return
    if not options.skip_ignored_rows:
        plan.ignored_note = "computed (skip_ignored_rows=False)"
        return
    found = find_ignored_rows(plan.region)
    if isinstance(found, IgnoredRows):
        plan.ignored = found
        plan.ignored_note = (f"skipped: rows whose label ({found.mask.labels.name}) is "
                             f"{found.mask.ignore_index} are not computed")
    else:
        plan.ignored_note = f"computed: {found}"


def _follow_replacements(region: Region, replacements: dict[Node, Node]) -> None:
    """A rewrite replaced some values a later region reads: it reads the new ones."""
    for old, new in replacements.items():
        if old in region.inputs:
            region.inputs[new] = region.inputs.pop(old)


def _region_report(plan: ChunkPlan, mode: str, done: Rewritten) -> RegionReport:
    region = plan.region
    per_token = region.bytes_per_token()
    traces = dict.fromkeys(
        stack_line(n.meta["stack_trace"]) for n in region.nodes if n.meta.get("stack_trace")
    )
    tokens, chunk_len = hint(region.tokens), hint(plan.chunk_len)
    return RegionReport(
        kind=region.kind,
        mode=mode,
        chunks=plan.chunks,
        chunk_len=chunk_len,
        tail_len=hint(plan.lengths[-1]),
        tokens=tokens,
        seed=region.seed.name,
        ops=tuple(str(n.target) for n in region.nodes),
        stack_traces=tuple(traces),
        bytes_before=int(per_token) * tokens,
        bytes_after=int(per_token) * chunk_len,
        grads_in_forward=done.grads_in_forward,
        symbolic=str(region.tokens) if plan.dynamic else "",
        ignored_rows=plan.ignored_note,
        recompute_flops=done.recompute_flops,
    )
