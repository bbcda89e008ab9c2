"""Cases where mst once gave a wrong gradient, broke a compile or refused a block it can chunk.

Each test failed before its fix. Most run the rewritten graphs with `compiler="eager"` (the
mst passes on Inductor's ATen graphs, run op by op): what is under test is the rewrite, and
that takes a second instead of a C++ build.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from numerics import check_against_eager, rel_err, summary
from torch import nn

import mst_compile
from mst_compile.passes.analysis import _layout_from_region_args
from mst_compile.passes.layout import Chunked

EAGER = {"strict": True, "min_bytes": 0, "chunks": 3, "compiler": "eager"}
LENIENT = {**EAGER, "strict": False}
V, D, I = 128, 16, 64


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


class SequenceFirst(nn.Module):
    """Megatron-style: embeds ids.t() into [S, B, d], runs the MLP there, and transposes the
    logits back to [B, S, V] for the loss."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels=None):
        x = self.emb(ids.t())
        x = x + self.down(F.gelu(self.up(x)))
        logits = self.head(x).transpose(0, 1)
        return logits if labels is None else _loss(logits, labels)


def test_sequence_first_layout_with_batch_2_is_exact():
    """[B, S, .] and [S, B, .] order the same tokens differently; they used to get one layout
    (head weight gradient rel. error 1.4). The MLP runs in [S, B, d] and is chunked; the loss
    reads the logits through a reshape that renumbers the tokens, so it is left whole, with
    the reason."""
    torch.manual_seed(0)
    report = check_against_eager(SequenceFirst(), vocab=V, batch=2, seq=37, options=LENIENT)
    assert report.count("mlp") == 1, summary(report)
    (skip,) = report.skipped
    assert skip.category == "unsupported" and "view" in skip.reason, summary(report)


def test_sequence_first_inference_chunks_mlp_and_logits():
    torch.manual_seed(0)
    report = check_against_eager(SequenceFirst(), vocab=V, batch=3, seq=20, training=False,
                                 options=EAGER)
    assert report.count("mlp") == 1 and report.count("logits") == 1, summary(report)


class TransposedScale(nn.Module):
    """A block that transposes its intermediate and back: each token's values stay together."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)
        self.scale = nn.Parameter(torch.rand(I, 1) + 0.5)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels=None):
        x = self.emb(ids)
        h = F.gelu(self.up(x)).transpose(1, 2) * self.scale
        x = x + self.down(h.transpose(1, 2))
        logits = self.head(x)
        return logits if labels is None else _loss(logits, labels)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_token_order_preserving_transpose_is_chunked(training):
    """With batch 2 the transposed intermediate [B, I, S] carries its tokens on dims 0 and 2,
    not next to each other: once refused, now a region."""
    torch.manual_seed(0)
    report = check_against_eager(TransposedScale(), vocab=V, batch=2, seq=37,
                                 training=training, options=EAGER)
    assert report.count("mlp") == 1 and not report.skipped, summary(report)


class PositionalMLP(nn.Module):
    """An MLP whose intermediate adds a positional table sliced to the sequence, or is scaled
    by a [1, S_max, I] parameter slice."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(V, D)
        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)
        shape = (64, I) if kind == "add" else (1, 64, I)
        self.pos = nn.Parameter(torch.randn(*shape) * 0.1)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels=None):
        x, seq = self.emb(ids), ids.shape[1]
        h = self.up(x)
        h = h + self.pos[:seq] if self.kind == "add" else h * self.pos[:, :seq]
        x = x + self.down(F.gelu(h))
        logits = self.head(x)
        return logits if labels is None else _loss(logits, labels)


@pytest.mark.parametrize("kind", ["add", "mul"])
def test_positional_table_slice_in_an_mlp(kind):
    """Batch 1: the table slice holds one row per token, a region input cut per chunk (it
    used to be passed whole: a broadcast error that lost every region of the graph). Batch
    2: the slice is shared by both rows, so the MLP is skipped with a reason and the head is
    still rewritten, with no warning."""
    torch.manual_seed(0)
    report = check_against_eager(PositionalMLP(kind), vocab=V, batch=1, seq=37,
                                 training=False, options=EAGER)
    assert report.count("mlp") == 1 and report.count("logits") == 1, summary(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_against_eager(PositionalMLP(kind), vocab=V, batch=2, seq=37,
                                     training=False, options=LENIENT)
    assert report.count("logits") == 1 and report.count("mlp") == 0, summary(report)
    assert [s.category for s in report.skipped] == ["unsupported"], summary(report)


class SwiGLUModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(V, D), nn.LayerNorm(D)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"gate": nn.Linear(D, I, bias=False), "up": nn.Linear(D, I, bias=False),
                           "down": nn.Linear(I, D, bias=False)}) for _ in range(2))
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels=None):
        x = self.norm(self.emb(ids))
        for b in self.blocks:
            x = x + b["down"](F.silu(b["gate"](x)) * b["up"](x))
        logits = self.head(x)
        return logits if labels is None else _loss(logits, labels)


