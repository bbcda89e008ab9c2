"""The `mst` torch.compile backend: Inductor with the mst passes on its ATen graphs.

Registered through the `torch_dynamo_backends` entry point only (pyproject.toml): a second
registration at import time would trip newer torch's duplicate check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import report_store
from .declare import declarations_key
from .options import MstOptions
from .passes import run_mst_passes
from .passes.region import mark_weights, weight_inputs
from .report import INTERNAL_ERROR, GraphReport, Report, SkippedRegion, new_report
from .trace import log, log_graph_before, log_graph_report

_PACKAGE_DIR = pathlib.Path(__file__).parent
_warned_fallback = False
# Inductor's own auto-chunker (torch >= 2.11) would chunk the graphs we already rewrote.
_NO_AUTO_CHUNKER = (
    {"auto_chunker.enable": False} if hasattr(torch._inductor.config, "auto_chunker") else {}
)


@functools.cache
def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


class MstPassError(RuntimeError):
    """An unexpected error inside the mst passes (not strict): compile without them."""


class MstJointPass(CustomGraphPass):
    """Inductor's `joint_custom_pre_pass` hook: sees the joint graph of a training step and
    the graph of an inference step, at ATen level, before the partitioner."""

    def __init__(self, options: MstOptions, report: Report, gm: torch.fx.GraphModule,
                 example_inputs: Sequence[Any]):
        self.options = options
        self.report = report
        self.note = ""  # said of every graph of this backend call
        # which inputs of AOTAutograd's graphs are the model's weights (not the tensors)
        self.inputs, self.weights = weight_inputs(gm, list(example_inputs))

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None or gm.meta.get("produced_by_mst"):
            return
        log_graph_before(lambda: gm.print_readable(print_output=False))
        mark_weights(graph, self.inputs, self.weights)
        try:
            graph_report = run_mst_passes(gm, self.options)
        except Exception as e:
            if self.options.strict:
                raise
            raise MstPassError(f"{type(e).__name__}: {e}") from e
        log_graph_report(graph_report)
        self.report.graphs.append(graph_report)

    def uuid(self) -> str:
        return f"mst-{_source_hash()}-{self.options!r}-{declarations_key()}"


def mst_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | MstOptions | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """torch.compile(model, backend="mst", options={...}) or (..., mode="max-autotune")."""
    if kwargs:
        raise ValueError(f"unknown arguments to the mst backend: {sorted(kwargs)}; pass options={{...}}")
    opts = MstOptions.from_dict(options)
    if mode is not None:
        opts = dataclasses.replace(opts, mode=mode)
        opts.validate()
    report = new_report()
    compile_graph = _compile_eager if opts.compiler == "eager" else _compile_inductor
    joint_pass = MstJointPass(opts, report, gm, example_inputs)
    try:
        compiled = compile_graph(gm, example_inputs, opts, joint_pass)
    except MstPassError as e:
        # Our own failure outside any one region (an error inside a region skips that region)
        _warn_fallback(f"falling back to plain Inductor for a graph: {e!r}")
        log.warning("mst passes failed; compiling this graph without them", exc_info=True)
        report.graphs.clear()
        return compile_graph(gm, example_inputs, opts, None)
    except Exception as e:
        # The last line of defence: Inductor (or the partitioner) failed on a graph mst
        # rewrote. Compile it again as it was; the report lists the regions dropped.
        # Dynamo's control flow (restarts, skips) passes through, as does strict mode.
        if opts.strict or isinstance(e, _DYNAMO_CONTROL_FLOW) or not report.regions:
            raise
        dropped = _drop_rewrites(report, e)
        _warn_fallback(f"compiling a graph without its rewrites ({dropped}): the compiler "
                       f"failed on the rewritten graph: {type(e).__name__}: {e}")
        log.debug("compile failed on an mst-rewritten graph; compiling it as it was",
                  exc_info=True)
        compiled = compile_graph(gm, example_inputs, opts, None)
    if _split_by_ddp_optimizer():
        _warn_once(DDP_SPLIT)
        joint_pass.note = DDP_SPLIT
    if _new_break_at_checkpoint():
        _warn_once(CHECKPOINT_BREAK)
        joint_pass.note = "; ".join(n for n in (joint_pass.note, CHECKPOINT_BREAK) if n)
    key = report_store.graph_key(gm, example_inputs, joint_pass.uuid())
    if report.graphs:
        report_store.store(key, report.graphs)
    else:  # a cache hit: no graph was traced, so the pass did not run
        report.graphs.extend(report_store.load(key) or [
            GraphReport("unknown", from_cache=True, note=report_store.NOT_FOUND)])
    for graph in report.graphs:
        graph.note = "; ".join(n for n in (graph.note, joint_pass.note) if n)
    return compiled


# Dynamo's control flow: raised from inside a backend to make Dynamo trace again or skip
_DYNAMO_CONTROL_FLOW = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame)


def _warn_fallback(message: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn(f"mst_compile: {message}", stacklevel=3)
        _warned_fallback = True


def _drop_rewrites(report: Report, error: Exception) -> str:
    """Turn every region `report` says was rewritten into an `internal_error` skip with the
    compiler's error; returns a short list of them."""
    reason = f"the compiler failed on the rewritten graph: {type(error).__name__}: {error}"
    dropped = []
    for graph in report.graphs:
        for region in graph.regions:
            graph.skipped.append(SkippedRegion(region.seed, region.mode, INTERNAL_ERROR,
                                               reason, "\n".join(region.stack_traces)))
            dropped.append(f"{region.kind} {region.seed}")
        graph.regions.clear()
        graph.code = ""
    return ", ".join(dropped)


