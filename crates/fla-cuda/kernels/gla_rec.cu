// The recurrent form: one token at a time through the K x V state, every gate kind. One block
// per (V tile, head, sequence) holds a K x BV slice of the state in registers; thread
// (kg, j) = (tid / BV, tid % BV) owns rows kg*ROWS .. kg*ROWS+ROWS-1 of column j. Tokens are
// staged RC at a time in shared memory; sums over K (one per column) go through shared
// memory once per staged block of tokens, sums over V (one per row) through warp shuffles.
//
// Step t, with a = e^g_t (key gate), b = e^gv_t (value gate), w = u (bonus) or 1:
//   D = (a b^T) ⊙ S_{t-1};   S_t = D + k_t^T v_t
//   o_t = scale q_t R + scale (q_t·(w ⊙ k_t)) v_t,   R = S_{t-1} with the bonus, else D.
// The second term of o_t (the diagonal) carries no gate; the backward keeps it apart.
//
// gla_rec_fwd: o and the final state (with T = 1 per sequence and the state read and written
// in place, the batched decode step). The backward, with G = dL/dS_t from the later tokens:
//   gla_rec_dq  (forward sweep): dq_nd = scale R do_t, q ⊙ dq_nd, o_nd = scale q_t R (value
//               gate), dq's diagonal term, du; the final state into ht.
//   gla_rec_dkv (reverse sweep): dk_nd = G v_t, dv_nd = G^T k_t, then
//               G <- (a b^T) ⊙ (G + scale q_t^T do_t)   (G <- (a b^T) ⊙ G + scale q_t^T do_t
//               with the bonus); dv, dk's diagonal term, and the gates' gradients.
// Sums over V tiles (dq, dk, q⊙dq, dg, du) are f32 atomics into zeroed buffers.
//
// Gate gradients without differentiating a decay (seq.rs gate_grads): within a segment of
// SEG tokens ending at e, dg_t = Σ_{s=t..e} (q⊙dq_nd at s+shift - k⊙dk_nd at s)
// + rowsum(G_e ⊙ S_e), the last term counting every query beyond e that reads a key up to e
// (with the bonus, q⊙dq_nd at e+1 is in it and left out of the sum). Restarting at every
// segment keeps the reverse sums short: run over a whole sequence they lose f32 precision to
// strong gates (1.2e-4 at -20 per step over 16384 tokens). gla_rec_dq stores S_e for every
// segment (ckpt); likewise dgv with o_nd⊙do - v⊙dv_nd and colsum(G_e ⊙ S_e).
//
// Settings (-D): HEAD_K, HEAD_V, BV (16 or 32), RC, SEG (a multiple of RC), HAS_G, G_SCALAR,
// HAS_GV, HAS_U, HAS_H0, HAS_DHT.

#define KG (NT / BV)
#define ROWS (HEAD_K / KG)
#define GW (G_SCALAR ? 1 : HEAD_K)

// Shared memory (floats), in this order; the same sum as rec_smem in gla_rec.rs.
#define OFF_Q 0
#define OFF_K (OFF_Q + RC * HEAD_K)
#define OFF_A (OFF_K + RC * HEAD_K)
#define OFF_V (OFF_A + (HAS_G ? RC * GW : 0))
#define OFF_B (OFF_V + RC * BV)
#define OFF_DO (OFF_B + (HAS_GV ? RC * BV : 0))
#define OFF_W (OFF_DO + RC * BV)       // scale q·(w ⊙ k) per token
#define OFF_VDO (OFF_W + RC)           // v·do over the block's columns per token
#define OFF_RED (OFF_VDO + RC)         // [KG][RC][BV] partial sums over K
#define OFF_ROW (OFF_RED + KG * RC * BV)  // [RC][HEAD_K] per-row results
#define SMEM_FLOATS (OFF_ROW + RC * HEAD_K)

struct Rec {
    int h, H, bos, len, jv, j, kg;
    float* sm;
    __device__ size_t krow(int t) const { return ((size_t)(bos + t) * H + h) * HEAD_K; }
    __device__ size_t vrow(int t) const { return ((size_t)(bos + t) * H + h) * HEAD_V + jv; }
    // Element (row kg*ROWS + r, column j) of this block's state slice in an [N,H,K,V] tensor.
    __device__ size_t state(size_t n, int r) const {
        return ((n * H + h) * HEAD_K + kg * ROWS + r) * HEAD_V + jv + j;
    }
    // The checkpoint of the segment holding token t (of this sequence): bos / SEG + n leaves
    // room for every earlier sequence's ceil(len / SEG) segments.
    __device__ size_t segment(int t) const { return (size_t)bos / SEG + blockIdx.z + t / SEG; }
    __device__ float a(int st, int r) const {
        if (!HAS_G) return 1.f;
        return G_SCALAR ? sm[OFF_A + st] : sm[OFF_A + st * HEAD_K + kg * ROWS + r];
    }
    __device__ float b(int st) const { return HAS_GV ? sm[OFF_B + st * BV + j] : 1.f; }
    __device__ float qk(int off, int st, int r) const { return sm[off + st * HEAD_K + kg * ROWS + r]; }
};

