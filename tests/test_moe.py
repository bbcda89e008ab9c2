"""Declared token-wise blocks (mst_compile.token_wise): MoE layers and opaque ops.

A declared module is one region run mini-sequence by mini-sequence, whatever ops it holds
(routing sorts the tokens, experts run in opaque kernels); a declared op gets a token rule.
Every case is checked against eager on loss, logits, the MoE auxiliary loss and router
logits where the model returns them, and every parameter gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from numerics import BF16_RTOL, CUDA, check_against_eager, rel_err, summary
from tiny_models import hf_from_config
from torch import nn

import mst_compile
from mst_compile import declare
from mst_compile.declare import forget, qualified_name
from mst_compile.report import UNSUPPORTED, collect_reports

VOCAB = 512
EAGER = {"strict": True, "min_bytes": 0, "chunks": 4, "compiler": "eager"}


def mixtral(implementation: str = "grouped_mm", **overrides) -> nn.Module:
    return hf_from_config("mixtral", layers=2, vocab=VOCAB, num_local_experts=4,
                          num_experts_per_tok=2, experts_implementation=implementation,
                          **overrides)


def moe_regions(report) -> list:
    return [r for r in report.regions if r.kind == "moe"]


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_mixtral_training_with_router_logits_and_aux_loss(implementation):
    """Router logits leave every block (Chunked along the tokens) for the auxiliary loss,
    computed over all tokens outside the blocks; batch 3 x 29 tokens in 3 chunks, gradients
    accumulated over 2 micro-batches, through Inductor (grouped_mm; batched_mm runs the
    rewritten graph op by op). transformers' router-logit capture breaks the graph, hence
    fullgraph=False."""
    model = mixtral(implementation, output_router_logits=True, router_aux_loss_coef=0.5)
    compiler = "inductor" if implementation == "grouped_mm" else "eager"
    report = check_against_eager(model, vocab=VOCAB, hf=True, batch=3, seq=29, micro_batches=2,
                                 fullgraph=False, options={**EAGER, "chunks": 3,
                                                           "compiler": compiler})
    assert len(moe_regions(report)) == 2, summary(report)
    assert {"aux_loss[0]", "router_logits[0][0]", "router_logits[1][1]"} <= set(report.errors)


def test_qwen2_moe_bf16_autocast():
    model = hf_from_config("qwen2_moe", layers=2, vocab=VOCAB, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=64,
                           shared_expert_intermediate_size=96)
    report = check_against_eager(model, vocab=VOCAB, hf=True, batch=2, seq=37, autocast=torch.bfloat16,
                                 options=EAGER)
    assert len(moe_regions(report)) == 2, summary(report)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_mixtral_bf16_weights_use_aten_grouped_mm(device):
    """With bf16 weights transformers calls torch's own grouped matmul (aten._grouped_mm)
    instead of its fp32 fallback op: chunked the same, loss and gradients within bf16
    tolerance of eager (on a GPU through Inductor and the CUDA grouped matmul)."""
    model = mixtral().to(device, torch.bfloat16)
    compiled_model = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0)).to(device)
    torch._dynamo.reset()
    options = EAGER if device == "cpu" else {**EAGER, "compiler": "inductor"}
    compiled = torch.compile(compiled_model, backend="mst", options=options)
    with collect_reports() as reports:
        got = compiled(input_ids=ids, labels=ids)
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    got.loss.backward()
    (graph,) = [g for r in reports for g in r.graphs]
    assert [r.kind for r in graph.regions] == ["moe", "moe", "loss"], graph
    assert "aten._grouped_mm.default" in graph.regions[0].ops
    assert rel_err(got.loss.float(), ref.loss.float()) <= BF16_RTOL
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        assert rel_err(q.grad.float(), p.grad.float()) <= BF16_RTOL, name


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_mixtral_inference(implementation):
    report = check_against_eager(mixtral(implementation), vocab=VOCAB, hf=True, training=False,
                                 batch=2, seq=37, options=EAGER)
    moes = moe_regions(report)
    assert len(moes) == 2 and all(r.mode == "inference" for r in moes), summary(report)


def test_report_gives_the_routed_intermediate_avoided():
    """batched_mm gathers every token's expert weights ([tokens x top-k, 2 x intermediate,
    hidden]): the report's bytes before are that, per chunk a quarter of it."""
    report = check_against_eager(mixtral("batched_mm"), vocab=VOCAB, hf=True, batch=2, seq=40,
                                 options=EAGER)
    moe = moe_regions(report)[0]
    gathered = 80 * 2 * (2 * 4 * 32) * 32 * 4  # tokens x top-2 x [2 x 128, 32] fp32
    assert moe.bytes_before >= gathered, summary(report)
    assert moe.bytes_after * 4 == moe.bytes_before, summary(report)
    assert (moe.chunks, moe.chunk_len, moe.tokens) == (4, 20, 80), summary(report)


