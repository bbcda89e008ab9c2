"""Helpers on FX graphs shared by the passes: fake values of new nodes, ordering, where a
node came from."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch._dynamo.utils import detect_fake_mode
from torch.fx import Graph, GraphModule, Node, map_arg

invoke_subgraph = torch.ops.higher_order.invoke_subgraph


def topological(nodes: list[Node]) -> list[Node]:
    """`nodes` with every node after the ones of them it reads (nodes inserted after one
    anchor are not in graph order until the graph is sorted)."""
    members = set(nodes)
    done: set[Node] = set()
    order: list[Node] = []

    def visit(node: Node) -> None:
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if n in done:
                continue
            if expanded:
                done.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in n.all_input_nodes if a in members and a not in done)

    for node in nodes:
        visit(node)
    return order


def order_key(graph: Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def fill_fake_values(gm: GraphModule, nodes: list[Node] | None = None) -> None:
    """Give `nodes` (default: every node a rewrite added) their `meta["val"]`, in graph order.
    Cheaper than a fake-tensor pass over the whole graph, which would re-run every chunk
    subgraph."""
    vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = detect_fake_mode([v for v in vals if v is not None])
    for node in gm.graph.nodes if nodes is None else nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        if node.target is invoke_subgraph:
            # new tensors of the subgraph's output shapes: each call's outputs are buffers of
            # their own (Inductor's fake-tensor updater takes values sharing a storage for
            # changed ones, and re-propagates everything after them)
            sub = getattr(gm, node.args[0].target)
            with fake_mode:
                node.meta["val"] = tuple(
                    torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                    for v in (o.meta["val"] for o in sub.graph.output_node().args[0])
                )
            continue
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)


def stand_in_for(source: Node, nodes: list[Node]) -> None:
    """New `nodes` computed in place of `source`: its meta (stack trace, checkpoint tags, ...)
    but fake values of their own."""
    for node in nodes:
        node.meta.update({k: v for k, v in source.meta.items() if k != "val"})
    fill_fake_values(source.graph.owning_module, nodes)


def stack_line(stack_trace: str | Node) -> str:
    """'path:line in fn: code' of the innermost user frame of a stack trace (or a node's)."""
    if isinstance(stack_trace, Node):
        stack_trace = stack_trace.meta.get("stack_trace") or ""
    lines = [line.strip() for line in stack_trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            where = lines[i][len("File "):].replace('", line ', ":").strip('"')
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{where}: {code}"
    return lines[-1] if lines else ""


def _reachable(nodes: Iterable[Node], neighbours: Callable[[Node], Iterable[Node]]) -> set[Node]:
    seen: set[Node] = set()
    stack = [m for n in nodes for m in neighbours(n)]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(neighbours(n))
    return seen


def descendants(nodes: Iterable[Node]) -> set[Node]:
    """Every node computed from `nodes` (excluding them unless reachable again)."""
    return _reachable(nodes, lambda n: n.users)


def ancestors(nodes: Iterable[Node]) -> set[Node]:
    """Every node `nodes` are computed from."""
    return _reachable(nodes, lambda n: n.all_input_nodes)
