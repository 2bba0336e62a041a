#!/usr/bin/env bash
# On the lent GPU: device time of each of our kernels in one `fla bench cuda` configuration,
# from Nsight Compute (gpu__time_duration per launch, averaged by kernel name).
# Usage: bash bench/kernel-times.sh [fla bench cuda arguments], e.g.
#   bash bench/kernel-times.sh --configs 16x128x128 --lengths 4096 --gates key
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export FLA_CACHE_DIR=${FLA_CACHE_DIR:-/tmp/fk}
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu)
"$ncu" --metrics gpu__time_duration.sum --csv --print-units base \
  .gpu/fla bench cuda "$@" > "$OUT/ncu-times.csv" 2> "$OUT/ncu-times.err" || true
python3 - "$OUT/ncu-times.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
name, val = head.index("Kernel Name"), head.index("Metric Value")
t = collections.defaultdict(list)
for r in rows[1:]:
    t[r[name].split("(")[0]].append(float(r[val].replace(",", "")) / 1e6)
print(f"{'kernel':<16} {'launches':>8} {'mean ms':>9}")
for k, v in sorted(t.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
    print(f"{k:<16} {len(v):>8} {sum(v) / len(v):>9.4f}")
PY
