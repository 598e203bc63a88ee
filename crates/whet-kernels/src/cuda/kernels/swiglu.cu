// SwiGLU, elementwise over n values: y = silu(g) * u.
// Backward: du = dy * silu(g), dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g).
// Each thread handles VEC<T>::N consecutive elements per step (16-byte accesses when `vec`).

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(const T* g, const T* u, T* y, long long n,
                                                bool vec) {
    const int N = VEC<T>::N;
    const long long stride = (long long)gridDim.x * blockDim.x * N;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n; i += stride) {
        float a[VEC<T>::N], b[VEC<T>::N];
        load_n(g + i, a, vec, n - i);
        load_n(u + i, b, vec, n - i);
#pragma unroll
        for (int k = 0; k < N; ++k) a[k] = a[k] * sigmoidf_(a[k]) * b[k];
        store_n(y + i, a, vec, n - i);
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* g, const T* u, const T* dy, T* dg,
                                                T* du, long long n, bool vec) {
    const int N = VEC<T>::N;
    const long long stride = (long long)gridDim.x * blockDim.x * N;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N; i < n; i += stride) {
        float a[VEC<T>::N], b[VEC<T>::N], d[VEC<T>::N], og[VEC<T>::N], ou[VEC<T>::N];
        load_n(g + i, a, vec, n - i);
        load_n(u + i, b, vec, n - i);
        load_n(dy + i, d, vec, n - i);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const float s = sigmoidf_(a[k]);
            og[k] = d[k] * b[k] * s * (1.f + a[k] * (1.f - s));
            ou[k] = d[k] * a[k] * s;
        }
        if (dg) store_n(dg + i, og, vec, n - i);
        if (du) store_n(du + i, ou, vec, n - i);
    }
}

#define SWIGLU_KERNELS(T, SUF)                                                                  \
    extern "C" __global__ void swiglu_fwd_##SUF(const T* g, const T* u, T* y, long long n,      \
                                                int vec) {                                      \
        swiglu_fwd_impl<T>(g, u, y, n, vec != 0);                                               \
    }                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SUF(const T* g, const T* u, const T* dy, T* dg,     \
                                                T* du, long long n, int vec) {                  \
        swiglu_bwd_impl<T>(g, u, dy, dg, du, n, vec != 0);                                      \
    }

SWIGLU_KERNELS(float, f32)
SWIGLU_KERNELS(bf16, bf16)
