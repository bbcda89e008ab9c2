"""Symbolic token counts (compiled with dynamic=True or marked dynamic dims).

A region's token count T may be a product of size symbols of the graph and a number (batch
and sequence length, e.g. s0 * s1 with dynamic=True). The chunk count n stays a number fixed
at compile time, chosen at the length the graph is compiled for and held by guards on T
(planning.py), so the graph serves every length those guards admit without a recompile; the
chunk lengths are expressions: T // n for the first n - 1 chunks, the rest for the last. This
file turns such sizes into FX arguments: an int stays an int, a symbolic size becomes nodes
computed from the graph's SymInt placeholders of the symbols (inside a chunk subgraph, from
the placeholders they are passed as).
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import Graph, Node

Size = int | torch.SymInt


def is_symbolic(value: object) -> bool:
    return isinstance(value, torch.SymInt) and not isinstance(value.node.maybe_as_int(), int)


def is_size_node(node: Node) -> bool:
    """A node whose value is a SymInt: a size read in a shape argument, not a tensor."""
    return isinstance(node.meta.get("val"), torch.SymInt)


def hint(value: Size) -> int:
    """The value a size has at the length being compiled."""
    if not is_symbolic(value):
        return int(value)
    return int(value.node.hint)


def expected_value(value: Size) -> int | None:
    """`hint`, or for a size read from the data (a compacted chunk's row count) the value
    expected of it (compaction.py gives it as a hint override, torch >= 2.10); None if
    neither is known."""
    if not is_symbolic(value) or value.node.hint is not None:
        return hint(value)
    overrides = getattr(value.node.shape_env, "var_to_hint_override", {})
    expected = value.node.expr.xreplace(overrides)
    return int(expected) if expected.is_number else None


def guard(condition: torch.SymBool | bool) -> bool:
    """Evaluate a condition on sizes at the compiled length; a symbolic one becomes a guard of
    the compiled graph (Dynamo recompiles when a later length breaks it)."""
    return bool(condition)


def token_symbols(tokens: Size) -> list[sympy.Symbol]:
    """The size symbols of a token count c * s1 * s2 ... (batch and sequence may both be
    symbolic); [] for a static count. Raises ValueError for any other symbolic form."""
    if not is_symbolic(tokens):
        return []
    expr = tokens.node.expr
    coeff, factors = expr.as_coeff_mul()
    symbols = all(isinstance(f, sympy.Symbol) for f in factors)
    if coeff.is_Integer and coeff > 0 and symbols and len(set(factors)) == len(factors):
        return sorted(factors, key=str)
    raise ValueError(f"the symbolic token count {expr} is not a product of size symbols")


def symbol_nodes(graph: Graph, symbols: list[sympy.Symbol]) -> list[Node] | None:
    """The graph's SymInt placeholders of `symbols`, in order; None if one is missing."""
    found: dict[sympy.Symbol, Node] = {}
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and val.node.expr in symbols:
            found.setdefault(val.node.expr, node)
    return [found[s] for s in symbols] if len(found) == len(symbols) else None


def graph_symbols(graph: Graph) -> dict[sympy.Symbol, Node]:
    """Every size symbol the graph holds as a SymInt placeholder (token counts and the sizes
    of other inputs, such as labels Dynamo gave symbols of their own)."""
    found: dict[sympy.Symbol, Node] = {}
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            found.setdefault(val.node.expr, node)
    return found


class SizeArgs:
    """Emits the FX arguments of sizes into `graph`, where each size symbol is held by a node
    (a placeholder)."""

    def __init__(self, graph: Graph, nodes: dict[sympy.Symbol, Node] | None = None):
        self.graph, self.nodes = graph, dict(nodes or {})
        self._cache: dict[str, Node] = {}

    def arg(self, size: Size) -> int | Node:
        if not is_symbolic(size):
            return int(size)
        expr = size.node.expr
        key = str(expr)
        if key not in self._cache:
            self._cache[key] = self._emit(expr)
        return self._cache[key]

    def shape(self, sizes) -> list[int | Node]:
        return [self.arg(s) for s in sizes]

    def _emit(self, expr: sympy.Expr) -> Node:
        """Nodes for the forms chunking produces: products of symbols and integers, floor
        divisions of those by integers, and sums of such terms."""
        if expr in self.nodes:
            return self.nodes[expr]
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            op = operator.add if isinstance(expr, sympy.Add) else operator.mul
            terms = [self._term(t) for t in expr.args]
            terms.sort(key=lambda t: isinstance(t, int))  # a node first: node op int
            out = terms[0]
            for t in terms[1:]:
                out = self.graph.call_function(op, (out, t))
            return out
        if type(expr).__name__ == "FloorDiv":
            base, divisor = expr.args
            return self.graph.call_function(operator.floordiv, (self._term(base), int(divisor)))
        raise ValueError(f"cannot express the size {expr} in the graph")

    def _term(self, expr: sympy.Expr) -> int | Node:
        return int(expr) if isinstance(expr, sympy.Integer) else self._emit(expr)
