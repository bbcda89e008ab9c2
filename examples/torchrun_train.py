"""Data-parallel training with backend="mst" under torchrun: DDP or FSDP2, CPU ranks on gloo.

    torchrun --nproc_per_node 2 examples/torchrun_train.py --parallel ddp
    torchrun --nproc_per_node 2 examples/torchrun_train.py --parallel fsdp2 --steps 5 --check

A small random-weight HF Llama (built from a config, nothing downloaded) is seeded the same on
every rank; each rank trains on its own slice of one global batch (the same number of tokens
per rank, so the mean of the rank losses is the loss of the global batch) with SGD.

  ddp    DistributedDataParallel wraps the model and the wrapper is compiled with
         backend="mst". Dynamo's DDP optimizer is turned off (torch._dynamo.config.optimize_ddp
         = False): it splits the graph at DDP's gradient-bucket boundaries before any backend
         sees it, and an MLP whose weights fall in two buckets is cut in pieces that mst no
         longer recognises as an MLP; it then chunks none of them, silently (nothing is
         reported as skipped). The cost: gradients are all-reduced after the compiled backward
         instead of overlapping with it. --optimize-ddp keeps Dynamo's default to show this.
         DDP's buckets are 1 MB here (--bucket-cap-mb) so that this small model has several,
         as a real one does with the default 25 MB.
  fsdp2  the torchtitan pattern: `fully_shard` each decoder layer and compile it with
         `layer.compile(backend="mst", ...)`, then `fully_shard` the whole model and compile
         its top level too (embedding, final norm, LM head and loss: the loss region). Nothing
         else is needed on torch 2.13 with gloo: Dynamo skips FSDP2's hooks (graph breaks
         around each sharded layer, whose own compiled graph holds its MLP region).

--check also runs the same steps in one process, eagerly, on the whole global batch (on every
rank: the model is small) and exits non-zero unless each step's global loss (the all-reduced
mean of the rank losses) matches it within 1e-4 relative, every rank's mst reports hold MLP
and loss regions, and the chunk counts are the same on every rank.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist

import mst_compile

VOCAB = 512
LAYERS = 2
LR = 0.05
RTOL = 1e-4


def build_model(hidden: int) -> torch.nn.Module:
    """A 2-layer random-weight Llama, the same on every rank (seeded before it is built)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.train()


def global_batches(steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    """The token ids of every step's global batch, the same on every rank. Labels are the ids
    (the model shifts them), so every rank's slice has batch / world * (seq - 1) loss tokens."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(steps)]


def train(model: torch.nn.Module, params: torch.nn.Module, batches: list[torch.Tensor]
          ) -> list[torch.Tensor]:
    """One SGD step of `model` (a wrapper or the module itself) per batch; the losses."""
    opt = torch.optim.SGD(params.parameters(), lr=LR)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def wrap(model: torch.nn.Module, args: argparse.Namespace, options: dict) -> torch.nn.Module:
    """The module to call: DDP around the model, compiled; or FSDP2, compiled per layer and at
    the top level."""
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        torch._dynamo.config.optimize_ddp = args.optimize_ddp
        ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        return torch.compile(ddp, backend="mst", options=options)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
        layer.compile(backend="mst", options=options)
    fully_shard(model)
    model.compile(backend="mst", options=options)
    return model


def check(args: argparse.Namespace, losses: list[torch.Tensor], reference: torch.nn.Module,
          batches: list[torch.Tensor], reports: list[mst_compile.Report]) -> list[str]:
    """What --check finds wrong on this rank (collective: every rank must call it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []
    global_losses = torch.stack(losses)
    dist.all_reduce(global_losses)
    global_losses /= world
    expected = torch.stack(train(reference, reference, batches))
    for step, (got, want) in enumerate(zip(global_losses.tolist(), expected.tolist())):
        rel = abs(got - want) / abs(want)
        if rank == 0:
            print(f"step {step} global loss {got:.6f} eager {want:.6f} rel {rel:.1e}", flush=True)
        if not rel <= RTOL:
            failures.append(f"step {step}: global loss {got} != single-process eager {want}")

    mlp = sum(r.count("mlp", "training") for r in reports)
    loss_regions = sum(r.count("loss", "training") for r in reports)
    print(f"[rank {rank}] mst regions: {mlp} mlp, {loss_regions} loss "
          f"({len(reports)} graphs)", flush=True)
    if mlp < LAYERS or loss_regions < 1:
        failures.append(f"expected {LAYERS} MLP regions and a loss region, got {mlp} and "
                        f"{loss_regions}:\n" + "\n".join(str(r).split("\n\n# ----")[0]
                                                         for r in reports))
    # The plan may not depend on the rank (a rank chunking differently would still compute
    # the same numbers here, but take other memory and time).
    mine = sorted((r.kind, r.mode, r.chunks, r.tokens) for rep in reports for r in rep.regions)
    every_rank: list = [None] * world
    dist.all_gather_object(every_rank, mine)
    if any(plan != mine for plan in every_rank):
        failures.append(f"chunk counts differ between ranks: {every_rank}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", choices=("ddp", "fsdp2"), required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunks", default="4", help='chunks per region, or "auto"')
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                        help="eager: run mst's rewritten graphs op by op (fast to compile)")
    parser.add_argument("--bucket-cap-mb", type=float, default=1.0,
                        help="DDP's gradient bucket size (at least 1: Dynamo's DDP optimizer "
                             "needs buckets no smaller than DDP's 1 MB first bucket)")
    parser.add_argument("--optimize-ddp", action="store_true",
                        help="keep Dynamo's DDP optimizer on (it hides MLPs cut by a bucket "
                             "boundary from mst)")
    parser.add_argument("--check", action="store_true",
                        help="compare with a single-process eager run, check the reports")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = args.chunks if args.chunks == "auto" else int(args.chunks)
    options = {"min_bytes": 0, "chunks": chunks}
    if args.compiler == "eager":
        options["compiler"] = "eager"

    batches = global_batches(args.steps, args.batch * world, args.seq)
    mine = [ids.chunk(world)[rank] for ids in batches]  # this rank's slice of every batch
    model = build_model(args.hidden)
    reference = copy.deepcopy(model) if args.check else None  # before any sharding
    with mst_compile.collect_reports() as reports:
        losses = train(wrap(model, args, options), model, mine)
    for step, loss in enumerate(losses):
        print(f"[rank {rank}] step {step} loss {loss.item():.6f}", flush=True)

    ok = True
    if args.check:
        failures = check(args, losses, reference, batches, reports)
        for failure in failures:
            print(f"[rank {rank}] CHECK FAILED: {failure}", file=sys.stderr, flush=True)
        every_ok = torch.tensor([0 if failures else 1])
        dist.all_reduce(every_ok, op=dist.ReduceOp.MIN)
        ok = bool(every_ok.item())
        if rank == 0 and ok:
            print(f"CHECK OK: {args.parallel}, {world} ranks, {args.steps} steps", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
