#!/usr/bin/env python3
"""Side by side on one GPU: our kernels (the JSON of `fla bench cuda`), fla 0.6.0's Triton
kernels and PyTorch's scaled_dot_product_attention (flash and cuDNN back ends), bf16, 32768
tokens per batch. Also measures the two ceilings (device copy bandwidth, bf16 GEMM rate) and
gives each row its floor: bytes that must move over bandwidth, FLOPs over GEMM rate.

fla: install the wheels first (pip install --no-deps --target /tmp/site .whl/*.whl and put
/tmp/site on PYTHONPATH); without them the fla rows are skipped, saying so.
Writes OUT/kernels-<gpu>.json: a list of {op, impl, B, T, H, K, V, fwd_ms, fwdbwd_ms, ...}.
"""
import argparse
import json
import math
import os
import statistics

import torch

TOKENS = 32768


def time_ms(fn, warmup=3, reps=20):
    """Median of `reps` runs of fn, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings():
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    bandwidth = 2 * x.numel() * 4 / (ms * 1e-3)  # bytes read + written per second
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(lambda: a @ b)
    rate = 2 * n**3 / (ms * 1e-3)
    return bandwidth, rate


def gla_floor(op, B, T, H, K, V, bandwidth, rate, chunk=64):
    """Floors of the chunk form in bf16: (fwd_ms, fwdbwd_ms)."""
    tokens = B * T * H
    gk = 1 if op == "chunk_simple_gla" else K  # a scalar gate is one number per head
    fwd_bytes = tokens * 2 * (2 * K + gk + 2 * V)  # q k g v in, o out
    bwd_bytes = tokens * 2 * (2 * K + gk + 2 * V + 2 * K + gk + V)  # q k g v do in; dq dk dg dv out
    fwd_flops = tokens * (2 * chunk * (K + V) + 4 * K * V)
    bwd_flops = tokens * (6 * chunk * (K + V) + 10 * K * V)
    f = max(fwd_bytes / bandwidth, fwd_flops / rate) * 1e3
    fb = max((fwd_bytes + bwd_bytes) / bandwidth, (fwd_flops + bwd_flops) / rate) * 1e3
    return f, fb


def sdpa_rows(lengths, rate, bandwidth):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    rows = []
    H, D = 16, 128
    for T in lengths:
        B = TOKENS // T
        q, k, v = (torch.randn(B, H, T, D, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, dtype=torch.bfloat16, device="cuda")
        for name, backend in [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]:
            try:
                with sdpa_kernel(backend):
                    fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

                    def both():
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        torch.autograd.grad(o, (q, k, v), do)

                    fb = time_ms(both)
            except Exception as e:  # a back end this GPU or build lacks
                print(f"{name} T={T}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            flops = 4 * B * H * T * T * D / 2
            floor_f = max(flops / rate, 4 * B * T * H * D * 2 / bandwidth) * 1e3
            floor_fb = max(3.5 * flops / rate, 11 * B * T * H * D * 2 / bandwidth) * 1e3
            rows.append(dict(op="sdpa_causal", impl=name, B=B, T=T, H=H, K=D, V=D, fwd_ms=fwd, fwdbwd_ms=fb,
                             floor_fwd_ms=floor_f, floor_fwdbwd_ms=floor_fb))
    return rows


def fla_rows(ops, configs, lengths):
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        print(f"fla: skipped ({type(e).__name__}: {e})")
        return []
    fns = {"chunk_gla": chunk_gla, "chunk_simple_gla": chunk_simple_gla}
    rows = []
    for op in ops:
        for H, K, V in configs:
            for T in lengths:
                B = TOKENS // T
                gen = lambda *s: torch.randn(*s, dtype=torch.bfloat16, device="cuda")
                q, k = gen(B, T, H, K), gen(B, T, H, K)
                v = gen(B, T, H, V)
                gshape = (B, T, H) if op == "chunk_simple_gla" else (B, T, H, K)
                g = (torch.nn.functional.logsigmoid(torch.randn(*gshape, device="cuda")) / 16).to(torch.bfloat16)
                for x in (q, k, v, g):
                    x.requires_grad_(True)
                do = gen(B, T, H, V)
                fn = fns[op]
                try:
                    fwd = time_ms(lambda: fn(q, k, v, g)[0])

                    def both():
                        o = fn(q, k, v, g)[0]
                        torch.autograd.grad(o, (q, k, v, g), do)

                    fb = time_ms(both)
                except Exception as e:
                    print(f"fla {op} T={T} H={H} K={K} V={V}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                    continue
                rows.append(dict(op=op, impl="fla", B=B, T=T, H=H, K=K, V=V, fwd_ms=fwd, fwdbwd_ms=fb))
                print(f"fla {op} B={B} T={T} H={H} K={K} V={V}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
    return rows


def fla_decode_rows(configs, batches):
    """fla's fused_recurrent_gla on one token per sequence from a given state: the decode step."""
    try:
        from fla.ops.gla import fused_recurrent_gla
    except Exception as e:
        print(f"fla decode: skipped ({type(e).__name__}: {e})")
        return []
    rows = []
    for H, K, V in configs:
        for B in batches:
            gen = lambda *s: torch.randn(*s, dtype=torch.bfloat16, device="cuda")
            q, k, v = gen(B, 1, H, K), gen(B, 1, H, K), gen(B, 1, H, V)
            g = torch.nn.functional.logsigmoid(torch.randn(B, 1, H, K, device="cuda")) / 16
            h0 = torch.randn(B, H, K, V, dtype=torch.float32, device="cuda")
            try:
                ms = time_ms(lambda: fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True),
                             warmup=10, reps=200)
            except Exception as e:
                print(f"fla decode B={B} H={H} K={K} V={V}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                continue
            rows.append(dict(op="decode", impl="fla", B=B, T=1, H=H, K=K, V=V, fwd_ms=ms, fwdbwd_ms=None))
            print(f"fla decode B={B} H={H} K={K} V={V}: {ms * 1e3:.1f} us", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--fla-lengths", default="", help="T values for fla (few: each new shape autotunes)")
    p.add_argument("--fla-ops", default="chunk_gla")
    p.add_argument("--fla-configs", default="16x128x128,4x256x512", help="HxKxV for fla")
    p.add_argument("--decode-batches", default="1,64", help="B of fla's decode rows (empty: none)")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    gpu = torch.cuda.get_device_name()
    bandwidth, rate = ceilings()
    print(f"{gpu}: copy {bandwidth / 1e12:.2f} TB/s (read+write), bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    rows = json.load(open(args.ours))
    rows += sdpa_rows(lengths, rate, bandwidth)
    fla_lengths = [int(x) for x in args.fla_lengths.split(",") if x]
    if fla_lengths:
        configs = [tuple(int(n) for n in c.split("x")) for c in args.fla_configs.split(",")]
        rows += fla_rows(args.fla_ops.split(","), configs, fla_lengths)
    batches = [int(x) for x in args.decode_batches.split(",") if x]
    if batches:
        rows += fla_decode_rows([(16, 128, 128), (4, 256, 512)], batches)
    for r in rows:
        if r["op"].startswith("chunk"):
            r["floor_fwd_ms"], r["floor_fwdbwd_ms"] = gla_floor(r["op"], r["B"], r["T"], r["H"], r["K"], r["V"], bandwidth, rate)
        elif r["op"] == "decode":  # the f32 states read and written
            r["floor_fwd_ms"] = 2 * r["B"] * r["H"] * r["K"] * r["V"] * 4 / bandwidth * 1e3
    slug = gpu.lower().replace("nvidia ", "").replace(" ", "-")
    out = dict(gpu=gpu, copy_bytes_per_s=bandwidth, bf16_gemm_flops=rate, tokens=TOKENS, records=rows)
    path = os.path.join(args.out, f"kernels-{slug}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    key = lambda r: (r["op"], r["B"], r["T"], r["H"], r["K"], r["V"])
    fla = {key(r): r for r in rows if r["impl"] == "fla"}
    print(f"\n{'op':<17} {'impl':<10} {'B':>3} {'T':>5} {'H':>3} {'K':>4} {'V':>4} {'fwd ms':>8} {'floor':>7} {'fwd+bwd':>8} {'floor':>7} {'fla/ours fwd':>12} {'fwd+bwd':>8}")
    for r in sorted(rows, key=lambda r: (r["op"], r["H"], r["B"], r["T"], r["impl"])):
        fb = r.get("fwdbwd_ms")
        ref = fla.get(key(r))
        ratio = f"{ref['fwd_ms'] / r['fwd_ms']:.2f}x" if ref and r["impl"] == "ours" else ""
        ratio_fb = f"{ref['fwdbwd_ms'] / fb:.2f}x" if ref and fb and r["impl"] == "ours" else ""
        fbs = f"{fb:8.3f}" if fb else f"{'-':>8}"
        print(f"{r['op']:<17} {r['impl']:<10} {r['B']:>3} {r['T']:>5} {r['H']:>3} {r['K']:>4} {r['V']:>4} {r['fwd_ms']:8.4f} "
              f"{r.get('floor_fwd_ms', math.nan):7.3f} {fbs} {r.get('floor_fwdbwd_ms', math.nan):7.3f} {ratio:>12} {ratio_fb:>8}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
