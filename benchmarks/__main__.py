"""python -m benchmarks: memory and time of every mode, one fresh process per configuration.

    python -m benchmarks                         # S=16384, every available mode, 3 measured steps
    python -m benchmarks --quick                 # S=4096, 1 measured step (a few minutes)
    python -m benchmarks --seq 4096,8192,16384   # memory vs sequence length plot
    python -m benchmarks --chunk-sweep           # also mst with chunks 4, 8, 16, 32
    python -m benchmarks --modes inductor,mst:chunks=8 --inference

Writes results.json, results.md and memory.png to --out (default bench-out/) and prints the
Markdown table. Exit status 1 when a run failed or a mode's loss disagrees with eager.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import report, workload
from .machine import machine_info
from .modes import ModeSpec, available_modes, unavailable_reason
from .runner import Run, run_one

DEFAULT_SEQ = 16384
QUICK_SEQ = 4096
SWEEP_CHUNKS = (4, 8, 16, 32)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


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
    return args


def plan(args: argparse.Namespace) -> tuple[list[Run], list[str]]:
    """The runs in execution order, and the modes skipped because torch lacks them."""
    specs = [
        ModeSpec.parse(m) for m in (args.modes.split(",") if args.modes else available_modes())
    ]
    if args.mst_chunks:
        specs = [
            ModeSpec("mst", (("chunks", args.mst_chunks),)) if s.spec == "mst" else s for s in specs
        ]
    skipped = [
        f"{s.label}: {unavailable_reason(s.name)}" for s in specs if unavailable_reason(s.name)
    ]
    specs = [s for s in specs if not unavailable_reason(s.name)]
    runs = []
    for seq in args.seq:
        for _ in range(args.rounds):
            runs += [Run(s, seq, args.steps, args.inference, threads=args.threads) for s in specs]
        if args.chunk_sweep:
            runs += [
                Run(
                    ModeSpec("mst", (("chunks", c),)),
                    seq,
                    args.steps,
                    args.inference,
                    group="chunk_sweep",
                    threads=args.threads,
                )
                for c in args.sweep_chunks
            ]
    return runs, skipped


def progress_line(i: int, n: int, result: dict) -> str:
    head = f"[{i}/{n}] {result['label']:<24} S={result['seq']:<6}"
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
        out = report.write(args.out, doc["raw"], doc["machine"], doc["workload"], doc["settings"])
        print(out["markdown"])
        return 0
    runs, skipped = plan(args)
    for s in skipped:
        print(f"skipping {s}", file=sys.stderr)
    machine = machine_info()
    print(
        f"{len(runs)} runs on {machine['cpu_model']} ({machine['cpus_usable']} cores), "
        f"torch {machine['torch']}; logs in {args.out / 'logs'}",
        flush=True,
    )
    raw = []
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        result = run_one(run, args.out / "logs", args.timeout)
        raw.append(result)
        print(progress_line(i, len(runs), result), flush=True)
    settings = {
        "seq": args.seq,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "inference": args.inference,
        "chunk_sweep": args.sweep_chunks if args.chunk_sweep else None,
        "modes": list(dict.fromkeys(r.spec.spec for r in runs if r.group == "main")),
        "skipped_modes": skipped,
        "argv": sys.argv[1:] if argv is None else argv,
        "total_s": time.perf_counter() - start,
    }
    out = report.write(args.out, raw, machine, workload.describe(), settings)
    print()
    print(out["markdown"])
    print(
        f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
        + (f", {args.out / 'memory.png'}" if (args.out / "memory.png").exists() else "")
    )
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
