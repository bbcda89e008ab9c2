"""Does a runtime loop keep compile time flat in the chunk count? (docs/decisions.md,
decision 20; issue 13). A chunked SwiGLU MLP (T = 8192 tokens, hidden 256, intermediate
1024, fp32), one training step (forward + backward) under torch.compile with Inductor, its
n chunks written four ways:

    A  unrolled: a Python loop over x.split(T // n)
    B  invoke_subgraph: the same loop, the chunk function a torch.compiler.nested_compile_region
       (one subgraph called n times: what mst's rewrite emits)
    C  scan: torch._higher_order_ops.scan over the chunks stacked as [n, T // n, d]
    D  while_loop: torch._higher_order_ops.while_loop writing each chunk into a buffer

Each (variant, n) runs in a fresh process with its own empty Inductor cache; "compile" is the
first step's wall time minus the median of 3 warm steps; "correct" is every gradient within
1e-4 of the same chunked loop run eagerly.

    python -m benchmarks.loop_compile                        # every variant, n = 4 ... 64
    python -m benchmarks.loop_compile --variants A,B,C --ns 4,64
    python -m benchmarks.loop_compile --one C 16             # one child run (one JSON line)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

T, D, I = 8192, 256, 1024
VARIANTS = ["A", "B", "C", "D"]
NAMES = {"A": "unrolled", "B": "invoke_subgraph", "C": "scan", "D": "while_loop"}


def child(variant, n):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x0 = torch.randn(T, D)
    Wg0 = torch.randn(I, D) / D**0.5
    Wu0 = torch.randn(I, D) / D**0.5
    Wd0 = torch.randn(D, I) / I**0.5

    def mlp(xc, Wg, Wu, Wd):
        return F.linear(F.silu(F.linear(xc, Wg)) * F.linear(xc, Wu), Wd)

    c = T // n

    def f_unrolled(x, Wg, Wu, Wd):
        return torch.cat([mlp(xc, Wg, Wu, Wd) for xc in x.split(c)])

    region = torch.compiler.nested_compile_region(mlp)

    def f_invoke(x, Wg, Wu, Wd):
        return torch.cat([region(xc, Wg, Wu, Wd) for xc in x.split(c)])

    def f_scan(x, Wg, Wu, Wd):
        from torch._higher_order_ops.scan import scan

        xs = x.reshape(n, c, D)

        def combine(carry, xc):
            # weights are closed over; dynamo lifts them as additional_inputs
            return carry + 1.0, mlp(xc, Wg, Wu, Wd)

        init = torch.zeros((), dtype=x.dtype)
        _, ys = scan(combine, init, xs)
        return ys.reshape(T, D)

    def f_while(x, Wg, Wu, Wd):
        from torch._higher_order_ops.while_loop import while_loop

        xs = x.reshape(n, c, D)

        def cond_fn(i, acc):
            return i < n

        def body_fn(i, acc):
            xc = xs.index_select(0, i.reshape(1)).reshape(c, D)
            y = mlp(xc, Wg, Wu, Wd)
            return i + 1, acc.index_copy(0, i.reshape(1), y.reshape(1, c, D))

        i0 = torch.zeros((), dtype=torch.int64)
        acc0 = torch.zeros(n, c, D, dtype=x.dtype)
        _, acc = while_loop(cond_fn, body_fn, (i0, acc0))
        return acc.reshape(T, D)

    fn = {"A": f_unrolled, "B": f_invoke, "C": f_scan, "D": f_while}[variant]

    def make_leaves():
        return [t.clone().requires_grad_(True) for t in (x0, Wg0, Wu0, Wd0)]

    def step(f, leaves):
        for t in leaves:
            t.grad = None
        loss = f(*leaves).square().sum()
        loss.backward()
        return loss.detach(), [t.grad.clone() for t in leaves]

    # eager reference: plain chunked loop (variant A function) without torch.compile
    ref_leaves = make_leaves()
    ref_loss, ref_grads = step(f_unrolled, ref_leaves)

    res = {"variant": variant, "name": NAMES[variant], "n": n, "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    compiled = torch.compile(fn, fullgraph=True)
    leaves = make_leaves()
    try:
        t0 = time.perf_counter()
        loss, grads = step(compiled, leaves)
        res["first_step_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        res["error"] = f"{type(e).__name__}: " + " | ".join(l for l in msg[:4] if l.strip())[:600]
        return res
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss, grads = step(compiled, leaves)
        warm.append(time.perf_counter() - t0)
    res["warm_s"] = statistics.median(warm)
    res["warm_all"] = warm
    res["compile_s"] = res["first_step_s"] - res["warm_s"]
    # eager step time of the same variant function (no torch.compile) for context
    eager_t = []
    for _ in range(3):
        t0 = time.perf_counter()
        step(f_unrolled, ref_leaves)
        eager_t.append(time.perf_counter() - t0)
    res["eager_step_s"] = statistics.median(eager_t)
    rels = []
    for g, r in zip(grads, ref_grads):
        rels.append(((g - r).norm() / r.norm()).item())
    res["loss_rel"] = abs((loss - ref_loss) / ref_loss).item()
    res["grad_rel"] = rels
    res["correct"] = bool(max(rels) < 1e-4 and res["loss_rel"] < 1e-4)
    from torch._dynamo.utils import counters

    res["unique_graphs"] = counters["stats"]["unique_graphs"]
    res["graph_breaks"] = sum(counters["graph_break"].values())
    # size of the generated Inductor wrapper code (all .py files written to the cache dir)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    lines = 0
    hops = {"invoke_subgraph": 0, "while_loop": 0}
    if cache:
        for root, _, files in os.walk(cache):
            for fname in files:
                if fname.endswith(".py"):
                    with open(os.path.join(root, fname)) as f:
                        txt = f.read()
                    if "def call(" in txt:
                        lines += txt.count("\n")
                        # rough markers of loop/subgraph codegen in the wrapper
                        hops["while_loop"] += txt.count("while should_loop")
                        hops["invoke_subgraph"] += txt.count("subgraph_")
    res["wrapper_py_lines"] = lines
    res["wrapper_markers"] = hops
    return res


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read()


def run_child(variant, n, timeout):
    tmp = tempfile.mkdtemp(prefix=f"inductor_{variant}{n}_")
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = tmp
    env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.loop_compile", "--one", variant, str(n)],
                           env=env, capture_output=True, text=True, timeout=timeout, check=False)
        out = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if out:
            res = json.loads(out[-1][len("RESULT "):])
        else:
            res = {"variant": variant, "name": NAMES[variant], "n": n,
                   "error": f"child rc={p.returncode}: " + " | ".join(p.stderr.strip().splitlines()[-4:])[:600]}
    except subprocess.TimeoutExpired:
        res = {"variant": variant, "name": NAMES[variant], "n": n, "error": f"timeout after {timeout}s"}
    res["proc_wall_s"] = time.perf_counter() - t0
    res["loadavg_after"] = _loadavg().split()[:3]
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2)
    ap.add_argument("--variants", default="A,B,C,D")
    ap.add_argument("--ns", default="4,8,16,32,64")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default="bench-out/loop_compile.jsonl")
    a = ap.parse_args()
    if a.one:
        res = child(a.one[0], int(a.one[1]))
        print("RESULT " + json.dumps(res), flush=True)
        return
    variants = a.variants.split(",")
    ns = [int(v) for v in a.ns.split(",")]
    print("loadavg start:", _loadavg().strip(), flush=True)
    results = []
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "a") as fh:
        for n in ns:  # interleave: all variants for one n, then next n
            for v in variants:
                r = run_child(v, n, a.timeout)
                results.append(r)
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                if "error" in r:
                    print(f"{NAMES[v]:16s} n={n:3d} ERROR {r['error'][:300]}  load={r['loadavg_after']}", flush=True)
                else:
                    print(f"{NAMES[v]:16s} n={n:3d} compile={r['compile_s']:7.2f}s first={r['first_step_s']:7.2f}s "
                          f"warm={r['warm_s']:.4f}s eager={r['eager_step_s']:.4f}s correct={r['correct']} "
                          f"maxrel={max(r['grad_rel']):.2e} wrapper_lines={r['wrapper_py_lines']} "
                          f"load={r['loadavg_after']}", flush=True)
    print("loadavg end:", _loadavg().strip(), flush=True)


if __name__ == "__main__":
    main()
