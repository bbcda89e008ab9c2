"""Telling mst that a module or an op is token-wise: each token's outputs depend on that
token's inputs only (docs/design.md, "Declared token-wise blocks").

    mst_compile.token_wise(MyMoeBlock)                    # a module class: one block
    mst_compile.token_wise("mylib.layers.MyMoeBlock")     # the same, by qualified name
    mst_compile.token_wise(torch.ops.mylib.swiglu.default, dims=(0,), args=(0,))   # an op

A declared *module* is chunked as one unit: every ATen op its forward makes, and their
backward, run together on each mini-sequence, whatever they do inside (routing, sorting,
opaque kernels). `dims` are the token dims of the module's output, its leading dims (default:
every dim but the last, as in `[batch, seq, hidden]` or `[seq, batch, hidden]`); the values it
reads and returns carry tokens on their leading dims. A block that draws random numbers
(dropout, router jitter) is refused: its backward would draw others. A module is token-wise only if no output of one token
depends on another token: an MoE block that routes each token on its own is, one that drops
tokens by expert capacity is not (its choice of tokens changes with the chunk) and must not
be declared.

A declared *op* gets a token rule (passes/rules.py): the output, and the arguments at
positions `args` (default: every tensor argument), carry the tokens on `dims` (default: every
dim but the last, of each); the other arguments are the same for every token (weights). mst
can then grow regions through it.

mst's built-in declarations (`BUILT_IN`) are made with the same function: the sparse MoE
blocks of transformers whose routing is per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class TokenWise:
    """One declaration: `dims` None means every dim but the last."""

    def token_dims(self, rank: int) -> tuple[int, ...]:
        return self.dims if self.dims is not None else tuple(range(rank - 1))

    target: str  # the qualified class name, or the op overload's str ("mylib.swiglu.default")
    is_module: bool
    dims: tuple[int, ...] | None
    args: tuple[int, ...] | None  # ops only: the token-carrying argument positions


_DECLARED: dict[str, TokenWise] = {}

# The sparse MoE blocks of transformers: top-k routing of each token on its own (no capacity
# factor, no token dropping), the experts as grouped_mm, batched_mm or a per-expert loop.
BUILT_IN = (
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
    "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock",
)

# MoE blocks that are not token-wise: they route with an expert capacity, so which tokens
# they drop depends on the other tokens of the batch. Never chunked; reported with the reason.
NOT_TOKEN_WISE = {
    name: "it routes with an expert capacity: which tokens it drops depends on the other "
          "tokens, so a chunk would drop others: not token-wise, left whole"
    for name in (
        "transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersSparseMLP",
        "transformers.models.nllb_moe.modeling_nllb_moe.NllbMoeSparseMLP",
    )
}


def token_wise(target, dims: Sequence[int] | None = None, *, args: Sequence[int] | None = None):
    """Declare `target` (an `nn.Module` subclass, its qualified name, or an ATen/custom op
    overload) token-wise along `dims`. Returns `target`, so it also works as a class
    decorator. Raises ValueError on a bad declaration; a declared dim a value does not have
    is reported when compiling (the block is skipped with that reason)."""
    dims_t = _dims(dims, "dims")
    if isinstance(target, str) and "::" not in target:
        if "." not in target:
            raise ValueError(f"mst token_wise: {target!r} is not a qualified class name "
                             "('package.module.ClassName')")
        key, is_module = target, True
    elif isinstance(target, type) and issubclass(target, torch.nn.Module):
        key, is_module = qualified_name(target), True
    elif isinstance(target, torch._ops.OpOverload):
        key, is_module = str(target), False
    elif isinstance(target, torch._ops.OpOverloadPacket):
        raise ValueError(f"mst token_wise: {target} is an op packet; declare one overload "
                         f"(e.g. {target}.default): overloads take different arguments")
    else:
        raise ValueError(f"mst token_wise: expected an nn.Module subclass, its qualified name "
                         f"or an op overload, got {target!r}")
    if key in NOT_TOKEN_WISE:
        raise ValueError(f"mst token_wise: {key} cannot be declared token-wise: {NOT_TOKEN_WISE[key]}")
    if is_module and dims_t is not None and dims_t != tuple(range(len(dims_t))):
        raise ValueError(f"mst token_wise: a module's token dims are the leading dims of its "
                         f"output ((0,), (0, 1), ...), got {dims_t}")
    if is_module and args is not None:
        raise ValueError("mst token_wise: `args` is for ops; a module's inputs and outputs "
                         "carry their tokens on their leading dims")
    _DECLARED[key] = TokenWise(key, is_module, dims_t, _dims(args, "args"))
    return target


def forget(target) -> None:
    """Remove a declaration (a class, its name or an op)."""
    key = qualified_name(target) if isinstance(target, type) else str(target)
    _DECLARED.pop(key, None)


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def declared_module(cls: object) -> TokenWise | str | None:
    """The declaration of a module class (nn_module_stack may hold its name as a string),
    or the reason it is not token-wise (NOT_TOKEN_WISE), or None."""
    name = qualified_name(cls) if isinstance(cls, type) else str(cls)
    found = _DECLARED.get(name)
    if found is not None and found.is_module:
        return found
    return NOT_TOKEN_WISE.get(name)


def declared_op(target: object) -> TokenWise | None:
    if not isinstance(target, torch._ops.OpOverload):
        return None
    found = _DECLARED.get(str(target))
    return found if found is not None and not found.is_module else None


def declarations_key() -> str:
    """What the declarations are, for the compile cache key."""
    return repr(sorted(_DECLARED.values(), key=lambda d: d.target))


def _dims(dims: Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if dims is None:
        return None
    if isinstance(dims, int) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"mst token_wise: `{name}` must be a sequence of ints, got {dims!r}")
    found = tuple(dims)
    if not found or len(set(found)) != len(found) or min(found) < 0:
        raise ValueError(f"mst token_wise: `{name}` must list distinct dims >= 0, got {dims!r}")
    return found


for _name in BUILT_IN:
    token_wise(_name)
