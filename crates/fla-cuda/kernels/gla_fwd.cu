// Chunkwise GLA forward, fused: one block per (V tile, head, sequence) sweeps the chunks of
// its sequence with the state tile S (K x BV, f32) in shared memory, never written out.
//
// Per chunk of C rows, with G (B) the chunk-local inclusive cumulative key (value) gate,
// Γ (Β) its last row, Gq = G (G one step back with the RWKV-6 bonus, 0 at the first row):
//   A_ij = scale Σ_k q_ik k_jk e^(Gq_ik - G_jk)       for j < i; A_ii = scale q_i·(w ⊙ k_i)
//   o_i  = e^(B_i) ⊙ (scale (q_i ⊙ e^Gq_i) S + Σ_j A_ij v_j ⊙ e^(-B_j))
//   S   <- (e^Γ ⊗ e^Β) ⊙ S + (k ⊙ e^(Γ-G))^T (v ⊙ e^(Β-B))
// with w = u (bonus) or 1. When the chunk's total decay max(-Γ) is at most SAFE_EXP, e^(-G)
// stays finite and A is one matrix product of q ⊙ e^Gq and k ⊙ e^-G (the paper's
// one-reference form); otherwise A is summed term by term with exact exponents (slow, only
// for gates far stronger than trained models use). The value side likewise.
//
// With STORE_OND the diagonal term scale (q_i·(w ⊙ k_i)) v_i is left out of A and added last,
// and the output without it (f32) is written too, for the value gate's gradient (gla_bwd.cu).
//
// Settings (-D): HEAD_K, HEAD_V, BV, CHUNK, HAS_G, G_SCALAR, HAS_GV, HAS_U, HAS_H0, STORE_HT,
// STORE_OND.

#define KD HEAD_K
#define C CHUNK
#define SAFE_EXP 40.f

// Row strides of the shared tiles, padded so that the rows a warp reads for one MMA fragment
// fall in different banks (16 bytes on q, k, v; 16 or 32 bytes on the f32 tiles).
#define QS (KD + 16 / sizeof(io_t))
#define VS (BV + 16 / sizeof(io_t))
#define AS (C + 8)
#define SS (BV + 4)
#define OS (BV + 4)

// Shared memory, in this order (each region a multiple of 16 bytes for the sizes allowed).
#define OFF_Q 0
#define OFF_K (OFF_Q + C * QS * sizeof(io_t))
#define OFF_V (OFF_K + C * QS * sizeof(io_t))
#define OFF_G (OFF_V + C * VS * sizeof(io_t))
#define OFF_B (OFF_G + (HAS_G ? C * KD * 4 : 0))
#define OFF_A (OFF_B + (HAS_GV ? C * BV * 4 : 0))
#define OFF_S (OFF_A + C * AS * 4)
#define OFF_O (OFF_S + KD * SS * 4)
#define OFF_D (OFF_O + C * OS * 4)
#define OFF_RED (OFF_D + C * 4)
#define SMEM_BYTES (OFF_RED + 16)