def test_eager_experts_loop_is_left_alone():
    """The eager per-expert loop iterates over the experts hit, a data-dependent loop that
    breaks the graph: no graph holds a whole block, nothing is rewritten, numbers exact."""
    report = check_against_eager(mixtral("eager"), vocab=VOCAB, hf=True, batch=2, seq=37,
                                 fullgraph=False, options={**EAGER, "strict": False})
    assert not moe_regions(report), summary(report)


# --- a module nobody special-cased ------------------------------------------------------


class TopOneExperts(nn.Module):
    """Top-1 routing, tokens sorted by expert, each token's expert weights gathered: token-wise
    as a whole, though its ops sort and gather across tokens."""

    def __init__(self, d: int = 32, experts: int = 4, inner: int = 96):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, inner) * d**-0.5)
        self.down = nn.Parameter(torch.randn(experts, inner, d) * inner**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, expert = self.router(flat).softmax(-1).max(-1)
        order = expert.argsort()
        h = torch.bmm(flat[order].unsqueeze(1), self.up[expert[order]]).relu()
        y = torch.bmm(h, self.down[expert[order]]).squeeze(1) * weight[order, None]
        return y[order.argsort()].reshape(x.shape)


class CapacityExperts(TopOneExperts):
    """Top-1 routing with an expert capacity: a token past the first CAPACITY of its expert
    (in token order) is dropped, so its output depends on the tokens before it."""

    CAPACITY = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, expert = self.router(flat).softmax(-1).max(-1)
        onehot = F.one_hot(expert, self.up.shape[0])
        position = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based, within the expert
        kept = (position <= self.CAPACITY).to(flat.dtype)
        h = torch.bmm(flat.unsqueeze(1), self.up[expert]).relu()
        y = torch.bmm(h, self.down[expert]).squeeze(1) * (weight * kept)[:, None]
        return y.reshape(x.shape)


class RoutedLM(nn.Module):
    def __init__(self, sequence_first: bool = False, d: int = 32, block: type = TopOneExperts):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.block = block(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.sequence_first = sequence_first

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids)
        if self.sequence_first:
            h = h.transpose(0, 1)
        h = h + self.block(h)
        if self.sequence_first:
            h = h.transpose(0, 1)
        logits = self.head(h)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.fixture
def declared_top_one():
    mst_compile.token_wise(TopOneExperts)
    yield
    forget(TopOneExperts)


@pytest.mark.parametrize("sequence_first", [False, True], ids=["batch-first", "sequence-first"])
def test_declared_module_is_chunked_whole(declared_top_one, sequence_first):
    report = check_against_eager(RoutedLM(sequence_first), vocab=VOCAB, batch=2, seq=37,
                                 micro_batches=2, options=EAGER)
    assert [r.kind for r in report.regions] == ["moe", "loss"], summary(report)
    moe = report.regions[0]
    assert (moe.chunks, moe.chunk_len, moe.tail_len) == (4, 19, 17), summary(report)


def test_undeclared_module_is_not_chunked():
    report = check_against_eager(RoutedLM(), vocab=VOCAB, batch=2, seq=37,
                                 options={**EAGER, "strict": False})
    assert [r.kind for r in report.regions] == ["loss"], summary(report)


def test_declared_by_name_through_inductor():
    name = f"{TopOneExperts.__module__}.TopOneExperts"
    mst_compile.token_wise(name)
    try:
        report = check_against_eager(RoutedLM(), vocab=VOCAB, batch=2, seq=37, chunks=3)
    finally:
        forget(name)
    assert [r.kind for r in report.regions] == ["moe", "loss"], summary(report)


def test_declared_dims_missing_are_refused():
    mst_compile.token_wise(TopOneExperts, dims=(0, 1, 2, 3))
    try:
        report = check_against_eager(RoutedLM(), vocab=VOCAB, batch=2, seq=37,
                                     options={**EAGER, "strict": False})
        skips = [s for s in report.skipped if "declared token dims (0, 1, 2, 3)" in s.reason]
        assert skips and all(s.category == UNSUPPORTED for s in skips), summary(report)
        with pytest.raises(Exception, match="MstSkip: .* do not exist"):
            check_against_eager(RoutedLM(), vocab=VOCAB, batch=2, seq=37, options=EAGER)
    finally:
        forget(TopOneExperts)


class NoisyExperts(TopOneExperts):
    """Router jitter: random numbers inside the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * (1 + 0.01 * torch.rand_like(x)))


def test_declared_block_drawing_random_numbers_is_refused():
    """The backward loop recomputes a block's forward chunk by chunk: random numbers drawn
    inside it would differ from the forward's, so such a block is refused with the reason."""
    mst_compile.token_wise(NoisyExperts)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(RoutedLM(block=NoisyExperts), backend="mst",
                                 options={**EAGER, "strict": False})
        ids = torch.randint(0, VOCAB, (2, 37))
        with collect_reports() as reports:
            compiled(ids, ids).backward()
    finally:
        forget(NoisyExperts)
    skips = [s for r in reports for s in r.skipped if "draws random numbers" in s.reason]
    assert skips and all(s.category == UNSUPPORTED for s in skips), skips
    assert not [r for rep in reports for r in rep.regions if r.kind == "moe"]


@pytest.mark.parametrize("whole_in, chunk_in, whole_out, tokens, length, want", [
    ([2, 64, 32], [1, 19, 32], [128, 32], 128, 19, [19, 32]),   # [B, S, d] -> [T, d]
    ([128, 32], [19, 32], [2, 64, 32], 128, 19, [1, 19, 32]),   # and back
    ([256], [38], [128, 2], 128, 19, [19, 2]),                  # [T * k] -> [T, k]
    ([128, 2], [19, 2], [256], 128, 19, [38]),                  # [T, k] -> [T * k]
    ([8, 16], [8, 8], [128], 16, 8, None),                      # [E, T]: tokens not leading
    ([128], [64], [8, 16], 16, 8, None),                        # [E * T] -> [E, T]
    ([256], [38], [2, 128], 128, 19, None),                     # [2 * T] -> [2, T]
])
def test_view_sizes_in_a_chunk(whole_in, chunk_in, whole_out, tokens, length, want):
    """resize.py's rule for a view inside a declared block: the tokens lead the dims it
    regroups, or the view is refused (never a shape that is merely consistent)."""
    from mst_compile.passes.region import CannotChunk
    from mst_compile.passes.resize import _view_shape

    node = torch.fx.Graph().placeholder("view")
    if want is None:
        with pytest.raises(CannotChunk):
            _view_shape(whole_in, chunk_in, whole_out, tokens, length, node)
    else:
        assert _view_shape(whole_in, chunk_in, whole_out, tokens, length, node) == want


@pytest.mark.parametrize("target, kwargs, message", [
    (42, {}, "expected an nn.Module subclass"),
    ("NoDots", {}, "not a qualified class name"),
    (TopOneExperts, {"dims": ()}, "distinct dims"),
    (TopOneExperts, {"dims": (0, 0)}, "distinct dims"),
    (TopOneExperts, {"dims": (-1,)}, "distinct dims"),
    (TopOneExperts, {"dims": 1}, "sequence of ints"),
    (TopOneExperts, {"args": (0,)}, "`args` is for ops"),
    (TopOneExperts, {"dims": (1,)}, "leading dims"),
    (torch.ops.aten.relu, {"dims": (0,)}, "declare one overload"),
])
def test_bad_declarations_raise(target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mst_compile.token_wise(target, **kwargs)


# --- an opaque op ---------------------------------------------------------------------------


@torch.library.custom_op("mst_test::gelu_gate", mutates_args=())
def gelu_gate(x: torch.Tensor) -> torch.Tensor:
    """A fused GeGLU activation, as a kernel library would ship it: [.., 2i] -> [.., i]."""
    a, b = x.chunk(2, dim=-1)
    return F.gelu(a) * b


@gelu_gate.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _gelu_gate_backward(ctx, grad):
    a, b = ctx.saved_tensors[0].chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.gelu_backward(grad * b, a), grad * F.gelu(a)], dim=-1)


