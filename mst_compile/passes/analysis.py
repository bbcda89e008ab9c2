"""Find regions: sequence-wise blocks whose intermediates dwarf their inputs (docs/design.md, "Regions").

A region grows from an amplifier (an `mm` whose per-token output is much wider than its
per-token input) through every value that stays Chunked and wider than that input, in the
forward and, in a joint graph, the backward; it takes in the small values between two of its
own nodes, and ends at small Chunked values (MLP output, input gradient) and Summed ones
(weight gradients, loss sums). Analysis only reads the graph.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..report import INTERNAL_ERROR, NOT_A_BLOCK, UNSUPPORTED, Kind
from .graph import ancestors, descendants
from .layout import SUMMED, Chunked, Layout
from .region import Candidate, CannotChunk, Region
from .rules import (
    all_shapes_static,
    argument_layouts,
    declared_op_problem,
    element_size,
    facts_of,
    has_rule,
    is_tensor_node,
    mixes_tokens,
    numel_of,
    output_layout,
    per_token_numel,
    rule_name,
    rule_of,
    shape_of,
    tensor_args,
)
from .symbolic import (
    GraphSymbols,
    Size,
    above_one,
    free_symbols,
    is_one,
    is_size_node,
    is_symbolic,
    same_size,
)

AMPLIFY_RATIO = 2  # an amplifier's output is at least this many times wider than its input


def amplifier_input(node: Node) -> Node | None:
    """The token-carrying input of an amplifier candidate (a matmul), or None."""
    rule = rule_of(node)
    if rule is None or rule.token_arg is None:
        return None
    return node.args[rule.token_arg]


def is_amplifier(node: Node) -> bool:
    """A matmul whose output is AMPLIFY_RATIO times wider than its token input and that is
    not the second half of a low-rank product; the rows (the token count) may be symbolic,
    the widths are numbers."""
    source = amplifier_input(node)
    if source is None:
        return False
    (rows, width_in), (out_rows, width_out) = shape_of(source), shape_of(node)
    if is_symbolic(width_in) or is_symbolic(width_out):
        return False
    if not (same_size(rows, out_rows) and above_one(rows) and width_out >= AMPLIFY_RATIO * width_in):
        return False
    return not _is_low_rank_update(node, source, width_out)


def _is_low_rank_update(seed: Node, source: Node, width_out: int) -> bool:
    """Whether the amplifier is the second half of a low-rank update added next to the layer
    it adapts (LoRA: base(x) + B(A(x)) * s; an adapter: x + up(act(down(x)))): its input is
    a narrowing matmul's output (through single-input ops: views, casts, an activation) whose
    own input is at least as wide as the amplifier's output, and its output goes, through
    single-user views and scalings, into an add with a value of its own shape. Not a block
    whose intermediate dwarfs its input: chunking it would spread over the whole model."""
    node = source
    while True:
        if node.op != "call_function" or not has_rule(node):
            return False
        narrower = amplifier_input(node)
        if narrower is not None:
            if shape_of(narrower)[-1] < width_out:
                return False
            break
        inputs = [a for _, a in tensor_args(node)]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    node = seed
    for _ in range(8):
        if len(node.users) != 1:
            return False
        (user,) = node.users
        if facts_of(user).adds:
            other = [a for _, a in tensor_args(user) if a is not node]
            return len(other) == 1 and same_size(numel_of(other[0]), numel_of(seed))
        scalars_only = all(a is node or is_one(numel_of(a)) for _, a in tensor_args(user))
        if not (has_rule(user) and scalars_only):
            return False
        node = user
    return False


def opaque_amplifier(node: Node) -> str | None:
    """Why `node` widens tokens like an MLP would but cannot seed a region, or None: an op with
    no token rule whose output keeps a floating-point input's rows and is at least
    AMPLIFY_RATIO times wider (MoE experts in an opaque grouped matmul, a custom kernel).
    Reported so that the user sees a block mst left alone."""
    if node.op != "call_function" or has_rule(node) or "val" not in node.meta:
        return None
    out = node.meta["val"]
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or not all_shapes_static([node]):
        return None
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if (isinstance(val, torch.Tensor) and val.dtype.is_floating_point
                and val.dim() == out.dim() and all_shapes_static([arg])
                and val.shape[0] == out.shape[0] > 1 and val.shape[-1] > 0
                and out.shape[-1] >= AMPLIFY_RATIO * val.shape[-1]):
            return (f"{rule_name(node)} ({node.name}) widens {arg.name} {list(val.shape)} to "
                    f"{list(out.shape)} but is not a matmul mst has a token rule for (e.g. MoE "
                    "routed experts in an opaque grouped matmul): left unchunked")
    return None


def find_regions(graph: Graph, covered: set[Node], backward: set[Node]
                 ) -> tuple[list[Region], list[Candidate]]:
    """Every region of the graph outside `covered` (the nodes of declared blocks), and every
    amplifier that did not become one. An unexpected error while growing one region makes
    that seed an INTERNAL_ERROR candidate: the others are still found."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    regions: list[Region] = []
    skipped: list[Candidate] = []
    covered = set(covered)
    for node in graph.nodes:
        if node in covered or node in backward:
            continue
        problem = declared_op_problem(node)
        if problem:
            skipped.append(Candidate(node, problem, UNSUPPORTED))
            continue
        if amplifier_input(node) is None:
            reason = opaque_amplifier(node)
            if reason:
                skipped.append(Candidate(node, reason, UNSUPPORTED))
            continue
        try:
            if not is_amplifier(node):
                continue
            region = grow_region(node, order, backward)
            if is_symbolic(region.tokens):
                check_symbolic(region)
        except CannotChunk as e:
            skipped.append(Candidate(node, str(e), e.category))
            covered.add(node)
            continue
        except Exception as e:  # noqa: BLE001 (a bug of ours must not cost the other regions)
            skipped.append(Candidate(node, f"{type(e).__name__}: {e}", INTERNAL_ERROR, e))
            covered.add(node)
            continue
        covered.update(region.layouts)
        regions.append(region)
    return regions, skipped


