"""The options of the `mst` backend, and their validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DEFAULT_MIN_BYTES = 8 * 2**20
COMPILERS = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class MstOptions:
    """What `torch.compile(model, backend="mst", options={...})` accepts.

    chunks: number of mini-sequences per region, or "auto" (docs/design.md, Planning: at least
        the width ratio, one chunk's intermediate about the size of the region's input, and
        chunks of at most max(min_chunk_len, input width) tokens).
    memory_budget: bytes one region's live intermediate may take; derives the chunk count.
        Overrides "auto"; cannot be combined with an explicit `chunks`.
    min_bytes: regions whose intermediate (all tokens) is smaller are left alone; 0 chunks
        everything detected.
    min_chunk_len: "auto" makes chunks of at least this many tokens (short chunks run matmuls
        below the hardware's efficient size), unless `max_chunk_bytes` shortens them; an
        explicit count or budget wins.
    max_chunk_bytes: "auto" halves the chunks' minimum length, down to a quarter of
        `min_chunk_len`, while one chunk's widest intermediate would be larger than this
        (the head of a large vocabulary: 512 tokens x 128256 fp32 logits are 263 MB);
        None never shortens them.
    workspace_min_bytes: on the CPU, a loss chunk's matrix products of at least this many
        bytes (a vocabulary head's logits) are written into one buffer reused by the next
        chunk instead of a new one each: glibc maps every buffer over 32 MiB anew, and
        faulting its pages in costs each chunk's product about 40% more. None
        gives every product a new buffer.
    strict: raise on any error inside the mst passes instead of falling back to Inductor,
        and on any skipped region.
    compiler: "inductor" (the default) compiles the rewritten graphs; "eager" runs them op by
        op (same decompositions and partitioner): to tell an mst bug from an Inductor one.
    mode: an Inductor mode ("max-autotune", "reduce-overhead", ...), as torch.compile's
        `mode=`, which torch.compile does not accept together with `options=`.
    skip_ignored_rows: in a loss region, run the head only over the tokens whose label is not
        the ignore index, where mst proves that the other rows change neither the loss nor
        any gradient (docs/design.md, "Ignored rows"). The report says, per loss region,
        whether it did and why not.
    inductor: Inductor config settings for the graphs mst compiles, as torch.compile's
        `options=` would give Inductor (e.g. {"max_autotune": True}); the few mst sets itself
        are refused.
    """

    chunks: int | str = "auto"
    memory_budget: int | None = None
    min_bytes: int = DEFAULT_MIN_BYTES
    min_chunk_len: int = 512
    max_chunk_bytes: int | None = 128 * 2**20
    workspace_min_bytes: int | None = 32 * 2**20
    strict: bool = False
    compiler: str = "inductor"
    mode: str | None = None
    skip_ignored_rows: bool = True
    inductor: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> MstOptions:
        if options is None:
            return cls()
        if isinstance(options, MstOptions):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"mst options must be a dict, got {type(options).__name__}")  # noqa: TRY004 (one error type for bad options)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise ValueError(
                    f"unknown mst option {key!r}; accepted options: {', '.join(sorted(known))}"
                )
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        chunks = self.chunks
        if not (chunks == "auto" or (_is_int(chunks) and chunks >= 1)):
            raise ValueError(f"mst option 'chunks' must be 'auto' or an int >= 1, got {chunks!r}")
        budget = self.memory_budget
        if budget is not None and not (_is_int(budget) and budget > 0):
            raise ValueError(
                f"mst option 'memory_budget' must be None or an int > 0 (bytes), got {budget!r}"
            )
        if budget is not None and chunks != "auto":
            raise ValueError(
                "mst options 'chunks' and 'memory_budget' cannot both be set: "
                f"got chunks={chunks!r}, memory_budget={budget!r}"
            )
        if not (_is_int(self.min_bytes) and self.min_bytes >= 0):
            raise ValueError(
                f"mst option 'min_bytes' must be an int >= 0 (bytes), got {self.min_bytes!r}"
            )
        if not (_is_int(self.min_chunk_len) and self.min_chunk_len >= 1):
            raise ValueError(
                f"mst option 'min_chunk_len' must be an int >= 1 (tokens), got {self.min_chunk_len!r}"
            )
        cap = self.max_chunk_bytes
        if cap is not None and not (_is_int(cap) and cap > 0):
            raise ValueError(
                f"mst option 'max_chunk_bytes' must be None or an int > 0 (bytes), got {cap!r}"
            )
        reuse = self.workspace_min_bytes
        if reuse is not None and not (_is_int(reuse) and reuse >= 0):
            raise ValueError(
                f"mst option 'workspace_min_bytes' must be None or an int >= 0 (bytes), got {reuse!r}"
            )
        if self.compiler not in COMPILERS:
            raise ValueError(
                f"mst option 'compiler' must be one of {', '.join(map(repr, COMPILERS))}, "
                f"got {self.compiler!r}"
            )
        self._validate_inductor()
        for flag in ("strict", "skip_ignored_rows"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"mst option {flag!r} must be True or False, got {getattr(self, flag)!r}")  # noqa: TRY004

    def _validate_inductor(self) -> None:
        import torch._inductor

        modes = list(torch._inductor.list_mode_options())
        if self.mode is not None and self.mode not in modes:
            raise ValueError(f"mst option 'mode' must be one of {', '.join(map(repr, modes))}, "
                             f"got {self.mode!r}")
        if not isinstance(self.inductor, Mapping):
            raise ValueError(  # noqa: TRY004 (one error type for bad options)
                f"mst option 'inductor' must be a dict of Inductor config settings, got {self.inductor!r}")
        known = torch._inductor.config.get_config_copy()
        for key in self.inductor:
            if key in RESERVED_INDUCTOR:
                raise ValueError(f"mst option 'inductor' cannot set {key!r}: {RESERVED_INDUCTOR[key]}")
            if key not in known:
                raise ValueError(f"mst option 'inductor': {key!r} is not an Inductor config setting "
                                 "(torch._inductor.config)")
        if self.compiler == "eager" and (self.mode is not None or self.inductor):
            raise ValueError("mst options 'mode' and 'inductor' configure Inductor: they cannot be "
                             "combined with 'compiler': 'eager'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Inductor settings mst sets for its own graphs (backend.py), which a user may not override.
RESERVED_INDUCTOR = {
    "joint_custom_pre_pass": "it is the mst pass itself",
    "auto_chunker.enable": "Inductor's auto-chunker would chunk what mst already chunked",
}

