// Chunkwise GLA in two levels (the paper's "chunk" form with materialised states), for the
// gates that act on keys only (none, scalar, key): what every chunk gives on its own comes from
// one block per chunk; one block per state tile sweeps each sequence's chunks, making the state
// at every chunk boundary from their rows; everything else runs one block per chunk, in
// parallel over the whole batch.
//
// Per chunk of C rows, with G the chunk-local inclusive cumulative gate, Γ its last row,
// S the state at the chunk's start and dS' the gradient of the state at its end:
//   Q̃ = q ⊙ e^G,  K̃ = k ⊙ e^-G,  K̂ = k ⊙ e^(Γ-G)
//   A = scale tril(Q̃ K̃^T) with the diagonal scale q_i·k_i taken from the raw q and k
//   o = scale Q̃ S + A v,                      S' = e^Γ ⊙ S + K̂^T v
//   dA = tril(do v^T)  (strictly lower in the products; its diagonal terms added exactly)
//   dq = scale (do S^T + dA K̃) ⊙ e^G
//   dk = scale (dA^T Q̃) ⊙ e^-G + (v dS'^T) ⊙ e^(Γ-G)
//   dv = A^T do + K̂ dS'
//   dS = e^Γ ⊙ dS' + scale Q̃^T do
// So the state at a chunk's end is e^Γ ⊙ (its start) + K̂^T v and the gradient at its start
// e^Γ ⊙ (its end's) + scale Q̃^T do: with K̂ and Q̃ written once, the sweeps need no gates but
// Γ, and their products do not wait for the state.
// When a key tile's total decay max(-Γ) exceeds SAFE_EXP, e^-G could overflow: that tile's
// intra-chunk sums are taken term by term with exact exponents instead (slow; only for gates
// far stronger than trained models use). Every other exponent is of a non-positive number.
//
// The gate's gradient, per chunk (the identity of seq.rs written so that no large terms
// cancel): with X = q ⊙ dq - k ⊙ dk_intra and Y = k ⊙ dk_state,
//   dg_t = Σ_{i≥t} X_i + Σ_{j<t} Y_j + e^Γ ⊙ rowsum(dS' ⊙ S)
// (the state enters through e^Γ ⊙ S and through K̂, the rows j < t through e^(Γ-G_j)).
//
// Kernels, in the order they run (KERNEL 0-7, one per module, so that a configuration
// compiles only what it runs):
//   chunk_local      per chunk: A (io_t, [tokens, H, C]), Q̃ and K̂ (io_t) and Γ (f32)
//   chunk_states     per (sequence, head, state tile): S at every chunk start; the final state
//   chunk_out        per (chunk, V tile): o
//   chunk_dstates    the sweep backwards: dS' at every chunk end; dh0
//   chunk_dv         per (chunk, V tile): dv
//   chunk_dqk        per (chunk, K tile): dq, dk and the gate's gradient
//   chunk_states_out per (sequence, head, V tile), 64-row chunks and KD ≤ 128: chunk_states
//                    and chunk_out in one sweep
//   chunk_dstates_dv the same for chunk_dstates and chunk_dv
//
// Settings (-D): KERNEL, HEAD_K, HEAD_V, CHUNK (64 or 128), NT (4 CHUNK threads, so that each
// warp keeps ATPW of the C x C matrix's 16 x 32 tiles; the sweeps' own count), BK, BV (the
// kernel's tiles), HAS_G, G_SCALAR, GATE_BF16 (the gates and the key gate's gradient in bf16,
// else f32), HAS_H0, HAS_DHT, MIN_BLOCKS (the blocks per SM that the kernel's shared memory
// allows: its registers are held to that occupancy), STAGES (chunks, or chunk_dqk's value
// tiles, in flight), KEEP_SLOTS (the state sweeps: 0 writes only the final state; default 1),
// WHOLE_SECTORS (the state sweeps: 1 stores the states through shared memory, stage_tile). The
// sweeps with outputs take BK = KD and KD / 32 warps per 16 columns of BV.

#define KD HEAD_K
#define C CHUNK
#define SWEEP (KERNEL == 1 || KERNEL == 3)
#define SWEEP_OUT (KERNEL == 6 || KERNEL == 7)
#ifndef KEEP_SLOTS
#define KEEP_SLOTS 1
#endif
#ifndef WHOLE_SECTORS
#define WHOLE_SECTORS 0
#endif
#if (C != 64 && C != 128) || (NT != 4 * C && !SWEEP && !SWEEP_OUT)
#error "chunks of 64 or 128 rows, 4 threads per row"
#endif
#define SAFE_EXP 40.f
#define PADE (16 / (int)sizeof(io_t))
#define KS (BK + PADE)  // io_t tiles of BK columns
#define VS (BV + PADE)  // io_t tiles of BV columns
#define AS (C + PADE)   // io_t C x C
#define GS (BK + 8)     // f32 gate tiles: rows 8 banks apart, for reads in fragment order

// The gates' element type in device memory; in shared memory they are f32 from their
// cumulative sums on (a bf16 key gate tile lands in the first half of its f32 tile, row
// stride GS, and cumsum_gates widens it).
#if GATE_BF16
typedef bf16_t gate_t;
#else
typedef float gate_t;
#endif
#define RAW_BF16 (GATE_BF16 && !G_SCALAR)

// Regions of dynamic shared memory, each rounded up to 16 bytes; the host's sizes (gla_chunk.rs)
// follow the same order.
struct Carve {
    unsigned char* p;
    template <typename T>
    __device__ __forceinline__ T* take(int n) {
        T* r = (T*)p;
        p += (n * (int)sizeof(T) + 15) & ~15;
        return r;
    }
};

extern __shared__ __align__(16) unsigned char smem[];

__device__ __forceinline__ void check_carve(const Carve& c) { check_smem((u32)(c.p - smem)); }

// SV io_t values in one 16-byte vector (8 in the bf16 build, 4 in f32): the element-wise
// loops and the scans move one at a time.
#define SV (16 / (int)sizeof(io_t))
union __align__(16) Vec16 {
    u32 w[4];
    io_t x[SV];
};
struct __align__(16) F4 {
    float x[4];
};
__device__ __forceinline__ Vec16 ld16(const io_t* p) { return *(const Vec16*)p; }
// Shared memory only: to global memory the compiler splits this store in two.
__device__ __forceinline__ void st16(io_t* p, const Vec16& v) { *(Vec16*)p = v; }
// 16 and 8 bytes to global memory as one store each: written as plain C++ the compiler split
// them into halves (Nsight Compute, chunk_dqk's SASS), and each half took its sectors anew.
__device__ __forceinline__ void st16_global(void* p, const u32 w[4]) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
}
__device__ __forceinline__ void st8_global(void* p, u32 x, u32 y) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(x), "r"(y) : "memory");
}
// SV gates (f32, 16-byte aligned) into registers.
__device__ __forceinline__ void ld_gates(float g[SV], const float* p) {
#pragma unroll
    for (int e = 0; e < SV; e += 4) *(F4*)(g + e) = *(const F4*)(p + e);
}
// x ⊙ e^d, element by element, rounded to io_t.
__device__ __forceinline__ Vec16 times_exp(const Vec16& x, const float d[SV]) {
    Vec16 r;
#pragma unroll
    for (int e = 0; e < SV; e++) r.x[e] = from_f(to_f(x.x[e]) * EXP(d[e]));
    return r;
}
// Calls f(i, c) for every vector (row i, columns c..c + SV) of a C x BK tile, the threads of
// the block taking consecutive vectors.
template <typename F>
__device__ __forceinline__ void for_vectors(F f) {
    for_pieces<C, BK / SV>([&](int i, int p) { f(i, p * SV); });
}

