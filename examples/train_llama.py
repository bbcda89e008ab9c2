"""Train a small Llama-shaped model for a few steps with backend="mst", next to plain Inductor.

    python examples/train_llama.py            # S=4096, 3 steps per backend
    python examples/train_llama.py --seq 16384

Each backend runs in its own process (so one's caches never count for the other) and prints
its loss per step and the dynamic peak memory of a training step (resident-set high-water mark
minus the resident set before the step; how: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from mst_compile.demo_models import LlamaConfig, LlamaProxy


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def train(backend: str, seq: int, steps: int) -> None:
    torch.manual_seed(0)
    model = LlamaProxy(LlamaConfig(vocab_size=16000, hidden=256, intermediate=1024, layers=2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend=backend)
    data = torch.Generator().manual_seed(1)
    peak = 0.0
    for step in range(steps):
        ids = torch.randint(0, 16000, (1, seq), generator=data)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        if step > 0:  # step 0 compiles; measure the others
            with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
                f.write("5")
            before = rss_mb("VmRSS")
        start = time.perf_counter()
        loss = compiled(ids, labels)
        loss.backward()
        elapsed = time.perf_counter() - start
        if step > 0:
            peak = max(peak, rss_mb("VmHWM") - before)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"  [{backend:8}] step {step}  loss {loss.item():.4f}  {elapsed:6.2f} s")
    print(f"  [{backend:8}] dynamic peak memory of a training step: {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", help="run one backend in this process (used internally)")
    args = parser.parse_args()
    if args.backend:
        train(args.backend, args.seq, args.steps)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large tensors freed to the OS
    print(f"Llama-shaped proxy, batch 1, sequence {args.seq}, torch {torch.__version__}")
    for backend in ("inductor", "mst"):
        cmd = [sys.executable, __file__, "--backend", backend, "--seq", str(args.seq),
               "--steps", str(args.steps)]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
