#!/usr/bin/env bash
# On the lent GPU, one call: the GPU model tests (generation included), then decoding speed
# of the GLA 340M shape, ours (`fla bench generate`) and fla 0.6.0's (bench/generate_fla.py).
# Here first: bash bench/gpu-build.sh; carry .gpu and .whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export FLA_REQUIRE_CUDA=1 FLA_CACHE_DIR=/tmp/fk
.gpu/test-gpu_model --nocapture --test-threads 1 2>&1 | grep -E "loss|logits|test result|panicked|off by" | tee "$OUT/tests.log"
.gpu/fla bench generate --json "$OUT/generate-ours.json" 2>&1 | tee "$OUT/generate-ours.txt"
source bench/fla-env.sh
timeout "${FLA_TIMEOUT:-420}" python3 bench/generate_fla.py --out "$OUT/generate-fla.json" 2>&1 | tail -4 | tee "$OUT/generate-fla.txt"
