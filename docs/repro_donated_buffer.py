"""Reproduce the Inductor bug behind decision 8 (torch 2.13, CPU): a subgraph called from a
backward graph is lowered with the backward graph's donated-input positions, so subgraph
inputs at those positions are overwritten in place, also when one buffer is passed for two
inputs (two identical zero accumulators Inductor merged). mst then got wrong bf16 weight
gradients; it now lowers subgraphs with no donated inputs (backend.py,
`_subgraphs_without_donated_inputs`) and keeps donated buffers on elsewhere.

    python docs/repro_donated_buffer.py

Prints the relative error of every weight gradient against eager, with Inductor's donated
buffers on (the bug: errors near 1 for the MLP weights), off, and on with mst's fix (both
~1e-3, bf16 rounding). In the generated code (TORCH_LOGS=output_code) the backward subgraph reads
`buf14 = acc_1; ... buf15 = acc_2  # reuse` with acc_1 and acc_2 one buffer.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

from mst_compile.backend import MstJointPass, _subgraphs_without_donated_inputs
from mst_compile.options import MstOptions
from mst_compile.report import Report


class Block(torch.nn.Module):
    def __init__(self, d: int = 32, i: int = 128):
        super().__init__()
        self.gate = torch.nn.Linear(d, i, bias=False)
        self.up = torch.nn.Linear(d, i, bias=False)
        self.down = torch.nn.Linear(i, d, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (x.shape[-1],), self.norm)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def backend(donated_buffer: bool):
    """The mst pass (2 chunks per region) on Inductor, with donated buffers on or off."""
    options = MstOptions(chunks=2, min_bytes=0, strict=True)

    def compile_graph(gm, example_inputs):
        patches = {"joint_custom_pre_pass": MstJointPass(options, Report())}
        with torch._functorch.config.patch(donated_buffer=donated_buffer):
            return compile_fx(gm, example_inputs, config_patches=patches)

    return compile_graph


def main() -> None:
    # no caches: the backward is compiled lazily, and the two variants must not share one
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 32), Block(), torch.nn.Linear(32, 256))
    ids = torch.randint(0, 256, (1, 37))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids).float().square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    variants = [("donated_buffer=True", True), ("donated_buffer=False", False),
                ("donated_buffer=True, subgraphs without donated inputs (mst)", True)]
    for name, donated in variants:
        if name.endswith("(mst)"):
            _subgraphs_without_donated_inputs()  # installs the fix for the rest of the process
        torch._dynamo.reset()
        compiled_model = copy.deepcopy(model)
        compiled_model.zero_grad(set_to_none=True)
        compiled = torch.compile(compiled_model, backend=backend(donated))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(ids).float().square().mean().backward()
        errors = {
            n: ((p.grad.float() - expected[n].float()).norm() / expected[n].float().norm()).item()
            for n, p in compiled_model.named_parameters()
        }
        print(f"{name}: " + ", ".join(f"{n} {e:.3g}" for n, e in errors.items()))


if __name__ == "__main__":
    main()
