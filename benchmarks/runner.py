"""The parent side: every (mode, sequence length) in fresh subprocesses.

On the CPU one configuration is measured by separate processes (README.md, "How we
measure"): memory in one with MALLOC_MMAP_THRESHOLD_=65536 (freed memory goes back to the OS,
so the resident set follows the live tensors), time in another with the allocator a user has.
Each starts with an empty Inductor cache directory of its own, so compile times are cold and
no mode reuses another's compiled code; with `warm_start` a third process compiles from the
cache the timing process filled (a warm start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .modes import ModeSpec


def mode_label(spec: ModeSpec, checkpointing: bool) -> str:
    """A mode's name in tables and plots: "+AC" marks activation checkpointing."""
    return spec.label + (" +AC" if checkpointing else "")


@dataclasses.dataclass(frozen=True)
class Run:
    spec: ModeSpec
    seq: int
    steps: int
    inference: bool
    workload: str
    device: str = "cpu"
    checkpointing: bool = False  # activation checkpointing of every block
    group: str = "main"  # "main", "chunk_sweep" or "max_seq" (a probe of the search)
    threads: int | None = None  # torch threads in the child (OMP_NUM_THREADS); None: default
    separate_timing: bool = True  # CPU: time in a second process with the default allocator
    warm_start: bool = False  # also compile in a process that finds the timing run's caches
    ignore_fraction: float = 0.0  # labels of the first fraction of every sequence are -100

    @property
    def label(self) -> str:
        return mode_label(self.spec, self.checkpointing)

    @property
    def name(self) -> str:
        kind = "infer" if self.inference else "train"
        name = f"{self.workload}_{self.spec.label}{'_ac' if self.checkpointing else ''}"
        name += f"_{kind}_S{self.seq}"
        if self.ignore_fraction:
            name += f"_ignored{round(100 * self.ignore_fraction)}"
        for old, new in (("[", "_"), ("]", ""), (",", "_"), ("=", "")):
            name = name.replace(old, new)
        return name


def child_env(cache_dir: str, threads: int | None = None, *, release_memory: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if release_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# Step figures taken from the timing process (the memory process's are kept as `mem_*`).
TIME_KEYS = ("step_s", "cpu_s", "fwd_s", "bwd_s", "load_avg_1m")


def run_one(run: Run, log_dir: Path, timeout: float) -> dict:
    """Measure `run` in fresh processes; returns the merged result, or an error record."""
    base = {
        "mode": run.spec.name,
        "spec": run.spec.spec,
        "label": run.label,
        "workload": run.workload,
        "checkpointing": run.checkpointing,
        "seq": run.seq,
        "ignore_fraction": run.ignore_fraction,
        "inference": run.inference,
        "group": run.group,
        "log": str(log_dir / f"{run.name}.log"),
    }
    separate = run.device == "cpu" and run.separate_timing
    with tempfile.TemporaryDirectory(prefix="mst-bench-cache-") as cache_root:
        memory = _child(run, log_dir / f"{run.name}.log", timeout,
                        os.path.join(cache_root, "memory"), release_memory=run.device == "cpu")
        if not memory["ok"] or not separate:
            return {**memory, **base}
        timing_cache = os.path.join(cache_root, "timing")
        timing = _child(run, log_dir / f"{run.name}.time.log", timeout, timing_cache,
                        release_memory=False)
        if not timing["ok"]:
            return {**timing, **base}
        result = _merge(memory, timing)
        if run.warm_start:
            warm = _child(run, log_dir / f"{run.name}.warm.log", timeout, timing_cache,
                          release_memory=False)
            if not warm["ok"]:
                return {**warm, **base}
            result["warm_compile_s"] = warm.get("dynamo_compile_s")
            result["warm_first_step_s"] = warm["first_step_s"]
    return {**result, **base}


def _merge(memory: dict, timing: dict) -> dict:
    """Memory figures from the memory process, times (and the cold compile) from the timing
    one."""
    result = {**memory, "process_s": memory["process_s"] + timing["process_s"]}
    for key in ("first_step_s", "first_fwd_s", "first_bwd_s", "compile_timers",
                "dynamo_compile_s", "threads"):
        result[f"mem_{key}"] = memory.get(key)
        result[key] = timing.get(key)
    steps = []
    for mem_step, time_step in zip(memory["steps"], timing["steps"]):
        step = dict(mem_step)
        for key in TIME_KEYS:
            step[f"mem_{key}"] = mem_step.get(key)
            step[key] = time_step.get(key)
        steps.append(step)
    result["steps"] = steps
    result["timing_malloc_mmap_threshold"] = timing.get("malloc_mmap_threshold")
    return result


def _child(run: Run, log_path: Path, timeout: float, cache_dir: str, *, release_memory: bool) -> dict:
    """One process measuring `run`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    os.makedirs(cache_dir, exist_ok=True)
    result_path = Path(cache_dir) / "result.json"
    cmd = [
        sys.executable, "-m", "benchmarks.measure", "--mode", run.spec.spec,
        "--seq", str(run.seq), "--steps", str(run.steps), "--workload", run.workload,
        "--device", run.device, "--out", str(result_path),
    ]
    if run.inference:
        cmd.append("--inference")
    if run.checkpointing:
        cmd.append("--checkpointing")
    if run.ignore_fraction:
        cmd += ["--ignore-fraction", str(run.ignore_fraction)]
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(
                cmd,
                env=child_env(cache_dir, run.threads, release_memory=release_memory),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=Path(__file__).resolve().parent.parent,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return {"ok": False, "process_s": time.perf_counter() - start,
                "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"ok": False, "process_s": wall,
                "error": f"exit status {proc.returncode}: {_tail(log_path)}"}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return {**result, "ok": True, "process_s": wall}


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])
