// Shared pieces of the kernels: bf16 without toolkit headers, and one small matrix product
// on shared-memory tiles (tensor cores in the bf16 build, FMA in the f32 build).
//
// Compile-time settings (-D): USE_BF16 (0/1), NT (threads per block).

typedef unsigned short bf16_t;
typedef unsigned int u32;
struct __align__(8) f32x2 {
    float x, y;
};

__device__ __forceinline__ float bf16_to_f(bf16_t x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even (one instruction on sm_80+; a NaN stays a NaN).
__device__ __forceinline__ bf16_t f_to_bf16(float f) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

#if USE_BF16
typedef bf16_t io_t;  // q, k, v, o, do and their gradients in device memory and shared tiles
__device__ __forceinline__ float to_f(bf16_t x) { return bf16_to_f(x); }
__device__ __forceinline__ bf16_t from_f(float x) { return f_to_bf16(x); }
#define EXP(x) __expf(x)
#else
typedef float io_t;
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float from_f(float x) { return x; }
#define EXP(x) expf(x)
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return bf16_to_f(x); }

#define NW (NT / 32)

// The warp's threads meet here, and what each wrote to shared memory before is seen by all.
__device__ __forceinline__ void sync_warp() { asm volatile("bar.warp.sync -1;" ::: "memory"); }

// Stops the kernel when it was launched with less dynamic shared memory than its layout
// needs (the host's size formula and the kernel's OFF_* chain disagree).
__device__ __forceinline__ void check_smem(u32 need) {
    u32 have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}

// A matrix in shared memory, row-major (ROW: element (r, c) at p[r * ld + c]) or
// column-major (at p[r + c * ld]); the layout is part of the type, so that every product
// picks its fragment loads at compile time.
template <typename T, bool ROW>
struct Mat {
    const T* p;
    int ld;
    __device__ __forceinline__ int rs() const { return ROW ? ld : 1; }
    __device__ __forceinline__ int cs() const { return ROW ? 1 : ld; }
    __device__ __forceinline__ float at(int r, int c) const { return to_f32(p[r * rs() + c * cs()]); }
};

template <typename T>
__device__ __forceinline__ Mat<T, true> row_major(const T* p, int ld) {
    return Mat<T, true>{p, ld};
}
template <typename T>
__device__ __forceinline__ Mat<T, false> col_major(const T* p, int ld) {
    return Mat<T, false>{p, ld};
}

// The shared-window address of a pointer into shared memory.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Asynchronous 16-byte copy global -> shared (sm_80+) to the shared-window address dst; with
// `valid` false it writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16_s(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    cp_async16_s(smem_u32(dst), src, valid);
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// Closes the group of copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Calls f(i, p) for piece p (0..PER_ROW) of row i (0..ROWS) of a tile, the block's threads
// taking consecutive pieces. Where the pieces fall evenly on the NT threads (every tile the
// kernels copy at the sizes that must be fast), each thread's row and piece are found once and
// the loop is unrolled with no bounds test: as a plain strided loop, each copy of chunk_dqk's
// walk took a test, a branch and its index arithmetic anew.
template <int ROWS, int PER_ROW, typename F>
__device__ __forceinline__ void for_pieces(F f) {
    if constexpr (NT % PER_ROW == 0 && ROWS * PER_ROW % NT == 0) {
        const int i0 = threadIdx.x / PER_ROW, p = threadIdx.x % PER_ROW;
#pragma unroll
        for (int it = 0; it < ROWS * PER_ROW / NT; it++) f(i0 + it * (NT / PER_ROW), p);
    } else {
        for (int idx = threadIdx.x; idx < ROWS * PER_ROW; idx += NT) f(idx / PER_ROW, idx % PER_ROW);
    }
}

// Starts copying a tile of ROWS rows x WIDTH columns into dst (row stride ld) from rows
// row0.. of a [tokens, H, width_full] tensor at head hh, columns col0..; rows from `rows` on
// are zeros. WIDTH, ld and col0 must be multiples of 16 bytes. The tile's first element is
// found once in 64 bits; each copy's offset from it takes 32 (a tile's rows span fewer than
// 2^31 elements): in 64 bits each copy took some 25 instructions of address arithmetic, a
// quarter of chunk_dqk's.
template <int ROWS, int WIDTH, typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, size_t row0, int rows,
                                          int H, int hh, int width_full, int col0) {
    constexpr int e = 16 / sizeof(T);
    const int row_stride = H * width_full;
    const T* base = src + (row0 * H + hh) * (size_t)width_full + col0;
    const u32 d = smem_u32(dst);
    for_pieces<ROWS, WIDTH / e>([&](int i, int p) {
        const bool ok = i < rows;
        cp_async16_s(d + (i * ld + p * e) * (int)sizeof(T),
                     ok ? base + (i * row_stride + p * e) : src, ok);
    });
}

