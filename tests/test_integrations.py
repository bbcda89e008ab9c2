"""mst inside the tools people train and generate with: the HF Trainer and generate().

Both need the model compiled in place (`model.compile(backend="mst", ...)`): the Trainer
reads the forward's signature to pick dataset columns and `generate()` calls the module's own
forward, which `torch.compile(model)` (a wrapper) would leave uncompiled.
"""

from __future__ import annotations

import pytest
import torch
from numerics import summary
from tiny_models import hf_model

import mst_compile

transformers = pytest.importorskip("transformers")
VOCAB = 512
OPTIONS = {"min_bytes": 0, "chunks": 4, "strict": True, "compiler": "eager"}


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seq: int = 48):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_with_trainer(compile_in_place: bool, tmp_path) -> list[float]:
    torch.manual_seed(0)
    model = hf_model("llama", VOCAB)
    if compile_in_place:
        model.compile(backend="mst", options=OPTIONS)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_with_a_model_compiled_in_place(tmp_path):
    """Three Trainer steps: the same losses as without mst (the optimizer steps in between
    make this a check of every gradient too), and the regions in the report."""
    with mst_compile.collect_reports() as reports:
        losses = _train_with_trainer(True, tmp_path)
    expected = _train_with_trainer(False, tmp_path)
    assert len(losses) == len(expected) == 3
    for got, want in zip(losses, expected):
        assert abs(got - want) <= 1e-5 * abs(want), (losses, expected)
    report = reports[0]
    assert report.count("mlp", "training") == 2 and report.count("loss", "training") == 1, \
        summary(report)


def test_generate_with_a_model_compiled_in_place():
    """Greedy generation gives eager's tokens; the prefill report (every prompt token) and the
    decode reports (one token per sequence) are all collected."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 40))
    eager = hf_model("llama", VOCAB).eval()
    model = hf_model("llama", VOCAB).eval()
    model.compile(backend="mst", options=OPTIONS)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(ids),
              "pad_token_id": 0}
    with torch.no_grad():
        expected = eager.generate(ids, **kwargs)
        with mst_compile.collect_reports() as reports:
            tokens = model.generate(ids, **kwargs)
    assert torch.equal(tokens, expected)
    prefill, *decode = reports
    assert [r.tokens for r in prefill.regions if r.kind == "mlp"] == [80, 80], summary(prefill)
    assert decode and all(r.tokens == 2 for d in decode for r in d.regions)
    assert all(g.mode == "inference" for r in reports for g in r.graphs)


def test_a_torch_compile_wrapper_does_not_compile_generate():
    """Why the docs say to compile in place: generate() on torch.compile's wrapper runs the
    original module's forward, so no graph reaches the backend."""
    model = hf_model("llama", VOCAB).eval()
    wrapper = torch.compile(model, backend="mst", options=OPTIONS)
    with torch.no_grad(), mst_compile.collect_reports() as reports:
        wrapper.generate(torch.randint(0, VOCAB, (1, 8)), max_new_tokens=2, do_sample=False,
                         pad_token_id=0)
    assert reports == []
