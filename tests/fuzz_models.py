"""Random token-wise models for the property-based fuzzer (tests/test_fuzz.py).

A model is described by a `ModelSpec`: a frozen dataclass whose repr is valid Python, so a
failing example printed by hypothesis is reproduced with

    cd tests && ../.venv/bin/python -c "from fuzz_models import *; print(check_spec(ModelSpec(...)))"

(the repr lists the fields that differ from their defaults).

`model_specs()` is the hypothesis strategy, `build_model(spec)` the `nn.Module` (seeded
random weights, tiny sizes) and `check_spec(spec)` the oracle: the model compiled with
backend="mst" against the same model run eagerly (outputs, every parameter gradient, the
report's skip reasons, fallback warnings, and that simple MLP blocks are rewritten).

The space (all of it deterministic, no dropout):
- MLP kinds: SwiGLU, GeGLU (tanh GELU), GELU, ReLU, SwiGLU from a fused gate_up projection
  split with `.chunk(2, -1)`; with or without biases; intermediate 2x-6x hidden. Or "routed":
  a mixture of experts (`FuzzExperts`, declared token-wise with `mst_compile.token_wise`):
  top-1 or top-2 of 2-4 experts, each token's expert weights gathered (batched_mm style) or
  the tokens sorted by expert first and restored after (grouped style, with `bias`); the
  inner ops do not apply to it. It must always become one "moe" region.
- Norm before the MLP: RMSNorm (`F.rms_norm`), LayerNorm, none; residual or not.
- Layout: batch-first [B, S, d] or sequence-first (`emb(ids.t())` -> [S, B, d]); the logits
  of a sequence-first model are transposed back before the loss, or the loss / returned
  logits stay sequence-first (labels transposed instead).
- Ops inside an MLP (on the intermediate, between the up and down projections):
  ops that keep each token's values together: "transpose" (h.transpose(1, 2) * scale[I, 1],
  transposed back), "swap_bs" (batch and sequence dims swapped, scaled, swapped back),
  "permute" (to [I, B, S] and back), "flatten" (to [B*S, I] and back), "heads" (unflattened
  to [B, S, 2, I/2] and back); a positional table [S_max, I] or [1, S_max, I] sliced to the
  sequence and added ("pos_add") or multiplied ("pos_mul"); a per-token mask from the ids
  (ids % 3 != 0) as float ("mask"), as bool ("mask_bool", type promotion) or in a
  torch.where ("mask_where"); and the token-mixing ops "cumsum", "roll", "pad_shift"
  (F.pad + slice), "seq_mean", "batch_mean", "attn" (causal SDPA on the intermediate split
  into heads).
- Ops before each block (on the hidden state, residual): the same token-mixing ops, "attn"
  from a qkv linear projection, "attn_mask" (the same with the mask transformers builds:
  `kv <= q` and a per-key padding term, as a float 0 / -inf [B, 1, S, S] mask, which mst
  proves causal and replaces), "attn_rope" (q and k rotated by their positions, v a view of
  the projection's output: mst has attention keep a copy of v, not the projection's
  output), "attn_heads" (q, k, v selected from one `[b, s, 3, h, d]` view of the
  projection's output: their gradients become one join in the projection's layout), or a
  per-token "mask". Blocks may be frozen, activation-
  checkpointed, or all run twice with shared weights; a learned positional table may be
  added to the embeddings (which may be frozen).
- Heads: LM head Linear(d, V) (optionally tied to the embedding, optional bias), logits
  optionally soft-capped (cap * tanh(logits / cap)) or scaled, then: cross-entropy
  (ignore_index=-100, mean / sum / per-token sum over the valid count, label smoothing,
  class weights, z-loss over every token or masked like the loss with torch.where,
  optionally the causal-LM shift logits[:, :-1] / labels[:, 1:]),
  KL divergence to teacher logits (a random input tensor, or a frozen second linear under
  no_grad), a regression head (MSE to a random target), or no loss (the logits are
  returned). A loss may come with the logits, and with an auxiliary value-head term.
- batch 1-3, sequence 5-40, chunks 2-5; training (optionally 2 micro-batches of gradient
  accumulation; 0, 20, 75 or 100% of the labels -100 (100% not with a mean), sometimes a
  whole row) or inference (no_grad). Loss regions skip the ignored rows wherever mst proves
  it exact (ignored_rows.py): the fuzzer checks those rewrites like every other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from hypothesis import strategies as st
from numerics import FP32_RTOL, rel_err, summary
from torch import nn

import mst_compile
from mst_compile.report import NOT_A_BLOCK, POLICY, UNSUPPORTED, Report, collect_reports

MLP_KINDS = ("swiglu", "gelu", "relu", "geglu", "fused_swiglu", "routed")
NORMS = ("rms", "none", "layer")
# Ops inside an MLP that keep each token's values together (the block stays token-wise).
TOKENWISE_INNER = ("transpose", "swap_bs", "permute", "flatten", "heads",
                   "pos_add", "pos_mul", "mask", "mask_bool", "mask_where")
# Ops that mix tokens (the block is not token-wise: mst must leave it alone, with a reason).
MIXING = ("cumsum", "roll", "pad_shift", "seq_mean", "batch_mean", "attn")
INNER_OPS = TOKENWISE_INNER + MIXING
ATTENTION_MIXERS = ("attn", "attn_mask", "attn_rope", "attn_heads")
MIXERS = ("none", *MIXING, "mask", "attn_mask", "attn_rope", "attn_heads")
HEADS = ("ce", "logits", "mse", "kl_fixed", "kl_teacher")
TRANSFORMS = ("none", "softcap", "scale")

POS_MAX = 40  # rows of a positional table: the longest sequence drawn
SEQ_MIN, SEQ_MAX = 5, 40
SOFTCAP = 3.0
LOGIT_SCALE = 0.7
Z_LOSS = 1e-4
MASK_MOD = 3  # mask = ids % 3 != 0
# Inner ops whose block must still be rewritten when the layout is batch-first (completeness):
# they move or regroup dims but keep every token's values together, and read no per-token or
# per-position input.
SIMPLE_INNER = ("transpose", "swap_bs", "permute", "flatten", "heads")
ALLOWED_SKIP_CATEGORIES = (POLICY, NOT_A_BLOCK, UNSUPPORTED)


def _short_repr(spec: Any) -> str:
    """`Name(field=value, ...)` with the fields that differ from their defaults: valid Python."""
    changed = [f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec)
               if getattr(spec, f.name) != f.default]
    return f"{type(spec).__name__}({', '.join(changed)})"


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    mlp: str = "swiglu"  # MLP_KINDS
    mult: int = 2  # intermediate = mult * hidden
    bias: bool = False
    norm: str = "rms"  # NORMS, before the MLP
    residual: bool = True
    inner: tuple[str, ...] = ()  # INNER_OPS applied in order to the MLP intermediate
    pos_3d: bool = False  # positional tables of shape [1, S_max, I] instead of [S_max, I]
    mixer: str = "none"  # MIXERS, applied to the hidden state before the block
    frozen: bool = False  # the block's parameters do not require grad
    checkpoint: bool = False  # activation checkpointing (torch.utils.checkpoint, non-reentrant)

    __repr__ = _short_repr


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    hidden: int = 8
    vocab: int = 32
    blocks: tuple[BlockSpec, ...] = (BlockSpec(),)
    repeat_blocks: bool = False  # run the blocks twice: weights shared between two regions
    pos_embed: bool = False  # a learned positional table [S_max, d] added to the embeddings
    seq_first: bool = False
    final_norm: str = "rms"  # NORMS
    head: str = "ce"  # HEADS
    tied: bool = False
    head_bias: bool = False
    transform: str = "none"  # TRANSFORMS, applied to the logits
    # sequence-first models: transpose the logits back to [B, S, V] before the loss / return
    transpose_back: bool = True
    reduction: str = "mean"  # "mean" or "sum" (ce, mse); ce also "none_mean" (per-token
    # losses from reduction="none", summed and divided by the count of valid labels) and
    # "pieces" (the same, the tokens split into `pieces`-row pieces first, each piece's losses
    # concatenated: litgpt's chunked_cross_entropy)
    pieces: int = 8
    shift: bool = False  # ce: causal-LM shift, logits[:, :-1] against labels[:, 1:]
    return_logits: bool = False  # loss heads: return (loss, logits)
    value_head: bool = False  # loss heads: + 0.1 * mean(Linear(d, 1)(h)^2)
    freeze_embed: bool = False  # the embedding (and a tied LM head) does not require grad
    label_smoothing: float = 0.0  # ce
    class_weight: bool = False  # ce
    z_loss: bool = False  # ce: + Z_LOSS * mean over every token of logsumexp^2
    # ce: + Z_LOSS * logsumexp^2 summed over the tokens whose label is kept (torch.where),
    # divided by their count: masked like the loss, so ignored rows may still be skipped
    z_loss_masked: bool = False
    batch: int = 1
    seq: int = 5
    chunks: int = 2
    training: bool = False
    micro_batches: int = 1
    ignore_row: bool = False  # all labels of row 0 are -100 (batch >= 2)
    ignored: float = 0.2  # the share of labels set to -100 at random (1.0: every label)
    # workspace_min_bytes=0: every product of a loss chunk written into the reused buffer
    # (ops.mm_in_workspace; at the default 32 MiB no fuzzed product is that large)
    workspace: bool = False
    # a training loop whose batches change shape: after (batch, seq), one step per (batch,
    # seq) here, compiled once with Dynamo's default (automatic) dynamic shapes; every step's
    # loss and gradients are compared (gradients zeroed between steps)
    shapes: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    __repr__ = _short_repr

    @property
    def logits_seq_first(self) -> bool:
        """Whether the logits reach the loss (or the caller) as [S, B, V]."""
        return self.seq_first and not self.transpose_back

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(batch, seq) of each step: the micro-batches of one step, or the loop's steps."""
        if self.shapes:
            return [(self.batch, self.seq), *self.shapes]
        return [(self.batch, self.seq)] * self.micro_batches

    @property
    def uses_labels(self) -> bool:
        return self.head == "ce" or (self.head == "logits" and self.training)

    def routed_blocks(self) -> int:
        """MoE blocks mst must rewrite: every declared block, in any layout."""
        routed = sum(1 for b in self.blocks if b.mlp == "routed")
        return routed * (2 if self.repeat_blocks else 1)

    def simple_blocks(self) -> int:
        """MLP blocks mst must rewrite: batch-first, and nothing inside the MLP but ops that
        keep every token's values together without any positional or per-token input."""
        if self.seq_first:
            return 0
        simple = sum(1 for b in self.blocks
                     if b.mlp != "routed" and all(op in SIMPLE_INNER for op in b.inner))
        return simple * (2 if self.repeat_blocks else 1)


