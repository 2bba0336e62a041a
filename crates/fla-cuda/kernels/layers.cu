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

// V consecutive elements as floats and back: V = 4 (one 16-byte f32 or 8-byte bf16 access;
// the caller keeps rows and counts multiples of 4, so that the address is aligned) or 1.
struct __align__(16) f32x4 {
    float x, y, z, w;
};
struct __align__(8) u32x2 {
    u32 x, y;
};
template <int V>
__device__ __forceinline__ void ld(const float* p, float* v) {
    if (V == 4) {
        const f32x4 t = *(const f32x4*)p;
        v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    } else {
        v[0] = *p;
    }
}
template <int V>
__device__ __forceinline__ void ld(const bf16_t* p, float* v) {
    if (V == 4) {
        const u32x2 t = *(const u32x2*)p;
        v[0] = __uint_as_float(t.x << 16), v[1] = __uint_as_float(t.x & 0xffff0000u);
        v[2] = __uint_as_float(t.y << 16), v[3] = __uint_as_float(t.y & 0xffff0000u);
    } else {
        v[0] = bf16_to_f(*p);
    }
}
template <int V>
__device__ __forceinline__ void st(float* p, const float* v) {
    if (V == 4) {
        *(f32x4*)p = f32x4{v[0], v[1], v[2], v[3]};
    } else {
        *p = v[0];
    }
}
template <int V>
__device__ __forceinline__ void st(bf16_t* p, const float* v) {
    if (V == 4) {
        *(u32x2*)p = u32x2{(u32)f_to_bf16(v[0]) | ((u32)f_to_bf16(v[1]) << 16),
                           (u32)f_to_bf16(v[2]) | ((u32)f_to_bf16(v[3]) << 16)};
    } else {
        *p = f_to_bf16(v[0]);
    }
}
// V elements of an optional per-column parameter (1 where absent).
template <int V>
__device__ __forceinline__ void ld_or_one(const float* p, float* v) {
    if (p) {
        ld<V>(p, v);
    } else {
#pragma unroll
        for (int i = 0; i < V; i++) v[i] = 1.f;
    }
}

// Runs body<4> when rows (or counts) are multiples of 4, else body<1>.
#define BY_WIDTH(n, body, ...) ((n) % 4 == 0 ? body<4>(__VA_ARGS__) : body<1>(__VA_ARGS__))

// The columns of one lane in a row: j = lane V, then every 32 V.
#define LANE_COLS(j, width) for (int j = (threadIdx.x & 31) * V; j < (width); j += 32 * V)

// 1 / sqrt(mean(row^2) + eps) of a row, in every lane of the warp that owns it.
template <int V, typename T>
__device__ __forceinline__ float inv_rms(const T* __restrict__ row, int width, float eps) {
    float ss = 0.f;
    LANE_COLS(j, width) {
        float a[V];
        ld<V>(row + j, a);
#pragma unroll
        for (int i = 0; i < V; i++) ss += a[i] * a[i];
    }
    return rsqrtf(warp_sum(ss) / width + eps);
}

// y = x / sqrt(mean(x^2) + eps) * w (w may be null), rstd = that 1/rms per row.
template <int V>
__device__ __forceinline__ void rms_norm_fwd_rows(const float* __restrict__ x, const float* __restrict__ w,
                                                  io_t* __restrict__ y, float* __restrict__ rstd,
                                                  int rows, int width, float eps) {
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        const float inv = inv_rms<V>(x + base, width, eps);
        LANE_COLS(j, width) {
            float a[V], wv[V];
            ld<V>(x + base + j, a);
            ld_or_one<V>(w ? w + j : nullptr, wv);
#pragma unroll
            for (int i = 0; i < V; i++) a[i] *= inv * wv[i];
            st<V>(y + base + j, a);
        }
        if ((threadIdx.x & 31) == 0) rstd[r] = inv;
    }
}
extern "C" __global__ void rms_norm_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                        io_t* __restrict__ y, float* __restrict__ rstd, int rows,
                                        int width, float eps) {
    BY_WIDTH(width, rms_norm_fwd_rows, x, w, y, rstd, rows, width, eps);
}