gelu_gate.register_autograd(_gelu_gate_backward,
                            setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


class FusedGegluLM(nn.Module):
    def __init__(self, d: int = 32, inner: int = 128):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, d)
        self.up = nn.Linear(d, 2 * inner, bias=False)
        self.down = nn.Linear(inner, d, bias=False)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.ops.mst_test.gelu_gate(self.up(h)))
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten(), ignore_index=-100)


OP = torch.ops.mst_test.gelu_gate.default


def test_undeclared_op_ends_the_mlp():
    report = check_against_eager(FusedGegluLM(), vocab=VOCAB, options={**EAGER, "strict": False})
    assert [r.kind for r in report.regions] == ["loss"], summary(report)
    assert any("gelu_gate" in s.reason and s.category == UNSUPPORTED for s in report.skipped)


def test_declared_op_is_chunked_inside_the_mlp():
    mst_compile.token_wise(OP)  # every dim but the last: [batch, seq, 2i] -> [batch, seq, i]
    try:
        report = check_against_eager(FusedGegluLM(), vocab=VOCAB, micro_batches=2, chunks=3)
    finally:
        forget(OP)
    assert sorted(r.kind for r in report.regions) == ["loss", "mlp"], summary(report)
    mlp = next(r for r in report.regions if r.kind == "mlp")
    assert "mst_test.gelu_gate.default" in mlp.ops, summary(report)


