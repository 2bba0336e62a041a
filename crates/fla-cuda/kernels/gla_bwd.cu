// Chunkwise GLA backward: two sweeps over the chunks of each sequence, each block owning a
// tile of BK key columns and every value column, with its state tile (BK x V, f32) in shared
// memory and never written out; then two small kernels that finish the value side.
//
//   gla_bwd_dq   forward sweep with the state S: dq, q ⊙ dq for the key gate, and (with a
//                gate) each chunk's starting state, in io_t
//   gla_bwd_dkv  reverse sweep with dS = dL/dS: dk, the key gate's gradient, dh0, each key
//                tile's share of dv (summed over tiles by atomics when there are several),
//                and the value gate's chunk boundary terms
//   gla_bwd_rows dv's diagonal term, the scalar gate (sum over K), du, the value-gate terms
//   gla_bwd_dgv  the value gate's reverse cumulative sums within each chunk
//
// Notation as in gla_fwd.cu, per chunk: Q̃ = q ⊙ e^Gq, K̃ = k ⊙ e^-G, K̂ = k ⊙ e^(Γ-G),
// Ṽ = v ⊙ e^-B, V̂ = v ⊙ e^(Β-B), dÕ = do ⊙ e^B, A = scale tril(Q̃ K̃^T) (strict), and
//   o = e^B ⊙ (scale Q̃ S + A Ṽ) + diag,     S' = (e^Γ ⊗ e^Β) ⊙ S + K̂^T V̂.
// With P = dÕ Ṽ^T (the gradient of A, strict lower part, times scale):
//   dq = (scale dÕ S^T + P K̃) ⊙ e^Gq
//   dk = (P^T Q̃) ⊙ e^-G + (V̂ dS'^T) ⊙ e^(Γ-G)
//   dv = (A^T dÕ) ⊙ e^-B + (K̂ dS') ⊙ e^(Β-B)
//   dS = (e^Γ ⊗ e^Β) ⊙ dS' + scale Q̃^T dÕ
// plus the diagonal terms (no gate). As in the forward, a chunk whose total decay exceeds
// SAFE_EXP takes exact term-by-term sums instead of the products through e^-G (or e^-B).
//
// Gate gradients by the identity of seq.rs (gate_grads), chunk by chunk: with G local to the
// chunk, dL/dG_i = q⊙dq [at the row reading G_i] - k⊙dk (diagonal terms left out), plus
// rowsum(dS' ⊙ S') at the chunk's last row, and the log gate's gradient is the reverse sum
// down the chunk. The boundary term is taken apart as
//   rowsum(dS' ⊙ S') = e^Γ ⊙ rowsum(dS' ⊙ S ⊙ e^Β) + Σ_j k_j ⊙ dk_j[state part]
// where S is the chunk's starting state (stored by gla_bwd_dq), so that the state parts of
// k⊙dk cancel against the same rounded numbers: summing the identity over the whole
// sequence instead (one running sum from rowsum(dht ⊙ ht)) cancels large terms rounded
// differently and loses bf16 gradients to strong gates. The value side likewise, from
// o⊙do - v⊙dv and colsum(dS' ⊙ S').
//
// Settings (-D): HEAD_K, HEAD_V, BK, BVS (value columns per step), CHUNK, HAS_G, G_SCALAR,
// HAS_GV, HAS_U, HAS_H0, HAS_DHT, DV_ATOMIC.

#define KD HEAD_K
#define C CHUNK
#define SAFE_EXP 40.f

// Padded row strides (see gla_fwd.cu).
#define KS (BK + 16 / sizeof(io_t))
#define VSS (BVS + 16 / sizeof(io_t))
#define AS (C + 8)
#define XS (BK + 4)
#define YS (BVS + 4)
#define SS (HEAD_V + 4)

