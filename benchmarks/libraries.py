"""python -m benchmarks.libraries: other libraries' own model code through backend="mst".

Builds tiny random-weight models with each library's own classes and its own loss, compiles
the model and loss together (strict mode), trains one step and prints, per model, the
regions rewritten and skipped and the largest relative difference from eager over the loss
and every gradient. A library that is not installed is reported and skipped; none of them is
a dependency of mst_compile:

    pip install litgpt==0.5.13                     # litgpt: Llama 3.2, Mixtral (torch.where MoE)
    pip install --no-deps torchtitan==0.3.0 && pip install einops tyro spmd_types==0.2.3 \\
        torchdata triton                           # torchtitan: Qwen3, Qwen3-MoE, DeepSeek-V3
    python -m benchmarks.libraries                 # every model found
    python -m benchmarks.libraries --models litgpt-mixtral --compiler eager

litgpt's Mixtral routes with `torch.where`, which breaks Dynamo's graph unless
`torch._dynamo.config.capture_dynamic_output_shape_ops` is set (done here, as the README
says). torchtitan's language models attend with FlexAttention, which has no CPU backward:
on the CPU this script swaps it for causal SDPA (the same attention for these unpacked
batches); its MoE is declared token-wise (`mst_compile.token_wise`). torchtitan's experts
compute in bf16, so their gradients differ from eager's by bf16 rounding.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
from collections import Counter

import torch
import torch.nn.functional as F

import mst_compile
from mst_compile.report import collect_reports

# (batch, length) of the steps of one check: batches that change shape, as loaders make them
SHAPES = ((2, 300), (1, 417), (3, 200))


def _litgpt(name: str, loss_chunk: int = 128, **overrides) -> tuple[torch.nn.Module, int]:
    """litgpt's GPT at a tiny width with its own loss: `chunked_cross_entropy`, which splits
    the tokens into pieces of `loss_chunk` (its default, 128) or, at 0, is one cross-entropy."""
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    shape = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_query_groups": 2, "head_size": 16,
             "intermediate_size": 256, "padded_vocab_size": 512, "vocab_size": 512,
             "block_size": 512}
    config = Config.from_name(name, **{**shape, **overrides})

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPT(config)

        def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return chunked_cross_entropy(self.gpt(ids), targets, chunk_size=loss_chunk)

    return WithLoss(), 512


def _torchtitan(family: str) -> tuple[torch.nn.Module, int]:
    from torchtitan.models.common.attention import FlexAttention
    from torchtitan.models.common.moe import MoE

    def causal_sdpa(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True, scale=scale,
                                             enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    FlexAttention.forward = causal_sdpa
    mst_compile.token_wise(MoE)
    if family == "deepseek-v3":
        from torchtitan.models import deepseek_v3 as lib

        config = lib._debugmodel(attn_backend="flex", moe_comm_backend="standard")
    else:
        from torchtitan.models import qwen3 as lib

        config = lib._debugmodel_moe("flex") if family == "qwen3-moe" else lib._debugmodel("flex")
    config.layers = config.layers[:2]
    model = config.build()

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            logits = self.model(ids, positions, None)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-100)

    return WithLoss(), config.vocab_size


MODELS = {
    "litgpt-llama": ("litgpt", lambda: _litgpt("Llama-3.2-1B")),
    "litgpt-llama-one-loss": ("litgpt", lambda: _litgpt("Llama-3.2-1B", loss_chunk=0)),
    "litgpt-gemma2": ("litgpt", lambda: _litgpt("gemma-2-2b")),
    "litgpt-pythia": ("litgpt", lambda: _litgpt("pythia-160m", n_query_groups=4)),
    "litgpt-mixtral": ("litgpt", lambda: _litgpt("Mixtral-8x7B-v0.1", n_expert=4,
                                                 moe_intermediate_size=128)),
    "torchtitan-qwen3": ("torchtitan", lambda: _torchtitan("qwen3")),
    "torchtitan-qwen3-moe": ("torchtitan", lambda: _torchtitan("qwen3-moe")),
    "torchtitan-deepseek-v3": ("torchtitan", lambda: _torchtitan("deepseek-v3")),
}


@dataclasses.dataclass
class Checked:
    """Training steps of a library's model through backend="mst", against eager."""

    name: str
    kinds: list[dict[str, int]]  # per graph compiled over the steps: regions rewritten, by kind
    skips: list[dict[str, int]]  # per graph: regions left alone, by category
    merged: list[int]  # per graph: joins of a user's own token pieces computed as one
    max_error: float  # the largest relative difference over the loss and every gradient

    def row(self) -> str:
        return (f"| {self.name} | {len(self.kinds)} | {_distinct(self.kinds)} | "
                f"{_distinct(self.skips)} | {_distinct(self.merged)} | {self.max_error:.1e} |")


def _distinct(values: list) -> str:
    """The values of every graph, once each."""
    distinct = [v for i, v in enumerate(values) if v not in values[:i]]
    return " / ".join(map(str, distinct))


def _step(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets)
    loss.backward()
    return loss.detach()


def check(name: str, compiler: str, shapes: tuple[tuple[int, int], ...] = SHAPES) -> Checked:
    """One training step per (batch, length) of `name` through backend="mst" (strict, 4
    chunks), one compiled model for all of them, each step against eager."""
    torch._dynamo.reset()  # shapes another model's step left in Dynamo's frame state
    torch.manual_seed(0)
    model, vocab = MODELS[name][1]()
    reference = copy.deepcopy(model)
    options = {"strict": True, "min_bytes": 0, "chunks": 4, "compiler": compiler}
    compiled = torch.compile(model, backend="mst", options=options)
    errors, graphs = [], []
    for batch, length in shapes:
        ids = torch.randint(0, vocab, (batch, length))
        targets = torch.randint(0, vocab, (batch, length))
        targets[:, : length // 5] = -100  # a prompt masked out
        with collect_reports() as reports:
            loss = _step(compiled, ids, targets)
        graphs += [g for r in reports for g in r.graphs]
        expected = _step(reference, ids, targets)
        errors.append((loss - expected).abs().item() / expected.abs().item())
        for p, q in zip(model.parameters(), reference.parameters()):
            if q.grad is not None and q.grad.norm() > 0:
                errors.append(((p.grad - q.grad).norm() / q.grad.norm()).item())
    return Checked(name, [dict(Counter(str(r.kind) for r in g.regions)) for g in graphs],
                   [dict(Counter(str(s.category) for s in g.skipped)) for g in graphs],
                   [sum("pieces of the tokens" in line for line in g.rewrites) for g in graphs],
                   max(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    args = parser.parse_args(argv)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    print(f"torch {torch.__version__}, steps of (batch, length) {SHAPES}, 4 chunks, strict\n")
    print("| model | graphs | regions rewritten | skipped | pieces merged | max rel. diff |")
    print("|---|---:|---|---|---:|---:|")
    status = 0
    for name in args.models.split(","):
        library = MODELS[name][0]
        if importlib.util.find_spec(library) is None:
            print(f"| {name} | | {library} is not installed | | | |")
            continue
        try:
            print(check(name, args.compiler).row(), flush=True)
        except Exception as e:  # noqa: BLE001 (reported per model)
            print(f"| {name} | | failed: {type(e).__name__}: {str(e)[:200]} | | | |")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