def test_declared_op_dims_missing_are_refused():
    mst_compile.token_wise(OP, dims=(0, 2))
    try:
        report = check_against_eager(FusedGegluLM(), vocab=VOCAB,
                                     options={**EAGER, "strict": False})
    finally:
        forget(OP)
    assert any("declared token-wise along dims (0, 2)" in s.reason and s.category == UNSUPPORTED
               for s in report.skipped), summary(report)


def test_capacity_routing_is_left_whole_with_the_reason(monkeypatch):
    """A block that routes with an expert capacity is not token-wise: listed in
    NOT_TOKEN_WISE (as Switch Transformers' and NLLB-MoE's sparse MLPs are), it is left whole
    with a policy skip saying why, and declaring it raises."""
    name = qualified_name(CapacityExperts)
    monkeypatch.setitem(declare.NOT_TOKEN_WISE, name, "it routes with an expert capacity")
    report = check_against_eager(RoutedLM(block=CapacityExperts), vocab=VOCAB, batch=2, seq=37,
                                 options=EAGER)
    capacity = [s for s in report.skipped if "expert capacity" in s.reason]
    assert len(capacity) == 1 and capacity[0].category == "policy", summary(report)
    assert [r.kind for r in report.regions] == ["loss"], summary(report)
    with pytest.raises(ValueError, match="expert capacity"):
        mst_compile.token_wise(CapacityExperts)


def test_switch_transformers_exact_and_not_declarable():
    """Switch Transformers' capacity routing breaks the graph (a data-dependent loop over
    the experts): mst sees each expert's MLP over its selected tokens in a graph of its own,
    chunks those (exact: an expert's MLP is token-wise over its rows), and never the routing."""
    import transformers

    config = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        num_experts=4, expert_capacity=8, dropout_rate=0.0, router_jitter_noise=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    report = check_against_eager(model, vocab=VOCAB, hf=True, batch=2, seq=37, fullgraph=False,
                                 options={**EAGER, "strict": False})
    assert not moe_regions(report), summary(report)
    with pytest.raises(ValueError, match="expert capacity"):
        mst_compile.token_wise(transformers.SwitchTransformersSparseMLP)
