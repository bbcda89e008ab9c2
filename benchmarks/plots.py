"""The PNG figures of a benchmark run (matplotlib, optional: without it, no figures).

memory.png   dynamic peak memory and step time over sequence length, one line per mode
             (bars when one length ran), and the compile time of every compiled mode
chunks.png   mst over chunk counts: peak memory and step time relative to Inductor, one
             line per sequence length (the memory/time trade-off at short and long lengths)
longest.png  the longest training sequence each mode fits in the memory budget
"""

from __future__ import annotations

from pathlib import Path

from .modes import ModeSpec


def write_all(out_dir: Path, rows: list[dict], searches: list[dict]) -> list[str]:
    """Draw every figure the results allow; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    main = [r for r in rows if r["ok"] and r["group"] == "main"]
    sweep = [r for r in rows if r["ok"] and r["group"] == "chunk_sweep"]
    figures = (
        ("memory.png", main, lambda: _memory(plt, main)),
        ("chunks.png", sweep, lambda: _chunks(plt, sweep)),
        ("longest.png", searches, lambda: _longest(plt, searches, rows)),
    )
    made = []
    for name, data, draw in figures:
        if not data:
            continue
        fig = draw()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def _memory(plt, rows: list[dict]):
    seqs = sorted({r["seq"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    longest = seqs[-1]
    compiled = [lb for lb in labels if _at(rows, lb, longest, "compile_s") is not None]
    panels = 3 if compiled else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.7 * panels, 5))
    ax_mem, ax_time = axes[:2]
    if len(seqs) > 1:
        for label in labels:
            pts = sorted((r["seq"], r["peak_mb"], r["step_s"]) for r in rows if r["label"] == label)
            style = "--" if label.endswith("+AC") else "-"
            for ax, i in ((ax_mem, 1), (ax_time, 2)):
                ax.plot([p[0] for p in pts], [p[i] for p in pts], style, marker="o", label=label)
        for ax in (ax_mem, ax_time):
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.set_xlabel("sequence length (tokens)")
        ax_mem.legend(fontsize=7)
    else:
        _bars(ax_mem, labels, [_at(rows, lb, seqs[0], "peak_mb") for lb in labels], "{:.0f}")
        _bars(ax_time, labels, [_at(rows, lb, seqs[0], "step_s") for lb in labels], "{:.2f}")
        ax_mem.set_xlabel(f"mode (S={seqs[0]})")
        ax_time.set_xlabel(f"mode (S={seqs[0]})")
    if compiled:
        ax_compile = axes[2]
        times = [_at(rows, lb, longest, "compile_s") for lb in compiled]
        _bars(ax_compile, compiled, times, "{:.1f}")
        ax_compile.set_xlabel(f"mode (S={longest})")
        ax_compile.set_ylabel("compile time (s)")
        ax_compile.set_title("compile")
    ax_mem.set_ylabel("dynamic peak memory of a step (MB)")
    ax_time.set_ylabel("step time (s, median)")
    ax_mem.set_title("memory")
    ax_time.set_title("time")
    return fig


def _chunks(plt, rows: list[dict]):
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    relative = all(r.get("peak_ratio") is not None for r in rows)
    mem_key, time_key = ("peak_ratio", "step_ratio") if relative else ("peak_mb", "step_s")
    for seq in sorted({r["seq"] for r in rows}):
        pts = sorted(
            (dict(_options(r))["chunks"], r[mem_key], r[time_key]) for r in rows if r["seq"] == seq
        )
        ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"S={seq}")
        ax_time.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"S={seq}")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ticks = sorted({dict(_options(r))["chunks"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("mst chunks per region")
        ax.legend(fontsize=8)
        if relative:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax_mem.set_ylabel("peak memory vs Inductor" if relative else "peak memory (MB)")
    ax_time.set_ylabel("step time vs Inductor" if relative else "step time (s)")
    ax_mem.set_title("memory over chunk counts")
    ax_time.set_title("time over chunk counts")
    return fig


def _longest(plt, searches: list[dict], rows: list[dict]):
    budget = searches[0]["budget_mb"]
    fig, (ax_mem, ax_bar) = plt.subplots(1, 2, figsize=(14, 0.35 * len(searches) + 4))
    probes = [r for r in rows if r["ok"] and r["group"] == "max_seq"]
    for label in dict.fromkeys(s["label"] for s in searches):
        pts = sorted((r["seq"], r["peak_mb"]) for r in probes if r["label"] == label)
        if pts:
            ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax_mem.axhline(budget, color="grey", linestyle=":", label=f"budget {budget:.0f} MB")
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_xlabel("sequence length (tokens)")
    ax_mem.set_ylabel("dynamic peak memory of a training step (MB)")
    ax_mem.set_title("memory over sequence length (search probes)")
    ax_mem.legend(fontsize=7)
    labels = [s["label"] for s in searches]
    values = [s["longest_seq"] or 0 for s in searches]
    ax_bar.barh(labels, values, color="tab:green")
    for i, v in enumerate(values):
        ax_bar.annotate(str(v), (v, i), va="center", fontsize=8)
    ax_bar.invert_yaxis()
    ax_bar.set_xlabel(f"longest training sequence within {budget:.0f} MB (tokens)")
    ax_bar.set_title("longest sequence")
    return fig


def _bars(ax, labels: list[str], values: list[float], fmt: str) -> None:
    ax.bar(labels, values, color="tab:blue")
    for i, v in enumerate(values):
        ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=7)
    ax.tick_params(axis="x", rotation=40)
    for tick in ax.get_xticklabels():
        tick.set_ha("right")


def _at(rows: list[dict], label: str, seq: int, key: str):
    return next((r[key] for r in rows if r["label"] == label and r["seq"] == seq), None)


def _options(row: dict) -> tuple:
    return ModeSpec.parse(row["spec"]).options


def main() -> None:
    """`python -m benchmarks.plots OUT.png RESULTS.json ...`: longest.png of the searches of
    several runs together (each mode's longest-sequence search, run apart)."""
    import argparse
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", type=Path, help="the PNG file written")
    p.add_argument("results", type=Path, nargs="+", help="results.json files of runs")
    args = p.parse_args()
    runs = [json.loads(path.read_text()) for path in args.results]
    fig = _longest(plt, [s for run in runs for s in run["searches"]],
                   [row for run in runs for row in run["raw"]])
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
