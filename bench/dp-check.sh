#!/usr/bin/env bash
# Data parallelism on the lent GPU (issue 5), in one device call: the data-parallel, NCCL,
# model and layer tests, the training step with one NCCL rank (with and without ZeRO-1)
# against the plain step, and MQAR trained plain, on --gpus 1, on --gpus 1 --zero and on
# --gpus 1 --seq-parallel.
# Here: bash bench/gpu-build.sh; there: bash bench/dp-check.sh (results under $OUT).
export FLA_CACHE_DIR=${FLA_CACHE_DIR:-/tmp/fla-kernels} FLA_REQUIRE_CUDA=1 FLA_REQUIRE_NCCL=1
# cudarc opens libnccl.so; the system has only libnccl.so.2.
SO=$(ls /usr/lib/x86_64-linux-gnu/libnccl.so* | head -1)
mkdir -p /tmp/nccl && ln -sf "$SO" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH
O=${OUT:-dp-check}; G=.gpu
mkdir -p "$O"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$O/gpu.txt"
t() {
  local name=$1 s; shift; s=$(date +%s)
  "$@" > "$O/$name.log" 2>&1
  echo "$name rc $? ($(( $(date +%s) - s )) s)" | tee -a "$O/summary.txt"
}
t dp $G/test-gpu_data_parallel --test-threads=1 --nocapture
t nccl $G/test-nccl --test-threads=1 --nocapture
t model $G/test-gpu_model --test-threads=2
t layers $G/test-gpu_layers --test-threads=2
for m in "" "--gpus 1" "--gpus 1 --zero"; do
  echo "== fla bench train $m --steps 10"
  $G/fla bench train $m --steps 10
done > "$O/bench-train.txt" 2>&1
for r in "" "--gpus 1" "--gpus 1 --zero" "--gpus 1 --seq-parallel"; do
  d=/tmp/mqar-$(echo "plain $r" | tr -d ' -')
  echo "== fla train --steps 40 --eval-every 20 --quiet $r"
  $G/fla train --steps 40 --eval-every 20 --quiet $r --out "$d"
done > "$O/mqar.txt" 2>&1
python3 - >> "$O/summary.txt" <<'PY'
import json
def losses(d): return [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl")]
p = losses("/tmp/mqar-plain")
for d in ["/tmp/mqar-plaingpus1", "/tmp/mqar-plaingpus1zero", "/tmp/mqar-plaingpus1seqparallel"]:
    try:
        q = losses(d)
        print(d, len(q), "steps, worst relative loss difference from plain %.2e"
              % max(abs(a - b) / abs(a) for a, b in zip(p, q)))
    except Exception as e:
        print(d, "failed:", e)
PY
grep -h "test result\|panicked\|FAILED" "$O"/*.log | sort | uniq -c >> "$O/summary.txt"
grep -h "step .* ms" "$O/bench-train.txt" >> "$O/summary.txt"
cat "$O/summary.txt"