// With ŵ = w ⊙ dy: dx += r ŵ - x r^3 mean(x ⊙ ŵ); dw += Σ_rows dy ⊙ x r. dx_io (may be null)
// receives the new dx in the element type, for the products that read it next.
template <int V>
__device__ __forceinline__ void rms_norm_bwd_rows(const float* __restrict__ x, const float* __restrict__ w,
                                                  const float* __restrict__ rstd,
                                                  const float* __restrict__ dy, float* __restrict__ dx,
                                                  io_t* __restrict__ dx_io, float* cols, int rows,
                                                  int width) {
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        const float inv = rstd[r];
        float dot = 0.f;
        LANE_COLS(j, width) {
            float a[V], d[V], wv[V];
            ld<V>(x + base + j, a);
            ld<V>(dy + base + j, d);
            ld_or_one<V>(w ? w + j : nullptr, wv);
#pragma unroll
            for (int i = 0; i < V; i++) dot += a[i] * d[i] * wv[i];
        }
        dot = warp_sum(dot) / width;
        LANE_COLS(j, width) {
            float a[V], d[V], wv[V], out[V];
            ld<V>(x + base + j, a);
            ld<V>(dy + base + j, d);
            ld_or_one<V>(w ? w + j : nullptr, wv);
            ld<V>(dx + base + j, out);
#pragma unroll
            for (int i = 0; i < V; i++) {
                out[i] += inv * d[i] * wv[i] - a[i] * inv * inv * inv * dot;
                if (cols) atomicAdd(cols + j + i, d[i] * a[i] * inv);
            }
            st<V>(dx + base + j, out);
            if (dx_io) st<V>(dx_io + base + j, out);
        }
    }
}
extern "C" __global__ void rms_norm_bwd(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ rstd, const float* __restrict__ dy,
                                        float* __restrict__ dx, io_t* __restrict__ dx_io,
                                        float* __restrict__ dw, int rows, int width) {
    __shared__ float cols[MAXW];
    if (dw) cols_zero(cols, width);
    BY_WIDTH(width, rms_norm_bwd_rows, x, w, rstd, dy, dx, dx_io, dw ? cols : nullptr, rows, width);
    if (dw) cols_flush(cols, dw, width);
}

// The attention output per head: out = rmsnorm(o) * w * silu(g) over rows of width `width`
// (one row per token and head); without g (no output gate) out = rmsnorm(o) * w.
template <int V>
__device__ __forceinline__ void norm_gate_fwd_rows(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                                   const float* __restrict__ w, io_t* __restrict__ out,
                                                   float* __restrict__ rstd, int rows, int width,
                                                   float eps) {
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        const float inv = inv_rms<V>(o + base, width, eps);
        LANE_COLS(j, width) {
            float a[V], wv[V], gv[V];
            ld<V>(o + base + j, a);
            ld_or_one<V>(w ? w + j : nullptr, wv);
            if (g) ld<V>(g + base + j, gv);
#pragma unroll
            for (int i = 0; i < V; i++) {
                a[i] *= inv * wv[i];
                if (g) a[i] *= gv[i] * sigmoidf_(gv[i]);
            }
            st<V>(out + base + j, a);
        }
        if ((threadIdx.x & 31) == 0) rstd[r] = inv;
    }
}
extern "C" __global__ void norm_gate_fwd(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                         const float* __restrict__ w, io_t* __restrict__ out,
                                         float* __restrict__ rstd, int rows, int width, float eps) {
    BY_WIDTH(width, norm_gate_fwd_rows, o, g, w, out, rstd, rows, width, eps);
}

