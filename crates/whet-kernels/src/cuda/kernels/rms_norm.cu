// RMSNorm over rows of H: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps). f32 math.
// x, y, dy, dx: (R, H) contiguous; w, dw: (H). `vec`: 16-byte loads are legal (H a multiple
// of the vector width and the pointers 16-byte aligned); the host decides.

// One block per row.
template <typename T>
__device__ __forceinline__ void rms_fwd(const T* x, const T* w, T* y, int h, float eps, bool vec) {
    __shared__ float sh[32];
    const int N = VEC<T>::N;
    const long long row = blockIdx.x;
    const T* xr = x + row * h;
    T* yr = y + row * h;
    float ss = 0.f;
    for (int c = threadIdx.x * N; c < h; c += blockDim.x * N) {
        float v[VEC<T>::N];
        load_n(xr + c, v, vec, h - c);
#pragma unroll
        for (int k = 0; k < N; ++k) ss += v[k] * v[k];
    }
    ss = block_sum(ss, sh);
    const float r = rsqrtf(ss / (float)h + eps);
    for (int c = threadIdx.x * N; c < h; c += blockDim.x * N) {
        float v[VEC<T>::N], g[VEC<T>::N];
        load_n(xr + c, v, vec, h - c);
        load_n(w + c, g, vec, h - c);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = v[k] * r * g[k];
        store_n(yr + c, v, vec, h - c);
    }
}

// Blocks stride over rows. Per row: c = rstd^2 / H * sum(dy * w * x),
// dx = rstd * (dy * w - x * c); this block's share of dw (sum over its rows of dy * x * rstd)
// goes to part[blockIdx.x, :] (f32), summed over blocks by rms_dw_sum. A thread always owns
// the same columns, so the partial sums need no atomics.
template <typename T>
__device__ __forceinline__ void rms_bwd(const T* x, const T* w, const T* dy, T* dx, float* part,
                                        int rows, int h, float eps, int need_dx, int need_dw,
                                        bool vec) {
    __shared__ float sh[32];
    const int N = VEC<T>::N;
    float* pr = part + (long long)blockIdx.x * h;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * h;
        const T* dyr = dy + row * h;
        float ss = 0.f, sd = 0.f;
        for (int c = threadIdx.x * N; c < h; c += blockDim.x * N) {
            float a[VEC<T>::N], g[VEC<T>::N], d[VEC<T>::N];
            load_n(xr + c, a, vec, h - c);
            load_n(w + c, g, vec, h - c);
            load_n(dyr + c, d, vec, h - c);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                ss += a[k] * a[k];
                sd += d[k] * g[k] * a[k];
            }
        }
        ss = block_sum(ss, sh);
        sd = block_sum(sd, sh);
        const float r = rsqrtf(ss / (float)h + eps);
        const float cc = sd * r * r / (float)h;
        for (int c = threadIdx.x * N; c < h; c += blockDim.x * N) {
            float a[VEC<T>::N], g[VEC<T>::N], d[VEC<T>::N];
            load_n(xr + c, a, vec, h - c);
            load_n(dyr + c, d, vec, h - c);
            if (need_dw) {
#pragma unroll
                for (int k = 0; k < N; ++k)
                    if (c + k < h) pr[c + k] += d[k] * a[k] * r;
            }
            if (need_dx) {
                load_n(w + c, g, vec, h - c);
#pragma unroll
                for (int k = 0; k < N; ++k) g[k] = r * (d[k] * g[k] - a[k] * cc);
                store_n(dx + row * h + c, g, vec, h - c);
            }
        }
    }
}

// dw[i] = sum over the `blocks` partial rows of part[:, i].
template <typename T>
__device__ __forceinline__ void rms_dw_sum(const float* part, T* dw, int blocks, int h) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= h) return;
    float s = 0.f;
    for (int b = 0; b < blocks; ++b) s += part[(long long)b * h + i];
    dw[i] = from_f32<T>(s);
}

#define RMS_KERNELS(T, SUF)                                                                     \
    extern "C" __global__ void rms_norm_fwd_##SUF(const T* x, const T* w, T* y, int h,          \
                                                  float eps, int vec) {                         \
        rms_fwd<T>(x, w, y, h, eps, vec != 0);                                                  \
    }                                                                                           \
    extern "C" __global__ void rms_norm_bwd_##SUF(const T* x, const T* w, const T* dy, T* dx,   \
                                                  float* part, int rows, int h, float eps,      \
                                                  int need_dx, int need_dw, int vec) {          \
        rms_bwd<T>(x, w, dy, dx, part, rows, h, eps, need_dx, need_dw, vec != 0);               \
    }                                                                                           \
    extern "C" __global__ void rms_norm_dw_##SUF(const float* part, T* dw, int blocks, int h) { \
        rms_dw_sum<T>(part, dw, blocks, h);                                                     \
    }

RMS_KERNELS(float, f32)
RMS_KERNELS(bf16, bf16)