// Starts copying ROWS rows of a row-major matrix (row stride `stride`) from column c0, WIDTH
// columns, into dst (row stride ld).
template <int ROWS, int WIDTH, typename T>
__device__ __forceinline__ void load_mat(T* dst, int ld, const T* src, int stride, int c0) {
    constexpr int e = 16 / sizeof(T);
    const u32 d = smem_u32(dst);
    const T* base = src + c0;
    for_pieces<ROWS, WIDTH / e>([&](int i, int p) {
        cp_async16_s(d + (i * ld + p * e) * (int)sizeof(T), base + (i * stride + p * e), true);
    });
}

// Starts loading the gate tile (C x BK, row stride GS) of key columns k0..: the key gate's
// columns as they are stored (gate_t), or the scalar gate broadcast in f32 (each row's one
// value read by the NT / C threads that fill its columns); rows past `rows` are zeros.
// cumsum_gates reads it.
#if KERNEL == 0 || KERNEL == 5
__device__ __forceinline__ void load_gates(float* sG, const gate_t* g, size_t row0, int rows,
                                           int H, int hh, int k0) {
#if G_SCALAR
    static_assert(NT % C == 0 && BK % (4 * (NT / C)) == 0, "whole 16-byte stores per thread");
    constexpr int per_row = NT / C, width = BK / per_row;
    const int i = threadIdx.x / per_row, c0 = threadIdx.x % per_row * width;
    const float x = i < rows ? to_f32(g[(row0 + i) * H + hh]) : 0.f;
#pragma unroll
    for (int c = 0; c < width; c += 4) *(F4*)(sG + i * GS + c0 + c) = F4{{x, x, x, x}};
#else
    load_tile<C, BK>((gate_t*)sG, GS, g, row0, rows, H, hh, KD, k0);
#endif
}
#endif

// Element (i, c) of a gate tile as load_gates left it.
__device__ __forceinline__ float raw_gate(const float* sG, int i, int c) {
#if RAW_BF16
    return bf16_to_f(((const bf16_t*)sG)[i * GS + c]);
#else
    return sG[i * GS + c];
#endif
}

// Threads per column of the cumulative gate sums (a power of two, at most NT / BK), each
// summing RPT consecutive rows in registers.
#define TPC_MAX (NT / BK)
#define TPC (TPC_MAX >= 16 ? 16 : TPC_MAX >= 8 ? 8 : TPC_MAX >= 4 ? 4 : TPC_MAX >= 2 ? 2 : 1)
#define RPT (C / TPC)
// Floats of the scratch `red` every kernel with gates carries: the decay maximum, then the
// per-part column totals of cumsum_gates.
#define RED (4 + TPC * BK)

// Cumulative sums down the columns of sG (in place, f32 from a tile of gate_t); returns, in
// every thread after the barrier, the tile's largest total decay max(-Γ). Thread (part, col)
// sums rows [part RPT, (part + 1) RPT) of column col in registers (a warp reads consecutive
// columns of one row: no bank conflicts), then adds the totals of the parts above it. Every
// element is read before the barrier and written after it, so a bf16 tile can be widened in
// place.
__device__ __forceinline__ float cumsum_gates(float* sG, float* red) {
    float* totals = red + 4;
    const int col = threadIdx.x % BK, part = threadIdx.x / BK;
    const bool mine = threadIdx.x < TPC * BK;
    float x[RPT];
    if (threadIdx.x == 0) *red = 0.f;
    if (mine) {
#pragma unroll
        for (int i = 0; i < RPT; i++) x[i] = raw_gate(sG, part * RPT + i, col);
#pragma unroll
        for (int i = 1; i < RPT; i++) x[i] += x[i - 1];
        totals[part * BK + col] = x[RPT - 1];
    }
    __syncthreads();
    float span = 0.f;
    if (mine) {
        float before = 0.f;
        for (int p = 0; p < part; p++) before += totals[p * BK + col];
#pragma unroll
        for (int i = 0; i < RPT; i++) sG[(part * RPT + i) * GS + col] = x[i] + before;
        if (part == TPC - 1) span = -(before + x[RPT - 1]);
    }
    span = warp_max(fmaxf(span, 0.f));
    if (threadIdx.x % 32 == 0) atomicMax((int*)red, __float_as_int(span));
    __syncthreads();
    return *red;
}

// Sequence, first row and rows of global chunk `cg`.
struct ChunkAt {
    int n, rows;
    size_t row0;
};
__device__ __forceinline__ ChunkAt chunk_at(int cg, const int* cu, const int* chunk_off,
                                            const int* chunk_seq) {
    ChunkAt a;
    a.n = chunk_seq[cg];
    const int c0 = (cg - chunk_off[a.n]) * C;
    a.row0 = (size_t)cu[a.n] + c0;
    a.rows = min(C, cu[a.n + 1] - cu[a.n] - c0);
    return a;
}

// The 16 x 32 tiles of a C x C matrix (A, dA) that a warp keeps in registers: its tile t is
// number warp + t NW of the row-major list. A tile wholly above the diagonal (`upper`) is zero
// in A and dA and skips its products.
#define ATPW (C / 16 * (C / 32) / NW)
struct SqTile {
    int m0, n0;
    bool upper;
};
__device__ __forceinline__ SqTile sq_tile(int t) {
    const int idx = threadIdx.x / 32 + t * NW, m0 = idx / (C / 32) * 16, n0 = idx % (C / 32) * 32;
    return SqTile{m0, n0, n0 > m0 + 15};
}

// Whether the 16-byte vector of a row of A from column c on holds an element on or below the
// diagonal: chunk_local writes only those vectors, and load_attn reads only those.
__device__ __forceinline__ bool attn_vector(int i, int c) { return c / SV * SV <= i; }

// Starts loading a chunk's rows of A ([tokens, H, C]) into sA (row stride AS); vectors wholly
// above the diagonal and rows past the chunk's end are zeros, read from nowhere.
#if KERNEL == 2 || KERNEL == 4 || SWEEP_OUT
__device__ __forceinline__ void load_attn(io_t* sA, const io_t* a, ChunkAt at, int H, int hh) {
    const io_t* base = a + (at.row0 * H + hh) * C;  // offsets from it in 32 bits, as load_tile
    const u32 d = smem_u32(sA);
    for_pieces<C, C / SV>([&](int i, int p) {
        const int c = p * SV;
        const bool ok = i < at.rows && attn_vector(i, c);
        cp_async16_s(d + (i * AS + c) * (int)sizeof(io_t), ok ? base + (i * H * C + c) : a, ok);
    });
}
#endif

// The chunk and tile of a block of a tiled kernel: grid (chunks x tiles, H), the tiles of one
// chunk and head neighbours, so that what they all read (v and do, say) is still in L2 when
// the next one reads it.
struct TileAt {
    int chunk, tile;
};
__device__ __forceinline__ TileAt tile_at(int tiles) {
    return TileAt{(int)blockIdx.x / tiles, (int)blockIdx.x % tiles};
}

