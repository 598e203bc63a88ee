// Rotary embedding, rotate_half convention. x: (B, T, NH, D) with element strides s0, s1, s2
// on (B, T, NH) and unit stride on D; cos, sin: (B, T, D/2) contiguous; y: (B, T, NH, D)
// contiguous. lo = x1 cos - sign x2 sin, hi = x2 cos + sign x1 sin: sign = 1 is the forward,
// -1 the backward (the rotation's transpose). One thread per P consecutive pairs (P = 2 when
// D/2 and every stride are even: 4-byte bf16x2 / 8-byte float2 accesses).

template <typename T, int P>
__device__ __forceinline__ void rope_impl(const T* x, const T* cs, const T* sn, T* y, int t,
                                          int nh, int d, long long s0, long long s1,
                                          long long s2, float sign, long long total) {
    const int half = d / 2;
    const int hp = half / P;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int i = (int)(idx % hp) * P;
    long long rest = idx / hp;
    const int hh = (int)(rest % nh);
    const long long bt = rest / nh;
    const long long bb = bt / t, tt = bt % t;
    const T* xr = x + bb * s0 + tt * s1 + hh * s2;
    T* yr = y + (bt * nh + hh) * d;
    const T* cr = cs + bt * half;
    const T* sr = sn + bt * half;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const float x1 = to_f32(xr[i + k]), x2 = to_f32(xr[half + i + k]);
        const float c = to_f32(cr[i + k]), s = sign * to_f32(sr[i + k]);
        yr[i + k] = from_f32<T>(x1 * c - x2 * s);
        yr[half + i + k] = from_f32<T>(x2 * c + x1 * s);
    }
}

#define ROPE_KERNELS(T, SUF)                                                                    \
    extern "C" __global__ void rope_##SUF(const T* x, const T* c, const T* s, T* y, int t,      \
                                          int nh, int d, long long s0, long long s1,            \
                                          long long s2, float sign, long long total) {          \
        rope_impl<T, 1>(x, c, s, y, t, nh, d, s0, s1, s2, sign, total);                         \
    }                                                                                           \
    extern "C" __global__ void rope2_##SUF(const T* x, const T* c, const T* s, T* y, int t,     \
                                           int nh, int d, long long s0, long long s1,           \
                                           long long s2, float sign, long long total) {         \
        rope_impl<T, 2>(x, c, s, y, t, nh, d, s0, s1, s2, sign, total);                         \
    }

ROPE_KERNELS(float, f32)
ROPE_KERNELS(bf16, bf16)
