"""mst under data parallelism: 2 CPU ranks on gloo, launched as users launch them.

Each test runs an example script in a subprocess (torchrun, accelerate launch) with --check:
the script compares its losses with a single-process run and checks every rank's mst report
(examples/torchrun_train.py, examples/hf_trainer.py). Each launch gets its own free port and
a timeout, and its whole process group is killed when the timeout expires.

What is not tested here: NCCL on GPUs.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 240  # each launch takes ~25 s on 2 CPU cores (eager compiler)
STEPS = 3
SEQ = 64

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], tmp_path: pathlib.Path, returncode: int = 0) -> str:
    """Runs `cmd` in its own session; returns its output, or fails with it unless it exits
    with `returncode`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               # no accelerate config file of the user's (accelerate reads HF_HOME/accelerate)
               HF_HOME=str(tmp_path / "hf_home"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s: {' '.join(cmd)}\n{out[-6000:]}")
    assert proc.returncode == returncode, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}"
    return out


def torchrun(parallel: str, tmp_path: pathlib.Path, *extra: str, returncode: int = 0) -> str:
    return launch([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(EXAMPLES / "torchrun_train.py"), "--parallel", parallel, "--steps", str(STEPS),
        "--seq", str(SEQ), "--compiler", "eager", "--check", *extra,
    ], tmp_path, returncode)


def assert_every_rank_rewrote(out: str) -> None:
    for rank in (0, 1):
        assert f"[rank {rank}] mst regions: 2 mlp, 1 loss" in out, out[-6000:]


def test_torchrun_ddp(tmp_path):
    """DistributedDataParallel, compiled with backend="mst", 1 MB gradient buckets (several,
    as a real model has) and Dynamo's DDP optimizer off: each step's global loss is the
    single-process eager one and both ranks rewrote both MLPs and the loss, with the same
    chunk counts."""
    out = torchrun("ddp", tmp_path)
    assert f"CHECK OK: ddp, 2 ranks, {STEPS} steps" in out, out[-6000:]
    assert sum(f"step {s} global loss" in out for s in range(STEPS)) == STEPS
    assert_every_rank_rewrote(out)


def test_torchrun_ddp_with_dynamos_ddp_optimizer_loses_the_mlps(tmp_path):
    """Known limitation, pinned: with Dynamo's DDP optimizer on (torch's default) the graph is
    split at gradient-bucket boundaries before mst sees it; the MLPs, whose weights fall in
    different buckets, are not rewritten. mst warns about it and notes it in the report. The
    numbers stay right. When mst learns to handle this, this test fails: flip it to expect
    success."""
    out = torchrun("ddp", tmp_path, "--optimize-ddp", returncode=1)
    assert "expected 2 MLP regions and a loss region, got 0 and 1" in out, out[-6000:]
    assert "Dynamo's DDP optimizer split this graph" in out, out[-6000:]
    assert "!= single-process eager" not in out, out[-6000:]
    assert "CHECK OK" not in out


def test_torchrun_fsdp2_per_layer_compile(tmp_path):
    """FSDP2 the torchtitan way: every decoder layer `fully_shard`ed and compiled, then the
    sharded top level compiled too (its graph holds the loss region)."""
    out = torchrun("fsdp2", tmp_path)
    assert f"CHECK OK: fsdp2, 2 ranks, {STEPS} steps" in out, out[-6000:]
    assert sum(f"step {s} global loss" in out for s in range(STEPS)) == STEPS
    assert_every_rank_rewrote(out)


def test_accelerate_launch_hf_trainer_two_processes(tmp_path):
    """The HF Trainer on a model compiled in place, 2 processes through `accelerate launch`:
    the Trainer's DDP on gloo logs the losses of the same training without mst.

    `--multi_gpu` is what starts 2 processes: `--cpu --num_processes 2` runs the script once
    (accelerate's CPU launcher needs `--mpirun_hostfile` and MPI for several). The script's
    `use_cpu=True` then makes accelerate pick MULTI_CPU and gloo."""
    pytest.importorskip("accelerate")
    out = launch([
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
        str(EXAMPLES / "hf_trainer.py"), "--steps", str(STEPS), "--seq", str(SEQ),
        "--compiler", "eager", "--cpu", "--check",
    ], tmp_path)
    assert "2 process(es), backend gloo, mst losses:" in out, out[-6000:]
    assert f"CHECK OK: HF Trainer, 2 process(es), {STEPS} steps" in out, out[-6000:]
    assert_every_rank_rewrote(out)
