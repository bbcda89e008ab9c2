"""What mst did to a model: the regions it rewrote, the ones it skipped and why."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
from collections.abc import Iterator


class _Named(str, enum.Enum):
    """A name that is also its string (compares equal to it, prints as it, JSON as it)."""

    def __str__(self) -> str:
        return self.value


class Kind(_Named):
    """What a rewritten region is."""

    MLP = "mlp"  # widened and contracted back to its input width
    PROJECTION = "projection"  # widened and contracted to another width
    LOSS = "loss"  # widened, then reduced per token to a loss
    LOGITS = "logits"  # widened values returned whole (a head without its loss)
    MOE = "moe"  # a declared token-wise module that routes tokens to experts
    BLOCK = "block"  # any other declared token-wise module


class SkipCategory(_Named):
    """Why a region found was not rewritten."""

    POLICY = "policy"  # on purpose: too small to pay off, one chunk
    NOT_A_BLOCK = "not_a_block"  # an amplifier that is no block (an attention projection)
    UNSUPPORTED = "unsupported"  # a block mst cannot chunk (yet): strict mode raises on these
    # a bug in mst while analysing or rewriting this region, or the compiler failing on the
    # rewritten graph: it is left as it was and the others are still rewritten; strict raises
    INTERNAL_ERROR = "internal_error"


POLICY, NOT_A_BLOCK = SkipCategory.POLICY, SkipCategory.NOT_A_BLOCK
UNSUPPORTED, INTERNAL_ERROR = SkipCategory.UNSUPPORTED, SkipCategory.INTERNAL_ERROR


@dataclasses.dataclass(frozen=True)
class RegionReport:
    kind: Kind
    mode: str  # "training" (joint graph) or "inference"
    chunks: int
    chunk_len: int
    tail_len: int  # length of the last chunk (== chunk_len when the count divides the tokens)
    tokens: int
    seed: str  # the amplifier node the region grew from
    ops: tuple[str, ...]  # ATen ops the region covers, forward then backward
    stack_traces: tuple[str, ...]  # distinct user source lines the region came from
    bytes_before: int  # intermediate bytes of the whole sequence
    bytes_after: int  # intermediate bytes of one chunk
    grads_in_forward: bool  # loss form: loss and gradients computed together, no recompute
    # "": static shapes. Otherwise the symbolic token count (e.g. "s27"): the graph serves
    # every length its guards admit with `chunks` chunks; chunk_len, tail_len, tokens and
    # bytes are those of the length it was compiled at.
    symbolic: str = ""
    # loss regions: whether rows whose label is the ignore index are skipped, or why not;
    # when skipped, chunk_len and bytes_after are those of a chunk with every row kept
    ignored_rows: str = ""
    # matmul FLOPs the backward loop recomputes (the forward matmuls it needs again), at the
    # compiled length: the region's share of the step-time floor of mini-sequence training
    # (0 in the loss form, which computes the gradients in its one forward loop)
    recompute_flops: int = 0


@dataclasses.dataclass(frozen=True)
class SkippedRegion:
    seed: str
    mode: str
    category: SkipCategory
    reason: str
    stack_trace: str


@dataclasses.dataclass
class GraphReport:
    mode: str
    regions: list[RegionReport] = dataclasses.field(default_factory=list)
    skipped: list[SkippedRegion] = dataclasses.field(default_factory=list)
    code: str = ""  # the rewritten graph and its chunk subgraphs, as Python
    # what mst changed besides the regions: a user's own chunking of the tokens computed as
    # one (passes/token_pieces.py), an attention mask proved causal (passes/causal_mask.py)
    rewrites: list[str] = dataclasses.field(default_factory=list)
    from_cache: bool = False  # compiled from Inductor's cache: this is the stored report
    note: str = ""


@dataclasses.dataclass
class Report:
    graphs: list[GraphReport] = dataclasses.field(default_factory=list)

    @property
    def regions(self) -> list[RegionReport]:
        return [r for g in self.graphs for r in g.regions]

    @property
    def skipped(self) -> list[SkippedRegion]:
        return [s for g in self.graphs for s in g.skipped]

    def count(self, kind: str, mode: str | None = None) -> int:
        return sum(1 for r in self.regions if r.kind == kind and mode in (None, r.mode))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def __str__(self) -> str:
        lines = []
        for i, g in enumerate(self.graphs):
            lines.append(f"graph {i} ({g.mode}): {len(g.regions)} region(s) rewritten, "
                         f"{len(g.skipped)} skipped"
                         + (" (restored: compiled from the cache)" if g.from_cache else ""))
            if g.note:
                lines.append(f"  note: {g.note}")
            if g.regions:
                lines.append(f"  {'kind':<10} {'chunks':>6} {'len':>6} {'tokens':>7} "
                             f"{'MB before':>10} {'MB/chunk':>9}  seed")
            for r in g.regions:
                lines.append(
                    f"  {r.kind:<10} {r.chunks:>6} {r.chunk_len:>6} {r.tokens:>7} "
                    f"{r.bytes_before / 2**20:>10.1f} {r.bytes_after / 2**20:>9.1f}  {r.seed}"
                    + ("  (loss and gradients in one forward loop)" if r.grads_in_forward else "")
                )
                if r.ignored_rows:
                    lines.append(f"      ignored rows: {r.ignored_rows}")
            for line in g.rewrites:
                lines.append(f"  rewrote: {line}")
            for s in g.skipped:
                lines.append(f"  skipped {s.seed} [{s.category}]: {s.reason}")
        for i, g in enumerate(self.graphs):
            if g.code:
                lines += ["", f"# ---- graph {i} ({g.mode}) after mst ----", g.code]
        return "\n".join(lines)


_HISTORY: list[Report] = []  # one Report per backend call (one Dynamo graph), oldest first
_KEEP = 64
_COLLECTORS: list[list[Report]] = []


def new_report() -> Report:
    report = Report()
    _HISTORY.append(report)
    del _HISTORY[:-_KEEP]
    for collector in _COLLECTORS:
        collector.append(report)
    return report


def last_report() -> Report | None:
    """The report of the most recent graph compiled with backend="mst" in this process."""
    return _HISTORY[-1] if _HISTORY else None


@contextlib.contextmanager
def collect_reports() -> Iterator[list[Report]]:
    """Gathers the reports of every backend call made inside the `with` block."""
    reports: list[Report] = []
    _COLLECTORS.append(reports)
    try:
        yield reports
    finally:
        _COLLECTORS.remove(reports)
