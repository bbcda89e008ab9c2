"""The row sum of a scaled one-hot scatter is its one value (passes/one_hot_sum.py, decision
22): the cross-entropy backward's sum over the vocabulary becomes a [rows, 1] product."""

from __future__ import annotations

import pytest
import torch
from aten_graphs import cross_entropy_graph, decomposed
from numerics import check_against_eager
from tiny_models import llama_proxy

from mst_compile.passes.one_hot_sum import sum_one_hot_rows

aten = torch.ops.aten


def _sums(gm):
    return list(gm.graph.find_nodes(op="call_function", target=aten.sum.dim_IntList))


def test_cross_entropy_backward_sum_becomes_the_scale():
    gm, inputs = cross_entropy_graph()
    expected = gm(*inputs)
    before = len(_sums(gm))
    assert sum_one_hot_rows(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert len(_sums(gm)) == before - 1
    for got, want in zip(gm(*inputs), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["not zeros", "scale per column", "two per row", "not summed over"])
def test_other_sums_are_left_alone(case):
    def f(x, index):
        base = torch.zeros(4, 6) if case != "not zeros" else x
        scale = x[:, :1] if case != "scale per column" else x[:1, :]
        if case == "two per row":
            index = torch.cat([index, index.flip(0)], 1)
        scattered = base.scatter(1, index, -1.0) * scale
        return scattered.sum(0 if case == "not summed over" else 1, keepdim=True)

    g = torch.Generator().manual_seed(1)
    gm = decomposed(f, torch.randn(4, 6, generator=g), torch.randint(0, 6, (4, 1), generator=g))
    assert sum_one_hot_rows(gm.graph) == 0


def test_loss_chunks_have_no_vocabulary_sum_of_the_one_hot():
    """Through Inductor: each loss chunk sums over the vocabulary once (the softmax's
    normaliser), and loss and every gradient match eager over two micro-batches."""
    report = check_against_eager(llama_proxy(), vocab=512, batch=2, seq=37, micro_batches=2)
    (graph,) = report.graphs
    chunks = graph.code.split("class mst_region")[1:]
    loss_chunks = [c for c in chunks if c.split("(", 1)[0].split("_")[1] == "loss"]
    assert len(loss_chunks) == 2, [c[:40] for c in chunks]  # one per chunk length
    for chunk in loss_chunks:
        assert chunk.count("aten.sum.dim_IntList(") == 1, chunk
