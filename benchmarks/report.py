"""Turn the raw per-process results into results.json, results.md and a PNG plot.

Also the two checks the parent makes: every mode computes the same loss (and gradient norm)
as the reference mode, and how mst compares with the targets of the "proof of memory" issue.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .modes import BASELINE, COMPILED, DESCRIPTIONS

LOSS_RTOL = 1e-3
# Targets for backend="mst" relative to Inductor (issue "proof of memory").
TARGET_PEAK_RATIO = 0.25
TARGET_STEP_RATIO = 1.10
TARGET_COMPILE_RATIO = 2.0
TARGET_SWEEP_FLATNESS = 1.25  # compile time at the slowest chunk count / at the fastest


# ---------------------------------------------------------------- summaries and checks


def _key(raw: dict) -> tuple:
    return raw["group"], raw["spec"], raw["seq"], raw["inference"]


def summarize_all(raws: list[dict]) -> list[dict]:
    """One row per (group, mode, seq, inference), merging the rounds (processes) of each."""
    by_key: dict[tuple, list[dict]] = {}
    for raw in raws:
        by_key.setdefault(_key(raw), []).append(raw)
    return [summarize(runs) for runs in by_key.values()]


def summarize(runs: list[dict]) -> dict:
    """One row: the figures the table shows, from the rounds (processes) of one configuration.
    Any failed round fails the row."""
    first = runs[0]
    row = {k: first.get(k) for k in ("label", "spec", "mode", "seq", "inference", "group")}
    failed = [r for r in runs if not r.get("ok")]
    row["ok"] = not failed
    row["processes"] = len(runs)
    if failed:
        row["error"] = failed[0].get("error", "failed")
        return row
    steps = [s for r in runs for s in r["steps"]]
    times = [s["step_s"] for s in steps]
    median = statistics.median(times)
    first_step = statistics.median(r["first_step_s"] for r in runs)
    timed = [r["dynamo_compile_s"] for r in runs if r.get("dynamo_compile_s")]
    compiled = first["mode"] in COMPILED
    row.update(
        peak_mb=max(s["peak_mb"] for s in steps),
        step_s=median,
        step_min_s=min(times),
        step_max_s=max(times),
        cpu_s=statistics.median(cpu)
        if (cpu := [s["cpu_s"] for s in steps if "cpu_s" in s])
        else None,
        fwd_s=statistics.median(s["fwd_s"] for s in steps),
        bwd_s=statistics.median(s["bwd_s"] for s in steps),
        first_step_s=first_step,
        # Dynamo's own compile timer when there is one: first step - median step mixes in
        # the noise of two step times on a shared machine.
        compile_s=(statistics.median(timed) if timed else max(0.0, first_step - median))
        if compiled
        else None,
        compile_source="dynamo timer" if timed else "first step - median step",
        first_step_minus_median_s=first_step - median,
        live_after_fwd_mb=_max_of(steps, "live_after_fwd_mb"),
        fwd_peak_mb=_max_of(steps, "fwd_peak_mb"),
        bwd_peak_mb=_max_of(steps, "bwd_peak_mb"),
        code=sorted({json.dumps(r.get("code"), sort_keys=True) for r in runs}),
        kernels=(runs[-1].get("inductor_metrics") or {}).get("generated_kernel_count"),
        threads=sorted({r.get("threads") for r in runs}),
        loss=steps[-1]["loss"],
        grad_norm=steps[-1]["grad_norm"],
        mst=runs[-1].get("mst"),
        warnings=sorted({w for r in runs for w in r.get("warnings", [])}),
    )
    return row


def _max_of(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps if key in s]
    return max(values) if values else None


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_losses(rows: list[dict]) -> list[str]:
    """Compare every row with the eager row of its (seq, inference); returns the mismatches
    and sets row["check"] to "ok", "MISMATCH" or "no reference"."""
    problems = []
    for key in sorted({(r["seq"], r["inference"]) for r in rows}):
        group = [r for r in rows if (r["seq"], r["inference"]) == key and r["ok"]]
        ref = next((r for r in group if r["spec"] == "eager"), group[0] if group else None)
        for r in group:
            r["check"] = "ok"
            r["loss_rel_diff"] = _rel(r["loss"], ref["loss"])
            bad = (
                [f"loss {r['loss']:.6f} vs {ref['loss']:.6f}"]
                if r["loss_rel_diff"] > LOSS_RTOL
                else []
            )
            if r["grad_norm"] is not None and ref["grad_norm"] is not None:
                r["grad_norm_rel_diff"] = _rel(r["grad_norm"], ref["grad_norm"])
                if r["grad_norm_rel_diff"] > LOSS_RTOL:
                    bad.append(f"grad norm {r['grad_norm']:.6g} vs {ref['grad_norm']:.6g}")
            if bad:
                r["check"] = "MISMATCH"
                problems.append(
                    f"{r['label']} at S={r['seq']} disagrees with {ref['label']}: "
                    + "; ".join(bad)
                    + f" (rtol {LOSS_RTOL})"
                )
    return problems


def baseline_of(row: dict, rows: list[dict]) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["spec"] == BASELINE
            and r["seq"] == row["seq"]
            and r["inference"] == row["inference"]
            and r["ok"]
        ),
        None,
    )


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        base = baseline_of(r, rows)
        if r["ok"] and base:
            r["peak_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
            r["step_ratio"] = r["step_s"] / base["step_s"]
            r["compile_ratio"] = (
                r["compile_s"] / base["compile_s"]
                if r["compile_s"] is not None and base["compile_s"]
                else None
            )


def check_targets(rows: list[dict]) -> list[dict]:
    """mst (default options) against the targets, per sequence length, plus sweep flatness."""
    checks = []
    for r in rows:
        if r["mode"] != "mst" or r["group"] != "main" or not r["ok"] or r.get("peak_ratio") is None:
            continue
        where = f"S={r['seq']}" + (" inference" if r["inference"] else "")
        for what, value, limit in (
            ("peak memory", r["peak_ratio"], TARGET_PEAK_RATIO),
            ("step time", r["step_ratio"], TARGET_STEP_RATIO),
            ("compile time", r.get("compile_ratio"), TARGET_COMPILE_RATIO),
        ):
            if value is not None:
                checks.append(
                    {
                        "what": f"{what} vs {BASELINE}, {where}",
                        "value": value,
                        "limit": limit,
                        "met": value <= limit,
                    }
                )
    for key in sorted({(r["seq"], r["inference"]) for r in rows if r["group"] == "chunk_sweep"}):
        sweep = [
            r
            for r in rows
            if r["group"] == "chunk_sweep" and r["ok"] and (r["seq"], r["inference"]) == key
        ]
        if len(sweep) > 1:
            times = [r["compile_s"] for r in sweep]
            if min(times) <= 0:
                continue
            value = max(times) / max(min(times), 1e-9)
            checks.append(
                {
                    "what": f"compile time flat over the chunk sweep, S={key[0]} "
                    f"(slowest / fastest)",
                    "value": value,
                    "limit": TARGET_SWEEP_FLATNESS,
                    "met": value <= TARGET_SWEEP_FLATNESS,
                }
            )
    return checks


# ---------------------------------------------------------------- Markdown


def _f(value, fmt: str, suffix: str = "", none: str = "-") -> str:
    return none if value is None else format(value, fmt) + suffix


def _regions(mst: dict | None) -> str:
    """e.g. "2 mlp (4 chunks), 1 loss (63 chunks); skipped 2 (not_a_block)"."""
    if not mst:
        return "-"
    counts: dict[tuple, int] = {}
    for reg in mst["regions"]:
        key = (reg["mode"], reg["kind"], reg["chunks"])
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{n} {kind} ({chunks} chunks)" for (_, kind, chunks), n in counts.items())
    text = text or "**no region rewritten**"
    categories = sorted({s["category"] for s in mst["skipped"]})
    if mst["skipped"]:
        text += f"; skipped {len(mst['skipped'])} ({', '.join(categories)})"
    return text


def markdown(
    rows: list[dict],
    raws: list[dict],
    machine: dict,
    workload: dict,
    problems: list[str],
    targets: list[dict],
    plot: str | None,
    steps: int,
) -> str:
    cfg = workload["config"]
    kinds = sorted(
        {
            "inference (no_grad forward, logits)"
            if r["inference"]
            else "training step (forward + backward)"
            for r in rows
        }
    )
    sources = sorted(
        {r["compile_source"] for r in rows if r["ok"] and r.get("compile_s") is not None}
    )
    compile_text = (
        "compile = Dynamo's compile timer in the warm-up step (forward + backward graphs, Inductor "
        "code generation and C++ builds included)"
        if sources == ["dynamo timer"]
        else f"compile = {' or '.join(sources) or 'n/a'} (results from before the harness read "
        "Dynamo's compile timer: noisy when step times are)"
    )
    threads = sorted({t for r in rows for t in r.get("threads") or []})
    intro = (
        f"{' and '.join(kinds)} of `{workload['model']}` (vocab {cfg['vocab_size']}, hidden "
        f"{cfg['hidden']}, intermediate {cfg['intermediate']}, {cfg['layers']} layers, "
        f"{cfg['heads']} heads), {workload['dtype']}, batch {workload['batch']}."
    )
    machine_line = (
        f"Machine: {machine['cpu_model']}, {machine['cpus_usable']} usable cores "
        f"({'/'.join(map(str, threads)) or '?'} torch threads per process), "
        f"{machine['mem_total_gb']} GB; torch {machine['torch']}; {machine['date']}; "
        f"commit {str(machine['git_commit'])[:10]}{' (dirty)' if machine['git_dirty'] else ''}."
    )
    legend = (
        f"Peak = dynamic peak of one step (VmHWM - VmRSS before it), the max over {steps} measured "
        f"step(s); step = median wall time (min-max); CPU s = the process's CPU time of a step "
        f"(all threads; less sensitive to other load on a shared machine); {compile_text}; "
        f"ratios are to `{BASELINE}` at the same length. Each row ran in a fresh "
        f"process with a cold Inductor cache."
    )
    out = [
        "# mst_compile benchmark",
        "",
        intro,
        machine_line,
        "",
        legend,
        "",
        "| mode | seq | peak MB | peak vs inductor | step s (min-max) | step vs inductor "
        + "| compile s | loss | CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        mode = r["label"] + (" (inference)" if r["inference"] else "")
        if not r["ok"]:
            out.append(f"| {mode} | {r['seq']} | FAILED | | | | | {r['error'][:120]} | |")
            continue
        loss = f"{r['loss']:.5f}" + ("" if r.get("check") == "ok" else f" **{r.get('check')}**")
        out.append(
            f"| {mode} | {r['seq']} | {r['peak_mb']:.0f} | {_f(r.get('peak_ratio'), '.2f', 'x')} "
            f"| {r['step_s']:.2f} ({r['step_min_s']:.2f}-{r['step_max_s']:.2f}) "
            f"| {_f(r.get('step_ratio'), '.2f', 'x')} | {_f(r['compile_s'], '.1f')} | {loss} "
            f"| {_f(r['cpu_s'], '.1f')} |"
        )
    loads = [
        s.get("load_avg_1m")
        for r in raws
        for s in r.get("steps", [])
        if s.get("load_avg_1m") is not None
    ]
    if loads:
        out.append(
            f"\nMachine load (1-minute load average before each measured step): "
            f"{min(loads):.1f}-{max(loads):.1f} on {machine['cpus_usable']} cores"
            + (
                " -- **the machine was shared; step times are noisy**"
                if max(loads) > 1.5 * machine["cpus_usable"]
                else ""
            )
            + "."
        )
    out.append("")
    if problems:
        out += ["**LOSS MISMATCH** (relative tolerance 1e-3):", ""] + [f"- {p}" for p in problems]
    else:
        out.append(
            f"Loss check: every mode's loss and gradient norm agree with eager within "
            f"{LOSS_RTOL:g} (relative)."
        )
    phased = [
        r for r in rows if r["ok"] and r.get("live_after_fwd_mb") is not None and not r["inference"]
    ]
    if phased:
        explain = (
            "Per phase of the measured step, MB above the resident set before the step: "
            "the forward's peak, what the forward leaves alive for the backward (saved "
            "activations), and the peak up to the end of the backward."
        )
        out += [
            "",
            "## Where the peak is",
            "",
            explain,
            "",
            "| mode | seq | forward peak | alive after forward | backward peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in phased:
            out.append(
                f"| {r['label']} | {r['seq']} | {r['fwd_peak_mb']:.0f} "
                f"| {r['live_after_fwd_mb']:.0f} | {r['bwd_peak_mb']:.0f} |"
            )
    codes = {c for r in rows if r["ok"] and r["mode"] == "mst" for c in r.get("code") or []}
    if len(codes) > 1:
        out += [
            "",
            f"**Warning: the mst rows ran {len(codes)} different versions of mst_compile** "
            + "(the tree changed during the run; see `code` in results.json).",
        ]
    sweep = [r for r in rows if r["group"] == "chunk_sweep"]
    if sweep:
        out += [
            "",
            "## mst chunk sweep",
            "",
            "| mode | seq | regions rewritten | compile s | compile vs inductor "
            + "| Inductor kernels | peak MB | step s |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in sweep:
            if r["ok"]:
                out.append(
                    f"| {r['label']} | {r['seq']} | {_regions(r['mst'])} | {r['compile_s']:.1f} "
                    f"| {_f(r.get('compile_ratio'), '.2f', 'x')} | {_f(r.get('kernels'), 'd')} "
                    f"| {r['peak_mb']:.0f} "
                    f"| {r['step_s']:.2f} |"
                )
            else:
                out.append(f"| {r['label']} | {r['seq']} | FAILED: {r['error'][:100]} | | | | | |")
    mst_rows = [r for r in rows if r["mode"] == "mst" and r["ok"] and r["group"] == "main"]
    if mst_rows:
        out += [
            "",
            "mst regions rewritten: "
            + "; ".join(f"{r['label']} S={r['seq']}: {_regions(r['mst'])}" for r in mst_rows),
        ]
    if targets:
        out += ["", "## Targets for mst", ""]
        for t in targets:
            mark = "met" if t["met"] else "**MISSED**"
            out.append(f"- {t['what']}: {t['value']:.2f}x (target <= {t['limit']:.2f}x): {mark}")
    noted = [(r["label"], w) for r in rows if r["ok"] for w in r.get("warnings", [])]
    if noted:
        out += ["", "Warnings during warm-up:", ""] + [f"- {m}: {w[:200]}" for m, w in noted]
    out += ["", "Modes:", ""] + [
        f"- `{m}`: {d}" for m, d in DESCRIPTIONS.items() if any(r["mode"] == m for r in rows)
    ]
    if plot:
        out += ["", f"![peak memory]({plot})"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- plot


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r["ok"] and not r["inference"]] or [r for r in rows if r["ok"]]
    if not ok:
        return False
    seqs = sorted({r["seq"] for r in ok})
    labels = list(dict.fromkeys(r["label"] for r in ok))
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(13, 5))
    if len(seqs) > 1:
        for label in labels:
            pts = sorted((r["seq"], r["peak_mb"], r["step_s"]) for r in ok if r["label"] == label)
            ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax_time.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        for ax in (ax_mem, ax_time):
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.set_xlabel("sequence length (tokens)")
        ax_mem.legend(fontsize=8)
    else:
        peak = [next(r["peak_mb"] for r in ok if r["label"] == lb) for lb in labels]
        step = [next(r["step_s"] for r in ok if r["label"] == lb) for lb in labels]
        ax_mem.bar(labels, peak, color="tab:blue")
        ax_time.bar(labels, step, color="tab:orange")
        for ax, values, fmt in ((ax_mem, peak, "{:.0f}"), (ax_time, step, "{:.2f}")):
            for i, v in enumerate(values):
                ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=8)
            ax.tick_params(axis="x", rotation=35)
            plt.setp(ax.get_xticklabels(), ha="right")
        ax_mem.set_xlabel(f"mode (S={seqs[0]})")
        ax_time.set_xlabel(f"mode (S={seqs[0]})")
    ax_mem.set_ylabel("dynamic peak memory of a step (MB)")
    ax_time.set_ylabel("step time (s, median)")
    ax_mem.set_title("memory")
    ax_time.set_title("time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- everything


def write(out_dir: Path, raw: list[dict], machine: dict, workload: dict, settings: dict) -> dict:
    rows = summarize_all(raw)
    problems = check_losses(rows)
    add_ratios(rows)
    targets = check_targets(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_name = "memory.png"
    has_plot = plot(rows, out_dir / plot_name)
    md = markdown(
        rows,
        raw,
        machine,
        workload,
        problems,
        targets,
        plot_name if has_plot else None,
        settings["steps"],
    )
    (out_dir / "results.md").write_text(md)
    doc = {
        "machine": machine,
        "workload": workload,
        "settings": settings,
        "summary": rows,
        "loss_problems": problems,
        "targets": targets,
        "raw": raw,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2))
    return {"markdown": md, "problems": problems, "targets": targets, "rows": rows}