def check_symbolic(region: Region) -> None:
    """A symbolic token count can be chunked when the graph holds every size symbol it is
    made of (as an input, a size read from the data or a tensor's dim), every other dim is a
    number, and the region reads the symbolic sizes only in shape arguments."""
    missing = GraphSymbols(region.seed.graph).missing(free_symbols(region.tokens))
    if missing:
        raise CannotChunk(f"dynamic shape: the graph holds no size {missing} of the token "
                          f"count {region.tokens}")
    for node in region.nodes:
        layout = region.layouts[node]
        token_dims = layout.dims if isinstance(layout, Chunked) else ()
        if any(is_symbolic(size) for d, size in enumerate(shape_of(node)) if d not in token_dims):
            raise CannotChunk(f"dynamic shape: {node.name} {shape_of(node)} has a symbolic size "
                              "besides the token count")
        rule = rule_of(node)
        shape_pos = rule.shape_arg if rule else None
        for pos, arg in enumerate(node.args):
            if pos != shape_pos and isinstance(arg, Node) and is_symbolic(arg.meta.get("val")):
                raise CannotChunk(f"dynamic shape: {rule_name(node)} ({node.name}) uses the "
                                  f"symbolic size {arg.name} as a value")


def grow_region(seed: Node, order: dict[Node, int], backward: set[Node]) -> Region:
    rows, width_in = shape_of(amplifier_input(seed))
    layouts: dict[Node, Layout] = {seed: Chunked((0,))}
    region = Region(seed, rows, width_in, layouts, [], [], {})
    exits: set[Node] = set()
    queue = [seed]

    def add(node: Node, layout: Layout, is_exit: bool) -> None:
        layouts[node] = layout
        if is_exit:
            exits.add(node)
        queue.append(node)

    while queue:
        node = queue.pop()
        arg_layouts = argument_layouts(node, layouts[node], rows, layouts)
        if arg_layouts is None:
            raise CannotChunk(f"{rule_name(node)} ({node.name}) has no token rule for its arguments")
        for pos, arg in tensor_args(node):
            want = arg_layouts[pos]
            if arg in layouts:
                if layouts[arg] != want:
                    raise CannotChunk(f"{node.name} needs {arg.name} as {want}, "
                                      f"but it is {layouts[arg]}")
            elif (isinstance(want, Chunked) and per_token_numel(arg, want, rows) > width_in
                  and _pulling_in_pays(arg, want, rows)):
                add(arg, want, is_exit=False)
        if node in exits:
            continue
        for user in node.users:
            if user in layouts or not is_tensor_node(user):
                continue
            layout = output_layout(user, node, layouts[node], rows)
            if layout is None or argument_layouts(user, layout, rows, layouts) is None:
                continue
            wide = per_token_numel(user, layout, rows) > width_in
            add(user, layout, is_exit=not wide)

    _close_over_paths(region, order, backward)
    region.forward = sorted((n for n in layouts if n not in backward), key=order.__getitem__)
    region.backward = sorted((n for n in layouts if n in backward), key=order.__getitem__)
    region.inputs = _region_inputs(region)
    _check_no_wide_escape(region, backward)
    region.kind = _kind(region)
    return region


