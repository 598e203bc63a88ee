// Fused multi-tensor AdamW: one launch updates every parameter (torch.optim.AdamW with the
// constants folded as in whet-optim's CPU AdamW). Block b updates elements
// [start[b], min(start[b] + chunk, n[t])) of tensor t = tensor[b].
// params, m, v: f32; grads: f32 or bf16 (G). A null grad pointer skips its tensor.
// decays[t] != 0: p *= decay (decoupled weight decay, decay = 1 - lr * wd) before the step.

template <typename G>
__device__ __forceinline__ void adamw_impl(const u64* params, const u64* grads, const u64* ms,
                                           const u64* vs, const long long* sizes,
                                           const int* decays, const int* tensor,
                                           const long long* start, int chunk, float b1, float b2,
                                           float eps, float step_size, float bc2_sqrt,
                                           float grad_scale, float decay) {
    const int t = tensor[blockIdx.x];
    if (grads[t] == 0ull) return;
    float* p = reinterpret_cast<float*>(params[t]);
    const G* g = reinterpret_cast<const G*>(grads[t]);
    float* m = reinterpret_cast<float*>(ms[t]);
    float* v = reinterpret_cast<float*>(vs[t]);
    const float dec = decays[t] ? decay : 1.f;
    const long long s = start[blockIdx.x];
    const long long e = min(s + (long long)chunk, sizes[t]);
    for (long long i = s + threadIdx.x; i < e; i += blockDim.x) {
        const float gg = to_f32(g[i]) * grad_scale;
        const float mm = b1 * m[i] + (1.f - b1) * gg;
        const float vv = b2 * v[i] + (1.f - b2) * gg * gg;
        m[i] = mm;
        v[i] = vv;
        const float denom = sqrtf(vv) / bc2_sqrt + eps;
        p[i] = p[i] * dec - step_size * mm / denom;
    }
}

#define ADAMW_KERNEL(G, SUF)                                                                    \
    extern "C" __global__ void adamw_##SUF(                                                     \
        const u64* params, const u64* grads, const u64* ms, const u64* vs,                      \
        const long long* sizes, const int* decays, const int* tensor, const long long* start,   \
        int chunk, float b1, float b2, float eps, float step_size, float bc2_sqrt,              \
        float grad_scale, float decay) {                                                        \
        adamw_impl<G>(params, grads, ms, vs, sizes, decays, tensor, start, chunk, b1, b2, eps,  \
                      step_size, bc2_sqrt, grad_scale, decay);                                  \
    }

ADAMW_KERNEL(float, f32)
ADAMW_KERNEL(bf16, bf16)
