"""What attention keeps for its backward is no more than it reads (exact rewrites of a
training graph).

SDPA's backward reads q, k, v and the forward's output o, so a training step keeps them from
the forward to the backward (or, in a checkpointed layer, through its recompute and
attention's backward). Two common forms of model code make that keep more than those four:

1. An input that is a view of a larger tensor: v (or q, k) read out of a fused projection's
   output (`qkv = x @ W.T`, then views), while the rest became new tensors (q and k rotated).
   The view keeps the whole `[S, 3d]` output, three hidden widths where v is one. The input
   is copied next to its view; the projection's output then dies with its last forward
   reader. Not done where attention's inputs read all of it (GPT-2 with no rotary embedding:
   q, k and v all views of it, the copy would free nothing), nor where anything else in the
   backward reads it.
2. The output read twice: o `[b, h, S, d]` is copied transposed, `[b, S, h, d]`, for the
   output projection (`o.transpose(1, 2).contiguous()` or `.reshape`), whose weight
   gradient keeps that copy, and the backward reads o as well: the same values kept twice.
   The backward reads o as a transposed view of the copy (same values, so the same numbers);
   o dies after the copy.
"""

from __future__ import annotations

import operator

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node, map_arg

from .graph import stand_in_for
from .region import tangent_dependent
from .rules import facts_of, numel_of, shape_of

aten = torch.ops.aten


def trim_attention_saves(graph: Graph) -> list[str]:
    """Both rewrites on every attention of a training graph; a line per change, for the
    report."""
    backward = tangent_dependent(graph)
    if not backward:
        return []
    notes = []
    forwards = [n for n in graph.nodes if facts_of(n).attention == "forward"]
    for node in forwards:
        readers = [u for arg in node.args[:3] if isinstance(arg, Node) for u in arg.users
                   if facts_of(u).attention == "backward"]
        if readers:
            notes += _copy_views_of_larger(node, readers, backward)
            notes += _output_through_copy(node, readers)
    return notes


def _view_base(node: Node) -> Node:
    """The tensor `node` is a view of (itself when it is no view)."""
    while node.op == "call_function":
        op = node.target
        if op is operator.getitem:
            source = node.args[0]
            if not (isinstance(source, Node) and getattr(source.target, "is_view", False)):
                break
            node = source
        elif getattr(op, "is_view", False) and isinstance(node.args[0], Node):
            node = node.args[0]
        else:
            break
    return node


def _views_of(base: Node) -> set[Node]:
    """`base` and every value that is a view of it."""
    result, todo = {base}, [base]
    while todo:
        for user in todo.pop().users:
            if user not in result and _view_base(user) in result:
                result.add(user)
                todo.append(user)
    return result


def _copy_views_of_larger(node: Node, readers: list[Node], backward: set[Node]) -> list[str]:
    notes = []
    inputs = [a for a in node.args[:3] if isinstance(a, Node)]
    for base in dict.fromkeys(_view_base(a) for a in inputs):
        views = [a for a in dict.fromkeys(inputs) if a is not base and _view_base(a) is base]
        if not views or sum(numel_of(v) for v in views) >= numel_of(base):
            continue
        held = _views_of(base)
        others = [u for v in held for u in v.users
                  if u in backward and u not in readers and u not in held]
        if others:
            continue  # the backward keeps the base anyway
        for view in views:
            if not any(_copy_for(view, [node, *readers], keep_order)
                       for keep_order in (False, True)):
                continue
            notes.append(f"attention {node.name} reads a copy of {view.name} "
                         f"{list(shape_of(view))}, not a view of {base.name} "
                         f"{list(shape_of(base))}: {base.name} is not kept for its backward")
    return notes


