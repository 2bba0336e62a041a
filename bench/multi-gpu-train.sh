#!/usr/bin/env bash
# Several GPUs (issue 5), the training command itself, in one device call on a machine with 2:
# MQAR trained on one GPU, on --gpus 2 (with and without ZeRO-1, and sequence-parallel), and as
# two processes (WORLD_SIZE=2); the losses compared with the one-GPU run. Then the 340M step on
# two GPUs with the bucketed sums overlapping the backward against one sum after it.
# Here: bash bench/gpu-build.sh; there: bash bench/multi-gpu-train.sh (results under $OUT).
export FLA_CACHE_DIR=${FLA_CACHE_DIR:-/tmp/fla-kernels} NCCL_NVLS_ENABLE=0
SO=$(ls /usr/lib/x86_64-linux-gnu/libnccl.so* | head -1)
mkdir -p /tmp/nccl && ln -sf "$SO" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH=/tmp/nccl:$LD_LIBRARY_PATH
O=${OUT:-multi-gpu-train}; G=.gpu
mkdir -p "$O"
nvidia-smi -L > "$O/gpus.txt"
run() {
  local name=$1; shift
  echo "== $name: fla train --steps 40 --eval-every 20 --quiet $*"
  timeout 120 $G/fla train --steps 40 --eval-every 20 --quiet "$@" --out /tmp/mq-$name
  echo "rc $?"
}
{
  run one
  run gpus2 --gpus 2
  run gpus2zero --gpus 2 --zero
  run gpus2seq --gpus 2 --seq-parallel
  echo "== procs2: two processes, WORLD_SIZE=2"
  for r in 1 0; do
    WORLD_SIZE=2 RANK=$r LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29541 \
      timeout 120 $G/fla train --steps 40 --eval-every 20 --quiet --out /tmp/mq-procs2 &
  done
  wait
} > "$O/mqar.txt" 2>&1
python3 - > "$O/summary.txt" <<'PY'
import json
def losses(d): return [json.loads(l)["loss"] for l in open("/tmp/mq-" + d + "/metrics.jsonl")]
p = losses("one")
print("one GPU: first and last losses", p[0], p[-1])
for d in ["gpus2", "gpus2zero", "gpus2seq", "procs2"]:
    try:
        q = losses(d)
        print(d, len(q), "steps, worst relative loss difference from one GPU %.2e"
              % max(abs(a - b) / abs(a) for a, b in zip(p, q)))
    except Exception as e:
        print(d, "failed:", e)
PY
for m in "" "--bucket-mb 100000" "" "--bucket-mb 100000" "--zero"; do
  echo "== fla bench train --steps 10 --gpus 2 --batch-size 16 $m" >> "$O/summary.txt"
  timeout 120 $G/fla bench train --steps 10 --gpus 2 --batch-size 16 $m 2>&1 | grep "step \|rror" >> "$O/summary.txt"
done
cat "$O/summary.txt"
