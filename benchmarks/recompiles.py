"""python -m benchmarks.recompiles: how often a training loop whose batches change shape
compiles, Inductor alone vs backend="mst" (automatic and fixed chunk counts).

The loop is what a bucketed data loader feeds: about 4096 tokens per batch, lengths bucketed
to multiples of 256 and some not (dynamic padding), a short last batch. One training step per
batch (forward and backward) on a workload of `benchmarks` (default: the user's path,
`hf-llama`), every mode on a fresh copy of the same model. A compile is one graph handed to the
backend (one per Dynamo compile; a model Dynamo splits into several graphs counts each).

    python -m benchmarks.recompiles                       # hf-llama, the loop below
    python -m benchmarks.recompiles --workload proxy --modes inductor,mst
"""

from __future__ import annotations

import argparse
import json

import torch

from mst_compile.backend import mst_backend
from mst_compile.report import collect_reports

from . import workload as workloads

# (batch, length): about 4096 tokens a batch, then a short last batch.
LOADER = [(2, 2048), (4, 1024), (8, 512), (3, 1280), (5, 768), (2, 1000), (16, 256),
          (6, 701), (1, 3900), (4, 1000), (1, 333)]
MODES = {
    "inductor": None,
    "mst": {},
    "mst chunks=8": {"chunks": 8},
}


class CountingBackend:
    """A backend that counts the graphs it compiles."""

    def __init__(self, options: dict | None):
        self.options, self.compiles = options, 0

    def __call__(self, gm, example_inputs):
        if self.options is None:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs)
        else:
            compiled = mst_backend(gm, example_inputs, options=self.options)
        self.compiles += 1
        return compiled


def run(workload_name: str, mode: str) -> dict:
    workload = workloads.get(workload_name)
    model = workload.build_model()
    backend = CountingBackend(MODES[mode])
    torch._dynamo.reset()
    if getattr(model, "compiles_in_place", False):
        model.model.compile(backend=backend)
        step = model
    else:
        step = torch.compile(model, backend=backend)
    chunk_counts = set()
    with collect_reports() as reports:
        for batch, seq in LOADER:
            gen = torch.Generator().manual_seed(batch * 100_000 + seq)
            ids = torch.randint(0, workload.vocab_size, (batch, seq), generator=gen)
            labels = ids.clone() if workload.shifts_labels else ids.roll(-1, 1)
            labels[:, : seq // 4] = workloads.IGNORE_INDEX  # a masked prompt
            step(ids, labels).backward()
            model.zero_grad(set_to_none=True)
    for report in reports:
        chunk_counts |= {(r.kind, r.chunks) for r in report.regions}
    return {"mode": mode, "compiles": backend.compiles,
            "chunk_counts": sorted(f"{kind} x{n}" for kind, n in chunk_counts)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="hf-llama")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    print(f"workload {args.workload}, {len(LOADER)} batches (batch, length): {LOADER}")
    for mode in args.modes.split(","):
        print(json.dumps(run(args.workload, mode)), flush=True)


if __name__ == "__main__":
    main()
