"""The backend's public surface: the entry point, and the failure policy (docs/design.md, "Failure policy")."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from numerics import check_against_eager, rel_err, summary
from tiny_models import tiny_swiglu

import mst_compile
import mst_compile.backend
from mst_compile.passes import MstSkip

VOCAB = 512
STRICT = {"strict": True, "min_bytes": 0, "chunks": 3}
LENIENT = {"strict": False, "min_bytes": 0, "chunks": 3}


class TinyMLP(torch.nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


@torch.library.custom_op("mst_test::opaque_up", mutates_args=())
def opaque_up(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A widening projection mst has no token rule for (like MoE experts' grouped matmul)."""
    return x @ weight.t()


@opaque_up.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class OpaqueMLP(TinyMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(opaque_up(x, self.up.weight)))


class Boom(RuntimeError):
    pass


def _chain(err: BaseException) -> list[BaseException]:
    """err, its Dynamo inner exception, causes and contexts."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return seen


def _run_mlp(options, *, dynamic=False, model_class=TinyMLP):
    torch.manual_seed(0)
    model = model_class()
    x = torch.randn(2, 24, 16)
    compiled = torch.compile(model, backend="mst", options=options, dynamic=dynamic,
                             fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    return out, ref


# ---- entry point -------------------------------------------------------------------------

ENTRY_POINT_SCRIPT = textwrap.dedent("""
    import sys
    from importlib.metadata import entry_points
    import torch
    import torch.nn.functional as F

    assert "mst_compile" not in sys.modules
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "mst"]
    assert len(eps) == 1, eps

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(16, 64)
            self.down = torch.nn.Linear(64, 16)
        def forward(self, x):
            return x + self.down(F.gelu(self.up(x)))

    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        out = torch.compile(m, backend="mst",
                            options={"chunks": 3, "min_bytes": 0, "strict": True})(x)
        ref = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert "mst_compile" in sys.modules, "the backend did not come from mst_compile"

    import mst_compile  # the same module the entry point loaded: its report is there
    report = mst_compile.last_report()
    assert report is not None
    assert report.count("mlp", "inference") == 1, str(report)
    assert report.regions[0].chunks == 3, str(report)

    # importing the package registers nothing twice: a second compile still works
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend="mst", options={"chunks": 2, "min_bytes": 0, "strict": True})(x)
    assert mst_compile.last_report().regions[0].chunks == 2
    print("ENTRY POINT OK")
