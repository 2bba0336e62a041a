// The chained kernels (compiled after gla_chunk.cu, whose helpers they use): one block per
// (chunk, head, V tile) takes chunk_local's Q̃, K̂, A and Γ for its chunk, makes the state's
// link from its chunk to the next, then the chunk's output. No sweep holds a sequence's chunks
// in turn: a sequence's chunks wait on one another for one element-wise step each.
//
// The link (the sweeps' recurrence, one step): forward S_{c+1} = e^Γ ⊙ S_c + K̂^T v and
// o = scale Q̃ S_c + A v; backward, chunks last to first, dS'_{c-1} = e^Γ ⊙ dS'_c + scale
// Q̃^T do and dv = K̂ dS'_c + A^T do. Only the link waits for the chunk before: K̂^T v (or
// Q̃^T do) and A v (A^T do) are made first, then the block waits for its predecessor's state
// (f32, in L2), adds its own, publishes it for its successor, and only then makes the
// state's part of the output and writes the state as stored (for chunk_dqk).
//
// Order and progress: a block takes the next ticket of a global counter, and tickets go step
// by step (every sequence's first chunk, then every second, ...; `order` lists the global
// chunks so, and -1 - n for an empty sequence n, whose block copies the initial state to the
// final one). A block waits only for a smaller ticket, whose block has started and waits only
// for a smaller one still, so no wait can close a cycle, whatever the GPU runs at once.
//
// Publication (PTX memory model): the writer's threads store their fragments of the state
// (st.global.cg, to L2) and meet at a barrier; one thread fences (membar.gl, cumulative over
// the stores the barrier ordered before it) and releases the chain's flag for this chunk; the reader's thread 0 acquires it and the block meets before
// reading (ld.global.cg). `ring` keeps two f32 tiles a chain (step s writes tile s & 1, step
// s + 1 reads it; step s + 2 writes it again only after step s + 1's flag, so after its
// reads). The backward carries dS' / scale, as the sweeps do (alpha = scale), so both add a
// plain product. `sync` is the ticket counter followed by the flags, zeroed before each launch.
#if CHAIN
#if KD > 256 || BK != KD
#error "the chained kernels: all keys (at most 256) in one tile"
#endif

__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 x;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(x) : "l"(p) : "memory");
    return x;
}
__device__ __forceinline__ void st_release(u32* p, u32 x) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
}
// Four floats through L2 only (.cg): the ring's tiles, which other SMs write and read.
__device__ __forceinline__ F4 ld_cg4(const float* p) {
    F4 r;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(r.x[0]), "=f"(r.x[1]), "=f"(r.x[2]), "=f"(r.x[3])
                 : "l"(p)
                 : "memory");
    return r;
}
__device__ __forceinline__ void st_cg4(float* p, const float x[4]) {
    asm volatile("st.global.cg.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x[0]), "f"(x[1]),
                 "f"(x[2]), "f"(x[3])
                 : "memory");
}

#define TILES_V (HEAD_V / BV)
#define UT TPW(KD)                   // a warp's 16 x 32 tiles of the KD x BV state
#define RING_TILE (TILES(KD) * 512)  // floats of one ring tile: every warp tile's fragments

// Where a warp's tile `tile_` of the state keeps this lane's 16 floats in a ring tile: each
// thread's fragment contiguous, read and written as four 16-byte vectors.
__device__ __forceinline__ int ring_at(int tile_) { return (tile_ * 32 + threadIdx.x % 32) * 16; }

