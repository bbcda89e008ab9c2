"""Regions of declared token-wise modules (mst_compile.token_wise; docs/design.md, "Declared
token-wise blocks").

Every ATen op a declared module's forward makes carries the module in its `nn_module_stack`,
and every op of its backward in `fwd_nn_module_stack`. Those ops (and any op on a path
between two of them) form one region, rewritten by the same loops as any region: the values
it reads and returns are Chunked along their leading dims holding the T tokens (or
Replicated: weights; or Summed: their gradients), and the values inside are Scaled: each chunk
runs the block's own ops on its tokens, with sizes rewritten by resize.py. That is exact
because the module is token-wise: the declaration says so, mst cannot prove it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.fx import Graph, Node

from ..declare import TokenWise, declared_module
from ..report import POLICY, UNSUPPORTED, Kind
from .graph import ancestors, descendants
from .layout import REPLICATED, SCALED, SUMMED, Layout, make_chunked
from .region import WEIGHT, Candidate, CannotChunk, Region
from .rules import facts_of, is_tensor_node, numel_of, shape_of
from .symbolic import above_one, hint, is_size_node, same_shape, same_size

aten = torch.ops.aten


def find_blocks(graph: Graph, backward: set[Node]) -> tuple[list[Region], list[Candidate]]:
    """One region per call of a declared module, or a candidate saying why not."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    members: dict[str, list[Node]] = defaultdict(list)  # one call of a module -> its ops
    calls: dict[str, tuple[str, TokenWise | str]] = {}
    for node in graph.nodes:
        # sizes the block computes (with dynamic shapes) are computed for each chunk anew
        found = None if is_size_node(node) else _declared_call(node)
        if found is not None:
            key, path, declaration = found
            members[key].append(node)
            calls[key] = (f"{path} (call {key.partition('@')[2]})" if "@" in key else path,
                          declaration)
    regions, skipped = [], []
    for key, nodes in members.items():
        name, declaration = calls[key]
        seed = next((n for n in nodes if n not in backward), nodes[0])
        if isinstance(declaration, str):  # NOT_TOKEN_WISE
            skipped.append(Candidate(seed, f"{name}: {declaration}", POLICY))
            continue
        try:
            regions.append(_block_region(key, nodes, declaration, order, backward))
        except CannotChunk as e:
            skipped.append(Candidate(seed, f"declared token-wise {name}: {e}", e.category))
    return regions, skipped


def _module_stack(node: Node) -> dict:
    return node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}


def _declared_call(node: Node) -> tuple[str, str, TokenWise | str] | None:
    """The outermost declared module call `node` was made by (forward or backward): its key
    in the module stack (one per call: a second call of the module has key "...@1"), its
    path and its declaration (or why it is not token-wise)."""
    found = None
    for key, (path, cls) in _module_stack(node).items():
        declaration = declared_module(cls)
        if isinstance(declaration, str):  # not token-wise, even inside a declared module
            return key, path, declaration
        if declaration is not None and found is None:
            found = key, path, declaration
    return found


