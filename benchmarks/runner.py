"""The parent side: every (mode, sequence length) in a fresh subprocess.

Each child gets MALLOC_MMAP_THRESHOLD_=65536 (README.md, "How we measure") and an empty Inductor cache
directory of its own, so compile times are cold and no mode reuses another's compiled code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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

    @property
    def label(self) -> str:
        return mode_label(self.spec, self.checkpointing)

    @property
    def name(self) -> str:
        kind = "infer" if self.inference else "train"
        name = f"{self.workload}_{self.spec.label}{'_ac' if self.checkpointing else ''}"
        name += f"_{kind}_S{self.seq}"
        for old, new in (("[", "_"), ("]", ""), (",", "_"), ("=", "")):
            name = name.replace(old, new)
        return name


def child_env(cache_dir: str, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_one(run: Run, log_dir: Path, timeout: float) -> dict:
    """Run `run` in a fresh process; returns the child's result, or an error record."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{run.name}.log"
    cache_dir = tempfile.mkdtemp(prefix="mst-bench-cache-")
    result_path = Path(cache_dir) / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.measure",
        "--mode",
        run.spec.spec,
        "--seq",
        str(run.seq),
        "--steps",
        str(run.steps),
        "--workload",
        run.workload,
        "--device",
        run.device,
        "--out",
        str(result_path),
    ]
    if run.inference:
        cmd.append("--inference")
    if run.checkpointing:
        cmd.append("--checkpointing")
    base = {
        "mode": run.spec.name,
        "spec": run.spec.spec,
        "label": run.label,
        "workload": run.workload,
        "checkpointing": run.checkpointing,
        "seq": run.seq,
        "inference": run.inference,
        "group": run.group,
        "log": str(log_path),
    }
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(
                cmd,
                env=child_env(cache_dir, run.threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=Path(__file__).resolve().parent.parent,
                check=False,
            )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            return {
                **base,
                "ok": False,
                "process_s": wall,
                "error": f"exit status {proc.returncode}: {_tail(log_path)}",
            }
        return {**json.loads(result_path.read_text()), **base, "ok": True, "process_s": wall}
    except subprocess.TimeoutExpired:
        return {
            **base,
            "ok": False,
            "process_s": time.perf_counter() - start,
            "error": f"timed out after {timeout:.0f} s",
        }
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])
