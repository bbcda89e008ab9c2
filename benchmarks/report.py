"""Turn the raw per-process results into results.json, results.md and PNG plots (plots.py).

Also the two checks the parent makes: every mode computes the same loss (and gradient norm)
as the reference mode, and how mst compares with the targets of the "proof of memory" issue.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import plots
from .modes import BASELINE, COMPILED, DESCRIPTIONS

LOSS_RTOL = {"float32": 1e-3, "bfloat16": 2e-2}  # by the workload's dtype
# Targets for backend="mst" relative to Inductor (issues "proof of memory" and "speed").
TARGET_PEAK_RATIO = 0.25
TARGET_STEP_RATIO = 1.05  # sequences of 4096 tokens and more
TARGET_STEP_RATIO_SHORT = 1.10  # shorter ones (short chunks run short matmuls)
TARGET_COMPILE_RATIO = 2.0
TARGET_WARM_COMPILE_RATIO = 1.5  # a second process compiling from the first one's caches
TARGET_SWEEP_FLATNESS = 1.25  # compile time at the slowest chunk count / at the fastest


# ---------------------------------------------------------------- summaries and checks


def _key(raw: dict) -> tuple:
    return raw["group"], raw["spec"], raw.get("checkpointing", False), raw["seq"], raw["inference"]


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
    row["checkpointing"] = first.get("checkpointing", False)
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
        warm_compile_s=statistics.median(warm)
        if compiled and (warm := [r["warm_compile_s"] for r in runs if r.get("warm_compile_s")])
        else None,
        timing="separate process, default allocator"
        if "mem_first_step_s" in first
        else "same process as memory",
        live_after_fwd_mb=_max_of(steps, "live_after_fwd_mb"),
        fwd_peak_mb=_max_of(steps, "fwd_peak_mb"),
        bwd_peak_mb=_max_of(steps, "bwd_peak_mb"),
        code=sorted({json.dumps(r.get("code"), sort_keys=True) for r in runs}),
        kernels=(runs[-1].get("inductor_metrics") or {}).get("generated_kernel_count"),
        threads=sorted({r.get("threads") for r in runs}),
        tflops=statistics.median(flops / t for t in times) / 1e12
        if (flops := first.get("flops_per_step")) and first.get("device") == "cuda"
        else None,
        matmul_tflops=first.get("matmul_tflops"),
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


def check_losses(rows: list[dict], rtol: float) -> list[str]:
    """Compare every row with the eager row (no checkpointing) of its (seq, inference); returns
    the mismatches and sets row["check"] to "ok" or "MISMATCH"."""
    problems = []
    for key in sorted({(r["seq"], r["inference"]) for r in rows}):
        group = [r for r in rows if (r["seq"], r["inference"]) == key and r["ok"]]
        ref = next(
            (r for r in group if r["spec"] == "eager" and not r["checkpointing"]),
            group[0] if group else None,
        )
        for r in group:
            r["check"] = "ok"
            r["loss_rel_diff"] = _rel(r["loss"], ref["loss"])
            bad = (
                [f"loss {r['loss']:.6f} vs {ref['loss']:.6f}"] if r["loss_rel_diff"] > rtol else []
            )
            if r["grad_norm"] is not None and ref["grad_norm"] is not None:
                r["grad_norm_rel_diff"] = _rel(r["grad_norm"], ref["grad_norm"])
                if r["grad_norm_rel_diff"] > rtol:
                    bad.append(f"grad norm {r['grad_norm']:.6g} vs {ref['grad_norm']:.6g}")
            if bad:
                r["check"] = "MISMATCH"
                problems.append(
                    f"{r['label']} at S={r['seq']} disagrees with {ref['label']}: "
                    + "; ".join(bad)
                    + f" (rtol {rtol:g})"
                )
    return problems


def baseline_of(row: dict, rows: list[dict]) -> dict | None:
    return next(
        (
            r
            for r in rows
            if r["spec"] == BASELINE
            and not r["checkpointing"]
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
            r["warm_compile_ratio"] = (
                r["warm_compile_s"] / base["warm_compile_s"]
                if r.get("warm_compile_s") is not None and base.get("warm_compile_s")
                else None
            )


def check_targets(rows: list[dict]) -> list[dict]:
    """mst (default options) against the targets, per sequence length, plus sweep flatness."""
    checks = []
    for r in rows:
        if (
            r["mode"] != "mst"
            or r["group"] != "main"
            or r["checkpointing"]
            or not r["ok"]
            or r.get("peak_ratio") is None
        ):
            continue
        where = f"S={r['seq']}" + (" inference" if r["inference"] else "")
        step_limit = TARGET_STEP_RATIO if r["seq"] >= 4096 else TARGET_STEP_RATIO_SHORT
        for what, value, limit in (
            ("peak memory", r["peak_ratio"], TARGET_PEAK_RATIO),
            ("step time", r["step_ratio"], step_limit),
            ("compile time", r.get("compile_ratio"), TARGET_COMPILE_RATIO),
            ("warm-start compile time", r.get("warm_compile_ratio"), TARGET_WARM_COMPILE_RATIO),
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


def _intro(rows: list[dict], workload: dict, machine: dict) -> list[str]:
    kinds = sorted(
        {
            "inference prefill (no_grad forward, last position's logits)"
            if r["inference"]
            else "training step (forward + backward)"
            for r in rows
        }
    )
    cfg = ", ".join(f"{k} {v}" for k, v in workload["config"].items())
    threads = sorted({t for r in rows for t in r.get("threads") or []})
    where = (
        f"{machine['device_name']}"
        if machine.get("device") == "cuda"
        else f"{machine['cpu_model']}, {machine['cpus_usable']} usable cores "
        f"({'/'.join(map(str, threads)) or '?'} torch threads per process), "
        f"{machine['mem_total_gb']} GB"
    )
    return [
        (
            f"{' and '.join(kinds)} of {workload['model']} (workload `{workload.get('workload', '?')}`"
            f": {cfg}; {workload['parameters'] / 1e6:.1f}M parameters), {workload['dtype']}, "
            f"batch {workload['batch']}."
            + (f" Labels of the first {100 * workload['ignore_fraction']:.0f}% of every sequence "
               "are -100 (a masked prompt)." if workload.get("ignore_fraction") else "")
        ),
        (
            f"Machine: {where}; torch {machine['torch']}; {machine['date']}; "
            f"commit {str(machine['git_commit'])[:10]}{' (dirty)' if machine['git_dirty'] else ''}."
        ),
    ]


def _legend(rows: list[dict], machine: dict, steps: int) -> str:
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
    if machine.get("device") == "cuda":
        memory = "peak = torch.cuda.max_memory_allocated() - memory_allocated() before the step"
        timing = "step = median CUDA-event time (min-max)"
    else:
        memory = "peak = dynamic peak of one step (VmHWM - VmRSS before it)"
        separate = any(r.get("timing", "").startswith("separate") for r in rows if r["ok"])
        timing = (
            "step = median wall time (min-max)"
            + (", measured in a separate process with the default allocator (peak memory "
               "comes from a process with MALLOC_MMAP_THRESHOLD_=65536)" if separate else
               ", measured in the memory process (MALLOC_MMAP_THRESHOLD_=65536: per-chunk "
               "allocations cost more than with the default allocator)")
            + "; CPU s = the process's CPU time of a step "
            "(all threads; less sensitive to other load on a shared machine)"
        )
    return (
        f"{memory}, the max over {steps} measured step(s); {timing}; {compile_text}; ratios are "
        f"to `{BASELINE}` (no checkpointing) at the same length; +AC = activation checkpointing "
        "of every block. Each row ran in a fresh process with a cold Inductor cache."
    )


def _main_table(rows: list[dict], gpu: bool) -> list[str]:
    extra = "| TFLOP/s " if gpu else "| CPU s "
    out = [
        (
            "| mode | seq | peak MB | peak vs inductor | step s (min-max) | step vs inductor "
            f"| compile s (warm) | loss {extra}|"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        mode = r["label"] + (" (inference)" if r["inference"] else "")
        if not r["ok"]:
            out.append(f"| {mode} | {r['seq']} | FAILED | | | | | {r['error'][:120]} | |")
            continue
        loss = f"{r['loss']:.5f}" + ("" if r.get("check") == "ok" else f" **{r.get('check')}**")
        last = _f(r.get("tflops"), ".1f") if gpu else _f(r["cpu_s"], ".1f")
        warm = f" ({r['warm_compile_s']:.1f})" if r.get("warm_compile_s") is not None else ""
        out.append(
            f"| {mode} | {r['seq']} | {r['peak_mb']:.0f} | {_f(r.get('peak_ratio'), '.2f', 'x')} "
            f"| {r['step_s']:.2f} ({r['step_min_s']:.2f}-{r['step_max_s']:.2f}) "
            f"| {_f(r.get('step_ratio'), '.2f', 'x')} | {_f(r['compile_s'], '.1f')}{warm} "
            f"| {loss} | {last} |"
        )
    return out


def _load_line(raws: list[dict], machine: dict) -> list[str]:
    loads = [s["load_avg_1m"] for r in raws for s in r.get("steps", []) if "load_avg_1m" in s]
    if not loads or machine.get("device") == "cuda":
        return []
    shared = max(loads) > 1.5 * machine["cpus_usable"]
    return [
        f"\nMachine load (1-minute load average before each measured step): "
        f"{min(loads):.1f}-{max(loads):.1f} on {machine['cpus_usable']} cores"
        + (" -- **the machine was shared; step times are noisy**" if shared else "")
        + "."
    ]


def _phase_table(rows: list[dict]) -> list[str]:
    phased = [r for r in rows if r["ok"] and not r["inference"] and r.get("live_after_fwd_mb")]
    if not phased:
        return []
    out = [
        "",
        "## Where the peak is",
        "",
        (
            "Per phase of the measured step, MB above the memory before the step: the forward's "
            "peak, what the forward leaves alive for the backward (saved activations), and the peak "
            "up to the end of the backward."
        ),
        "",
        "| mode | seq | forward peak | alive after forward | backward peak |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in phased:
        out.append(
            f"| {r['label']} | {r['seq']} | {r['fwd_peak_mb']:.0f} "
            f"| {r['live_after_fwd_mb']:.0f} | {r['bwd_peak_mb']:.0f} |"
        )
    return out


def _search_table(searches: list[dict]) -> list[str]:
    if not searches:
        return []
    budget = searches[0]["budget_mb"]
    base = next(
        (s["longest_seq"] for s in searches if s["spec"] == BASELINE and not s["checkpointing"]),
        None,
    )
    out = [
        "",
        f"## Longest training sequence within {budget:.0f} MB",
        "",
        (
            "A search per mode (benchmarks/search.py): lengths double until a step's dynamic peak "
            "exceeds the budget, then linear interpolation between the longest that fit and the "
            "shortest that did not; only measured lengths count."
        ),
        "",
        "| mode | longest seq | vs inductor | first over | probes (seq: peak MB) |",
        "|---|---:|---:|---:|---|",
    ]
    for s in searches:
        ratio = s["longest_seq"] / base if base and s["longest_seq"] else None
        probes = ", ".join(
            f"{p['seq']}: {p['peak_mb']:.0f}" if p["ok"] else f"{p['seq']}: failed"
            for p in s["probes"]
        )
        out.append(
            f"| {s['label']} | {_f(s['longest_seq'], 'd', none='none fit')} "
            f"| {_f(ratio, '.1f', 'x')} | {_f(s['first_over'], 'd')} | {probes} |"
        )
    return out


def _floor_table(main: list[dict]) -> list[str]:
    """mst's step against its floor: the matmuls its backward loops recompute, as a share of
    the step's matmul work (counted on the eager model), and what the step costs above that."""
    rows = [r for r in main if r["ok"] and r["mode"] == "mst" and (r.get("mst") or {}).get("step_flops")]
    if not rows:
        return []
    out = [
        "",
        "## mst's recompute floor",
        "",
        ("Recomputed = matmul FLOPs mst's backward loops compute again (per region kind: regions x "
        "GFLOP each); floor = recomputed / the step's FLOPs (eager model, torch's FlopCounterMode); "
        "above floor = step vs inductor - 1 - floor: the cost of chunking itself (per-chunk calls, "
        "copies, smaller matmuls); negative where mst's step beats Inductor's by more than the "
        "recompute (smaller working sets per chunk, ignored rows skipped)."),
        "",
        "| mode | seq | recomputed, per region | step GFLOP | floor | step vs inductor | above floor |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        regions = r["mst"]["regions"]
        recomputed = sum(reg.get("recompute_flops", 0) for reg in regions)
        floor = recomputed / r["mst"]["step_flops"]
        kinds: dict[tuple[str, int], int] = {}
        for reg in regions:
            key = (reg["kind"], reg.get("recompute_flops", 0))
            kinds[key] = kinds.get(key, 0) + 1
        per_region = ", ".join(f"{n} {kind} x {flops / 1e9:.1f}" for (kind, flops), n in kinds.items())
        ratio = r.get("step_ratio")
        above = None if ratio is None else 100 * (ratio - 1 - floor)
        out.append(
            f"| {r['label']} | {r['seq']} | {per_region} | {r['mst']['step_flops'] / 1e9:.0f} "
            f"| {100 * floor:.1f}% | {_f(ratio, '.2f', 'x')} | {_f(above, '+.1f', '%')} |"
        )
    return out


def _sweep_table(sweep: list[dict]) -> list[str]:
    if not sweep:
        return []
    out = [
        "",
        "## mst over chunk counts",
        "",
        (
            "| mode | seq | regions rewritten | peak MB | peak vs inductor | step s "
            "| step vs inductor | compile s | Inductor kernels |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sweep:
        if not r["ok"]:
            out.append(f"| {r['label']} | {r['seq']} | FAILED: {r['error'][:100]} |" + " |" * 6)
            continue
        out.append(
            f"| {r['label']} | {r['seq']} | {_regions(r['mst'])} | {r['peak_mb']:.0f} "
            f"| {_f(r.get('peak_ratio'), '.2f', 'x')} | {r['step_s']:.2f} "
            f"| {_f(r.get('step_ratio'), '.2f', 'x')} | {_f(r['compile_s'], '.1f')} "
            f"| {_f(r.get('kernels'), 'd')} |"
        )
    return out


def markdown(
    rows: list[dict],
    raws: list[dict],
    machine: dict,
    workload: dict,
    problems: list[str],
    targets: list[dict],
    searches: list[dict],
    plots: list[str],
    steps: int,
    rtol: float,
) -> str:
    main = [r for r in rows if r["group"] == "main"]
    gpu = machine.get("device") == "cuda"
    out = ["# mst_compile benchmark", "", *_intro(main or rows, workload, machine), ""]
    out += [_legend(rows, machine, steps), "", *_main_table(main, gpu), *_load_line(raws, machine)]
    if gpu and (rate := next((r["matmul_tflops"] for r in main if r.get("matmul_tflops")), None)):
        out.append(
            f"\nThe device's measured bf16 matmul rate (8192^3): {rate:.0f} TFLOP/s; "
            "TFLOP/s above counts 6 x parameters x tokens per training step."
        )
    out.append("")
    if problems:
        out += [f"**LOSS MISMATCH** (relative tolerance {rtol:g}):", ""]
        out += [f"- {p}" for p in problems]
    else:
        out.append(
            f"Loss check: every mode's loss and gradient norm agree with eager within "
            f"{rtol:g} (relative)."
        )
    out += _phase_table(main)
    out += _search_table(searches)
    out += _floor_table(main)
    out += _sweep_table([r for r in rows if r["group"] == "chunk_sweep"])
    codes = {c for r in rows if r["ok"] and r["mode"] == "mst" for c in r.get("code") or []}
    if len(codes) > 1:
        out += [
            "",
            f"**Warning: the mst rows ran {len(codes)} different versions of mst_compile** "
            + "(the tree changed during the run; see `code` in results.json).",
        ]
    mst_rows = [r for r in main if r["mode"] == "mst" and r["ok"]]
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
    noted = [(r["label"], w) for r in main if r["ok"] for w in r.get("warnings", [])]
    if noted:
        out += ["", "Warnings during warm-up:", ""] + [f"- {m}: {w[:200]}" for m, w in noted]
    out += ["", "Modes:", ""] + [
        f"- `{m}`: {d}" for m, d in DESCRIPTIONS.items() if any(r["mode"] == m for r in rows)
    ]
    out += [""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- everything


def write(
    out_dir: Path,
    raw: list[dict],
    machine: dict,
    workload: dict,
    settings: dict,
    searches: list[dict] = (),
) -> dict:
    rows = summarize_all(raw)
    rtol = LOSS_RTOL.get(workload.get("dtype"), LOSS_RTOL["bfloat16"])
    problems = check_losses(rows, rtol)
    add_ratios(rows)
    targets = check_targets(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    searches = list(searches)
    made = plots.write_all(out_dir, rows, searches)
    md = markdown(
        rows, raw, machine, workload, problems, targets, searches, made, settings["steps"], rtol
    )
    (out_dir / "results.md").write_text(md)
    doc = {
        "machine": machine,
        "workload": workload,
        "settings": settings,
        "summary": rows,
        "searches": searches,
        "loss_problems": problems,
        "targets": targets,
        "raw": raw,
    }
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2))
    return {
        "markdown": md,
        "problems": problems,
        "targets": targets,
        "rows": rows,
        "files": ["results.json", "results.md", *made],
    }
