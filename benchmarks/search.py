"""The longest sequence a mode trains within a memory budget: the MST paper's headline metric.

A search over sequence lengths, each probe a fresh measured process (one training step):
double from `start` until a probe's dynamic peak exceeds the budget (or the run fails, e.g.
out of memory on a GPU), then interpolate linearly between the longest length that fit and the
shortest that did not (peak memory is close to linear in the length for every mode here:
attention is the flash kernel) and probe again, until the two are within `tolerance` of each
other or the probes run out. Only measured lengths are reported: the answer is the longest
probe that fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class SearchResult:
    budget_mb: float
    longest_seq: int | None  # the longest probe within the budget; None if none fit
    first_over: int | None  # the shortest probe over the budget (or failed); None if none
    probes: list[dict]  # {"seq", "peak_mb", "ok", "fits", "error"} in probe order

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def longest_sequence(
    probe: Callable[[int], dict],
    budget_mb: float,
    start: int,
    limit: int,
    granularity: int = 256,
    tolerance: float = 0.05,
    max_probes: int = 8,
) -> SearchResult:
    """`probe(seq)` returns a measured result with "ok" and, when ok, "peak_mb"."""
    if budget_mb <= 0 or start < granularity or limit < start:
        raise ValueError(
            f"need budget_mb > 0 and granularity ({granularity}) <= start ({start}) <= "
            f"limit ({limit}); got budget_mb={budget_mb}"
        )
    probes: list[dict] = []

    def run(seq: int) -> bool:
        result = probe(seq)
        peak = result.get("peak_mb") if result.get("ok") else None
        fits = peak is not None and peak <= budget_mb
        probes.append(
            {
                "seq": seq,
                "peak_mb": peak,
                "ok": bool(result.get("ok")),
                "fits": fits,
                "error": result.get("error"),
            }
        )
        return fits

    lo = hi = None
    seq = start
    while len(probes) < max_probes:  # bracket: double up (or halve down from a too-long start)
        if run(seq):
            lo = seq
            if hi is not None or seq * 2 > limit:
                break
            seq *= 2
        else:
            hi = seq
            if lo is not None or seq // 2 < granularity:
                break
            seq = _round(seq // 2, granularity)
    while lo is not None and hi is not None and len(probes) < max_probes:
        if hi - lo <= max(granularity, tolerance * lo):
            break
        seq = _round(_interpolate(probes, lo, hi, budget_mb), granularity)
        if seq <= lo:  # the line crosses the budget within one step of lo: check that step
            seq = lo + granularity
        if not lo < seq < hi:
            seq = _round((lo + hi) // 2, granularity)
            if not lo < seq < hi:
                break
        if run(seq):
            lo = seq
        else:
            hi = seq
    return SearchResult(budget_mb, lo, hi, probes)


def _round(seq: int, granularity: int) -> int:
    return max(granularity, seq // granularity * granularity)


def _interpolate(probes: list[dict], lo: int, hi: int, budget_mb: float) -> int:
    """The length where the line through the measured peaks at lo and hi meets the budget;
    the midpoint when hi has no measured peak (its run failed)."""
    peak = {p["seq"]: p["peak_mb"] for p in probes}
    if peak.get(hi) is None or peak[hi] <= peak[lo]:
        return (lo + hi) // 2
    return int(lo + (budget_mb - peak[lo]) * (hi - lo) / (peak[hi] - peak[lo]))
