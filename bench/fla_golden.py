"""Golden files for fla-model's parity tests, made with fla 0.6.0's own GLAForCausalLM.

Run on a machine with PyTorch, a GPU, fla 0.6.0 and transformers (bench/golden.sh sets
this up on the lent device). Attention goes through fla's naive recurrence
(fla.ops.gla.naive) and TF32 is off, so everything is plain f32 arithmetic; the fused Triton
RMSNorm, SwiGLU, short convolution and cross-entropy of fla's model stay in.

For each case it writes, under --out/<case>/:
  config.json, model.safetensors   save_pretrained of the model
  ids.safetensors     input_ids [B, T] (int64) and greedy_ids [1, P + N] (int64): the prompt
                      input_ids[0, :P] and N greedy tokens, each from a full forward
  expected.safetensors  logits [B, T, V], loss [1], grad.<name> for every parameter (f32)

With --ours DIR (a model directory written by fla-rs), --ours-ids FILE (input_ids) and
--ours-io FILE (logits and loss as `fla forward` wrote them), it also loads DIR in fla and
reports the relative error of fla's logits and loss against ours.
"""

import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

import fla.layers.gla as gla_layer  # noqa: E402
from fla.models import GLAConfig, GLAForCausalLM  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402


def naive_gla(q, k, v, g=None, gk=None, initial_state=None, output_final_state=False, **_):
    return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)


gla_layer.chunk_gla = naive_gla
gla_layer.fused_recurrent_gla = naive_gla
gla_layer.fused_chunk_gla = naive_gla

CASES = {
    # Short convolutions, grouped key/value heads, untied output, T across a chunk boundary.
    "conv-gqa": dict(
        config=dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                    use_short_conv=True, conv_size=4, vocab_size=97, initializer_range=0.1),
        batch=2, length=80, prompt=8, new=16,
    ),
    # Tied embeddings, clamped gates, given intermediate size.
    "tied-clamp": dict(
        config=dict(hidden_size=48, num_hidden_layers=2, num_heads=2, vocab_size=64,
                    tie_word_embeddings=True, clamp_min=-0.2, intermediate_size=96,
                    initializer_range=0.1),
        batch=3, length=33, prompt=5, new=12,
    ),
}


def build(case, seed):
    torch.manual_seed(seed)
    model = GLAForCausalLM(GLAConfig(**case["config"])).cuda().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 2.0)  # spreads the gates so that some hit clamp_min
    return model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(name, case, out, seed):
    model = build(case, seed)
    d = os.path.join(out, name)
    model.save_pretrained(d)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, case["config"]["vocab_size"], (case["batch"], case["length"]), generator=g).cuda()
    out_ = model(input_ids=ids, labels=ids)
    # Copied before the backward: fla's fused cross-entropy writes its gradient into the
    # logits in place.
    expected = {"logits": out_.logits.detach().float().cpu().clone().contiguous(),
                "loss": out_.loss.detach().float().reshape(1).cpu()}
    out_.loss.backward()
    for pname, p in model.named_parameters():
        expected[f"grad.{pname}"] = p.grad.detach().float().cpu().contiguous()
    seq = ids[:1, : case["prompt"]]
    with torch.no_grad():
        for _ in range(case["new"]):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    save_file({"input_ids": ids.cpu().contiguous(), "greedy_ids": seq.cpu().contiguous()},
              os.path.join(d, "ids.safetensors"))
    save_file(expected, os.path.join(d, "expected.safetensors"))
    return {"case": name, "loss": out_.loss.item(), "params": sum(p.numel() for p in model.parameters())}


def check_ours(model_dir, ids_file, io_file):
    model = GLAForCausalLM.from_pretrained(model_dir).cuda().float()
    io = load_file(io_file)
    ids = load_file(ids_file)["input_ids"].long().cuda()
    out = model(input_ids=ids, labels=ids)
    return {"ours_dir": model_dir, "logits_rel_err": rel(out.logits.cpu(), io["logits"]),
            "loss_fla": out.loss.item(), "loss_ours": io["loss"].item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ours")
    ap.add_argument("--ours-ids")
    ap.add_argument("--ours-io")
    a = ap.parse_args()
    import fla
    import transformers
    report = {"torch": torch.__version__, "transformers": transformers.__version__,
              "fla": getattr(fla, "__version__", "?"), "gpu": torch.cuda.get_device_name(),
              "cases": [make(n, c, a.out, a.seed) for n, c in CASES.items()]}
    if a.ours:
        report["ours"] = check_ours(a.ours, a.ours_ids, a.ours_io)
    print(json.dumps(report, indent=1))
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