// A warp's 16 x 32 tile of a product, as mma.m16n8k16 holds its accumulators: element e
// (0..3) of column group j (0..3) is row m0 + frag_row(e), column n0 + frag_col(j, e); the
// elements e and e + 1 (e even) are neighbours in a row.
__device__ __forceinline__ int frag_row(int e) { return (threadIdx.x % 32) / 4 + (e >> 1) * 8; }
__device__ __forceinline__ int frag_col(int j, int e) {
    return j * 8 + (threadIdx.x % 4) * 2 + (e & 1);
}

// Two floats as a bf16 pair, lo in the low half, rounded to nearest even.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Two neighbouring elements of an io_t row (p 4-byte aligned in the bf16 build, 8 in f32):
// stored, and loaded as floats.
__device__ __forceinline__ void store_pair(io_t* p, float x, float y) {
#if USE_BF16
    *(u32*)p = pack_bf16x2(x, y);
#else
    *(f32x2*)p = f32x2{x, y};
#endif
}
__device__ __forceinline__ f32x2 load_pair(const io_t* p) {
#if USE_BF16
    const u32 u = *(const u32*)p;
    return f32x2{__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u)};
#else
    return *(const f32x2*)p;
#endif
}

#if USE_BF16
// Elements (r, c) and (r + dr, c + dc) as a bf16 pair, the first in the low half: one 32-bit
// load when they are adjacent bf16 in memory, else two loads and a conversion.
template <bool ROW>
__device__ __forceinline__ u32 pair(Mat<bf16_t, ROW> m, int r, int c, int dr, int dc) {
    const int at = r * m.rs() + c * m.cs(), step = dr * m.rs() + dc * m.cs();
    if (step == 1 && (at & 1) == 0) return *(const u32*)(m.p + at);
    return (u32)m.p[at] | ((u32)m.p[at + step] << 16);
}
template <bool ROW>
__device__ __forceinline__ u32 pair(Mat<float, ROW> m, int r, int c, int dr, int dc) {
    const int at = r * m.rs() + c * m.cs(), step = dr * m.rs() + dc * m.cs();
    if (step == 1 && (at & 1) == 0) {
        const f32x2 x = *(const f32x2*)(m.p + at);
        return pack_bf16x2(x.x, x.y);
    }
    return pack_bf16x2(m.p[at], m.p[at + step]);
}

__device__ __forceinline__ void mma_bf16(float d[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += A[m0.., 0..D) B[0..D), n0..) for a warp's 16 x 32 tile (column groups from N on left
// alone), on tensor cores: bf16 operands rounded from the tiles, f32 accumulation. D is a
// multiple of 16, N of 8. This version builds fragments from pairs of elements; bf16 tiles
// take ldmatrix (below).
template <typename TA, bool RA, typename TB, bool RB>
__device__ __forceinline__ void warp_mma(float d[4][4], Mat<TA, RA> a, Mat<TB, RB> b, int m0,
                                         int n0, int N, int D) {
    const int lane = threadIdx.x % 32, r = lane >> 2, cc = (lane & 3) * 2;
    for (int k0 = 0; k0 < D; k0 += 16) {
        const u32 af[4] = {pair(a, m0 + r, k0 + cc, 0, 1), pair(a, m0 + r + 8, k0 + cc, 0, 1),
                           pair(a, m0 + r, k0 + cc + 8, 0, 1),
                           pair(a, m0 + r + 8, k0 + cc + 8, 0, 1)};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int n = n0 + j * 8 + r;
            if (n0 + j * 8 >= N) continue;
            mma_bf16(d[j], af, pair(b, k0 + cc, n, 1, 0), pair(b, k0 + cc + 8, n, 1, 0));
        }
    }
}

// ldmatrix: four (x4) or two (x2) 8 x 8 bf16 matrices, lane l giving the address of row l % 8
// of matrix l / 8; TRANS hands each thread the transposed fragment.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(u32 r[4], const bf16_t* p) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(p)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(p)));
}
template <bool TRANS>
__device__ __forceinline__ void ldsm_x2(u32 r[4], const bf16_t* p) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(smem_u32(p)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(smem_u32(p)));
}

