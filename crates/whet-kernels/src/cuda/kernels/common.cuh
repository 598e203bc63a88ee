// Shared by every whet CUDA source; prepended to each before NVRTC compiles it.
// No #include: NVRTC then needs no CUDA headers at run time. bf16 is handled as raw bits
// (Rust's half::bf16 has the same layout); all arithmetic is f32.

typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define IGNORE_INDEX (-100LL)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even, NaN kept a (quiet) NaN.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }

// Two bf16 packed in a 32-bit word (low half = first element).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}
__device__ __forceinline__ float bf16x2_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16x2_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// 16-byte vectors: VEC<T>::N elements of T, loaded and stored as one uint4 / float4.
template <typename T> struct VEC;
template <> struct VEC<float> { static const int N = 4; };
template <> struct VEC<bf16> { static const int N = 8; };

__device__ __forceinline__ void load16(const float* p, float* o) {
    float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void load16(const bf16* p, float* o) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    o[0] = bf16x2_lo(v.x); o[1] = bf16x2_hi(v.x);
    o[2] = bf16x2_lo(v.y); o[3] = bf16x2_hi(v.y);
    o[4] = bf16x2_lo(v.z); o[5] = bf16x2_hi(v.z);
    o[6] = bf16x2_lo(v.w); o[7] = bf16x2_hi(v.w);
}
__device__ __forceinline__ void store16(float* p, const float* i) {
    *reinterpret_cast<float4*>(p) = make_float4(i[0], i[1], i[2], i[3]);
}
__device__ __forceinline__ void store16(bf16* p, const float* i) {
    uint4 v;
    v.x = pack_bf16x2(i[0], i[1]); v.y = pack_bf16x2(i[2], i[3]);
    v.z = pack_bf16x2(i[4], i[5]); v.w = pack_bf16x2(i[6], i[7]);
    *reinterpret_cast<uint4*>(p) = v;
}

// Loads VEC<T>::N elements starting at p[0] (vector load when `vec`, else element by element
// up to `avail`; missing ones read as 0).
template <typename T>
__device__ __forceinline__ void load_n(const T* p, float* o, bool vec, long long avail) {
    const int N = VEC<T>::N;
    if (vec && avail >= N) { load16(p, o); return; }
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = k < avail ? to_f32(p[k]) : 0.f;
}
template <typename T>
__device__ __forceinline__ void store_n(T* p, const float* v, bool vec, long long avail) {
    const int N = VEC<T>::N;
    if (vec && avail >= N) { store16(p, v); return; }
#pragma unroll
    for (int k = 0; k < N; ++k) if (k < avail) p[k] = from_f32<T>(v[k]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `sh` holds 32 floats; the leading __syncthreads makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.f;
    return warp_sum(v);
}

// (max, sum of exp(x - max)) pairs, merged: the online-softmax reduction.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) { m = mn; s = 0.f; return; }
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

__device__ __forceinline__ void block_lse(float& m, float& s, float* shm, float* shs) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { shm[w] = m; shs[w] = s; }
    __syncthreads();
    m = lane < nw ? shm[lane] : NEG_INF;
    s = lane < nw ? shs[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
}
