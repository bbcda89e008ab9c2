"""python -m benchmarks: memory and time of every mode, one fresh process per configuration.

    python -m benchmarks --quick                    # S=4096, 1 step, every mode with and without AC
    python -m benchmarks                            # S=16384, 3 measured steps
    python -m benchmarks --seq 4096,8192,16384      # memory and time vs sequence length
    python -m benchmarks --workload llama-fullvocab # HF Llama, vocab 128256: the head dominates
    python -m benchmarks --chunk-sweep --seq 1024,16384  # mst over chunk counts, short and long
    python -m benchmarks --max-seq-budget-mb 1024   # longest sequence each mode trains in 1 GB
    python -m benchmarks --inference                # a no-grad prefill (last position's logits)

Every mode runs with and without activation checkpointing of its blocks (--checkpointing).
On a machine with CUDA the same harness measures the GPU (allocator statistics, CUDA events)
and the default workload is llama-1b in bf16. Writes results.json, results.md and PNG plots to
--out (default bench-out/) and prints the Markdown table. Exit status 1 when a run failed or a
mode's loss disagrees with eager.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import report, workload
from .machine import machine_info
from .modes import ModeSpec, available_modes, unavailable_reason
from .runner import Run, mode_label, run_one
from .search import longest_sequence

DEFAULT_SEQ = 16384
QUICK_SEQ = 4096
SWEEP_CHUNKS = (4, 8, 16, 32)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument(
        "--seq",
        type=_int_list,
        help=f"sequence length(s), comma separated "
        f"(default {DEFAULT_SEQ}; {QUICK_SEQ} with --quick)",
    )
    p.add_argument(
        "--modes",
        help="comma-separated mode specs (default: every available mode: "
        f"{', '.join(available_modes())}); options as mst:chunks=8",
    )
    p.add_argument("--mst-chunks", type=int, help="pass options={'chunks': N} to the mst mode")
    p.add_argument(
        "--steps", type=int, help="measured steps per process (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="processes per configuration, modes alternating A B A B (default 1)",
    )
    p.add_argument(
        "--workload",
        choices=sorted(workload.WORKLOADS),
        help="the model (default: proxy on the CPU, llama-1b on a GPU)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where to run (default: cuda if available)",
    )
    p.add_argument(
        "--checkpointing",
        choices=("both", "off", "on"),
        default="both",
        help="activation checkpointing of every block: run each mode without and with it "
        "(both, the default), or only off / on; inference runs only without",
    )
    p.add_argument(
        "--max-seq-budget-mb",
        type=float,
        help="also search, per mode (and checkpointing), the longest training sequence whose "
        "dynamic peak stays within this many MB",
    )
    p.add_argument(
        "--max-seq-start",
        type=int,
        default=2048,
        help="first length the search probes (default 2048); it doubles from there",
    )
    p.add_argument(
        "--max-seq-limit",
        type=int,
        default=262144,
        help="longest length the search probes (default 262144)",
    )
    p.add_argument(
        "--max-seq-probes",
        type=int,
        default=7,
        help="probes per mode in the search (default 7)",
    )
    p.add_argument(
        "--inference",
        action="store_true",
        help="measure a torch.no_grad forward returning logits instead of a training step",
    )
    p.add_argument(
        "--chunk-sweep",
        action="store_true",
        help=f"also run mst with chunks in {SWEEP_CHUNKS} (compile time and peak)",
    )
    p.add_argument(
        "--sweep-chunks",
        type=_int_list,
        default=list(SWEEP_CHUNKS),
        help="chunk counts of the sweep (default 4,8,16,32)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per child process (OMP_NUM_THREADS; default: torch's own)",
    )
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="also compile each configuration in a process that finds the caches of the "
        "first (the warm-start compile time)",
    )
    p.add_argument(
        "--one-process",
        action="store_true",
        help="CPU: take step times from the memory process (MALLOC_MMAP_THRESHOLD_ set) "
        "instead of a second process with the default allocator: half the processes, "
        "step times inflated by per-chunk allocation",
    )
    p.add_argument(
        "--ignore-fraction",
        type=_fraction,
        default=0.0,
        help="training: set the labels of the first FRACTION of every sequence to -100, as "
        "supervised fine-tuning masks the prompt (default 0: only the last position)",
    )
    p.add_argument("--quick", action="store_true", help=f"S={QUICK_SEQ} and 1 measured step")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process (default 1800)")
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: rewrite the report in --out from an earlier results.json",
    )
    args = p.parse_args(argv)
    args.seq = args.seq or [QUICK_SEQ if args.quick else DEFAULT_SEQ]
    args.steps = args.steps or (1 if args.quick else 3)
    args.device = args.device or workload.default_device()
    args.workload = args.workload or workload.default_workload(args.device)
    if args.max_seq_budget_mb is not None and args.max_seq_budget_mb <= 0:
        p.error("--max-seq-budget-mb must be positive")
    if any(s <= 0 for s in args.seq) or args.steps <= 0 or args.rounds <= 0:
        p.error("--seq, --steps and --rounds must be positive")
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """What every run of this invocation shares."""
    return {
        "steps": args.steps,
        "inference": args.inference,
        "workload": args.workload,
        "device": args.device,
        "threads": args.threads,
        "separate_timing": not args.one_process,
        "warm_start": args.warm_start,
        "ignore_fraction": args.ignore_fraction,
    }


def checkpointing_variants(args: argparse.Namespace) -> list[bool]:
    if args.inference:
        return [False]  # nothing is saved for a backward: checkpointing changes nothing
    return {"both": [False, True], "off": [False], "on": [True]}[args.checkpointing]


def plan(args: argparse.Namespace) -> tuple[list[Run], list[ModeSpec], list[str]]:
    """The runs in execution order, the modes, and the modes skipped because torch lacks
    them."""
    specs = [
        ModeSpec.parse(m) for m in (args.modes.split(",") if args.modes else available_modes())
    ]
    if args.mst_chunks:
        specs = [
            ModeSpec("mst", (("chunks", args.mst_chunks),)) if s.spec == "mst" else s for s in specs
        ]
    skipped = [
        f"{s.label}: {unavailable_reason(s.name, args.workload)}"
        for s in specs if unavailable_reason(s.name, args.workload)
    ]
    specs = [s for s in specs if not unavailable_reason(s.name, args.workload)]
    common = run_settings(args)
    runs = []
    for seq in args.seq:
        for _ in range(args.rounds):
            runs += [
                Run(s, seq, checkpointing=ac, **common)
                for ac in checkpointing_variants(args)
                for s in specs
            ]
        if args.chunk_sweep:
            runs += [
                Run(ModeSpec("mst", (("chunks", c),)), seq, group="chunk_sweep", **common)
                for c in args.sweep_chunks
            ]
    return runs, specs, skipped


def search_longest(args: argparse.Namespace, specs: list[ModeSpec], raw: list[dict]) -> list:
    """The longest-sequence search for every mode and checkpointing variant; every probe's
    result is appended to `raw` (group "max_seq")."""
    searches = []
    for ac in checkpointing_variants(args):
        for spec in specs:

            def probe(seq: int, spec: ModeSpec = spec, ac: bool = ac) -> dict:
                settings = {**run_settings(args), "steps": 1, "inference": False,
                            "separate_timing": False, "warm_start": False}  # memory only
                run = Run(spec, seq, checkpointing=ac, group="max_seq", **settings)
                result = run_one(run, args.out / "logs", args.timeout)
                raw.append(result)
                print(f"  search probe: {progress_line(result)}", flush=True)
                if result["ok"]:
                    result["peak_mb"] = max(s["peak_mb"] for s in result["steps"])
                return result

            found = longest_sequence(
                probe,
                args.max_seq_budget_mb,
                start=args.max_seq_start,
                limit=args.max_seq_limit,
                max_probes=args.max_seq_probes,
            )
            label = mode_label(spec, ac)
            print(
                f"{label}: longest sequence within {args.max_seq_budget_mb:.0f} MB: "
                f"{found.longest_seq} (first over: {found.first_over})",
                flush=True,
            )
            searches.append(
                {"label": label, "spec": spec.spec, "checkpointing": ac, **found.as_dict()}
            )
    return searches


def progress_line(result: dict) -> str:
    head = f"{result['label']:<28} S={result['seq']:<6}"
    if not result["ok"]:
        return f"{head} FAILED ({result['process_s']:.0f} s): {result['error']}"
    steps = result["steps"]
    step = sorted(s["step_s"] for s in steps)[len(steps) // 2]
    return (
        f"{head} peak {max(s['peak_mb'] for s in steps):7.0f} MB  step {step:6.2f} s  "
        f"first step {result['first_step_s']:6.1f} s  loss {steps[-1]['loss']:.5f}  "
        f"(process {result['process_s']:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        import json

        doc = json.loads(args.from_json.read_text())
        out = report.write(
            args.out,
            doc["raw"],
            doc["machine"],
            doc["workload"],
            doc["settings"],
            doc.get("searches", []),
        )
        print(out["markdown"])
        return 0
    if args.inference and args.max_seq_budget_mb:
        print("the longest-sequence search measures training: drop --inference", file=sys.stderr)
        return 2
    runs, specs, skipped = plan(args)
    for s in skipped:
        print(f"skipping {s}", file=sys.stderr)
    machine = machine_info(args.device)
    print(
        f"{len(runs)} runs of {args.workload} on {machine['device_name']}, "
        f"torch {machine['torch']}; logs in {args.out / 'logs'}",
        flush=True,
    )
    raw = []
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        result = run_one(run, args.out / "logs", args.timeout)
        raw.append(result)
        print(f"[{i}/{len(runs)}] {progress_line(result)}", flush=True)
    searches = []
    if args.max_seq_budget_mb:
        searches = search_longest(args, specs, raw)
    settings = {
        "seq": args.seq,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "inference": args.inference,
        "checkpointing": args.checkpointing,
        "ignore_fraction": args.ignore_fraction,
        "chunk_sweep": args.sweep_chunks if args.chunk_sweep else None,
        "max_seq_budget_mb": args.max_seq_budget_mb,
        "modes": [s.spec for s in specs],
        "skipped_modes": skipped,
        "argv": sys.argv[1:] if argv is None else argv,
        "total_s": time.perf_counter() - start,
    }
    described = {**workload.get(args.workload).describe(), "ignore_fraction": args.ignore_fraction}
    out = report.write(args.out, raw, machine, described, settings, searches)
    print()
    print(out["markdown"])
    print(f"wrote {', '.join(str(args.out / f) for f in out['files'])}")
    failed = [r for r in out["rows"] if not r["ok"]]
    if out["problems"] or failed:
        bar = "!" * 78
        print(f"\n{bar}", file=sys.stderr)
        for p in out["problems"]:
            print(f"LOSS MISMATCH: {p}", file=sys.stderr)
        for r in failed:
            print(f"FAILED: {r['label']} S={r['seq']}: {r['error']}", file=sys.stderr)
        print(bar, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
