#!/usr/bin/env bash
# On the lent GPU, in one call: the chained kernels (chunk_chain, chunk_chain_bwd) checked and
# timed against the sweeps they replace. Needs .gpu/ from bench/gpu-build.sh. Results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export FLA_REQUIRE_CUDA=1 FLA_CACHE_DIR=/tmp/fla-kernels
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
status=0
tests() {  # log, then the command; every test line and error kept
  local log=$1; shift
  echo "== $* > $log"
  FLA_POISON_UNINIT=1 timeout 300 "$@" --test-threads=1 --nocapture > "$OUT/$log" 2>&1
  local rc=$?
  grep -E "^test |panicked|test result" "$OUT/$log" | tail -25
  [ $rc = 0 ] || { echo "exit $rc"; status=1; }
}
bench() {  # label, env, args
  local label=$1 env=$2; shift 2
  echo "== bench $label"
  env $env timeout 180 .gpu/fla bench cuda --gates key --decode-batches 1 --json "$OUT/$label.json" "$@" 2>&1 \
    | tee "$OUT/$label.txt" | grep -v "^decode" || status=1
}
FLA_TEST_FORMS=chunk tests tests-chain.log .gpu/test-gla_cuda
bench chain "FLA_CHAIN=1" --configs 16x128x128,4x256x512,4x128x256
bench sweeps "FLA_CHAIN=0" --configs 16x128x128,4x256x512,4x128x256
for cfg in 16x128x128 4x256x512; do
  echo "== per kernel, $cfg, T=4096 (chained, then the sweeps)"
  for c in 1 0; do
    FLA_CHAIN=$c FLA_TRACE_KERNELS=1 timeout 120 .gpu/fla bench cuda --gates key --configs $cfg \
      --lengths 4096 --decode-batches 1 2> "$OUT/trace.log" > /dev/null
    awk -f bench/kernel-times.awk "$OUT/trace.log" | sort | tee -a "$OUT/kernels.txt"
  done
done
rm -f "$OUT/trace.log"
FLA_CHUNK=128 FLA_TEST_FORMS=chunk tests tests-chain-128.log .gpu/test-gla_cuda
tests tests-model.log .gpu/test-gpu_model
FLA_CHAIN=0 FLA_TEST_FORMS=chunk tests tests-sweeps.log .gpu/test-gla_cuda
echo "chain-check status: $status"
exit $status
