"""Reports kept next to Inductor's caches.

A graph loaded from the AOTAutograd or FX-graph cache is not traced again, so the mst pass
does not run and would leave no report. The report of each compiled graph is therefore
stored (JSON, in Inductor's cache directory) under a key made of what decides the compiled
graph: the Dynamo graph's code, its inputs' metadata, grad mode, the mst options and source,
and the torch version; a compile that ran no pass reads it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from .report import GraphReport, RegionReport, SkippedRegion

NOT_FOUND = ("compiled from Inductor's cache, and no report was stored for it (the cache was "
             "filled by another mst version or the report file was removed)")


def graph_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], salt: str) -> str:
    """A key for the compiled form of `gm` with these inputs; `salt`: the options and source."""
    digest = hashlib.sha256()
    for part in (gm.code, salt, torch.__version__, str(torch.is_grad_enabled())):
        digest.update(part.encode())
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            meta = (tuple(map(str, x.shape)), tuple(map(str, x.stride())), x.dtype, x.device,
                    x.requires_grad)
        else:
            meta = (type(x).__name__, str(x))
        digest.update(repr(meta).encode())
    return digest.hexdigest()


def _path(key: str) -> pathlib.Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return pathlib.Path(cache_dir()) / "mst_reports" / f"{key}.json"


def store(key: str, graphs: list[GraphReport]) -> None:
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([dataclasses.asdict(g) for g in graphs])
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)  # atomic: ranks compiling the same graph may race


def load(key: str) -> list[GraphReport] | None:
    try:
        data = json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None
    return [_graph_report(g) for g in data]


def _graph_report(data: dict[str, Any]) -> GraphReport:
    regions = [RegionReport(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
               for r in data.pop("regions")]
    skipped = [SkippedRegion(**s) for s in data.pop("skipped")]
    data["from_cache"] = True
    return GraphReport(**data, regions=regions, skipped=skipped)
