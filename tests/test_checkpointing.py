"""Activation checkpointing of blocks composes with mst: same numbers, same regions."""

from __future__ import annotations

import torch
from numerics import check_against_eager
from tiny_models import HIDDEN, LAYERS, hf_model

from mst_compile.demo_models import LlamaConfig, LlamaProxy

VOCAB = 512


def test_checkpointed_blocks_match_eager():
    torch.manual_seed(0)
    model = LlamaProxy(LlamaConfig(vocab_size=VOCAB, hidden=HIDDEN, intermediate=4 * HIDDEN,
                                   layers=LAYERS, heads=4, activation_checkpointing=True))
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, micro_batches=2)
    assert report.count("mlp", "training") == 2 and report.count("loss", "training") == 1


def test_hf_gradient_checkpointing_matches_eager():
    model = hf_model("llama", VOCAB)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # else HF warns inside forward: a graph break
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, hf=True)
    assert report.count("mlp", "training") == 2 and report.count("loss", "training") == 1
