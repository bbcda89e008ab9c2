"""Where one mode's step time goes, kernel by kernel: a diagnostic, not a benchmark.

    python -m benchmarks.profile_step --mode mst --workload mlp-fullvocab --seq 4096
    python -m benchmarks.profile_step --mode inductor --workload mlp-fullvocab --by-shape

Builds the mode as `python -m benchmarks` does, runs two warm-up steps (compilation), times
one step, then prints torch.profiler's table of one more step by self CPU time, with
Inductor's C++ kernels named (`cpp.enable_kernel_profile`). CPU only.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from . import workload
from .modes import ModeSpec, build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", required=True, help="a mode spec, e.g. mst or mst:chunks=8")
    parser.add_argument("--workload", default="proxy", help="a benchmarks.workload name")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=15, help="kernels to list (default 15)")
    parser.add_argument("--by-shape", action="store_true",
                        help="then the matrix products (aten::mm, aten::addmm_) by their operand shapes")
    args = parser.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True
    work = workload.get(args.workload)
    model = work.build_model("cpu")
    ids, labels = work.make_inputs(args.seq)
    forward = build(ModeSpec.parse(args.mode), model)

    def step() -> None:
        forward(ids, labels).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    step()
    print(f"step {time.perf_counter() - start:.3f} s")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=70))
    if args.by_shape:
        _print_products_by_shape(prof)


def _print_products_by_shape(prof) -> None:
    """One line per (product, operand shapes): calls and self CPU time."""
    totals: dict[tuple[str, str], tuple[float, int]] = {}
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm_"):
            key = (event.name, " x ".join(str(s) for s in event.input_shapes[:3] if s))
            time_us, calls = totals.get(key, (0.0, 0))
            totals[key] = (time_us + event.self_cpu_time_total, calls + 1)
    print("\n| product | operand shapes | calls | self CPU ms |\n|---|---|---:|---:|")
    for (name, shapes), (time_us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {shapes} | {calls} | {time_us / 1e3:.1f} |")


if __name__ == "__main__":
    main()
