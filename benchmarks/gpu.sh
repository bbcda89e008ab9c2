#!/usr/bin/env bash
# One GPU session: the CUDA numerics tests, then the benchmark's GPU mode, each step under its
# own time limit so that one slow or failing step leaves the others their time.
#
#     bash benchmarks/gpu.sh OUT_DIR [TESTS_S BENCH_1B_S BENCH_PROXY_S]
#
# The limits are seconds (defaults 200, 360 and 0: a step given 0 s is skipped); each benchmark
# process gets 6/10 of its step's limit.
#
# Run from the repository root. Needs: a CUDA device, torch (>= 2.11) with Triton, transformers,
# pytest, hypothesis; installs this checkout only if its backend entry point is not found
# (pip --no-deps --no-index --no-build-isolation: no network).
# Writes the logs and each benchmark's results.json / results.md under OUT_DIR.
set -u
out=${1:?usage: gpu.sh OUT_DIR [TESTS_S BENCH_1B_S BENCH_PROXY_S]}
tests_s=${2:-200}
big_s=${3:-360}
proxy_s=${4:-0}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    [ "$limit" -gt 0 ] || return 0
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $((SECONDS - start)) s (limit $limit)" | tee -a "$out/summary.txt"
    tail -n 15 "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'
    nproc
} 2>&1 | tee "$out/summary.txt"
# the backend is found through its entry point: this checkout's metadata (mst_compile.egg-info,
# found on sys.path from the repository root) or an install of it
$py -c 'from importlib.metadata import entry_points as e; assert "mst" in e(group="torch_dynamo_backends").names' \
    || $py -m pip install -q --no-deps --no-index --no-build-isolation -e . \
    || { echo "no mst backend entry point and the install failed"; exit 1; }

# every CUDA case but four that repeat what others cover (GPT-2, nanoGPT, two fp32 prefills),
# about 2:45 with cold Triton compiles on an H200
step tests "$tests_s" $py -m pytest -v --tb=short --durations=0 -m cuda -p no:cacheprovider tests \
    -k "not hf_gpt2 and not nanogpt and not swiglu-infer and not qwen2-infer"
step bench-llama-1b "$big_s" $py -m benchmarks --device cuda --workload llama-1b --seq 16384 \
    --steps 3 --modes inductor,mst --checkpointing off --out "$out/llama-1b" --timeout "$((big_s * 6 / 10))"
step bench-proxy "$proxy_s" $py -m benchmarks --device cuda --workload proxy --seq 16384 \
    --steps 3 --modes inductor,mst --checkpointing off --out "$out/proxy" --timeout "$((proxy_s * 6 / 10))"
cat "$out/summary.txt"