// Forward: X = Q̃ (the output's operand), Y = K̂ (the link's), Z = v; backward X = K̂, Y = Q̃,
// Z = do (Q̃ and K̂ from chunk_local; q and k themselves without a gate).
template <bool BACK>
__device__ __forceinline__ void chain(const io_t* __restrict__ x, const io_t* __restrict__ y,
                                      const io_t* __restrict__ z, const io_t* __restrict__ a,
                                      const float* __restrict__ gam, io_t* __restrict__ out,
                                      io_t* __restrict__ slots, const float* __restrict__ init,
                                      float* __restrict__ fin, float* __restrict__ ring,
                                      u32* __restrict__ sync, const int* __restrict__ cu,
                                      const int* __restrict__ chunk_off,
                                      const int* __restrict__ chunk_seq,
                                      const int* __restrict__ order, int H, float scale,
                                      float alpha, bool has_init, bool has_fin) {
    constexpr int Y_SIZE = C * KS > KD * VS ? C * KS : KD * VS;
    Carve cv{smem};
    io_t* sx = cv.take<io_t>(C * KS);
    io_t* sy = cv.take<io_t>(Y_SIZE);  // Y's rows, then the state S_c as stored, [KD][VS]
    io_t* sz = cv.take<io_t>(C * VS);
    io_t* sA = cv.take<io_t>(C * AS);
    float* sgam = cv.take<float>(HAS_G ? KD : 0);  // Γ
    check_carve(cv);
    __shared__ int ticket;
    const int tid = threadIdx.x;
    if (tid == 0) ticket = atomicAdd((int*)sync, 1);
    __syncthreads();
    const int vt = ticket % TILES_V, hh = ticket / TILES_V % H, cg = order[ticket / TILES_V / H];
    const int v0 = vt * BV;
    if (cg < 0) {  // an empty sequence, -1 - n: its final state is its initial one
        const size_t st = ((size_t)(-1 - cg) * H + hh) * KD * HEAD_V + v0;
        for (int idx = tid; idx < KD * BV && has_fin; idx += NT) {
            const size_t at = st + (size_t)(idx / BV) * HEAD_V + idx % BV;
            fin[at] = has_init ? init[at] : 0.f;
        }
        return;
    }
    const ChunkAt at = chunk_at(cg, cu, chunk_off, chunk_seq);
    const int first = chunk_off[at.n], chunks = chunk_off[at.n + 1] - first, c = cg - first;
    const int step = BACK ? chunks - 1 - c : c;
    const bool last = step == chunks - 1;
    u32* flags = sync + 1;
    float* my_ring = ring + (size_t)((at.n * H + hh) * TILES_V + vt) * 2 * RING_TILE;

    load_tile(sx, KS, x, at.row0, at.rows, C, H, hh, KD, 0, KD);
    load_tile(sy, KS, y, at.row0, at.rows, C, H, hh, KD, 0, KD);
    load_tile(sz, VS, z, at.row0, at.rows, C, H, hh, HEAD_V, v0, BV);
    load_attn(sA, a, at, H, hh);
#if HAS_G
    for (int i = tid; i < KD / 4; i += NT)
        cp_async16(sgam + 4 * i, gam + ((size_t)cg * H + hh) * KD + 4 * i, true);
#endif
    cp_async_wait_all();
    __syncthreads();

    float u[UT][4][4] = {};
    FOR_TILES(KD, t, m0, n0) warp_mma(u[t], col_major(sy, KS), row_major(sz, VS), m0, n0, BV, C);
    float o[TPW(C)][4][4] = {};
    FOR_TILES(C, t, m0, n0) {
        if (BACK)  // column i of the lower triangular A starts at row i
            warp_mma(o[t], col_major(sA + m0 * AS, AS), row_major(sz + m0 * VS, VS), m0, n0, BV,
                     C - m0);
        else  // row i of A ends at column i
            warp_mma(o[t], row_major(sA, AS), row_major(sz, VS), m0, n0, BV, m0 + 16);
    }

    // The link. The state at this chunk's start (backwards: its end), carried / alpha. The
    // barrier also ends the reads of Y, whose tile takes the state.
    if (step > 0 && tid == 0) {
        const u32* f = flags + ((size_t)(BACK ? cg + 1 : cg - 1) * H + hh) * TILES_V + vt;
        while (ld_acquire(f) == 0) asm volatile("nanosleep.u32 64;");
    }
    __syncthreads();
    io_t* sS = sy;
    const float* from = my_ring + ((step + 1) & 1) * RING_TILE;
    float* to = my_ring + (step & 1) * RING_TILE;
    const size_t st = ((size_t)at.n * H + hh) * KD * HEAD_V + v0;  // h0, ht, dht, dh0
    FOR_TILES(KD, t, m0, n0) {
        float s[4][4];
        if (step > 0) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const F4 r = ld_cg4(from + ring_at(tile_) + 4 * j);
#pragma unroll
                for (int e = 0; e < 4; e++) s[j][e] = r.x[e];
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = m0 + frag_row(e), col = n0 + frag_col(j, e);
                    s[j][e] = has_init && col < BV ? init[st + (size_t)key * HEAD_V + col] / alpha
                                                   : 0.f;
                }
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int key = m0 + frag_row(e), col = n0 + frag_col(j, e);
                if (col < BV) store_pair(sS + key * VS + col, alpha * s[j][e], alpha * s[j][e + 1]);
            }
