"""fla 0.6.0's side of `fla bench train`: the same GLA model (GLAForCausalLM) trained by
PyTorch on the same GPU, f32 parameters under bf16 autocast (the mixed precision of ours),
fused AdamW, gradient clipping at 1; fla's fused norms, SwiGLU and cross-entropy as its
config enables by default. Prints and writes one JSON record.

Usage: python3 bench/train_fla.py --out FILE [--batch 8 --seq-len 2048 --steps 10]
"""

import argparse
import json
import time

import torch
from fla.models import GLAConfig, GLAForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq-len", type=int, default=2048)
ap.add_argument("--steps", type=int, default=10)
a = ap.parse_args()

cfg = GLAConfig(hidden_size=1024, num_hidden_layers=24, num_heads=4, vocab_size=32000,
                tie_word_embeddings=False)
torch.manual_seed(0)
model = GLAForCausalLM(cfg).cuda()
params = sum(p.numel() for p in model.parameters())
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                        weight_decay=0.1, fused=True)
ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


t0 = time.time()
for _ in range(2):  # Triton autotuning happens here
    step()
torch.cuda.synchronize()
warm = time.time() - t0
torch.cuda.reset_peak_memory_stats()
start = torch.cuda.Event(enable_timing=True)
end = torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(a.steps):
    loss = step()
end.record()
torch.cuda.synchronize()
ms = start.elapsed_time(end) / a.steps
free, total = torch.cuda.mem_get_info()
rec = {"impl": "fla", "params": params, "B": a.batch, "T": a.seq_len, "dtype": "bf16 autocast",
       "step_ms": ms, "tokens_per_s": a.batch * a.seq_len / ms * 1e3,
       "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
       "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
       "device_in_use_gib": (total - free) / 2**30, "warmup_s": warm, "loss": loss.item(),
       "device": torch.cuda.get_device_name()}
print(json.dumps(rec))
with open(a.out, "w") as f:
    json.dump(rec, f)
    f.write("\n")
