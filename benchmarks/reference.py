"""A hand-written mini-sequence model in the style of the MST reference code (eager).

The reference code patches a model's MLP and LM head by hand; here a wrapper shares the
workload model's parameters and replaces two things in its forward:

- every SwiGLU MLP runs through `MiniSequenceMLP`: the forward keeps only the MLP input and
  computes the output chunk by chunk under no_grad; the backward recomputes each chunk with
  autograd and accumulates the weight gradients;
- the LM head and the loss run through `MiniSequenceLMHeadLoss`: the forward computes, chunk
  by chunk, the summed cross entropy and its gradients with respect to the hidden states and
  the LM-head weight; the backward only scales them by the incoming (scalar) gradient.

Known bugs of the original (docs/design.md, "Known pitfalls") are avoided: the LM-head weight gradient is
produced once, and chunk lengths that do not divide the sequence keep every token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mst_compile.options import MstOptions

from .workload import IGNORE_INDEX, CausalLM

MIN_CHUNK_LEN = MstOptions().min_chunk_len  # the same floor as mst's "auto"


class MiniSequenceMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp: nn.Module, chunks: int, *params: torch.Tensor):
        ctx.mlp, ctx.chunks = mlp, chunks
        ctx.save_for_backward(x)
        out = torch.empty_like(x)
        with torch.no_grad():
            for x_c, out_c in zip(x.chunk(chunks, dim=1), out.chunk(chunks, dim=1)):
                out_c.copy_(mlp(x_c))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = list(ctx.mlp.parameters())
        grad_x = torch.empty_like(x)
        grad_params = [torch.zeros_like(p) for p in params]
        pieces = zip(
            x.chunk(ctx.chunks, 1), grad_out.chunk(ctx.chunks, 1), grad_x.chunk(ctx.chunks, 1)
        )
        for x_c, g_c, gx_c in pieces:
            x_c = x_c.detach().requires_grad_(True)
            with torch.enable_grad():
                y_c = ctx.mlp(x_c)
            grads = torch.autograd.grad(y_c, [x_c, *params], g_c)
            gx_c.copy_(grads[0])
            for acc, g in zip(grad_params, grads[1:]):
                acc.add_(g)
        return (grad_x, None, None, *grad_params)


class MiniSequenceLMHeadLoss(torch.autograd.Function):
    """Mean cross entropy of `linear(h, weight)` against `labels`, chunk by chunk."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunks: int):
        count = (labels != IGNORE_INDEX).sum()  # stays on device: no host sync
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.detach().requires_grad_(True)
        for h_c, l_c, gh_c in zip(
            h.chunk(chunks, 0), labels.chunk(chunks, 0), grad_h.chunk(chunks, 0)
        ):
            h_c = h_c.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = F.linear(h_c, w).float()
                loss_c = F.cross_entropy(logits, l_c, ignore_index=IGNORE_INDEX, reduction="sum")
            g_h, g_w = torch.autograd.grad(loss_c, [h_c, w])
            gh_c.copy_(g_h)
            grad_w.add_(g_w)
            loss.add_(loss_c.detach())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), count)
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None, None


def capped(chunks: int, tokens: int) -> int:
    """At most `chunks`, and chunks of at least MIN_CHUNK_LEN tokens."""
    return max(1, min(chunks, tokens // MIN_CHUNK_LEN))


class MiniSequenceMLPModule(nn.Module):
    """Runs `mlp` (any [batch, seq, hidden] -> same module) through MiniSequenceMLP."""

    def __init__(self, mlp: nn.Module, chunks: int, cap: bool):
        super().__init__()
        self.mlp, self.chunks, self.cap = mlp, chunks, cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = capped(self.chunks, x.shape[1]) if self.cap else self.chunks
        return MiniSequenceMLP.apply(x, self.mlp, chunks, *self.mlp.parameters())


class MstReferenceModel(nn.Module):
    """A workload model (benchmarks.workload.CausalLM) with mini-sequence MLPs and LM head +
    loss, patched in place the way the reference code patches a model's classes.

    Default chunk counts follow the MST paper's rule of thumb, intermediate / hidden for the
    MLP and vocabulary / hidden for the LM head, capped like mst's "auto" so that no chunk is
    shorter than MIN_CHUNK_LEN tokens (mst's `max_chunk_bytes` halving is not copied: the
    reference code has none) (vocabulary / hidden is 501 for a 128256-token vocabulary
    at hidden 256: one-token chunks that rebuild the full weight gradient per token)."""

    def __init__(
        self, base: CausalLM, mlp_chunks: int | None = None, loss_chunks: int | None = None
    ):
        super().__init__()
        self.base = base
        hidden, vocab = base.lm_head.in_features, base.lm_head.out_features
        cap_mlp = mlp_chunks is None
        for parent, name in base.mlps():
            mlp = getattr(parent, name)
            if mlp_chunks is None:
                widest = max(m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
                mlp_chunks = math.ceil(widest / hidden)
            setattr(parent, name, MiniSequenceMLPModule(mlp, mlp_chunks, cap=cap_mlp))
        self.loss_chunks = loss_chunks or math.ceil(vocab / hidden)
        self.cap_loss = loss_chunks is None

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.base.hidden(ids)
        if labels is None:
            return self.base.next_token_logits(h)
        chunks = capped(self.loss_chunks, labels.numel()) if self.cap_loss else self.loss_chunks
        return MiniSequenceLMHeadLoss.apply(
            h.flatten(0, 1), self.base.lm_head.weight, labels.flatten(), chunks
        )
