// The element-wise and row-wise layers of the GLA Transformer, forward and backward.
// Products go through cuBLAS (blas.rs); activations that products or the GLA kernels read are
// in the element type io_t (bf16 or f32, -DUSE_BF16), and so are the SwiGLU and output-gate
// inputs (products write them). Statistics, gates, the residual stream, the gradients arriving
// from products and parameter gradients are f32; arithmetic is f32 throughout.
// Row-wise kernels give each warp whole rows (rows r = the warp's index, then every
// gridDim.x * NW rows on): a row's sums are warp shuffles, with no block barrier per row. A
// block's parameter-gradient partials gather in shared memory (one column accumulator per
// column of the row) and reach global memory as one atomic per column per block.

// Columns a row may have in the kernels with column accumulators: width <= NT * MAXC.
#define MAXC 16
#define MAXW (NT * MAXC)

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// Sum over the block, returned to every thread (one shared slot per warp).
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < NW; i++) s += red[i];
    return s;
}

__device__ __forceinline__ int first_row() { return blockIdx.x * NW + (threadIdx.x >> 5); }
__device__ __forceinline__ int row_step() { return gridDim.x * NW; }

// A block's column accumulators: zeroed before its rows, added into `out` after them.
__device__ __forceinline__ void cols_zero(float* cols, int width) {
    for (int j = threadIdx.x; j < width; j += NT) cols[j] = 0.f;
    __syncthreads();
}
__device__ __forceinline__ void cols_flush(const float* cols, float* out, int width) {
    __syncthreads();
    for (int j = threadIdx.x; j < width; j += NT) atomicAdd(out + j, cols[j]);
}

// y = x / sqrt(mean(x^2) + eps) * w (w may be null), rstd = that 1/rms per row.
extern "C" __global__ void rms_norm_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                        io_t* __restrict__ y, float* __restrict__ rstd, int rows,
                                        int width, float eps) {
    const int lane = threadIdx.x & 31;
    for (int r = first_row(); r < rows; r += row_step()) {
        const float* xr = x + (long)r * width;
        float ss = 0.f;
#pragma unroll 4
        for (int j = lane; j < width; j += 32) ss += xr[j] * xr[j];
        const float inv = rsqrtf(warp_sum(ss) / width + eps);
        io_t* yr = y + (long)r * width;
#pragma unroll 4
        for (int j = lane; j < width; j += 32) yr[j] = from_f(xr[j] * inv * (w ? w[j] : 1.f));
        if (lane == 0) rstd[r] = inv;
    }
}

// With ŵ = w ⊙ dy: dx += r ŵ - x r^3 mean(x ⊙ ŵ); dw += Σ_rows dy ⊙ x r. dx_io (may be null)
// receives the new dx in the element type, for the products that read it next.
extern "C" __global__ void rms_norm_bwd(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ rstd, const float* __restrict__ dy,
                                        float* __restrict__ dx, io_t* __restrict__ dx_io,
                                        float* __restrict__ dw, int rows, int width) {
    __shared__ float cols[MAXW];
    if (dw) cols_zero(cols, width);
    const int lane = threadIdx.x & 31;
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        const float *xr = x + base, *dyr = dy + base;
        const float inv = rstd[r];
        float dot = 0.f;
#pragma unroll 4
        for (int j = lane; j < width; j += 32) dot += xr[j] * dyr[j] * (w ? w[j] : 1.f);
        dot = warp_sum(dot) / width;
#pragma unroll 4
        for (int j = lane; j < width; j += 32) {
            const float v = dx[base + j] + inv * dyr[j] * (w ? w[j] : 1.f) - xr[j] * inv * inv * inv * dot;
            dx[base + j] = v;
            if (dx_io) dx_io[base + j] = from_f(v);
            if (dw) atomicAdd(cols + j, dyr[j] * xr[j] * inv);
        }
    }
    if (dw) cols_flush(cols, dw, width);
}

// The attention output per head: out = rmsnorm(o) * w * silu(g) over rows of width `width`
// (one row per token and head); without g (no output gate) out = rmsnorm(o) * w.
extern "C" __global__ void norm_gate_fwd(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                         const float* __restrict__ w, io_t* __restrict__ out,
                                         float* __restrict__ rstd, int rows, int width, float eps) {
    const int lane = threadIdx.x & 31;
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        float ss = 0.f;
#pragma unroll 4
        for (int j = lane; j < width; j += 32) ss += to_f(o[base + j]) * to_f(o[base + j]);
        const float inv = rsqrtf(warp_sum(ss) / width + eps);
#pragma unroll 4
        for (int j = lane; j < width; j += 32) {
            float v = to_f(o[base + j]) * inv * (w ? w[j] : 1.f);
            if (g) v *= to_f(g[base + j]) * sigmoidf_(to_f(g[base + j]));
            out[base + j] = from_f(v);
        }
        if (lane == 0) rstd[r] = inv;
    }
}

