// The small passes of sequence parallelism (seq_parallel.rs) between a rank's sweeps. A rank's
// payload is [states: sequences x H x K x V | log decays: sequences x H x K], f32; `gathered`
// holds every rank's, in rank order.

// A segment's total log decay per (sequence, head, key): the sum of its chunks' Γ (gam
// [chunks, H, K] from chunk_local; chunk_off: where each sequence's chunks start), or 0
// without a gate.
extern "C" __global__ void segment_log_decay(const float* __restrict__ gam,
                                             const int* __restrict__ chunk_off,
                                             float* __restrict__ out, int n_keys, int hk,
                                             int has_g) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_keys) return;
    const int n = idx / hk, at = idx % hk;
    float s = 0.f;
    if (has_g)
        for (int c = chunk_off[n]; c < chunk_off[n + 1]; c++) s += gam[(size_t)c * hk + at];
    out[idx] = s;
}

// Forward (backward = 0): rank r's initial state, H ← e^(log D_p) ⊙ H + L_p over p < r from
// H = 0. Backward: the gradient reaching the end of rank r's segment, dH ← e^(log D_p) ⊙ dH +
// dh0_p over p > r, the last rank first, from dH = 0. One thread per state element; the
// element's key row is its index / V.
extern "C" __global__ void fold_states(const float* __restrict__ gathered, float* __restrict__ out,
                                       long long states, int dv, int rank, int world,
                                       int backward) {
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= states) return;
    const long long payload = states + states / dv, key = states + e / dv;
    float acc = 0.f;
    if (backward) {
        for (int p = world - 1; p > rank; p--)
            acc = expf(gathered[p * payload + key]) * acc + gathered[p * payload + e];
    } else {
        for (int p = 0; p < rank; p++)
            acc = expf(gathered[p * payload + key]) * acc + gathered[p * payload + e];
    }
    out[e] = acc;
}
