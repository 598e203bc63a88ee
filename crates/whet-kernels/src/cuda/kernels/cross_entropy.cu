// Cross entropy over a block of rows of logits (c, V), one pass over the vocabulary with an
// online softmax: no probabilities are stored, forward or backward.
// Row i of the block is global row r = rowmap ? rowmap[i] : i (the chunked LM head passes the
// supervised rows it gathered); targets, lse and loss are indexed by r.

// 8 values at a time (one or two 16-byte accesses when `vec`).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* o, bool vec, long long avail) {
    if (VEC<T>::N == 8) {
        load_n(p, o, vec, avail);
    } else {
        load_n(p, o, vec, avail);
        load_n(p + 4, o + 4, vec, avail - 4);
    }
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v, bool vec, long long avail) {
    if (VEC<T>::N == 8) {
        store_n(p, v, vec, avail);
    } else {
        store_n(p, v, vec, avail);
        store_n(p + 4, v + 4, vec, avail - 4);
    }
}

// One block per row: lse[r] = logsumexp(row), loss[r] = lse[r] - row[target]; both 0 for an
// ignored row.
template <typename T>
__device__ __forceinline__ void ce_fwd_impl(const T* logits, const i64* targets,
                                            const u32* rowmap, float* lse, float* loss, int v,
                                            bool vec) {
    __shared__ float shm[32], shs[32];
    const long long i = blockIdx.x;
    const long long r = rowmap ? (long long)rowmap[i] : i;
    const i64 tgt = targets[r];
    if (tgt == IGNORE_INDEX) {
        if (threadIdx.x == 0) { lse[r] = 0.f; loss[r] = 0.f; }
        return;
    }
    const T* x = logits + i * v;
    float m = NEG_INF, s = 0.f;
    for (int c = threadIdx.x * 8; c < v; c += blockDim.x * 8) {
        float a[8];
        load8(x + c, a, vec, v - c);
        const int n = min(8, v - c);
        for (int k = 0; k < n; ++k) {
            if (a[k] > m) {
                s = s * expf(m - a[k]) + 1.f;
                m = a[k];
            } else {
                s += expf(a[k] - m);
            }
        }
    }
    block_lse(m, s, shm, shs);
    if (threadIdx.x == 0) {
        const float l = m + logf(s);
        lse[r] = l;
        loss[r] = l - to_f32(x[tgt]);
    }
}

// out[0] = sum of loss[0..n), one block (a fixed order: deterministic). The summed loss is
// f32 whatever the logits' dtype.
extern "C" __global__ void ce_sum(const float* loss, float* out, long long n) {
    __shared__ float sh[32];
    float s = 0.f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) s += loss[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) out[0] = s;
}

// d[i, j] = g * (exp(x[i, j] - lse[r]) - [j == target]) for supervised rows, 0 for ignored
// ones; g = *gptr (the incoming f32 gradient of the summed loss, read on the device).
// grid.x: rows of the block, grid.y: column slices.
template <typename TL, typename TO>
__device__ __forceinline__ void ce_bwd_impl(const TL* logits, const i64* targets,
                                            const u32* rowmap, const float* lse, const float* gptr,
                                            TO* d, int v, bool vec) {
    const long long i = blockIdx.x;
    const long long r = rowmap ? (long long)rowmap[i] : i;
    const i64 tgt = targets[r];
    const TL* x = logits + i * v;
    TO* dr = d + i * v;
    const float g = gptr[0];
    const float l = lse[r];
    const int step = gridDim.y * blockDim.x * 8;
    for (int c = (blockIdx.y * blockDim.x + threadIdx.x) * 8; c < v; c += step) {
        float a[8];
        if (tgt == IGNORE_INDEX) {
#pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = 0.f;
        } else {
            load8(x + c, a, vec, v - c);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                a[k] = g * (expf(a[k] - l) - ((long long)(c + k) == tgt ? 1.f : 0.f));
            }
        }
        store8(dr + c, a, vec, v - c);
    }
}

// Gathers rows: dst[i, :] = src[rowmap[i], :] (h columns).
template <typename T>
__device__ __forceinline__ void gather_impl(const T* src, const u32* rowmap, T* dst, int h) {
    const long long i = blockIdx.x;
    const T* s = src + (long long)rowmap[i] * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) dst[i * h + c] = s[c];
}

// Scatters rows: dst[rowmap[i], :] = src[i, :].
template <typename T>
__device__ __forceinline__ void scatter_impl(const T* src, const u32* rowmap, T* dst, int h) {
    const long long i = blockIdx.x;
    T* o = dst + (long long)rowmap[i] * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) o[c] = src[i * h + c];
}

#define CE_KERNELS(T, SUF)                                                                      \
    extern "C" __global__ void ce_fwd_##SUF(const T* x, const i64* t, const u32* rm, float* lse,\
                                            float* loss, int v, int vec) {                      \
        ce_fwd_impl<T>(x, t, rm, lse, loss, v, vec != 0);                                       \
    }                                                                                           \
    extern "C" __global__ void ce_bwd_##SUF(const T* x, const i64* t, const u32* rm,            \
                                            const float* lse, const float* g, T* d, int v,      \
                                            int vec) {                                          \
        ce_bwd_impl<T, T>(x, t, rm, lse, g, d, v, vec != 0);                                    \
    }                                                                                           \
    extern "C" __global__ void ce_bwd_f32_to_##SUF(const float* x, const i64* t, const u32* rm, \
                                                   const float* lse, const float* g, T* d, int v,\
                                                   int vec) {                                   \
        ce_bwd_impl<float, T>(x, t, rm, lse, g, d, v, vec != 0);                                \
    }                                                                                           \
    extern "C" __global__ void gather_rows_##SUF(const T* s, const u32* rm, T* d, int h) {      \
        gather_impl<T>(s, rm, d, h);                                                            \
    }                                                                                           \
    extern "C" __global__ void scatter_rows_##SUF(const T* s, const u32* rm, T* d, int h) {     \
        scatter_impl<T>(s, rm, d, h);                                                           \
    }

CE_KERNELS(float, f32)
CE_KERNELS(bf16, bf16)
