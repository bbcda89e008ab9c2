"""Property-based fuzzing: random token-wise models (tests/fuzz_models.py) compiled with
backend="mst" match eager, explain every region they leave alone, never fall back, and
rewrite every plain batch-first MLP block.

The property runs with options={"compiler": "eager"} (the rewritten ATen graphs op by op:
about 0.6 s per example on 2 CPU cores); `test_fixed_specs_through_inductor` runs a few specs through the
real Inductor path.

    pytest tests/test_fuzz.py                          # profile "ci": 25 derandomized examples
    MST_FUZZ_EXAMPLES=300 pytest tests/test_fuzz.py -x  # profile "long": random seed (printed), 300 examples
    MST_FUZZ_EXAMPLES=300 MST_FUZZ_SEED=1234 ...       # replay a long run
    MST_FUZZ_EXAMPLES=300 MST_FUZZ_SHRINK=0 ...        # no shrinking (it can take minutes)

A failure prints the falsifying ModelSpec; its repr is valid Python:

    cd tests && ../.venv/bin/python -c "from fuzz_models import *; check_spec(ModelSpec(...))"
"""

from __future__ import annotations

import contextlib
import os
import random

import pytest
from fuzz_models import BlockSpec, ModelSpec, check_spec, model_specs
from hypothesis import HealthCheck, Phase, example, given, note, seed, settings

from mst_compile.report import Report

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
    "print_blob": False,
}
# No shrinking in CI: one example takes about a second and shrinking may run for minutes;
# the unshrunk spec is printed and reproducible all the same. Long runs shrink.
settings.register_profile(
    "ci", max_examples=60, derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)

LONG_EXAMPLES = int(os.environ.get("MST_FUZZ_EXAMPLES", "0") or 0)
if LONG_EXAMPLES:
    SEED = int(os.environ.get("MST_FUZZ_SEED") or random.randrange(2**32))
    # MST_FUZZ_SHRINK=0: report the first failing example as drawn (shrinking can take minutes)
    shrink = os.environ.get("MST_FUZZ_SHRINK", "1") != "0"
    settings.register_profile(
        "long", max_examples=LONG_EXAMPLES, derandomize=False,
        phases=list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate],
        **_COMMON)
    PROFILE = "long"
else:
    SEED = 0
    PROFILE = "ci"


@pytest.fixture(scope="module", autouse=True)
def _show_seed(request):
    """Long runs: the seed on the terminal (pytest captures the print at import)."""
    if LONG_EXAMPLES:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\nmst fuzz: {LONG_EXAMPLES} examples, MST_FUZZ_SEED={SEED}", flush=True)


def _seeded(test):
    return seed(SEED)(test) if LONG_EXAMPLES else test


# Minimal specs of bugs the fuzzer found (fixed since), always run first.
FOUND = [
    # sequence-first logits transposed back before the loss, batch 2: wrong loss (53138c2)
    ModelSpec(seq_first=True, batch=2),
    ModelSpec(seq_first=True, batch=2, seq=13, training=True),
    # ... with a z-loss: "shape '[5, 32]' is invalid for input of size 800" in the rewrite
    ModelSpec(seq_first=True, batch=2, training=True, z_loss=True),
    # h.transpose(1, 2) * scale inside the MLP, batch 2: refused ("permute has no token rule")
    ModelSpec(batch=2, blocks=(BlockSpec(inner=("transpose",)),)),
    # a positional table multiplied into the intermediate, batch 1: broadcast error in the
    # rewrite; with chunks of one token: "shape '[1, 16]' is invalid"
    ModelSpec(blocks=(BlockSpec(inner=("pos_mul",)),)),
    ModelSpec(chunks=5, blocks=(BlockSpec(inner=("pos_mul",)),)),
    # an MLP without residual followed by an MLP without norm: one left alone (3b2274c)
    ModelSpec(blocks=(BlockSpec(residual=False), BlockSpec(norm="none"))),
    # 18 tokens and hidden 18: a routed block's [tokens, experts] zeros had the shape of its
    # router weight transposed: "ambiguous", the block refused
    ModelSpec(hidden=18, vocab=128, blocks=(BlockSpec(mlp="routed"),), seq_first=True,
              transpose_back=False, batch=2, seq=9, chunks=3, seed=6639),
    # a routed block's output read by the next routed block (no residual): the second's plan,
    # made before the first was rewritten, passed the replaced value: "KeyError: view_4"
    ModelSpec(blocks=(BlockSpec(mlp="routed", residual=False),
                      BlockSpec(mlp="routed", norm="none"))),
    # a loop down to 5 tokens in 5 chunks: chunk lengths of 1 at the compiled length were
    # guarded equal to 1 while the graph was built, the length pinned and the loss's
    # subgraphs looked up by a text that had changed ("KeyError: '1'")
    ModelSpec(hidden=10, head="kl_fixed", batch=2, chunks=5, training=True,
              shapes=((3, 30), (1, 5))),
    # a routed block of 3 experts of width 40 over 3 x 40 tokens: its expert weight
    # [3, 40, 10] has the shape of its input [batch, seq, hidden], so it and its gradient were
    # taken as holding the tokens ("Expected size ... [60, 40] but got: [60, 60]")
    ModelSpec(hidden=10, blocks=(BlockSpec(mlp="routed", mult=4, bias=True, residual=False),),
              batch=3, seq=40, chunks=2, training=True),
    # a loop from (2, 34) to (1, 29) with a user's 14-token loss pieces: Dynamo passed the
    # length as a graph input and then specialised it (its value a number, not a symbol), so
    # the MLP's chunk found no symbol to stand for it in its views ("KeyError: 'primals_1'")
    ModelSpec(hidden=12, vocab=128, blocks=(BlockSpec(mlp="gelu", mult=6, bias=True,
                                                      norm="none", inner=("flatten",)),),
              seq_first=True, final_norm="none", tied=True, reduction="pieces", pieces=14,
              shift=True, batch=2, seq=34, chunks=2, training=True, shapes=((1, 29),)),
]


