"""The benchmark harness: the peers it compares against compute what the model computes, the
longest-sequence search finds what it should, and one end-to-end run writes its report.

Nothing here times anything: numbers are the benchmark's job, not a test's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from numerics import FP32_RTOL, rel_err

from benchmarks import head_products, workload
from benchmarks.__main__ import main as bench_main
from benchmarks.modes import LinearCrossEntropyModel
from benchmarks.reference import MstReferenceModel
from benchmarks.search import longest_sequence


def _loss_and_grads(model, ids, labels) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """The loss and (name, gradient) of every parameter, in registration order (wrapping a
    module in place keeps the order and changes the names)."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels)
    loss.backward()
    return loss.item(), [(n, p.grad.clone()) for n, p in model.named_parameters()]


def _assert_same_grads(grads, expected) -> None:
    assert len(grads) == len(expected), "the peer must train exactly the model's parameters"
    for (name, g), (_, e) in zip(grads, expected):
        assert rel_err(g, e) < FP32_RTOL, name


@pytest.mark.parametrize(
    "name, checkpointing, options",
    [
        ("proxy", False, {}),
        ("proxy", True, {"mlp_chunks": 3, "loss_chunks": 5}),
        ("llama-fullvocab", False, {"mlp_chunks": 4, "loss_chunks": 3}),
    ],
)
def test_reference_model_matches_the_model(name, checkpointing, options):
    """mst_ref (hand-written chunked MLP and LM head + loss) against the unpatched model on
    the loss and every parameter gradient; 1100 tokens: the chunks do not divide evenly."""
    work = workload.get(name)
    ids, labels = work.make_inputs(1100)
    labels[0, :40] = -100
    plain = work.build_model(checkpointing=checkpointing)
    expected_loss, expected = _loss_and_grads(plain, ids, labels)
    chunked = MstReferenceModel(work.build_model(checkpointing=checkpointing), **options)
    loss, grads = _loss_and_grads(chunked, ids, labels)
    assert loss == pytest.approx(expected_loss, rel=FP32_RTOL)
    _assert_same_grads(grads, expected)
    # inference: the prefill's last-position logits
    with torch.no_grad():
        assert rel_err(chunked(ids), plain(ids)) < FP32_RTOL


def test_reference_default_chunks_follow_the_paper_capped_by_length():
    model = MstReferenceModel(workload.get("proxy").build_model())
    assert model.loss_chunks == 16000 // 256 + 1  # vocabulary / hidden, rounded up
    mlp = model.base.base.blocks[0].mlp
    assert mlp.chunks == 1024 // 256  # intermediate / hidden
    assert model.cap_loss and mlp.cap  # capped at tokens // 512 when called


@pytest.mark.skipif(
    not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy"
)
def test_linear_cross_entropy_mode_matches_the_model():
    work = workload.get("proxy")
    ids, labels = work.make_inputs(700)
    expected_loss, expected = _loss_and_grads(work.build_model(), ids, labels)
    lce = LinearCrossEntropyModel(work.build_model(), {})
    loss, grads = _loss_and_grads(lce, ids, labels)
    assert loss == pytest.approx(expected_loss, rel=FP32_RTOL)
    _assert_same_grads(grads, expected)


def test_workloads_describe_their_models():
    full = workload.get("llama-fullvocab").describe()
    assert full["config"]["vocab_size"] == 128256 and full["dtype"] == "float32"
    # head 128256 x 256 + embedding 128256 x 256 dominate the 2 tiny layers
    assert 2 * 128256 * 256 < full["parameters"] < 2 * 128256 * 256 + 5_000_000
    big = workload.get("llama-1b").describe()
    assert big["dtype"] == "bfloat16"
    assert 1.1e9 < big["parameters"] < 1.3e9  # Llama-3.2-1B: 1.24B with tied embeddings
    with pytest.raises(ValueError, match="unknown workload 'gpt5'"):
        workload.get("gpt5")


@pytest.mark.parametrize("name", ["proxy", "llama-fullvocab"])
def test_step_flops_count_every_matmul(name):
    """The recompute floor's denominator, counted on the meta device: HF models too (their
    causal-mask builder reads the position ids on the host, which meta tensors cannot
    answer). A training step does at least 3 x 2 x (head + MLP weights) x tokens."""
    from benchmarks.flops import step_flops

    tokens = 64
    work = workload.get(name)
    model = work.make(False)
    heavy = sum(p.numel() for n, p in model.named_parameters() if "lm_head" in n or "mlp" in n)
    flops = step_flops(name, tokens)
    assert flops is not None and flops >= 6 * heavy * tokens, (flops, heavy)


# ---------------------------------------------------------------- the longest-sequence search


def _linear_probe(base_mb: float, mb_per_token: float, calls: list[int], fail_above=None):
    def probe(seq: int) -> dict:
        calls.append(seq)
        if fail_above is not None and seq > fail_above:
            return {"ok": False, "error": "out of memory"}
        return {"ok": True, "peak_mb": base_mb + mb_per_token * seq}

    return probe


def test_search_finds_the_longest_length_within_the_budget():
    calls: list[int] = []
    found = longest_sequence(_linear_probe(50, 0.1, calls), 1000, start=2048, limit=1 << 20)
    exact = 9500  # 50 + 0.1 * 9500 = 1000
    assert found.longest_seq <= exact
    assert exact - found.longest_seq <= max(256, 0.05 * exact)
    assert found.first_over > exact
    assert len(calls) <= 8 and calls[:4] == [2048, 4096, 8192, 16384]
    assert all(p["fits"] == (p["peak_mb"] <= 1000) for p in found.probes)


