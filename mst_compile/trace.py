"""What the passes did, for `TORCH_LOGS` and `TORCH_TRACE` (tlparse).

    TORCH_LOGS="+mst_compile"   # debug: graphs before and after, chunk plans
    TORCH_LOGS="mst_compile"    # info: one summary line per graph
    torch._logging.set_logs(modules={"mst": logging.DEBUG})   # from Python, after importing mst_compile

TORCH_LOGS="mst" cannot work: torch parses TORCH_LOGS at import, before this package exists.
"""

from __future__ import annotations

import logging

import torch
from torch._logging import trace_structured

from .report import GraphReport

log = logging.getLogger("mst_compile")

if "mst" not in torch._logging._internal.log_registry.log_alias_to_log_qnames:
    torch._logging._internal.register_log("mst", "mst_compile")


def log_graph_before(code_fn) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("graph before mst:\n%s", code_fn())


def log_graph_report(report: GraphReport) -> None:
    log.info(
        "mst (%s graph): %d region(s) rewritten [%s], %d skipped",
        report.mode,
        len(report.regions),
        ", ".join(f"{r.kind} ({r.chunks} chunks)" for r in report.regions),
        len(report.skipped),
    )
    for r in report.regions:
        log.debug("chunk plan: %s", r)
    for s in report.skipped:
        log.debug("skipped %s [%s]: %s", s.seed, s.category, s.reason)
    if report.code:
        log.debug("graph after mst:\n%s", report.code)
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": f"mst_{report.mode}_graph_after", "encoding": "string"},
            payload_fn=lambda: report.code,
        )
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"mst_{report.mode}_report", "encoding": "string"},
        payload_fn=lambda: "\n".join(
            [f"{r.kind} chunks={r.chunks} len={r.chunk_len} seed={r.seed}" for r in report.regions]
            + [f"skipped {s.seed} [{s.category}]: {s.reason}" for s in report.skipped]
        ),
    )
