"""A user's own chunking of the tokens, undone, so mst can cut the tokens by its own chunks.

Some model code splits the tokens itself and joins the results: litgpt's
`chunked_cross_entropy` splits the flattened logits and labels into 128-row pieces, computes
each piece's per-token losses and concatenates them. Every piece runs the same token-wise
ops, so the whole computed at once is the same values in the same order:

    cat([f(x[a_0:a_1], y[a_0:a_1]), ..., f(x[a_k-1:a_k], ...)], e)  ==  f(x, y)

This pass finds such a `cat` and replaces it by f applied to the wholes, in the ATen graph
before any region is found; the loss region then grows through it as through any loss.

A match needs:
- a `cat` along dim e of k >= 2 values, each computed by the same ops (the same targets and
  arguments) from pieces of the same wholes (`split`, `split_with_sizes` or `slice` along one
  dim, covering the whole in order, the same lengths for every whole) and from values shared
  by every piece;
- every op token-wise along the pieces' dim by its rule (rules.py), each value of the chain
  holding the piece's tokens on one dim, and the joined values on dim e.

A value of a piece's chain read outside it (a forward value the backward reads) is read as
the slice of the merged value. In a joint graph the backward has the same shape (the
gradient of each piece computed alike from the pieces of the joined gradient, then joined
by the split's backward), so the pass runs until no `cat` matches: the forward first, then
the backward, whose pieces are then slices of merged forward values.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator

import torch
from torch._inductor.pattern_matcher import stable_topological_sort
from torch.fx import Graph, Node

from .analysis import is_amplifier
from .graph import fill_fake_values, stack_line
from .layout import REPLICATED, Chunked, Layout, make_chunked
from .rules import argument_layouts, output_layout, rule_of, shape_of, tensor_args
from .symbolic import GraphSymbols, Size, SizeArgs, above_one, is_size_node, same_size

aten = torch.ops.aten
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


@dataclasses.dataclass(frozen=True)
class Piece:
    whole: Node
    dim: int
    start: Size
    stop: Size


def undo_token_pieces(graph: Graph) -> list[str]:
    """Replace every join of a user's token pieces in `graph` by the ops on the wholes;
    returns a line per join undone, for the report."""
    notes: list[str] = []
    while True:
        for node in graph.find_nodes(op="call_function", target=aten.cat.default):
            match = _match(node)
            if match is not None:
                notes.append(_apply(graph, match))
                break
        else:
            break
    if notes:
        # a split whose pieces are all merged now, once the backward's join is undone too
        for split in [n for n in graph.nodes if n.target in SPLITS]:
            _erase_if_unused(graph, split)
        stable_topological_sort(graph)  # a slice of a merged value, read before the join
    return notes


@dataclasses.dataclass
class _Match:
    cat: Node
    pieces: dict[tuple[Node, int], list[Piece]]  # (whole, dim) -> its piece for each chain
    chains: list[dict[Node, Node]]  # chain 0's node -> chain i's (chain 0: itself)
    order: list[Node]  # chain 0's nodes, in graph order
    layouts: dict[Node, Layout]  # chain 0's nodes (Chunked, or Replicated: a constant)


def piece_of(node: Node) -> Piece | None:
    """The piece of a whole value `node` is: an output of a split, or a slice of one dim."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], Node) \
            and node.args[0].target in SPLITS:
        split, index = node.args
        whole = split.args[0]
        rank = len(shape_of(whole))
        dim = (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) % rank
        lengths = [v.shape[dim] for v in split.meta["val"]]
        start = sum(lengths[:index])
        return Piece(whole, dim, start, start + lengths[index])
    if node.target is aten.slice.Tensor:
        whole = node.args[0]
        rank = len(shape_of(whole))
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1:
            return None
        start = _value(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
        return Piece(whole, dim, start, start + shape_of(node)[dim])
    return None


def _value(arg: object) -> object:
    return arg.meta["val"] if isinstance(arg, Node) else arg


def _match(cat: Node) -> _Match | None:
    outs = cat.args[0]
    if not isinstance(outs, (list, tuple)) or len(outs) < 2:
        return None
    if not all(isinstance(o, Node) for o in outs):
        return None
    chains: list[dict[Node, Node]] = [{} for _ in outs]
    pieces: dict[tuple[Node, int], list[Piece | None]] = {}
    leaves: dict[Node, Piece] = {}

    def same(a: Node, b: Node, i: int) -> bool:
        """Whether chain i's `b` is chain 0's `a` computed on piece i."""
        if a in chains[i]:
            return chains[i][a] is b
        if a is b:
            return piece_of(a) is None  # a value shared by every piece
        pa, pb = piece_of(a), piece_of(b)
        if pa is not None or pb is not None:
            if pa is None or pb is None or (pa.whole, pa.dim) != (pb.whole, pb.dim):
                return False
            group = pieces.setdefault((pa.whole, pa.dim), [None] * len(outs))
            group[0], group[i] = pa, pb
            leaves[a] = pa
            chains[i][a] = b
            return True
        if a.op != "call_function" or b.op != "call_function" or a.target != b.target:
            return False
        if set(a.kwargs) != set(b.kwargs) or len(a.args) != len(b.args):
            return False
        chains[i][a] = b
        rule = rule_of(a)
        for pos, (x, y) in enumerate(zip([*a.args, *a.kwargs.values()],
                                         [*b.args, *b.kwargs.values()])):
            if rule is not None and pos == rule.shape_arg:
                continue  # sized for each piece: made again for the whole
            if not _same_arg(x, y, i, same):
                return False
        return True

    for i in range(1, len(outs)):
        if not same(outs[0], outs[i], i):
            return None
    chains[0] = {a: a for a in chains[1]}
    if not pieces or any(None in group for group in pieces.values()):
        return None
    if not _cover_in_order(pieces) or not any(_from_amplifier(w) for w, _ in pieces):
        return None
    graph_order = {n: k for k, n in enumerate(cat.graph.nodes)}
    order = sorted((n for n in chains[0] if n not in leaves), key=graph_order.__getitem__)
    layouts = _layouts(order, leaves, pieces, chains)
    if layouts is None:
        return None
    dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % len(shape_of(cat))
    if layouts.get(outs[0]) != Chunked((dim,)):
        return None
    return _Match(cat, pieces, chains, order, layouts)


def _same_arg(x: object, y: object, i: int, same) -> bool:
    if isinstance(x, Node) and isinstance(y, Node):
        if is_size_node(x) or is_size_node(y):
            return False  # a size read in a non-shape argument: not rewritten for the whole
        return same(x, y, i)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_arg(a, b, i, same) for a, b in zip(x, y))
    if isinstance(x, Node) or isinstance(y, Node):
        return False
    return x == y