def _pulling_in_pays(arg: Node, want: Chunked, tokens: Size) -> bool:
    """Whether a wide value the region reads should be computed inside it, chunk by chunk:
    only if it has a token rule for its own arguments (a slice of a positional table has
    none: it stays an input), and the values it is computed from that would become region
    inputs take no more memory than it does (a dropout mask stays the input, not the float
    random tensor it is computed from)."""
    if arg.op != "call_function" or not has_rule(arg):
        return False
    arg_layouts = argument_layouts(arg, want, tokens)
    if arg_layouts is None:
        return False
    own = numel_of(arg) * element_size(arg)
    inputs_bytes = sum(
        numel_of(a) * element_size(a)
        for pos, a in tensor_args(arg)
        if isinstance(arg_layouts[pos], Chunked) and not has_rule(a)
    )
    return inputs_bytes <= own


def _close_over_paths(region: Region, order: dict[Node, int], backward: set[Node]) -> None:
    """Take in every node on a path between two region nodes of the same part, so that each
    part can run as one loop: a value computed outside from the loop cannot feed it back.
    Every region argument of such a node must agree on its layout."""
    layouts = region.layouts
    for in_backward in (False, True):
        part = {n for n in layouts if (n in backward) == in_backward}
        if not part:
            continue
        # sizes read from region values (`sym_size`) are recomputed from the graph's own
        # sizes by the rewrite, not taken in
        between = {n for n in descendants(part) & ancestors(part) if not is_size_node(n)}
        for node in sorted(between - set(layouts), key=order.__getitem__):
            layout = _layout_from_region_args(node, layouts, region.tokens)
            if layout is None:
                raise CannotChunk(
                    f"{rule_name(node)} ({node.name}) sits between two parts of the region "
                    "and has no token rule that agrees with all of its arguments"
                )
            layouts[node] = layout


def _layout_from_region_args(node: Node, layouts: dict[Node, Layout], tokens: Size) -> Layout | None:
    """The one output layout of `node` that every argument already in the region implies and
    that gives those arguments back their layouts; None if there is none."""
    found = {
        output_layout(node, a, layouts[a], tokens) for a in node.all_input_nodes if a in layouts
    }
    if len(found) != 1:
        return None
    layout = found.pop()
    if layout is None:
        return None
    arg_layouts = argument_layouts(node, layout, tokens, layouts)
    if arg_layouts is None or any(
        a in layouts and layouts[a] != arg_layouts[pos] for pos, a in tensor_args(node)
    ):
        return None
    return layout


def _region_inputs(region: Region) -> dict[Node, Layout]:
    inputs: dict[Node, Layout] = {}
    for node in region.nodes:
        arg_layouts = argument_layouts(node, region.layouts[node], region.tokens, region.layouts)
        if arg_layouts is None:
            raise CannotChunk(f"{rule_name(node)} ({node.name}) has no token rule for its arguments")
        positional = tensor_args(node)
        by_position = {a for _, a in positional}
        if any(a not in region.layouts and a not in by_position and not is_size_node(a)
               for a in node.all_input_nodes):
            raise CannotChunk(f"{rule_name(node)} ({node.name}) takes tensors by keyword")
        for pos, arg in positional:
            if arg in region.layouts:
                continue
            if not isinstance(arg.meta["val"], torch.Tensor):
                raise CannotChunk(f"{rule_name(node)} ({node.name}) reads one output of "
                                  f"{rule_name(arg)} ({arg.name}), which stays outside the region")
            if inputs.setdefault(arg, arg_layouts[pos]) != arg_layouts[pos]:
                raise CannotChunk(f"{arg.name} is used as both {inputs[arg]} and {arg_layouts[pos]}")
            if arg_layouts[pos] is SUMMED:
                raise CannotChunk(f"{arg.name} would have to be split as a sum")
    return inputs