// ---------------------------------------------------------------------------------------
// What every chunk gives on its own, one block per (chunk, head), walking the key columns BK
// at a time: A = scale tril(Q̃ K̃^T) with the diagonal from the raw q·k ([tokens, H, C]);
// with a gate, Q̃ = q ⊙ e^G (for chunk_out and the backward sweep) and K̂ = k ⊙ e^(Γ-G) (for
// the forward sweep and chunk_dv), both [tokens, H, KD], and Γ ([chunks, H, KD]). Each warp
// keeps its ATPW tiles of A in registers across the key tiles.
#if KERNEL == 0
// A_ij of one key tile term by term with exact exponents (for strong gates); not inlined:
// the kernel calls it for each of its 16 fragment elements.
__device__ __noinline__ float strong_attn(const io_t* sq, const io_t* sk, const float* sG, int i,
                                          int j) {
    float s = 0.f;
    for (int c = 0; c < BK; c++)
        s += to_f(sq[i * KS + c]) * to_f(sk[j * KS + c]) * EXP(sG[i * GS + c] - sG[j * GS + c]);
    return s;
}

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_local(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const gate_t* __restrict__ g,
    io_t* __restrict__ a, io_t* __restrict__ qg, io_t* __restrict__ kh, float* __restrict__ gam,
    const int* __restrict__ cu, const int* __restrict__ chunk_off,
    const int* __restrict__ chunk_seq, int H, float scale) {
    Carve cv{smem};
    io_t* sq = cv.take<io_t>(C * KS);  // q's key tile, then Q̃'s
    io_t* sk = cv.take<io_t>(C * KS);  // k's, then K̃'s (k's for strong gates)
    float* sG = cv.take<float>(HAS_G ? C * GS : 0);
    float* sd = cv.take<float>(C);  // the diagonal q_i·k_i
    float* red = cv.take<float>(RED);
    check_carve(cv);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, hh = blockIdx.y;
    const ChunkAt at = chunk_at(blockIdx.x, cu, chunk_off, chunk_seq);
    float acc[ATPW][4][4] = {};
    for (int k0 = 0; k0 < KD; k0 += BK) {
        if (k0 > 0) __syncthreads();  // the last key tile read
        load_tile<C, BK>(sq, KS, q, at.row0, at.rows, H, hh, KD, k0);
        load_tile<C, BK>(sk, KS, k, at.row0, at.rows, H, hh, KD, k0);
#if HAS_G
        load_gates(sG, g, at.row0, at.rows, H, hh, k0);
#endif
        cp_async_wait_all();
        __syncthreads();
        for (int i = warp; i < C; i += NW) {
            float s = 0.f;
            for (int c = lane; c < BK; c += 32) s += to_f(sq[i * KS + c]) * to_f(sk[i * KS + c]);
            s = warp_sum(s);
            if (lane == 0) sd[i] = s + (k0 > 0 ? sd[i] : 0.f);
        }
#if HAS_G
        // Its barriers also order the diagonal's reads of q and k before the writes below.
        const bool strong = cumsum_gates(sG, red) > SAFE_EXP;
        for_vectors([&](int i, int c) {
            float gi[SV], up[SV], down[SV], rest[SV];
            ld_gates(gi, sG + i * GS + c);
            ld_gates(rest, sG + (C - 1) * GS + c);
#pragma unroll
            for (int e = 0; e < SV; e++) {
                up[e] = gi[e];
                down[e] = -gi[e];
                rest[e] -= gi[e];
            }
            const Vec16 kv = ld16(sk + i * KS + c), x = times_exp(ld16(sq + i * KS + c), up);
            if (i < at.rows) {
                const size_t at_ = ((at.row0 + i) * H + hh) * KD + k0 + c;
                st16_global(qg + at_, x.w);
                st16_global(kh + at_, times_exp(kv, rest).w);
            }
            if (!strong) {
                st16(sq + i * KS + c, x);
                st16(sk + i * KS + c, times_exp(kv, down));
            }
        });
        for (int c = tid; c < BK; c += NT)
            gam[((size_t)blockIdx.x * H + hh) * KD + k0 + c] = sG[(C - 1) * GS + c];
        __syncthreads();
#pragma unroll
        for (int t = 0; t < ATPW; t++) {
            const SqTile tile = sq_tile(t);
            if (tile.upper) continue;
            if (strong) {
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int i = tile.m0 + frag_row(e), jj = tile.n0 + frag_col(j, e);
                        if (jj < i) acc[t][j][e] += strong_attn(sq, sk, sG, i, jj);
                    }
            } else {
                warp_mma(acc[t], row_major(sq, KS), col_major(sk, KS), tile.m0, tile.n0, C, BK);
            }
        }
#else
#pragma unroll
        for (int t = 0; t < ATPW; t++) {
            const SqTile tile = sq_tile(t);
            if (!tile.upper)
                warp_mma(acc[t], row_major(sq, KS), col_major(sk, KS), tile.m0, tile.n0, C, BK);
        }
#endif
    }
    __syncthreads();  // sd complete
#pragma unroll
    for (int t = 0; t < ATPW; t++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int i = sq_tile(t).m0 + frag_row(e), jj = sq_tile(t).n0 + frag_col(j, e);
                if (i >= at.rows || !attn_vector(i, jj)) continue;
                float x[2];
#pragma unroll
                for (int h = 0; h < 2; h++)
                    x[h] = jj + h < i ? acc[t][j][e + h] : jj + h == i ? sd[i] : 0.f;
                store_pair(a + ((at.row0 + i) * H + hh) * C + jj, scale * x[0], scale * x[1]);
            }
}
#endif

// ---------------------------------------------------------------------------------------
// A ROWS x BV tile (an output of chunk_out or chunk_dv, a sweep's state tile) in the warps'
// 16 x 32 tiles, TPW(ROWS) of them per warp in registers: FOR_TILES(ROWS, t, m0, n0) runs a
// statement for each of the warp's (t its slot, m0 and n0 the tile's first row and column).
#define TILES_N ((BV + 31) / 32)
#define TILES(ROWS) ((ROWS) / 16 * TILES_N)
#define TPW(ROWS) ((TILES(ROWS) + NW - 1) / NW)
#define FOR_TILES(ROWS, t, m0, n0)                                                               \
    _Pragma("unroll") for (int t = 0, tile_ = threadIdx.x / 32; t < TPW(ROWS); t++, tile_ += NW) \
        if (const int m0 = tile_ / TILES_N * 16, n0 = tile_ % TILES_N * 32; tile_ < TILES(ROWS))

// A warp's 16 x 32 tile on its way to an io_t matrix in whole 32-byte sectors: the pairs the
// fragments hold fill half a sector each, so stored straight they make the L2 take every
// sector twice (at H=4, K=256, V=512 the state sweep wrote 27M sectors for 533 MB and ran at
// 85% of the L2's throughput). stage_tile puts the pairs (times alpha) in the warp's scratch
// of 16 x SCRATCH_LD io_t; flush_tile then stores the scratch's first `rows` rows as 16-byte
// vectors, each row's 64 bytes (128 in f32) whole, into the first `width` columns (a multiple
// of 16) of the rows at `out` (row stride ld). Between the two the warp can issue work that
// does not touch the scratch, which then hides the round trip through shared memory. chunk_dqk
// writes dq and dk this way too (1-2% faster there; chunk_out and chunk_dv, whose outputs are
// a smaller part of their traffic, gained nothing measurable).
#define SCRATCH_LD (32 + PADE)  // rows 80 bytes apart: the pairs' stores hit 32 banks
__device__ __forceinline__ void stage_tile(io_t* scratch, const float d[4][4], float alpha) {
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e += 2)
            store_pair(scratch + frag_row(e) * SCRATCH_LD + frag_col(j, e), alpha * d[j][e],
                       alpha * d[j][e + 1]);
}
__device__ __forceinline__ void flush_tile(io_t* out, size_t ld, int width, int rows,
                                           io_t* scratch) {
    sync_warp();
    constexpr int PER_ROW = 32 / SV;
#pragma unroll
    for (int x = threadIdx.x % 32; x < 16 * PER_ROW; x += 32) {
        const int r = x / PER_ROW, c = x % PER_ROW * SV;
        if (c < width && r < rows)
            st16_global(out + r * ld + c, ld16(scratch + r * SCRATCH_LD + c).w);
    }
    sync_warp();  // the scratch is free for the warp's next tile
}

// ---------------------------------------------------------------------------------------
// The states, one block per (sequence, head, BK x BV tile of the state) sweeping the
// sequence's chunks with its tile in registers (f32, in the layout of the warps' product
// tiles). Forward (chunk_states): slot i of `slots` gets S_i, the state at chunk i's start:
// S_0 = h0 (or 0), S_{i+1} = e^Γ_i ⊙ S_i + K̂_i^T v_i, and ht = the state after the last
// chunk. Backward (chunk_dstates), the chunks last to first: slot i gets dS'_i, the gradient
// of the state at chunk i's end: dS'_last = dht (or 0), dS'_{i-1} = e^Γ_i ⊙ dS'_i + scale
// Q̃_i^T do_i, and dh0 = the gradient at the first chunk's start. With KEEP_SLOTS=0 no slot is
// written, only ht or dh0 (sequence parallelism's first passes). The backward carries
// dS' / scale, so that both add a plain product. A chunk's product does not depend on the
// state: the rows of the next STAGES - 1 chunks are loading while it runs. Grid (sequences x
// tiles, H): the tiles of one sequence and head run side by side, so that a chunk's rows come
// from DRAM once and from L2 for the other tiles.
#if SWEEP