def _from_amplifier(node: Node, depth: int = 16) -> bool:
    """Whether `node` is computed from an amplifier's output (a vocabulary head's logits)
    through ops with token rules: only then is there a region to cut the merged whole by its
    own chunks, and computing it whole does not cost the memory the user's pieces saved."""
    seen: set[Node] = set()
    stack = [(node, depth)]
    while stack:
        n, left = stack.pop()
        if n in seen or left == 0 or n.op != "call_function" or rule_of(n) is None:
            continue
        seen.add(n)
        if is_amplifier(n):
            return True
        stack.extend((a, left - 1) for _, a in tensor_args(n))
    return False


def _cover_in_order(pieces: dict[tuple[Node, int], list[Piece]]) -> bool:
    """Each whole's pieces follow each other from its first position to its last, all wholes
    cut at the same lengths."""
    lengths = None
    for (whole, dim), group in pieces.items():
        if not same_size(group[0].start, 0) or not same_size(group[-1].stop, shape_of(whole)[dim]):
            return False
        if not all(same_size(a.stop, b.start) for a, b in itertools.pairwise(group)):
            return False
        mine = [p.stop - p.start for p in group]
        if lengths is not None and not all(map(same_size, lengths, mine)):
            return False
        lengths = mine
    return above_one(lengths[0])  # the first piece's tokens give every value its layout


def _layouts(order: list[Node], leaves: dict[Node, Piece],
             pieces: dict[tuple[Node, int], list[Piece]],
             chains: list[dict[Node, Node]]) -> dict[Node, Chunked] | None:
    """The token layout of every value of chain 0 over its piece's tokens (one dim each), by
    the rules; None where an op is not token-wise along the pieces."""
    tokens = next(iter(pieces.values()))[0]
    tokens = tokens.stop - tokens.start
    layouts: dict[Node, Layout] = {}
    for leaf, piece in leaves.items():
        layout = make_chunked((piece.dim,), shape_of(leaf), tokens)
        if layout is None:
            return None
        layouts[leaf] = layout
    # factories whose shape is the same in every chain (pieces of equal length): a constant
    # (REPLICATED), or a value per piece (its candidate layout), as their first reader wants
    undecided: dict[Node, Layout] = {}
    for node in order:
        chained = [a for _, a in tensor_args(node) if isinstance(layouts.get(a), Chunked)]
        if chained:
            layout = output_layout(node, chained[0], layouts[chained[0]], tokens)
        elif all(shape_of(chain[node]) == shape_of(node) for chain in chains):
            layouts[node] = REPLICATED  # a constant each piece makes alike (a zero)...
            candidate = _factory_layout(node, chains, pieces)
            if isinstance(candidate, Chunked):
                undecided[node] = candidate  # ...or the zeros each piece scatters into
            continue
        else:
            layout = _factory_layout(node, chains, pieces)
        if not isinstance(layout, Chunked) or len(layout.dims) != 1:
            return None
        want = argument_layouts(node, layout, tokens, layouts)
        if want is None:
            return None
        for pos, arg in tensor_args(node):
            if arg in undecided and want[pos] == undecided[arg]:
                layouts[arg] = undecided[arg]
            undecided.pop(arg, None)
            if want[pos] != layouts.get(arg, REPLICATED):
                return None  # a shared value read along the tokens, or a piece broadcast
        layouts[node] = layout
    return layouts


