"""Architecture coverage matrix: tiny random-weight HF models of many families (built from
configs, nothing downloaded), each trained once against eager (loss and every parameter
gradient, fp32) with the regions mst must find asserted; inference only where the head
differs (soft-capped logits, an OPT decoder, an encoder's masked-LM head).

Every model has 2 layers, hidden 32, intermediate 128, vocab 512 and runs batch 2 x seq 37
with 4 chunks (74 tokens: chunks of 19 and a tail of 17). A dense 2-layer model must give
exactly 2 MLP regions and 1 head region ("loss" in training, "logits" in inference).

The rewritten graphs run with `compiler="eager"` (the same ATen graphs, run op by op): this
matrix checks what mst finds and rewrites across families; Inductor's code generation of
rewritten graphs is checked by test_numerics.py and the fuzzer's Inductor cases.

`python tests/test_coverage.py` regenerates docs/support.md (the support table) from the same
family list, at a realistic size (see `support_table`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
from numerics import check_against_eager, summary
from test_numerics import assert_regions
from tiny_models import HIDDEN, hf_from_config

from mst_compile.report import NOT_A_BLOCK, UNSUPPORTED, Report

VOCAB = 512
BATCH, SEQ, CHUNKS = 2, 37, 4
INTERMEDIATE = 4 * HIDDEN
MAX_LEN = 128

# The skip every fused attention projection gets (its amplified values flow into attention).
FUSED_QKV = (NOT_A_BLOCK, "not an MLP or LM-head block")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    what: str  # what the family adds to the matrix (support table)
    # family-specific config keys, from (hidden, intermediate, max positions)
    sizes: Callable[[int, int, int], dict] = lambda d, i, n: {}
    masked_lm: bool = False
    attn: str = "sdpa"
    mlps: int = 2  # MLP regions of the 2-layer model
    moes: int = 0  # MoE block regions (declared token-wise: mst_compile.token_wise)
    skips: tuple[tuple[str, str], ...] = ()  # (category, reason part) of each expected skip
    # Parameters whose gradient is exactly zero in exact arithmetic, so eager's value is
    # rounding noise (~1e-11) and no two implementations agree on it: frozen. The key bias of
    # attention without rotary embeddings: q.b_k is the same for every key of a query, and
    # softmax ignores a constant shift. Plain Inductor (no mst) differs from eager on it by
    # the same relative error (0.75 on OPT) and matches mst bit for bit.
    frozen: tuple[str, ...] = ()
    inference: bool = False  # also check the no_grad forward (logits)
    strict: bool = True
    tested: bool = True  # False: support table only (a sibling family is in the test matrix)

    @property
    def unsupported(self) -> int:
        return sum(category == UNSUPPORTED for category, _ in self.skips)

    def build(self, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
              vocab: int = VOCAB, max_len: int = MAX_LEN) -> torch.nn.Module:
        model = hf_from_config(self.model_type, masked_lm=self.masked_lm, attn=self.attn,
                               hidden=hidden, intermediate=intermediate, vocab=vocab,
                               max_len=max_len, **self.sizes(hidden, intermediate, max_len))
        for name, p in model.named_parameters():
            if any(part in name for part in self.frozen):
                p.requires_grad_(False)
        return model


def _experts(num_key: str) -> Callable[[int, int, int], dict]:
    return lambda d, i, n: {num_key: 4, "num_experts_per_tok": 2}


FAMILIES = [
    Family("llama", "llama", "SwiGLU MLP, RMSNorm, RoPE, GQA"),
    Family("mistral", "mistral", "Llama-shaped with a sliding-window mask"),
    Family("qwen2", "qwen2", "QKV biases"),
    Family("qwen3", "qwen3", "q/k RMSNorm"),
    Family("gemma", "gemma", "GeGLU (GELU-tanh) MLP, tied embeddings, scaled embeddings"),
    Family("gemma2", "gemma2",
           "final logit soft-capping (tanh in the head), tied embeddings, eager attention "
           "(HF has no sdpa path for Gemma2)",
           sizes=lambda d, i, n: {"query_pre_attn_scalar": d // 4}, attn="eager",
           inference=True),
    Family("phi3", "phi3", "fused gate_up projection (one mm, then split), fused QKV",
           sizes=lambda d, i, n: {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
           skips=(FUSED_QKV,) * 2),
    Family("gpt2", "gpt2", "Conv1D (addmm), GELU-tanh, LayerNorm, fused QKV, tied embeddings",
           sizes=lambda d, i, n: {"n_inner": i, "n_positions": n, "bos_token_id": 0,
                                  "eos_token_id": 0},
           skips=(FUSED_QKV,) * 2),
    Family("gpt_neox", "gpt_neox", "parallel residual, biased Linear (addmm), fused QKV",
           skips=(FUSED_QKV,) * 2),
    Family("opt", "opt", "ReLU fc1/fc2, learned positions",
           sizes=lambda d, i, n: {"ffn_dim": i, "word_embed_proj_dim": d},
           frozen=("k_proj.bias",), inference=True),
    Family("mixtral", "mixtral", "MoE: top-2 routed experts (grouped_mm)",
           sizes=_experts("num_local_experts"), mlps=0, moes=2),
    Family("qwen2_moe", "qwen2_moe", "MoE: routed experts + a gated shared-expert MLP",
           sizes=lambda d, i, n: {"num_experts": 4, "num_experts_per_tok": 2,
                                  "moe_intermediate_size": i,
                                  "shared_expert_intermediate_size": i},
           mlps=0, moes=2),
    Family("qwen3_moe", "qwen3_moe", "MoE: routed experts (batched_mm), q/k norm",
           sizes=lambda d, i, n: {"num_experts": 4, "num_experts_per_tok": 2,
                                  "moe_intermediate_size": i,
                                  "experts_implementation": "batched_mm"},
           mlps=0, moes=2),
    Family("olmoe", "olmoe", "MoE: routed experts, q/k norm", sizes=_experts("num_experts"),
           mlps=0, moes=2),
    Family("bert", "bert", "encoder, masked-LM head (dense+GELU+LayerNorm, then the decoder)",
           masked_lm=True, frozen=("attention.self.key.bias",), inference=True),
    Family("roberta", "roberta", "encoder, masked-LM head", masked_lm=True,
           sizes=lambda d, i, n: {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
           frozen=("attention.self.key.bias",), tested=False),
]
BY_NAME = {f.name: f for f in FAMILIES}
TESTED = [f for f in FAMILIES if f.tested]


def _options(family: Family) -> dict:
    return {"strict": family.strict, "min_bytes": 0, "chunks": CHUNKS, "compiler": "eager"}


@functools.cache
def training_report(name: str) -> Report:
    """check_against_eager on one training step of the family's tiny model (cached: the MoE
    tests read the same report)."""
    family = BY_NAME[name]
    return check_against_eager(family.build(), vocab=VOCAB, hf=True, training=True,
                               batch=BATCH, seq=SEQ, options=_options(family))


def assert_skips(report: Report, family: Family) -> None:
    text = summary(report)
    got = sorted((s.category, s.reason) for s in report.skipped)
    want = sorted(family.skips)
    assert len(got) == len(want), text
    for (category, reason), (want_category, part) in zip(got, want):
        assert category == want_category and part in reason, text


@pytest.mark.parametrize("family", TESTED, ids=[f.name for f in TESTED])
def test_training(family: Family):
    """Loss, logits and every parameter gradient match eager; the report has the family's
    MLP regions, one loss region and the expected skips."""
    report = training_report(family.name)
    assert_regions(report, training=True, head="loss", tokens=BATCH * SEQ, chunks=CHUNKS,
                   mlps=family.mlps, moes=family.moes, unsupported=family.unsupported)
    assert_skips(report, family)


INFERENCE = [f for f in TESTED if f.inference]


@pytest.mark.parametrize("family", INFERENCE, ids=[f.name for f in INFERENCE])
def test_inference(family: Family):
    report = check_against_eager(family.build(), vocab=VOCAB, hf=True, training=False,
                                 batch=BATCH, seq=SEQ, options=_options(family))
    assert_regions(report, training=False, head="logits", tokens=BATCH * SEQ, chunks=CHUNKS,
                   mlps=family.mlps, moes=family.moes, unsupported=family.unsupported)
    assert_skips(report, family)


def test_moe_blocks_chunked_whole():
    """Every layer's MoE block (router, routed experts, and in Qwen2-MoE the gated shared
    expert) is one region of kind "moe": the experts' opaque grouped matmul is inside it, so
    nothing is skipped, and the shared expert is no separate MLP region."""
    for name in ("mixtral", "qwen2_moe"):
        report = training_report(name)
        text = summary(report)
        assert [r.kind for r in report.regions] == ["moe", "moe", "loss"], text
        moe = report.regions[0]
        assert "transformers.grouped_mm_fallback.default" in moe.ops, text
        assert any("experts" in t for t in moe.stack_traces), text
        assert not report.skipped, text


# --- support table (python tests/test_coverage.py) -------------------------------------------

TABLE_SEQ, TABLE_HIDDEN, TABLE_INTERMEDIATE, TABLE_VOCAB = 2048, 256, 1024, 32000


def support_row(family: Family) -> str:
    """One `mst_compile.explain` of a training step (batch 1, seq 2048, hidden 256,
    intermediate 1024, vocab 32000, default options) and the table row derived from its
    report."""
    import mst_compile

    model = family.build(hidden=TABLE_HIDDEN, intermediate=TABLE_INTERMEDIATE,
                         vocab=TABLE_VOCAB, max_len=2 * TABLE_SEQ)
    torch.manual_seed(0)
    ids = torch.randint(0, TABLE_VOCAB, (1, TABLE_SEQ))
    # A fresh Dynamo: explain compiles a new model with a new backend each time, and after 8
    # of those the shared forward hits Dynamo's recompile limit, runs eagerly and explain
    # returns an empty report.
    torch._dynamo.reset()
    report = mst_compile.explain(model, input_ids=ids, labels=ids)
    assert report.graphs, f"{family.name}: explain compiled no graph"
    kinds: dict[str, list[int]] = {}
    for r in report.regions:
        kinds.setdefault(r.kind, []).append(r.bytes_before)
    regions = ", ".join(f"{len(b)} {k} ({sum(b) / 2**20:.0f} MiB)"
                        for k, b in kinds.items()) or "none"
    skips: dict[str, int] = {}
    for s in report.skipped:
        key = f"{s.category}: {s.reason}"
        skips[key] = skips.get(key, 0) + 1
    skipped = "<br>".join(f"{n}x {k}" for k, n in skips.items()) or "none"
    before = sum(r.bytes_before for r in report.regions) / 2**20
    saved = sum(r.bytes_before - r.bytes_after for r in report.regions) / 2**20
    chunks = "/".join(sorted({str(r.chunks) for r in report.regions})) or "-"
    return (f"| {family.name} | {family.what} | {regions} | {chunks} | {skipped} | "
            f"{before:.0f} | {saved:.0f} |")


SUPPORT_HEADER = """# Architecture support

