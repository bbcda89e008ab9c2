"""Every Python snippet of the README runs as written on a (tiny, random-weight) HF Llama.

The snippets use the names a reader has in hand: `model`, `input_ids`, `labels`, and for the
Trainer snippet `args` and `ds`. Each runs with the compiler="eager" default set here, so
this checks the API the README shows, not Inductor's speed.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from tiny_models import hf_model

import mst_compile
from mst_compile import MstOptions

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.fixture
def namespace(monkeypatch, tmp_path):
    """What a reader has: a Llama, token ids, labels, Trainer arguments and a dataset. The
    backend's default options gain compiler="eager" and min_bytes=0 (tiny model)."""
    transformers = pytest.importorskip("transformers")
    from test_integrations import TokenDataset

    defaults = MstOptions(compiler="eager", min_bytes=0, min_chunk_len=8)
    real = MstOptions.from_dict

    def from_dict(options):
        if isinstance(options, MstOptions):
            return options
        merged = {**{k: getattr(defaults, k) for k in ("compiler", "min_bytes", "min_chunk_len")},
                  **(options or {})}
        return real(merged)

    monkeypatch.setattr(MstOptions, "from_dict", staticmethod(from_dict))
    ids = torch.randint(0, 512, (1, 64))
    return {
        "torch": torch, "transformers": transformers, "model": hf_model("llama", 512),
        "input_ids": ids, "labels": ids,
        "args": transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
            use_cpu=True, save_strategy="no", disable_tqdm=True),
        "ds": TokenDataset(),
    }


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.splitlines()[0][:40] for s in SNIPPETS])
def test_readme_snippet_runs(snippet, namespace):
    with mst_compile.collect_reports() as reports:
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 (the README's code)
        if "torch.compile(model" in snippet:  # a wrapper: the snippet makes it, a call compiles
            model = namespace["model"]
            model(input_ids=namespace["input_ids"], labels=namespace["labels"]).loss.backward()
    if "compile(" in snippet or "explain(" in snippet:  # not a snippet that only declares
        assert any(r.regions for r in reports), reports