// Backward of norm_gate_fwd from dout: do (for the GLA backward), dg (for the g projection's
// backward products) and dw (f32, added).
extern "C" __global__ void norm_gate_bwd(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                         const float* __restrict__ w, const float* __restrict__ rstd,
                                         const io_t* __restrict__ dout, io_t* __restrict__ d_o,
                                         io_t* __restrict__ dg, float* __restrict__ dw, int rows,
                                         int width) {
    __shared__ float cols[MAXW];
    if (dw) cols_zero(cols, width);
    const int lane = threadIdx.x & 31;
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        const float inv = rstd[r];
        float dot = 0.f;
        // dn = d(normalised o): dout times the gate.
#pragma unroll 4
        for (int j = lane; j < width; j += 32) {
            const float gate = g ? to_f(g[base + j]) * sigmoidf_(to_f(g[base + j])) : 1.f;
            dot += to_f(o[base + j]) * to_f(dout[base + j]) * gate * (w ? w[j] : 1.f);
        }
        dot = warp_sum(dot) / width;
#pragma unroll 4
        for (int j = lane; j < width; j += 32) {
            const float ov = to_f(o[base + j]), wj = w ? w[j] : 1.f, n = ov * inv;
            const float dv = to_f(dout[base + j]);
            float gate = 1.f;
            if (g) {
                const float gv = to_f(g[base + j]), s = sigmoidf_(gv);
                gate = gv * s;
                dg[base + j] = from_f(dv * n * wj * s * (1.f + gv * (1.f - s)));
            }
            d_o[base + j] = from_f(inv * dv * gate * wj - ov * inv * inv * inv * dot);
            if (dw) atomicAdd(cols + j, dv * gate * n);
        }
    }
    if (dw) cols_flush(cols, dw, width);
}

// SwiGLU: m = silu(gate) * up.
extern "C" __global__ void swiglu_fwd(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                      io_t* __restrict__ m, long n) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        float x = to_f(gate[i]);
        m[i] = from_f(x * sigmoidf_(x) * to_f(up[i]));
    }
}

// From dm (the down projection's input gradient): dgate, dup, and m again when `m` is not
// null (the forward's m is not kept; the down projection's weight gradient reads it).
extern "C" __global__ void swiglu_bwd(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                      const io_t* __restrict__ dm, io_t* __restrict__ dgate,
                                      io_t* __restrict__ dup, io_t* __restrict__ m, long n) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        const float x = to_f(gate[i]), s = sigmoidf_(x), u = to_f(up[i]), d = to_f(dm[i]);
        dgate[i] = from_f(d * u * s * (1.f + x * (1.f - s)));
        dup[i] = from_f(d * x * s);
        if (m) m[i] = from_f(x * s * u);
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
    __shared__ float cols[MAXW];
    cols_zero(cols, width);
    const int lane = threadIdx.x & 31;
    for (int r = first_row(); r < rows; r += row_step())
#pragma unroll 4
        for (int j = lane; j < width; j += 32) {
            const long at = (long)r * width + j;
            const float x = raw[at], ls = fminf(x, 0.f) - log1pf(__expf(-fabsf(x)));
            const float d = ls / norm < clamp ? 0.f : dg[at] * sigmoidf_(-x) / norm;
            draw[at] = from_f(d);
            atomicAdd(cols + j, d);
        }
    cols_flush(cols, dbias, width);
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

// Merges a running (max, Σ exp(x - max)) pair with another.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == __int_as_float(0xff800000)) return;  // both empty
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Cross-entropy per row of logits [rows, vocab] (f32) against targets (< 0: ignored), one
// block per row: loss[r] = logsumexp - logit[target] (the log-sum-exp in one pass over the
// row, merging running maxima), and dlogits = (softmax - onehot) * scale in the element type
// (scale = 1 / the number of counted rows).
extern "C" __global__ void cross_entropy(const float* __restrict__ logits, const int* __restrict__ targets,
                                         float* __restrict__ loss, io_t* __restrict__ dlogits, int rows,
                                         int vocab, float scale) {
    __shared__ float red_m[NW], red_s[NW];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* l = logits + (long)r * vocab;
        io_t* d = dlogits + (long)r * vocab;
        const int target = targets[r];
        if (target < 0) {
            for (int j = threadIdx.x; j < vocab; j += NT) d[j] = from_f(0.f);
            if (threadIdx.x == 0) loss[r] = 0.f;
            continue;
        }
        float m = __int_as_float(0xff800000), s = 0.f;  // -inf, 0
        for (int j = threadIdx.x; j < vocab; j += NT) {
            const float x = l[j];
            if (x > m) {
                s = s * expf(m - x) + 1.f;
                m = x;
            } else {
                s += expf(x - m);
            }
        }
        for (int o = 16; o > 0; o >>= 1)
            lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        __syncthreads();  // the previous row's readers are done with red_*
        if ((threadIdx.x & 31) == 0) {
            red_m[threadIdx.x >> 5] = m;
            red_s[threadIdx.x >> 5] = s;
        }
        __syncthreads();
        m = red_m[0];
        s = red_s[0];
        for (int i = 1; i < NW; i++) lse_merge(m, s, red_m[i], red_s[i]);
        const float lse = m + logf(s);
#pragma unroll 4
        for (int j = threadIdx.x; j < vocab; j += NT) d[j] = from_f((expf(l[j] - lse) - (j == target)) * scale);
        if (threadIdx.x == 0) loss[r] = lse - l[target];
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
