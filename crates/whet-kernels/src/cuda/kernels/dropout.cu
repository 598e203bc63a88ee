// Dropout masks from a counter-based hash, the same integer arithmetic as the CPU version in
// `src/dropout.rs` (so both devices draw identical masks): element i of a mask with seed s is
// 0 when u < threshold and `keep` otherwise, u being the top 24 bits of splitmix64's finaliser
// of s + (i + 1) * 0x9E3779B97F4A7C15.

__device__ __forceinline__ u64 dropout_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

template <typename T>
__device__ __forceinline__ void dropout_mask_impl(T* y, long long n, u64 seed, u32 threshold,
                                                  float keep) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const T zero = from_f32<T>(0.f), kept = from_f32<T>(keep);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 z = dropout_mix64(seed + (u64)(i + 1) * 0x9E3779B97F4A7C15ULL);
        y[i] = ((u32)(z >> 40) < threshold) ? zero : kept;
    }
}

#define DROPOUT(T, SUF)                                                                          \
    extern "C" __global__ void dropout_mask_##SUF(T* y, long long n, u64 seed, u32 threshold,    \
                                                  float keep) {                                  \
        dropout_mask_impl<T>(y, n, seed, threshold, keep);                                       \
    }
DROPOUT(float, f32)
DROPOUT(bf16, bf16)