#pragma unroll
            for (int e = 0; e < 4; e++)
                u[t][j][e] += (HAS_G ? EXP(sgam[m0 + frag_row(e)]) : 1.f) * s[j][e];
        }
        if (!last) {
#pragma unroll
            for (int j = 0; j < 4; j++) st_cg4(to + ring_at(tile_) + 4 * j, u[t][j]);
        } else if (has_fin) {
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = m0 + frag_row(e), col = n0 + frag_col(j, e);
                    if (col < BV) fin[st + (size_t)key * HEAD_V + col] = alpha * u[t][j][e];
                }
        }
    }
    __syncthreads();  // the state stored; sS complete
    if (!last && tid == 0) {
        __threadfence();
        st_release(flags + ((size_t)cg * H + hh) * TILES_V + vt, 1);
    }

    // The output: o = scale Q̃ S + A v, or dv = K̂ dS' + A^T do.
    FOR_TILES(C, t, m0, n0) {
        float d[4][4] = {};
        warp_mma(d, row_major(sx, KS), row_major(sS, VS), m0, n0, BV, KD);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[t][j][e] += scale / alpha * d[j][e];
        store_out_tile(out, o[t], at, H, hh, m0, v0 + n0, BV - n0);
    }
    // The state as stored, for chunk_dqk: S at the chunk's start, dS' at its end.
    io_t* sl = slots + ((size_t)cg * H + hh) * KD * HEAD_V + v0;
    for (int idx = tid; idx < KD * BV / SV; idx += NT) {
        const int key = idx / (BV / SV), p = idx % (BV / SV) * SV;
        st16(sl + (size_t)key * HEAD_V + p, ld16(sS + key * VS + p));
    }
}
#endif

#if KERNEL == 8
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_chain(
    const io_t* __restrict__ qg, const io_t* __restrict__ kh, const io_t* __restrict__ v,
    const io_t* __restrict__ a, const float* __restrict__ gam, io_t* __restrict__ o,
    io_t* __restrict__ states, const float* __restrict__ h0, float* __restrict__ ht,
    float* __restrict__ ring, u32* __restrict__ sync, const int* __restrict__ cu,
    const int* __restrict__ chunk_off, const int* __restrict__ chunk_seq,
    const int* __restrict__ order, int H, float scale) {
    chain<false>(qg, kh, v, a, gam, o, states, h0, ht, ring, sync, cu, chunk_off, chunk_seq,
                 order, H, scale, 1.f, HAS_H0, true);
}
#endif

#if KERNEL == 9
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_chain_bwd(
    const io_t* __restrict__ kh, const io_t* __restrict__ qg, const io_t* __restrict__ d_o,
    const io_t* __restrict__ a, const float* __restrict__ gam, io_t* __restrict__ dv,
    io_t* __restrict__ dstates, const float* __restrict__ dht, float* __restrict__ dh0,
    float* __restrict__ ring, u32* __restrict__ sync, const int* __restrict__ cu,
    const int* __restrict__ chunk_off, const int* __restrict__ chunk_seq,
    const int* __restrict__ order, int H, float scale) {
    chain<true>(kh, qg, d_o, a, gam, dv, dstates, dht, dh0, ring, sync, cu, chunk_off, chunk_seq,
                order, H, scale, scale, HAS_DHT, HAS_H0);
}
#endif