#define OFF_QR 0
#define OFF_T1 (OFF_QR + C * KS * sizeof(io_t))
#define OFF_T2 (OFF_T1 + C * KS * sizeof(io_t))
#define OFF_KR (OFF_T2 + C * KS * sizeof(io_t))
#define OFF_V (OFF_KR + C * KS * sizeof(io_t))
#define OFF_DO (OFF_V + C * VSS * sizeof(io_t))
#define OFF_G (OFF_DO + C * VSS * sizeof(io_t))
#define OFF_B (OFF_G + (HAS_G ? C * BK * 4 : 0))
#define OFF_P (OFF_B + (HAS_GV ? C * BVS * 4 : 0))
#define OFF_A (OFF_P + C * AS * 4)
#define OFF_X (OFF_A + C * AS * 4)
#define OFF_Y (OFF_X + C * XS * 4)
#define OFF_S (OFF_Y + C * YS * 4)
#define OFF_DOV (OFF_S + BK * SS * 4)
#define OFF_W (OFF_DOV + C * 4)
#define OFF_RED (OFF_W + BK * 4)
#define SMEM_BYTES (OFF_RED + 16)

struct Tiles {
    io_t *qr, *t1, *t2, *kr, *v, *dO;  // raw q, two work tiles, raw k; v, do
    float *G, *B, *P, *A, *X, *Y, *S, *dov, *w, *red;
};

__device__ __forceinline__ Tiles tiles() {
    extern __shared__ __align__(16) unsigned char smem[];
    Tiles t;
    t.qr = (io_t*)(smem + OFF_QR);
    t.t1 = (io_t*)(smem + OFF_T1);
    t.t2 = (io_t*)(smem + OFF_T2);
    t.kr = (io_t*)(smem + OFF_KR);
    t.v = (io_t*)(smem + OFF_V);
    t.dO = (io_t*)(smem + OFF_DO);
    t.G = (float*)(smem + OFF_G);
    t.B = (float*)(smem + OFF_B);
    t.P = (float*)(smem + OFF_P);
    t.A = (float*)(smem + OFF_A);
    t.X = (float*)(smem + OFF_X);
    t.Y = (float*)(smem + OFF_Y);
    t.S = (float*)(smem + OFF_S);
    t.dov = (float*)(smem + OFF_DOV);
    t.w = (float*)(smem + OFF_W);
    t.red = (float*)(smem + OFF_RED);
    return t;
}

// In place, the inclusive cumulative sums down the columns of a C x w tile; returns the
// largest total decay max(-last row), to every thread. Synchronises before and after.
__device__ float cumsum_span(float* x, int w, float* red) {
    if (threadIdx.x == 0) *red = 0.f;
    __syncthreads();
    float span = 0.f;
    for (int col = threadIdx.x; col < w; col += NT) {
        float s = 0.f;
        for (int i = 0; i < C; i++) x[i * w + col] = (s += x[i * w + col]);
        span = fmaxf(span, -s);
    }
    span = warp_max(span);
    if (threadIdx.x % 32 == 0) atomicMax((int*)red, __float_as_int(span));
    __syncthreads();
    return *red;
}

// Starts loading the chunk's q, k (the block's key columns) and key gate.
__device__ __forceinline__ void load_keys(Tiles t, const io_t* q, const io_t* k, const float* g,
                                          size_t row0, int rows, int H, int hh, int k0) {
    load_tile<C, BK>(t.qr, KS, q, row0, rows, H, hh, KD, k0);
    load_tile<C, BK>(t.kr, KS, k, row0, rows, H, hh, KD, k0);
#if HAS_G && !G_SCALAR
    load_tile<C, BK>(t.G, BK, g, row0, rows, H, hh, KD, k0);
#elif HAS_G
    for (int idx = threadIdx.x; idx < C * BK; idx += NT) {
        const int i = idx / BK;
        t.G[idx] = i < rows ? g[(row0 + i) * H + hh] : 0.f;
    }
#endif
}

// The block's K tile of a state [N, H, K, V] at state_at (h0 or dht) into S; zeros without.
__device__ void init_state(Tiles t, const float* src, size_t state_at, int k0) {
    for (int idx = threadIdx.x; idx < BK * HEAD_V; idx += NT) {
        const int kk = idx / HEAD_V, c = idx % HEAD_V;
        t.S[kk * SS + c] = src ? src[state_at + (size_t)(k0 + kk) * HEAD_V + c] : 0.f;
    }
}

