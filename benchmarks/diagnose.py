"""Where one mode's step memory goes: a diagnostic, not a benchmark (prints, writes nothing).

    MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.diagnose --mode mst --seq 16384 [--profile] [--checkpointing] [--at-peak]

After a warm-up step: the forward's peak, what it leaves alive for the backward, the backward's
peak (all as VmHWM/VmRSS above the resident set before the step), the tensors saved for the
backward grouped by shape (through saved-tensor hooks, one count per storage), with
--profile the allocator's own peak over the step from torch.profiler(profile_memory=True), as
the cross-check to make when a number looks odd (benchmarks/README.md), and with --at-peak
what is alive at that peak, by the profiler's category and by the op that made it.
"""

from __future__ import annotations

import argparse
import collections
import gc

import torch

from . import workload
from .measure import MB, CpuMeter
from .modes import ModeSpec, build


def profiler_peak_mb(run) -> float:
    """Peak of the bytes allocated (and not yet freed) by the CPU allocator during `run()`."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True
    ) as prof:
        run()
    total = peak = 0
    for _, action, (key, _), size in sorted(
        MemoryProfile(prof.profiler.kineto_results).timeline, key=lambda e: e[0]
    ):
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            total += size
        elif action == Action.DESTROY:
            total -= size
        peak = max(peak, total)
    return peak / MB


def live_at_peak(run) -> tuple[float, dict[str, float], list[tuple[str, float, int]]]:
    """What is alive when the CPU allocator's total peaks during `run()`: (peak MB, MB by the
    profiler's category (activation, temporary, gradient, parameter, input, ...), and the
    largest live allocations grouped by the op that made them: (op, MB each, count))."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import (
        Action,
        MemoryProfile,
        TensorKey,
        _EventType,
    )

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=False) as prof:
        run()
    memory = MemoryProfile(prof.profiler.kineto_results)
    made_by: dict[int, str] = {}  # TensorKey id -> the op whose call allocated it
    for event in memory._op_tree.dfs():
        if event.typed[0] == _EventType.Allocation and event.typed[1].alloc_size > 0:
            key = TensorKey.from_allocation(event.typed[1])
            op, names = event.parent, []
            while op is not None and len(names) < 2:
                if op.name not in ("aten::empty", "aten::empty_strided", "aten::empty_like"):
                    names.append(op.name)
                op = op.parent
            if key is not None:
                made_by[key.id] = " < ".join(names) or "?"
    live: dict[tuple, tuple[int, str]] = {}
    total = peak = 0
    snapshot: dict[tuple, tuple[int, str]] = {}
    for _, action, (key, version), size in sorted(memory.timeline, key=lambda e: e[0]):
        if key.device.type != "cpu":
            continue
        ident = (getattr(key, "id", None), getattr(key, "storage", None) and key.storage.ptr)
        if action == Action.CREATE:
            category = memory._categories.get(key, version)
            live[ident] = (size, (f"{category.name.lower() if category else 'unknown'}|"
                                 f"{made_by.get(getattr(key, 'id', None), '?')}"))
            total += size
        elif action == Action.DESTROY:
            total -= live.pop(ident, (0, ""))[0]
        if total > peak:
            peak, snapshot = total, dict(live)
    by_category: dict[str, float] = collections.Counter()
    by_op: dict[tuple[str, float], int] = collections.Counter()
    for size, label in snapshot.values():
        category, op = label.split("|", 1)
        by_category[category] += size / MB
        by_op[(f"{op} [{category}]", round(size / MB, 1))] += 1
    largest = sorted(((op, mb, n) for (op, mb), n in by_op.items()), key=lambda r: -r[1] * r[2])
    return peak / MB, dict(by_category), largest[:12]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--workload", default="proxy", help="a benchmarks.workload name")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="labels of the first F of every sequence are -100")
    parser.add_argument(
        "--profile", action="store_true", help="also cross-check with torch.profiler"
    )
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing of every block (+AC)")
    parser.add_argument("--at-peak", action="store_true",
                        help="what is alive at the step's allocator peak: by category and by "
                             "the op that made it")
    args = parser.parse_args(argv)

    spec = ModeSpec.parse(args.mode)
    work = workload.get(args.workload)
    model = work.build_model(checkpointing=args.checkpointing)
    ids, labels = work.make_inputs(args.seq, ignore_fraction=args.ignore_fraction)
    meter = CpuMeter()
    forward = build(spec, model)
    forward(ids, labels).backward()  # warm-up: compiles
    model.zero_grad(set_to_none=True)
    gc.collect()

    saved: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved.setdefault(storage.data_ptr(), (tuple(t.shape), str(t.dtype), storage.nbytes()))
        return t

    meter.reset_peak()
    before = meter.memory()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(ids, labels)
    fwd_peak, alive = meter.peak() - before, meter.memory() - before
    meter.reset_peak()
    loss.backward()
    bwd_peak = meter.peak() - before
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)

    print(f"{spec.label}{' +AC' if args.checkpointing else ''}, S={args.seq}, loss {loss.item():.5f}")
    print(
        f"  forward peak {fwd_peak / MB:.0f} MB, alive after forward {alive / MB:.0f} MB, "
        f"backward peak {bwd_peak / MB:.0f} MB (parameter grads {grads / MB:.0f} MB)"
    )
    groups = collections.Counter(saved.values())
    total = sum(nbytes for _, _, nbytes in saved.values())
    print(
        f"  saved for backward: {len(saved)} storages, {total / MB:.0f} MB "
        "(parameters included: they are not dynamic memory)"
    )
    for (shape, dtype, nbytes), n in sorted(groups.items(), key=lambda kv: -kv[0][2] * kv[1]):
        if nbytes * n >= MB:
            print(f"    {n:3d} x {shape!s:26} {dtype:14} storage {nbytes / MB:7.1f} MB")
    if args.at_peak:
        model.zero_grad(set_to_none=True)
        del loss
        gc.collect()
        peak, by_category, largest = live_at_peak(lambda: forward(ids, labels).backward())
        print(f"  alive at the allocator's peak ({peak:.0f} MB), {peak * MB / args.seq / 1024:.1f} "
              "KB per token:")
        for category, mb in sorted(by_category.items(), key=lambda kv: -kv[1]):
            print(f"    {category:16} {mb:8.1f} MB  {mb * MB / args.seq / 1024:6.1f} KB/token")
        print("  the largest, by the op that made them:")
        for op, mb, n in largest:
            print(f"    {n:3d} x {mb:8.1f} MB  {op}")
    if args.profile:
        model.zero_grad(set_to_none=True)
        del loss
        gc.collect()
        meter.reset_peak()
        before = meter.memory()
        peak = profiler_peak_mb(lambda: forward(ids, labels).backward())
        print(
            f"  cross-check: RSS dynamic peak {(meter.peak() - before) / MB:.0f} MB, "
            f"profiler allocator peak {peak:.0f} MB"
        )


if __name__ == "__main__":
    main()