template <bool BACK>
__device__ __forceinline__ void sweep(const io_t* __restrict__ x, const io_t* __restrict__ y,
                                      io_t* __restrict__ slots, const float* __restrict__ gam,
                                      const float* __restrict__ init, float* __restrict__ fin,
                                      const int* __restrict__ cu,
                                      const int* __restrict__ chunk_off, int H, float alpha,
                                      bool has_init, bool has_fin) {
    constexpr int STAGE = C * KS + C * VS, TILES_V = HEAD_V / BV;
    Carve cv{smem};
    io_t* ring = cv.take<io_t>(STAGES * STAGE);         // x's rows, then y's, per chunk
    float* rg = cv.take<float>(HAS_G ? STAGES * BK : 0);  // Γ per chunk
    io_t* scratch = cv.take<io_t>(WHOLE_SECTORS ? NW * 16 * SCRATCH_LD : 0) +
                    threadIdx.x / 32 * 16 * SCRATCH_LD;
    check_carve(cv);
    const int tiles = KD / BK * TILES_V, hh = blockIdx.y;
    const int n = blockIdx.x / tiles, k0 = blockIdx.x % tiles / TILES_V * BK,
              v0 = blockIdx.x % tiles % TILES_V * BV;
    const int first = chunk_off[n], chunks = chunk_off[n + 1] - first, len = cu[n + 1] - cu[n];
    auto chunk = [&](int step) { return BACK ? chunks - 1 - step : step; };
    // Starts the loads of step `step` into its slot, as one group (empty past the end).
    auto load_step = [&](int step) {
        if (step < chunks) {
            const int c = chunk(step), slot = step % STAGES;
            const size_t row0 = (size_t)cu[n] + (size_t)c * C;
            const int rows = min(C, len - c * C);
            io_t* sx = ring + slot * STAGE;
            load_tile<C, BK>(sx, KS, x, row0, rows, H, hh, KD, k0);
            load_tile<C, BV>(sx + C * KS, VS, y, row0, rows, H, hh, HEAD_V, v0);
#if HAS_G
            const float* gc = gam + ((size_t)(first + c) * H + hh) * KD + k0;
            for (int i = threadIdx.x; i < BK / 4; i += NT)
                cp_async16(rg + slot * BK + 4 * i, gc + 4 * i, true);
#endif
        }
        cp_async_commit();
    };
    for (int step = 0; step < STAGES - 1; step++) load_step(step);
    // The state tile, from h0 or dht (f32 [sequences, H, KD, HEAD_V]).
    const size_t st = ((size_t)n * H + hh) * KD * HEAD_V + (size_t)k0 * HEAD_V + v0;
    const float inv = 1.f / alpha;
    float acc[TPW(BK)][4][4];
    FOR_TILES(BK, t, m0, n0) {
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int r = m0 + frag_row(e), c = n0 + frag_col(j, e);
                const f32x2 h = has_init && c < BV
                                    ? *(const f32x2*)(init + st + (size_t)r * HEAD_V + c)
                                    : f32x2{0.f, 0.f};
                acc[t][j][e] = inv * h.x;
                acc[t][j][e + 1] = inv * h.y;
            }
    }
    for (int step = 0; step < chunks; step++) {
        cp_async_wait_group<STAGES - 2>();
        __syncthreads();  // this step's slot filled; every thread past the last step's products
        load_step(step + STAGES - 1);  // into the last step's slot
        const int slot = step % STAGES;
        const io_t* sx = ring + slot * STAGE;
        io_t* out = slots + ((size_t)(first + chunk(step)) * H + hh) * KD * HEAD_V +
                    (size_t)k0 * HEAD_V + v0;
        FOR_TILES(BK, t, m0, n0) {
            if (KEEP_SLOTS && WHOLE_SECTORS) {
                stage_tile(scratch, acc[t], alpha);
            } else if (KEEP_SLOTS) {
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 4; e += 2) {
                        const int r = m0 + frag_row(e), c = n0 + frag_col(j, e);
                        if (c < BV)
                            store_pair(out + (size_t)r * HEAD_V + c, alpha * acc[t][j][e],
                                       alpha * acc[t][j][e + 1]);
                    }
            }
#if HAS_G
            const float d[2] = {EXP(rg[slot * BK + m0 + frag_row(0)]),
                                EXP(rg[slot * BK + m0 + frag_row(2)])};
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[t][j][e] *= d[e >> 1];
#endif
            warp_mma(acc[t], col_major(sx, KS), row_major(sx + C * KS, VS), m0, n0, BV, C);
            if (KEEP_SLOTS && WHOLE_SECTORS)
                flush_tile(out + (size_t)m0 * HEAD_V + n0, HEAD_V, BV - n0, 16, scratch);
        }
    }
    if (!has_fin) return;
    FOR_TILES(BK, t, m0, n0) {
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int r = m0 + frag_row(e), c = n0 + frag_col(j, e);
                if (c < BV)
                    *(f32x2*)(fin + st + (size_t)r * HEAD_V + c) =
                        f32x2{alpha * acc[t][j][e], alpha * acc[t][j][e + 1]};
            }
    }
}
#endif

// kh is K̂ from chunk_local (k itself without a gate).
#if KERNEL == 1
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_states(
    const io_t* __restrict__ kh, const io_t* __restrict__ v, io_t* __restrict__ states,
    const float* __restrict__ gam, const float* __restrict__ h0, float* __restrict__ ht,
    const int* __restrict__ cu, const int* __restrict__ chunk_off, int H) {
    sweep<false>(kh, v, states, gam, h0, ht, cu, chunk_off, H, 1.f, HAS_H0, true);
}
#endif

// qg is Q̃ from chunk_local (q itself without a gate).
#if KERNEL == 3
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_dstates(
    const io_t* __restrict__ qg, const io_t* __restrict__ d_o, io_t* __restrict__ dstates,
    const float* __restrict__ gam, const float* __restrict__ dht, float* __restrict__ dh0,
    const int* __restrict__ cu, const int* __restrict__ chunk_off, int H, float scale) {
    sweep<true>(qg, d_o, dstates, gam, dht, dh0, cu, chunk_off, H, scale, HAS_DHT, HAS_H0);
}
#endif

// ---------------------------------------------------------------------------------------
// The C x BV outputs of chunk_out and chunk_dv, in the warps' tiles (FOR_TILES(C, ...)), and
// the sweeps' with outputs.
#if KERNEL == 2 || KERNEL == 4 || SWEEP_OUT

__device__ __forceinline__ void scale_tile(float d[4][4], float s) {
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) d[j][e] *= s;
}

// Rows m0.. (those in the chunk) and columns c0.. (the first `width`) of a [tokens, H,
// HEAD_V] tensor from a warp's tile.
__device__ __forceinline__ void store_out_tile(io_t* out, const float d[4][4], ChunkAt at, int H,
                                               int hh, int m0, int c0, int width) {
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const int i = m0 + frag_row(e), c = frag_col(j, e);
            if (c < width && i < at.rows)
                store_pair(out + ((at.row0 + i) * H + hh) * HEAD_V + c0 + c, d[j][e], d[j][e + 1]);
        }
}
#endif

