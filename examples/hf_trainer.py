"""Train a small HF Llama with the HF Trainer on backend="mst", in one process or several.

    python examples/hf_trainer.py --check
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 29501 \\
        examples/hf_trainer.py --check          # 2 CPU processes on gloo (see below)

The model is compiled in place, `model.compile(backend="mst", options=...)`, before the Trainer
is built:
  - `TrainingArguments(torch_compile_backend="mst")` is refused: accelerate checks the name
    against its DynamoBackend enum, which lists only torch's own backends;
  - a `torch.compile(model)` wrapper hides the model's forward signature from the Trainer, which
    then drops every dataset column (it keeps only those the forward names).

Several CPU processes: `accelerate launch --cpu --num_processes 2` (accelerate 1.15) does not
start two processes; without `--mpirun_hostfile` (and an MPI install) its CPU launcher runs the
script once. `--multi_gpu --num_processes 2` starts them through torchrun, even on a machine
without GPUs; `use_cpu=True` in TrainingArguments (this script's --cpu, the default when no
GPU is present) then makes accelerate pick MULTI_CPU and the gloo backend, and the Trainer
wraps the model in DistributedDataParallel. `torchrun --nproc_per_node 2
examples/hf_trainer.py` works too.

Under DDP this script turns Dynamo's DDP optimizer off (torch._dynamo.config.optimize_ddp =
False): Dynamo applies it to any graph traced inside DDP's forward, in-place compiled models
included, and it splits the graph at DDP's gradient-bucket boundaries before mst sees it; an
MLP cut by a boundary is then not chunked, silently. The cost: gradients are all-reduced after
the compiled backward instead of overlapping with it. DDP's buckets are 1 MB here
(--ddp-bucket-cap-mb) so that this small model has several, as a real one does with 25 MB.

--check trains again without mst (the same seeds, the same launch) and exits non-zero unless
every logged loss matches within 1e-4 relative, this process's mst report holds the MLP
and loss regions and (several processes) every process chose the same chunk counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import mst_compile

VOCAB = 512
LAYERS = 2
RTOL = 1e-4


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences, the same in every process; labels are the ids (the model
    shifts them)."""

    def __init__(self, n: int, seq: int):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(hidden: int) -> torch.nn.Module:
    """A 2-layer random-weight Llama built from a config (nothing downloaded)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def train(args: argparse.Namespace, options: dict | None) -> tuple[list[float], bool]:
    """The logged losses of `args.steps` Trainer steps; with `options`, on backend="mst"."""
    import transformers

    model = build_model(args.hidden)
    if options is not None:
        model.compile(backend="mst", options=options)
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=args.cpu or not torch.cuda.is_available(), seed=0, data_seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
            ddp_find_unused_parameters=False,  # every parameter is used: no extra graph walk
            ddp_bucket_cap_mb=args.ddp_bucket_cap_mb)
        dataset = TokenDataset(args.batch * args.steps * targs.world_size, args.seq)
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=dataset)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer.is_world_process_zero()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunks", default="4", help='chunks per region, or "auto"')
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                        help="eager: run mst's rewritten graphs op by op (fast to compile)")
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU (gloo between processes) even if a GPU is there")
    parser.add_argument("--ddp-bucket-cap-mb", type=int, default=1,
                        help="DDP's gradient bucket size, several processes (at least 1)")
    parser.add_argument("--optimize-ddp", action="store_true",
                        help="keep Dynamo's DDP optimizer on (it hides MLPs cut by a bucket "
                             "boundary from mst)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the same training without mst, check the report")
    args = parser.parse_args()
    torch._dynamo.config.optimize_ddp = args.optimize_ddp
    options = {"min_bytes": 0, "chunks": args.chunks if args.chunks == "auto" else int(args.chunks)}
    if args.compiler == "eager":
        options["compiler"] = "eager"

    with mst_compile.collect_reports() as reports:
        losses, main_process = train(args, options)
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    backend = torch.distributed.get_backend() if distributed else "none"
    if main_process:
        print(f"{world} process(es), backend {backend}, mst losses: "
              + " ".join(f"{x:.6f}" for x in losses), flush=True)
    if not args.check:
        return 0

    failures = []
    expected, _ = train(args, None)
    if len(losses) != args.steps or len(expected) != args.steps:
        failures.append(f"expected {args.steps} logged losses, got {losses} and {expected}")
    for step, (got, want) in enumerate(zip(losses, expected)):
        if not abs(got - want) <= RTOL * abs(want):
            failures.append(f"step {step}: loss {got} with mst != {want} without")
    mlp = sum(r.count("mlp", "training") for r in reports)
    loss_regions = sum(r.count("loss", "training") for r in reports)
    print(f"[rank {rank}] mst regions: {mlp} mlp, {loss_regions} loss", flush=True)
    if mlp < LAYERS or loss_regions < 1:
        failures.append(f"expected {LAYERS} MLP regions and a loss region, got {mlp} and "
                        f"{loss_regions}:\n" + "\n".join(str(r).split("\n\n# ----")[0]
                                                         for r in reports))
    if distributed:  # the plan may not depend on the rank: every process chunks alike
        mine = sorted((r.kind, r.mode, r.chunks, r.tokens) for rep in reports for r in rep.regions)
        every_rank = [None] * world
        torch.distributed.all_gather_object(every_rank, mine)
        if any(c != mine for c in every_rank):
            failures.append(f"chunk counts differ between processes: {every_rank}")
    for failure in failures:
        print(f"[rank {rank}] CHECK FAILED: {failure}", file=sys.stderr, flush=True)
    if main_process and not failures:
        print(f"without mst:      {' '.join(f'{x:.6f}' for x in expected)}", flush=True)
        print(f"CHECK OK: HF Trainer, {world} process(es), {args.steps} steps", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    exit_code = main()
    if torch.distributed.is_initialized():
        # leave the process group before the interpreter exits: a gloo group torn down by the
        # interpreter's exit can abort the process ("terminate called without an active
        # exception") after the work is done
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(exit_code)