__device__ __forceinline__ Rec rec_begin(const int* cu_seqlens, int H, float* sm) {
    Rec c;
    c.h = blockIdx.y;
    c.H = H;
    c.bos = cu_seqlens[blockIdx.z];
    c.len = cu_seqlens[blockIdx.z + 1] - c.bos;
    c.jv = blockIdx.x * BV;
    c.j = threadIdx.x % BV;
    c.kg = threadIdx.x / BV;
    c.sm = sm;
    return c;
}

// Stages tokens t0 .. t0+steps-1: q, k, e^g, and the block's columns of v, e^gv and (when
// d_o is given) do; then the per-token sums scale q·(w ⊙ k) and v·do.
__device__ void rec_stage(const Rec& c, int t0, int steps, const io_t* q, const io_t* k,
                          const io_t* v, const float* g, const float* gv, const float* u,
                          const io_t* d_o, float scale) {
    float* sm = c.sm;
    for (int idx = threadIdx.x; idx < steps * HEAD_K; idx += NT) {
        const int st = idx / HEAD_K, col = idx % HEAD_K;
        const size_t at = c.krow(t0 + st) + col;
        sm[OFF_Q + idx] = to_f(q[at]);
        sm[OFF_K + idx] = to_f(k[at]);
        if (HAS_G && !G_SCALAR) sm[OFF_A + idx] = EXP(g[at]);
    }
    if (HAS_G && G_SCALAR)
        for (int st = threadIdx.x; st < steps; st += NT)
            sm[OFF_A + st] = EXP(g[(size_t)(c.bos + t0 + st) * c.H + c.h]);
    for (int idx = threadIdx.x; idx < steps * BV; idx += NT) {
        const int st = idx / BV, col = idx % BV;
        const size_t at = c.vrow(t0 + st) + col;
        sm[OFF_V + idx] = to_f(v[at]);
        if (HAS_GV) sm[OFF_B + idx] = EXP(gv[at]);
        sm[OFF_DO + idx] = d_o ? to_f(d_o[at]) : 0.f;
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int st = warp; st < steps; st += NW) {
        float x = 0.f, y = 0.f;
        for (int col = lane; col < HEAD_K; col += 32) {
            const float w = HAS_U ? u[c.h * HEAD_K + col] : 1.f;
            x += sm[OFF_Q + st * HEAD_K + col] * w * sm[OFF_K + st * HEAD_K + col];
        }
        for (int col = lane; col < BV; col += 32)
            y += sm[OFF_V + st * BV + col] * sm[OFF_DO + st * BV + col];
        x = warp_sum(x);
        y = warp_sum(y);
        if (lane == 0) {
            sm[OFF_W + st] = scale * x;
            sm[OFF_VDO + st] = y;
        }
    }
    __syncthreads();
}

