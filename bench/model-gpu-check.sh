#!/usr/bin/env bash
# On the lent GPU, one call: the GPU layer and model tests, training throughput of the GLA
# 340M shape (`fla bench train`), and a short language model run on the Brown corpus
# (.gpu/data/brown.txt, from bench/fetch-brown.sh) with evaluation and generation on the GPU.
# Here first: bash bench/gpu-build.sh and copy data/brown.txt into .gpu/data/; carry .gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export FLA_REQUIRE_CUDA=1 FLA_CACHE_DIR=/tmp/fk
# The tests run with unwritten buffers poisoned (NaN); the benchmarks without.
FLA_POISON_UNINIT=1 .gpu/test-gpu_layers --test-threads 1 2>&1 | grep -E "test result|panicked" | tee "$OUT/tests.log"
FLA_POISON_UNINIT=1 .gpu/test-gpu_model --nocapture --test-threads 1 2>&1 | grep -E "loss|logits|test result|panicked|off by" | tee -a "$OUT/tests.log"
.gpu/fla bench train --json "$OUT/train-ours.json" 2>&1 | tee "$OUT/train-ours.txt"
if [[ -f .gpu/data/brown.txt ]]; then
    .gpu/fla train --data .gpu/data/brown.txt --device cuda --steps 300 --batch-size 32 --seq-len 256 \
        --lr 2e-3 --eval-every 100 --save-every 0 --out "$OUT/brown" 2>&1 | tail -4 | tee "$OUT/brown.txt"
    .gpu/fla generate --model "$OUT/brown" --prompt "The jury said" --max-new-tokens 80 \
        --temperature 0.7 --seed 1 --device cuda 2>&1 | tail -3 | tee -a "$OUT/brown.txt"
    rm -rf "$OUT/brown/checkpoint" "$OUT/brown/model.safetensors"
fi