// Backward of norm_gate_fwd from dout: do (for the GLA backward), dg (for the g projection's
// backward products) and dw (f32, added).
template <int V>
__device__ __forceinline__ void norm_gate_bwd_rows(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                                   const float* __restrict__ w,
                                                   const float* __restrict__ rstd,
                                                   const io_t* __restrict__ dout, io_t* __restrict__ d_o,
                                                   io_t* __restrict__ dg, float* cols, int rows,
                                                   int width) {
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        const float inv = rstd[r];
        float dot = 0.f;
        // dn = d(normalised o): dout times the gate.
        LANE_COLS(j, width) {
            float ov[V], dv[V], wv[V], gv[V];
            ld<V>(o + base + j, ov);
            ld<V>(dout + base + j, dv);
            ld_or_one<V>(w ? w + j : nullptr, wv);
            if (g) ld<V>(g + base + j, gv);
#pragma unroll
            for (int i = 0; i < V; i++) dot += ov[i] * dv[i] * (g ? gv[i] * sigmoidf_(gv[i]) : 1.f) * wv[i];
        }
        dot = warp_sum(dot) / width;
        LANE_COLS(j, width) {
            float ov[V], dv[V], wv[V], gv[V], dov[V], dgv[V];
            ld<V>(o + base + j, ov);
            ld<V>(dout + base + j, dv);
            ld_or_one<V>(w ? w + j : nullptr, wv);
            if (g) ld<V>(g + base + j, gv);
#pragma unroll
            for (int i = 0; i < V; i++) {
                const float n = ov[i] * inv;
                float gate = 1.f;
                if (g) {
                    const float s = sigmoidf_(gv[i]);
                    gate = gv[i] * s;
                    dgv[i] = dv[i] * n * wv[i] * s * (1.f + gv[i] * (1.f - s));
                }
                dov[i] = inv * dv[i] * gate * wv[i] - ov[i] * inv * inv * inv * dot;
                if (cols) atomicAdd(cols + j + i, dv[i] * gate * n);
            }
            st<V>(d_o + base + j, dov);
            if (g) st<V>(dg + base + j, dgv);
        }
    }
}
extern "C" __global__ void norm_gate_bwd(const io_t* __restrict__ o, const io_t* __restrict__ g,
                                         const float* __restrict__ w, const float* __restrict__ rstd,
                                         const io_t* __restrict__ dout, io_t* __restrict__ d_o,
                                         io_t* __restrict__ dg, float* __restrict__ dw, int rows,
                                         int width) {
    __shared__ float cols[MAXW];
    if (dw) cols_zero(cols, width);
    BY_WIDTH(width, norm_gate_bwd_rows, o, g, w, rstd, dout, d_o, dg, dw ? cols : nullptr, rows, width);
    if (dw) cols_flush(cols, dw, width);
}

// The element-wise kernels: thread t takes elements [V t, V t + V), then every gridDim NT V.
#define ELEMENTS(i, n) for (long i = (blockIdx.x * (long)NT + threadIdx.x) * V; i < (n); i += (long)gridDim.x * NT * V)

// SwiGLU: m = silu(gate) * up.
template <int V>
__device__ __forceinline__ void swiglu_fwd_elems(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                                 io_t* __restrict__ m, long n) {
    ELEMENTS(i, n) {
        float x[V], u[V];
        ld<V>(gate + i, x);
        ld<V>(up + i, u);
#pragma unroll
        for (int e = 0; e < V; e++) x[e] = x[e] * sigmoidf_(x[e]) * u[e];
        st<V>(m + i, x);
    }
}
extern "C" __global__ void swiglu_fwd(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                      io_t* __restrict__ m, long n) {
    BY_WIDTH(n, swiglu_fwd_elems, gate, up, m, n);
}

// From dm (the down projection's input gradient): dgate, dup, and m again when `m` is not
// null (the forward's m is not kept; the down projection's weight gradient reads it).
template <int V>
__device__ __forceinline__ void swiglu_bwd_elems(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                                 const io_t* __restrict__ dm, io_t* __restrict__ dgate,
                                                 io_t* __restrict__ dup, io_t* __restrict__ m, long n) {
    ELEMENTS(i, n) {
        float x[V], u[V], d[V], dx[V], du[V], mv[V];
        ld<V>(gate + i, x);
        ld<V>(up + i, u);
        ld<V>(dm + i, d);
#pragma unroll
        for (int e = 0; e < V; e++) {
            const float s = sigmoidf_(x[e]);
            dx[e] = d[e] * u[e] * s * (1.f + x[e] * (1.f - s));
            du[e] = d[e] * x[e] * s;
            mv[e] = x[e] * s * u[e];
        }
        st<V>(dgate + i, dx);
        st<V>(dup + i, du);
        if (m) st<V>(m + i, mv);
    }
}
extern "C" __global__ void swiglu_bwd(const io_t* __restrict__ gate, const io_t* __restrict__ up,
                                      const io_t* __restrict__ dm, io_t* __restrict__ dgate,
                                      io_t* __restrict__ dup, io_t* __restrict__ m, long n) {
    BY_WIDTH(n, swiglu_bwd_elems, gate, up, dm, dgate, dup, m, n);
}

