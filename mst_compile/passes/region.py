"""A region: the values of one block the rewrite runs mini-sequence by mini-sequence, and
why a candidate is not one. Every pass can import these without importing the analysis."""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from ..report import Kind, SkipCategory
from .layout import Layout
from .rules import element_size, per_token_numel
from .symbolic import Size, is_size_node, same_shape

DECLARED_KINDS = (Kind.MOE, Kind.BLOCK)  # the kinds of declared token-wise modules (blocks.py)


class CannotChunk(Exception):
    """A candidate region that cannot be rewritten; the message is the user-facing reason,
    `category` why (a SkipCategory other than INTERNAL_ERROR)."""

    def __init__(self, reason: str, category: SkipCategory = SkipCategory.UNSUPPORTED):
        super().__init__(reason)
        self.category = category


@dataclasses.dataclass
class Region:
    seed: Node
    tokens: Size  # a number, or an expression of size symbols (symbolic.py)
    input_width: int  # per-token elements of the amplifier's input
    layouts: dict[Node, Layout]  # every node of the region
    forward: list[Node]  # region nodes that do not depend on a tangent, in graph order
    backward: list[Node]  # region nodes that do, in graph order
    inputs: dict[Node, Layout]  # values from outside the region, Chunked or Replicated
    kind: Kind = Kind.PROJECTION

    @property
    def declared(self) -> bool:
        """A declared token-wise module (blocks.py): its inside is Scaled."""
        return self.kind in DECLARED_KINDS

    @property
    def nodes(self) -> list[Node]:
        return self.forward + self.backward

    def outputs(self, part: list[Node]) -> list[Node]:
        """Nodes of `part` whose value is used outside the region (a size read from it is
        not a use: the rewrite reads it elsewhere)."""
        return [n for n in part
                if any(u not in self.layouts and not is_size_node(u) for u in n.users)]

    def is_wide(self, node: Node) -> bool:
        layout = self.layouts.get(node)
        return per_token_numel(node, layout, self.tokens) > self.input_width if layout else False

    def bytes_per_token(self) -> int:
        """Bytes per token of the wide forward values: what unchunked training keeps alive."""
        part = self.forward if self.forward else self.backward
        return sum(
            per_token_numel(n, self.layouts[n], self.tokens) * element_size(n)
            for n in part
            if self.is_wide(n)
        )


@dataclasses.dataclass
class Candidate:
    """An amplifier that did not become a region, and why; `error` is the exception of an
    internal error (strict mode raises it)."""

    seed: Node
    reason: str
    category: SkipCategory
    error: Exception | None = None


# A graph input the backend knows to be a model weight (a parameter): it holds no tokens,
# whatever its shape (`mark_weights`)
WEIGHT = "mst_weight"


def weight_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> tuple[int, dict[int, list]]:
    """What AOTAutograd's graphs of `gm` take: the module's own parameters and buffers, then
    the backend's example inputs, in order (then the tangents). Returns their count and, for
    each that is a weight, its position and shape (None: the module's own)."""
    own = len(list(gm.parameters())) + len(list(gm.buffers()))
    weights: dict[int, list | None] = dict.fromkeys(range(own))
    for i, example in enumerate(example_inputs):
        if isinstance(example, torch.nn.Parameter):
            weights[own + i] = list(example.shape)
    return own + len(example_inputs), weights


def mark_weights(graph: Graph, count: int, weights: dict[int, list | None]) -> None:
    """Mark the inputs of `graph` that are the model's weights (`weight_inputs`), where the
    count of its inputs and each one's shape agree."""
    inputs = [n for n in graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    if len(inputs) < count:
        return
    for k, shape in weights.items():
        val = inputs[k].meta.get("val")
        if shape is None or (isinstance(val, torch.Tensor) and same_shape(val.shape, shape)):
            inputs[k].meta[WEIGHT] = True


def tangent_dependent(graph: Graph) -> set[Node]:
    """Nodes computed from a tangent input: the backward part of a joint graph."""
    result: set[Node] = set()
    for node in graph.nodes:
        is_tangent = node.op == "placeholder" and node.name.startswith("tangents")
        if is_tangent or any(a in result for a in node.all_input_nodes):
            result.add(node)
    return result


# What activation checkpointing marks on each forward node of a checkpointed block: the
# partitioner recomputes those in the backward instead of saving them.
CHECKPOINT_TAGS = ("recompute", "ac_graph_id")


def checkpoint_tags(region: Region) -> dict | None:
    """The checkpoint tags of a region inside one checkpointed block (its tagged forward
    nodes all carry the same), else None."""
    tags = {tuple(n.meta.get(key) for key in CHECKPOINT_TAGS) for n in region.forward}
    tags.discard((None, None))  # the parts of the backward formulas that read only forward values
    return dict(zip(CHECKPOINT_TAGS, tags.pop())) if len(tags) == 1 else None