def _check_no_wide_escape(region: Region, backward: set[Node]) -> None:
    """A wide value used by an op we cannot chunk would be materialised whole: no gain.
    If the amplified values never narrow back (no matmul back to a narrow width inside the
    region or after the op, no sum over the tokens), or they flow into attention, this is no
    MLP or LM-head block (an attention projection, say): not a failure of mst."""
    contracts_inside = any(
        amplifier_input(n) is not None and not region.is_wide(n) for n in region.forward
    )
    narrows = contracts_inside or any(
        region.layouts[n] is SUMMED for n in region.outputs(region.forward)
    ) or any(
        _contracted_later(n, region, backward) for n in region.outputs(region.nodes)
        if region.is_wide(n)
    )
    category = UNSUPPORTED if narrows else NOT_A_BLOCK
    for node in region.outputs(region.nodes):
        if not region.is_wide(node):
            continue
        for user in node.users:
            if user in region.layouts or user.op == "output" or is_size_node(user):
                continue
            width = per_token_numel(node, region.layouts[node], region.tokens)
            where = f"{rule_name(user)} ({user.name})"
            if mixes_tokens(user):
                raise CannotChunk(
                    f"its amplified values ({width} per token) flow into {where}, which mixes "
                    "tokens (attention): not an MLP or LM-head block (e.g. an attention "
                    "projection)",
                    NOT_A_BLOCK,
                )
            if category == NOT_A_BLOCK:
                raise CannotChunk(
                    f"its amplified values ({width} per token) never narrow back: they flow "
                    f"into {where}, which regroups or mixes tokens: not an MLP or LM-head "
                    "block (e.g. a fused attention projection)",
                    category,
                )
            raise CannotChunk(
                f"the intermediate {node.name} ({width} values per token) is used by {where}, "
                "which has no token rule (it mixes tokens or is not supported), so it would "
                "stay whole",
                category,
            )


def _contracted_later(node: Node, region: Region, backward: set[Node], limit: int = 64) -> bool:
    """Whether a wide value, followed forward through any ops while it stays wide, reaches a
    matmul back to a narrow width or a reduction per token (a loss): then it was a block,
    broken by an op without a rule (or a reshape that renumbers the tokens). Each
    path ends at its first matmul (a wide attention output's projection is another layer's
    business, not this block's contraction) and never enters the backward (gradients reach
    every matmul of the model)."""
    seen: set[Node] = set()
    stack = [u for u in node.users if u not in region.layouts]
    while stack and len(seen) < limit:
        user = stack.pop()
        if user in seen or user in backward or not is_tensor_node(user):
            continue
        seen.add(user)
        per_token = numel_of(user) // region.tokens  # a number unless another dim is symbolic
        if is_symbolic(per_token):
            continue
        if amplifier_input(user) is not None:
            if per_token <= region.input_width:
                return True
            continue
        if facts_of(user).flops is not None:
            continue  # any other matmul (attention's batched ones) ends the path
        rule = rule_of(user)
        if rule is not None and rule.reduces and per_token <= region.input_width:
            return True  # reduced per token (a loss's softmax statistics, its target's value)
        if per_token > region.input_width:
            stack.extend(user.users)
    return False


def _kind(region: Region) -> Kind:
    """What the region is, by its shape: a contraction back to a narrow width (MLP), a loss,
    or logits returned whole. Anything else is not a block worth chunking."""
    forward_outputs = region.outputs(region.forward)
    contracts_back = any(
        amplifier_input(n) is not None and not region.is_wide(n) for n in region.forward
    )
    if contracts_back:
        back_to_width = any(
            isinstance(region.layouts[n], Chunked)
            and per_token_numel(n, region.layouts[n], region.tokens) == region.input_width
            for n in forward_outputs
        )
        return Kind.MLP if back_to_width else Kind.PROJECTION
    reduces = any(
        rule_of(n).reduces and region.is_wide(n.args[0]) for n in region.forward
    )
    if reduces and (any(region.layouts[n] is SUMMED for n in forward_outputs) or any(
        _is_scalar_graph_output(n) for n in descendants(forward_outputs)
    )):
        return Kind.LOSS
    if any(region.is_wide(n) for n in region.outputs(region.nodes)):
        return Kind.LOGITS
    raise CannotChunk(
        "its amplified values are only reshaped or sliced, never contracted back nor reduced "
        "to a loss: not an MLP or LM-head block (e.g. a fused attention projection)",
        NOT_A_BLOCK,
    )


def _is_scalar_graph_output(node: Node) -> bool:
    val = node.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() == 0
            and any(u.op == "output" for u in node.users))
