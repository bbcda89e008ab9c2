"""Symbolic sizes: token counts Dynamo made symbolic (a batch that changed shape, dynamic=True,
marked dynamic dims) or read from the data (a `nonzero` count, a compacted chunk's rows).

A region's token count T may be any expression of size symbols: a product (batch x length,
`s0*s1`), a sum (packed sequences), a difference (a shifted length), or an unbacked symbol.
The chunk count n stays a number fixed at compile time, chosen at the length the graph is
compiled for and held by guards on T (planning.py), so the graph serves every length those
guards admit; the chunk lengths are expressions: T // n for the first n - 1 chunks, the rest
for the last. This file turns such sizes into FX arguments (`SizeArgs`: an int stays an int,
a symbolic size becomes size arithmetic on the nodes holding its symbols), says where each
symbol can be read in a graph (`GraphSymbols`), and compares sizes without ever adding a
guard (`same_size`, `is_one`, `above_one`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import sympy
import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

Size = int | torch.SymInt


def is_symbolic(value: object) -> bool:
    return isinstance(value, torch.SymInt) and not isinstance(value.node.maybe_as_int(), int)


def from_data(value: Size) -> bool:
    """Whether a size is read from the data (made of unbacked symbols): it has no hint, and
    no guard can be placed on it."""
    return is_symbolic(value) and value.node.hint is None


def is_size_node(node: Node) -> bool:
    """A node whose value is a SymInt: a size read in a shape argument, not a tensor."""
    return isinstance(node.meta.get("val"), torch.SymInt)


def hint(value: Size) -> int:
    """The value a size has at the length being compiled; for a size read from the data (an
    unbacked symbol: a compacted chunk's row count, a `nonzero` count) the value expected of
    it: its hint override (compaction.py gives one, torch >= 2.10), else the largest its
    value range allows, at most Inductor's `unbacked_symint_fallback`. Adds no guard."""
    if not is_symbolic(value):
        return int(value)
    node = value.node
    if node.hint is not None:
        return int(node.hint)
    env = node.shape_env
    backed = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
    expr = sympy.sympify(node.expr.xreplace(getattr(env, "var_to_hint_override", {})))
    expr = expr.xreplace({s: backed[s] for s in expr.free_symbols if s in backed})
    expr = expr.xreplace({s: _unbacked_guess(env, s) for s in expr.free_symbols})
    return int(expr)


def _unbacked_guess(env, symbol: sympy.Symbol) -> int:
    from torch._inductor import config

    fallback = config.unbacked_symint_fallback
    upper = env.var_to_range[symbol].upper if symbol in env.var_to_range else fallback
    return int(min(upper, fallback))


def same_size(a: Size, b: Size) -> bool:
    """Whether two sizes are provably equal. Adds no guard: sizes that are equal only at the
    compiled length are not taken for the same (that would recompile at the next length),
    and a size read from the data (an unbacked symbol) is equal only to itself."""
    return statically_known_true(a == b)


def same_shape(a: Sequence[Size], b: Sequence[Size]) -> bool:
    """Whether two shapes are provably equal, dim by dim (as `same_size`)."""
    return len(a) == len(b) and all(map(same_size, a, b))


def is_one(size: Size) -> bool:
    """Whether a size is provably 1 (as `same_size`)."""
    return statically_known_true(size == 1)


def above_one(size: Size) -> bool:
    """Whether a size may exceed 1: False only where it is provably 0 or 1. A size read from
    the data may be any count: it is taken as more than one."""
    return not statically_known_true(size <= 1)


def guard(condition: torch.SymBool | bool) -> bool:
    """Evaluate a condition on sizes at the compiled length; a symbolic one becomes a guard of
    the compiled graph (Dynamo recompiles when a later length breaks it)."""
    return bool(condition)


def free_symbols(*values: object) -> set[sympy.Symbol]:
    """The size symbols in SymInts, tensors' sizes and strides, and lists of them."""
    found: set[sympy.Symbol] = set()
    for value in values:
        if isinstance(value, torch.SymInt):
            found |= value.node.expr.free_symbols
        elif isinstance(value, torch.Tensor):
            found |= free_symbols(*value.shape, *value.stride())
        elif isinstance(value, (list, tuple)):
            found |= free_symbols(*value)
    return found


class GraphSymbols:
    """Where each size symbol of a graph can be read: a node whose value is that size (a
    SymInt input, a size read from the data), or a dim of a tensor of that size (a backed
    size Dynamo did not lift to an input, an unbacked size `nonzero` made). A chunk subgraph
    is passed every symbol its inputs' sizes are made of (Inductor binds a subgraph's sizes
    only from its own inputs), whatever form the token count has: one symbol, a product, a
    sum or difference, a size read from the data."""

    def __init__(self, graph: Graph, exclude: set[Node] = frozenset()):
        self.values: dict[sympy.Symbol, torch.SymInt] = {}
        self.nodes: dict[sympy.Symbol, Node] = {}  # nodes whose value is the size
        self.dims: dict[sympy.Symbol, tuple[Node, int]] = {}  # tensor nodes with a dim of it
        for node in graph.nodes:
            if node in exclude:
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt) and _is_own_symbol(val):
                self.values.setdefault(val.node.expr, val)
                self.nodes.setdefault(val.node.expr, node)
            elif isinstance(val, torch.Tensor):
                for d, size in enumerate(val.shape):
                    if isinstance(size, torch.SymInt) and _is_own_symbol(size):
                        self.values.setdefault(size.node.expr, size)
                        self.dims.setdefault(size.node.expr, (node, d))

    def add(self, value: torch.SymInt, node: Node | None = None) -> None:
        """A size a rewrite makes (compaction.py); its node may be emitted later."""
        self.values[value.node.expr] = value
        if node is not None:
            self.nodes[value.node.expr] = node

    def missing(self, symbols: set[sympy.Symbol]) -> list[sympy.Symbol]:
        return sorted((s for s in symbols if s not in self.values), key=str)

    def sources(self, symbols: set[sympy.Symbol]) -> list[Node]:
        """The nodes the sizes `symbols` are read from (for placing the code that reads them)."""
        return [self.nodes[s] if s in self.nodes else self.dims[s][0]
                for s in symbols if s in self.nodes or s in self.dims]