// Starts a chunk of both sweeps: its keys and key gate loaded, the gate's cumulative sums
// taken, dov and w cleared. Returns whether the one-reference (fast) path applies.
__device__ bool begin_chunk(Tiles t, const io_t* q, const io_t* k, const float* g, size_t row0,
                            int rows, int H, int hh, int k0) {
    load_keys(t, q, k, g, row0, rows, H, hh, k0);
    for (int i = threadIdx.x; i < C; i += NT) t.dov[i] = 0.f;
    for (int i = threadIdx.x; i < BK; i += NT) t.w[i] = 0.f;
    cp_async_wait_all();
#if HAS_G
    return cumsum_span(t.G, BK, t.red) <= SAFE_EXP;
#else
    __syncthreads();
    return true;
#endif
}

// Loads the chunk's v and do at value columns v0.. (BVS wide) and the value gate's cumulative
// sums; adds do_i·v_i into dov (the diagonal terms' weight). Returns the value side's total
// decay (0 without the value gate). Synchronises at the end.
__device__ float load_values(Tiles t, const io_t* v, const io_t* d_o, const float* gv,
                             size_t row0, int rows, int H, int hh, int v0) {
    load_tile<C, BVS>(t.v, VSS, v, row0, rows, H, hh, HEAD_V, v0);
    load_tile<C, BVS>(t.dO, VSS, d_o, row0, rows, H, hh, HEAD_V, v0);
#if HAS_GV
    load_tile<C, BVS>(t.B, BVS, gv, row0, rows, H, hh, HEAD_V, v0);
#endif
    cp_async_wait_all();
#if HAS_GV
    const float span = cumsum_span(t.B, BVS, t.red + 1);
#else
    const float span = 0.f;
    __syncthreads();
#endif
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int i = warp; i < C; i += NW) {
        float s = 0.f;
        for (int c = lane; c < BVS; c += 32) s += to_f(t.dO[i * VSS + c]) * to_f(t.v[i * VSS + c]);
        s = warp_sum(s);
        if (lane == 0) t.dov[i] += s;
    }
    __syncthreads();
    return span;
}

// P (+)= dÕ Ṽ^T over this step's value columns (first: overwrite), leaving dÕ in t.dO and V̂
// in t.v.
__device__ void value_side(Tiles t, bool first, bool fast_b) {
#if HAS_GV
    if (fast_b) {
        for (int idx = threadIdx.x; idx < C * BVS; idx += NT) {
            const int at = (idx / BVS) * VSS + idx % BVS;
            t.dO[at] = from_f(to_f(t.dO[at]) * EXP(t.B[idx]));
            t.v[at] = from_f(to_f(t.v[at]) * EXP(-t.B[idx]));
        }
        __syncthreads();
        gemm(t.P, AS, row_major(t.dO, VSS), col_major(t.v, VSS), C, C, BVS, 1.f, !first);
        __syncthreads();
        for (int idx = threadIdx.x; idx < C * BVS; idx += NT) {
            const int at = (idx / BVS) * VSS + idx % BVS;
            t.v[at] = from_f(to_f(t.v[at]) * EXP(t.B[(C - 1) * BVS + idx % BVS]));
        }
    } else {
        for (int idx = threadIdx.x; idx < C * C; idx += NT) {
            const int i = idx / C, j = idx % C;
            float s = 0.f;
            for (int c = 0; j < i && c < BVS; c++)
                s += to_f(t.dO[i * VSS + c]) * to_f(t.v[j * VSS + c]) *
                     EXP(t.B[i * BVS + c] - t.B[j * BVS + c]);
            t.P[i * AS + j] = s + (first ? 0.f : t.P[i * AS + j]);
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < C * BVS; idx += NT) {
            const int at = (idx / BVS) * VSS + idx % BVS;
            const float b = t.B[idx], bl = t.B[(C - 1) * BVS + idx % BVS];
            t.dO[at] = from_f(to_f(t.dO[at]) * EXP(b));
            t.v[at] = from_f(to_f(t.v[at]) * EXP(bl - b));
        }
    }
#else
    gemm(t.P, AS, row_major(t.dO, VSS), col_major(t.v, VSS), C, C, BVS, 1.f, !first);
#endif
    __syncthreads();
}

