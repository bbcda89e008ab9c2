"""Small graphs in the form mst's chunk graphs have: ATen after Inductor's decompositions."""

from __future__ import annotations

import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def decomposed(f, *args) -> GraphModule:
    """`f` traced to ATen with Inductor's decompositions, every node with its fake value."""
    return make_fx(f, decomposition_table=select_decomp_table())(*args)


def cross_entropy_backward(x, labels, grad):
    """A loss-form chunk's maths: the mean cross entropy of logits `x` and its gradient."""
    logp = aten._log_softmax(x, 1, False)
    loss, total = aten.nll_loss_forward(logp, labels, None, 1, -100)
    glogp = aten.nll_loss_backward(grad, logp, labels, None, 1, -100, total)
    return loss, aten._log_softmax_backward_data(glogp, logp, 1, torch.float32)


def cross_entropy_graph(seed: int = 0) -> tuple[GraphModule, tuple[torch.Tensor, ...]]:
    """`cross_entropy_backward` traced on 9 rows of 13 classes (one label ignored), and its
    inputs."""
    g = torch.Generator().manual_seed(seed)
    x, labels = torch.randn(9, 13, generator=g), torch.randint(0, 13, (9,), generator=g)
    labels[4] = -100
    inputs = (x, labels, torch.tensor(0.3))
    return decomposed(cross_entropy_backward, *inputs), inputs
