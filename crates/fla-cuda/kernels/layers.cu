// The element-wise and row-wise layers of the GLA Transformer, forward and backward.
// Products go through cuBLAS (blas.rs); activations that products or the GLA kernels read are
// in the element type io_t (bf16 or f32, -DUSE_BF16), and so are the SwiGLU and output-gate
// inputs (products write them). Statistics, gates, the residual stream, the gradients arriving
// from products and parameter gradients are f32; arithmetic is f32 throughout.
// Each block (NT threads) owns ROWS consecutive rows; threads stride over the columns.

#ifndef ROWS
#define ROWS 16
#endif
// Columns a thread holds partial parameter gradients for: width <= NT * MAXC.
#define MAXC 16

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// Sum over the block, returned to every thread (one shared slot per warp).
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < NW; i++) s += red[i];
    return s;
}

// y = x / sqrt(mean(x^2) + eps) * w (w may be null), rstd = that 1/rms per row.
extern "C" __global__ void rms_norm_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                        io_t* __restrict__ y, float* __restrict__ rstd, int rows,
                                        int width, float eps) {
    __shared__ float red[NW];
    for (int r = blockIdx.x * ROWS; r < min(rows, (int)(blockIdx.x + 1) * ROWS); r++) {
        const float* xr = x + (long)r * width;
        float ss = 0.f;
        for (int j = threadIdx.x; j < width; j += NT) ss += xr[j] * xr[j];
        float inv = rsqrtf(block_sum(ss, red) / width + eps);
        for (int j = threadIdx.x; j < width; j += NT) y[(long)r * width + j] = from_f(xr[j] * inv * (w ? w[j] : 1.f));
        if (threadIdx.x == 0) rstd[r] = inv;
    }
}

// With ŵ = w ⊙ dy: dx += r ŵ - x r^3 mean(x ⊙ ŵ); dw += Σ_rows dy ⊙ x r (atomics per block).
extern "C" __global__ void rms_norm_bwd(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ rstd, const float* __restrict__ dy,
                                        float* __restrict__ dx, float* __restrict__ dw, int rows,
                                        int width) {
    __shared__ float red[NW];
    float acc[MAXC];
    for (int i = 0; i < MAXC; i++) acc[i] = 0.f;
    for (int r = blockIdx.x * ROWS; r < min(rows, (int)(blockIdx.x + 1) * ROWS); r++) {
        const float *xr = x + (long)r * width, *dyr = dy + (long)r * width;
        float inv = rstd[r], dot = 0.f;
        for (int j = threadIdx.x; j < width; j += NT) dot += xr[j] * dyr[j] * (w ? w[j] : 1.f);
        dot = block_sum(dot, red) / width;
        for (int j = threadIdx.x, i = 0; j < width; j += NT, i++) {
            float wd = dyr[j] * (w ? w[j] : 1.f);
            dx[(long)r * width + j] += inv * wd - xr[j] * inv * inv * inv * dot;
            acc[i] += dyr[j] * xr[j] * inv;
        }
    }
    if (dw)
        for (int j = threadIdx.x, i = 0; j < width; j += NT, i++) atomicAdd(dw + j, acc[i]);
}

// The attention output per head: out = rmsnorm(o) * w * silu(g) over rows of width `width`
// (one row per token and head); without g (no output gate) out = rmsnorm(o) * w.
extern "C" __global__ void norm_gate_fwd(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                         const float* __restrict__ w, io_t* __restrict__ out,
                                         float* __restrict__ rstd, int rows, int width, float eps) {
    __shared__ float red[NW];
    for (int r = blockIdx.x * ROWS; r < min(rows, (int)(blockIdx.x + 1) * ROWS); r++) {
        long base = (long)r * width;
        float ss = 0.f;
        for (int j = threadIdx.x; j < width; j += NT) ss += to_f(o[base + j]) * to_f(o[base + j]);
        float inv = rsqrtf(block_sum(ss, red) / width + eps);
        for (int j = threadIdx.x; j < width; j += NT) {
            float v = to_f(o[base + j]) * inv * (w ? w[j] : 1.f);
            if (g) v *= to_f(g[base + j]) * sigmoidf_(to_f(g[base + j]));
            out[base + j] = from_f(v);
        }
        if (threadIdx.x == 0) rstd[r] = inv;
    }
}

