#!/usr/bin/env bash
# On the lent GPU: install fla 0.6.0 and transformers from the carried wheels (.whl, .whl/tf),
# write the golden files of crates/fla-model/tests/golden with fla's own model, and load a
# model directory written by fla-rs (.gpu/ours-model) in fla.
# Here first: bash bench/golden-prep.sh; then carry .whl and .gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
source bench/fla-env.sh
python3 bench/fla_golden.py --out "$OUT/golden" --ours .gpu/ours-model \
    --ours-ids .gpu/ours-ids.safetensors --ours-io .gpu/ours-io.safetensors