def _found_examples(test):
    for spec in reversed(FOUND):
        test = example(spec=spec)(test)
    return test


@_seeded
@settings(settings.get_profile(PROFILE))
@given(spec=model_specs())
@_found_examples
def test_random_model_matches_eager(spec: ModelSpec) -> None:
    if LONG_EXAMPLES:
        note(f"MST_FUZZ_SEED={SEED}")
    check_spec(spec)


# Training with an MLP and a loss region each, through the real Inductor backend: a plain
# SwiGLU LM, trained through a loop of three shapes (batch and length both change); a GELU
# MLP with biases, LayerNorm, a token-mixing op between blocks and a soft-capped,
# label-smoothed, class-weighted loss with z-loss over 2 micro-batches; a fused gate_up
# SwiGLU with a transpose inside (h.transpose(1, 2) * scale), tied embeddings and a summed
# loss, its logits made in the reused workspace (decision 28); a declared mixture of experts
# (top-2, tokens sorted by expert) then a SwiGLU, through a loop of three shapes (the block
# chunked at symbolic sizes); rotary attention from a fused projection before each of two
# blocks, the first checkpointed (attention keeps a copy of v and reads its output through
# the model's copy, attention_saves.py), then a checkpointed block whose q, k, v are selected
# from one view of the projection (their gradients one join in its layout, joins.py).
INDUCTOR_SPECS = [
    ModelSpec(hidden=16, vocab=96, blocks=(BlockSpec(mlp="swiglu", mult=4),), batch=2, seq=37,
              chunks=4, training=True, shapes=((1, 23), (3, 30)), seed=1),
    ModelSpec(hidden=12, vocab=128,
              blocks=(BlockSpec(mlp="gelu", mult=4, bias=True, norm="layer", mixer="cumsum"),
                      BlockSpec(mlp="geglu", mult=3, bias=True, norm="layer")),
              final_norm="layer", transform="softcap", label_smoothing=0.1, class_weight=True,
              z_loss=True, batch=2, seq=23, chunks=3, training=True, micro_batches=2,
              ignore_row=True, seed=2),
    ModelSpec(hidden=8, vocab=64,
              blocks=(BlockSpec(mlp="fused_swiglu", mult=3, norm="rms", inner=("transpose",)),),
              tied=True, reduction="sum", batch=2, seq=29, chunks=5, training=True,
              workspace=True, seed=3),
    ModelSpec(hidden=8, vocab=64,
              blocks=(BlockSpec(mlp="routed", mult=3, bias=True), BlockSpec(mlp="swiglu")),
              batch=3, seq=19, chunks=4, training=True, shapes=((2, 23), (1, 30)), seed=4),
    ModelSpec(hidden=12, vocab=64, blocks=(BlockSpec(mixer="attn_rope", checkpoint=True),
                                           BlockSpec(mixer="attn_rope", mult=3),
                                           BlockSpec(mixer="attn_heads", checkpoint=True)),
              batch=2, seq=26, chunks=3, training=True, seed=5),
]


@pytest.mark.parametrize("spec", INDUCTOR_SPECS,
                         ids=["swiglu", "gelu-geglu-softcap", "fused-tied", "routed-swiglu",
                              "rotary-attention"])
def test_fixed_specs_through_inductor(spec: ModelSpec) -> None:
    report = check_spec(spec, compiler="inductor")
    graphs = [Report([g]) for g in report.graphs]  # one per shape bucket of a loop
    assert len(graphs) == (3 if spec.shapes else 1), str(report)
    for graph in graphs:
        blocks = graph.count("mlp", "training") + graph.count("moe", "training")
        assert blocks == len(spec.blocks), str(report)
        assert graph.count("loss", "training") == 1, str(report)
        # the ignored rows are skipped, except where a z-loss over every token reads them
        (loss,) = [r for r in graph.regions if r.kind == "loss"]
        assert loss.ignored_rows.startswith("computed" if spec.z_loss else "skipped"), str(report)
