#!/usr/bin/env bash
# On the lent GPU: install fla 0.6.0 and transformers from the carried wheels (.whl, .whl/tf),
# write the golden files of crates/fla-model/tests/golden with fla's own model, and load a
# model directory written by fla-rs (.gpu/ours-model) in fla.
# Here first: bash bench/golden-prep.sh; then carry .whl and .gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
site=/tmp/site
wheels=(.whl/*.whl)
for w in .whl/tf/*.whl; do
    # Keep the device's own numpy (torch's); take the carried one only where there is none.
    if [[ $w == *numpy-* ]] && python3 -c "import numpy" 2>/dev/null; then continue; fi
    wheels+=("$w")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
export PYTHONPATH=$site
python3 bench/fla_golden.py --out "$OUT/golden" --ours .gpu/ours-model \
    --ours-ids .gpu/ours-ids.safetensors --ours-io .gpu/ours-io.safetensors
