#!/usr/bin/env bash
# Every GPU measurement of this repository in one go, on one CUDA GPU, into OUT (default results/benchmark/gpu-run):
#
#   benchmarks/gpu_all.sh [OUT]          # from the repository root; at most 300 + 120 + 150 s
#
# 1. `parameternet benchmark gpu`: ParameterNet-600M against GhostNet-600M (training fp32 / bf16 / channels_last,
#    memory, inference) and a LLaMA with 8 experts on down_proj against the dense one; OUT/gpu.csv (with the GPU,
#    torch, CUDA and the commit: set PARAMETERNET_COMMIT when the tree has no .git).
# 2. benchmarks/triton_depthwise_speed.py: the Triton depthwise kernels against cuDNN per layer geometry.
# 3. benchmarks/gpu_layers.py --profile: every functional-core implementation per layer geometry, and the top
#    kernels of a whole-model bf16 training step.
# A step that fails or runs past its time is reported and the next one runs; the exit status is the first failure's.
set -uo pipefail
out=${1:-results/benchmark/gpu-run}
py=${PYTHON:-python3}
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_all.sh: no CUDA device here; 'parameternet benchmark gpu --smoke' runs the benchmark's code on a CPU" >&2
    exit 2
fi
mkdir -p "$out" || exit 2
status=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" > >(tee "$out/$name.log") 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || { echo "== $name: exit $rc"; [ "$status" -ne 0 ] || status=$rc; }
}
step benchmark_gpu 300 "$py" -m parameternet benchmark gpu --output "$out"
step triton_depthwise 120 "$py" benchmarks/triton_depthwise_speed.py --budget 60 --csv "$out/triton_depthwise.csv"
step gpu_layers 150 "$py" benchmarks/gpu_layers.py --csv "$out/gpu_layers.csv" --profile "$out/top_kernels.txt"
exit "$status"
