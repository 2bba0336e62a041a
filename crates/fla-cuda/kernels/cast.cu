// x (f32) -> y in the element type, n elements (grid-stride).
extern "C" __global__ void rec_cast(const float* __restrict__ x, io_t* __restrict__ y, int n) {
    for (int i = blockIdx.x * NT + threadIdx.x; i < n; i += gridDim.x * NT) y[i] = from_f(x[i]);
}

// x in the element type -> y (f32), n elements (grid-stride).
extern "C" __global__ void widen(const io_t* __restrict__ x, float* __restrict__ y, int n) {
    for (int i = blockIdx.x * NT + threadIdx.x; i < n; i += gridDim.x * NT) y[i] = to_f(x[i]);
}