""")


def test_entry_point_without_import():
    """torch.compile(model, backend="mst") resolves through the torch_dynamo_backends entry
    point in a fresh interpreter that never imported mst_compile."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_LOGS", "TORCH_TRACE"))}
    proc = subprocess.run([sys.executable, "-c", ENTRY_POINT_SCRIPT], check=False,
                          capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ENTRY POINT OK" in proc.stdout


# ---- failure policy: an error inside the mst passes --------------------------------------

@pytest.fixture
def broken_passes(monkeypatch):
    """Make the mst passes raise, at the name backend.py calls them by. Counts the calls, so
    a test can tell that the broken pass was really reached."""
    calls = []

    def run_mst_passes(gm, options):
        calls.append(gm)
        raise Boom("injected failure in the mst passes")

    monkeypatch.setattr(mst_compile.backend, "run_mst_passes", run_mst_passes)
    monkeypatch.setattr(mst_compile.backend, "_warned_fallback", False)
    return calls


def test_pass_error_falls_back_to_inductor_when_not_strict(broken_passes):
    """strict=False: the graph is compiled by plain Inductor, with a warning; training numbers
    (loss and every gradient) are still exact, and the report shows nothing rewritten."""
    with pytest.warns(UserWarning, match="falling back to plain Inductor") as record:
        report = check_against_eager(tiny_swiglu(VOCAB), vocab=VOCAB, training=True, batch=2,
                                     seq=37, options=LENIENT)
    assert broken_passes, "the injected failure was never reached"
    assert any("injected failure" in str(w.message) for w in record)
    assert report.regions == [] and report.skipped == [], summary(report)


def test_pass_error_warns_once(broken_passes):
    with pytest.warns(UserWarning, match="falling back"):
        out, ref = _run_mlp(LENIENT)
    assert rel_err(out, ref) <= 1e-5
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a second warning would raise here
        out, ref = _run_mlp(LENIENT)
    assert rel_err(out, ref) <= 1e-5
    assert len(broken_passes) == 2


def test_pass_error_raises_when_strict(broken_passes):
    with pytest.raises(Exception) as info:
        _run_mlp(STRICT)
    assert broken_passes, "the injected failure was never reached"
    assert any(isinstance(e, Boom) for e in _chain(info.value)), repr(info.value)


# ---- failure policy: a region mst cannot chunk -------------------------------------------

def test_unsupported_region_is_skipped_when_not_strict():
    """A widening op with no token rule (here an opaque custom op) cannot be chunked: it is
    skipped with a reason naming it, category "unsupported", no exception, numbers right."""
    out, ref = _run_mlp(LENIENT, model_class=OpaqueMLP)
    assert rel_err(out, ref) <= 1e-5
    report = mst_compile.last_report()
    text = summary(report)
    assert report.regions == [], text
    unsupported = [s for s in report.skipped if s.category == "unsupported"]
    assert len(unsupported) == 1 and "mst_test.opaque_up" in unsupported[0].reason, text


def test_dynamic_shapes_non_amplifier_not_reported():
    """Under dynamic shapes only amplifiers are reported as unsupported: a square projection
    (nothing mst would ever chunk) is not, so strict mode compiles a graph that has nothing
    to chunk. (Regression: every mm/addmm used to be reported and strict raised MstSkip.)"""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    x = torch.randn(2, 24, 16)
    compiled = torch.compile(model, backend="mst", options=STRICT, dynamic=True, fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    assert rel_err(out, ref) <= 1e-5
    report = mst_compile.last_report()
    assert report.skipped == [], summary(report)


def test_unsupported_region_raises_when_strict():
    with pytest.raises(Exception) as info:
        _run_mlp(STRICT, model_class=OpaqueMLP)
    skips = [e for e in _chain(info.value) if isinstance(e, MstSkip)]
    assert skips and "opaque_up" in str(skips[0]), repr(info.value)


def test_tiny_mlp_is_rewritten():
    """The control for the tests above: without injected failures or an opaque op the same
    MLP is one rewritten region with the requested chunks."""
    out, ref = _run_mlp(STRICT)
    assert rel_err(out, ref) <= 1e-5
    report = mst_compile.last_report()
    assert report.count("mlp", "inference") == 1, summary(report)
    assert report.regions[0].chunks == 3, summary(report)
    assert report.regions[0].tokens == 48, summary(report)


# ---- failure policy: an error inside one region ------------------------------------------

class TwoMLPs(torch.nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.first, self.second = TinyMLP(hidden), TinyMLP(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def _two_mlps(options):
    torch.manual_seed(0)
    model = TwoMLPs()
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        out = torch.compile(model, backend="mst", options=options, fullgraph=True)(x)
        return out, model(x)


@pytest.fixture
def first_rewrite_fails(monkeypatch):
    """The first region's rewrite raises after inserting part of its loop."""
    real = mst_compile.passes.rewrite.emit_loop
    calls = []

    def emit_loop(graph, plan, *args):
        calls.append(plan.region.seed.name)
        if len(calls) == 1:
            real(graph, plan, *args)  # half done: the graph holds its nodes
            raise Boom("injected failure in one region's rewrite")
        return real(graph, plan, *args)

    monkeypatch.setattr(mst_compile.passes.rewrite, "emit_loop", emit_loop)
    return calls


def test_error_in_one_region_skips_only_that_region(first_rewrite_fails):
    """The failed region is rolled back and reported as an internal error, with a warning
    that names it and its source line; the other region is rewritten; numbers exact."""
    with pytest.warns(UserWarning, match="internal error in the region grown from") as record:
        out, ref = _two_mlps(LENIENT)
    assert rel_err(out, ref) <= 1e-5
    report = mst_compile.last_report()
    assert report.count("mlp") == 1, summary(report)
    (skip,) = report.skipped
    assert skip.category == "internal_error" and "injected failure" in skip.reason
    message = str(next(w.message for w in record if "internal error" in str(w.message)))
    assert skip.seed in message and "test_backend.py" in message


def test_error_in_one_region_raises_when_strict(first_rewrite_fails):
    with pytest.raises(Exception) as info:
        _two_mlps(STRICT)
    assert any(isinstance(e, Boom) for e in _chain(info.value)), repr(info.value)


def test_error_while_growing_one_region_skips_only_that_region(monkeypatch):
    real = mst_compile.passes.analysis.grow_region
    seeds = []

    def grow_region(seed, *args):
        seeds.append(seed)
        if len(seeds) == 2:
            raise Boom("injected failure in the analysis")
        return real(seed, *args)

    monkeypatch.setattr(mst_compile.passes.analysis, "grow_region", grow_region)
    with pytest.warns(UserWarning, match="internal error"):
        out, ref = _two_mlps(LENIENT)
    assert rel_err(out, ref) <= 1e-5
    report = mst_compile.last_report()
    assert report.count("mlp") == 1 and report.skipped[0].category == "internal_error"
    assert report.skipped[0].seed == seeds[1].name


class SqueezingMLP(TinyMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)).unsqueeze(-1).squeeze())


def test_a_chunk_that_disagrees_with_its_layout_is_caught(monkeypatch):
    """Without naming its dims in a chunk, `squeeze()` would also drop the chunk's size-1
    batch dim ([1, n, I, 1] -> [n, I]): the layout check sees the shape its layout does not
    imply and skips the region as an internal error instead of compiling a wrong graph."""
    from mst_compile.passes.rules import OPS

    for op, facts in list(OPS.items()):
        if facts.squeezes:
            monkeypatch.setitem(OPS, op, dataclasses.replace(facts, squeezes=False))
    with pytest.warns(UserWarning, match="internal error"):
        out, ref = _run_mlp(LENIENT, model_class=SqueezingMLP)
    assert rel_err(out, ref) <= 1e-5
    report = mst_compile.last_report()
    (skip,) = report.skipped
    assert skip.category == "internal_error" and "LayoutMismatch" in skip.reason, summary(report)
    assert "its layout" in skip.reason
    monkeypatch.undo()
    torch._dynamo.reset()
    out, ref = _run_mlp(STRICT, model_class=SqueezingMLP)
    assert rel_err(out, ref) <= 1e-5 and mst_compile.last_report().count("mlp") == 1


def test_inductor_fuses_no_independent_kernels_in_mst_graphs(monkeypatch):
    """While mst's graphs are lowered, Inductor's choices refuse every horizontal fusion (two
    kernels neither of which reads the other's output: fused, the earlier one's inputs live
    until the later one runs); the user's own compiles keep Inductor's choices."""
    from torch._inductor.virtualized import V

    seen = []
    real = mst_compile.backend.compile_fx

    def compile_fx(*args, **kwargs):
        seen.append(V.choices.can_fuse_horizontal(None, None, None, 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(mst_compile.backend, "compile_fx", compile_fx)
    before = type(V.choices)
    torch._dynamo.reset()
    model = TinyMLP()
    torch.compile(model, backend="mst", options=STRICT)(torch.randn(2, 40, 16)).sum().backward()
    assert seen == [False], seen
    assert type(V.choices) is before
