"""Inductor's FX-graph and AOTAutograd caches stay on under backend="mst": a second process
compiles from the cache the first filled, and its report is the stored one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    import torch.nn.functional as F
    import mst_compile

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(128, 16)
            self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
            self.head = torch.nn.Linear(16, 128, bias=False)
        def forward(self, ids, labels):
            x = self.emb(ids)
            x = x + self.down(F.gelu(self.up(x)))
            return F.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())

    torch.manual_seed(0)
    model = Model()
    ids = torch.randint(0, 128, (2, 37))
    options = json.loads(sys.argv[1])
    start = time.perf_counter()
    loss = torch.compile(model, backend="mst", options=options)(ids, ids)
    loss.backward()
    report = mst_compile.last_report()
    print(json.dumps({
        "seconds": time.perf_counter() - start, "loss": loss.item(),
        "grad": model.up.weight.grad.norm().item(),
        "from_cache": [g.from_cache for g in report.graphs],
        "regions": [(r.kind, r.chunks) for r in report.regions],
        "code": [bool(g.code) for g in report.graphs],
    }))
""")


def _run(cache_dir, options: dict) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env = {k: v for k, v in env.items() if not k.startswith(("TORCH_LOGS", "TORCH_TRACE"))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(options)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_compiles_from_the_cache_and_restores_the_report(tmp_path):
    options = {"chunks": 3, "min_bytes": 0, "strict": True}
    cold = _run(tmp_path, options)
    warm = _run(tmp_path, options)
    assert cold["from_cache"] == [False] and warm["from_cache"] == [True]
    assert warm["regions"] == cold["regions"] == [["mlp", 3], ["loss", 3]]
    assert warm["code"] == [True]
    assert warm["loss"] == cold["loss"] and warm["grad"] == cold["grad"]
    # other options are another compiled graph: the pass runs again
    other = _run(tmp_path, {**options, "chunks": 2})
    assert other["from_cache"] == [False] and other["regions"] == [["mlp", 2], ["loss", 2]]