// ---------------------------------------------------------------------------------------
// o = scale Q̃ S + A v: grid (chunks x HEAD_V / BV, H). qg is Q̃ from chunk_local (q itself
// without a gate).
#if KERNEL == 2
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_out(
    const io_t* __restrict__ qg, const io_t* __restrict__ v, const io_t* __restrict__ states,
    const io_t* __restrict__ a, io_t* __restrict__ o, const int* __restrict__ cu,
    const int* __restrict__ chunk_off, const int* __restrict__ chunk_seq, int H, float scale) {
    Carve cv{smem};
    io_t* sq = cv.take<io_t>(C * KS);
    io_t* sS = cv.take<io_t>(BK * VS);
    io_t* sA = cv.take<io_t>(C * AS);
    io_t* sv = cv.take<io_t>(C * VS);
    check_carve(cv);
    const TileAt b = tile_at(HEAD_V / BV);
    const int hh = blockIdx.y, v0 = b.tile * BV;
    const ChunkAt at = chunk_at(b.chunk, cu, chunk_off, chunk_seq);
    const io_t* st = states + ((size_t)b.chunk * H + hh) * KD * HEAD_V;
    load_attn(sA, a, at, H, hh);
    load_tile<C, BV>(sv, VS, v, at.row0, at.rows, H, hh, HEAD_V, v0);
    float acc[TPW(C)][4][4] = {};
    for (int k0 = 0; k0 < KD; k0 += BK) {
        if (k0 > 0) __syncthreads();  // the last product has read sq and sS
        load_tile<C, BK>(sq, KS, qg, at.row0, at.rows, H, hh, KD, k0);
        load_mat<BK, BV>(sS, VS, st + (size_t)k0 * HEAD_V, HEAD_V, v0);
        cp_async_wait_all();
        __syncthreads();
        FOR_TILES(C, t, m0, n0) warp_mma(acc[t], row_major(sq, KS), row_major(sS, VS), m0, n0, BV, BK);
    }
    FOR_TILES(C, t, m0, n0) {
        scale_tile(acc[t], scale);
        // Rows m0.. of the lower triangular A reach column m0 + 15 at most.
        warp_mma(acc[t], row_major(sA, AS), row_major(sv, VS), m0, n0, BV, m0 + 16);
        store_out_tile(o, acc[t], at, H, hh, m0, v0 + n0, BV - n0);
    }
}
#endif

// ---------------------------------------------------------------------------------------
// dv = A^T do + K̂ dS': grid (chunks x HEAD_V / BV, H). kh is K̂ from chunk_local (k itself
// without a gate).
#if KERNEL == 4
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_dv(
    const io_t* __restrict__ kh, const io_t* __restrict__ d_o, const io_t* __restrict__ a,
    const io_t* __restrict__ dstates, io_t* __restrict__ dv, const int* __restrict__ cu,
    const int* __restrict__ chunk_off, const int* __restrict__ chunk_seq, int H) {
    Carve cv{smem};
    io_t* sk = cv.take<io_t>(C * KS);
    io_t* sdS = cv.take<io_t>(BK * VS);
    io_t* sA = cv.take<io_t>(C * AS);
    io_t* sdo = cv.take<io_t>(C * VS);
    check_carve(cv);
    const TileAt b = tile_at(HEAD_V / BV);
    const int hh = blockIdx.y, v0 = b.tile * BV;
    const ChunkAt at = chunk_at(b.chunk, cu, chunk_off, chunk_seq);
    const io_t* st = dstates + ((size_t)b.chunk * H + hh) * KD * HEAD_V;
    load_attn(sA, a, at, H, hh);
    load_tile<C, BV>(sdo, VS, d_o, at.row0, at.rows, H, hh, HEAD_V, v0);
    float acc[TPW(C)][4][4] = {};
    for (int k0 = 0; k0 < KD; k0 += BK) {
        if (k0 > 0) __syncthreads();  // the last product has read sk and sdS
        load_tile<C, BK>(sk, KS, kh, at.row0, at.rows, H, hh, KD, k0);
        load_mat<BK, BV>(sdS, VS, st + (size_t)k0 * HEAD_V, HEAD_V, v0);
        cp_async_wait_all();
        __syncthreads();
        FOR_TILES(C, t, m0, n0) warp_mma(acc[t], row_major(sk, KS), row_major(sdS, VS), m0, n0, BV, BK);
    }
    FOR_TILES(C, t, m0, n0) {
        // Column j of the lower triangular A starts at row j: the sum over rows from m0 on.
        warp_mma(acc[t], col_major(sA + m0 * AS, AS), row_major(sdo + m0 * VS, VS), m0, n0, BV,
                 C - m0);
        store_out_tile(dv, acc[t], at, H, hh, m0, v0 + n0, BV - n0);
    }
}
#endif

// ---------------------------------------------------------------------------------------
// The sweeps with their outputs (chunks of 64 rows, KD ≤ 128): chunk_states_out makes the
// states and o, chunk_dstates_dv the states' gradients and dv, so that no state is read back.
// One block per (sequence, head, V tile of BV columns). The state is kept transposed, in
// 16 x 32 tiles of the warps' product layout (f32): a group of G = KD / 32 warps per 16 of
// its columns, warp g of a group holding keys 32 g.. of them, so that the update Z^T Y is a
// product of each warp's own. Per chunk, with the state at its start:
//   1. the group's columns of the state, rounded as stored, are in shared memory ([KD][16],
//      written at the end of the last chunk and published by this chunk's barrier): the B
//      operand of step 2, and copied from there, 16 bytes at a time, to the chunk's slot;
//   2. out = (scale / alpha) X · state + the chunk's own term, warp g of a group taking rows
//      16 (g + G i) of its 16 columns;
//   3. each warp scales its keys by e^Γ and adds Z^T Y, then writes its tile into the group's
//      other shared tile for the next chunk (two tiles in turn, so one barrier a chunk does).
// Forward: X = Q̃, Y = K̂, Z = v, out = o with A v, alpha = 1 (o = scale Q̃ S + A v);
// backward, the chunks last to first: X = K̂, Y = Q̃, Z = do, out = dv with A^T do, alpha =
// scale (the state carried is dS' / scale, stored as dS': dv = K̂ dS' + A^T do). Steps 2 and 3
// do not wait for each other, and the rows of the next STAGES - 1 chunks load meanwhile.
#if SWEEP_OUT
#define GW ((KD + 31) / 32)  // warps per 16 columns of the state
#if NT != 2 * GW * BV || BK != KD || C != 64 || KD > 128
#error "the sweeps with outputs: KD / 32 warps per 16 state columns, all keys (at most 128), 64 rows"
#endif
#define RS (16 + PADE)  // io_t [KD][16] tiles: a group's columns of the state

