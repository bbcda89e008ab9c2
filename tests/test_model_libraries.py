"""Model code as other libraries write it, chunked as written (strict mode: every region found
is rewritten or skipped for a reason that is not a failure of mst).

The modules here are written for these tests in the shape of the libraries' own code (the
libraries themselves are not test dependencies; `python -m benchmarks.libraries` runs the
real ones where they are installed):

- litgpt's Mixtral MoE: `torch.where(mask)` per expert and `y[token_idx] += ...`, whose
  expert row counts are read from the data (unbacked sizes, with Dynamo's
  `capture_dynamic_output_shape_ops`);
- torchtitan's MoE: a load-balancing counter updated in place in the forward under
  `no_grad`, and the combine step's `indices.reshape(-1, 1).expand(-1, dim)` + `scatter_add`;
- DeepSeek's multi-head latent attention: a latent up-projection whose output becomes keys
  and values (an amplifier that is no block);
- litgpt's `chunked_cross_entropy` is in test_token_pieces.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import BF16_RTOL, check_against_eager, summary
from torch import nn

import mst_compile
from mst_compile.declare import forget
from mst_compile.passes import MstSkip

VOCAB, D = 256, 32


class LitMLP(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.fc_1 = nn.Linear(d, inner, bias=False)
        self.fc_2 = nn.Linear(d, inner, bias=False)
        self.proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class LitMoE(nn.Module):
    """litgpt's LLaMAMoE (0.5.13), in its shape: per expert, the tokens routed to it found by
    `torch.where` and its output added into their rows."""

    def __init__(self, d: int = D, experts: int = 4, top: int = 2):
        super().__init__()
        self.top = top
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(LitMLP(d, 4 * d) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        x = x.view(-1, c)
        probs, indices = torch.topk(self.gate(x), self.top)
        probs = probs.softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
        masks = indices.unsqueeze(-1) == torch.arange(len(self.experts), device=x.device)
        masks = masks.permute(2, 0, 1)
        y = torch.zeros_like(x)
        for mask, expert in zip(masks, self.experts):
            token_idx, expert_idx = torch.where(mask)
            y[token_idx] += probs[token_idx, expert_idx, None] * expert(x[token_idx])
        return y.view(b, t, c)


class TitanMoE(nn.Module):
    """torchtitan's MoE (0.3.0), in its shape: top-k routing, a per-step count of tokens per
    expert kept in a buffer (`add_` under `no_grad`), the token copies sorted by expert, a
    batched SwiGLU per expert, and the combine: scores applied, then `scatter_add` into the
    tokens' rows through `indices.reshape(-1, 1).expand(-1, dim)`."""

    def __init__(self, d: int = D, experts: int = 4, top: int = 2, inner: int = 64):
        super().__init__()
        self.top, self.experts = top, experts
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, inner, d) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(experts, d, inner) * inner**-0.5)
        self.w3 = nn.Parameter(torch.randn(experts, inner, d) * d**-0.5)
        self.register_buffer("tokens_per_expert", torch.zeros(experts))

    def forward(self, x_bld: torch.Tensor) -> torch.Tensor:
        b, l, d = x_bld.shape
        scores = torch.sigmoid(self.router(x_bld))
        top_scores, top_ids = scores.topk(self.top, dim=-1)
        routing = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_ids, True)
        counts = routing.sum(dim=(0, 1))
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert.add_(counts)
        x_td = x_bld.view(b * l, d)
        ids = top_ids.view(-1)
        order = torch.argsort(ids, stable=True)
        token_indices = order // self.top
        routed = x_td[token_indices]
        expert_of = ids[order]
        h = F.silu(torch.bmm(routed.unsqueeze(1), self.w1[expert_of].transpose(1, 2)))
        h = h * torch.bmm(routed.unsqueeze(1), self.w3[expert_of].transpose(1, 2))
        out = torch.bmm(h, self.w2[expert_of].transpose(1, 2)).squeeze(1)
        out = out * top_scores.reshape(-1)[order].reshape(-1, 1)
        combined = torch.zeros_like(x_td).scatter_add(
            0, token_indices.reshape(-1, 1).expand(-1, d), out.to(x_td.dtype))
        return combined.view(b, l, d)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek V2/V3, Kimi K2): keys and values from a
    32 -> 128 latent up-projection."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.kv_down = nn.Linear(d, 32, bias=False)
        self.kv_up = nn.Linear(32, 128, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 2, 32).transpose(1, 2)
        k, v = self.kv_up(self.kv_down(x)).view(b, s, 2, 64).split([32, 32], -1)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, s, 64))


