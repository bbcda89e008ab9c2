"""Weight gradients (every summed output) of a chunk loop are added into one buffer in place (docs/design.md,
"Rewrite"; decision 18): the operator itself, and Inductor's code for a rewritten model."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from numerics import DEVICES, FP32_RTOL, check_against_eager, rel_err
from tiny_models import HIDDEN, LAYERS, llama_proxy
from torch._inductor.utils import run_and_get_code

from mst_compile import ops
from mst_compile.demo_models import LlamaConfig, LlamaProxy


@pytest.mark.parametrize("transposed", [False, True])
def test_accumulate_matmul_float32(transposed):
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(40, 24, generator=g)
    a = torch.randn(13, 40, generator=g).t() if transposed else torch.randn(40, 13, generator=g)
    b = torch.randn(13, 24, generator=g)
    expected = acc + a @ b
    same = acc
    ops.accumulate_matmul(acc, a, b)
    assert acc is same
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-5)


def test_accumulate_matmul_bfloat16_operands_in_tiles(monkeypatch):
    """bf16 operands into a float32 accumulator: the product is made in bf16, as the
    unchunked graph makes it, tile by tile (tiles of 3 rows here, so the last is short)."""
    monkeypatch.setattr(ops, "_TILE_BYTES", 3 * 24 * 2)
    g = torch.Generator().manual_seed(1)
    acc = torch.randn(40, 24, generator=g)
    a = torch.randn(13, 40, generator=g).to(torch.bfloat16).t()
    b = torch.randn(13, 24, generator=g).to(torch.bfloat16)
    expected = acc + (a @ b).float()
    ops.accumulate_matmul(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, expected, rtol=1e-2, atol=1e-2)


def accumulations_per_buffer(codes: list[str], op: str) -> collections.Counter:
    """(graph number, buffer) -> how many `mst_compile.<op>` calls add into it, in Inductor's
    code for each graph (buffer names repeat between the forward's and the backward's)."""
    pattern = rf"torch\.ops\.mst_compile\.{op}\.default\((\w+),"
    return collections.Counter((i, name) for i, code in enumerate(codes) for name in re.findall(pattern, code))


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_adds_every_weight_gradient_in_place(device):
    """Through Inductor (C++ or Triton): each chunk's share of a weight gradient is added into
    the same buffer (the accumulator is never copied: Inductor reinplaced every call), and the
    loss and every gradient still equal eager's."""
    chunks = 4
    model = llama_proxy(vocab=512).to(device)
    compiled_model = llama_proxy(vocab=512).to(device)
    compiled_model.load_state_dict(model.state_dict())
    compiled = torch.compile(compiled_model, backend="mst",
                             options={"chunks": chunks, "min_bytes": 0, "strict": True})
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.roll(-1, 1)
    _, codes = run_and_get_code(lambda: compiled(ids, labels).backward())
    model(ids, labels).backward()

    per_buffer = accumulations_per_buffer(codes, "accumulate_matmul")
    # 2 blocks x 3 MLP weights + the head weight, each added chunks - 1 times into one buffer
    layers = len(model.blocks)
    assert len(per_buffer) == 3 * layers + 1, per_buffer
    assert set(per_buffer.values()) == {chunks - 1}, per_buffer
    for name, p in model.named_parameters():
        got = dict(compiled_model.named_parameters())[name].grad
        assert rel_err(got, p.grad) < FP32_RTOL, name


def test_every_loss_chunk_is_accumulated_in_the_forward():
    """The loss form computes the head's weight gradient in the forward loop. With chunks
    of 8 tokens against a hidden size of 32 the last chunk's operands are smaller than the
    sum, and the partitioner moved that chunk's accumulation into the backward, saving its
    operands beside the sum (decision 26; at the full vocabulary with 128-token chunks, 62 MB
    more alive through the backward). Its forward outputs are made after its gradients: all
    16 chunks' shares are added in the forward graph (15 in place into the first's), every
    chunk's input-gradient rows written there, and the gradients equal eager's."""
    chunks = 16
    model, compiled_model = llama_proxy(vocab=512), llama_proxy(vocab=512)
    compiled = torch.compile(compiled_model, backend="mst",
                             options={"chunks": chunks, "min_bytes": 0, "strict": True})
    ids = torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(0))
    _, codes = run_and_get_code(lambda: compiled(ids, ids.roll(-1, 1)).backward())
    model(ids, ids.roll(-1, 1)).backward()
    forward = [code for code in codes if "_forward']" in code.split("\n", 1)[0]]  # "# AOT ID: ['0_forward']"
    assert len(forward) == 1, [code.split("\n", 1)[0] for code in codes]
    head = accumulations_per_buffer(forward, "accumulate_matmul")
    assert list(head.values()) == [chunks - 1], head
    # the loss rows and the input-gradient rows, each written by every chunk
    assert sorted(accumulations_per_buffer(forward, "put_rows").values()) == [chunks, chunks]
    for name, p in model.named_parameters():
        got = dict(compiled_model.named_parameters())[name].grad
        assert rel_err(got, p.grad) < FP32_RTOL, name


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_weight_gradients_match_eager_with_accumulation(autocast):
    """Micro-batches accumulate into .grad on top of the in-place chunk sums."""
    check_against_eager(llama_proxy(), vocab=512, seq=45, micro_batches=2, autocast=autocast,
                        options={"chunks": 3, "min_bytes": 0, "strict": True})