// S_vs <- (e^Γ ⊗ e^Β) ⊙ S_vs for the state columns v0.. of this step.
__device__ __forceinline__ void decay_state(Tiles t, int v0) {
#if HAS_G || HAS_GV
    for (int idx = threadIdx.x; idx < BK * BVS; idx += NT) {
        const int kk = idx / BVS, c = idx % BVS;
        float f = 1.f;
#if HAS_G
        f *= EXP(t.G[(C - 1) * BK + kk]);
#endif
#if HAS_GV
        f *= EXP(t.B[(C - 1) * BVS + c]);
#endif
        t.S[kk * SS + v0 + c] *= f;
    }
    __syncthreads();
#endif
}

// Gq_ik: G_ik, or G_(i-1)k with the bonus (0 on the first row).
__device__ __forceinline__ float gq(const float* G, int i, int kk) {
    return HAS_U ? (i > 0 ? G[(i - 1) * BK + kk] : 0.f) : G[i * BK + kk];
}

// Keeps the strict lower triangle of P, times scale.
__device__ __forceinline__ void mask_strict(float* P, float scale) {
    for (int idx = threadIdx.x; idx < C * C; idx += NT) {
        const int i = idx / C, j = idx % C;
        P[i * AS + j] = j < i ? scale * P[i * AS + j] : 0.f;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(NT) gla_bwd_dq(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ gv, const float* __restrict__ u,
    const float* __restrict__ h0, const io_t* __restrict__ d_o, io_t* __restrict__ dq,
    float* __restrict__ qdq, io_t* __restrict__ states, const int* __restrict__ cu_seqlens,
    const int* __restrict__ chunk_off, int H, float scale) {
    check_smem(SMEM_BYTES);
    const Tiles t = tiles();
    const int tid = threadIdx.x;
    const int k0 = blockIdx.x * BK, hh = blockIdx.y, n = blockIdx.z;
    const int bos = cu_seqlens[n], len = cu_seqlens[n + 1] - bos;
    const size_t state_at = ((size_t)n * H + hh) * KD * HEAD_V;

    init_state(t, HAS_H0 ? h0 : nullptr, state_at, k0);
    for (int c0 = 0; c0 < len; c0 += C) {
        const int rows = min(C, len - c0);
        const size_t row0 = (size_t)bos + c0;
        const bool fast_g = begin_chunk(t, q, k, g, row0, rows, H, hh, k0);
        // t1 = K̃ (fast path; the exact path reads raw k), t2 = K̂.
        for (int idx = tid; idx < C * BK; idx += NT) {
            const int at = (idx / BK) * KS + idx % BK;
            const float kr = to_f(t.kr[at]);
#if HAS_G
            const float G = t.G[idx], Gl = t.G[(C - 1) * BK + idx % BK];
            t.t1[at] = from_f(fast_g ? kr * EXP(-G) : 0.f);
            t.t2[at] = from_f(kr * EXP(Gl - G));
#else
            t.t1[at] = t.kr[at];
            t.t2[at] = t.kr[at];
#endif
        }
        const size_t chunk_at = (((size_t)chunk_off[n] + c0 / C) * H + hh) * KD * HEAD_V;
        for (int vs = 0; vs < HEAD_V; vs += BVS) {
#if HAS_G || HAS_GV
            for (int idx = tid; idx < BK * BVS; idx += NT) {
                const int kk = idx / BVS, c = idx % BVS;
                states[chunk_at + (size_t)(k0 + kk) * HEAD_V + vs + c] = from_f(t.S[kk * SS + vs + c]);
            }
#endif
            const float span_b = load_values(t, v, d_o, gv, row0, rows, H, hh, vs);
            value_side(t, vs == 0, span_b <= SAFE_EXP);
            // X (+)= scale dÕ S^T, then S <- decay S + K̂^T V̂ on these columns.
            gemm(t.X, XS, row_major(t.dO, VSS), col_major(t.S + vs, SS), C, BK, BVS, scale, vs > 0);
            __syncthreads();
            decay_state(t, vs);
            gemm(t.S + vs, SS, col_major(t.t2, KS), row_major(t.v, VSS), BK, BVS, C, 1.f, true);
            __syncthreads();
        }
        mask_strict(t.P, scale);
#if HAS_G
        if (fast_g) {
            gemm(t.X, XS, row_major(t.P, AS), row_major(t.t1, KS), C, BK, C, 1.f, true);
            __syncthreads();
            for (int idx = tid; idx < C * BK; idx += NT) {
                const int i = idx / BK, kk = idx % BK;
                t.X[i * XS + kk] *= EXP(gq(t.G, i, kk));
            }
        } else {
            for (int idx = tid; idx < C * BK; idx += NT) {
                const int i = idx / BK, kk = idx % BK;
                const float e = gq(t.G, i, kk);
                float s = t.X[i * XS + kk] * EXP(e);
                for (int j = 0; j < i; j++)
                    s += t.P[i * AS + j] * to_f(t.kr[j * KS + kk]) * EXP(e - t.G[j * BK + kk]);
                t.X[i * XS + kk] = s;
            }
        }
#else
        gemm(t.X, XS, row_major(t.P, AS), row_major(t.kr, KS), C, BK, C, 1.f, true);
#endif
        __syncthreads();
        for (int idx = tid; idx < rows * BK; idx += NT) {
            const int i = idx / BK, kk = idx % BK;
            const size_t at = ((row0 + i) * H + hh) * KD + k0 + kk;
            const float x = t.X[i * XS + kk], w = HAS_U ? u[hh * KD + k0 + kk] : 1.f;
#if HAS_G
            qdq[at] = to_f(t.qr[i * KS + kk]) * x;
#endif
            dq[at] = from_f(x + scale * w * to_f(t.kr[i * KS + kk]) * t.dov[i]);
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(NT) gla_bwd_dkv(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ gv, const float* __restrict__ u,
    const io_t* __restrict__ d_o, const float* __restrict__ dht, const float* __restrict__ qdq,
    const io_t* __restrict__ states, io_t* __restrict__ dk, float* __restrict__ dv_acc,
    float* __restrict__ dgk, float* __restrict__ zv, float* __restrict__ dh0,
    const int* __restrict__ cu_seqlens, const int* __restrict__ chunk_off, int H, float scale) {
    check_smem(SMEM_BYTES);
    const Tiles t = tiles();
    const int tid = threadIdx.x;
    const int k0 = blockIdx.x * BK, hh = blockIdx.y, n = blockIdx.z;
    const int bos = cu_seqlens[n], len = cu_seqlens[n + 1] - bos;
    const size_t state_at = ((size_t)n * H + hh) * KD * HEAD_V;

    init_state(t, HAS_DHT ? dht : nullptr, state_at, k0);
    for (int c0 = len > 0 ? (len - 1) / C * C : -1; c0 >= 0; c0 -= C) {
        const int rows = min(C, len - c0);
        const size_t row0 = (size_t)bos + c0;
        const size_t chunk = (size_t)chunk_off[n] + c0 / C;
        const bool fast_g = begin_chunk(t, q, k, g, row0, rows, H, hh, k0);
        // A from t2 = Q̃ and t1 = K̃ (or term by term), then t1 <- K̂.
#if HAS_G
        for (int idx = tid; idx < C * BK; idx += NT) {
            const int i = idx / BK, kk = idx % BK, at = i * KS + kk;
            t.t2[at] = from_f(to_f(t.qr[at]) * EXP(gq(t.G, i, kk)));
            t.t1[at] = from_f(fast_g ? to_f(t.kr[at]) * EXP(-t.G[idx]) : 0.f);
        }
        __syncthreads();
        if (fast_g) {
            gemm(t.A, AS, row_major(t.t2, KS), col_major(t.t1, KS), C, C, BK, scale, false);
        } else {
            for (int idx = tid; idx < C * C; idx += NT) {
                const int i = idx / C, j = idx % C;
                float s = 0.f;
                for (int kk = 0; j < i && kk < BK; kk++)
                    s += to_f(t.qr[i * KS + kk]) * to_f(t.kr[j * KS + kk]) *
                         EXP(gq(t.G, i, kk) - t.G[j * BK + kk]);
                t.A[i * AS + j] = scale * s;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < C * BK; idx += NT) {
            const int at = (idx / BK) * KS + idx % BK;
            t.t1[at] = from_f(to_f(t.kr[at]) * EXP(t.G[(C - 1) * BK + idx % BK] - t.G[idx]));
        }
#else
        for (int idx = tid; idx < C * BK; idx += NT) {
            const int at = (idx / BK) * KS + idx % BK;
            t.t1[at] = t.kr[at];
            t.t2[at] = t.qr[at];
        }
        __syncthreads();
        gemm(t.A, AS, row_major(t.qr, KS), col_major(t.kr, KS), C, C, BK, scale, false);
#endif
        __syncthreads();
        for (int idx = tid; idx < C * C; idx += NT)
            if (idx % C >= idx / C) t.A[(idx / C) * AS + idx % C] = 0.f;

        for (int vs = 0; vs < HEAD_V; vs += BVS) {
            const float span_b = load_values(t, v, d_o, gv, row0, rows, H, hh, vs);
            const bool fast_b = span_b <= SAFE_EXP;
            // Y = K̂ dS' on these columns, times e^Β (fast) or e^(Β-B) with the exact intra
            // terms (from the raw do, before value_side rescales it).
            gemm(t.Y, YS, row_major(t.t1, KS), row_major(t.S + vs, SS), C, BVS, BK, 1.f, false);
            __syncthreads();
            // The chunk boundary terms: w = rowsum(dS' ⊙ S ⊙ e^Β) for the key gate; for the
            // value gate this key tile's share of colsum(dS' ⊙ S') (see the top).
            const io_t* s0 = states + (chunk * H + hh) * KD * HEAD_V + (size_t)k0 * HEAD_V + vs;
#if HAS_G
            for (int kk = threadIdx.x / 32; kk < BK; kk += NW) {
                float w = 0.f;
                for (int c = threadIdx.x % 32; c < BVS; c += 32) {
                    float x = to_f(s0[(size_t)kk * HEAD_V + c]) * t.S[kk * SS + vs + c];
#if HAS_GV
                    x *= EXP(t.B[(C - 1) * BVS + c]);
#endif
                    w += x;
                }
                w = warp_sum(w);
                if (threadIdx.x % 32 == 0) t.w[kk] += w;
            }
#endif
#if HAS_GV
            for (int c = tid; c < BVS; c += NT) {
                const float bl = t.B[(C - 1) * BVS + c];
                float z = 0.f;
                for (int kk = 0; kk < BK; kk++)
                    z += EXP(t.G[(C - 1) * BK + kk]) * to_f(s0[(size_t)kk * HEAD_V + c]) *
                         t.S[kk * SS + vs + c];
                z *= EXP(bl);
                for (int j = 0; j < C; j++)
                    z += to_f(t.v[j * VSS + c]) * t.Y[j * YS + c] * EXP(bl - t.B[j * BVS + c]);
                atomicAdd(&zv[(chunk * H + hh) * HEAD_V + vs + c], z);
            }
            __syncthreads();
#endif
#if HAS_GV
            for (int idx = tid; idx < C * BVS; idx += NT) {
                const int j = idx / BVS, c = idx % BVS;
                const float b = t.B[idx], bl = t.B[(C - 1) * BVS + c];
                float y = t.Y[j * YS + c] * EXP(fast_b ? bl : bl - b);
                for (int i = j + 1; !fast_b && i < C; i++)
                    y += t.A[i * AS + j] * to_f(t.dO[i * VSS + c]) * EXP(t.B[i * BVS + c] - b);
                t.Y[j * YS + c] = y;
            }
            __syncthreads();
#endif
            value_side(t, vs == 0, fast_b);
            if (fast_b) {
                gemm(t.Y, YS, col_major(t.A, AS), row_major(t.dO, VSS), C, BVS, C, 1.f, true);
                __syncthreads();
            }
            // X (+)= V̂ dS'^T; dv's share out; then dS <- decay dS + scale Q̃^T dÕ.
            gemm(t.X, XS, row_major(t.v, VSS), col_major(t.S + vs, SS), C, BK, BVS, 1.f, vs > 0);
            for (int idx = tid; idx < rows * BVS; idx += NT) {
                const int j = idx / BVS, c = idx % BVS;
                float y = t.Y[j * YS + c];
#if HAS_GV
                if (fast_b) y *= EXP(-t.B[idx]);
#endif
                float* dst = dv_acc + ((row0 + j) * H + hh) * HEAD_V + vs + c;
#if DV_ATOMIC
                atomicAdd(dst, y);
#else
                *dst = y;
#endif
            }
            __syncthreads();
            decay_state(t, vs);
            gemm(t.S + vs, SS, col_major(t.t2, KS), row_major(t.dO, VSS), BK, BVS, C, scale, true);
            __syncthreads();
        }
        mask_strict(t.P, scale);
#if HAS_G
        // The key gate's boundary term: e^Γ w + Σ_j k_j ⊙ dk_j[state part] (X holds
        // V̂ dS'^T), the start of the reverse sum down the chunk; thread kk < BK owns column kk.
        float carry = 0.f;
        if (tid < BK) {
            const float gl = t.G[(C - 1) * BK + tid];
            carry = EXP(gl) * t.w[tid];
            for (int j = 0; j < C; j++)
                carry += to_f(t.kr[j * KS + tid]) * t.X[j * XS + tid] * EXP(gl - t.G[j * BK + tid]);
        }
        __syncthreads();
        if (fast_g) {
            for (int idx = tid; idx < C * BK; idx += NT) {
                const int j = idx / BK, kk = idx % BK;
                t.X[j * XS + kk] *= EXP(t.G[(C - 1) * BK + kk]);
            }
            __syncthreads();
            gemm(t.X, XS, col_major(t.P, AS), row_major(t.t2, KS), C, BK, C, 1.f, true);
            __syncthreads();
            for (int idx = tid; idx < C * BK; idx += NT) {
                const int j = idx / BK, kk = idx % BK;
                t.X[j * XS + kk] *= EXP(-t.G[idx]);
            }
        } else {
            for (int idx = tid; idx < C * BK; idx += NT) {
                const int j = idx / BK, kk = idx % BK;
                const float G = t.G[idx];
                float s = t.X[j * XS + kk] * EXP(t.G[(C - 1) * BK + kk] - G);
                for (int i = j + 1; i < C; i++)
                    s += t.P[i * AS + j] * to_f(t.qr[i * KS + kk]) * EXP(gq(t.G, i, kk) - G);
                t.X[j * XS + kk] = s;
            }
        }
#else
        gemm(t.X, XS, col_major(t.P, AS), row_major(t.qr, KS), C, BK, C, 1.f, true);
#endif
        __syncthreads();
#if HAS_G
        // The key gate: reverse sums of q⊙dq (one row later with the bonus, within the
        // chunk) - k⊙dk down the chunk. The chunk's q⊙dq is staged in the P and A tiles (free
        // now; 2 C (C + 8) >= C BK floats) so that the sums wait on no global load.
        float* sqdq = t.P;
        for (int idx = tid; idx < rows * BK; idx += NT)
            sqdq[idx] = qdq[((row0 + idx / BK) * H + hh) * KD + k0 + idx % BK];
        __syncthreads();
        if (tid < BK) {
            const int kk = tid;
            float next = 0.f;  // the bonus reads row j + 1's q⊙dq, overwritten by then
            for (int j = rows - 1; j >= 0; j--) {
                const float own = sqdq[j * BK + kk];
                carry += HAS_U ? next : own;
                next = own;
                carry -= to_f(t.kr[j * KS + kk]) * t.X[j * XS + kk];
                sqdq[j * BK + kk] = carry;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < rows * BK; idx += NT)
            dgk[((row0 + idx / BK) * H + hh) * KD + k0 + idx % BK] = sqdq[idx];
#endif
        for (int idx = tid; idx < rows * BK; idx += NT) {
            const int j = idx / BK, kk = idx % BK;
            const size_t at = ((row0 + j) * H + hh) * KD + k0 + kk;
            const float w = HAS_U ? u[hh * KD + k0 + kk] : 1.f;
            dk[at] = from_f(t.X[j * XS + kk] + scale * w * to_f(t.qr[j * KS + kk]) * t.dov[j]);
        }
        __syncthreads();
    }
#if HAS_H0
    for (int idx = tid; idx < BK * HEAD_V; idx += NT) {
        const int kk = idx / HEAD_V, c = idx % HEAD_V;
        dh0[state_at + (size_t)(k0 + kk) * HEAD_V + c] = t.S[kk * SS + c];
    }
#endif
}

// One warp per (token, head) row: dv = dv_acc + scale (q·(w⊙k)) do; the scalar gate's dg as
// the sum of dgk over K; du = Σ scale q ⊙ k (do·v); and, with the value gate, the terms
// o⊙do - v⊙dv of its gradient (diagonal terms left out) into dgv, reverse-summed by
// gla_bwd_dgv. Grid (row blocks, H); each block takes RB rows of one head.
#define RB 64
extern "C" __global__ void __launch_bounds__(NT) gla_bwd_rows(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ u, const io_t* __restrict__ d_o, const float* __restrict__ ond,
    const float* __restrict__ dv_acc, const float* __restrict__ dgk, io_t* __restrict__ dv,
    float* __restrict__ dg, float* __restrict__ dgv, float* __restrict__ du, int tokens, int H,
    float scale) {
    __shared__ float du_sum[KD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, hh = blockIdx.y;
    float du_part[(KD + 31) / 32];
    for (int s = 0; s < (KD + 31) / 32; s++) du_part[s] = 0.f;
    for (int kk = threadIdx.x; kk < KD; kk += NT) du_sum[kk] = 0.f;
    for (int r = blockIdx.x * RB + warp; r < min(tokens, (blockIdx.x + 1) * RB); r += NW) {
        const size_t qa = ((size_t)r * H + hh) * KD, va = ((size_t)r * H + hh) * HEAD_V;
        float d = 0.f, dov = 0.f, gs = 0.f;
        for (int kk = lane; kk < KD; kk += 32) {
            const float w = HAS_U ? u[hh * KD + kk] : 1.f;
            d += to_f(q[qa + kk]) * w * to_f(k[qa + kk]);
#if G_SCALAR
            gs += dgk[qa + kk];
#endif
        }
        for (int c = lane; c < HEAD_V; c += 32) dov += to_f(d_o[va + c]) * to_f(v[va + c]);
        d = warp_sum(d);
        dov = warp_sum(dov);
        for (int c = lane; c < HEAD_V; c += 32) {
            const float y = dv_acc[va + c], dy = to_f(d_o[va + c]);
            dv[va + c] = from_f(y + scale * d * dy);
#if HAS_GV
            dgv[va + c] = ond[va + c] * dy - to_f(v[va + c]) * y;
#endif
        }
#if G_SCALAR
        gs = warp_sum(gs);
        if (lane == 0) dg[(size_t)r * H + hh] = gs;
#endif
#if HAS_U
        for (int kk = lane, s = 0; kk < KD; kk += 32, s++)
            du_part[s] += scale * to_f(q[qa + kk]) * to_f(k[qa + kk]) * dov;
#endif
    }
#if HAS_U
    __syncthreads();
    for (int kk = lane, s = 0; kk < KD; kk += 32, s++) atomicAdd(&du_sum[kk], du_part[s]);
    __syncthreads();
    for (int kk = threadIdx.x; kk < KD; kk += NT) atomicAdd(&du[hh * KD + kk], du_sum[kk]);
#endif
}

// The value gate's gradient: reverse cumulative sums of the terms gla_bwd_rows wrote, down
// each chunk, starting from its boundary term in zv. Grid (column blocks, H, chunks);
// chunk_seq names each chunk's sequence.
extern "C" __global__ void __launch_bounds__(NT) gla_bwd_dgv(
    float* __restrict__ dgv, const float* __restrict__ zv, const int* __restrict__ cu_seqlens,
    const int* __restrict__ chunk_off, const int* __restrict__ chunk_seq, int H) {
    const int c = blockIdx.x * NT + threadIdx.x, hh = blockIdx.y, chunk = blockIdx.z;
    if (c >= HEAD_V) return;
    const int n = chunk_seq[chunk], c0 = (chunk - chunk_off[n]) * C;
    const int bos = cu_seqlens[n], rows = min(C, cu_seqlens[n + 1] - bos - c0);
    float carry = zv[((size_t)chunk * H + hh) * HEAD_V + c];
    for (int i = rows - 1; i >= 0; i--) {
        float* x = dgv + (((size_t)bos + c0 + i) * H + hh) * HEAD_V + c;
        carry += *x;
        *x = carry;
    }
}
