"""A loss chunk's large products on the CPU are written into a reused buffer.

Each chunk of a vocabulary head makes its [rows, V] logits in a new buffer. On the CPU that
buffer comes from glibc, which maps every allocation over 32 MiB anew and unmaps it when
it is freed: every chunk faults in the pages of its logits again (the product then costs
about 40% more per token than into a buffer already mapped). Inductor's unchunked graph pays
it once for all tokens, mst's chunks once each. `ops.mm_in_workspace` writes the product into
a buffer kept between the calls, and Inductor then writes the logits gradient over it, as it
does over a new buffer (log_softmax.py); the loss form's loop lets the buffer go when it ends
(`ops.copy_after`). GPUs need none of this: the caching allocator reuses the freed block.
"""

from __future__ import annotations

import torch
from torch.fx import Graph

from .. import ops
from .symbolic import hint

aten = torch.ops.aten


def products_into_workspace(graph: Graph, min_bytes: int) -> int:
    """Make every CPU `mm` of `graph` (whose values are propagated) with an output of at least
    `min_bytes` write into a workspace; returns how many."""
    replaced = 0
    for node in graph.find_nodes(op="call_function", target=aten.mm.default):
        val = node.meta["val"]
        if val.device.type == "cpu" and hint(val.numel()) * val.element_size() >= min_bytes:
            node.target = ops.mm_in_workspace._opoverload
            replaced += 1
    return replaced