class LM(nn.Module):
    """Embedding, `block` (with a norm and a residual), a vocabulary head, cross-entropy."""

    def __init__(self, block: nn.Module, d: int = D):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.block = block
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.block(F.rms_norm(x, (x.shape[-1],)))
        return F.cross_entropy(self.head(x).flatten(0, 1), labels.flatten(), ignore_index=-100)


def _lm(block: nn.Module, d: int = D) -> LM:
    torch.manual_seed(0)
    return LM(block, d)


def test_litgpt_moe_experts_with_counts_read_from_the_data():
    """Each expert's MLP runs on the tokens `torch.where` found for it: with
    capture_dynamic_output_shape_ops the model is one graph and every expert's MLP is chunked
    with a token count read from the data, through Inductor."""
    torch.manual_seed(0)
    model = _lm(LitMoE())
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        report = check_against_eager(model, vocab=VOCAB, batch=2, seq=40, chunks=3)
    experts = [r for r in report.regions if r.kind == "mlp"]
    assert len(experts) == 4 and all(r.symbolic.startswith("u") for r in experts), summary(report)
    assert report.count("loss", "training") == 1, summary(report)


@pytest.fixture
def titan_declared():
    mst_compile.token_wise(TitanMoE)
    yield
    forget(TitanMoE)


def test_torchtitan_moe_counter_and_scatter_add_combine(titan_declared):
    """The counter the block adds to a buffer is a sum over the tokens: each chunk adds its
    share; the add to the buffer runs after the loop. The buffer ends as eager's."""
    model = _lm(TitanMoE())
    eager_model = _lm(TitanMoE())
    report = check_against_eager(model, vocab=VOCAB, batch=2, seq=37, chunks=3,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3,
                                          "compiler": "eager"})
    assert report.count("moe", "training") == 1, summary(report)
    # check_against_eager ran `model` eagerly and a copy compiled: both counted the tokens
    assert model.block.tokens_per_expert.sum() == 2 * 37 * 2, model.block.tokens_per_expert
    del eager_model


def test_torchtitan_moe_through_inductor_bf16(titan_declared):
    report = check_against_eager(_lm(TitanMoE()), vocab=VOCAB, batch=2, seq=37, chunks=3,
                                 autocast=torch.bfloat16)
    assert report.count("moe", "training") == 1, summary(report)
    assert max(report.errors.values()) <= BF16_RTOL


def test_latent_attention_up_projection_is_not_a_block():
    """kv_up widens the 32-wide latent to keys and values: they go into attention, and the
    report says so (`not_a_block`), not `unsupported` (strict mode passes)."""
    report = check_against_eager(_lm(MLA(64), d=64), vocab=VOCAB, batch=2, seq=40, chunks=3,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3,
                                          "compiler": "eager"})
    assert report.count("loss", "training") == 1, summary(report)
    skipped = {s.seed: s for s in report.skipped}
    assert skipped and all(s.category == "not_a_block" for s in skipped.values()), summary(report)
    assert any("attention" in s.reason or "never narrow back" in s.reason
               for s in skipped.values()), summary(report)