def test_automatic_dynamic_shapes_after_static_compiles():
    """Train at 1 x 1000 for 3 micro-batches, evaluate, predict without labels, then train a
    fresh instance at 2 x 777: Dynamo recompiles with dynamic sizes, and the labels get size
    symbols of their own (the backend used to raise "cannot express the size s38")."""
    torch.manual_seed(0)
    model = SwiGLUModel()
    compiled = torch.compile(model, backend="mst", options=EAGER)
    for _ in range(3):
        ids = torch.randint(0, V, (1, 1000))
        labels = ids.clone()
        labels[:, :10] = -100
        compiled(ids, labels).backward()
    model.eval()
    with torch.no_grad():
        compiled(ids, labels)
        compiled(ids)
    fresh = SwiGLUModel()
    reference = copy.deepcopy(fresh)
    ids = torch.randint(0, V, (2, 777))
    labels = torch.where(torch.rand(2, 777) < 0.2, -100, ids)
    with mst_compile.report.collect_reports() as reports:
        loss = torch.compile(fresh, backend="mst", options=EAGER)(ids, labels)
        loss.backward()
    expected = reference(ids, labels)
    expected.backward()
    assert rel_err(loss, expected) <= 1e-5
    for (name, p), q in zip(fresh.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-4, name
    report = reports[-1]
    assert report.count("mlp") == 2 and report.count("loss") == 1, summary(report)
    assert all(r.symbolic for r in report.regions), summary(report)


def test_peft_lora_model_compiles_in_strict_mode():
    """LoRA's B projections (rank r -> d) widen their input but are the second half of a
    low-rank update, not a block: they used to be `unsupported` skips, failing strict mode."""
    peft = pytest.importorskip("peft")
    from tiny_models import hf_model

    model = peft.get_peft_model(hf_model("llama", 512), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    report = check_against_eager(model, vocab=512, hf=True, batch=2, seq=37, options=EAGER)
    assert report.count("mlp") == 2 and report.count("loss") == 1, summary(report)
    assert not report.skipped, summary(report)


class ClipGrad(torch.autograd.Function):
    """Identity forward, clipping backward: not linear in the incoming gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-1e-4, 1e-4)


class ClippedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels):
        return _loss(ClipGrad.apply(self.head(self.emb(ids))), labels)


def test_loss_form_only_where_the_backward_is_linear_in_the_tangent():
    """The loss form computes gradients with a unit tangent and scales them afterwards: with
    a clipping backward and a loss scaled outside the compiled code that is wrong, so this
    region gets the two-loop form."""
    torch.manual_seed(0)
    model = ClippedHead()
    compiled_model = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 37))
    labels = torch.randint(0, V, (2, 37))
    compiled = torch.compile(compiled_model, backend="mst", options=EAGER)
    (compiled(ids, labels) * 1000.0).backward()
    (model(ids, labels) * 1000.0).backward()
    report = mst_compile.last_report()
    (region,) = report.regions
    assert region.kind == "loss" and not region.grads_in_forward, summary(report)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        assert rel_err(q.grad, p.grad) <= 1e-4, name


def test_loss_form_is_kept_for_a_plain_loss():
    """The control: the same head without the clipping uses the loss form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V, bias=False))
    ids, labels = torch.randint(0, V, (2, 37)), torch.randint(0, V, (2, 37))
    compiled = torch.compile(lambda i, t: _loss(model(i), t), backend="mst", options=EAGER)
    (compiled(ids, labels) * 1000.0).backward()
    assert mst_compile.last_report().regions[0].grads_in_forward


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, I), nn.Linear(I, D)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return (x + self.down(self.drop(F.gelu(self.up(x))))).square().mean()


def test_dropout_mask_not_the_random_tensor_is_the_region_input():
    """Dropout's random tensor is computed outside the region (mst has no rule for a random
    op): the region must read the boolean mask (1 byte per element, what Inductor saves
    for the backward), not the float tensor it came from (4 bytes)."""
    torch.manual_seed(0)
    model = torch.compile(DropoutMLP(), backend="mst", options=EAGER)
    model(torch.randn(2, 37, D)).backward()
    report = mst_compile.last_report()
    assert report.count("mlp") == 1, summary(report)
    code = report.graphs[0].code
    operands = [line for line in code.splitlines()  # the chunks of the I-wide region input
                if "= split_with_sizes" in line and f", {I}]" in line]
    assert operands and all('"b8[' in line for line in operands), "\n".join(operands)


def test_dropout_matches_inductor_with_the_same_seed():
    """Dropout draws the same random numbers with and without mst (the random op stays
    whole), so mst matches plain Inductor exactly in loss and every gradient."""
    results = []
    for backend in ("inductor", "mst"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = DropoutMLP()
        x = torch.randn(2, 37, D)
        options = {"options": {"min_bytes": 0, "chunks": 3, "strict": True}} if backend == "mst" else {}
        torch.manual_seed(1)
        loss = torch.compile(model, backend=backend, **options)(x)
        loss.backward()
        results.append([loss] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert rel_err(b, a) <= 1e-5


def test_a_node_between_region_parts_must_agree_with_every_region_argument():
    """Closing a region over a path: the layout implied by the first region argument used to
    be taken without checking the others."""
    graph = torch.fx.Graph()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        a, b = graph.placeholder("a"), graph.placeholder("b")
        a.meta["val"] = b.meta["val"] = fake.from_tensor(torch.zeros(5, 2, 3))
        add = graph.call_function(torch.ops.aten.add.Tensor, (a, b))
        add.meta["val"] = a.meta["val"] + b.meta["val"]
    seq_major, batch_major = Chunked((0, 1)), Chunked((1, 0))
    assert _layout_from_region_args(add, {a: batch_major, b: batch_major}, 10) == batch_major
    assert _layout_from_region_args(add, {a: batch_major, b: seq_major}, 10) is None
    assert _layout_from_region_args(add, {a: seq_major, b: batch_major}, 10) is None
