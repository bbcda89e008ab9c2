"""One mode, one workload, one sequence length, in this process (benchmarks/README.md, "How we measure").

    MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.measure --mode mst --seq 4096 --out r.json

The parent (runner.py) starts this in a fresh process per configuration. Steps:
1. build the seeded model (activation checkpointing on or off) and inputs, build the mode's
   forward (nothing compiled yet);
2. one warm-up step (compilation happens there), timed as the first step; Dynamo's own
   compile timers are read after it; drop the grads;
3. per measured step, through a meter: on the CPU, reset the high-water mark (write "5" to
   /proc/self/clear_refs), read VmRSS, run the forward, read VmHWM and VmRSS (the forward's
   peak and what it leaves alive for the backward), reset the mark again, run the backward,
   read VmHWM; on a GPU the same from torch.cuda.memory_allocated / max_memory_allocated
   (reset_peak_memory_stats), timed with CUDA events. Dynamic peak of the step = max(forward,
   backward high-water mark) - memory before the step. The reads between the phases are not
   timed. The loss (inference: the mean logsumexp of the prefill's logits) and the gradient
   norm are read after the step, so they never count; then the grads are dropped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

import torch

from . import workload
from .flops import step_flops
from .modes import ModeSpec, build

MB = 2**20


def status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class CpuMeter:
    """Process memory (VmRSS / VmHWM) and host wall-clock time."""

    def memory(self) -> int:
        return status_bytes("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return status_bytes("VmHWM")

    def start_timer(self):
        return time.perf_counter()

    def elapsed(self, start) -> float:
        return time.perf_counter() - start


class CudaMeter:
    """The CUDA caching allocator's statistics and CUDA-event time."""

    def memory(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def start_timer(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(self, start) -> float:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000


def make_meter(device: str) -> CpuMeter | CudaMeter:
    return CudaMeter() if device == "cuda" else CpuMeter()


def run_step(
    forward, ids, labels, inference: bool, meter, between=None
) -> tuple[torch.Tensor, float, float]:
    """One step; returns its output (detached loss, or logits) and forward / backward seconds.
    `between()` runs after the forward and before the backward, untimed."""
    start = meter.start_timer()
    if inference:
        with torch.no_grad():
            out = forward(ids)
        fwd_s = meter.elapsed(start)
        if between:
            between()
        return out, fwd_s, 0.0
    loss = forward(ids, labels)
    fwd_s = meter.elapsed(start)
    if between:
        between()
    mid = meter.start_timer()
    loss.backward()
    return loss.detach(), fwd_s, meter.elapsed(mid)


def check_values(model, out: torch.Tensor, inference: bool) -> dict:
    """What the parent compares between modes: the loss and the gradient norm in training, the
    mean logsumexp of the prefill's logits in inference."""
    if inference:
        return {"loss": torch.logsumexp(out.float(), -1).mean().item(), "grad_norm": None}
    grads = [p.grad.flatten().double() for p in model.parameters() if p.grad is not None]
    return {"loss": out.item(), "grad_norm": torch.cat(grads).norm().item() if grads else None}


def drop_grads(model) -> None:
    model.zero_grad(set_to_none=True)


def mst_summary() -> dict | None:
    try:
        from mst_compile import last_report
    except ImportError:
        return None
    report = last_report()
    if report is None:
        return None
    keep = (
        "kind",
        "mode",
        "chunks",
        "chunk_len",
        "tail_len",
        "tokens",
        "bytes_before",
        "bytes_after",
        "recompute_flops",
    )
    return {
        "regions": [{k: getattr(r, k) for k in keep} for r in report.regions],
        "skipped": [
            {"seed": s.seed, "mode": s.mode, "category": s.category, "reason": s.reason}
            for s in report.skipped
        ],
    }


def compile_timers() -> dict:
    """Dynamo's cumulative compile-phase wall times (s); total_wall_time = forward frame compile
    + backward compile, Inductor's code generation and C++ builds included."""
    from torch._dynamo.utils import calculate_time_spent

    return {k: round(v, 3) for k, v in calculate_time_spent().items()}


def inductor_metrics() -> dict:
    """How much code Inductor generated: a compile cost that does not depend on machine load."""
    from torch._inductor import metrics

    return {
        "generated_kernel_count": metrics.generated_kernel_count,
        "ir_nodes_pre_fusion": metrics.ir_nodes_pre_fusion,
        "num_auto_chunking": getattr(metrics, "num_auto_chunking", None),
    }


def code_identity() -> dict:
    """Which mst_compile this process imported: the tree may change between processes."""
    import hashlib
    import pathlib

    import mst_compile

    from .machine import _git

    digest = hashlib.sha256()
    root = pathlib.Path(mst_compile.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return {"git_commit": _git("rev-parse", "HEAD"), "mst_compile_sha256": digest.hexdigest()[:16]}


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def matmul_tflops(device: str) -> float | None:
    """The device's measured bf16 matmul rate (8192^3, median of 10), the ceiling that
    achieved TFLOP/s is read against; None on the CPU."""
    if device != "cuda":
        return None
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return 2 * 8192**3 / (ms / 1000) / 1e12


def measure(
    spec: ModeSpec,
    seq: int,
    steps: int,
    inference: bool,
    workload_name: str,
    checkpointing: bool = False,
    device: str = "cpu",
    ignore_fraction: float = 0.0,
) -> dict:
    work = workload.get(workload_name)
    meter = make_meter(device)
    model = work.build_model(device, checkpointing)
    ids, labels = work.make_inputs(seq, device, ignore_fraction)
    forward = build(spec, model)
    gc.collect()
    params = sum(p.numel() for p in model.parameters())
    result: dict = {
        "mode": spec.name,
        "spec": spec.spec,
        "label": spec.label,
        "workload": work.name,
        "checkpointing": checkpointing,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "seq": seq,
        "inference": inference,
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "memory_start_mb": meter.memory() / MB,
        "load_avg_1m_start": os.getloadavg()[0],
        "code": code_identity(),
        # dense decoder: 6 x params x tokens per training step, 2 x for a forward
        "flops_per_step": (2 if inference else 6) * params * seq * work.batch,
    }

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        out, fwd_s, bwd_s = run_step(forward, ids, labels, inference, meter)
        if device == "cuda":
            torch.cuda.synchronize()
        result["first_step_s"] = time.perf_counter() - start
        result["first_fwd_s"], result["first_bwd_s"] = fwd_s, bwd_s
    result["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught})
    for w in result["warnings"]:
        print(f"warning during warm-up: {w}", file=sys.stderr)
    result["compile_timers"] = compile_timers()
    result["dynamo_compile_s"] = result["compile_timers"].get("total_wall_time", 0.0)
    result["inductor_metrics"] = inductor_metrics()
    result["warmup"] = check_values(model, out, inference)
    del out
    drop_grads(model)
    gc.collect()
    result["memory_after_warmup_mb"] = meter.memory() / MB

    steps_out = []
    for _ in range(steps):
        gc.collect()
        meter.reset_peak()
        before = meter.memory()
        load = os.getloadavg()[0]
        phase: dict = {}

        def between_phases(phase: dict = phase) -> None:
            phase["fwd_hwm"] = meter.peak()
            phase["after_fwd"] = meter.memory()
            meter.reset_peak()

        cpu_start = time.process_time()
        out, fwd_s, bwd_s = run_step(forward, ids, labels, inference, meter, between_phases)
        cpu = time.process_time() - cpu_start
        bwd_hwm = meter.peak()
        hwm = max(bwd_hwm, phase["fwd_hwm"])
        steps_out.append(
            {
                "step_s": fwd_s + bwd_s,
                "cpu_s": cpu,  # this process's CPU time, all threads: less sensitive to load
                "load_avg_1m": load,  # of the whole machine, before the step
                "fwd_s": fwd_s,
                "bwd_s": bwd_s,
                "memory_before_mb": before / MB,
                "hwm_mb": hwm / MB,
                "peak_mb": (hwm - before) / MB,
                "fwd_peak_mb": (phase["fwd_hwm"] - before) / MB,
                "live_after_fwd_mb": (phase["after_fwd"] - before) / MB,  # saved for the backward
                "bwd_peak_mb": (bwd_hwm - before) / MB,
                **check_values(model, out, inference),
            }
        )
        del out
        drop_grads(model)
    result["steps"] = steps_out
    result["matmul_tflops"] = matmul_tflops(device)
    result["mst"] = mst_summary() if spec.name == "mst" else None
    if result["mst"] is not None and not inference:
        result["mst"]["step_flops"] = step_flops(workload_name, seq, checkpointing)
    result["dynamo"] = dynamo_counters()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure one mode in this process.")
    parser.add_argument("--mode", required=True, help="a mode spec, e.g. mst or mst:chunks=8")
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--inference", action="store_true")
    parser.add_argument("--workload", help="a benchmarks.workload name (default: by device)")
    parser.add_argument("--checkpointing", action="store_true", help="checkpoint every block")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--out", help="write the JSON result here (default: stdout)")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="labels of the first fraction of every sequence are -100")
    args = parser.parse_args(argv)
    device = args.device or workload.default_device()
    if device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        print(
            "note: MALLOC_MMAP_THRESHOLD_ is not set: step times as a user has them, but RSS "
            "does not follow live tensors (take peak memory from a run with it set)",
            file=sys.stderr,
        )
    result = measure(
        ModeSpec.parse(args.mode),
        args.seq,
        args.steps,
        args.inference,
        args.workload or workload.default_workload(device),
        args.checkpointing,
        device,
        args.ignore_fraction,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
