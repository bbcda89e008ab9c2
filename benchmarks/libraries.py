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
import importlib.util
import sys

import torch
import torch.nn.functional as F

import mst_compile
from mst_compile.report import Report, collect_reports

BATCH, SEQ = 2, 300


def _litgpt(name: str, **overrides) -> tuple[torch.nn.Module, int]:
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    config = Config.from_name(name, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
                              intermediate_size=256, padded_vocab_size=512, vocab_size=512,
                              block_size=512, **overrides)

    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPT(config)

        def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return chunked_cross_entropy(self.gpt(ids), targets)

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
    "litgpt-mixtral": ("litgpt", lambda: _litgpt("Mixtral-8x7B-v0.1", n_expert=4,
                                                 moe_intermediate_size=128)),
    "torchtitan-qwen3": ("torchtitan", lambda: _torchtitan("qwen3")),
    "torchtitan-qwen3-moe": ("torchtitan", lambda: _torchtitan("qwen3-moe")),
    "torchtitan-deepseek-v3": ("torchtitan", lambda: _torchtitan("deepseek-v3")),
}


def check(name: str, compiler: str) -> str:
    """One training step of `name` through backend="mst" against eager; a report line."""
    torch.manual_seed(0)
    model, vocab = MODELS[name][1]()
    reference = copy.deepcopy(model)
    options = {"strict": True, "min_bytes": 0, "chunks": 4, "compiler": compiler}
    compiled = torch.compile(model, backend="mst", options=options)
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    targets = torch.randint(0, vocab, (BATCH, SEQ))
    targets[:, : SEQ // 5] = -100
    with collect_reports() as reports:
        loss = compiled(ids, targets)
        loss.backward()
    expected = reference(ids, targets)
    expected.backward()
    errors = [(loss - expected).abs().item() / expected.abs().item()]
    for p, q in zip(model.parameters(), reference.parameters()):
        if q.grad is not None and q.grad.norm() > 0:
            errors.append(((p.grad - q.grad).norm() / q.grad.norm()).item())
    report = Report([g for r in reports for g in r.graphs])
    kinds: dict[str, int] = {}
    for region in report.regions:
        kinds[str(region.kind)] = kinds.get(str(region.kind), 0) + 1
    skips: dict[str, int] = {}
    for skip in report.skipped:
        skips[str(skip.category)] = skips.get(str(skip.category), 0) + 1
    merged = sum("pieces of the tokens" in line for g in report.graphs for line in g.rewrites)
    return (f"| {name} | {len(report.graphs)} | {kinds} | {skips} | {merged} | "
            f"{max(errors):.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    args = parser.parse_args(argv)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    print(f"torch {torch.__version__}, batch {BATCH} x {SEQ} tokens, 4 chunks, strict\n")
    print("| model | graphs | regions rewritten | skipped | pieces merged | max rel. diff |")
    print("|---|---:|---|---|---:|---:|")
    status = 0
    for name in args.models.split(","):
        library = MODELS[name][0]
        if importlib.util.find_spec(library) is None:
            print(f"| {name} | | {library} is not installed | | | |")
            continue
        try:
            print(check(name, args.compiler), flush=True)
        except Exception as e:  # noqa: BLE001 (reported per model)
            print(f"| {name} | | failed: {type(e).__name__}: {str(e)[:200]} | | | |")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
