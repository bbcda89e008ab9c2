"""The mst pipeline on an ATen graph (joint training graph or inference graph):
analyse -> plan -> rewrite. This is the one place that lists the steps."""

from __future__ import annotations

from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import GraphModule, Node

from ..options import MstOptions
from ..report import UNSUPPORTED, GraphReport, RegionReport, SkippedRegion
from .analysis import CannotChunk, find_regions, tangent_dependent
from .planning import ChunkPlan, plan_chunks
from .rewrite import fill_fake_values, rewrite_region
from .symbolic import hint


class MstSkip(RuntimeError):
    """Raised in strict mode when a region mst found could not be rewritten."""


def run_mst_passes(gm: GraphModule, options: MstOptions) -> GraphReport:
    graph = gm.graph
    mode = "training" if tangent_dependent(graph) else "inference"
    report = GraphReport(mode)

    regions, candidates = find_regions(graph)
    for c in candidates:
        report.skipped.append(_skipped(c.seed, mode, c.category, c.reason))

    plans: list[ChunkPlan] = []
    for region in regions:
        try:
            plans.append(plan_chunks(region, options))
        except CannotChunk as e:
            report.skipped.append(_skipped(region.seed, mode, e.category, str(e)))

    if options.strict:
        unexpected = [s for s in report.skipped if s.category == UNSUPPORTED]
        if unexpected:
            raise MstSkip("; ".join(f"{s.seed}: {s.reason}" for s in unexpected))

    for i, plan in enumerate(plans):
        grads_in_forward = rewrite_region(gm, plan, name=f"mst_region{i}")
        report.regions.append(_region_report(plan, mode, grads_in_forward))
    if plans:
        stable_topological_sort(graph)
        graph.lint()
        gm.recompile()
        fill_fake_values(gm)
        report.code = gm.print_readable(print_output=False)
    return report


def _skipped(seed: Node, mode: str, category: str, reason: str) -> SkippedRegion:
    return SkippedRegion(seed.name, mode, category, reason, seed.meta.get("stack_trace") or "")


def _region_report(plan: ChunkPlan, mode: str, grads_in_forward: bool) -> RegionReport:
    region = plan.region
    per_token = region.bytes_per_token()
    traces = dict.fromkeys(
        _last_frame(n.meta["stack_trace"]) for n in region.nodes if n.meta.get("stack_trace")
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
        grads_in_forward=grads_in_forward,
        symbolic=str(region.tokens) if plan.dynamic else "",
    )


def _last_frame(stack_trace: str) -> str:
    """'path:line in fn: code' of the innermost user frame of a node's stack trace."""
    lines = [line.strip() for line in stack_trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            where = lines[i][len("File "):].replace('", line ', ":").strip('"')
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{where}: {code}"
    return lines[-1] if lines else ""
