#!/usr/bin/env bash
# On the lent GPU, in one call: the CUDA tests (which fail rather than skip there), then the
# benchmark of our kernels and bench/compare.py beside it. Needs .gpu/ from bench/gpu-build.sh
# (and .whl/ for fla, see bench/compare.py). Results land in $OUT (default bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export FLA_REQUIRE_CUDA=1 FLA_CACHE_DIR=/tmp/fla-kernels
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
status=0
for t in .gpu/test-*; do
  echo "== $t"
  FLA_POISON_UNINIT=1 "$t" --test-threads=1 --nocapture 2>&1 | tee -a "$OUT/tests.log" | grep -E "^(test |T=|varlen|strength|decode|thread|error|  left|assert)|panicked|relative" 
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "== .gpu/test-gla_cuda, two-level form with chunks of 128 rows first"
FLA_CHUNK=128 FLA_TEST_FORMS=chunk FLA_POISON_UNINIT=1 .gpu/test-gla_cuda --test-threads=1 --nocapture 2>&1 \
  | tee -a "$OUT/tests.log" | grep -E "^test |panicked|relative"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== fla bench cuda"
.gpu/fla bench cuda --json "$OUT/ours.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" || status=1
if [ "${COMPARE:-1}" = 1 ]; then
  echo "== compare"
  python3 bench/compare.py --ours "$OUT/ours.json" --out "$OUT" ${COMPARE_ARGS:-} 2>&1 | tee "$OUT/compare.txt" || status=1
fi
echo "tests+bench status: $status"
exit $status
