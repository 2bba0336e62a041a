#!/usr/bin/env bash
# Builds here (no CUDA needed) what bench/gpu-check.sh runs on the lent GPU, into .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p fla-cli
mkdir -p .gpu
rm -rf .gpu/*
cp target/release/fla .gpu/
cargo test --release --locked -p fla-cuda -p fla-model --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], ".gpu/test-" + m["target"]["name"])
'
ls -la .gpu