DDP_SPLIT = (
    "Dynamo's DDP optimizer split this graph at gradient-bucket boundaries before mst saw it: "
    "a block cut by a boundary is not chunked (and not reported); set "
    "torch._dynamo.config.optimize_ddp = False to compile whole graphs"
)
CHECKPOINT_BREAK = (
    "Dynamo broke the graph at a higher-order op (activation checkpointing) whose forward has "
    "a Python side effect (transformers >= 5.25 sets a context variable in every attention "
    "layer): the checkpointed code runs uncompiled and mst does not see it; set "
    "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True before "
    "compiling to compile it (the side effect is then not replayed in the recompute)"
)
_warned: set[str] = set()
_breaks_seen = 0


def _new_break_at_checkpoint() -> bool:
    """Whether Dynamo broke a graph at a checkpointed region's side effect since the last
    backend call (its graph-break counters are per process)."""
    global _breaks_seen
    breaks = sum(n for reason, n in torch._dynamo.utils.counters["graph_break"].items()
                 if reason.startswith("HOP:") and "side effect" in reason.split("\n")[0])
    new, _breaks_seen = breaks > _breaks_seen, breaks
    return new


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"mst_compile: {message}", stacklevel=3)


def _split_by_ddp_optimizer() -> bool:
    """Whether this backend call compiles one piece of a graph Dynamo's DDPOptimizer split."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_DDP_OPTIMIZER_FILE):
            return True
        frame = frame.f_back
    return False


_DDP_OPTIMIZER_FILE = os.path.join("_dynamo", "backends", "distributed.py")


def _compile_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    opts: MstOptions,
    joint_pass: MstJointPass | None,
) -> Callable[..., Any]:
    """Inductor with the user's mode and settings, and the mst pass on its joint graphs."""
    patches = {
        **(torch._inductor.list_mode_options(opts.mode) if opts.mode else {}),
        **opts.inductor,
        **_NO_AUTO_CHUNKER,
    }
    if joint_pass is None:
        return compile_fx(gm, example_inputs, config_patches=patches)
    patches["joint_custom_pre_pass"] = joint_pass
    # The backward graph is compiled now, not at the first backward: a failure on a
    # rewritten graph is caught here, where the graph can still be compiled as it was; and
    # every subgraph is lowered inside this call, where the patch below applies.
    with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), \
            _subgraphs_without_donated_inputs(), _no_horizontal_fusion():
        return compile_fx(gm, example_inputs, config_patches=patches)


class _NoHorizontalFusion:
    """Inductor's heuristics as they are, except that two kernels neither of which reads
    the other's output are not fused: the fused kernel runs where the later of the two would,
    and every buffer the earlier one reads lives until then (decision 36)."""

    def __init__(self, choices: Any) -> None:
        self._choices = choices

    def __getattr__(self, name: str) -> Any:
        return getattr(self._choices, name)

    @staticmethod
    def can_fuse_horizontal(*args: Any) -> bool:
        return False


@contextlib.contextmanager
def _no_horizontal_fusion() -> Iterator[None]:
    """While mst's graphs are lowered, Inductor fuses no two independent kernels."""
    from torch._inductor.virtualized import V

    choices = V.choices
    if not hasattr(choices, "can_fuse_horizontal"):  # an Inductor without the hook
        yield
        return
    with V.set_choices_handler(_NoHorizontalFusion(choices)):
        yield


@contextlib.contextmanager
def _subgraphs_without_donated_inputs() -> Iterator[None]:
    """Inductor lowers a subgraph called from a backward graph with the backward graph's
    donated-input positions, so the subgraph's own inputs at those positions (a chunk's
    weight-gradient accumulators) are overwritten in place, wrongly. While mst compiles,
    subgraphs are lowered with no donated inputs (the backward graph itself keeps reusing its
    saved activations); other compiles are left alone. Where this torch's Inductor has no
    such lowering, donated buffers are turned off for mst's graphs instead."""
    graph = torch._inductor.graph
    lowering = getattr(graph, "SubgraphLowering", None)
    if lowering is None or not hasattr(graph, "get_donated_idxs"):
        with torch._functorch.config.patch(donated_buffer=False):
            yield
        return
    original = lowering.__init__

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.bw_donated_idxs = []  # a subgraph's inputs are not the backward graph's

    lowering.__init__ = __init__
    try:
        yield
    finally:
        lowering.__init__ = original


def _compile_eager(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    opts: MstOptions,
    joint_pass: MstJointPass | None,
) -> Callable[..., Any]:
    """`compiler="eager"`: the ATen graphs Inductor would see (its decompositions, the same
    partitioner), rewritten by the mst passes, then run op by op instead of compiled. Tells an
    mst bug from an Inductor bug, and checks a rewrite in a fraction of a compile's time."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def partition(joint: torch.fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        if joint_pass is not None:
            joint_pass(joint.graph)
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    def inference(graph_module: torch.fx.GraphModule, inputs: Sequence[Any]):
        if joint_pass is not None:
            joint_pass(graph_module.graph)
        return make_boxed_func(graph_module.forward)

    def run(graph_module: torch.fx.GraphModule, inputs: Sequence[Any]):
        return make_boxed_func(graph_module.forward)

    return aot_autograd(
        fw_compiler=run, bw_compiler=run, inference_compiler=inference,
        partition_fn=partition, decompositions=select_decomp_table(),
    )(gm, example_inputs)
