"""fla 0.6.0's side of `fla bench generate`: greedy decoding with GLAForCausalLM.generate
(bf16 weights, use_cache as fla's generation mixin decides), tokens per second after the
first token, for batches of random prompts. Prints and writes JSON records.

Usage: python3 bench/generate_fla.py --out FILE [--batches 1,64 --prompt-len 16 --new-tokens 128]
"""

import argparse
import json
import time

import torch
from fla.models import GLAConfig, GLAForCausalLM
from transformers import LogitsProcessor, LogitsProcessorList

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--batches", default="1,64")
ap.add_argument("--prompt-len", type=int, default=16)
ap.add_argument("--new-tokens", type=int, default=128)
a = ap.parse_args()

cfg = GLAConfig(hidden_size=1024, num_hidden_layers=24, num_heads=4, vocab_size=32000,
                tie_word_embeddings=False)
torch.manual_seed(0)
model = GLAForCausalLM(cfg).cuda().to(torch.bfloat16).eval()


class FirstToken(LogitsProcessor):
    """Notes when the first new token's logits arrive (the end of the prefill)."""

    def __init__(self):
        self.t = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            torch.cuda.synchronize()
            self.t = time.time()
        return scores


records = []
for b in [int(x) for x in a.batches.split(",")]:
    ids = torch.randint(0, cfg.vocab_size, (b, a.prompt_len), device="cuda")

    def run():
        first = FirstToken()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                 do_sample=False, logits_processor=LogitsProcessorList([first]),
                                 pad_token_id=0)
        torch.cuda.synchronize()
        return out, time.time() - first.t

    run()
    out, secs = run()
    new = out.shape[1] - a.prompt_len
    rec = {"impl": "fla", "B": b, "prompt": a.prompt_len, "new_tokens": int(new),
           "tokens_per_s": b * (new - 1) / secs, "device": torch.cuda.get_device_name()}
    print(json.dumps(rec))
    records.append(rec)
with open(a.out, "w") as f:
    json.dump(records, f, indent=1)
    f.write("\n")