// Key gates: g = max(logsigmoid(raw + bias) / norm, clamp) (clamp = -inf for none); raw gets
// the bias added in place (rows of `width`).
template <int V>
__device__ __forceinline__ void gate_fwd_elems(float* __restrict__ raw, const float* __restrict__ bias,
                                               float* __restrict__ g, long n, int width, float norm,
                                               float clamp) {
    ELEMENTS(i, n) {
        float x[V], out[V];
        ld<V>(raw + i, x);
#pragma unroll
        for (int e = 0; e < V; e++) {
            x[e] += bias[(i + e) % width];
            out[e] = fmaxf((fminf(x[e], 0.f) - log1pf(__expf(-fabsf(x[e])))) / norm, clamp);
        }
        st<V>(raw + i, x);
        st<V>(g + i, out);
    }
}
extern "C" __global__ void gate_fwd(float* __restrict__ raw, const float* __restrict__ bias,
                                    float* __restrict__ g, long n, int width, float norm, float clamp) {
    BY_WIDTH(n, gate_fwd_elems, raw, bias, g, n, width, norm, clamp);
}

// draw = dg σ(-raw) / norm where the gate was not clamped (in io_t, for the products);
// dbias += Σ_rows draw (f32).
template <int V>
__device__ __forceinline__ void gate_bwd_rows(const float* __restrict__ raw, const float* __restrict__ dg,
                                              io_t* __restrict__ draw, float* cols, int rows,
                                              int width, float norm, float clamp) {
    for (int r = first_row(); r < rows; r += row_step()) {
        const long base = (long)r * width;
        LANE_COLS(j, width) {
            float x[V], d[V];
            ld<V>(raw + base + j, x);
            ld<V>(dg + base + j, d);
#pragma unroll
            for (int i = 0; i < V; i++) {
                const float ls = fminf(x[i], 0.f) - log1pf(__expf(-fabsf(x[i])));
                d[i] = ls / norm < clamp ? 0.f : d[i] * sigmoidf_(-x[i]) / norm;
                atomicAdd(cols + j + i, d[i]);
            }
            st<V>(draw + base + j, d);
        }
    }
}
extern "C" __global__ void gate_bwd(const float* __restrict__ raw, const float* __restrict__ dg,
                                    io_t* __restrict__ draw, float* __restrict__ dbias, int rows,
                                    int width, float norm, float clamp) {
    __shared__ float cols[MAXW];
    cols_zero(cols, width);
    BY_WIDTH(width, gate_bwd_rows, raw, dg, draw, cols, rows, width, norm, clamp);
    cols_flush(cols, dbias, width);
}

// Short convolution and SiLU over [B, T, C] (f32 in): pre = Σ_i w[c, i] x[t - W + 1 + i],
// out = silu(pre) in io_t. pre is kept (f32) for the backward. Rows before a sequence's start
// are zero, or, with `halo` ([B, W-1, C] f32: sequence parallelism, the previous rank's last
// rows), taken from it.
extern "C" __global__ void conv_silu_fwd(const float* __restrict__ x, const float* __restrict__ halo,
                                         const float* __restrict__ w, float* __restrict__ pre,
                                         io_t* __restrict__ out, int b, int t, int c, int width) {
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        int ch = i % c, s = (i / c) % t;
        long seq = i / ((long)t * c);
        float acc = 0.f;
        for (int k = 0; k < width; k++) {
            int src = s - width + 1 + k;
            if (src >= 0)
                acc += w[ch * width + k] * x[i + (long)(src - s) * c];
            else if (halo)
                acc += w[ch * width + k] * halo[(seq * (width - 1) + width - 1 + src) * c + ch];
        }
        pre[i] = acc;
        out[i] = from_f(acc * sigmoidf_(acc));
    }
}