// Sum over the BV lanes of a column group (lanes j of one kg).
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
    for (int o = BV / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Σ over K of the partial column sums of token st (after a __syncthreads).
__device__ __forceinline__ float column_sum(const float* sm, int st, int col) {
    float x = 0.f;
#pragma unroll
    for (int kg = 0; kg < KG; kg++) x += sm[OFF_RED + (kg * RC + st) * BV + col];
    return x;
}

__device__ __forceinline__ void load_state(const Rec& c, float* s, const float* src) {
#pragma unroll
    for (int r = 0; r < ROWS; r++) s[r] = src ? src[c.state(blockIdx.z, r)] : 0.f;
}

extern "C" __global__ void __launch_bounds__(NT) gla_rec_fwd(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ gv, const float* __restrict__ u,
    const float* h0, io_t* __restrict__ o, float* ht, const int* __restrict__ cu_seqlens,
    int H, float scale) {
    extern __shared__ __align__(16) float sm[];
    check_smem(SMEM_FLOATS * 4);
    const Rec c = rec_begin(cu_seqlens, H, sm);
    float s[ROWS];
    load_state(c, s, HAS_H0 ? h0 : nullptr);
    for (int t0 = 0; t0 < c.len; t0 += RC) {
        const int steps = min(RC, c.len - t0);
        __syncthreads();  // the previous tokens' shared values are read
        rec_stage(c, t0, steps, q, k, v, g, gv, u, nullptr, scale);
        for (int st = 0; st < steps; st++) {
            const float b = c.b(st), vj = sm[OFF_V + st * BV + c.j];
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const float d = c.a(st, r) * b * s[r];
                acc += c.qk(OFF_Q, st, r) * (HAS_U ? s[r] : d);
                s[r] = d + c.qk(OFF_K, st, r) * vj;
            }
            sm[OFF_RED + (c.kg * RC + st) * BV + c.j] = acc;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < steps * BV; idx += NT) {
            const int st = idx / BV, col = idx % BV;
            const float x = scale * column_sum(sm, st, col) + sm[OFF_W + st] * sm[OFF_V + idx];
            o[c.vrow(t0 + st) + col] = from_f(x);
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) ht[c.state(blockIdx.z, r)] = s[r];
}

extern "C" __global__ void __launch_bounds__(NT) gla_rec_dq(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ gv, const float* __restrict__ u,
    const float* __restrict__ h0, const io_t* __restrict__ d_o, float* __restrict__ dq,
    float* __restrict__ qdq, float* __restrict__ ond, float* __restrict__ du,
    float* __restrict__ ckpt, const int* __restrict__ cu_seqlens, int H, float scale) {
    extern __shared__ __align__(16) float sm[];
    check_smem(SMEM_FLOATS * 4);
    const Rec c = rec_begin(cu_seqlens, H, sm);
    float s[ROWS];
    load_state(c, s, HAS_H0 ? h0 : nullptr);
    float du_part = 0.f;  // column threadIdx.x of du, this block's share
    for (int t0 = 0; t0 < c.len; t0 += RC) {
        const int steps = min(RC, c.len - t0);
        __syncthreads();
        rec_stage(c, t0, steps, q, k, v, g, gv, u, d_o, scale);
        for (int st = 0; st < steps; st++) {
            const float b = c.b(st), vj = sm[OFF_V + st * BV + c.j];
            const float doj = sm[OFF_DO + st * BV + c.j];
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const float d = c.a(st, r) * b * s[r];
                const float read = HAS_U ? s[r] : d;
                acc += c.qk(OFF_Q, st, r) * read;
                const float x = lanes_sum(read * doj);
                if (c.j == 0) sm[OFF_ROW + st * HEAD_K + c.kg * ROWS + r] = scale * x;
                s[r] = d + c.qk(OFF_K, st, r) * vj;
            }
            sm[OFF_RED + (c.kg * RC + st) * BV + c.j] = acc;
        }
        __syncthreads();
        if (HAS_GV)
            for (int idx = threadIdx.x; idx < steps * BV; idx += NT) {
                const int st = idx / BV, col = idx % BV;
                ond[c.vrow(t0 + st) + col] = scale * column_sum(sm, st, col);
            }
        for (int col = threadIdx.x; col < HEAD_K; col += NT) {
            const float w = HAS_U ? u[c.h * HEAD_K + col] : 1.f;
            for (int st = 0; st < steps; st++) {
                const float x = sm[OFF_ROW + st * HEAD_K + col];
                const float qc = sm[OFF_Q + st * HEAD_K + col];
                const float kc = sm[OFF_K + st * HEAD_K + col];
                const float vdo = scale * sm[OFF_VDO + st];
                const size_t at = c.krow(t0 + st) + col;
                atomicAdd(dq + at, x + w * kc * vdo);
                if (HAS_G) atomicAdd(qdq + at, qc * x);
                if (HAS_U) du_part += qc * kc * vdo;
            }
        }
        const int t1 = t0 + steps;
        if ((HAS_G || HAS_GV) && (t1 % SEG == 0 || t1 == c.len))
#pragma unroll
            for (int r = 0; r < ROWS; r++) ckpt[c.state(c.segment(t1 - 1), r)] = s[r];
    }
    if (HAS_U && threadIdx.x < HEAD_K) atomicAdd(du + c.h * HEAD_K + threadIdx.x, du_part);
}