# --- strategies ------------------------------------------------------------------------------


@st.composite
def block_specs(draw: st.DrawFn) -> BlockSpec:
    inner = draw(st.one_of(
        st.just(()),
        st.lists(st.sampled_from(INNER_OPS), min_size=1, max_size=2, unique=True).map(tuple),
    ))
    has_pos = any(op.startswith("pos") for op in inner)
    return BlockSpec(
        mlp=draw(st.sampled_from(MLP_KINDS)),
        mult=draw(st.integers(2, 6)),
        bias=draw(st.booleans()),
        norm=draw(st.sampled_from(NORMS)),
        residual=draw(st.booleans().map(lambda b: not b)),  # shrinks to True
        inner=inner,
        pos_3d=draw(st.booleans()) if has_pos else False,
        mixer=draw(st.one_of(st.just("none"), st.sampled_from(MIXERS))),
        frozen=draw(st.integers(0, 5)) == 5,  # 1 in 6
        checkpoint=draw(st.integers(0, 4)) == 4,  # 1 in 5
    )


@st.composite
def model_specs(draw: st.DrawFn) -> ModelSpec:
    hidden = draw(st.integers(4, 12)) * 2  # 8..24, even (two attention heads)
    head = draw(st.sampled_from(HEADS))
    seq_first = draw(st.booleans())
    training = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    ce = head == "ce"
    reduction = (draw(st.sampled_from(("mean", "sum", "none_mean", "pieces"))) if ce
                 else draw(st.sampled_from(("mean", "sum"))) if head == "mse" else "mean")
    # every label ignored: a mean over no label is 0/0 (NaN) in eager too, so not with "mean"
    shares = (0.0, 0.2, 0.75) if reduction == "mean" else (0.0, 0.2, 0.75, 1.0)
    # 1 in 4 trains through a loop of 3-5 shapes (batch 1 included, lengths any)
    loop = training and draw(st.integers(0, 3)) == 3
    shapes = tuple(draw(st.lists(st.tuples(st.integers(1, 3), st.integers(SEQ_MIN, SEQ_MAX)),
                                 min_size=2, max_size=4))) if loop else ()
    return ModelSpec(
        shapes=shapes,
        ignored=draw(st.sampled_from(shares)) if ce else 0.2,
        hidden=hidden,
        vocab=draw(st.integers(32, 160)),
        blocks=tuple(draw(st.lists(block_specs(), min_size=1, max_size=2))),
        repeat_blocks=draw(st.integers(0, 5)) == 5,
        pos_embed=draw(st.booleans()),
        seq_first=seq_first,
        final_norm=draw(st.sampled_from(NORMS)),
        head=head,
        tied=draw(st.booleans()) if head != "mse" else False,
        head_bias=draw(st.booleans()),
        transform=draw(st.sampled_from(TRANSFORMS)) if head != "mse" else "none",
        transpose_back=draw(st.booleans().map(lambda b: not b)) if seq_first else True,
        reduction=reduction,
        pieces=draw(st.integers(3, 16)) if reduction == "pieces" else 8,
        shift=draw(st.booleans()) if ce else False,
        return_logits=draw(st.booleans()) if head != "logits" else False,
        value_head=draw(st.booleans()) if head != "logits" else False,
        freeze_embed=draw(st.integers(0, 5)) == 5,
        label_smoothing=draw(st.sampled_from((0.0, 0.1))) if ce else 0.0,
        class_weight=draw(st.booleans()) if ce else False,
        z_loss=draw(st.booleans()) if ce else False,
        batch=batch,
        seq=draw(st.integers(SEQ_MIN, SEQ_MAX)),
        chunks=draw(st.integers(2, 5)),
        training=training,
        micro_batches=draw(st.integers(1, 2)) if training and not loop else 1,
        ignore_row=draw(st.booleans()) if ce and batch >= 2 else False,
        z_loss_masked=draw(st.booleans()) if ce else False,
        workspace=draw(st.booleans()) if training else False,
        seed=draw(st.integers(0, 2**16)),
    )