// Backward of norm_gate_fwd from dout (f32): do (for the GLA backward), dg (for the g
// projection's backward products) and dw (f32, added).
extern "C" __global__ void norm_gate_bwd(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                         const float* __restrict__ w, const float* __restrict__ rstd,
                                         const float* __restrict__ dout, io_t* __restrict__ d_o,
                                         io_t* __restrict__ dg, float* __restrict__ dw, int rows,
                                         int width) {
    __shared__ float red[NW];
    float acc[MAXC];
    for (int i = 0; i < MAXC; i++) acc[i] = 0.f;
    for (int r = blockIdx.x * ROWS; r < min(rows, (int)(blockIdx.x + 1) * ROWS); r++) {
        long base = (long)r * width;
        float inv = rstd[r], dot = 0.f;
        // dn = d(normalised o): dout times the gate.
        for (int j = threadIdx.x; j < width; j += NT) {
            float gate = g ? to_f(g[base + j]) * sigmoidf_(to_f(g[base + j])) : 1.f;
            dot += to_f(o[base + j]) * dout[base + j] * gate * (w ? w[j] : 1.f);
        }
        dot = block_sum(dot, red) / width;
        for (int j = threadIdx.x, i = 0; j < width; j += NT, i++) {
            float ov = to_f(o[base + j]), wj = w ? w[j] : 1.f, n = ov * inv;
            float gate = 1.f;
            if (g) {
                float gv = to_f(g[base + j]), s = sigmoidf_(gv);
                gate = gv * s;
                dg[base + j] = from_f(dout[base + j] * n * wj * s * (1.f + gv * (1.f - s)));
            }
            float wd = dout[base + j] * gate * wj;
            d_o[base + j] = from_f(inv * wd - ov * inv * inv * inv * dot);
            acc[i] += dout[base + j] * gate * n;
        }
    }
    if (dw)
        for (int j = threadIdx.x, i = 0; j < width; j += NT, i++) atomicAdd(dw + j, acc[i]);
}

// SwiGLU: m = silu(gate) * up.
extern "C" __global__ void swiglu_fwd(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                      io_t* __restrict__ m, long n) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        float x = to_f(gate[i]);
        m[i] = from_f(x * sigmoidf_(x) * to_f(up[i]));
    }
}

extern "C" __global__ void swiglu_bwd(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                      const float* __restrict__ dm, io_t* __restrict__ dgate,
                                      io_t* __restrict__ dup, long n) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        float x = to_f(gate[i]), s = sigmoidf_(x);
        dgate[i] = from_f(dm[i] * to_f(up[i]) * s * (1.f + x * (1.f - s)));
        dup[i] = from_f(dm[i] * x * s);
    }
}

// Key gates: g = max(logsigmoid(raw + bias) / norm, clamp) (clamp = -inf for none); raw gets
// the bias added in place (rows of `width`).
extern "C" __global__ void gate_fwd(float* __restrict__ raw, const float* __restrict__ bias,
                                    float* __restrict__ g, long n, int width, float norm, float clamp) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        float x = raw[i] + bias[i % width];
        raw[i] = x;
        float ls = fminf(x, 0.f) - log1pf(__expf(-fabsf(x)));
        g[i] = fmaxf(ls / norm, clamp);
    }
}

// draw = dg σ(-raw) / norm where the gate was not clamped (in io_t, for the products);
// dbias += Σ_rows draw (f32).
extern "C" __global__ void gate_bwd(const float* __restrict__ raw, const float* __restrict__ dg,
                                    io_t* __restrict__ draw, float* __restrict__ dbias, int rows,
                                    int width, float norm, float clamp) {
    float acc[MAXC];
    for (int i = 0; i < MAXC; i++) acc[i] = 0.f;
    for (int r = blockIdx.x * ROWS; r < min(rows, (int)(blockIdx.x + 1) * ROWS); r++)
        for (int j = threadIdx.x, i = 0; j < width; j += NT, i++) {
            long at = (long)r * width + j;
            float x = raw[at], ls = fminf(x, 0.f) - log1pf(__expf(-fabsf(x)));
            float d = ls / norm < clamp ? 0.f : dg[at] * sigmoidf_(-x) / norm;
            draw[at] = from_f(d);
            acc[i] += d;
        }
    for (int j = threadIdx.x, i = 0; j < width; j += NT, i++) atomicAdd(dbias + j, acc[i]);
}

// Short convolution and SiLU over [B, T, C] (f32 in): pre = Σ_i w[c, i] x[t - W + 1 + i],
// out = silu(pre) in io_t. pre is kept (f32) for the backward.
extern "C" __global__ void conv_silu_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ pre, io_t* __restrict__ out, int b, int t,
                                         int c, int width) {
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        int ch = i % c, s = (i / c) % t;
        float acc = 0.f;
        for (int k = 0; k < width; k++) {
            int src = s - width + 1 + k;
            if (src >= 0) acc += w[ch * width + k] * x[i + (long)(src - s) * c];
        }
        pre[i] = acc;
        out[i] = from_f(acc * sigmoidf_(acc));
    }
}

// From dout (io_t, the GLA gradient): dpre = dout silu'(pre); dx[t'] = Σ_k w[c, k]
// dpre[t' + W - 1 - k] (gathered, no atomics; io_t for the products); dw[c, k] += Σ dpre[t]
// x[t - W + 1 + k] (an atomic per element and tap).
extern "C" __global__ void conv_silu_bwd(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ pre, const io_t* __restrict__ dout,
                                         io_t* __restrict__ dx, float* __restrict__ dw, int b, int t,
                                         int c, int width) {
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        int ch = i % c, s = (i / c) % t;
        float acc = 0.f;
        for (int k = 0; k < width; k++) {
            int dst = s + width - 1 - k;  // the output that read x[s] through tap k
            if (dst < t) {
                long at = i + (long)(dst - s) * c;
                float p = pre[at], sg = sigmoidf_(p);
                float dp = to_f(dout[at]) * sg * (1.f + p * (1.f - sg));
                acc += w[ch * width + k] * dp;
                atomicAdd(dw + ch * width + k, dp * x[i]);
            }
        }
        dx[i] = from_f(acc);
    }
}

