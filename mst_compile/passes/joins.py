"""Gradients of pieces joined in one buffer, in the layout their reader wants (exact
rewrites of a graph).

The backward of taking pieces out of one tensor writes each piece's gradient into zeros of
the whole and adds them up: `slice_scatter`s for slices (litgpt's `qkv.split`, a user's
token pieces), `select_scatter`s for selections (`q, k, v = qkv.view(b, s, 3, h,
d).permute(2, 0, 3, 1, 4)`). Where the pieces cover the whole, that sum is their `cat` or
`stack` (`scattered_pieces_as_joins`). Where the whole is then copied permuted into the
layout of the tensor the pieces came from (the fused projection's `[b, s, 3, h, d]`, for its
gradient's matmuls), the copy is the join of the permuted pieces (`joins_in_reader_layout`):
one buffer where there were two, the join's and its copy's (on the CPU, Inductor makes every
join a buffer of its own).
"""

from __future__ import annotations

import itertools

import torch
from torch.fx import Graph, Node

from .graph import stand_in_for
from .rules import shape_of
from .symbolic import hint, same_size

aten = torch.ops.aten


def scattered_pieces_as_joins(graph: Graph) -> None:
    """Every sum of pieces scattered into zeros that covers the whole, replaced by the
    pieces' `cat` (slices, in order, step 1) or `stack` (selections, every index once; as
    the `cat` of the unsqueezed pieces, the form Inductor's decompositions leave)."""
    for root in list(graph.find_nodes(op="call_function", target=aten.add.Tensor)):
        if root._erased:
            continue
        tree, leaves = _sum_tree(root)
        join = _join_of(leaves, shape_of(root))
        if join is None:
            continue
        pieces, dim, stacked = join
        made = []
        with graph.inserting_before(root):
            if stacked:
                made = [graph.call_function(aten.unsqueeze.default, (p, dim)) for p in pieces]
                pieces = made
            joined = graph.call_function(aten.cat.default, (pieces, dim))
        stand_in_for(root, made)
        joined.meta.update(root.meta)
        root.replace_all_uses_with(joined)
        position = {n: k for k, n in enumerate(graph.nodes)}
        for node in sorted(tree + leaves, key=position.__getitem__, reverse=True):
            zeros = node.args[0] if node in leaves else None
            graph.erase_node(node)
            if zeros is not None and not zeros.users:
                graph.erase_node(zeros)


def _sum_tree(root: Node) -> tuple[list[Node], list[Node]]:
    """The adds of a sum rooted at `root` (each but the root read only by the sum) and its
    terms."""
    tree, leaves, todo = [], [], [root]
    while todo:
        node = todo.pop()
        if node.target is aten.add.Tensor and (node is root or len(node.users) == 1) \
                and all(isinstance(a, Node) for a in node.args[:2]) and not node.kwargs:
            tree.append(node)
            todo.extend(node.args[:2])
        else:
            leaves.append(node)
    return tree, leaves


def _join_of(leaves: list[Node], shape: list) -> tuple | None:
    """(pieces, dim, stacked) of the join the scattered `leaves` sum to (stacked: along a
    new dim), or None."""
    if len(leaves) < 2 or len(set(leaves)) != len(leaves):
        return None
    if not all(_scatters_into_zeros(leaf, shape, leaves) for leaf in leaves):
        return None
    rank = len(shape)
    if all(leaf.target is aten.select_scatter.default for leaf in leaves):
        dims = {leaf.args[2] % rank for leaf in leaves}
        if len(dims) != 1:
            return None
        dim = dims.pop()
        if not isinstance(shape[dim], int) or shape[dim] != len(leaves):
            return None
        index = {leaf: leaf.args[3] % shape[dim] for leaf in leaves}
        if set(index.values()) != set(range(len(leaves))):
            return None
        pieces = [leaf.args[1] for leaf in sorted(leaves, key=index.__getitem__)]
        return pieces, dim, True
    if all(leaf.target is aten.slice_scatter.default for leaf in leaves):
        parts = [_slice_part(leaf, rank) for leaf in leaves]
        if None in parts or len({p[0] for p in parts}) != 1:
            return None
        parts.sort(key=lambda p: hint(p[1]))
        dim = parts[0][0]
        if not same_size(parts[0][1], 0) or not same_size(parts[-1][2], shape[dim]) \
                or not all(same_size(a[2], b[1]) for a, b in itertools.pairwise(parts)):
            return None
        return [p[3] for p in parts], dim, False
    return None


def _scatters_into_zeros(leaf: Node, shape: list, leaves: list[Node]) -> bool:
    """Whether `leaf` writes a piece into zeros of `shape` that only the sum's terms read."""
    if leaf.target not in (aten.select_scatter.default, aten.slice_scatter.default) \
            or len(leaf.users) != 1:
        return False
    zeros = leaf.args[0]
    return (isinstance(zeros, Node) and zeros.target is aten.full.default
            and zeros.args[1] == 0 and all(u in leaves for u in zeros.users)
            and len(shape_of(zeros)) == len(shape)
            and all(map(same_size, shape_of(zeros), shape)))


def _slice_part(leaf: Node, rank: int) -> tuple | None:
    """(dim, start, stop, piece) of a `slice_scatter` of step 1."""
    piece = leaf.args[1]
    dim = (leaf.args[2] if len(leaf.args) > 2 else 0) % rank
    start = leaf.args[3] if len(leaf.args) > 3 and leaf.args[3] is not None else 0
    step = leaf.args[5] if len(leaf.args) > 5 else 1
    if step != 1:
        return None
    if isinstance(start, Node):
        start = start.meta.get("val", start)
    return dim, start, start + shape_of(piece)[dim], piece


def joins_in_reader_layout(graph: Graph) -> list[str]:
    """Every contiguous copy of a permuted join read by nothing else, replaced by the join
    of the permuted pieces (the same values, contiguous); a line per change, for the report."""
    notes = []
    for copy in list(graph.find_nodes(op="call_function", target=aten.clone.default)):
        if copy.kwargs.get("memory_format") is not torch.contiguous_format:
            continue
        permute = copy.args[0]
        if not (isinstance(permute, Node) and permute.target is aten.permute.default
                and len(permute.users) == 1):
            continue
        join = permute.args[0]
        if not (isinstance(join, Node) and join.target is aten.cat.default
                and len(join.users) == 1):
            continue
        pieces, dim = join.args[0], join.args[1] if len(join.args) > 1 else 0
        order = [d % len(shape_of(join)) for d in permute.args[1]]
        dim %= len(shape_of(join))
        made = []
        with graph.inserting_before(copy):
            for piece in pieces:
                made.append(graph.call_function(aten.permute.default, (piece, order)))
            joined = graph.call_function(aten.cat.default, (made, order.index(dim)))
        stand_in_for(copy, made)
        joined.meta.update(copy.meta)
        copy.replace_all_uses_with(joined)
        graph.erase_node(copy)
        graph.erase_node(permute)
        graph.erase_node(join)
        notes.append(f"cat {join.name} copied as "
                     f"{list(shape_of(joined))} is made in that layout: one buffer, not two")
    return notes