# --- the model -------------------------------------------------------------------------------


class Norm(nn.Module):
    def __init__(self, kind: str, d: int):
        super().__init__()
        self.kind = kind
        if kind == "rms":
            self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        elif kind == "layer":
            self.ln = nn.LayerNorm(d)
            with torch.no_grad():
                self.ln.weight.copy_(1 + 0.1 * torch.randn(d))
                self.ln.bias.copy_(0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)
        if self.kind == "layer":
            return self.ln(x)
        return x


def _token_mask(ids: torch.Tensor, seq_first: bool, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] ids -> the per-token mask ids % 3 != 0 as [B, S, 1] (or [S, B, 1])."""
    mask = ids % MASK_MOD != 0
    if seq_first:
        mask = mask.t()
    return mask.unsqueeze(-1).to(dtype)


def _causal_attention(h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      seq_first: bool, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA with two heads over q, k, v of the layout of `h` ([B, S, w] or [S, B, w]);
    with `keys` ([B, S] booleans) as transformers makes it: a float mask of `kv <= q` and
    `keys[b, kv]`."""
    def heads(t: torch.Tensor) -> torch.Tensor:
        if seq_first:
            t = t.transpose(0, 1)
        b, s, w = t.shape
        return t.reshape(b, s, 2, w // 2).transpose(1, 2)

    if keys is None:
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    else:
        b, s = keys.shape
        batch = torch.arange(b)[:, None, None, None]
        q_idx, kv_idx = torch.arange(s)[None, None, :, None], torch.arange(s)[None, None, None, :]
        allowed = (kv_idx <= q_idx) & keys[batch, kv_idx]
        mask = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    b, _, s, _ = out.shape
    out = out.transpose(1, 2).reshape(b, s, -1)
    return out.transpose(0, 1) if seq_first else out


def _heads_attention(qkv: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """Causal SDPA with two heads, q, k and v selected from one `[B, S, 3, 2, w / 2]` view of
    the fused projection's output (as the proxy and GPT-style models do), q scaled by its
    position (a new tensor), k and v views: their gradients are written into zeros of the
    whole and summed, then copied into the projection's layout (mst makes them one join)."""
    if seq_first:
        qkv = qkv.transpose(0, 1)
    b, s, w3 = qkv.shape
    q, k, v = qkv.reshape(b, s, 3, 2, w3 // 6).permute(2, 0, 3, 1, 4)
    q = q * (1 + torch.arange(s, dtype=q.dtype, device=q.device)[:, None] * 0.01)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(b, s, -1)
    return out.transpose(0, 1) if seq_first else out


def _rotated(t: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """A rotary embedding: each pair of halves of a token's values turned by an angle of its
    position (a new tensor, as Llama's q and k are)."""
    seq = t.shape[0 if seq_first else 1]
    angle = torch.arange(seq, dtype=t.dtype, device=t.device)[:, None] * 0.1
    if not seq_first:
        angle = angle[None]
    else:
        angle = angle[:, None]
    x1, x2 = t.chunk(2, -1)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)


def _mix(op: str, h: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """A token-mixing op on a [B, S, w] (or [S, B, w]) value."""
    sd, bd = (0, 1) if seq_first else (1, 0)
    if op == "cumsum":
        return torch.cumsum(h, dim=sd) / h.shape[sd]
    if op == "roll":
        return torch.roll(h, 1, dims=sd)
    if op == "pad_shift":  # the previous token's value, zeros for the first
        if seq_first:
            return F.pad(h, (0, 0, 0, 0, 1, 0))[:-1]
        return F.pad(h, (0, 0, 1, 0))[:, :-1]
    if op == "seq_mean":
        return h.mean(dim=sd, keepdim=True)
    if op == "batch_mean":
        return h.mean(dim=bd, keepdim=True)
    raise ValueError(op)


class FuzzExperts(nn.Module):
    """Top-k routing over `experts` SwiGLU-free ReLU experts of width `inner`: token-wise as a
    whole, though routing gathers and sorts across tokens. `sort`: the token copies are
    sorted by expert before the expert matmuls and put back after (grouped_mm's order)."""

    def __init__(self, d: int, inner: int, experts: int, top: int, sort: bool):
        super().__init__()
        self.top, self.sort = top, sort
        self.router = nn.Linear(d, experts, bias=sort)
        self.up = nn.Parameter(torch.randn(experts, d, inner) * d**-0.5)
        self.down = nn.Parameter(torch.randn(experts, inner, d) * inner**-0.5)
        # a load-balancing statistic, as torchtitan keeps one: tokens routed to each expert
        self.register_buffer("tokens_per_expert", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.router(flat).softmax(-1).topk(self.top, dim=-1)
        if self.training:
            routed = torch.zeros(flat.shape[0], self.up.shape[0], dtype=torch.bool,
                                 device=x.device).scatter(-1, experts, True)
            with torch.no_grad():
                self.tokens_per_expert.add_(routed.sum(dim=0))
        copies = flat.repeat_interleave(self.top, dim=0)  # [T * top, d]
        chosen = experts.reshape(-1)
        if self.sort:
            chosen, order = chosen.sort(stable=True)
            copies = copies[order]
        h = torch.bmm(copies.unsqueeze(1), self.up[chosen]).relu()
        y = torch.bmm(h, self.down[chosen]).squeeze(1)
        if self.sort:
            y = y[order.argsort()]
        y = (y.view(-1, self.top, y.shape[-1]) * weights.unsqueeze(-1)).sum(1)
        return y.reshape(x.shape)


mst_compile.token_wise(FuzzExperts)


class FuzzBlock(nn.Module):
    def __init__(self, spec: BlockSpec, d: int, seq_first: bool):
        super().__init__()
        self.spec, self.seq_first = spec, seq_first
        inter = spec.mult * d
        if spec.mixer in ATTENTION_MIXERS:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.attn_out = nn.Linear(d, d, bias=False)
        self.norm = Norm(spec.norm, d)
        if spec.mlp == "routed":
            self.experts = FuzzExperts(d, inter, experts=2 + spec.mult % 3,
                                       top=1 + spec.mult % 2, sort=spec.bias)
            return
        if spec.mlp == "fused_swiglu":
            self.gate_up = nn.Linear(d, 2 * inter, bias=spec.bias)
        elif spec.mlp in ("swiglu", "geglu"):
            self.gate = nn.Linear(d, inter, bias=spec.bias)
            self.up = nn.Linear(d, inter, bias=spec.bias)
        else:
            self.up = nn.Linear(d, inter, bias=spec.bias)
        self.down = nn.Linear(inter, d, bias=spec.bias)
        pos_shape = (1, POS_MAX, inter) if spec.pos_3d else (POS_MAX, inter)
        for op in spec.inner:
            if op == "transpose":
                self.scale = nn.Parameter(1 + 0.1 * torch.randn(inter, 1))
            elif op == "swap_bs":
                self.swap_scale = nn.Parameter(1 + 0.1 * torch.randn(inter))
            elif op == "permute":
                self.perm_scale = nn.Parameter(1 + 0.1 * torch.randn(inter, 1, 1))
            elif op == "flatten":
                self.flat_scale = nn.Parameter(1 + 0.1 * torch.randn(inter))
            elif op == "heads":
                self.head_scale = nn.Parameter(1 + 0.1 * torch.randn(2, inter // 2))
            elif op == "pos_add":
                self.pos_add = nn.Parameter(0.5 * torch.randn(pos_shape))
            elif op == "pos_mul":
                self.pos_mul = nn.Parameter(1 + 0.2 * torch.randn(pos_shape))

    def _pos(self, table: torch.Tensor, seq: int) -> torch.Tensor:
        """The table's first `seq` rows, broadcastable to the intermediate's layout."""
        if self.spec.pos_3d:
            p = table[:, :seq]  # [1, S, I]
            return p.transpose(0, 1) if self.seq_first else p
        p = table[:seq]  # [S, I]
        return p.unsqueeze(1) if self.seq_first else p

    def mlp(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        kind = self.spec.mlp
        if kind == "routed":
            return self.experts(x)
        if kind == "fused_swiglu":
            gate, up = self.gate_up(x).chunk(2, -1)
            h = F.silu(gate) * up
        elif kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        elif kind == "geglu":
            h = F.gelu(self.gate(x), approximate="tanh") * self.up(x)
        elif kind == "gelu":
            h = F.gelu(self.up(x))
        else:
            h = F.relu(self.up(x))
        seq = h.shape[0 if self.seq_first else 1]
        for op in self.spec.inner:
            if op == "transpose":
                h = (h.transpose(1, 2) * self.scale).transpose(1, 2)
            elif op == "swap_bs":
                h = (h.transpose(0, 1) * self.swap_scale).transpose(0, 1)
            elif op == "permute":  # [I, B, S]
                h = (h.permute(2, 0, 1) * self.perm_scale).permute(1, 2, 0)
            elif op == "flatten":  # [B * S, I]
                h = (h.flatten(0, 1) * self.flat_scale).view(h.shape)
            elif op == "heads":  # [B, S, 2, I / 2]
                h = (h.unflatten(-1, (2, -1)) * self.head_scale).flatten(-2)
            elif op == "pos_add":
                h = h + self._pos(self.pos_add, seq)
            elif op == "pos_mul":
                h = h * self._pos(self.pos_mul, seq)
            elif op == "mask":
                h = h * _token_mask(ids, self.seq_first, h.dtype)
            elif op == "mask_bool":  # float * bool: type promotion
                h = h * _token_mask(ids, self.seq_first, torch.bool)
            elif op == "mask_where":
                h = torch.where(_token_mask(ids, self.seq_first, torch.bool), h, 0.0)
            elif op == "attn":
                h = _causal_attention(h, h, h, h, self.seq_first)
            else:
                h = h + _mix(op, h, self.seq_first)
        return self.down(h)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        mixer = self.spec.mixer
        if mixer == "mask":
            x = x * _token_mask(ids, self.seq_first, x.dtype)
        elif mixer == "attn_heads":
            x = x + self.attn_out(_heads_attention(self.qkv(x), self.seq_first))
        elif mixer in ATTENTION_MIXERS:
            q, k, v = self.qkv(x).chunk(3, -1)
            if mixer == "attn_rope":
                q, k = _rotated(q, self.seq_first), _rotated(k, self.seq_first)
            keys = (ids % 5 != 0) | (torch.arange(ids.shape[1]) == 0) if mixer == "attn_mask" else None
            x = x + self.attn_out(_causal_attention(x, q, k, v, self.seq_first, keys))
        elif mixer != "none":
            x = x + _mix(mixer, x, self.seq_first)
        out = self.mlp(self.norm(x), ids)
        return x + out if self.spec.residual else out


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class FuzzModel(nn.Module):
    """`forward(ids, labels=None, aux=None)`: ids [B, S]; labels [B, S] (ce); aux the teacher
    logits (kl_fixed) or regression target (mse), shaped like the logits. Returns the scalar
    loss, or the logits (head "logits", or a ce head called without labels)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d, vocab = spec.hidden, spec.vocab
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(FuzzBlock(b, d, spec.seq_first) for b in spec.blocks)
        if spec.pos_embed:
            self.wpe = nn.Parameter(0.5 * torch.randn(POS_MAX, d))
        self.norm = Norm(spec.final_norm, d)
        self.lm_head = nn.Linear(d, vocab, bias=spec.head_bias)
        if spec.tied:
            self.lm_head.weight = self.embed.weight
        if spec.head == "kl_teacher":
            self.teacher = nn.Linear(d, vocab, bias=False).requires_grad_(False)
        if spec.value_head:
            self.value = nn.Linear(d, 1)
        if spec.class_weight:
            self.register_buffer("class_weight", torch.rand(vocab) + 0.5)
        for block, block_spec in zip(self.blocks, spec.blocks):
            if block_spec.frozen:
                _requires_grad(block, False)
        if spec.freeze_embed:
            self.embed.weight.requires_grad_(False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None,
                aux: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        x = self.embed(ids.t() if spec.seq_first else ids)
        if spec.pos_embed:
            pos = self.wpe[: ids.shape[1]]
            x = x + (pos.unsqueeze(1) if spec.seq_first else pos)
        for _ in range(2 if spec.repeat_blocks else 1):
            for block in self.blocks:
                if block.spec.checkpoint:
                    x = torch.utils.checkpoint.checkpoint(block, x, ids, use_reentrant=False)
                else:
                    x = block(x, ids)
        h = self.norm(x)
        logits = self.lm_head(h)
        if spec.transform == "softcap":
            logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        elif spec.transform == "scale":
            logits = logits * LOGIT_SCALE
        teacher = None
        if spec.head == "kl_teacher":
            with torch.no_grad():
                teacher = self.teacher(h)
        if spec.seq_first and spec.transpose_back:
            logits = logits.transpose(0, 1)
            teacher = teacher.transpose(0, 1) if teacher is not None else None
        if spec.head == "logits" or (spec.head == "ce" and labels is None):
            return logits
        if spec.head == "mse":
            loss = F.mse_loss(logits, aux, reduction=spec.reduction)
        elif spec.head in ("kl_fixed", "kl_teacher"):
            target = aux if spec.head == "kl_fixed" else teacher
            loss = F.kl_div(F.log_softmax(logits.flatten(0, 1), -1),
                            F.log_softmax(target.flatten(0, 1), -1),
                            reduction="batchmean", log_target=True)
        else:
            loss = self._ce(logits, labels)
        if spec.value_head:
            loss = loss + 0.1 * self.value(h).squeeze(-1).pow(2).mean()
        return (loss, logits) if spec.return_logits else loss

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.logits_seq_first:
            labels = labels.t()
        if spec.shift:  # predict the next token
            if spec.logits_seq_first:
                logits, labels = logits[:-1], labels[1:]
            else:
                logits, labels = logits[:, :-1], labels[:, 1:]
        per_token = spec.reduction in ("none_mean", "pieces")
        flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
        pairs = ([(flat_logits, flat_labels)] if spec.reduction != "pieces" else
                 list(zip(flat_logits.split(spec.pieces), flat_labels.split(spec.pieces))))
        losses = [F.cross_entropy(
            piece, target, weight=self.class_weight if spec.class_weight else None,
            ignore_index=-100, reduction="none" if per_token else spec.reduction,
            label_smoothing=spec.label_smoothing) for piece, target in pairs]
        loss = torch.cat(losses) if len(losses) > 1 else losses[0]
        if per_token:
            loss = loss.sum() / (labels != -100).sum().clamp(min=1)
        if spec.z_loss:
            loss = loss + Z_LOSS * torch.logsumexp(logits, -1).pow(2).mean()
        if spec.z_loss_masked:
            z = _logsumexp(logits.flatten(0, 1)).pow(2)
            kept = labels.flatten() != -100
            loss = loss + Z_LOSS * torch.where(kept, z, 0).sum() / kept.sum().clamp(min=1)
        return loss


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, written out (torch.logsumexp decomposes with isnan, which
    has no token rule: the loss region would end there)."""
    top = x.amax(-1, keepdim=True).detach()
    return (x - top).exp().sum(-1).log() + top.squeeze(-1)


def build_model(spec: ModelSpec) -> FuzzModel:
    torch.manual_seed(spec.seed)
    model = FuzzModel(spec)
    model.train()
    return model


def make_inputs(spec: ModelSpec, step: int) -> dict[str, torch.Tensor]:
    """The inputs of micro-batch (or loop step) `step`: ids, labels (ce heads, or training a
    logits head: the loss outside the model), aux (kl_fixed teacher logits, mse target)."""
    gen = torch.Generator().manual_seed(spec.seed * 7919 + step)
    (b, s), v = spec.steps[step], spec.vocab
    inputs = {"ids": torch.randint(0, v, (b, s), generator=gen)}
    if spec.uses_labels:
        labels = torch.randint(0, v, (b, s), generator=gen)
        labels[torch.rand(b, s, generator=gen) < spec.ignored] = -100
        if spec.ignore_row and b >= 2:
            labels[0] = -100
        inputs["labels"] = labels
    if spec.head in ("kl_fixed", "mse"):
        shape = (s, b, v) if spec.logits_seq_first else (b, s, v)
        inputs["aux"] = torch.randn(shape, generator=gen) * (2.0 if spec.head == "kl_fixed" else 1.0)
    return inputs


# --- the oracle ------------------------------------------------------------------------------


class FuzzFailure(AssertionError):
    pass


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _watch_fallbacks() -> Iterator[tuple[list[warnings.WarningMessage], _Records]]:
    """Records warnings and the mst_compile logger's warnings. The backend warns about a
    fallback once per process: re-armed here so every example sees its own."""
    from mst_compile import backend

    if hasattr(backend, "_warned_fallback"):
        backend._warned_fallback = False
    handler = _Records()
    logger = logging.getLogger("mst_compile")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler
    finally:
        logger.removeHandler(handler)


def _is_fallback(message: str) -> bool:
    return "falling back to plain Inductor" in message or (
        "mst_compile" in message and "internal" in message.lower())


def _outside_loss(spec: ModelSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Training a model that returns logits: cross-entropy computed outside the model."""
    if spec.logits_seq_first:
        labels = labels.t()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _run_step(spec: ModelSpec, model: nn.Module, inputs: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """One micro-batch: the forward's outputs and, in training, the loss (backward done)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if spec.head == "ce":
        inputs["labels"] = labels
    with contextlib.nullcontext() if spec.training else torch.no_grad():
        out = model(**inputs)
        outs = out if isinstance(out, tuple) else (out,)
        res = {f"out{i}": t for i, t in enumerate(outs)}
        if spec.training:
            loss = outs[0] if spec.head != "logits" else _outside_loss(spec, out, labels)
            res["loss"] = loss
            if loss.requires_grad:  # else every parameter is frozen
                loss.backward()
    return res


def _compile(spec: ModelSpec, model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """`model` compiled with backend="mst": at one shape (dynamic=False), or for a loop of
    shapes with Dynamo's default dynamic shapes, as a user's loop is."""
    return torch.compile(model, backend="mst", options=options,
                         dynamic=None if spec.shapes else False, fullgraph=True)


def _run_steps(spec: ModelSpec, eager: nn.Module, compiled_model: nn.Module,
               compiled: nn.Module, dtype: torch.dtype | None = None,
               ) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """Runs every step on both models and yields (key, compiled value, eager value) of each
    output, and of every parameter gradient after each loop step (gradients zeroed between
    loop steps) or after the last micro-batch (accumulated). A gradient set in one model
    only is yielded with None for the other."""
    steps = len(spec.steps)
    for step in range(steps):
        inputs = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                  for k, v in make_inputs(spec, step).items()}
        if spec.shapes:
            eager.zero_grad(set_to_none=True)
            compiled_model.zero_grad(set_to_none=True)
        expected = _run_step(spec, eager, inputs)
        try:
            actual = _run_step(spec, compiled, inputs)
        except Exception as e:
            raise FuzzFailure(f"{spec!r}\ncompiled run raised {type(e).__name__}: "
                              f"{str(e)[:3000]}") from e
        for key in expected:
            yield f"{key}[{step}]", actual[key].detach(), expected[key].detach()
        if spec.training and (spec.shapes or step == steps - 1):
            suffix = f"[{step}]" if spec.shapes else ""
            compiled_params = dict(compiled_model.named_parameters())
            for name, p in eager.named_parameters():
                q = compiled_params[name]
                if p.grad is not None or q.grad is not None:
                    yield f"grad {name}{suffix}", q.grad, p.grad


def _fp64_runs(spec: ModelSpec, options: dict[str, Any]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every output and gradient `check_spec` compares, from the model in float64: run
    eagerly, and compiled with backend="mst" and the same options."""
    torch._dynamo.reset()
    eager = build_model(spec).double()
    compiled_model = copy.deepcopy(eager)
    compiled = _compile(spec, compiled_model, options)
    refs: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for key, got, ref in _run_steps(spec, eager, compiled_model, compiled, torch.float64):
        if got is not None and ref is not None:
            refs[0][key], refs[1][key] = ref, got
    torch._dynamo.reset()
    return refs


# An fp32 mismatch with eager is forgiven when it is rounding: mst run in float64 matches
# eager in float64 to FP64_RTOL (the rewrite is exact; the output is ill-conditioned, e.g. a
# KL divergence of nearly equal distributions, so fp32 rounding alone moves it), and mst in
# fp32 is within REASSOCIATION_SLACK times eager's own fp32 error of float64.
FP64_RTOL = 1e-9
REASSOCIATION_SLACK = 100.0


def _check_mismatches(spec: ModelSpec, mismatches: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      rtol: float, options: dict[str, Any], failures: list[str]) -> None:
    if not mismatches:
        return
    try:
        ref, ref_mst = _fp64_runs(spec, options)
    except Exception as e:  # noqa: BLE001 (reported with the mismatches)
        ref, ref_mst = {}, {}
        failures.append(f"(the float64 rerun raised {type(e).__name__}: {str(e)[:200]})")
    for key, (got, eager) in mismatches.items():
        err = rel_err(got, eager)
        if key in ref and key in ref_mst:
            err_got, err_eager = rel_err(got, ref[key]), rel_err(eager, ref[key])
            err64 = rel_err(ref_mst[key], ref[key])
            if err64 <= FP64_RTOL and err_got <= max(rtol, REASSOCIATION_SLACK * err_eager):
                continue
            failures.append(f"{key}: rel err {err:.3g} > {rtol} (against eager float64: mst "
                            f"{err_got:.3g}, eager {err_eager:.3g}; mst in float64 {err64:.3g})")
        else:
            failures.append(f"{key}: rel err {err:.3g} > {rtol}")


def check_spec(spec: ModelSpec, *, compiler: str = "eager", rtol: float = FP32_RTOL,
               options: dict[str, Any] | None = None) -> Report:
    """Run `spec`'s model eagerly and compiled with backend="mst"; raise FuzzFailure listing
    every difference: outputs and parameter gradients beyond `rtol` (unless it is rounding:
    mst matches eager in float64, see FP64_RTOL), a skip without a reason or
    with a category other than policy / not_a_block / unsupported, a fallback or internal
    error warning, and a batch-first token-wise MLP block left unrewritten (completeness).
    Returns the merged report."""
    torch._dynamo.reset()
    eager = build_model(spec)
    compiled_model = copy.deepcopy(eager)
    opts = {"strict": False, "min_bytes": 0, "chunks": spec.chunks}
    if spec.workspace:
        opts["workspace_min_bytes"] = 0
    if compiler != "inductor":
        opts["compiler"] = compiler
    opts.update(options or {})
    compiled = _compile(spec, compiled_model, opts)
    failures: list[str] = []
    errors: dict[str, float] = {}
    mismatches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (mst, eager)
    # Training with every parameter frozen compiles an inference graph.
    trains = spec.training and any(p.requires_grad for p in eager.parameters())
    mode = "training" if trains else "inference"

    def compare(key: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        if got.shape != ref.shape or got.dtype != ref.dtype:
            failures.append(f"{key}: compiled {tuple(got.shape)} {got.dtype}, "
                            f"eager {tuple(ref.shape)} {ref.dtype}")
            return
        nan = ref.detach().isnan()
        if nan.any() and torch.equal(nan, got.detach().isnan()):
            # NaN in the same places (a mean over no kept label): compare the rest
            got, ref = got.detach()[~nan], ref.detach()[~nan]
        err = rel_err(got, ref) if ref.numel() else 0.0
        if err == float("inf") and (got.detach() - ref.detach()).abs().max().item() <= 1e-7:
            err = 0.0  # eager exactly zero, compiled zero up to rounding
        errors[key] = err
        if not err <= rtol:  # NaN fails too
            mismatches[key] = (got.detach().clone(), ref.detach().clone())

    with _watch_fallbacks() as (caught, logged), collect_reports() as reports:
        for key, got, ref in _run_steps(spec, eager, compiled_model, compiled):
            if got is None or ref is None:
                failures.append(f"{key}: eager {'None' if ref is None else 'set'}, "
                                f"compiled {'None' if got is None else 'set'}")
            else:
                compare(key, got, ref)
    # statistics a block keeps (routed tokens counted); eager counts a checkpointed block's
    # tokens twice (its forward runs again in the backward), a compiled graph once
    compiled_buffers = dict(compiled_model.named_buffers())
    for name, buffer in eager.named_buffers():
        block = name.split(".")[1] if name.startswith("blocks.") else None
        if buffer.is_floating_point() and not (block and spec.blocks[int(block)].checkpoint):
            compare(f"buffer {name}", compiled_buffers[name], buffer)
    _check_mismatches(spec, mismatches, rtol, opts, failures)

    report = Report([g for r in reports for g in r.graphs])
    report.errors = errors  # type: ignore[attr-defined]
    for w in caught:
        if _is_fallback(str(w.message)):
            failures.append(f"warning: {w.message}")
    for record in logged.records:
        message = record.getMessage()
        if _is_fallback(message) or "internal" in message.lower() or "failed" in message:
            failures.append(f"log: {message}")
    for s in report.skipped:
        if s.category not in ALLOWED_SKIP_CATEGORIES:
            failures.append(f"skipped {s.seed} [{s.category}]: {s.reason}")
        elif not s.reason.strip():
            failures.append(f"skipped {s.seed} [{s.category}] without a reason")
    if not reports:
        failures.append("the mst backend was never called")
    # every graph compiled (one per shape bucket of a loop) rewrites every such block
    for i, graph in enumerate(g for g in report.graphs if g.mode == mode):
        counts = Report([graph])
        for kind, want, what in (("moe", spec.routed_blocks(), "declared MoE block(s)"),
                                 ("mlp", spec.simple_blocks(), "token-wise batch-first MLP block(s)")):
            if want and counts.count(kind, mode) < want:
                failures.append(f"completeness: {want} {what}, {counts.count(kind, mode)} "
                                f"rewritten in graph {i} ({mode})")
    if failures:
        raise FuzzFailure(f"{spec!r}\nmst differs from eager:\n  " + "\n  ".join(failures)
                          + f"\nreport:\n{summary(report)}")
    return report


def describe(spec: ModelSpec) -> str:
    """One line of the spec's main features (for logs of long runs)."""
    blocks = "; ".join(
        f"{b.mlp}x{b.mult}{'+b' if b.bias else ''} {b.norm}{'' if b.residual else ' nores'}"
        f"{' frozen' if b.frozen else ''}{' ckpt' if b.checkpoint else ''}"
        f"{' ' + '+'.join(b.inner) if b.inner else ''}{' mix=' + b.mixer if b.mixer != 'none' else ''}"
        for b in spec.blocks)
    return (f"{'SBd' if spec.seq_first else 'BSd'} B={spec.batch} S={spec.seq} k={spec.chunks} "
            f"{'train' if spec.training else 'infer'}x{spec.micro_batches} head={spec.head}"
            f"/{spec.transform}{'/tied' if spec.tied else ''}{'/shift' if spec.shift else ''}"
            f"{'/' + spec.reduction if spec.reduction != 'mean' else ''}"
            f"{'/+logits' if spec.return_logits else ''}{'/+value' if spec.value_head else ''}"
            f"{'/frozen-emb' if spec.freeze_embed else ''}{' wpe' if spec.pos_embed else ''}"
            f" [{blocks}]{' x2 shared' if spec.repeat_blocks else ''}")


__all__ = [
    "BlockSpec",
    "FuzzExperts",
    "FuzzFailure",
    "FuzzModel",
    "ModelSpec",
    "block_specs",
    "build_model",
    "check_spec",
    "describe",
    "make_inputs",
    "model_specs",
]
