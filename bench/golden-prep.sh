#!/usr/bin/env bash
# Here, before bench/golden.sh on the GPU: a model directory written by fla-rs and its
# logits, for fla to load and compare (.gpu/ours-*), and the wheels (.whl).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p fla-cli
mkdir -p .gpu
rm -rf .gpu/ours-model
printf '%s\n' '{"model_type": "gla", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2,' \
    ' "use_short_conv": true, "vocab_size": 50, "initializer_range": 0.1, "note": "written by fla-rs"}' \
    > .gpu/ours-config.json
./target/release/fla init --config .gpu/ours-config.json --output .gpu/ours-model --seed 3
python3 - <<'PY'
import json, struct
ids = [(i * 7 + 3) % 50 for i in range(2 * 40)]
head = json.dumps({"input_ids": {"dtype": "I64", "shape": [2, 40], "data_offsets": [0, 8 * len(ids)]}}).encode()
head += b" " * (-len(head) % 8)
with open(".gpu/ours-ids.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(struct.pack("<q", i) for i in ids))
PY
./target/release/fla forward --model .gpu/ours-model --input .gpu/ours-ids.safetensors \
    --output .gpu/ours-io.safetensors
if [[ ! -d .whl/tf ]]; then
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        fla-core==0.6.0 flash-linear-attention==0.6.0
    pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl/tf \
        "transformers>=5.6.2,<6" einops
fi