// The same with fragments from ldmatrix. A's fragment (rows m0.., inner k0..) is the 8 x 8
// matrices (m lo, k lo), (m hi, k lo), (m lo, k hi), (m hi, k hi); B's for two column groups
// j, j + 1 are (j, k lo), (j, k hi), (j + 1, k lo), (j + 1, k hi). A tile stored with the
// inner index contiguous loads them as they are, the other way round transposed. Every row
// (column, for a column-major tile) must start on 16 bytes: the tile aligned, ld a multiple
// of 8, as the padded tiles of the kernels are.
template <bool RA, bool RB>
__device__ __forceinline__ void warp_mma(float d[4][4], Mat<bf16_t, RA> a, Mat<bf16_t, RB> b,
                                         int m0, int n0, int N, int D) {
    constexpr bool ACONT = RA, BCONT = !RB;  // the inner index contiguous in A, in B
    const int lane = threadIdx.x % 32, q = lane >> 3, i = lane & 7;
    // This lane's row of A's matrix q, and of B's (two column groups per ldmatrix).
    const bf16_t* pa = ACONT ? a.p + (m0 + i + (q & 1) * 8) * a.ld + (q >> 1) * 8
                             : a.p + (m0 + (q & 1) * 8) + ((q >> 1) * 8 + i) * a.ld;
    const int nb = n0 + (q >> 1) * 8;
    const bf16_t* pb = BCONT ? b.p + (q & 1) * 8 + (nb + i) * b.ld
                             : b.p + ((q & 1) * 8 + i) * b.ld + nb;
    for (int k0 = 0; k0 < D; k0 += 16) {
        u32 af[4];
        ldsm_x4<!ACONT>(af, pa + k0 * (ACONT ? 1 : a.ld));
        const bf16_t* pk = pb + k0 * (BCONT ? 1 : b.ld);
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
            if (n0 + j * 8 >= N) continue;
            const bf16_t* pj = pk + j * 8 * (BCONT ? b.ld : 1);
            u32 bf[4];
            if (n0 + j * 8 + 8 < N) {
                ldsm_x4<!BCONT>(bf, pj);
                mma_bf16(d[j], af, bf[0], bf[1]);
                mma_bf16(d[j + 1], af, bf[2], bf[3]);
            } else {
                ldsm_x2<!BCONT>(bf, pj);
                mma_bf16(d[j], af, bf[0], bf[1]);
            }
        }
    }
}
// C (M x N, f32, row stride ldc) = alpha * A B (+ C when acc). M and the inner size D are
// multiples of 16, N of 8. Every thread of the block calls it; the caller synchronises
// before (operands written) and after (C read). Each warp takes 16 x 32 tiles of C.
template <typename TA, bool RA, typename TB, bool RB>
__device__ void gemm(float* c, int ldc, Mat<TA, RA> a, Mat<TB, RB> b, int M, int N, int D,
                     float alpha, bool acc) {
    const int tiles_n = (N + 31) / 32;
    for (int tile = threadIdx.x / 32; tile < (M / 16) * tiles_n; tile += NW) {
        const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 32;
        float d[4][4] = {};
        warp_mma(d, a, b, m0, n0, N, D);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (n0 + j * 8 >= N) continue;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float* out = c + (m0 + frag_row(e)) * ldc + n0 + frag_col(j, e);
                *out = alpha * d[j][e] + (acc ? *out : 0.f);
            }
        }
    }
}
#else
// The f32 build: the same tile with FMAs in f32, for checking.
template <typename TA, bool RA, typename TB, bool RB>
__device__ __forceinline__ void warp_mma(float d[4][4], Mat<TA, RA> a, Mat<TB, RB> b, int m0,
                                         int n0, int N, int D) {
    const int r = m0 + frag_row(0), c = n0 + frag_col(0, 0);
#pragma unroll 1
    for (int k = 0; k < D; k++) {
        const float a0 = a.at(r, k), a1 = a.at(r + 8, k);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (n0 + j * 8 >= N) continue;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const float x = b.at(k, c + j * 8 + h);
                d[j][h] = fmaf(a0, x, d[j][h]);
                d[j][2 + h] = fmaf(a1, x, d[j][2 + h]);
            }
        }
    }
}

// C = alpha * A B (+ C when acc) as above, one element per thread at a time.
template <typename TA, bool RA, typename TB, bool RB>
__device__ void gemm(float* c, int ldc, Mat<TA, RA> a, Mat<TB, RB> b, int M, int N, int D,
                     float alpha, bool acc) {
    for (int idx = threadIdx.x; idx < M * N; idx += NT) {
        const int m = idx / N, n = idx % N;
        float s = 0.f;
        for (int k = 0; k < D; k++) s = fmaf(a.at(m, k), b.at(k, n), s);
        float* out = c + m * ldc + n;
        *out = alpha * s + (acc ? *out : 0.f);
    }
}
#endif

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
