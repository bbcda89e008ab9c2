"""Training loops whose batches change shape from step to step, as data loaders make them
(dynamic padding, a short last batch, length bucketing): every step matches eager, whatever
form the token count takes once Dynamo makes it symbolic, and the loop recompiles no more
often than Inductor alone does plus mst's chunk-count buckets."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from numerics import check_training_loop, summary
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

import mst_compile
from mst_compile.backend import mst_backend
from mst_compile.report import INTERNAL_ERROR

VOCAB, HIDDEN, INTERMEDIATE = 300, 32, 128
# batch and length both change (their product is a product of two symbols), lengths the
# chunk count does not divide, batch 1 included
SHAPES = [(1, 100), (2, 77), (3, 50), (1, 61), (2, 64)]


class MLPHead(nn.Module):
    """An embedding, one SwiGLU-free MLP block and a vocabulary head with cross-entropy: the
    issue's repro. `form` sets how the token count becomes symbolic: "product" (batch x
    length), "shifted" (the last position of every row dropped before the blocks, labels
    shifted: batch x (length - 1)), "packed" (a second sequence concatenated along the
    length: batch x (length + length2)), "selected" (the head run on the kept labels' rows
    only, `h[labels != -100]`: a count read from the data)."""

    def __init__(self, form: str = "product"):
        super().__init__()
        self.form = form
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.w1 = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.w2 = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        if self.form == "shifted":
            x, labels = x[:, :-1], labels[:, 1:]
        elif self.form == "packed":
            half = ids.shape[1] // 2
            x = torch.cat([x, self.emb(ids[:, :half].flip(1))], 1)
            labels = torch.cat([labels, labels[:, :half]], 1)
        x = x + self.w2(F.silu(self.w1(x)))
        if self.form == "selected":
            kept = labels.reshape(-1) != -100
            h = x.reshape(-1, HIDDEN)[kept]
            return F.cross_entropy(self.head(h).float(), labels.reshape(-1)[kept])
        logits = self.head(x).float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def _model(form: str = "product") -> MLPHead:
    torch.manual_seed(0)
    return MLPHead(form)


def _symbolic_regions(report) -> set[str]:
    return {r.symbolic for r in report.regions if r.symbolic}


@pytest.mark.parametrize("form", ["product", "shifted", "packed"])
def test_batch_and_length_change_every_step(form):
    """Default options but the sizes (small sizes pay off, chunks of 16 tokens): both regions
    chunked at every shape, numbers exact."""
    report, _ = check_training_loop(_model(form), vocab=VOCAB, shapes=SHAPES,
                                    options={"strict": True, "min_bytes": 0, "min_chunk_len": 16})
    assert report.count("mlp", "training") >= 2 and report.count("loss", "training") >= 2, (
        summary(report))
    symbolic = _symbolic_regions(report)
    assert symbolic, summary(report)
    if form == "shifted":
        assert any("- " in s or "-1" in s or "- 1" in s for s in symbolic), symbolic
    if form == "packed":
        assert any("+" in s for s in symbolic), symbolic


def test_a_count_read_from_the_data_is_chunked():
    """The head over `h[labels != -100]` (Dynamo's capture_dynamic_output_shape_ops): its token
    count is an unbacked size; no size test guards on it, the chunk count is chosen at the
    count expected of it and the chunk lengths follow the data. Checked op by op
    (compiler="eager"): Inductor itself may fail on such graphs (see the fallback test)."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        report, _ = check_training_loop(
            _model("selected"), vocab=VOCAB, shapes=SHAPES[:3],
            options={"strict": True, "min_bytes": 0, "chunks": 3, "compiler": "eager"})
    loss = [r for r in report.regions if r.kind == "loss"]
    assert loss and all(r.symbolic.startswith("u") for r in loss), summary(report)


