"""Dynamic sequence lengths: one compiled graph serves many lengths, chunked correctly at each.

With `dynamic=True` the token count is symbolic (batch x sequence). mst fixes the chunk count
at compile time and guards the lengths that count is right for; chunk lengths are computed
from the runtime length. So lengths inside one guard bucket share a compile, and a length
outside it recompiles once with a chunk count that follows it (powers of two where the
policy depends on the length). Every length is checked against eager on the loss and every
parameter gradient, and the compiles are counted.
"""

from __future__ import annotations

import pytest
import torch
from numerics import BF16_RTOL, FP32_RTOL, rel_err, summary

import mst_compile
from mst_compile.backend import mst_backend
from mst_compile.demo_models import LlamaConfig, LlamaProxy

VOCAB, HIDDEN, INTERMEDIATE = 512, 32, 128
BATCH = 2
# "auto" with chunks of at least 16 tokens: the MLP (128 / 32 wide) gets 4 chunks from 64
# tokens on, and past 4 x 32 tokens chunks of at most 32 tokens (its input's width), their
# count a power of two: 8 for 129..256 tokens, 16 for 257..512; the head (512 / 32 wide)
# would take 16 chunks from 256 tokens on and below that gets the power of two that keeps
# chunks >= 16 tokens: 8 chunks for 128..255 tokens.
OPTIONS = {"min_chunk_len": 16, "min_bytes": 0, "strict": True}


class CountingBackend:
    """backend="mst" with options, counting the graphs it compiles."""

    def __init__(self, options: dict):
        self.options = options
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        # Counted on success: with dynamic=True Dynamo's first attempt may restart from inside
        # the backend (TensorifyScalarRestartAnalysis) and trace again; that is one compile.
        compiled = mst_backend(gm, example_inputs, options=self.options)
        self.compiles += 1
        return compiled


def _model() -> LlamaProxy:
    torch.manual_seed(0)
    return LlamaProxy(LlamaConfig(vocab_size=VOCAB, hidden=HIDDEN, intermediate=INTERMEDIATE,
                                  layers=1, heads=2))


def _batch(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, VOCAB, (BATCH, seq), generator=gen)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, : seq // 5] = -100  # ignore_index inside the first chunks
    return ids, labels


def _train_step_matches_eager(model, compiled, seq: int, autocast: torch.dtype | None = None,
                              rtol: float = FP32_RTOL) -> None:
    ids, labels = _batch(seq)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        model.zero_grad(set_to_none=True)
        loss = compiled(ids, labels)
        loss.backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        expected = model(ids, labels)
        expected.backward()
    assert rel_err(loss, expected) <= rtol, f"S={seq}"
    for (name, p), g in zip(model.named_parameters(), got):
        assert rel_err(g, p.grad) <= rtol, f"S={seq}: {name}"


def _chunks(kind: str) -> int:
    report = mst_compile.last_report()
    found = [r for r in report.regions if r.kind == kind]
    assert found and all(r.symbolic for r in found), summary(report)
    return found[0].chunks


def test_training_three_lengths_one_compile_then_the_count_follows_the_length():
    model = _model()
    backend = CountingBackend(OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)

    # 2 x 70, 2 x 97, 2 x 127 tokens: 140, 194, 254, all in the head's 128..255 bucket.
    _train_step_matches_eager(model, compiled, 70)
    first = backend.compiles
    report = mst_compile.last_report()
    assert report.count("mlp", "training") == 1 and report.count("loss", "training") == 1, (
        summary(report))
    assert _chunks("mlp") == 8 and _chunks("loss") == 8, summary(report)
    for seq in (97, 127):
        _train_step_matches_eager(model, compiled, seq)
    assert backend.compiles == first, "a length inside the guarded bucket recompiled"

    # 2 x 150 = 300 tokens: past the head's 256-token threshold, one recompile, 16 chunks.
    _train_step_matches_eager(model, compiled, 150)
    assert backend.compiles == first + 1
    assert _chunks("loss") == 16 and _chunks("mlp") == 16, summary(mst_compile.last_report())
    # ... and 2 x 40 = 80 tokens: the 64..127 bucket, 4 head chunks, 4 MLP chunks.
    _train_step_matches_eager(model, compiled, 40)
    assert backend.compiles == first + 2
    assert _chunks("loss") == 4 and _chunks("mlp") == 4, summary(mst_compile.last_report())


def test_memory_budget_chunk_count_follows_the_length_in_powers_of_two():
    """memory_budget fixes the tokens per chunk; with a symbolic length the chunk count is the
    power of two that keeps the chunks (T // n tokens) within the budget, recompiled only when
    the length crosses a power-of-two bucket. The last chunk takes the remainder: up to
    n - 1 tokens more."""
    model = _model()
    budget = 256 * 1024
    backend = CountingBackend({**OPTIONS, "memory_budget": budget})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    _train_step_matches_eager(model, compiled, 70)
    first, counts = backend.compiles, {}
    report = mst_compile.last_report()
    for r in report.regions:
        per_token = r.bytes_before // r.tokens
        assert r.chunk_len * per_token <= budget, summary(report)
        assert r.chunk_len <= r.tail_len < r.chunk_len + r.chunks, summary(report)
        counts[r.kind] = r.chunks
    _train_step_matches_eager(model, compiled, 66)
    assert backend.compiles == first, "a length inside the bucket recompiled"
    _train_step_matches_eager(model, compiled, 140)
    assert backend.compiles == first + 1
    doubled = {r.kind: r.chunks for r in mst_compile.last_report().regions}
    assert doubled == {kind: 2 * n for kind, n in counts.items()}, (counts, doubled)


@pytest.mark.parametrize("seq, head_chunks, mlp_chunks", [(37, 4, 4), (100, 8, 8)])
def test_inference_dynamic(seq, head_chunks, mlp_chunks):
    """No-grad forward, symbolic length: logits equal eager's; lengths in one bucket share the
    compile."""
    model = _model()
    backend = CountingBackend(OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for length in (seq, seq + 9):
            ids, _ = _batch(length)
            assert rel_err(compiled(ids), model(ids)) <= FP32_RTOL, f"S={length}"
    assert backend.compiles == 1
    assert _chunks("mlp") == mlp_chunks  # 200..218 tokens: chunks of at most 32 tokens
    assert _chunks("logits") == head_chunks  # 74..92 tokens: 64..127 bucket; 200..218: 128..255


def test_bf16_autocast_dynamic():
    model = _model()
    compiled = torch.compile(model, backend=CountingBackend(OPTIONS), dynamic=True)
    for seq in (70, 97):
        _train_step_matches_eager(model, compiled, seq, autocast=torch.bfloat16, rtol=BF16_RTOL)
