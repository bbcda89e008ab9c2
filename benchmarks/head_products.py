"""What a head chunk's three matrix products cost per token, by chunk length (issue 13,
docs/decisions.md decision 26): the diagnostic behind "the full-vocabulary step's extra
time is in the per-chunk products".

A language-model head with its loss makes, per chunk of n tokens (h: [n, d], W: [V, d]):

    logits          h @ W.T          [n, V]   (Inductor: mm(h, permute(W)))
    input gradient  g @ W            [n, d]   (g: the logits gradient, [n, V])
    weight gradient acc += g.T @ h   [V, d]   (mst accumulates in place: addmm_)

Unchunked (n = the whole sequence) Inductor makes each once, the weight gradient as a plain
mm. This times each product alone, per token, at each n, in one process: the logits into a
new buffer (what both Inductor and mst do: glibc maps every buffer over 32 MB fresh, so its
pages are faulted in by the product) and into a reused one (the product alone).

    python -m benchmarks.head_products                              # V = 128256, d = 256
    python -m benchmarks.head_products --hidden 2048 --vocab 32768 --rows 256,512,4096
"""

from __future__ import annotations

import argparse
import time

import torch


def _ms_per_call(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def products_per_token(W: torch.Tensor, n: int, reps: int) -> dict[str, float]:
    """Microseconds per token of each product for a chunk of n tokens."""
    V, d = W.shape
    h, g = torch.randn(n, d), torch.randn(n, V)
    logits, grad_h, acc = torch.empty(n, V), torch.empty(n, d), torch.zeros(V, d)
    calls = {
        "logits, new buffer": lambda: torch.mm(h, W.t()),
        "logits, reused buffer": lambda: torch.mm(h, W.t(), out=logits),
        "input gradient": lambda: torch.mm(g, W, out=grad_h),
        "weight gradient": lambda: acc.addmm_(g.t(), h),
    }
    return {name: 1e3 * _ms_per_call(call, reps) / n for name, call in calls.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", default="256,512,1024,4096", help="chunk lengths n")
    parser.add_argument("--reps", type=int, default=4, help="timed calls per product (their mean)")
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if min(rows) < 1 or args.vocab < 1 or args.hidden < 1 or args.reps < 1:
        parser.error("--vocab, --hidden, --rows and --reps must be positive")
    torch.manual_seed(0)
    W = torch.randn(args.vocab, args.hidden)
    print(f"V = {args.vocab}, d = {args.hidden}, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; microseconds per token (mean of {args.reps} calls after "
          "one warm-up)")
    for n in rows:
        us = products_per_token(W, n, args.reps)
        if n == rows[0]:
            print("| n | " + " | ".join(us) + " | sum (new buffer) |")
            print("|---:|" + "---:|" * (len(us) + 1))
        total = us["logits, new buffer"] + us["input gradient"] + us["weight gradient"]
        print(f"| {n} | " + " | ".join(f"{v:.0f}" for v in us.values()) + f" | {total:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