extern "C" __global__ void __launch_bounds__(NT) gla_fwd(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ gv, const float* __restrict__ u,
    const float* __restrict__ h0, io_t* __restrict__ o, float* __restrict__ ht,
    float* __restrict__ ond, const int* __restrict__ cu_seqlens, int H, float scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    check_smem(SMEM_BYTES);
    io_t* sq = (io_t*)(smem + OFF_Q);
    io_t* sk = (io_t*)(smem + OFF_K);
    io_t* sv = (io_t*)(smem + OFF_V);
    float* sG = (float*)(smem + OFF_G);
    float* sB = (float*)(smem + OFF_B);
    float* sA = (float*)(smem + OFF_A);
    float* sS = (float*)(smem + OFF_S);
    float* sO = (float*)(smem + OFF_O);
    float* sd = (float*)(smem + OFF_D);
    float* red = (float*)(smem + OFF_RED);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int v0 = blockIdx.x * BV, hh = blockIdx.y, n = blockIdx.z;
    const int bos = cu_seqlens[n], len = cu_seqlens[n + 1] - bos;
    const size_t state_at = ((size_t)n * H + hh) * KD * HEAD_V;

    for (int idx = tid; idx < KD * BV; idx += NT) {
        const int i = idx / BV, c = idx % BV;
        sS[i * SS + c] = HAS_H0 ? h0[state_at + (size_t)i * HEAD_V + v0 + c] : 0.f;
    }

    for (int c0 = 0; c0 < len; c0 += C) {
        const int rows = min(C, len - c0);
        if (tid < 2) red[tid] = 0.f;
        // Load the chunk; rows past the sequence end are zeros (no key, no gate).
        const size_t row0 = (size_t)bos + c0;
        load_tile<C, KD>(sq, QS, q, row0, rows, H, hh, KD, 0);
        load_tile<C, KD>(sk, QS, k, row0, rows, H, hh, KD, 0);
        load_tile<C, BV>(sv, VS, v, row0, rows, H, hh, HEAD_V, v0);
#if HAS_G && !G_SCALAR
        load_tile<C, KD>(sG, KD, g, row0, rows, H, hh, KD, 0);
#endif
#if HAS_GV
        load_tile<C, BV>(sB, BV, gv, row0, rows, H, hh, HEAD_V, v0);
#endif
#if HAS_G && G_SCALAR
        for (int idx = tid; idx < C * KD; idx += NT) {
            const int i = idx / KD;
            sG[idx] = i < rows ? g[(row0 + i) * H + hh] : 0.f;
        }
#endif
        cp_async_wait_all();
        __syncthreads();

        // Cumulative gates down each column, and the chunk's total decay max(-Γ).
        float span_g = 0.f, span_b = 0.f;
#if HAS_G
        for (int col = tid; col < KD; col += NT) {
            float s = 0.f;
            for (int i = 0; i < C; i++) sG[i * KD + col] = (s += sG[i * KD + col]);
            span_g = fmaxf(span_g, -s);
        }
#endif
#if HAS_GV
        for (int col = tid; col < BV; col += NT) {
            float s = 0.f;
            for (int i = 0; i < C; i++) sB[i * BV + col] = (s += sB[i * BV + col]);
            span_b = fmaxf(span_b, -s);
        }
#endif
        span_g = warp_max(span_g);
        span_b = warp_max(span_b);
        if (lane == 0) {
            atomicMax((int*)&red[0], __float_as_int(span_g));
            atomicMax((int*)&red[1], __float_as_int(span_b));
        }
        // The diagonal terms from the raw q and k: d_i = q_i·(w ⊙ k_i).
        for (int i = warp; i < C; i += NW) {
            float s = 0.f;
            for (int kk = lane; kk < KD; kk += 32) {
                const float w = HAS_U ? u[hh * KD + kk] : 1.f;
                s += to_f(sq[i * QS + kk]) * w * to_f(sk[i * QS + kk]);
            }
            s = warp_sum(s);
            if (lane == 0) sd[i] = s;
        }
        __syncthreads();
        const bool fast_g = red[0] <= SAFE_EXP, fast_b = red[1] <= SAFE_EXP;

#if HAS_G
        // Gq_ik: G_ik, or G_(i-1)k with the bonus.
#define GQ(i, kk) (HAS_U ? ((i) > 0 ? sG[((i)-1) * KD + (kk)] : 0.f) : sG[(i) * KD + (kk)])
        if (!fast_g) {
            for (int idx = tid; idx < C * C; idx += NT) {
                const int i = idx / C, j = idx % C;
                float s = 0.f;
                if (j < i)
                    for (int kk = 0; kk < KD; kk++)
                        s += to_f(sq[i * QS + kk]) * to_f(sk[j * QS + kk]) *
                             EXP(GQ(i, kk) - sG[j * KD + kk]);
                sA[i * AS + j] = scale * s;
            }
            __syncthreads();
        }
        // q <- q ⊙ e^Gq; k <- k ⊙ e^-G (fast) or k ⊙ e^(Γ-G) (the state's keys).
        for (int idx = tid; idx < C * KD; idx += NT) {
            const int i = idx / KD, kk = idx % KD;
            const float gl = sG[(C - 1) * KD + kk];
            const int at = i * QS + kk;
            sq[at] = from_f(to_f(sq[at]) * EXP(GQ(i, kk)));
            sk[at] = from_f(to_f(sk[at]) * EXP(fast_g ? -sG[idx] : gl - sG[idx]));
        }
#undef GQ
        __syncthreads();
#endif
        if (!HAS_G || fast_g) {
            gemm(sA, AS, row_major(sq, QS), col_major(sk, QS), C, C, KD, scale, false);
            __syncthreads();
        }
        for (int idx = tid; idx < C * C; idx += NT) {
            const int i = idx / C, j = idx % C;
            if (j >= i) sA[i * AS + j] = j == i && !STORE_OND ? scale * sd[i] : 0.f;
        }
#if HAS_G
        if (fast_g)  // k ⊙ e^-G ⊙ e^Γ = k ⊙ e^(Γ-G)
            for (int idx = tid; idx < C * KD; idx += NT) {
                const int at = (idx / KD) * QS + idx % KD;
                sk[at] = from_f(to_f(sk[at]) * EXP(sG[(C - 1) * KD + idx % KD]));
            }
#endif
        // Inter-chunk part: O = scale (q ⊙ e^Gq) S.
        gemm(sO, OS, row_major(sq, QS), row_major(sS, SS), C, BV, KD, scale, false);
        __syncthreads();
#if HAS_GV
        if (fast_b) {
            for (int idx = tid; idx < C * BV; idx += NT) {
                const int at = (idx / BV) * VS + idx % BV;
                sv[at] = from_f(to_f(sv[at]) * EXP(-sB[idx]));
            }
            __syncthreads();
            gemm(sO, OS, row_major(sA, AS), row_major(sv, VS), C, BV, C, 1.f, true);
            __syncthreads();
            for (int idx = tid; idx < C * BV; idx += NT) sO[(idx / BV) * OS + idx % BV] *= EXP(sB[idx]);
        } else {
            for (int idx = tid; idx < C * BV; idx += NT) {
                const int i = idx / BV, c = idx % BV;
                float s = sO[i * OS + c] * EXP(sB[idx]);
                for (int j = 0; j <= i - STORE_OND; j++)
                    s += sA[i * AS + j] * to_f(sv[j * VS + c]) * EXP(sB[idx] - sB[j * BV + c]);
                sO[i * OS + c] = s;
            }
        }
#else
        gemm(sO, OS, row_major(sA, AS), row_major(sv, VS), C, BV, C, 1.f, true);
#endif
        __syncthreads();
        for (int idx = tid; idx < rows * BV; idx += NT) {
            const int i = idx / BV, c = idx % BV;
            const size_t at = (((size_t)bos + c0 + i) * H + hh) * HEAD_V + v0 + c;
#if STORE_OND
            // v and o share a layout; the global v is the exact one (sv may be rescaled).
            ond[at] = sO[i * OS + c];
            o[at] = from_f(sO[i * OS + c] + scale * sd[i] * to_f(v[at]));
#else
            o[at] = from_f(sO[i * OS + c]);
#endif
        }

        // The state: decay by the whole chunk, then add (k ⊙ e^(Γ-G))^T (v ⊙ e^(Β-B)).
#if HAS_GV
        for (int idx = tid; idx < C * BV; idx += NT) {
            const float bl = sB[(C - 1) * BV + idx % BV];
            // sv holds v ⊙ e^-B on the fast path, v otherwise.
            const int at = (idx / BV) * VS + idx % BV;
            sv[at] = from_f(to_f(sv[at]) * EXP(fast_b ? bl : bl - sB[idx]));
        }
#endif
        for (int idx = tid; idx < KD * BV; idx += NT) {
            float f = 1.f;
#if HAS_G
            f *= EXP(sG[(C - 1) * KD + idx / BV]);
#endif
#if HAS_GV
            f *= EXP(sB[(C - 1) * BV + idx % BV]);
#endif
            sS[(idx / BV) * SS + idx % BV] *= f;
        }
        __syncthreads();
        gemm(sS, SS, col_major(sk, QS), row_major(sv, VS), KD, BV, C, 1.f, true);
        __syncthreads();
    }
#if STORE_HT
    for (int idx = tid; idx < KD * BV; idx += NT) {
        const int i = idx / BV, c = idx % BV;
        ht[state_at + (size_t)i * HEAD_V + v0 + c] = sS[i * SS + c];
    }
#endif
}
