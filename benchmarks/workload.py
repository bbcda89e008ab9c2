"""The workloads every mode runs: a model config, its dtype, its inputs and seeds.

    proxy            the Llama-shaped proxy of mst_compile.demo_models (vocab 16000, hidden 256,
                     intermediate 1024, 2 layers), fp32: the default on the CPU
    llama-fullvocab  HF LlamaForCausalLM, tiny width (hidden 256, intermediate 1024, 2 layers)
                     and the full Llama-3 vocabulary (128256): the LM head dominates; fp32
    mlp-fullvocab    the proxy without attention (RMSNorm + SwiGLU blocks) and the full Llama-3
                     vocabulary (128256), hidden 256, intermediate 1024, 2 layers, fp32: the MLP +
                     head model of the ignored-labels measurements (--ignore-fraction)
    mixtral-moe      HF MixtralForCausalLM at the proxy's width (hidden 256, expert intermediate
                     1024, vocab 16000, 2 layers) with Mixtral's routing: 8 experts, top-2;
                     fp32: the MoE measurements
    llama-1b         HF LlamaForCausalLM shaped like Llama-3.2-1B (hidden 2048, 16 layers,
                     vocab 128256, tied embeddings), bf16: the default on a GPU
    hf-llama         the user's path: HF LlamaForCausalLM at the proxy's width (vocab 16000,
                     hidden 256, intermediate 1024, 2 layers, 4 heads), fp32, called through its
                     own forward as the HF Trainer calls it, `model(input_ids=..., labels=...,
                     attention_mask=...)` with the attention mask a padding collator makes
                     (all ones for one full-length row) and the logits returned, compiled in
                     place (`model.compile(...)`), +AC by HF's gradient checkpointing
    hf-llama-1b      the same path on the Llama-3.2-1B shape, bf16: the GPU's

Every mode builds its model with the same seed and feeds it the same token ids, so the losses
of all modes must agree up to floating-point reassociation. Every model is wrapped so that
`forward(ids, labels)` is the mean next-token cross entropy (fp32 logits), `forward(ids)` the
prefill's output (the last position's logits), and `hidden(ids)` the final normalised hidden states; `lm_head` and `mlps()` name the
parts the hand-written peers (mst_ref, inductor_linear_ce) replace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mst_compile.demo_models import LlamaConfig, LlamaProxy

MODEL_SEED = 0
DATA_SEED = 1
IGNORE_INDEX = -100


class CausalLM(nn.Module):
    """The interface every mode sees (see the module docstring)."""

    lm_head: nn.Linear

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlps(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every MLP module, which maps [batch, seq, hidden] to itself."""
        raise NotImplementedError

    def next_token_logits(self, h: torch.Tensor) -> torch.Tensor:
        """What a prefill returns: the logits of the last position, [batch, 1, vocab]."""
        return self.lm_head(h[:, -1:])

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(ids)
        if labels is None:
            return self.next_token_logits(h)
        return F.cross_entropy(
            self.lm_head(h).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX
        )


class ProxyLM(CausalLM):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.base = LlamaProxy(cfg)
        self.lm_head = self.base.lm_head

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.hidden(ids)

    def mlps(self) -> list[tuple[nn.Module, str]]:
        return [(block, "mlp") for block in self.base.blocks]


class HFCausalLM(CausalLM):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.lm_head = model.lm_head

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model(input_ids=ids).last_hidden_state

    def mlps(self) -> list[tuple[nn.Module, str]]:
        return [(layer, "mlp") for layer in self.model.model.layers]


