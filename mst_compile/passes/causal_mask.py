"""An attention mask that is provably causal is not made: attention runs causal instead.

transformers builds the attention mask of a causal LM as a `[batch, 1, S, S]` tensor whenever
it cannot rule out packed sequences or padding (under torch.compile with gradient
checkpointing, or with an attention mask passed): `kv_position <= q_position`,
`q_document == kv_document` for documents found where the position ids restart, and
`padding[b, kv]`, turned into a float mask (0 / -inf) and passed to SDPA, which then cannot
run causal. At 32K tokens that mask is a 4 GB tensor the step keeps.

This pass proves the mask's form on the graph and has SDPA (forward and backward) run causal
without it: with no mask at all when it is purely causal, or, where it also holds per-key
terms (padding), with the `[batch, 1, 1, S]` mask of those terms only, which the CPU kernel
applies together with causality exactly as the combined mask (forward and backward, fully
masked rows included). The mask's ops are then dead.

The proof: the mask is `where(B, 0, -inf)` or the boolean B; B is an AND of terms, each a
constant True, a comparison `A[b, kv] op A'[b, q]` of two per-token values, or a boolean
`P[b, kv]` (a per-key term), each read at broadcast indices that are the batch, query and key
positions (`arange`s unsqueezed to `[B, 1, 1, 1]`, `[1, 1, S, 1]`, `[1, 1, 1, S]`). The
per-token values of comparisons are computed from no graph input: they are evaluated (`[B,
S]`, cheap) and each comparison read as what it is: `kv <= q` (the causal term), or true
everywhere (one document per row), or anything else (the mask is left as it is). Only static
shapes: the evaluation is the proof at the compiled length.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx import Graph, Node

from .graph import ancestors, fill_fake_values
from .rules import facts_of, shape_of
from .symbolic import is_symbolic

aten = torch.ops.aten
COMPARISONS = {aten.le.Tensor: "le", aten.lt.Tensor: "lt", aten.ge.Tensor: "ge",
               aten.gt.Tensor: "gt", aten.eq.Tensor: "eq"}


def causal_attention(graph: Graph) -> list[str]:
    """Make every SDPA whose mask is provably causal (and a per-key mask: padding) run causal
    without the [S, S] mask; returns a line per attention changed, for the report."""
    notes = []
    for node in list(graph.nodes):
        facts = facts_of(node)
        if facts.attention != "forward" or facts.mask_arg is None:
            continue
        mask = _mask_arg(node, facts.mask_arg)
        keys = causal_form(mask) if mask is not None else None
        if keys is None or (keys and not facts.per_key_mask):
            continue
        with graph.inserting_before(node):
            key_mask = _per_key_mask(graph, keys, node.args[0].meta["val"].dtype) if keys else None
        for user in [node, *_backwards_of(mask)]:
            _run_causal(user, facts_of(user).causal_arg, facts_of(user).mask_arg, key_mask)
        kept = f", with the per-key mask {key_mask.name}" if key_mask is not None else ""
        notes.append(f"attention mask {mask.name} {list(shape_of(mask))} is causal{kept}: "
                     f"{node.name} runs causal without it")
        _erase_unused(mask)
    return notes


def _per_key_mask(graph: Graph, keys: list[Node], dtype: torch.dtype) -> Node:
    """The float mask (0 / -inf) of the AND of the per-key terms, [batch, 1, 1, S]."""
    both = keys[0]
    for term in keys[1:]:
        both = graph.call_function(aten.bitwise_and.Tensor, (both, term))
    device = keys[0].meta["val"].device
    zero, minus_inf = (graph.call_function(aten.full.default, ([], value), {
        "dtype": dtype, "device": device, "pin_memory": False}) for value in (0.0, -math.inf))
    mask = graph.call_function(aten.where.self, (both, zero, minus_inf))
    fill_fake_values(graph.owning_module, [n for n in graph.nodes if "val" not in n.meta
                                           and n.op == "call_function"])
    return mask


def _erase_unused(mask: Node) -> None:
    """Erase the mask and what only it read."""
    graph = mask.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(ancestors([mask]) | {mask}, key=order.__getitem__, reverse=True):
        if not node.users and node.op == "call_function":
            graph.erase_node(node)


def _mask_arg(node: Node, where: str | int) -> Node | None:
    value = node.kwargs.get(where) if isinstance(where, str) else (
        node.args[where] if len(node.args) > where else None)
    return value if isinstance(value, Node) else None


def _backwards_of(mask: Node) -> list[Node]:
    return [u for u in mask.users
            if facts_of(u).attention == "backward" and facts_of(u).mask_arg is not None]


def _run_causal(node: Node, causal_pos: int, mask_at: str | int, key_mask: Node | None) -> None:
    args, kwargs = list(node.args), dict(node.kwargs)
    while len(args) <= causal_pos:  # defaults up to is_causal (dropout_p = 0.0 before it)
        args.append(0.0 if len(args) == causal_pos - 1 else None)
    args[causal_pos] = True
    if isinstance(mask_at, str):
        kwargs.pop(mask_at, None)
        if key_mask is not None:
            kwargs[mask_at] = key_mask
    else:
        args[mask_at] = key_mask
    node.args, node.kwargs = tuple(args), kwargs


def causal_form(mask: Node) -> list[Node] | None:
    """If `mask` (an SDPA mask: boolean, or float 0 / -inf) is exactly `kv <= q` AND per-key
    terms (a padding mask `P[b, kv]`, [batch, 1, 1, S]) for every batch and head: those terms
    (none: purely causal). Otherwise None."""
    shape = shape_of(mask)
    if len(shape) != 4 or any(is_symbolic(s) for s in shape) or shape[-1] != shape[-2]:
        return None
    boolean = _boolean_of(mask)
    if boolean is None:
        return None
    terms = _and_terms(boolean)
    with unset_fake_temporarily():  # the pass runs under the compile's fake mode
        kinds = [_term_kind(t, shape[-1]) for t in terms]
    if "causal" not in kinds or not all(k in ("causal", "true", "key") for k in kinds):
        return None
    return [t for t, k in zip(terms, kinds) if k == "key"]


def _boolean_of(mask: Node) -> Node | None:
    """The boolean mask behind `mask`: itself, or B of `where(B, 0, -inf)` (through views)."""
    node = _through_views(mask)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype == torch.bool:
        return node
    if node.target is aten.where.self and _number(node.args[1]) == 0.0 \
            and _number(node.args[2]) == -math.inf:
        return _through_views(node.args[0])
    return None


def _through_views(node: Node) -> Node:
    while node.op == "call_function" and node.target in (
            aten.expand.default, aten.alias.default, aten.clone.default):
        node = node.args[0]
    return node


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Node) and value.target in (aten.scalar_tensor.default, aten.full.default):
        number = value.args[0] if value.target is aten.scalar_tensor.default else value.args[1]
        return float(number) if isinstance(number, (int, float)) else None
    return None


def _and_terms(node: Node) -> list[Node]:
    node = _through_views(node)
    if node.target in (aten.bitwise_and.Tensor, aten.logical_and.default):
        return [t for a in node.args[:2] for t in _and_terms(a)]
    return [node]


def _term_kind(term: Node, length: int) -> str | None:
    """"true" (true everywhere), "causal" (`kv <= q`), "key" (a boolean `P[b, kv]`, the same
    for every query: a padding mask), or None (anything else)."""
    if _number(term) == 1.0 and term.meta["val"].dtype == torch.bool:
        return "true"
    if term.target is aten.index.Tensor and term.meta["val"].dtype == torch.bool \
            and _positions_read(term, length) == "kv":
        return "key"
    op = COMPARISONS.get(term.target)
    if op is None:
        return None
    left, right = (_read_at_positions(a, length) for a in term.args[:2])
    if left is None or right is None:
        return None
    (values_l, axis_l), (values_r, axis_r) = left, right
    if axis_l == axis_r:
        return None
    if op == "eq" and _constant_per_row(values_l) and _constant_per_row(values_r) \
            and torch.equal(values_l[:, :1], values_r[:, :1]):
        return "true"  # one document per row
    if not (_is_arange(values_l) and _is_arange(values_r)):
        return None
    # the terms compare key position with query position, in either order
    kv_left = axis_l == "kv"
    causal = {("le", True), ("ge", False)}  # kv <= q, q >= kv
    return "causal" if (op, kv_left) in causal else None


def _read_at_positions(node: Node, length: int) -> tuple[torch.Tensor, str] | None:
    """(A evaluated [batch, S], "q" or "kv") if `node` is `A[b, position]` broadcast over the
    query (dim 2) or key (dim 3) positions, with A computed from no graph input; or the
    positions themselves (A = arange)."""
    axis = _positions_read(node, length)
    if axis is None:
        axis = _position_axis(_constant_value(node), length)
        return (torch.arange(length).unsqueeze(0), axis) if axis is not None else None
    values = _constant_value(node.args[0])
    if values is None or values.dim() != 2:
        return None
    return values, axis


def _position_axis(value: torch.Tensor | None, length: int) -> str | None:
    """"q" or "kv" if `value` is `arange(S)` along the query (dim 2) or key (dim 3) dim of
    a broadcast [1, 1, S, 1] or [1, 1, 1, S]."""
    if value is None or not torch.equal(value.flatten(), torch.arange(length)):
        return None
    return {(1, 1, length, 1): "q", (1, 1, 1, length): "kv"}.get(tuple(value.shape))


def _positions_read(node: Node, length: int) -> str | None:
    """"q" or "kv" if `node` is `A[b, position]` of a [batch, S] table A, read at the batch
    index broadcast over dim 0 and the query (dim 2) or key (dim 3) positions."""
    if node.target is not aten.index.Tensor or len(node.args[1]) != 2:
        return None
    table, (batch_index, position_index) = node.args[0], node.args[1]
    table_shape = shape_of(table) if isinstance(table, Node) else None
    if table_shape is None or len(table_shape) != 2 or table_shape[1] != length:
        return None
    batch = _constant_value(batch_index)
    if batch is None or list(batch.shape) != [table_shape[0], 1, 1, 1] or not torch.equal(
            batch.flatten(), torch.arange(table_shape[0])):
        return None
    return _position_axis(_constant_value(position_index), length)


def _constant_value(node: object) -> torch.Tensor | None:
    """The value of `node` if it is computed from no graph input (evaluated, on the CPU);
    None otherwise, or where a value would be larger than a per-token table."""
    if not isinstance(node, Node):
        return None
    upstream = ancestors([node]) | {node}
    if any(n.op != "call_function" for n in upstream):
        return None
    if any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].numel() > 1 << 24
           for n in upstream):
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    env: dict[Node, object] = {}
    for n in sorted(upstream, key=order.__getitem__):
        args = torch.fx.map_arg(n.args, env.__getitem__)
        kwargs = dict(torch.fx.map_arg(n.kwargs, env.__getitem__))
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        try:
            env[n] = n.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 (an op that cannot run here: no proof)
            return None
    value = env[node]
    return value.cpu() if isinstance(value, torch.Tensor) else None


def _is_arange(values: torch.Tensor) -> bool:
    return torch.equal(values, torch.arange(values.shape[1]).expand_as(values))


def _constant_per_row(values: torch.Tensor) -> bool:
    return bool((values == values[:, :1]).all())