def _block_region(key: str, nodes: list[Node], declaration: TokenWise,
                  order: dict[Node, int], backward: set[Node]) -> Region:
    block = set(nodes)
    for in_backward in (False, True):  # a value computed outside between two block ops
        part = {n for n in block if (n in backward) == in_backward}
        if part:
            between = {n for n in descendants(part) & ancestors(part) if not is_size_node(n)}
            other = [n for n in between - block if _module_stack(n) and key not in _module_stack(n)]
            if other:
                raise CannotChunk(f"ops of other modules run between its ops ({other[0].name}, "
                                  f"from {list(_module_stack(other[0]).values())[-1][0]})")
            block |= between
    nodes = sorted(block, key=order.__getitem__)
    random = [n for n in nodes if _is_random(n)]
    if random:
        raise CannotChunk(f"it draws random numbers ({random[0].target}, {random[0].name}): the "
                          "backward would recompute them chunk by chunk and draw others")
    # a size read from a block value (dynamic shapes) is read elsewhere by the rewrite
    outputs = [n for n in nodes if any(u not in block and not is_size_node(u) for u in n.users)]
    main = _main_output([n for n in outputs if n not in backward])
    shape = shape_of(main)
    dims = declaration.token_dims(len(shape))
    if not dims or max(dims) >= len(shape):
        raise CannotChunk(f"the declared token dims {dims} do not exist on its output "
                          f"{main.name} of shape {shape}")
    tokens = math.prod(shape[d] for d in dims)
    if not above_one(tokens):
        raise CannotChunk(f"its output {main.name} {shape} holds {tokens} token on dims {dims}")
    # a per-step count kept in a buffer (`buffer.add_(counts.sum(tokens))`, a load-balancing
    # statistic): the add to the buffer runs after the loop, on the counts summed over chunks
    kept = [n for n in outputs if n not in backward and _adds_to_outside(n, block, tokens)]
    if kept:
        block -= set(kept)
        nodes = [n for n in nodes if n in block]
        outputs = [n for n in nodes if any(u not in block and not is_size_node(u) for u in n.users)]
    forward = [n for n in nodes if n not in backward]
    token_shape = shape[: len(dims)]
    layouts: dict[Node, Layout] = dict.fromkeys(nodes, SCALED)
    weight_grads = _weight_gradient_shapes(forward)
    for node in outputs:
        if node in backward and any(same_shape(w, shape_of(node))
                                    for w in weight_grads.get(node.meta.get("seq_nr"), [])):
            layouts[node] = SUMMED  # a weight's gradient, whatever its shape
        else:
            layouts[node] = _output_layout(node, tokens, token_shape, node in backward)
    inputs: dict[Node, Layout] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in block and not is_size_node(arg):
                if not isinstance(arg.meta.get("val"), torch.Tensor):
                    raise CannotChunk(f"{node.name} reads {arg.name}, not a tensor")
                # a model weight holds no tokens, whatever its shape ([experts, S, d] when
                # there are as many experts as rows); another graph input other than a
                # tangent (the block's input in a model that is only the block) needs the
                # output's token dims: one whose first dim happens to equal the token count
                # stays Replicated
                weight = arg.op == "placeholder" and arg not in backward
                layout = None if arg.meta.get(WEIGHT) else _leading_tokens(
                    arg, tokens, token_shape, any_first_dim=not weight)
                inputs.setdefault(arg, layout or REPLICATED)
    region = Region(
        seed=forward[0] if forward else nodes[0],
        tokens=tokens,
        input_width=int(numel_of(main) // tokens),
        layouts=layouts,
        forward=forward,
        backward=[n for n in nodes if n in backward],
        inputs=inputs,
        # a block that picks experts per token (top-k, or top-1 by max) routes
        kind=Kind.MOE if any(facts_of(n).routes for n in nodes) else Kind.BLOCK,
    )
    return region


def _is_random(node: Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _main_output(outputs: list[Node]) -> Node:
    """The block's output: its largest floating-point forward value used outside."""
    floats = [n for n in outputs if is_tensor_node(n) and isinstance(n.meta["val"], torch.Tensor)
              and n.meta["val"].dtype.is_floating_point]
    if not floats:
        raise CannotChunk("its forward returns no floating-point tensor used outside it", UNSUPPORTED)
    return max(floats, key=lambda n: hint(numel_of(n)))


def _weight_gradient_shapes(forward: list[Node]) -> dict[int, list[list]]:
    """For each forward op of the block that reads a model weight, by its autograd sequence
    number (which the backward ops of its gradient carry): the shapes of the weights."""
    shapes: dict[int, list[list]] = {}
    for node in forward:
        weights = [shape_of(a) for a in node.all_input_nodes if a.meta.get(WEIGHT)]
        if weights and node.meta.get("seq_nr") is not None:
            shapes.setdefault(node.meta["seq_nr"], []).extend(weights)
    return shapes


def _output_layout(node: Node, tokens: int, token_shape: list[int], in_backward: bool) -> Layout:
    layout = _leading_tokens(node, tokens, token_shape)
    if layout is not None:
        return layout
    val = node.meta["val"]
    if in_backward and isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
        return SUMMED  # a weight's gradient: the sum of every token's share
    if _sum_over_tokens(node, tokens):
        return SUMMED  # a per-step statistic summed over the tokens: each chunk adds its share
    raise CannotChunk(f"it returns {node.name} of shape {shape_of(node)}, which does not hold "
                      f"the {tokens} tokens on its leading dims")


def _sum_over_tokens(node: Node, tokens: int) -> bool:
    """Whether `node` is (a dtype conversion of) a sum over dims holding all the tokens."""
    while facts_of(node).converts:
        node = node.args[0]
    if node.target not in (aten.sum.dim_IntList, aten.sum.default):
        return False
    shape = shape_of(node.args[0])
    asked = node.args[1] if len(node.args) > 1 and node.args[1] else range(len(shape))
    return same_size(math.prod(shape[d % len(shape)] for d in asked), tokens) or (
        node.target is aten.sum.default)


def _adds_to_outside(node: Node, block: set[Node], tokens: int) -> bool:
    """Whether `node` adds a sum over the tokens to a value from outside the block (a
    buffer): then the add is not part of the block."""
    if node.target is not aten.add.Tensor or len(node.args) != 2:
        return False
    a, b = node.args
    inside = [x for x in (a, b) if isinstance(x, Node) and x in block]
    outside = [x for x in (a, b) if isinstance(x, Node) and x not in block]
    return len(inside) == 1 and len(outside) == 1 and _sum_over_tokens(inside[0], tokens)


def _leading_tokens(node: Node, tokens: int, token_shape: list[int],
                    any_first_dim: bool = True) -> Layout | None:
    """Chunked over the leading dims if they are the output's token dims (`token_shape`,
    as [batch, seq]) or, with `any_first_dim`, one dim of all the tokens ([tokens, ...]);
    None otherwise."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    shape = list(val.shape)
    leading = shape[: len(token_shape)]
    if len(leading) == len(token_shape) and all(map(same_size, leading, token_shape)):
        return make_chunked(range(len(token_shape)), shape, tokens)
    if any_first_dim and same_size(shape[0], tokens):
        return make_chunked((0,), shape, tokens)
    return None
