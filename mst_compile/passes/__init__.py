"""The mst pipeline on an ATen graph (a joint training graph or an inference graph). This
is the one place that lists the steps:

1. gradients of pieces written into zeros and summed, as the join they are (joins.py); a
   user's own chunking of the tokens computed as one (token_pieces.py), attention whose
   mask is provably causal run causal without it (causal_mask.py), attention keeping for
   its backward no more than it reads (attention_saves.py), and a join copied into another
   layout made in that layout (joins.py);
2. the regions found: declared token-wise blocks (blocks.py), then regions grown from
   amplifiers (analysis.py);
3. each region planned whole (planning.py): its chunks, whether it skips ignored rows and
   how (ignored_rows.py, compaction.py), the loss form (loss_form.py), the reused logits
   buffer, its loops with their chunk subgraphs built and checked (subgraphs.py), each
   chunk subgraph then rewritten by CHUNK_PASSES below;
4. in strict mode, any `unsupported` skip raises;
5. each plan executed (rewrite.py: loops.py, checks.py);
6. the graph sorted and checked, its new values given fake tensors, its code kept for the
   report.

Failure policy (docs/design.md, "Failure policy"): a region that cannot be chunked is
skipped with a reason; an unexpected error while analysing, planning or rewriting one region
skips that region as an INTERNAL_ERROR (with a warning naming it and its source line) and
keeps the others. Strict mode raises instead, on internal errors and on `unsupported` skips.
"""

from __future__ import annotations

import logging
import warnings

from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import Graph, GraphModule, Node

from ..options import MstOptions
from ..report import INTERNAL_ERROR, UNSUPPORTED, GraphReport, RegionReport, SkippedRegion
from .analysis import find_regions
from .attention_saves import trim_attention_saves
from .blocks import find_blocks
from .causal_mask import causal_attention
from .graph import fill_fake_values, stack_line
from .joins import joins_in_reader_layout, scattered_pieces_as_joins
from .log_softmax import gradient_after_statistics
from .one_hot_sum import sum_one_hot_rows
from .planning import ChunkPlan, plan_region
from .region import CannotChunk, tangent_dependent
from .rewrite import Rewritten, rewrite_region
from .subgraphs import Loop
from .symbolic import hint
from .token_pieces import undo_token_pieces
from .workspace import products_into_workspace

log = logging.getLogger("mst_compile")


def _one_hot_row_sums(graph: Graph, plan: ChunkPlan, loop: Loop) -> int:
    """A cross-entropy chunk: the row sum of its scattered one-hot gradient is that one
    value, not a reduction over the vocabulary (one_hot_sum.py)."""
    return sum_one_hot_rows(graph)


def _gradient_over_logits(graph: Graph, plan: ChunkPlan, loop: Loop) -> int:
    """A cross-entropy chunk: its logits gradient reads the row statistics through a fence,
    so Inductor writes it over the logits (log_softmax.py)."""
    return gradient_after_statistics(graph)


def _logits_in_workspace(graph: Graph, plan: ChunkPlan, loop: Loop) -> int:
    """A loss loop on the CPU: its large products into one buffer kept from chunk to chunk,
    where the plan says so (workspace.py)."""
    if not loop.scale or plan.workspace_min_bytes is None:
        return 0
    return products_into_workspace(graph, plan.workspace_min_bytes)


# The passes on each chunk subgraph, once built (step 3): exact rewrites for Inductor's sake
CHUNK_PASSES = (_one_hot_row_sums, _gradient_over_logits, _logits_in_workspace)


class MstSkip(RuntimeError):
    """Raised in strict mode when a region mst found could not be rewritten."""


def run_mst_passes(gm: GraphModule, options: MstOptions) -> GraphReport:
    graph = gm.graph
    report = GraphReport("training" if tangent_dependent(graph) else "inference")
    mode = report.mode
    skip = _Skipper(report, mode, options.strict)

    scattered_pieces_as_joins(graph)  # 1
    report.rewrites = (undo_token_pieces(graph) + causal_attention(graph)
                       + trim_attention_saves(graph) + joins_in_reader_layout(graph))
    backward = tangent_dependent(graph)  # the backward part, as steps 2-5 see it

    blocks, candidates = find_blocks(graph, backward)  # 2
    covered = {n for b in blocks for n in b.layouts}
    regions, found = find_regions(graph, covered, backward)
    for c in candidates + found:
        skip(c.seed, c.category, c.reason, c.error)

    plans: list[ChunkPlan] = []  # 3
    for i, region in enumerate(blocks + regions):
        try:
            plans.append(plan_region(region, options, f"mst_region{i}", CHUNK_PASSES))
        except CannotChunk as e:
            skip(region.seed, e.category, str(e))
        except Exception as e:  # noqa: BLE001 (one region's bug must not cost the others)
            skip(region.seed, INTERNAL_ERROR, f"while planning: {type(e).__name__}: {e}", e)

    _raise_unexpected(report, options)  # 4

    replaced: dict[Node, Node] = {}  # 5; an earlier region's output -> what now stands for it
    for plan in plans:
        try:
            done = rewrite_region(gm, plan, backward, replaced)
        except Exception as e:  # noqa: BLE001 (the rewrite removed what it had inserted)
            skip(plan.region.seed, INTERNAL_ERROR, f"while rewriting: {type(e).__name__}: {e}", e)
            continue
        replaced.update(done.replacements)
        report.regions.append(_region_report(plan, mode, done))

    if report.regions or report.rewrites:  # 6
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
        grads_in_forward=plan.form is not None,
        symbolic=str(region.tokens) if plan.dynamic else "",
        ignored_rows=plan.ignored_note,
        recompute_flops=done.recompute_flops,
    )