class _FailOnMstSubgraphs(CustomGraphPass):
    """A post-grad pass that raises on any graph holding an mst chunk call: Inductor failing
    on a graph mst rewrote, on purpose."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.find_nodes(op="call_function",
                                     target=torch.ops.higher_order.invoke_subgraph):
            if str(node.args[1]).startswith("mst_"):
                raise RuntimeError("deliberate failure on a rewritten graph")

    def uuid(self) -> str:
        return "fail-on-mst-subgraphs"


def test_compiler_failure_on_a_rewritten_graph_compiles_it_as_it_was(monkeypatch):
    monkeypatch.setattr(mst_compile.backend, "_warned_fallback", False)
    options = {"min_bytes": 0, "chunks": 3,
               "inductor": {"post_grad_custom_post_pass": _FailOnMstSubgraphs()}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, _ = check_training_loop(_model(), vocab=VOCAB, shapes=SHAPES[:2],
                                        options=options)
    assert not report.regions, summary(report)
    dropped = [s for s in report.skipped if s.category == INTERNAL_ERROR]
    assert {s.seed for s in dropped} and all(
        "deliberate failure on a rewritten graph" in s.reason for s in dropped), summary(report)
    messages = [str(w.message) for w in caught if "mst_compile" in str(w.message)]
    assert any("without its rewrites" in m and "deliberate failure" in m for m in messages), messages

    torch._dynamo.reset()
    with pytest.raises(Exception, match="deliberate failure"):
        check_training_loop(_model(), vocab=VOCAB, shapes=SHAPES[:1],
                            options={**options, "strict": True})


class CountingBackend:
    """Counts the graphs a backend compiles (one per Dynamo compile)."""

    def __init__(self, backend, **kwargs):
        self.backend, self.kwargs, self.compiles = backend, kwargs, 0

    def __call__(self, gm, example_inputs):
        compiled = self.backend(gm, example_inputs, **self.kwargs)
        self.compiles += 1
        return compiled


def _loop(backend, shapes) -> None:
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for batch, seq in shapes:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        compiled(ids, ids.roll(-1, 1)).backward()


def test_recompiles_bounded_by_inductor_plus_chunk_count_buckets():
    """Six shapes: Inductor compiles twice (the first shape, then once with symbolic sizes).
    With a fixed chunk count mst compiles exactly as often; with "auto" at most once more
    per chunk-count bucket the lengths cross (powers of two)."""
    from torch._inductor.compile_fx import compile_fx

    shapes = [(1, 100), (2, 77), (3, 50), (1, 61), (2, 64), (4, 90)]
    inductor = CountingBackend(compile_fx)
    _loop(inductor, shapes)
    fixed = CountingBackend(mst_backend, options={"min_bytes": 0, "chunks": 4, "strict": True})
    _loop(fixed, shapes)
    assert fixed.compiles == inductor.compiles, (fixed.compiles, inductor.compiles)

    auto = CountingBackend(mst_backend, options={"min_bytes": 0, "strict": True,
                                                 "min_chunk_len": 32})
    with mst_compile.collect_reports() as reports:
        _loop(auto, shapes)
    buckets = {tuple(sorted((r.kind, r.chunks) for r in rep.regions))
               for rep in reports if any(r.symbolic for r in rep.regions)}
    assert inductor.compiles <= auto.compiles <= inductor.compiles + len(buckets) - 1, (
        auto.compiles, inductor.compiles, buckets)


# --- every model family trains through a loop ------------------------------------------------

HF_SHAPES = [(1, 48), (2, 37), (3, 29)]
HF_VOCAB = 512


def _check_every_graph(report, want: dict[str, int]) -> None:
    """Every graph compiled for the loop (HF checkpointing splits the model into several)
    that rewrote a region of a kind in `want` rewrote `want[kind]` of them, and both the
    first shape's graphs and the symbolic ones did."""
    for kind, count in want.items():
        graphs = [g for g in report.graphs if any(r.kind == kind for r in g.regions)]
        assert all(sum(r.kind == kind for r in g.regions) == count for g in graphs), summary(report)
        assert any(not r.symbolic for g in graphs for r in g.regions), summary(report)
        assert any(r.symbolic for g in graphs for r in g.regions), summary(report)


def test_hf_llama_padded_batches_with_checkpointing():
    """HF Llama through its own forward (padded batches: an attention mask, a masked prompt,
    labels shifted by HF), with HF gradient checkpointing: the issue's crash."""
    from tiny_models import hf_checkpointing, hf_model

    model = hf_checkpointing(hf_model("llama", HF_VOCAB))
    report, _ = check_training_loop(model, vocab=HF_VOCAB, shapes=HF_SHAPES, hf=True,
                                    options={"strict": True, "min_bytes": 0, "chunks": 3})
    _check_every_graph(report, {"mlp": 2, "loss": 1})


@pytest.mark.parametrize("family", ["qwen2", "mixtral", "lora"])
def test_other_families_train_through_a_loop(family):
    """Qwen2, a Mixtral MoE (its declared blocks chunked at symbolic sizes) and a
    LoRA-adapted Llama (peft), each checked op by op (compiler="eager": the Inductor path of
    such loops is the Llama test's)."""
    from tiny_models import hf_from_config, hf_model

    options = {"strict": True, "min_bytes": 0, "chunks": 3, "compiler": "eager"}
    if family == "qwen2":
        model, mlp = hf_model("qwen2", HF_VOCAB), "mlp"
    elif family == "mixtral":
        model, mlp = hf_from_config("mixtral", layers=2, vocab=HF_VOCAB, num_local_experts=4,
                                    num_experts_per_tok=2), "moe"
    else:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(hf_model("llama", HF_VOCAB), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
        mlp = "mlp"
    report, _ = check_training_loop(model, vocab=HF_VOCAB, shapes=HF_SHAPES, hf=True,
                                    options=options)
    _check_every_graph(report, {mlp: 2, "loss": 1})