def _is_own_symbol(size: torch.SymInt) -> bool:
    """Whether a size is a symbol as it was made, not one the shape environment replaced by
    another (Inductor binds a forward graph's size inputs by the symbol they were made as:
    a subgraph passed `s23`, replaced by `s17`, would not have `s17` bound)."""
    expr = size.node.expr
    if not isinstance(expr, sympy.Symbol):
        return False
    raw = size.node._expr
    return raw == expr or size.node.shape_env.unbacked_renamings.get(raw) == expr


def sorted_symbols(symbols: set[sympy.Symbol]) -> list[sympy.Symbol]:
    return sorted(symbols, key=str)


class SizeArgs:
    """Emits the FX arguments of sizes into `graph`, where each size symbol is held by a node
    (a placeholder, a size read from the data) or is a dim of a tensor (`symbols`: read
    with `sym_size` where first needed)."""

    def __init__(self, graph: Graph, nodes: dict[sympy.Symbol, Node] | None = None,
                 symbols: GraphSymbols | None = None):
        self.graph, self.nodes = graph, dict(nodes or {})
        if symbols is not None:
            self.nodes = {**symbols.nodes, **self.nodes}
        self.dims = symbols.dims if symbols is not None else {}
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
        """Nodes for the forms sizes take: symbols, sums and products of terms (with integer
        coefficients), integer powers, floor divisions and remainders, max and min."""
        if expr in self.nodes:
            return self.nodes[expr]
        if isinstance(expr, sympy.Symbol):
            if expr not in self.dims:
                raise ValueError(f"the size {expr} is read nowhere in the graph")
            self.nodes[expr] = self._call(torch.ops.aten.sym_size.int, *self.dims[expr])
            return self.nodes[expr]
        name = type(expr).__name__
        ops = {"Add": operator.add, "Mul": operator.mul, "Max": torch.sym_max, "Min": torch.sym_min}
        if name in ops:
            terms = [self._term(t) for t in expr.args]
            terms.sort(key=lambda t: isinstance(t, int))  # a node first: node op int
            out = terms[0]
            for t in terms[1:]:
                out = self._call(ops[name], out, t)
            return out
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
            base = self._term(expr.base)
            out = base
            for _ in range(int(expr.exp) - 1):
                out = self._call(operator.mul, out, base)
            return out
        binary = {"FloorDiv": operator.floordiv, "CleanDiv": operator.floordiv,
                  "Mod": operator.mod, "PythonMod": operator.mod}
        if name in binary:
            return self._call(binary[name], *(self._term(t) for t in expr.args))
        raise ValueError(f"cannot express the size {expr} in the graph")

    def _term(self, expr: sympy.Expr) -> int | Node:
        return int(expr) if isinstance(expr, sympy.Integer) else self._emit(expr)

    def _call(self, op, *args: Node | int) -> Node:
        """`op(*args)` as a node, with its value where its arguments' values are known."""
        node = self.graph.call_function(op, args)
        values = [a.meta.get("val") if isinstance(a, Node) else a for a in args]
        if all(v is not None for v in values):
            node.meta["val"] = op(*values)
        return node
