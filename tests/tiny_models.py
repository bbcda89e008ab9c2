"""Tiny random-weight models for the tests: a hand-written SwiGLU LM, the demo models and
small HuggingFace causal LMs built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mst_compile.demo_models import LlamaConfig, LlamaProxy, NanoGPT

HIDDEN = 32
LAYERS = 2


class SwiGLUBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.mix_norm = nn.Parameter(torch.ones(hidden))
        self.mix = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(hidden))
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token mixing outside the MLP (a causal running mean), so a wrong per-chunk hidden
        # state gradient spreads to other tokens' gradients.
        h = F.rms_norm(x, (x.shape[-1],), self.mix_norm)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=h.dtype).view(1, -1, 1)
        x = x + self.mix(torch.cumsum(h, dim=1) / steps)
        h = F.rms_norm(x, (x.shape[-1],), self.mlp_norm)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinySwiGLU(nn.Module):
    """Hand-written SwiGLU LM: `forward(ids, labels)` is the mean cross-entropy computed
    directly on the (possibly bf16) logits; `forward(ids)` returns the logits."""

    def __init__(self, vocab_size: int = 256, hidden: int = HIDDEN, layers: int = LAYERS,
                 intermediate: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.blocks = nn.ModuleList(
            SwiGLUBlock(hidden, intermediate or 4 * hidden) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def tiny_swiglu(vocab: int = 256) -> TinySwiGLU:
    torch.manual_seed(0)
    return TinySwiGLU(vocab)


def llama_proxy(vocab: int = 512) -> LlamaProxy:
    torch.manual_seed(0)
    return LlamaProxy(LlamaConfig(vocab_size=vocab, hidden=HIDDEN, intermediate=4 * HIDDEN,
                                  layers=LAYERS, heads=4))


def nanogpt(vocab: int = 512) -> NanoGPT:
    torch.manual_seed(0)
    return NanoGPT(vocab_size=vocab, hidden=HIDDEN, layers=LAYERS, heads=4, max_len=128)


def hf_model(family: str, vocab: int = 512) -> nn.Module:
    """A 2-layer random-weight HF causal LM of `family` ("llama", "qwen2", "gpt2"), dropout off,
    sdpa attention."""
    import transformers

    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
    elif family == "qwen2":
        config = transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=HIDDEN, n_inner=4 * HIDDEN, n_layer=LAYERS, n_head=4,
            n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    return model


def hf_checkpointing(model: nn.Module) -> nn.Module:
    """HF gradient checkpointing of every layer, as a user turns it on (transformers 5.x renamed
    it; the old name warns). Compiling it with transformers >= 5.25 needs Dynamo's
    skip_fwd_side_effects_in_bwd_under_checkpoint (set for every test in conftest.py, as the
    README tells users)."""
    model.config.use_cache = False  # what checkpointing sets, with a warning: a graph break
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def fix_gpt2_loss_type(model: nn.Module) -> nn.Module:
    """GPT2LMHeadModel's class name does not match HF's "ForCausalLM" loss-type pattern, so
    `model.loss_type` is None and every access to `model.loss_function` calls
    `logger.warning_once(...)`, which Dynamo cannot trace ("step_unsupported" graph break at
    `loss = self.loss_function(...)`). The loss then lands in a second Dynamo graph. Setting
    the loss type HF falls back to anyway makes the model fullgraph-friendly."""
    model.loss_type = "ForCausalLM"
    return model


def hf_from_config(model_type: str, *, masked_lm: bool = False, attn: str = "sdpa",
                   hidden: int = HIDDEN, intermediate: int | None = None, layers: int = LAYERS,
                   vocab: int = 512, heads: int = 4, kv_heads: int = 2, max_len: int = 128,
                   **overrides) -> nn.Module:
    """A random-weight HF model of any `model_type` (AutoConfig.for_model; nothing downloaded):
    a causal LM, or with `masked_lm` a masked-LM encoder. Every dropout probability is 0, the
    standard sizes go through the config's own attribute names (GPT-2's n_embd, ...), head_dim
    is hidden / heads (some configs default to a fixed 128 or 256) and `overrides` set the
    family-specific ones (ffn_dim, experts, token ids, ...).
    Causal LMs get `loss_type = "ForCausalLM"` (see `fix_gpt2_loss_type`)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, **{"head_dim": hidden // heads, **overrides})
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key == "layerdrop"):
            setattr(config, key, 0.0)
    auto = transformers.AutoModelForMaskedLM if masked_lm else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn)
    if not masked_lm:
        fix_gpt2_loss_type(model)
    model.train()
    return model