def test_search_checks_one_step_above_when_the_line_crosses_just_above_the_fit():
    """Peaks 0.25 MB/token, budget 512 MB: 2048 fits (512), 4096 does not; the line says the
    crossing is at 2048, so the next probe is 2048 + 256, which settles it."""
    calls: list[int] = []
    found = longest_sequence(_linear_probe(0, 0.25, calls), 512, start=2048, limit=1 << 20)
    assert calls == [2048, 4096, 2304] and found.longest_seq == 2048


def test_search_treats_a_failed_run_as_over_budget_and_can_search_down():
    calls: list[int] = []
    probe = _linear_probe(0, 1.0, calls, fail_above=5000)
    found = longest_sequence(probe, 1e9, start=4096, limit=1 << 20)
    assert 4096 <= found.longest_seq <= 5000 < found.first_over
    assert any(not p["ok"] and p["error"] == "out of memory" for p in found.probes)

    down = longest_sequence(_linear_probe(0, 1.0, []), 1000, start=4096, limit=1 << 20)
    assert 1000 - 256 <= down.longest_seq <= 1000

    none = longest_sequence(_linear_probe(5000, 1.0, []), 1000, start=512, limit=4096)
    assert none.longest_seq is None and none.first_over == 256


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget_mb > 0"):
        longest_sequence(_linear_probe(0, 1, []), 0, start=512, limit=4096)
    with pytest.raises(ValueError, match="start"):
        longest_sequence(_linear_probe(0, 1, []), 10, start=4096, limit=512)


# ---------------------------------------------------------------- one end-to-end run


def test_harness_end_to_end(tmp_path):
    """Cheap modes only (no compile): per mode a memory process and a timing process (the
    default allocator), and a two-probe search of memory processes; the report, plots and
    loss check come out."""
    argv = ["--modes", "eager,mst_ref", "--seq", "256", "--steps", "1", "--checkpointing", "on"]
    argv += ["--max-seq-budget-mb", "100000", "--max-seq-start", "256", "--max-seq-limit", "512"]
    assert bench_main([*argv, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    main_rows = [r for r in doc["summary"] if r["group"] == "main"]
    assert {r["label"] for r in main_rows} == {"eager +AC", "mst_ref +AC"}
    assert all(r["ok"] and r["check"] == "ok" and r["peak_mb"] > 0 for r in main_rows)
    assert all(r["timing"] == "separate process, default allocator" for r in main_rows)
    raw = [r for r in doc["raw"] if r["group"] == "main"]
    assert all(r["malloc_mmap_threshold"] == "65536" and r["timing_malloc_mmap_threshold"] is None
               for r in raw)
    assert [s["longest_seq"] for s in doc["searches"]] == [512, 512]
    assert doc["workload"]["workload"] == "proxy"
    md = (tmp_path / "results.md").read_text()
    assert "## Longest training sequence within 100000 MB" in md
    assert (tmp_path / "memory.png").exists() and (tmp_path / "longest.png").exists()


def test_harness_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_main(["--seq", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        bench_main(["--modes", "fast", "--out", str(tmp_path)])


def test_head_products_prints_one_row_per_chunk_length(capsys):
    head_products.main(["--vocab", "64", "--hidden", "8", "--rows", "3,5", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| n", "| 3", "| 5"]
    assert all(len(r.split("|")) == 8 for r in rows)  # n, four products, their sum
    with pytest.raises(SystemExit):
        head_products.main(["--rows", "0"])


_WRAPPER = '''
def call(self, args):
    x, y = args
    args.clear()
    assert_size_stride(x, (4, 4), (4, 1))
    buf0 = empty_strided_cpu((8, 8), (8, 1), torch.float32)
    buf1 = reinterpret_tensor(buf0, (64, ), (1, ), 0)  # alias
    kernel(x, buf1)
    del buf1
    buf2 = empty_strided_cpu((4, 4), (4, 1), torch.float32)
    kernel(buf0, buf2)
    buf3 = reinterpret_tensor(x, (16, ), (1, ), 0); del x  # reuse
    del buf0
    buf4 = empty_strided_cpu((2, 2), (2, 1), torch.bfloat16)
    return (buf2, buf3, buf4)
'''


def test_buffers_follow_inductor_code_to_its_peak(tmp_path):
    """x (64 bytes, its size from assert_size_stride), buf0 (256, also named buf1) and buf2 (64)
    are alive together; x is last read before that and kept for the reuse as buf3."""
    from benchmarks import buffers

    peak = buffers.peak_of(_WRAPPER)
    assert peak.nbytes == 64 + 256 + 64, peak
    assert [s.nbytes for s in peak.alive] == [256, 64, 64, 0], peak
    assert peak.lines[peak.line].startswith("buf2 = empty_strided_cpu"), peak
    path = tmp_path / "wrapper.py"
    path.write_text(_WRAPPER)
    text = buffers.report(path, unit=64)
    assert "peak 6.0 units" in text, text
    x_line = next(line for line in text.splitlines() if line.split()[1:2] == ["x"])
    assert "an input of the graph" in x_line and "held for a later buffer" in x_line, text