def _copy_for(view: Node, users: list[Node], keep_order: bool) -> bool:
    """Have `users` read a dense copy of `view`: contiguous, or (keep_order) in the order of
    its strides (the base's memory order; for v out of a `[b, S, 3, h, d]` projection,
    `[b, S, h, d]`: permuted into that order, cloned, permuted back). Attention lays its
    output and gradients out by its query's stride order, and the graph's views of them were
    traced on those strides: a copy that changes them is taken back (False)."""
    graph = view.graph
    if keep_order:
        strides = view.meta["val"].stride()
        order = sorted(range(len(strides)), key=lambda d: -strides[d])  # outermost first
        back = _inverse(order)
        with graph.inserting_after(view):
            permuted = graph.call_function(aten.permute.default, (view, order))
        with graph.inserting_after(permuted):
            dense = graph.call_function(aten.clone.default, (permuted,),
                                        {"memory_format": torch.contiguous_format})
        with graph.inserting_after(dense):
            made = [permuted, dense, graph.call_function(aten.permute.default, (dense, back))]
    else:
        with graph.inserting_after(view):
            made = [graph.call_function(aten.clone.default, (view,),
                                        {"memory_format": torch.contiguous_format})]
    stand_in_for(view, made)
    copy = made[-1]
    for user in users:
        user.replace_input_with(view, copy)
    if all(_same_output_strides(user) for user in users):
        return True
    for user in users:
        user.replace_input_with(copy, view)
    for new in reversed(made):
        graph.erase_node(new)
    return False


def _same_output_strides(node: Node) -> bool:
    """Whether `node`, run on fake values of its (changed) arguments, lays its tensors out as
    the graph recorded: the views the graph takes of them were traced on those strides."""
    before = node.meta.get("val")
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    with detect_fake_mode([before] if isinstance(before, torch.Tensor) else list(before)):
        after = node.target(*args, **kwargs)
    pairs = zip(before, after) if isinstance(before, (tuple, list)) else [(before, after)]
    return all(not isinstance(b, torch.Tensor) or b.stride() == a.stride() for b, a in pairs)


def _output_through_copy(node: Node, readers: list[Node]) -> list[str]:
    """The backward reads the output o through the model's transposed copy of it, where
    that copy is the only forward reader of o."""
    out = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
    if out is None:
        return []
    copy, order = _transposed_copy(out)
    held = _views_of(out)  # out, its transpose and the aliases autograd saved for the backward
    if copy is None or any(u not in held and u not in readers and u is not copy
                           for v in held for u in v.users):
        return []
    with node.graph.inserting_after(copy):
        view = node.graph.call_function(aten.permute.default, (copy, _inverse(order)))
    stand_in_for(copy, [view])
    for reader in readers:
        position = facts_of(reader).out_arg
        saved = reader.args[position]
        if saved in held and shape_of(saved) == shape_of(out):
            reader.update_arg(position, view)
    note = (f"attention {node.name}'s backward reads its output {out.name} through its copy "
            f"{copy.name} {list(shape_of(copy))}: one of the two is kept, not both")
    return [note]


def _transposed_copy(out: Node) -> tuple[Node | None, list[int]]:
    """The contiguous copy of `out` permuted (a `clone` of a `permute`/`transpose` of it, or
    of a view of it of its own shape), and that permutation."""
    todo = [out]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.target is aten.permute.default:
                order = list(user.args[1])
            elif user.target is aten.transpose.int:
                order = list(range(len(shape_of(out))))
                a, b = (d % len(order) for d in user.args[1:3])
                order[a], order[b] = order[b], order[a]
            else:
                if getattr(user.target, "is_view", False) and shape_of(user) == shape_of(out):
                    todo.append(user)
                continue
            copies = [c for c in user.users
                      if c.target is aten.clone.default and _is_contiguous(c)]
            if copies and len(user.users) == 1:
                return copies[0], order
    return None, []


def _is_contiguous(node: Node) -> bool:
    value = node.meta.get("val")
    return value is not None and value.is_contiguous()


def _inverse(order: list[int]) -> list[int]:
    """The permutation that undoes `order`."""
    return [order.index(d) for d in range(len(order))]