template <bool BACK>
__device__ __forceinline__ void sweep_out(
    const io_t* __restrict__ x, const io_t* __restrict__ y, const io_t* __restrict__ z,
    const io_t* __restrict__ a, io_t* __restrict__ out, io_t* __restrict__ slots,
    const float* __restrict__ gam, const float* __restrict__ init, float* __restrict__ fin,
    const int* __restrict__ cu, const int* __restrict__ chunk_off, int H, float scale,
    float alpha, bool has_init, bool has_fin) {
    constexpr int STAGE = 2 * C * KS + C * VS + C * AS, TILES_V = HEAD_V / BV;
    Carve cv{smem};
    io_t* ring = cv.take<io_t>(STAGES * STAGE);         // X's rows, Y's, Z's and A's, per chunk
    float* rg = cv.take<float>(HAS_G ? STAGES * KD : 0);  // Γ per chunk
    io_t* cols = cv.take<io_t>(2 * (BV / 16) * KD * RS);  // each group's two tiles of the state
    check_carve(cv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, hh = blockIdx.y;
    const int g = warp % GW, w0 = warp / GW * 16, k0 = 32 * g;
    const int n = blockIdx.x / TILES_V, v0 = blockIdx.x % TILES_V * BV;
    const int first = chunk_off[n], chunks = chunk_off[n + 1] - first, len = cu[n + 1] - cu[n];
    io_t* group = cols + 2 * (warp / GW) * KD * RS;  // then its second tile
    auto chunk = [&](int step) { return BACK ? chunks - 1 - step : step; };
    auto rows_of = [&](int c) {
        return ChunkAt{n, min(C, len - c * C), (size_t)cu[n] + (size_t)c * C};
    };
    // Starts the loads of step `step` into its slot, as one group (empty past the end).
    auto load_step = [&](int step) {
        if (step < chunks) {
            const int c = chunk(step);
            const ChunkAt at = rows_of(c);
            io_t* sx = ring + step % STAGES * STAGE;
            load_tile<C, KD>(sx, KS, x, at.row0, at.rows, H, hh, KD, 0);
            load_tile<C, KD>(sx + C * KS, KS, y, at.row0, at.rows, H, hh, KD, 0);
            load_tile<C, BV>(sx + 2 * C * KS, VS, z, at.row0, at.rows, H, hh, HEAD_V, v0);
            load_attn(sx + 2 * C * KS + C * VS, a, at, H, hh);
#if HAS_G
            const float* gc = gam + ((size_t)(first + c) * H + hh) * KD;
            for (int i = threadIdx.x; i < KD / 4; i += NT)
                cp_async16(rg + step % STAGES * KD + 4 * i, gc + 4 * i, true);
#endif
        }
        cp_async_commit();
    };
    for (int step = 0; step < STAGES - 1; step++) load_step(step);
    // This warp's tile: keys k0.. of columns v0 + w0.. (h0 and dht are f32 [sequences, H,
    // KD, HEAD_V]); into a group tile as stored.
    const size_t st = ((size_t)n * H + hh) * KD * HEAD_V + v0 + w0;
    float acc[4][4];
    auto publish = [&](io_t* tile) {
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = k0 + frag_col(j, e);
                if (key < KD) tile[key * RS + frag_row(e)] = from_f(alpha * acc[j][e]);
            }
    };
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = k0 + frag_col(j, e);
            acc[j][e] = has_init && key < KD
                            ? init[st + (size_t)key * HEAD_V + frag_row(e)] / alpha
                            : 0.f;
        }
    publish(group);
    for (int step = 0; step < chunks; step++) {
        cp_async_wait_group<STAGES - 2>();
        // This step's slot filled; every warp's tile of the state written, and every warp past
        // the last step's products.
        __syncthreads();
        load_step(step + STAGES - 1);  // into the last step's slot
        const int c = chunk(step), slot = step % STAGES;
        const ChunkAt at = rows_of(c);
        const io_t* sx = ring + slot * STAGE;
        const io_t *sy = sx + C * KS, *sz = sy + C * KS, *sA = sz + C * VS;
        const io_t* state = group + (step & 1) * KD * RS;
        // 1. This warp's keys of the group's tile on to the chunk's slot.
        io_t* sl = slots + ((size_t)(first + c) * H + hh) * KD * HEAD_V + v0 + w0;
        for (int i = lane; i < 32 * (16 / SV); i += 32) {
            const int key = k0 + i / (16 / SV), p = i % (16 / SV) * SV;
            if (key < KD)
                st16_global(sl + (size_t)key * HEAD_V + p, ld16(state + key * RS + p).w);
        }
        // 2. The outputs of rows 16 (g + GW i).. in the group's columns.
#pragma unroll
        for (int i = 0; i < (C / 16 + GW - 1) / GW; i++) {
            const int m0 = 16 * (g + GW * i);
            if (m0 >= C) break;
            float d[4][4] = {};
            warp_mma(d, row_major(sx, KS), row_major(state, RS), m0, 0, 16, KD);
            scale_tile(d, scale / alpha);
            if (BACK)  // column i of the lower triangular A starts at row i
                warp_mma(d, col_major(sA + m0 * AS, AS), row_major(sz + m0 * VS + w0, VS), m0, 0,
                         16, C - m0);
            else  // row i of A ends at column i
                warp_mma(d, row_major(sA, AS), row_major(sz + w0, VS), m0, 0, 16, m0 + 16);
            store_out_tile(out, d, at, H, hh, m0, v0 + w0, 16);
        }
        // 3. The state at the chunk's other end, into the group's other tile.
#if HAS_G
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int key = k0 + frag_col(j, h);
                const float d = key < KD ? EXP(rg[slot * KD + key]) : 0.f;
                acc[j][h] *= d;
                acc[j][h + 2] *= d;
            }
#endif
        warp_mma(acc, col_major(sz + w0, VS), row_major(sy, KS), 0, k0, KD, C);
        publish(group + ((step + 1) & 1) * KD * RS);
    }
    if (!has_fin) return;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int key = k0 + frag_col(j, e);
            if (key < KD) fin[st + (size_t)key * HEAD_V + frag_row(e)] = alpha * acc[j][e];
        }
}
#endif

// qg, kh: Q̃ and K̂ from chunk_local (q and k themselves without a gate).
#if KERNEL == 6
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_states_out(
    const io_t* __restrict__ qg, const io_t* __restrict__ kh, const io_t* __restrict__ v,
    const io_t* __restrict__ a, io_t* __restrict__ o, io_t* __restrict__ states,
    const float* __restrict__ gam, const float* __restrict__ h0, float* __restrict__ ht,
    const int* __restrict__ cu, const int* __restrict__ chunk_off, int H, float scale) {
    sweep_out<false>(qg, kh, v, a, o, states, gam, h0, ht, cu, chunk_off, H, scale, 1.f, HAS_H0,
                     true);
}
#endif

#if KERNEL == 7
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_dstates_dv(
    const io_t* __restrict__ kh, const io_t* __restrict__ qg, const io_t* __restrict__ d_o,
    const io_t* __restrict__ a, io_t* __restrict__ dv, io_t* __restrict__ dstates,
    const float* __restrict__ gam, const float* __restrict__ dht, float* __restrict__ dh0,
    const int* __restrict__ cu, const int* __restrict__ chunk_off, int H, float scale) {
    sweep_out<true>(kh, qg, d_o, a, dv, dstates, gam, dht, dh0, cu, chunk_off, H, scale, scale,
                    HAS_DHT, HAS_H0);
}
#endif

// ---------------------------------------------------------------------------------------
// dq, dk and the gate's gradient: grid (chunks x KD / BK, H); the value columns are walked
// BV at a time. dgk [tokens, H, KD] (key gate) or dgs [tokens, H] (scalar gate, summed over
// key tiles by atomics: zero it first). Each warp keeps its ATPW tiles of dA and one 16 x 32
// tile of dq and of dk in registers from the walk to the end (a K tile of at most 64 columns
// has C / 8 = NW such tiles).
#if KERNEL == 5
#if STAGES < 2
#error "chunk_dqk walks the value columns through a ring of 2 or more slots"
#endif
// Suffix sums down the columns of x (C x BK, f32, row stride GS, in place), each column starting from
// start[c]: thread (part, col) sums rows [part RPT, (part + 1) RPT) in registers, then adds
// the totals of the parts below it (as cumsum_gates, the other way round).
__device__ __forceinline__ void suffix_sums(float* x, const float* start, float* totals) {
    const int col = threadIdx.x % BK, part = threadIdx.x / BK;
    const bool mine = threadIdx.x < TPC * BK;
    float v[RPT];
    if (mine) {
#pragma unroll
        for (int i = 0; i < RPT; i++) v[i] = x[(part * RPT + i) * GS + col];
#pragma unroll
        for (int i = RPT - 2; i >= 0; i--) v[i] += v[i + 1];
        totals[part * BK + col] = v[0];
    }
    __syncthreads();
    if (mine) {
        float after = start[col];
        for (int p = part + 1; p < TPC; p++) after += totals[p * BK + col];
#pragma unroll
        for (int i = 0; i < RPT; i++) x[(part * RPT + i) * GS + col] = v[i] + after;
    }
    __syncthreads();
}

