"""A loss chunk's large CPU products are written into a reused buffer (decision 28): the
buffer is reused only when nothing else holds it, let go when the loss loop ends, and the
rewritten graphs match eager."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from numerics import check_against_eager
from tiny_models import llama_proxy
from torch._inductor.utils import run_and_get_code
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from mst_compile import ops

ALWAYS = {"workspace_min_bytes": 0, "chunks": 4, "min_bytes": 0, "strict": True}


@pytest.fixture(autouse=True)
def _no_kept_buffer():
    ops.release_workspaces()
    yield
    ops.release_workspaces()


def test_the_buffer_is_reused_only_when_nothing_else_holds_it():
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    first = ops.mm_in_workspace(a, b)
    torch.testing.assert_close(first, a @ b)
    second = ops.mm_in_workspace(2 * a, b)  # `first` is held: a buffer of its own
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, a @ b)
    torch.testing.assert_close(second, 2 * a @ b)
    kept = first.data_ptr()
    del first, second
    third = ops.mm_in_workspace(a[:2], b)  # fewer rows fit the kept buffer
    assert third.data_ptr() == kept
    torch.testing.assert_close(third, a[:2] @ b)
    del third
    larger = ops.mm_in_workspace(torch.randn(9, 3), b)  # too small: a larger one is kept
    kept_larger = StorageWeakRef(larger.untyped_storage())
    del larger
    assert not kept_larger.expired()
    ops.release_workspaces()
    assert kept_larger.expired()


def _step_code(options: dict) -> str:
    model = llama_proxy(vocab=512)
    compiled = torch.compile(model, backend="mst", options=options)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    _, codes = run_and_get_code(lambda: compiled(ids, ids.roll(-1, 1)).backward())
    return "\n".join(codes)


def test_only_loss_chunks_use_the_workspace_and_the_step_lets_it_go():
    """Through Inductor, with every product eligible: the loss chunks call it and no loss
    chunk allocates a [rows, vocabulary] buffer of its own (the logits gradient is written
    over the workspace); the MLPs' loops keep `mm`; the buffer is let go by the end of the
    step; loss and every gradient match eager over two accumulated micro-batches."""
    check_against_eager(llama_proxy(), vocab=512, micro_batches=2, options=ALWAYS)
    code = _step_code(ALWAYS)
    subgraphs = re.findall(r"def (mst_region\d+_\w+?)\(args\):(.*?)\n    return", code, re.DOTALL)
    using = {name for name, body in subgraphs if "mst_compile.mm_in_workspace" in body}
    assert using and all("_loss_" in name for name in using), [n for n, _ in subgraphs]
    for name, body in subgraphs:
        if "_loss_" in name:
            assert name in using
            assert not re.search(r"empty_strided_cpu\(\(u\d+, 512\)", body), body
    assert not ops._workspaces


def test_every_chunk_of_a_step_gets_the_same_buffer(monkeypatch):
    """With only the logits eligible ([18, 512] fp32 per chunk, 36 KiB; the input gradient
    [18, HIDDEN] is below 16 KiB): four chunks, one buffer."""
    given = []
    workspace = ops.workspace

    def recorded(numel, dtype, device):
        buffer = workspace(numel, dtype, device)
        given.append(buffer.data_ptr())
        return buffer

    monkeypatch.setattr(ops, "workspace", recorded)
    _step_code({**ALWAYS, "workspace_min_bytes": 16 * 2**10})
    assert len(given) == 4 and len(set(given)) == 1, given


@pytest.mark.parametrize("case", ["bf16 autocast", "ignored rows computed", "op by op"])
def test_workspace_numerics(case):
    extra = {"op by op": {"compiler": "eager"}, "ignored rows computed": {"skip_ignored_rows": False}}
    check_against_eager(
        llama_proxy(), vocab=512, batch=3, seq=29, options={**ALWAYS, **extra.get(case, {})},
        autocast=torch.bfloat16 if case == "bf16 autocast" else None,
    )


def test_small_products_keep_their_own_buffers():
    """The default (32 MiB) leaves a 512-word head's chunks alone."""
    assert "mm_in_workspace" not in _step_code({"chunks": 4, "min_bytes": 0, "strict": True})


def test_a_checkpointed_loss_keeps_no_buffer_after_the_step():
    """A head and loss under activation checkpointing run their loop again in the backward,
    after the loop's end let the workspace go: such a loop keeps `mm` (else the last chunk's
    buffer would stay kept after the step). Loss and gradients match eager."""

    class CheckpointedHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(512, 64)
            self.head = torch.nn.Linear(64, 512, bias=False)

        def loss(self, h, labels):
            return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())

        def forward(self, ids, labels):
            return checkpoint(self.loss, self.embed(ids), labels, use_reentrant=False)

    torch.manual_seed(0)
    model = CheckpointedHead()
    compiled = torch.compile(copy.deepcopy(model), backend="mst", options=ALWAYS, fullgraph=True)
    ids = torch.randint(0, 512, (2, 64))
    labels = ids.roll(-1, 1)
    got = compiled(ids, labels)
    got.backward()
    want = model(ids, labels)
    want.backward()
    assert not ops._workspaces
    torch.testing.assert_close(got, want)
    for (name, p), q in zip(compiled.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
