"""A loss chunk's gradient side reads the row statistics through a fence (decision 22), so
Inductor computes it in a kernel of its own and writes the logits gradient over the logits."""

from __future__ import annotations

import re

import pytest
import torch
from aten_graphs import cross_entropy_graph, decomposed
from numerics import check_against_eager
from tiny_models import llama_proxy
from torch._inductor.utils import run_and_get_code

from mst_compile.passes.log_softmax import gradient_after_statistics

aten = torch.ops.aten
FENCE = torch.ops.mst_compile.fence.default


def test_gradient_reads_fenced_statistics_and_is_unchanged():
    gm, inputs = cross_entropy_graph()
    expected = gm(*inputs)
    assert gradient_after_statistics(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    fences = list(gm.graph.find_nodes(op="call_function", target=FENCE))
    assert [f.args[0].target for f in fences] == [aten.amax.default, aten.log.default]
    for got, want in zip(gm(*inputs), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["loss only", "returned", "no max shift"])
def test_other_graphs_are_left_alone(case):
    def f(x, labels):
        if case == "no max shift":
            logp = x - torch.log(torch.exp(x).sum(1, keepdim=True))
        else:
            logp = torch.log_softmax(x, 1)
        loss = logp.gather(1, labels[:, None]).sum()
        if case == "returned":
            return loss, logp
        if case == "loss only":
            return loss
        return loss, torch.exp(logp) - 1

    gm = decomposed(f, torch.randn(4, 6), torch.randint(0, 6, (4,)))
    assert gradient_after_statistics(gm.graph) == 0


def test_inductor_writes_the_logits_gradient_over_the_logits():
    """Through Inductor, each loss chunk allocates one [rows, vocabulary] buffer (the logits,
    then their gradient in place), and loss and every gradient match eager."""
    report = check_against_eager(llama_proxy(), vocab=512, batch=2, seq=37, micro_batches=2)
    assert [r.kind for r in report.regions][-1] == "loss"
    model = llama_proxy(vocab=512)
    compiled = torch.compile(model, backend="mst", options={"chunks": 4, "min_bytes": 0, "strict": True})
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    _, codes = run_and_get_code(lambda: compiled(ids, ids.roll(-1, 1)).backward())
    code = "\n".join(codes)
    chunks = re.findall(r"def mst_region\d+_loss_len\w+\(args\):.*?\n    return", code, re.DOTALL)
    assert len(chunks) == 2, code  # one per chunk length
    for chunk in chunks:
        assert len(re.findall(r"empty_strided_cpu\(\(u\d+, 512\)", chunk)) == 1, chunk
