import logging

import pytest
import torch

# torch's structured-trace logger (TORCH_TRACE artifacts, which mst also emits) does not
# propagate, and pytest (>= 8) attaches its log capture to every non-propagating logger: then
# `trace_structured` sees a handler, builds every artifact (slow) and each failure prints
# thousands of empty "DEBUG torch.__trace" lines. A propagating logger is left alone by pytest;
# without TORCH_TRACE its only own handler removes itself on first use.
_TRACE_LOG = logging.getLogger("torch.__trace")
_TRACE_LOG.propagate = True


# What the README tells users of HF gradient checkpointing: transformers >= 5.25 sets a context
# variable in every attention layer, a side effect Dynamo will not replay in a checkpoint's
# recompute unless told to skip it (else it breaks the graph at every checkpointed layer).
CHECKPOINT_SIDE_EFFECTS = (
    {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint") else {}
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache entries or recompile counters carried
    over, so `mst_compile.last_report()` belongs to the test that reads it, and no graph comes
    from Inductor's caches (tests that patch the passes need them to run; test_caches.py
    turns the caches on)."""
    _TRACE_LOG.propagate = True
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._dynamo.config.patch(CHECKPOINT_SIDE_EFFECTS):
        yield
    torch._dynamo.reset()
