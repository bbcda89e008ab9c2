"""The workload every mode runs: the Llama-shaped proxy in fp32, batch 1, its inputs and seeds.

Every mode builds its model with the same seed and feeds it the same token ids, so the losses
of all modes must agree up to floating-point reassociation.
"""

from __future__ import annotations

import torch

from mst_compile.demo_models import LlamaConfig, LlamaProxy

MODEL_SEED = 0
DATA_SEED = 1
CONFIG = LlamaConfig(vocab_size=16000, hidden=256, intermediate=1024, layers=2, heads=4)


def build_model() -> LlamaProxy:
    torch.manual_seed(MODEL_SEED)
    return LlamaProxy(CONFIG)


def make_inputs(seq: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels; the last position has no target (-100)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    ids = torch.randint(0, CONFIG.vocab_size, (batch, seq), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, labels


def describe() -> dict:
    return {
        "model": "LlamaProxy",
        "config": dict(vars(CONFIG)),
        "dtype": "float32",
        "batch": 1,
        "parameters": sum(p.numel() for p in build_model().parameters()),
        "model_seed": MODEL_SEED,
        "data_seed": DATA_SEED,
    }