class HFUserPathLM(CausalLM):
    """An HF causal LM called through its own forward, labels in, the loss out of the
    returned output (the logits are returned too): what the HF Trainer does. A compiled mode
    compiles the HF model in place (`compiles_in_place`), so the graph is the one a user's
    `model.compile(...)` makes, the logits among its outputs."""

    compiles_in_place = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.lm_head = model.lm_head

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(ids)  # as a padding collator makes it for full-length rows
        if labels is None:
            return self.model(input_ids=ids, attention_mask=mask).logits[:, -1:]
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model(input_ids=ids).last_hidden_state

    def mlps(self) -> list[tuple[nn.Module, str]]:
        return [(layer, "mlp") for layer in self.model.model.layers]


class LitGPTLM(CausalLM):
    """litgpt's own `GPT` with its training loss, `chunked_cross_entropy` (128-token pieces),
    as its pretraining and fine-tuning scripts call them (litgpt installed as the README's
    test set-up says). Modes that replace the head or the MLPs do not run on it."""

    def __init__(self, config: dict):
        super().__init__()
        from litgpt.config import Config
        from litgpt.model import GPT

        self.gpt = GPT(Config.from_name(**config))
        self.lm_head = self.gpt.lm_head

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        from litgpt.utils import chunked_cross_entropy

        if labels is None:
            return self.gpt(ids)[:, -1:]
        return chunked_cross_entropy(self.gpt(ids), labels, chunk_size=128)

    def mlps(self) -> list[tuple[nn.Module, str]]:
        return [(block, "mlp") for block in self.gpt.transformer.h]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    config: dict  # the model config, as reported
    dtype: torch.dtype
    make: Callable[[bool], CausalLM]  # make(checkpointing) -> model in fp32 on the CPU
    batch: int = 1
    shifts_labels: bool = False  # the model shifts the labels itself (HF's loss): labels = ids

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def build_model(self, device: str = "cpu", checkpointing: bool = False) -> CausalLM:
        torch.manual_seed(MODEL_SEED)
        return self.make(checkpointing).to(device=device, dtype=self.dtype)

    def make_inputs(
        self, seq: int, device: str = "cpu", ignore_fraction: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and next-token labels; the last position has no target (-100), nor
        the first `ignore_fraction` of every sequence (a prompt masked out in supervised
        fine-tuning)."""
        gen = torch.Generator().manual_seed(DATA_SEED)
        ids = torch.randint(0, self.vocab_size, (self.batch, seq), generator=gen)
        if self.shifts_labels:
            labels = ids.clone()
        else:
            labels = torch.roll(ids, -1, dims=1)
            labels[:, -1] = IGNORE_INDEX
        labels[:, : round(ignore_fraction * seq)] = IGNORE_INDEX
        return ids.to(device), labels.to(device)

    def parameter_count(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in self.make(False).parameters())

    def describe(self) -> dict:
        return {
            "workload": self.name,
            "model": self.description,
            "config": self.config,
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch": self.batch,
            "parameters": self.parameter_count(),
            "model_seed": MODEL_SEED,
            "data_seed": DATA_SEED,
        }


def _proxy_of(config: LlamaConfig) -> Callable[[bool], CausalLM]:
    def make(checkpointing: bool) -> CausalLM:
        return ProxyLM(dataclasses.replace(config, activation_checkpointing=checkpointing))

    return make


def _hf_causal_lm(model_type: str, config: dict, wrapper: type[CausalLM] = HFCausalLM
                  ) -> Callable[[bool], CausalLM]:
    def make(checkpointing: bool) -> CausalLM:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(model_type, **config, use_cache=False)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        if model_type in ("gpt2",):
            model.loss_type = "ForCausalLM"
        if checkpointing:  # transformers 5.x renamed it; the old name warns
            # what the README tells users: transformers >= 5.25's attention layers have a side
            # effect Dynamo breaks the graph at in a checkpointed layer unless told to skip it
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
        return wrapper(model)

    return make


PROXY_CONFIG = LlamaConfig(vocab_size=16000, hidden=256, intermediate=1024, layers=2, heads=4)
MLP_FULLVOCAB_CONFIG = dataclasses.replace(PROXY_CONFIG, vocab_size=128256, attention=False)
FULLVOCAB_CONFIG = {
    "vocab_size": 128256,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1 << 17,
    "tie_word_embeddings": False,
}
HF_LLAMA_CONFIG = {**FULLVOCAB_CONFIG, "vocab_size": 16000}  # the proxy's shapes, HF's model
# Mixtral's routing (8 experts, top-2) at the proxy's width
MIXTRAL_CONFIG = {**HF_LLAMA_CONFIG, "num_local_experts": 8, "num_experts_per_tok": 2}
LLAMA_1B_CONFIG = {  # Llama-3.2-1B's shapes
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 1 << 17,
    "tie_word_embeddings": True,
}

def _litgpt_lm(checkpointing: bool) -> CausalLM:
    if checkpointing:
        raise ValueError("litgpt-llama: litgpt's GPT has no checkpointing switch of its own")
    return LitGPTLM(LITGPT_LLAMA_CONFIG)


LITGPT_LLAMA_CONFIG = {  # litgpt's Llama 3.2 at the proxy's shapes
    "name": "Llama-3.2-1B", "n_layer": 2, "n_embd": 256, "n_head": 4, "n_query_groups": 4,
    "head_size": 64, "intermediate_size": 1024, "vocab_size": 16000,
    "padded_vocab_size": 16000, "block_size": 1 << 15,
}

WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "proxy",
            "LlamaProxy (mst_compile.demo_models)",
            {k: v for k, v in vars(PROXY_CONFIG).items() if k != "activation_checkpointing"},
            torch.float32,
            _proxy_of(PROXY_CONFIG),
        ),
        Workload(
            "mlp-fullvocab",
            "LlamaProxy without attention (mst_compile.demo_models), full Llama-3 vocabulary",
            {k: v for k, v in vars(MLP_FULLVOCAB_CONFIG).items()
             if k not in ("activation_checkpointing", "heads", "rope_theta")},
            torch.float32,
            _proxy_of(MLP_FULLVOCAB_CONFIG),
        ),
        Workload(
            "llama-fullvocab",
            "HF LlamaForCausalLM, tiny width, full Llama-3 vocabulary",
            FULLVOCAB_CONFIG,
            torch.float32,
            _hf_causal_lm("llama", FULLVOCAB_CONFIG),
        ),
        Workload(
            "mixtral-moe",
            "HF MixtralForCausalLM, tiny width, 8 experts top-2 (grouped_mm experts)",
            MIXTRAL_CONFIG,
            torch.float32,
            _hf_causal_lm("mixtral", MIXTRAL_CONFIG),
        ),
        Workload(
            "llama-1b",
            "HF LlamaForCausalLM shaped like Llama-3.2-1B",
            LLAMA_1B_CONFIG,
            torch.bfloat16,
            _hf_causal_lm("llama", LLAMA_1B_CONFIG),
        ),
        Workload(
            "hf-llama",
            "HF LlamaForCausalLM at the proxy's width, through its own forward (user's path)",
            HF_LLAMA_CONFIG,
            torch.float32,
            _hf_causal_lm("llama", HF_LLAMA_CONFIG, HFUserPathLM),
            shifts_labels=True,
        ),
        Workload(
            "litgpt-llama",
            "litgpt's GPT (Llama 3.2) at the proxy's shapes, with its chunked_cross_entropy",
            LITGPT_LLAMA_CONFIG,
            torch.float32,
            _litgpt_lm,
        ),
        Workload(
            "hf-llama-1b",
            "HF LlamaForCausalLM shaped like Llama-3.2-1B, through its own forward",
            LLAMA_1B_CONFIG,
            torch.bfloat16,
            _hf_causal_lm("llama", LLAMA_1B_CONFIG, HFUserPathLM),
            shifts_labels=True,
        ),
    )
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workload(device: str) -> str:
    return "llama-1b" if device == "cuda" else "proxy"


def get(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
