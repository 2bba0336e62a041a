#!/usr/bin/env bash
# Several GPUs (issue 5), in one device call on a machine with 2 or more: the two-GPU tests,
# data-parallel scaling of the training step (GLA 340M shape, 8 x 2048 per GPU) from 1 to N
# GPUs, and the longest sequence (batch 1) whose training step fits on one GPU against N
# sequence-parallel ones. NVLink multicast stays off (NCCL_NVLS_ENABLE=0, set by the binaries).
# Here: bash bench/gpu-build.sh; there: bash bench/multi-gpu-check.sh N (results under $OUT).
N=${1:-2}
export FLA_CACHE_DIR=${FLA_CACHE_DIR:-/tmp/fla-kernels} FLA_REQUIRE_CUDA=1 FLA_REQUIRE_NCCL=1
export NCCL_NVLS_ENABLE=0
SO=$(ls /usr/lib/x86_64-linux-gnu/libnccl.so* | head -1)
mkdir -p /tmp/nccl && ln -sf "$SO" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH
O=${OUT:-multi-gpu-check}; G=.gpu
mkdir -p "$O"
S="$O/summary.txt"
nvidia-smi -L > "$O/gpus.txt"; nvidia-smi topo -m >> "$O/gpus.txt" 2>&1
t() {
  local name=$1 s; shift; s=$(date +%s)
  timeout 240 "$@" > "$O/$name.log" 2>&1
  echo "$name rc $? ($(( $(date +%s) - s )) s)" | tee -a "$S"
}
t nccl2 $G/test-nccl --ignored --test-threads=1 --nocapture
t dp2 $G/test-gpu_data_parallel --ignored --test-threads=1 --nocapture
grep -h "^test \|test result" "$O/nccl2.log" "$O/dp2.log" >> "$S"
# Data-parallel scaling: 8 sequences of 2048 per GPU.
bench() {
  local name=$1 s; shift; s=$(date +%s)
  timeout 150 $G/fla bench train --steps 6 "$@" > "$O/bench-$name.txt" 2>&1
  echo "== $name: fla bench train --steps 6 $* (rc $?, $(( $(date +%s) - s )) s)" >> "$S"
  grep -h "step .* ms\|Error\|error" "$O/bench-$name.txt" >> "$S"
}
bench plain1
bench dp1 --gpus 1
bench dp$N --gpus $N --batch-size $((8 * N))
bench dp${N}zero --gpus $N --batch-size $((8 * N)) --zero
# The longest sequence: one GPU, then N sequence-parallel GPUs (batch 1), each run up to the
# first length that does not fit (a rank out of memory leaves the others waiting: the
# timeout ends them).
long() {
  local name=$1 s; shift; s=$(date +%s)
  timeout 100 $G/fla bench train --steps 1 --batch-size 1 "$@" > "$O/bench-$name.txt" 2>&1
  local rc=$?
  echo "== $name: fla bench train --steps 1 --batch-size 1 $* (rc $rc, $(( $(date +%s) - s )) s)" >> "$S"
  grep -h "step .* ms\|rror" "$O/bench-$name.txt" | head -3 >> "$S"
  return $rc
}
for T in 98304 131072 163840 196608; do
  long one-$T --seq-len $T || break
done
for T in $((98304 * N)) $((131072 * N)) $((163840 * N)) $((196608 * N)); do
  long sp$N-$T --gpus $N --seq-parallel --seq-len $T || break
done
cat "$S"