class HalfSlice(nn.Module):
    """A declared block that reads only the first half of the sequence for a gate: its slice
    of the token dim cannot be rewritten for a chunk (found while rewriting)."""

    def __init__(self, d: int = D):
        super().__init__()
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x[:, : x.shape[1] // 2].mean(1, keepdim=True)
        return self.down(F.gelu(self.up(x))) * gate


def test_a_declared_block_refused_while_rewriting_fails_strict_mode():
    mst_compile.token_wise(HalfSlice)
    try:
        with pytest.raises(Exception, match="takes part of dim") as info:
            check_against_eager(_lm(HalfSlice()), vocab=VOCAB, batch=2, seq=20, chunks=3,
                                options={"strict": True, "min_bytes": 0, "chunks": 3,
                                         "compiler": "eager"})
        assert isinstance(info.value, MstSkip) or "MstSkip" in str(info.value)
    finally:
        forget(HalfSlice)


class FusedRotaryAttention(nn.Module):
    """torchtitan's Qwen3 attention, in its shape: one fused QKV projection, q and k
    normalised per head, rotary embeddings by `rotate_half` (a cat of the halves, whose
    backward is a sum of `slice_scatter`s), SDPA causal, then the output projection."""

    def __init__(self, d: int = D, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3 * self.heads, d // self.heads).split(self.heads, 2)
        q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))
        angle = torch.arange(s, dtype=x.dtype)[:, None] * torch.linspace(0.1, 1, d // self.heads // 2)
        cos, sin = angle.cos().repeat(1, 2)[None, :, None], angle.sin().repeat(1, 2)[None, :, None]

        def rotate(t: torch.Tensor) -> torch.Tensor:
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        y = F.scaled_dot_product_attention(rotate(q).transpose(1, 2), rotate(k).transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, d))


class AttentionThenMLP(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.attention, self.mlp = FusedRotaryAttention(d), LitMLP(d, 4 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return self.mlp(F.rms_norm(x, (x.shape[-1],)))


def test_fused_qkv_with_rotary_embeddings_is_not_a_block():
    """The fused projection's wide values go through the rotation into attention: not a
    block, in strict mode, and the MLP and the loss are rewritten."""
    report = check_against_eager(_lm(AttentionThenMLP()), vocab=VOCAB, batch=2, seq=30,
                                 chunks=3, options={"strict": True, "min_bytes": 0,
                                                    "chunks": 3, "compiler": "eager"})
    assert report.count("mlp") == 1 and report.count("loss") == 1, summary(report)
    assert [s.category for s in report.skipped] == ["not_a_block"], summary(report)


# The libraries' own code, where they are installed (CI installs litgpt; torchtitan is run by
# `python -m benchmarks.libraries`, see its docstring): each model with its own loss, trained
# through batches that change shape in strict mode, each step's loss and gradients against
# eager. Through Inductor for one model; op by op (the same rewritten graphs) for the others.
# Per graph compiled (a static one, then one at symbolic sizes): regions rewritten by kind, and
# the joins of a user's token pieces merged (litgpt's loss: its forward's and its backward's).
LIBRARY_MODELS = {  # name: (library, regions by kind, joins merged, compiler)
    "litgpt-llama": ("litgpt", {"mlp": 2, "loss": 1}, 2, "inductor"),
    "litgpt-llama-one-loss": ("litgpt", {"mlp": 2, "loss": 1}, 0, "eager"),
    "litgpt-gemma2": ("litgpt", {"mlp": 2, "loss": 1}, 2, "eager"),
    "litgpt-pythia": ("litgpt", {"mlp": 2, "loss": 1}, 2, "eager"),
    "litgpt-mixtral": ("litgpt", {"mlp": 8, "loss": 1}, 2, "eager"),  # 2 layers x 4 experts
}


@pytest.mark.parametrize("name", list(LIBRARY_MODELS))
def test_library_model_as_published(name):
    library, kinds, merged, compiler = LIBRARY_MODELS[name]
    pytest.importorskip(library)
    from benchmarks.libraries import check

    # litgpt's MoE finds each expert's tokens with torch.where: one graph only with this flag
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        checked = check(name, compiler)
    assert len(checked.kinds) >= 2, checked.row()  # the shapes changed: a symbolic graph too
    assert all(k == kinds for k in checked.kinds), checked.row()
    assert all(m == merged for m in checked.merged), checked.row()
    assert checked.max_error < 1e-4, checked.row()