// The gradient of silu(pre) at output row `at` (the flat index of [B, T, C]).
__device__ __forceinline__ float conv_dpre(const float* pre, const io_t* dout, long at) {
    float p = pre[at], sg = sigmoidf_(p);
    return to_f(dout[at]) * sg * (1.f + p * (1.f - sg));
}

// From dout (io_t, the GLA gradient): dpre = dout silu'(pre); dx[t'] = Σ_k w[c, k]
// dpre[t' + W - 1 - k] (gathered, no atomics; io_t for the products); dw[c, k] += Σ dpre[t]
// x[t - W + 1 + k] (an atomic per element and tap). With `next` ([B, W-1, C] f32: sequence
// parallelism, what the next rank's first outputs send back to this rank's last W-1 rows),
// those rows add it.
extern "C" __global__ void conv_silu_bwd(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ pre, const io_t* __restrict__ dout,
                                         const float* __restrict__ next, io_t* __restrict__ dx,
                                         float* __restrict__ dw, int b, int t, int c, int width) {
    long n = (long)b * t * c;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        int ch = i % c, s = (i / c) % t;
        float acc = 0.f;
        for (int k = 0; k < width; k++) {
            int dst = s + width - 1 - k;  // the output that read x[s] through tap k
            if (dst < t) {
                float dp = conv_dpre(pre, dout, i + (long)(dst - s) * c);
                acc += w[ch * width + k] * dp;
                atomicAdd(dw + ch * width + k, dp * x[i]);
            }
        }
        int from_end = t - 1 - s;  // rows after this one in the sequence
        if (next && from_end < width - 1) {
            long seq = i / ((long)t * c);
            acc += next[(seq * (width - 1) + width - 2 - from_end) * c + ch];
        }
        dx[i] = from_f(acc);
    }
}

// Sequence parallelism: the gradient of the halo rows ([B, W-1, C], the previous rank's last
// rows) through this rank's first outputs, dhalo (f32, written: the previous rank's `next`),
// and their terms of dw (added).
extern "C" __global__ void conv_silu_halo_bwd(const float* __restrict__ halo, const float* __restrict__ w,
                                              const float* __restrict__ pre, const io_t* __restrict__ dout,
                                              float* __restrict__ dhalo, float* __restrict__ dw, int b,
                                              int t, int c, int width) {
    long n = (long)b * (width - 1) * c;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) {
        int ch = i % c, r = (i / c) % (width - 1);
        long seq = i / ((long)(width - 1) * c);
        int s = r - (width - 1);  // the halo row's place before the segment
        float acc = 0.f;
        for (int k = 0; k < width; k++) {
            int dst = s + width - 1 - k;
            if (dst >= 0 && dst < t) {
                float dp = conv_dpre(pre, dout, (seq * t + dst) * c + ch);
                acc += w[ch * width + k] * dp;
                atomicAdd(dw + ch * width + k, dp * halo[i]);
            }
        }
        dhalo[i] = acc;
    }
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

// y = x in the element type, n elements: the weights' copies after ZeRO-1's all-gather.
extern "C" __global__ void narrow(const float* __restrict__ x, io_t* __restrict__ y, long n) {
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) y[i] = from_f(x[i]);
}

// Σ x^2 per block into partials[block], for the global gradient norm; sum_partials adds them
// in order, so that the same x gives the same bits (data-parallel ranks clip alike).
extern "C" __global__ void sum_squares(const float* __restrict__ x, float* __restrict__ partials, long n) {
    __shared__ float red[NW];
    float s = 0.f;
    for (long i = blockIdx.x * (long)NT + threadIdx.x; i < n; i += (long)gridDim.x * NT) s += x[i] * x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// *out = Σ partials[0..n), one block.
extern "C" __global__ void sum_partials(const float* __restrict__ partials, float* __restrict__ out, int n) {
    __shared__ float red[NW];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += NT) s += partials[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) *out = s;
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
