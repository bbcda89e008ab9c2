"""The report: what mst rewrote and why it left something alone (explain, last_report, CLI)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mst_compile
from mst_compile.demo_models import LlamaConfig, LlamaProxy

TINY = LlamaConfig(vocab_size=512, hidden=32, intermediate=128, layers=2, heads=4)
OPTIONS = {"chunks": 4, "min_bytes": 0}


def batch(seq: int = 37, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, seq))
    return ids, torch.roll(ids, -1, dims=1)


class CumsumMLP(nn.Module):
    """An MLP whose intermediate is mixed along the sequence (a cumsum): not sequence-wise."""

    def __init__(self, d: int = 32, inter: int = 128):
        super().__init__()
        self.up = nn.Linear(d, inter, bias=False)
        self.down = nn.Linear(inter, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.cumsum(F.gelu(self.up(x)), dim=1))


class TwoMLPsAroundCumsum(nn.Module):
    """MLP -> cumsum-mixed MLP -> MLP, then a loss."""

    def __init__(self, d: int = 32, inter: int = 128):
        super().__init__()
        self.first = nn.Sequential(nn.Linear(d, inter), nn.GELU(), nn.Linear(inter, d))
        self.mixed = CumsumMLP(d, inter)
        self.last = nn.Sequential(nn.Linear(d, inter), nn.GELU(), nn.Linear(inter, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x)
        x = self.mixed(x)
        return (x + self.last(x)).pow(2).mean()


@pytest.fixture(scope="module")
def training_report() -> mst_compile.Report:
    """One explained training step of the tiny Llama-shaped model, shared by the tests that
    only read it (each compile costs seconds)."""
    torch.manual_seed(0)
    return mst_compile.explain(LlamaProxy(TINY), *batch(), options=OPTIONS)


def test_explain_lists_regions_of_training_graph(training_report):
    report = training_report
    assert [g.mode for g in report.graphs] == ["training"]
    assert report.count("mlp") == 2 and report.count("loss") == 1
    for region in report.regions:
        assert region.chunks == 4 and region.tokens == 74
        assert (region.chunk_len, region.tail_len) == (19, 17)
        assert "aten.mm.default" in region.ops
        # the accounting covers at least the block's widest value (fp32) for every token
        widest = TINY.intermediate if region.kind == "mlp" else TINY.vocab_size
        assert region.bytes_before >= 4 * widest * region.tokens
        assert any("demo_models.py" in line or "forward" in line for line in region.stack_traces)
    loss_region = next(r for r in report.regions if r.kind == "loss")
    assert loss_region.grads_in_forward


def test_report_counts_the_matmuls_the_backward_recomputes(training_report):
    """An MLP's backward loop recomputes its gate and up projections (2 x 2*T*d*I FLOPs), not
    the down projection; the loss form recomputes nothing."""
    t, d, i = 74, TINY.hidden, TINY.intermediate
    flops = {r.kind: r.recompute_flops for r in training_report.regions}
    assert flops == {"mlp": 2 * 2 * t * d * i, "loss": 0}


def test_explain_runs_the_backward_and_leaves_the_gradients_as_they_were():
    model = LlamaProxy(TINY)
    before = {p: torch.full_like(p, 7.0) for p in model.parameters()}
    for p, g in before.items():
        p.grad = g
    backward_calls = []
    model.lm_head.weight.register_hook(lambda grad: backward_calls.append(grad))
    mst_compile.explain(model, *batch(), options=OPTIONS)
    assert len(backward_calls) == 1, "explain did not run the backward of the training graph"
    assert all(p.grad is g for p, g in before.items())


def test_explain_inference_reports_logits_region():
    model = LlamaProxy(TINY)
    ids, _ = batch()
    with torch.no_grad():
        report = mst_compile.explain(model, ids, options=OPTIONS)
    assert [g.mode for g in report.graphs] == ["inference"]
    assert report.count("mlp") == 2 and report.count("logits") == 1


def test_attention_projection_is_not_a_block(training_report):
    qkv = [s for s in training_report.skipped if s.category == "not_a_block"]
    assert len(qkv) == 2  # the fused QKV projection of each layer
    assert all("not an MLP or LM-head block" in s.reason for s in qkv)


def test_token_mixing_op_inside_a_block_is_skipped_with_reason():
    model = TwoMLPsAroundCumsum()
    x = torch.randn(2, 37, 32, requires_grad=True)
    report = mst_compile.explain(model, x, options=OPTIONS)
    assert report.count("mlp") == 2  # the two MLPs around the mixed one
    unsupported = [s for s in report.skipped if s.category == "unsupported"]
    assert len(unsupported) == 1
    assert "cumsum" in unsupported[0].reason
    assert "forward" in unsupported[0].stack_trace


def test_token_mixing_op_fails_strict_mode():
    model = torch.compile(TwoMLPsAroundCumsum(), backend="mst",
                          options={**OPTIONS, "strict": True})
    with pytest.raises(Exception, match="cumsum"):
        model(torch.randn(2, 37, 32, requires_grad=True)).backward()


def test_regions_below_min_bytes_are_skipped(training_report):
    model = LlamaProxy(TINY)
    ids, labels = batch()
    mlp_bytes = max(r.bytes_before for r in training_report.regions if r.kind == "mlp")
    report = mst_compile.explain(model, ids, labels, options={"chunks": 4, "min_bytes": mlp_bytes + 1})
    policy = [s for s in report.skipped if s.category == "policy"]
    assert report.count("mlp") == 0 and len(policy) == 2
    assert all("below min_bytes" in s.reason for s in policy)
    assert report.count("loss") == 1  # the head's logits are far larger


def test_last_report_after_plain_compile():
    model = torch.compile(LlamaProxy(TINY), backend="mst", options=OPTIONS)
    model(*batch()).backward()
    report = mst_compile.last_report()
    assert report.count("mlp", mode="training") == 2
    assert "invoke_subgraph" in str(report)  # the rewritten graph as code


def test_report_json_round_trips(training_report):
    data = json.loads(training_report.to_json())
    kinds = sorted(r["kind"] for g in data["graphs"] for r in g["regions"])
    assert kinds == ["loss", "mlp", "mlp"]


def test_logger_reports_each_graph(caplog):
    with caplog.at_level(logging.INFO, logger="mst_compile"):
        mst_compile.explain(LlamaProxy(TINY), *batch(), options={**OPTIONS, "compiler": "eager"})
    messages = [r.getMessage() for r in caplog.records]
    assert any("3 region(s) rewritten [mlp (4 chunks), mlp (4 chunks), loss (4 chunks)]" in m
               for m in messages), messages


def test_cli_explain_json():
    out = subprocess.run(
        [sys.executable, "-m", "mst_compile", "explain", "--model", "demo", "--seq", "64",
         "--vocab", "512", "--chunks", "2", "--min-bytes", "0", "--format", "json", "--no-code",
         "--compiler", "eager"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    data = json.loads(out.stdout)
    kinds = sorted(r["kind"] for g in data["graphs"] for r in g["regions"])
    assert kinds == ["loss", "mlp", "mlp"]


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "mst_compile", "--help"],
                         capture_output=True, text=True, check=True)
    assert "explain" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--chunks", "lots"], "expected 'auto' or an integer >= 1, got 'lots'"),
    (["--chunks", "0"], "expected 'auto' or an integer >= 1"),
    (["--seq", "0"], "expected an integer >= 1, got 0"),
    (["--min-bytes", "-1"], "expected an integer >= 0"),
    (["--compiler", "tvm"], "invalid choice: 'tvm'"),
])
def test_cli_bad_values_are_usage_errors(args, message):
    out = subprocess.run([sys.executable, "-m", "mst_compile", "explain", *args],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