def test_inductor_adds_other_summed_outputs_in_place():
    """A summed output that is not one matmul (the expert weights' gradients of a declared
    MoE block, from batched matmuls over gathered weights; the router's bias) is added into
    one buffer in place too (ops.accumulate), and the gradients equal eager's."""
    from test_moe import RoutedLM, TopOneExperts

    import mst_compile
    from mst_compile.declare import forget

    chunks = 4
    model, compiled_model = RoutedLM(), RoutedLM()
    mst_compile.token_wise(TopOneExperts)
    try:
        compiled = torch.compile(compiled_model, backend="mst",
                                 options={"chunks": chunks, "min_bytes": 0, "strict": True})
        ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
        _, codes = run_and_get_code(lambda: compiled(ids, ids.roll(-1, 1)).backward())
    finally:
        forget(TopOneExperts)
    model(ids, ids.roll(-1, 1)).backward()
    per_buffer = accumulations_per_buffer(codes, "accumulate")
    # the experts' up and down weights, each added chunks - 1 times into one buffer
    assert len(per_buffer) >= 2 and set(per_buffer.values()) == {chunks - 1}, per_buffer
    for name, p in model.named_parameters():
        got = dict(compiled_model.named_parameters())[name].grad
        assert rel_err(got, p.grad) < FP32_RTOL, name


def chunk_calls_and_recomputes(code: str) -> tuple[str, list[list[str]]]:
    """In Inductor's wrapper code: the sequence of chunk subgraph calls ("C") and attention
    recomputes ("R", a checkpointed block's attention run again with its RNG state), and for
    each call the results of earlier calls still held then (assigned, not yet deleted)."""
    events, held, at_calls = [], [], []
    for line in code.splitlines():
        call = re.match(r"\s*(buf\d+) = mst_\w+\(", line)
        if call:
            events.append("C")
            at_calls.append(list(held))
            held.append(call.group(1))
        elif "run_with_rng_state(" in line:
            events.append("R")
        for name in re.findall(r"del (buf\d+)", line):
            if name in held:
                held.remove(name)
    return "".join(events), at_calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_chunk_runs_after_the_previous_chunks_results_are_taken(checkpointing):
    """Inductor's scheduler may move what nothing downstream reads (the in-place
    accumulations, copies into a joined output) after later chunks, and with it hoisted a
    checkpointed block's recompute ahead of the next block's backward loop (the +AC
    regression of decision 18). Each call takes an order token made after the previous
    chunk's results are accumulated and taken (decision 24): no earlier chunk's results are
    held at any call, and each block's attention is recomputed right before its own loop."""
    chunks = 4
    torch.manual_seed(0)
    model = LlamaProxy(LlamaConfig(vocab_size=512, hidden=HIDDEN, intermediate=4 * HIDDEN,
                                   layers=LAYERS, heads=4, activation_checkpointing=checkpointing))
    compiled = torch.compile(model, backend="mst",
                             options={"chunks": chunks, "min_bytes": 0, "strict": True})
    ids = torch.randint(0, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    _, codes = run_and_get_code(lambda: compiled(ids, ids.roll(-1, 1)).backward())
    backward = codes[-1]
    events, at_calls = chunk_calls_and_recomputes(backward[backward.rindex("def call("):])
    if checkpointing:
        # the last block's output feeds the final norm outside any checkpoint, so its
        # forward, MLP loop included, is recomputed too, as Inductor does without mst
        # (decision 27)
        expected = "R" + "C" * 2 * chunks + ("R" + "C" * chunks) * (LAYERS - 1)
    else:
        expected = "C" * chunks * LAYERS
    assert events == expected, events
    assert all(not held for held in at_calls), at_calls
