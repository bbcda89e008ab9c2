"""The backend's options: validation, memory_budget, min_bytes, clamping of the chunk count."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import check_against_eager, summary
from tiny_models import tiny_swiglu

from mst_compile import MstOptions
from mst_compile.backend import mst_backend

VOCAB = 512

# (options, the key the error must name)
BAD_OPTIONS = [
    ({"chunk": 4}, "chunk"),
    ({"chunks": 4, "strcit": True}, "strcit"),
    ({"chunks": 0}, "chunks"),
    ({"chunks": -3}, "chunks"),
    ({"chunks": "many"}, "chunks"),
    ({"chunks": 2.5}, "chunks"),
    ({"chunks": True}, "chunks"),
    ({"memory_budget": -1}, "memory_budget"),
    ({"memory_budget": 0}, "memory_budget"),
    ({"memory_budget": "1GB"}, "memory_budget"),
    ({"min_bytes": -5}, "min_bytes"),
    ({"min_bytes": 1.5}, "min_bytes"),
    ({"max_chunk_bytes": 0}, "max_chunk_bytes"),
    ({"max_chunk_bytes": "128MB"}, "max_chunk_bytes"),
    ({"workspace_min_bytes": -1}, "workspace_min_bytes"),
    ({"workspace_min_bytes": True}, "workspace_min_bytes"),
    ({"min_chunk_len": 0}, "min_chunk_len"),
    ({"strict": "yes"}, "strict"),
    ({"strict": 1}, "strict"),
    ({"compiler": "tvm"}, "compiler"),
    ({"mode": "fast"}, "mode"),
    ({"inductor": {"max_autotune_please": True}}, "max_autotune_please"),
    ({"inductor": {"joint_custom_pre_pass": None}}, "joint_custom_pre_pass"),
    ({"inductor": "max_autotune"}, "inductor"),
    ({"compiler": "eager", "mode": "max-autotune"}, "compiler"),
]
BAD_IDS = [repr(o) for o, _ in BAD_OPTIONS]


@pytest.mark.parametrize("options,key", BAD_OPTIONS, ids=BAD_IDS)
def test_bad_option_is_value_error_naming_key(options, key):
    """The backend itself raises ValueError naming the key, before it looks at the graph."""
    with pytest.raises(ValueError, match=f"'{key}'"):
        mst_backend(None, [], options=options)


def test_chunks_and_memory_budget_together():
    with pytest.raises(ValueError) as info:
        mst_backend(None, [], options={"chunks": 4, "memory_budget": 1 << 20})
    assert "chunks" in str(info.value) and "memory_budget" in str(info.value)


def test_unknown_key_lists_accepted_options():
    with pytest.raises(ValueError) as info:
        MstOptions.from_dict({"chunk": 4})
    for name in ("chunks", "memory_budget", "min_bytes", "strict"):
        assert name in str(info.value)


def test_options_not_a_dict():
    with pytest.raises(ValueError, match="dict"):
        MstOptions.from_dict([("chunks", 4)])


@pytest.mark.parametrize("options", [
    {}, {"chunks": "auto"}, {"chunks": 1}, {"chunks": 64}, {"memory_budget": 1},
    {"min_bytes": 0}, {"min_chunk_len": 1}, {"strict": True}, {"strict": False},
    {"chunks": "auto", "memory_budget": 4096, "min_bytes": 0, "strict": True},
    {"compiler": "eager"}, {"mode": "max-autotune"}, {"inductor": {"max_autotune": True}},
], ids=repr)
def test_good_options_accepted(options):
    opts = MstOptions.from_dict(options)
    for key, value in options.items():
        assert getattr(opts, key) == value


@pytest.mark.parametrize("options,key", [BAD_OPTIONS[0], BAD_OPTIONS[2], BAD_OPTIONS[4],
                                         BAD_OPTIONS[7], BAD_OPTIONS[10], BAD_OPTIONS[13]],
                         ids=[BAD_IDS[i] for i in (0, 2, 4, 7, 10, 13)])
def test_bad_option_through_torch_compile(options, key):
    """Through torch.compile the backend runs at the first call, and Dynamo wraps whatever a
    backend raises in BackendCompilerFailed (a RuntimeError): the ValueError naming the key is
    its inner exception and its message is shown to the user."""
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="mst", options=options)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    err = info.value
    inner = err if isinstance(err, ValueError) else getattr(err, "inner_exception", None)
    assert isinstance(inner, ValueError), repr(err)
    assert f"'{key}'" in str(inner)
    assert f"'{key}'" in str(err)


# ---- memory_budget -----------------------------------------------------------------------

# Bytes per token of the tiny SwiGLU model's regions (inference): MLP 5120, logits 4096; with
# 74 tokens a 64 KiB budget gives the two kinds different chunk counts (6 and 5).
BUDGET = 1 << 16


@pytest.fixture(scope="module")
def budget_report():
    torch._dynamo.reset()
    report = check_against_eager(
        tiny_swiglu(VOCAB), vocab=VOCAB, training=False, batch=2, seq=37,
        options={"strict": True, "min_bytes": 0, "memory_budget": BUDGET})
    return report


def test_memory_budget_derives_chunk_count(budget_report):
    """Each region gets as many chunks as it needs for a chunk to fit the budget
    (floor(budget / bytes per token) tokens), evened out over the tokens."""
    text = summary(budget_report)
    assert len(budget_report.regions) == 3, text
    for r in budget_report.regions:
        per_token = r.bytes_before // r.tokens
        chunks = math.ceil(r.tokens / max(1, BUDGET // per_token))
        assert r.chunks >= 2, text
        assert (r.chunks, r.chunk_len) == (chunks, math.ceil(r.tokens / chunks)), text
        assert r.chunk_len * (r.chunks - 1) + r.tail_len == r.tokens, text
        assert r.bytes_after == per_token * r.chunk_len, text
    assert len({r.chunks for r in budget_report.regions}) >= 2, text


def test_memory_budget_bounds_each_chunk(budget_report):
    """memory_budget is the bytes one region's chunk intermediate may take: no chunk exceeds
    it (MLP, 5120 B/token x 74 tokens, budget 65536 -> chunks of 12 tokens, not 13)."""
    over = [(r.kind, r.bytes_after) for r in budget_report.regions if r.bytes_after > BUDGET]
    assert not over, f"one chunk's intermediate exceeds memory_budget={BUDGET}: {over}"


# ---- min_bytes ---------------------------------------------------------------------------

def test_min_bytes_large_skips_every_region_as_policy():
    """Regions below min_bytes are left alone (category "policy", not an error even in strict
    mode) and the model computes exactly what eager computes."""
    report = check_against_eager(
        tiny_swiglu(VOCAB), vocab=VOCAB, training=False, batch=2, seq=37,
        options={"strict": True, "min_bytes": 1 << 40, "chunks": 4})
    text = summary(report)
    assert report.graphs and report.graphs[0].mode == "inference", text
    assert report.regions == [], text
    policy = [s for s in report.skipped if s.category == "policy"]
    assert len(policy) == 3, text  # 2 MLPs and the LM head
    assert all("min_bytes" in s.reason for s in policy), text
    assert report.graphs[0].code == "", text


# ---- chunk count clamping ----------------------------------------------------------------

def test_chunks_larger_than_tokens_is_clamped():
    """chunks=64 over 5 tokens: one token per chunk, no empty chunks, exact numbers."""
    report = check_against_eager(tiny_swiglu(VOCAB), vocab=VOCAB, training=True, batch=1,
                                 seq=5, chunks=64)
    text = summary(report)
    assert report.count("mlp", "training") == 2, text
    assert report.count("loss", "training") == 1, text
    for r in report.regions:
        assert (r.tokens, r.chunks, r.chunk_len, r.tail_len) == (5, 5, 1, 1), text


def test_auto_respects_min_chunk_len():
    """chunks="auto" never makes chunks shorter than min_chunk_len (the tail excepted)."""
    report = check_against_eager(
        tiny_swiglu(VOCAB), vocab=VOCAB, training=False, batch=2, seq=37,
        options={"strict": True, "min_bytes": 0, "chunks": "auto", "min_chunk_len": 16})
    text = summary(report)
    assert len(report.regions) == 3, text
    for r in report.regions:
        assert r.chunks >= 2 and r.chunk_len >= 16, text
        assert r.chunks <= 74 // 16, text


def test_auto_chunks_of_a_long_sequence_are_no_longer_than_the_input_is_wide():
    """Past (width ratio) x (input width) tokens, "auto" chunks hold at most as many tokens as
    the region's input is wide (min_chunk_len if that is more): an MLP chunk's intermediates
    stay about the size of its weights however long the sequence. 300 tokens, hidden 32:
    10 MLP chunks, not 4."""
    report = check_against_eager(
        tiny_swiglu(VOCAB), vocab=VOCAB, batch=2, seq=150,
        options={"strict": True, "min_bytes": 0, "min_chunk_len": 16})
    text = summary(report)
    mlps = [r for r in report.regions if r.kind == "mlp"]
    assert len(mlps) == 2, text
    assert all((r.chunks, r.chunk_len) == (10, 30) for r in mlps), text


@pytest.mark.parametrize("max_chunk_bytes", [None, 16 * 2**10])
def test_auto_shortens_chunks_whose_intermediate_is_too_large(max_chunk_bytes):
    """The head's logits take 2 KiB per token (512 fp32), an MLP's widest value 512 bytes:
    32-token chunks hold 64 KiB and 16 KiB. With max_chunk_bytes=16 KiB the head's chunks
    are halved to a quarter of min_chunk_len (8 tokens, 16 KiB), the MLPs' stay at 32;
    with None both keep min_chunk_len."""
    report = check_against_eager(
        tiny_swiglu(VOCAB), vocab=VOCAB, batch=1, seq=128,
        options={"strict": True, "min_bytes": 0, "min_chunk_len": 32, "max_chunk_bytes": max_chunk_bytes})
    text = summary(report)
    lengths = {(r.kind, r.chunk_len) for r in report.regions}
    assert lengths == {("mlp", 32), ("loss", 8 if max_chunk_bytes else 32)}, text


@pytest.fixture
def inductor_settings(monkeypatch):
    """The config patches each compile_fx call of the backend received."""
    import mst_compile.backend

    seen = []
    real = mst_compile.backend.compile_fx

    def compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return real(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(mst_compile.backend, "compile_fx", compile_fx)
    return seen


def _compiled_swiglu(**compile_kwargs):
    model = tiny_swiglu(VOCAB)
    ids = torch.randint(0, VOCAB, (1, 37))
    with torch.no_grad():
        out = torch.compile(model, backend="mst", **compile_kwargs)(ids)
        assert torch.allclose(out, model(ids), rtol=1e-4, atol=1e-5)


def test_inductor_mode_passes_through(inductor_settings):
    """torch.compile(..., backend="mst", mode=...) gives Inductor that mode's settings (on the
    CPU cudagraphs do nothing) next to the mst pass."""
    _compiled_swiglu(mode="reduce-overhead")
    (patches,) = inductor_settings
    assert patches["triton.cudagraphs"] is True and "joint_custom_pre_pass" in patches


def test_inductor_mode_and_settings_as_mst_options(inductor_settings):
    """torch.compile refuses mode= with options=: mst takes both inside its options."""
    _compiled_swiglu(options={"mode": "max-autotune-no-cudagraphs", "min_bytes": 0, "chunks": 4,
                              "inductor": {"epilogue_fusion": False}})
    (patches,) = inductor_settings
    assert patches["max_autotune"] is True and patches["epilogue_fusion"] is False
    assert "joint_custom_pre_pass" in patches
    import mst_compile

    assert mst_compile.last_report().count("mlp", "inference") == 2