Generated by `python tests/test_coverage.py` (do not edit by hand). Each row is one
`mst_compile.explain` of a training step of a random-weight 2-layer HF model of the family:
batch 1, seq {seq}, hidden {hidden}, intermediate {intermediate}, vocab {vocab}, fp32, default
options (`chunks="auto"`, `min_bytes` 8 MiB). The memory columns are derived from the report,
not measured: *intermediate* is the sum over regions of `bytes_before` (the region's wide
values for the whole sequence), *saved* the sum of `bytes_before - bytes_after` (one chunk's
worth is what remains). `bytes_before` counts every wide value of a region's forward part,
views and pointwise temporaries included (14 values per SwiGLU MLP), which Inductor fuses or
aliases: an upper bound on the unchunked intermediates, not a peak-memory measurement (the
README has a measured one). Numerics of every family (loss, logits, every parameter gradient vs
eager, fp32) are checked by `tests/test_coverage.py` on tiny versions of the same models.

| family | what it exercises | regions (training; intermediate) | chunks | skipped (category: reason) | intermediate MiB | saved MiB |
|---|---|---|---|---|---|---|
"""

SUPPORT_NOTES = """
Notes

- `not_a_block` skips are fused attention projections (QKV in one matmul): their wide output
  flows into attention, never back through a matmul; nothing to chunk.
- MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) are declared token-wise
  (`mst_compile.token_wise`; the built-in declarations in `mst_compile/declare.py`): each
  layer's block, router and experts and shared expert together, is one `moe` region run
  mini-sequence by mini-sequence, whatever the experts implementation inside (`grouped_mm`,
  `batched_mm`). The `eager` per-expert loop breaks the graph (a data-dependent loop), so no
  graph holds a whole block: it is left as it is.
"""


def support_table() -> str:
    header = SUPPORT_HEADER.format(seq=TABLE_SEQ, hidden=TABLE_HIDDEN,
                                   intermediate=TABLE_INTERMEDIATE, vocab=TABLE_VOCAB)
    return header + "\n".join(support_row(f) for f in FAMILIES) + "\n" + SUPPORT_NOTES


if __name__ == "__main__":
    import pathlib

    out = pathlib.Path(__file__).resolve().parents[1] / "docs" / "support.md"
    out.write_text(support_table())
    print(out.read_text())