// The intra-chunk sums of dq and dk at (i, c) term by term with exact exponents (for strong
// gates): Σ_{j<i} dA_ij k_jc e^(G_ic-G_jc) and Σ_{j>i} dA_ji q_jc e^(G_jc-G_ic). Not inlined:
// the kernel calls it for each of its 16 fragment elements.
__device__ __noinline__ f32x2 strong_terms(const io_t* sdA, const io_t* sq, const io_t* sk,
                                           const float* sG, int i, int c) {
    const float gi = sG[i * GS + c];
    f32x2 t{0.f, 0.f};
    for (int j = 0; j < i; j++)
        t.x += to_f(sdA[i * AS + j]) * to_f(sk[j * KS + c]) * EXP(gi - sG[j * GS + c]);
    for (int j = i + 1; j < C; j++)
        t.y += to_f(sdA[j * AS + i]) * to_f(sq[j * KS + c]) * EXP(sG[j * GS + c] - gi);
    return t;
}

// A warp's tiles of dq and dk finished with the intra-chunk products (sq, sk holding Q̃ and
// K̃, or q and k without a gate): dq = scale (dq + dA K̃) ⊙ e^G, dk += scale (dA^T Q̃) ⊙ e^-G,
// each sum over the rows that the strictly lower dA reaches (columns up to m0 + 15 of rows
// m0.., rows from m0 on of columns m0..).
__device__ __forceinline__ void intra_products(float dqf[4][4], float dkf[4][4], const io_t* sdA,
                                               const io_t* sq, const io_t* sk, const float* sG,
                                               int m0, int n0, float scale) {
    float t[4][4] = {};
    warp_mma(dqf, row_major(sdA, AS), row_major(sk, KS), m0, n0, BK, m0 + 16);
    warp_mma(t, col_major(sdA + m0 * AS, AS), row_major(sq + m0 * KS, KS), m0, n0, BK, C - m0);
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = m0 + frag_row(e), c = n0 + frag_col(j, e);
            if (c >= BK) continue;
            const float gi = HAS_G ? sG[i * GS + c] : 0.f;
            dqf[j][e] *= scale * (HAS_G ? EXP(gi) : 1.f);
            dkf[j][e] += scale * t[j][e] * (HAS_G ? EXP(-gi) : 1.f);
        }
}

// The warps whose tiles of dA are all above the diagonal (FREE of them) take the 16 x 16
// blocks on the diagonal of S dS'^T instead, whose diagonal is rowsum(dS' ⊙ S): a warp's
// block s (< DPW) is block rank + s FREE of the diagonal, accumulated in column groups
// 2 (s % 2) and 2 (s % 2) + 1 of the warp's tile s / 2 of dA. Those tiles hold nothing else
// (dA is kept only below the diagonal), so the blocks take no registers of their own.
__host__ __device__ constexpr bool warp_free(int w) {
    for (int t = 0; t < ATPW; t++) {
        const int idx = w + t * NW, m0 = idx / (C / 32) * 16, n0 = idx % (C / 32) * 32;
        if (n0 <= m0 + 15) return false;
    }
    return true;
}
__host__ __device__ constexpr int count_free() {
    int n = 0;
    for (int w = 0; w < NW; w++) n += warp_free(w);
    return n;
}
#define FREE count_free()
#define DPW ((BK / 16 + FREE - 1) / FREE)
static_assert(FREE > 0 && DPW <= 2 * ATPW, "the diagonal blocks fit the free warps' tiles of dA");
// This warp's rank among the free warps, or -1.
__device__ __forceinline__ int free_rank() {
    const int warp = threadIdx.x / 32;
    int rank = 0;
#pragma unroll
    for (int w = 0; w < NW; w++) rank += w < warp && warp_free(w);
    return warp_free(warp) ? rank : -1;
}

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) chunk_dqk(
    const io_t* __restrict__ q, const io_t* __restrict__ k, const io_t* __restrict__ v,
    const gate_t* __restrict__ g, const io_t* __restrict__ d_o, const io_t* __restrict__ states,
    const io_t* __restrict__ dstates, io_t* __restrict__ dq, io_t* __restrict__ dk,
    gate_t* __restrict__ dgk, float* __restrict__ dgs, const int* __restrict__ cu,
    const int* __restrict__ chunk_off, const int* __restrict__ chunk_seq, int H, float scale) {
    Carve cv{smem};
    // The value walk's ring: STAGES slots of v, do (C x BV) and S, dS' (BK x BV), loads running
    // STAGES - 1 slots ahead of the products; after the walk, dA (strictly lower) and, with a
    // gate, Q̃ and K̃ (the raw q and k stay for the end); at the end, in Q̃'s and K̃'s place, each
    // warp's scratch for its tiles of dq and dk on their way out (stage_tile).
    constexpr int STAGE = 2 * C * VS + 2 * BK * VS, STEPS = HEAD_V / BV;
    constexpr int SCRATCH = NW * 32 * SCRATCH_LD;
    constexpr int AFTER = C * AS + (2 * C * KS > SCRATCH ? 2 * C * KS : SCRATCH);
    io_t* ring = cv.take<io_t>(max(STAGES * STAGE, AFTER));
    io_t* sdA = ring;
    io_t* sqg = ring + C * AS;
    io_t* skg = sqg + C * KS;
    io_t* sq = cv.take<io_t>(C * KS);
    io_t* sk = cv.take<io_t>(C * KS);
    float* sG = cv.take<float>(HAS_G ? C * GS : 0);  // the gates, then q⊙dq - k⊙dk and dg
    float* sb = cv.take<float>(BK);                  // rowsum(dS' ⊙ S), then the sums' start
    float* sdd = cv.take<float>(C);                  // the diagonal of dA
    float* sy = cv.take<float>(C / 16 * BK);         // Σ k ⊙ dk[state] per 16 rows
    float* red = cv.take<float>(RED);
    check_carve(cv);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const TileAt b = tile_at(KD / BK);
    const int hh = blockIdx.y, k0 = b.tile * BK;
    const ChunkAt at = chunk_at(b.chunk, cu, chunk_off, chunk_seq);
    const size_t st_at = ((size_t)b.chunk * H + hh) * KD * HEAD_V + (size_t)k0 * HEAD_V;
    // This warp's tiles of dq and dk (m0, n0), if `own`.
    constexpr int tn = (BK + 31) / 32;
    static_assert(C / 16 * tn <= NW, "one tile of dq and of dk per warp");
    const bool own = warp < C / 16 * tn;
    const int m0 = warp / tn * 16, n0 = warp % tn * 32;
    // Starts the loads of walk step `step` into its slot, as one group (empty past the end).
    auto load_step = [&](int step) {
        if (step < STEPS) {
            io_t* slot = ring + step % STAGES * STAGE;
            const int v0 = step * BV;
            load_tile<C, BV>(slot, VS, v, at.row0, at.rows, H, hh, HEAD_V, v0);
            load_tile<C, BV>(slot + C * VS, VS, d_o, at.row0, at.rows, H, hh, HEAD_V, v0);
            load_mat<BK, BV>(slot + 2 * C * VS, VS, states + st_at, HEAD_V, v0);
            load_mat<BK, BV>(slot + 2 * C * VS + BK * VS, VS, dstates + st_at, HEAD_V, v0);
        }
        cp_async_commit();
    };
    load_tile<C, BK>(sq, KS, q, at.row0, at.rows, H, hh, KD, k0);
    load_tile<C, BK>(sk, KS, k, at.row0, at.rows, H, hh, KD, k0);
#if HAS_G
    load_gates(sG, g, at.row0, at.rows, H, hh, k0);
#endif
#pragma unroll
    for (int step = 0; step < STAGES - 1; step++) load_step(step);
    // rowsum(dS' ⊙ S) from the diagonal blocks of S dS'^T (warp_free; element by element it
    // took as many instructions as the walk's products).
    const int rank = free_rank();
    float dA[ATPW][4][4] = {}, dqf[4][4] = {}, dkf[4][4] = {};
    for (int step = 0; step < STEPS; step++) {
        cp_async_wait_group<STAGES - 2>();
        __syncthreads();  // this step's slot filled; every thread past the last step's products
        load_step(step + STAGES - 1);  // into the last step's slot
        const io_t* sv = ring + step % STAGES * STAGE;
        const io_t *sdo = sv + C * VS, *sS = sv + 2 * C * VS, *sdS = sS + BK * VS;
#if HAS_G
#pragma unroll
        for (int s = 0; s < DPW; s++)
            if (const int b = (rank + s * FREE) * 16; rank >= 0 && b < BK)
                warp_mma(dA[s / 2] + 2 * (s % 2), row_major(sS, VS), col_major(sdS, VS), b, b,
                         b + 16, BV);
#endif
#pragma unroll
        for (int t = 0; t < ATPW; t++)
            if (!sq_tile(t).upper)
                warp_mma(dA[t], row_major(sdo, VS), col_major(sv, VS), sq_tile(t).m0, sq_tile(t).n0,
                         C, BV);
        if (own) {
            warp_mma(dqf, row_major(sdo, VS), col_major(sS, VS), m0, n0, BK, BV);
            warp_mma(dkf, row_major(sv, VS), col_major(sdS, VS), m0, n0, BK, BV);
        }
    }
#if HAS_G
#pragma unroll
    for (int s = 0; s < DPW; s++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int b = (rank + s * FREE) * 16, i = frag_row(e), c = frag_col(e >> 1, e);
            if (rank >= 0 && b < BK && i == c) sb[b + i] = dA[s / 2][2 * (s % 2) + (e >> 1)][e];
        }
#endif
    __syncthreads();  // the ring read: dA takes its place
    // The diagonal of dA aside (its terms, scale dA_ii k_i in dq and scale dA_ii q_i in dk,
    // are added exactly at the end and cancel in the gate's gradient), dA strictly lower.
#pragma unroll
    for (int t = 0; t < ATPW; t++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = sq_tile(t).m0 + frag_row(e), c = sq_tile(t).n0 + frag_col(j, e);
                if (i == c) sdd[i] = dA[t][j][e];
                sdA[i * AS + c] = from_f(c < i ? dA[t][j][e] : 0.f);
            }
#if HAS_G
    const float span = cumsum_gates(sG, red);  // its barriers also publish sdA and sdd
    // dk's state part, (v dS'^T) ⊙ e^(Γ-G), and its sum Σ_j k_j ⊙ dk_j[state] over the chunk,
    // which with e^Γ ⊙ rowsum(dS' ⊙ S) starts the gate sums.
    if (own) {
        float y[4][2] = {};
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = m0 + frag_row(e), c = n0 + frag_col(j, e);
                if (c >= BK) continue;
                dkf[j][e] *= EXP(sG[(C - 1) * GS + c] - sG[i * GS + c]);
                y[j][e & 1] += to_f(sk[i * KS + c]) * dkf[j][e];
            }
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float x = y[j][h];
#pragma unroll
                for (int o = 4; o < 32; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
                const int c = n0 + j * 8 + lane * 2 + h;
                if (lane < 4 && c < BK) sy[m0 / 16 * BK + c] = x;
            }
    }
    __syncthreads();
    for (int c = tid; c < BK; c += NT) {
        float y = 0.f;
        for (int r = 0; r < C / 16; r++) y += sy[r * BK + c];
        sb[c] = EXP(sG[(C - 1) * GS + c]) * sb[c] + y;
    }
    if (span > SAFE_EXP) {
        // Term by term: dq = scale (do S^T ⊙ e^G + Σ_j dA_ij k_j e^(G_i-G_j)),
        // dk += scale Σ_i dA_ij q_i e^(G_i-G_j).
        if (own)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = m0 + frag_row(e), c = n0 + frag_col(j, e);
                    if (c >= BK) continue;
                    const f32x2 t = strong_terms(sdA, sq, sk, sG, i, c);
                    dqf[j][e] = scale * (dqf[j][e] * EXP(sG[i * GS + c]) + t.x);
                    dkf[j][e] += scale * t.y;
                }
    } else {
        for_vectors([&](int i, int c) {
            float up[SV], down[SV];
            ld_gates(up, sG + i * GS + c);
#pragma unroll
            for (int e = 0; e < SV; e++) down[e] = -up[e];
            st16(sqg + i * KS + c, times_exp(ld16(sq + i * KS + c), up));
            st16(skg + i * KS + c, times_exp(ld16(sk + i * KS + c), down));
        });
        __syncthreads();
        if (own) intra_products(dqf, dkf, sdA, sqg, skg, sG, m0, n0, scale);
    }
    __syncthreads();  // every read of sG done: it takes q ⊙ dq - k ⊙ dk next
