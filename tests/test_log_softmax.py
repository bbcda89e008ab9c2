"""A loss chunk's gradient side reads the row statistics through a fence (decision 22), so
Inductor computes it in a kernel of its own and writes the logits gradient over the logits."""

from __future__ import annotations

import re

import pytest
import torch
from numerics import check_against_eager
from tiny_models import llama_proxy
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from mst_compile.passes.log_softmax import gradient_after_statistics

aten = torch.ops.aten
FENCE = torch.ops.mst_compile.fence.default


def _decomposed(f, *args):
    """`f` traced to ATen with Inductor's decompositions, as mst's chunk graphs are."""
    return make_fx(f, decomposition_table=select_decomp_table())(*args)


def _cross_entropy_backward(x, labels, grad):
    logp = aten._log_softmax(x, 1, False)
    loss, total = aten.nll_loss_forward(logp, labels, None, 1, -100)
    glogp = aten.nll_loss_backward(grad, logp, labels, None, 1, -100, total)
    return loss, aten._log_softmax_backward_data(glogp, logp, 1, torch.float32)


def test_gradient_reads_fenced_statistics_and_is_unchanged():
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(9, 13, generator=g), torch.randint(0, 13, (9,), generator=g)
    labels[4] = -100
    grad = torch.tensor(0.3)
    gm = _decomposed(_cross_entropy_backward, x, labels, grad)
    expected = gm(x, labels, grad)
    assert gradient_after_statistics(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    fences = list(gm.graph.find_nodes(op="call_function", target=FENCE))
    assert [f.args[0].target for f in fences] == [aten.amax.default, aten.log.default]
    for got, want in zip(gm(x, labels, grad), expected):
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

    gm = _decomposed(f, torch.randn(4, 6), torch.randint(0, 6, (4,)))
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
