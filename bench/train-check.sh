#!/usr/bin/env bash
# On the lent GPU, one call: the GPU model tests, then training throughput of the GLA 340M
# shape, ours (`fla bench train`) and fla 0.6.0's (bench/train_fla.py), results in $OUT.
# Here first: bash bench/gpu-build.sh; carry .gpu and .whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export FLA_REQUIRE_CUDA=1 FLA_CACHE_DIR=/tmp/fk
.gpu/test-gpu_layers --test-threads 1 2>&1 | tail -2 | tee "$OUT/tests.log"
.gpu/test-gpu_model --nocapture --test-threads 1 2>&1 | grep -E "loss|test result|panicked|off by" | tee -a "$OUT/tests.log"
.gpu/fla bench train --json "$OUT/train-ours.json" 2>&1 | tee "$OUT/train-ours.txt"
source bench/fla-env.sh
timeout "${FLA_TIMEOUT:-480}" python3 bench/train_fla.py --out "$OUT/train-fla.json" 2>&1 | tail -3 | tee "$OUT/train-fla.txt"