#else
    __syncthreads();  // sdA and sdd written
    if (own) intra_products(dqf, dkf, sdA, sq, sk, sG, m0, n0, scale);
#endif
    // Write dq and dk with their diagonal terms (through the warp's scratch, in whole sectors);
    // with a gate, X = q ⊙ dq - k ⊙ dk without them into sG's place (dk's state part included:
    // the sums' start takes it back out). Every read of Q̃ and K̃ is done.
    if (own) {
        io_t* sdq = sqg + warp * 32 * SCRATCH_LD;
        io_t* sdk = sdq + 16 * SCRATCH_LD;
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const int i = m0 + frag_row(e), c = n0 + frag_col(j, e);
                if (c >= BK) continue;
                // Rows past the chunk's end are zeros in sq and sk (and are not stored).
                const f32x2 q2 = load_pair(sq + i * KS + c), k2 = load_pair(sk + i * KS + c);
                const float qv[2] = {q2.x, q2.y}, kv[2] = {k2.x, k2.y};
                const float dd = scale * sdd[i];
                const int at_s = frag_row(e) * SCRATCH_LD + frag_col(j, e);
                store_pair(sdq + at_s, dqf[j][e] + dd * kv[0], dqf[j][e + 1] + dd * kv[1]);
                store_pair(sdk + at_s, dkf[j][e] + dd * qv[0], dkf[j][e + 1] + dd * qv[1]);
#if HAS_G
#pragma unroll
                for (int h = 0; h < 2; h++)
                    sG[i * GS + c + h] = qv[h] * dqf[j][e + h] - kv[h] * dkf[j][e + h];
#endif
            }
        const size_t row = ((at.row0 + m0) * H + hh) * KD + k0 + n0;
        flush_tile(dq + row, (size_t)H * KD, BK - n0, at.rows - m0, sdq);
        flush_tile(dk + row, (size_t)H * KD, BK - n0, at.rows - m0, sdk);
    }
#if HAS_G
    __syncthreads();
    // dg_t = Σ_{i≥t} (q⊙dq - k⊙dk)_i + Σ_j k_j⊙dk_j[state] + e^Γ ⊙ rowsum(dS' ⊙ S): the
    // state part of k⊙dk in the first sum cancels rows j ≥ t of the second, leaving j < t.
    suffix_sums(sG, sb, red + 4);
#if G_SCALAR
    for (int i = warp; i < at.rows; i += NW) {
        float s = 0.f;
        for (int c = lane; c < BK; c += 32) s += sG[i * GS + c];
        s = warp_sum(s);
        if (lane == 0) atomicAdd(&dgs[(at.row0 + i) * H + hh], s);
    }
#else
    gate_t* dg0 = dgk + (at.row0 * H + hh) * KD + k0;  // offsets from it in 32 bits
    for_pieces<C, BK / 4>([&](int i, int p) {
        if (i >= at.rows) return;
        const F4 x = *(const F4*)(sG + i * GS + p * 4);
        gate_t* out = dg0 + (i * H * KD + p * 4);
#if GATE_BF16
        st8_global(out, pack_bf16x2(x.x[0], x.x[1]), pack_bf16x2(x.x[2], x.x[3]));
#else
        st16_global(out, (const u32*)x.x);
#endif
    });
#endif
#endif
}
#endif