def _factory_layout(node: Node, chains: list[dict[Node, Node]],
                    pieces: dict[tuple[Node, int], list[Piece]]) -> Layout | None:
    """A value made from no piece (the zeros a gather's backward scatters into): its token
    dim is the one dim whose size is every chain's piece length."""
    group = next(iter(pieces.values()))
    lengths = [p.stop - p.start for p in group]
    shapes = [shape_of(chain[node]) for chain in chains]
    dims = [d for d in range(len(shapes[0]))
            if all(same_size(s[d], n) for s, n in zip(shapes, lengths))]
    return Chunked((dims[0],)) if len(dims) == 1 and rule_of(node) is not None else None


def _apply(graph: Graph, match: _Match) -> str:
    cat, chains, layouts = match.cat, match.chains, match.layouts
    leaves = {leaf: piece for leaf, piece in _leaves(match).items()}
    merged: dict[Node, Node] = {}
    with graph.inserting_before(cat):
        sizes = SizeArgs(graph, symbols=GraphSymbols(graph))
        for node in match.order:
            if layouts[node] is REPLICATED:
                merged[node] = node  # chain 0's constant serves the whole
                continue

            def whole(arg: object) -> object:
                if isinstance(arg, Node):
                    return leaves[arg].whole if arg in leaves else merged.get(arg, arg)
                if isinstance(arg, (list, tuple)):
                    return type(arg)(whole(a) for a in arg)
                return arg
            args, kwargs = list(whole(node.args)), dict(whole(node.kwargs))
            rule = rule_of(node)
            if rule.shape_arg is not None:
                args[rule.shape_arg] = sizes.shape(_whole_shape(node, layouts[node], match))
            new = graph.call_function(node.target, tuple(args), kwargs)
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            merged[node] = new
    fill_fake_values(graph.owning_module, list(merged.values()))
    chain_nodes = [set(chain.values()) for chain in chains]
    group = next(iter(match.pieces.values()))
    for node in match.order:
        if layouts[node] is REPLICATED:
            continue
        token_dim = layouts[node].dims[0]
        for i, chain in enumerate(chains):
            mine = chain[node]
            outside = [u for u in mine.users if u not in chain_nodes[i] and u is not cat]
            for user in outside:
                with graph.inserting_before(user):
                    piece = graph.call_function(
                        aten.slice.Tensor,
                        (merged[node], token_dim, sizes_arg(graph, group[i].start),
                         sizes_arg(graph, group[i].stop)))
                user.replace_input_with(mine, piece)
    cat.replace_all_uses_with(merged[cat.args[0][0]])
    graph.erase_node(cat)
    position = {n: k for k, n in enumerate(graph.nodes)}
    old = {n for chain in chains for n in chain.values()} - set(merged.values())
    splits = {leaf.args[0] for leaf in leaves if leaf.target is operator.getitem}
    for node in sorted(old | splits, key=position.__getitem__, reverse=True):
        _erase_if_unused(graph, node)
    fill_fake_values(graph.owning_module)
    where = stack_line(match.order[-1]) or match.order[-1].name
    return (f"{len(chains)} pieces of the tokens (of {', '.join(w.name for w, _ in match.pieces)}) "
            f"computed as one ({where})")


def _erase_if_unused(graph: Graph, node: Node) -> None:
    """Erase `node` if nothing reads it but pieces of it and sizes of those that nothing
    reads (Dynamo reads a last piece's length and may leave it unused)."""
    for user in list(node.users):
        if user.target is operator.getitem or (is_size_node(user) and not user.users):
            _erase_if_unused(graph, user)
    if not node.users:
        graph.erase_node(node)


def _leaves(match: _Match) -> dict[Node, Piece]:
    found = {}
    for chain in match.chains:
        for node in chain.values():
            piece = piece_of(node)
            if piece is not None and (piece.whole, piece.dim) in match.pieces:
                found[node] = piece
    return found


def _whole_shape(node: Node, layout: Chunked, match: _Match) -> list[Size]:
    (whole, dim), _ = next(iter(match.pieces.items()))
    shape = list(shape_of(node))
    shape[layout.dims[0]] = shape_of(whole)[dim]
    return shape


def sizes_arg(graph: Graph, size: Size) -> int | Node:
    return SizeArgs(graph, symbols=GraphSymbols(graph)).arg(size)