extern "C" __global__ void __launch_bounds__(NT) gla_rec_dkv(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ gv, const float* __restrict__ u,
    const io_t* __restrict__ d_o, const float* __restrict__ dht, const float* __restrict__ ckpt,
    const float* __restrict__ qdq, const float* __restrict__ ond, float* __restrict__ dk,
    io_t* __restrict__ dv, float* __restrict__ dg, float* __restrict__ dgv,
    float* __restrict__ dh0, const int* __restrict__ cu_seqlens, int H, float scale) {
    extern __shared__ __align__(16) float sm[];
    check_smem(SMEM_FLOATS * 4);
    const Rec c = rec_begin(cu_seqlens, H, sm);
    const int shift = HAS_U ? 1 : 0;
    float G[ROWS];
    load_state(c, G, HAS_DHT ? dht : nullptr);
    float gsum = 0.f, bsum = 0.f;  // reverse sums of row threadIdx.x (key gate), column (value)
    int seg_end = c.len;           // the end of the current segment
    // The blocks of RC tokens as gla_rec_dq staged them, last first.
    for (int t0 = (c.len + RC - 1) / RC * RC - RC; t0 >= 0; t0 -= RC) {
        const int t1 = min(c.len, t0 + RC), steps = t1 - t0;
        __syncthreads();
        if ((HAS_G || HAS_GV) && (t1 % SEG == 0 || t1 == c.len)) {
            // A segment ends at t1 - 1: its sums restart from rowsum / colsum(G ⊙ S_e).
            seg_end = t1;
            float col = 0.f;
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                const float p = G[r] * ckpt[c.state(c.segment(t1 - 1), r)];
                col += p;
                const float x = lanes_sum(p);
                if (c.j == 0) sm[OFF_ROW + c.kg * ROWS + r] = x;
            }
            sm[OFF_RED + c.kg * RC * BV + c.j] = col;
            __syncthreads();
            if (HAS_G && threadIdx.x < HEAD_K) gsum = sm[OFF_ROW + threadIdx.x];
            if (HAS_GV && threadIdx.x < BV) bsum = column_sum(sm, 0, threadIdx.x);
        }
        rec_stage(c, t0, steps, q, k, v, g, gv, u, d_o, scale);
        for (int st = steps - 1; st >= 0; st--) {
            const float b = c.b(st), vj = sm[OFF_V + st * BV + c.j];
            const float doj = sm[OFF_DO + st * BV + c.j];
            float acc = 0.f;
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                acc += c.qk(OFF_K, st, r) * G[r];
                const float x = lanes_sum(G[r] * vj);
                if (c.j == 0) sm[OFF_ROW + st * HEAD_K + c.kg * ROWS + r] = x;
                const float qd = scale * c.qk(OFF_Q, st, r) * doj, ab = c.a(st, r) * b;
                G[r] = HAS_U ? ab * G[r] + qd : ab * (G[r] + qd);
            }
            sm[OFF_RED + (c.kg * RC + st) * BV + c.j] = acc;
        }
        __syncthreads();
        // dv, and the value gate's reverse sum, column by column.
        for (int col = threadIdx.x; col < BV; col += NT)
            for (int st = steps - 1; st >= 0; st--) {
                const size_t at = c.vrow(t0 + st) + col;
                const float dvn = column_sum(sm, st, col);
                dv[at] = from_f(dvn + sm[OFF_W + st] * sm[OFF_DO + st * BV + col]);
                if (HAS_GV) {
                    bsum += ond[at] * sm[OFF_DO + st * BV + col] - sm[OFF_V + st * BV + col] * dvn;
                    dgv[at] = bsum;
                }
            }
        // dk, and the key gate's reverse sum, row by row.
        for (int col = threadIdx.x; col < HEAD_K; col += NT) {
            const float w = HAS_U ? u[c.h * HEAD_K + col] : 1.f;
            for (int st = steps - 1; st >= 0; st--) {
                const int t = t0 + st;
                const size_t at = c.krow(t) + col;
                const float x = sm[OFF_ROW + st * HEAD_K + col];
                const float kc = sm[OFF_K + st * HEAD_K + col];
                const float qc = sm[OFF_Q + st * HEAD_K + col];
                atomicAdd(dk + at, x + scale * w * qc * sm[OFF_VDO + st]);
                if (HAS_G) {
                    gsum -= kc * x;
                    if (blockIdx.x == 0 && t + shift < seg_end) gsum += qdq[c.krow(t + shift) + col];
                    if (G_SCALAR)
                        sm[OFF_ROW + st * HEAD_K + col] = gsum;
                    else
                        atomicAdd(dg + at, gsum);
                }
            }
        }
        if (HAS_G && G_SCALAR) {
            __syncthreads();
            const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
            for (int st = warp; st < steps; st += NW) {
                float x = 0.f;
                for (int col = lane; col < HEAD_K; col += 32) x += sm[OFF_ROW + st * HEAD_K + col];
                x = warp_sum(x);
                if (lane == 0) atomicAdd(dg + (size_t)(c.bos + t0 + st) * H + c.h, x);
            }
        }
    }
    if (HAS_H0)
#pragma unroll
        for (int r = 0; r < ROWS; r++) dh0[c.state(blockIdx.z, r)] = G[r];
}