// y = x in the element type.
extern "C" __global__ void cast_io(const float* __restrict__ x, io_t* __restrict__ y, long n) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) y[i] = from_f(x[i]);
}

// Token embeddings: x[r] = E[ids[r]] (f32), and the backward dE[ids[r]] += dx[r].
extern "C" __global__ void embed_fwd(const int* __restrict__ ids, const float* __restrict__ e,
                                     float* __restrict__ x, int rows, int width) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < (long)rows * width; i += (long)gridDim.x * NT)
        x[i] = e[(long)ids[i / width] * width + i % width];
}

extern "C" __global__ void embed_bwd(const int* __restrict__ ids, const float* __restrict__ dx,
                                     float* __restrict__ de, int rows, int width) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < (long)rows * width; i += (long)gridDim.x * NT)
        atomicAdd(de + (long)ids[i / width] * width + i % width, dx[i]);
}

// Cross-entropy per row of logits [rows, vocab] (f32) against targets (< 0: ignored):
// loss[r] = logsumexp - logit[target], and the logits replaced by their gradient
// (softmax - onehot) * scale (scale = 1 / the number of counted rows).
extern "C" __global__ void cross_entropy(float* __restrict__ logits, const int* __restrict__ targets,
                                         float* __restrict__ loss, int rows, int vocab, float scale) {
    __shared__ float red[NW];
    for (int r = blockIdx.x * ROWS; r < min(rows, (int)(blockIdx.x + 1) * ROWS); r++) {
        float* l = logits + (long)r * vocab;
        int target = targets[r];
        if (target < 0) {
            for (int j = threadIdx.x; j < vocab; j += NT) l[j] = 0.f;
            if (threadIdx.x == 0) loss[r] = 0.f;
            continue;
        }
        float mx = __int_as_float(0xff800000);  // -inf
        for (int j = threadIdx.x; j < vocab; j += NT) mx = fmaxf(mx, l[j]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        __syncthreads();
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
        __syncthreads();
        mx = __int_as_float(0xff800000);
        for (int i = 0; i < NW; i++) mx = fmaxf(mx, red[i]);
        float se = 0.f;
        for (int j = threadIdx.x; j < vocab; j += NT) se += expf(l[j] - mx);
        float lse = mx + logf(block_sum(se, red));
        float lt = l[target];
        __syncthreads();
        for (int j = threadIdx.x; j < vocab; j += NT) l[j] = (expf(l[j] - lse) - (j == target)) * scale;
        if (threadIdx.x == 0) loss[r] = lse - lt;
    }
}

// AdamW on f32 master weights (PyTorch's algorithm): p ← p·shrink − lr·m̂/(√v̂ + eps), with
// c1 = 1 − β1^t and c2 = 1 − β2^t; `copy` (optional) receives p in io_t for the products.
extern "C" __global__ void adamw(float* __restrict__ p, const float* __restrict__ grad,
                                 float* __restrict__ m, float* __restrict__ v, io_t* __restrict__ copy,
                                 long n, float lr, float shrink, float b1, float b2, float c1, float c2,
                                 float eps, float gscale) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        float g = grad[i] * gscale;
        float mi = b1 * m[i] + (1.f - b1) * g, vi = b2 * v[i] + (1.f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] * shrink - lr * (mi / c1) / (sqrtf(vi / c2) + eps);
        p[i] = pi;
        if (copy) copy[i] = from_f(pi);
    }
}

// Σ x^2 into *out (f32 atomics per block), for the global gradient norm.
extern "C" __global__ void sum_squares(const float* __restrict__ x, float* __restrict__ out, long n) {
    __shared__ float red[NW];
    float s = 0.f;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) s += x[i] * x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// One generation step of the short convolution for [B, C] inputs x: window [B, W-1, C] holds
// each sequence's previous W-1 inputs (oldest first) and is shifted to take x; out =
// silu(Σ_{i<W-1} w[c, i] window[i] + w[c, W-1] x).
extern "C" __global__ void conv_silu_step(const float* __restrict__ x, float* __restrict__ window,
                                          const float* __restrict__ w, io_t* __restrict__ out, int b,
                                          int c, int width) {
    long n = (long)b * c;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        int ch = i % c;
        long seq = i / c;
        float* win = window + seq * (long)(width - 1) * c + ch;
        float acc = w[ch * width + width - 1] * x[i];
        for (int k = 0; k < width - 1; k++) acc += w[ch * width + k] * win[(long)k * c];
        for (int k = 0; k + 1 < width - 1; k++) win[(long)k * c] = win[(long)(k + 1) * c];
        if (width > 1) win[(long)(width - 2) * c] = x[i];
        out[i] = from_f(acc * sigmoidf_(acc));
    }
}
