// Causal, document-masked, grouped-query attention, FlashAttention-2 style: scores exist only
// per (query tile x key tile) in registers, the softmax is online in the forward, and the
// backward recomputes probabilities from the forward's logsumexp. No (T, S) matrix is ever
// stored.
//
// q, o, dout, dq: (B, T, NH, D); k, v, dk, dv: (B, S, NKV, D); all contiguous.
// lse, delta: (B, T, NH) f32. Query i sits at key position p = i + S - T.
// seg: (B, S) segment ids; lo: (B, S) first key position p may see (the first occurrence of
// its segment id); hi: (B, S) last position that may see key j (the last occurrence of its
// id); runs: (B) 1 when every id of the row forms one contiguous run.
// Query p attends to key j iff j <= p and seg[j] == seg[p]. Query head h reads kv head
// h / (NH / NKV).
//
// Two implementations:
// - `*_mma_*` (bf16, D = 64 or 128, sm_80+): tensor cores through `mma.sync.m16n8k16` bf16
//   with f32 accumulation; 4 warps per block, 16 query (or key) rows per warp.
// - `*_simt_*` (f32 or bf16, any D <= 256): one thread per query (or key) row, plain FMAs;
//   the reference implementation on the GPU and the fallback for other shapes.

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define MAX_D 256

// ---------------------------------------------------------------------------------------------
// SIMT

// One thread per (b, h, i). Threads of a warp share (b, h) and hold consecutive i, so they
// walk the same keys and read each key row once per warp (broadcast).
template <typename T>
__device__ __forceinline__ void attn_fwd_simt(const T* q, const T* k, const T* v, const u32* seg,
                                              const u32* lo, T* o, float* lse, int B, int Tn,
                                              int S, int NH, int NKV, int D, float scale) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)B * NH * Tn;
    const bool active = idx < total;
    const long long id = active ? idx : total - 1;
    const int i = (int)(id % Tn);
    const int h = (int)((id / Tn) % NH);
    const int b = (int)(id / ((long long)Tn * NH));
    const int g = h / (NH / NKV), off = S - Tn, p = i + off;
    const u32* sb = seg + (long long)b * S;
    const u32 sp = sb[p];
    // The warp's key range: the union of its rows' windows.
    int jlo = (int)lo[(long long)b * S + p], jhi = p;
    for (int o2 = 16; o2 > 0; o2 >>= 1) {
        jlo = min(jlo, __shfl_xor_sync(0xffffffffu, jlo, o2));
        jhi = max(jhi, __shfl_xor_sync(0xffffffffu, jhi, o2));
    }
    float qv[MAX_D], acc[MAX_D];
    const T* qr = q + (((long long)b * Tn + i) * NH + h) * D;
    for (int d = 0; d < D; ++d) { qv[d] = to_f32(qr[d]) * scale; acc[d] = 0.f; }
    float m = NEG_INF, l = 0.f;
    for (int j = jlo; j <= jhi; ++j) {
        const bool ok = active && j <= p && sb[j] == sp;
        const T* kr = k + (((long long)b * S + j) * NKV + g) * D;
        const T* vr = v + (((long long)b * S + j) * NKV + g) * D;
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += qv[d] * to_f32(kr[d]);
        if (!ok) continue;
        if (s > m) {
            const float c = expf(m - s);
            l = l * c + 1.f;
            for (int d = 0; d < D; ++d) acc[d] = acc[d] * c + to_f32(vr[d]);
            m = s;
        } else {
            const float w = expf(s - m);
            l += w;
            for (int d = 0; d < D; ++d) acc[d] += w * to_f32(vr[d]);
        }
    }
    if (!active) return;
    T* orow = o + (((long long)b * Tn + i) * NH + h) * D;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = 0; d < D; ++d) orow[d] = from_f32<T>(acc[d] * inv);
    lse[((long long)b * Tn + i) * NH + h] = m + logf(l);
}

// delta[r] = sum_d dout[r, d] * o[r, d], one warp per (b, i, h) row.
template <typename T>
__device__ __forceinline__ void attn_delta(const T* o, const T* dout, float* delta, long long rows,
                                           int D) {
    const long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += to_f32(o[r * D + d]) * to_f32(dout[r * D + d]);
    s = warp_sum(s);
    if (lane == 0) delta[r] = s;
}

// dq for one thread per (b, h, i): dq = scale * sum_j dS_ij k_j with P = exp(q.k scale - lse),
// dS = P (dout.v - delta).
template <typename T>
__device__ __forceinline__ void attn_dq_simt(const T* q, const T* k, const T* v, const T* dout,
                                             const float* lse, const float* delta, const u32* seg,
                                             const u32* lo, T* dq, int B, int Tn, int S, int NH,
                                             int NKV, int D, float scale) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)B * NH * Tn;
    const bool active = idx < total;
    const long long id = active ? idx : total - 1;
    const int i = (int)(id % Tn);
    const int h = (int)((id / Tn) % NH);
    const int b = (int)(id / ((long long)Tn * NH));
    const int g = h / (NH / NKV), off = S - Tn, p = i + off;
    const u32* sb = seg + (long long)b * S;
    const u32 sp = sb[p];
    int jlo = (int)lo[(long long)b * S + p], jhi = p;
    for (int o2 = 16; o2 > 0; o2 >>= 1) {
        jlo = min(jlo, __shfl_xor_sync(0xffffffffu, jlo, o2));
        jhi = max(jhi, __shfl_xor_sync(0xffffffffu, jhi, o2));
    }
    const long long row = ((long long)b * Tn + i) * NH + h;
    float qv[MAX_D], dov[MAX_D], acc[MAX_D];
    for (int d = 0; d < D; ++d) {
        qv[d] = to_f32(q[row * D + d]) * scale;
        dov[d] = to_f32(dout[row * D + d]);
        acc[d] = 0.f;
    }
    const float l = lse[row], dl = delta[row];
    for (int j = jlo; j <= jhi; ++j) {
        const bool ok = active && j <= p && sb[j] == sp;
        if (!ok) continue;
        const T* kr = k + (((long long)b * S + j) * NKV + g) * D;
        const T* vr = v + (((long long)b * S + j) * NKV + g) * D;
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
            s += qv[d] * to_f32(kr[d]);
            dp += dov[d] * to_f32(vr[d]);
        }
        const float ds = expf(s - l) * (dp - dl);
        for (int d = 0; d < D; ++d) acc[d] += ds * to_f32(kr[d]);
    }
    if (!active) return;
    for (int d = 0; d < D; ++d) dq[row * D + d] = from_f32<T>(acc[d] * scale);
}

// dk, dv for one thread per (b, g, j): sums over the query heads of group g and the queries
// that see key j.
template <typename T>
__device__ __forceinline__ void attn_dkdv_simt(const T* q, const T* k, const T* v, const T* dout,
                                               const float* lse, const float* delta,
                                               const u32* seg, const u32* hi, T* dk, T* dv, int B,
                                               int Tn, int S, int NH, int NKV, int D,
                                               float scale) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)B * NKV * S;
    const bool active = idx < total;
    const long long id = active ? idx : total - 1;
    const int j = (int)(id % S);
    const int g = (int)((id / S) % NKV);
    const int b = (int)(id / ((long long)S * NKV));
    const int rep = NH / NKV, off = S - Tn;
    const u32* sb = seg + (long long)b * S;
    const u32 sj = sb[j];
    // Query positions p in [j, hi[j]], i.e. indices i = p - off within [0, Tn).
    int plo = j, phi = (int)hi[(long long)b * S + j];
    for (int o2 = 16; o2 > 0; o2 >>= 1) {
        plo = min(plo, __shfl_xor_sync(0xffffffffu, plo, o2));
        phi = max(phi, __shfl_xor_sync(0xffffffffu, phi, o2));
    }
    const int ilo = max(0, plo - off), ihi = min(Tn - 1, phi - off);
    const long long kvrow = ((long long)b * S + j) * NKV + g;
    float kv[MAX_D], vv[MAX_D], ak[MAX_D], av[MAX_D];
    for (int d = 0; d < D; ++d) {
        kv[d] = to_f32(k[kvrow * D + d]) * scale;
        vv[d] = to_f32(v[kvrow * D + d]);
        ak[d] = 0.f;
        av[d] = 0.f;
    }
    for (int hh = 0; hh < rep; ++hh) {
        const int h = g * rep + hh;
        for (int i = ilo; i <= ihi; ++i) {
            const int p = i + off;
            const bool ok = active && j <= p && sb[p] == sj;
            if (!ok) continue;
            const long long row = ((long long)b * Tn + i) * NH + h;
            const T* qr = q + row * D;
            const T* dor = dout + row * D;
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < D; ++d) {
                s += kv[d] * to_f32(qr[d]);
                dp += vv[d] * to_f32(dor[d]);
            }
            const float pr = expf(s - lse[row]);
            const float ds = pr * (dp - delta[row]);
            for (int d = 0; d < D; ++d) {
                av[d] += pr * to_f32(dor[d]);
                ak[d] += ds * to_f32(qr[d]);
            }
        }
    }
    if (!active) return;
    for (int d = 0; d < D; ++d) {
        dk[kvrow * D + d] = from_f32<T>(ak[d] * scale);
        dv[kvrow * D + d] = from_f32<T>(av[d]);
    }
}

#define ATTN_SIMT(T, SUF)                                                                       \
    extern "C" __global__ void attn_fwd_simt_##SUF(                                             \
        const T* q, const T* k, const T* v, const u32* seg, const u32* lo, T* o, float* lse,    \
        int B, int Tn, int S, int NH, int NKV, int D, float scale) {                            \
        attn_fwd_simt<T>(q, k, v, seg, lo, o, lse, B, Tn, S, NH, NKV, D, scale);                \
    }                                                                                           \
    extern "C" __global__ void attn_delta_##SUF(const T* o, const T* dout, float* delta,        \
                                                long long rows, int D) {                        \
        attn_delta<T>(o, dout, delta, rows, D);                                                 \
    }                                                                                           \
    extern "C" __global__ void attn_dq_simt_##SUF(                                              \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                    \
        const float* delta, const u32* seg, const u32* lo, T* dq, int B, int Tn, int S, int NH, \
        int NKV, int D, float scale) {                                                          \
        attn_dq_simt<T>(q, k, v, dout, lse, delta, seg, lo, dq, B, Tn, S, NH, NKV, D, scale);   \
    }                                                                                           \
    extern "C" __global__ void attn_dkdv_simt_##SUF(                                            \
        const T* q, const T* k, const T* v, const T* dout, const float* lse,                    \
        const float* delta, const u32* seg, const u32* hi, T* dk, T* dv, int B, int Tn, int S,  \
        int NH, int NKV, int D, float scale) {                                                  \
        attn_dkdv_simt<T>(q, k, v, dout, lse, delta, seg, hi, dk, dv, B, Tn, S, NH, NKV, D,     \
                          scale);                                                               \
    }

ATTN_SIMT(float, f32)
ATTN_SIMT(bf16, bf16)

// ---------------------------------------------------------------------------------------------
// Tensor cores (bf16)
//
// mma.m16n8k16 fragments (PTX ISA "Matrix Fragments for mma.m16n8k16"), gid = lane / 4,
// tig = lane % 4, each register two bf16 with the lower column / k first:
//   A (16 x 16): a0 (gid, 2tig..), a1 (gid + 8, 2tig..), a2 (gid, 2tig + 8..), a3 (gid + 8, ..)
//   B (16 x 8):  b0 (k = 2tig.., n = gid), b1 (k = 2tig + 8.., n = gid)
//   C (16 x 8):  c0, c1 (gid, 2tig, 2tig + 1), c2, c3 (gid + 8, 2tig, 2tig + 1)
// Every operand sits in shared memory with its k dimension contiguous, rows padded by 8
// elements (16 bytes) so the fragment loads of a warp hit 32 different banks.

__device__ __forceinline__ u32 ld32(const bf16* p) { return *reinterpret_cast<const u32*>(p); }

// A fragment at rows r0.., k0.. of a row-major tile (row stride ld).
__device__ __forceinline__ void frag_a(u32* a, const bf16* s, int ld, int r0, int k0, int gid,
                                       int tig) {
    const bf16* p = s + (r0 + gid) * ld + k0 + 2 * tig;
    a[0] = ld32(p);
    a[1] = ld32(p + 8 * ld);
    a[2] = ld32(p + 8);
    a[3] = ld32(p + 8 * ld + 8);
}

// B fragment with B[k][n] = s[(n0 + n) * ld + k0 + k].
__device__ __forceinline__ void frag_b(u32* b, const bf16* s, int ld, int n0, int k0, int gid,
                                       int tig) {
    const bf16* p = s + (n0 + gid) * ld + k0 + 2 * tig;
    b[0] = ld32(p);
    b[1] = ld32(p + 8);
}

// A fragment k-step kk of a (16 x 8n) accumulator tile c[n][4] rounded to bf16: the C layout of
// two adjacent 8-column tiles is the A layout of one 16-wide k step (FlashAttention-2's P).
__device__ __forceinline__ void frag_a_from_c(u32* a, const float (*c)[4], int kk) {
    a[0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// rows x D tile from global rows src + r * rs (r < valid, else zeros) into dst[r][..] (stride ld).
template <int D>
__device__ __forceinline__ void tile_rows(bf16* dst, int ld, const bf16* src, long long rs,
                                          int valid, int rows) {
    const int CH = D / 8;
    for (int x = threadIdx.x; x < rows * CH; x += blockDim.x) {
        const int r = x / CH, c = (x % CH) * 8;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) w = *reinterpret_cast<const uint4*>(src + r * rs + c);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = w;
    }
}

// The same tile transposed: dst[c][r] (stride ld), so that r becomes the contiguous k dim.
template <int D>
__device__ __forceinline__ void tile_rows_t(bf16* dst, int ld, const bf16* src, long long rs,
                                            int valid, int rows) {
    const int CH = D / 8;
    for (int x = threadIdx.x; x < rows * CH; x += blockDim.x) {
        const int r = x / CH, c = (x % CH) * 8;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (r < valid) w = *reinterpret_cast<const uint4*>(src + r * rs + c);
        const u32 e[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            dst[(c + 2 * t) * ld + r] = (bf16)(e[t] & 0xffffu);
            dst[(c + 2 * t + 1) * ld + r] = (bf16)(e[t] >> 16);
        }
    }
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Forward: block = 64 queries of one (b, h), 4 warps x 16 rows; key tiles of 64.
// Dynamic shared memory: Qs [64][D+8], Ks [64][D+8], Vt [D][72] (V transposed).
template <int D>
__device__ __forceinline__ void attn_fwd_mma(const bf16* q, const bf16* k, const bf16* v,
                                             const u32* seg, const u32* lo, const u32* runs,
                                             bf16* o, float* lse, int Tn, int S, int NH, int NKV,
                                             float scale) {
    const int BR = 64, BC = 64, LD = D + 8, LDV = BC + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + BR * LD;
    bf16* Vt = Ks + BC * LD;
    __shared__ u32 segk[BC];
    __shared__ int s_klo;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * BR;
    const int g = h / (NH / NKV), off = S - Tn;
    const u32* segb = seg + (long long)b * S;
    const u32* lob = lo + (long long)b * S;
    const bool run = runs[b] != 0;
    const int nq = min(BR, Tn - i0);
    if (tid == 0) s_klo = 0x7fffffff;
    __syncthreads();
    for (int r = tid; r < nq; r += blockDim.x) atomicMin(&s_klo, (int)lob[off + i0 + r]);
    tile_rows<D>(Qs, LD, q + (((long long)b * Tn + i0) * NH + h) * D, (long long)NH * D, nq, BR);
    __syncthreads();
    const int klo = s_klo, p_last = off + i0 + nq - 1;
    const int ra = warp * 16 + gid, rb = ra + 8;
    const bool va = ra < nq, vb = rb < nq;
    const int pa = off + i0 + ra, pb = off + i0 + rb;
    const u32 sa = va ? segb[pa] : 0xffffffffu, sbq = vb ? segb[pb] : 0xffffffffu;
    const bool warp_on = warp * 16 < nq;
    const int pw_first = off + i0 + warp * 16;
    const int pw_last = off + i0 + min(warp * 16 + 15, nq - 1);
    const bool warp_full_rows = warp * 16 + 15 < nq;
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) frag_a(qf[kk], Qs, LD, warp * 16, kk * 16, gid, tig);
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    const float sl2 = scale * LOG2E;
    for (int j0 = (klo / BC) * BC; j0 <= p_last; j0 += BC) {
        const int nk = min(BC, S - j0);
        __syncthreads();
        const long long kv0 = (((long long)b * S + j0) * NKV + g) * D;
        tile_rows<D>(Ks, LD, k + kv0, (long long)NKV * D, nk, BC);
        tile_rows_t<D>(Vt, LDV, v + kv0, (long long)NKV * D, nk, BC);
        for (int c = tid; c < BC; c += blockDim.x) segk[c] = c < nk ? segb[j0 + c] : 0xfffffffeu;
        __syncthreads();
        if (!warp_on || j0 > pw_last) continue;
        // No mask needed when every row of the warp sees every key of the tile.
        const bool full = run && warp_full_rows && nk == BC && j0 + BC - 1 <= pw_first &&
                          (int)lob[pw_last] <= j0;
        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                u32 bb[2];
                frag_b(bb, Ks, LD, n * 8, kk * 16, gid, tig);
                mma16816(s[n], qf[kk], bb);
            }
        }
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n * 8 + 2 * tig + (e & 1);
                const int j = j0 + col;
                float x = s[n][e] * sl2;
                if (!full) {
                    const bool ok = e < 2 ? (va && j <= pa && segk[col] == sa)
                                          : (vb && j <= pb && segk[col] == sbq);
                    if (!ok) x = NEG_INF;
                }
                s[n][e] = x;
                if (e < 2) mx_a = fmaxf(mx_a, x);
                else mx_b = fmaxf(mx_b, x);
            }
        }
        mx_a = quad_max(mx_a);
        mx_b = quad_max(mx_b);
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        const float mu_a = mn_a == NEG_INF ? 0.f : mn_a, mu_b = mn_b == NEG_INF ? 0.f : mn_b;
        const float c_a = exp2f(m_a - mu_a), c_b = exp2f(m_b - mu_b);
        m_a = mn_a;
        m_b = mn_b;
        l_a *= c_a;
        l_b *= c_b;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= c_a;
            acc[n][1] *= c_a;
            acc[n][2] *= c_b;
            acc[n][3] *= c_b;
        }
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - mu_a);
            s[n][1] = exp2f(s[n][1] - mu_a);
            s[n][2] = exp2f(s[n][2] - mu_b);
            s[n][3] = exp2f(s[n][3] - mu_b);
            l_a += s[n][0] + s[n][1];
            l_b += s[n][2] + s[n][3];
        }
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            u32 a[4];
            frag_a_from_c(a, s, kk);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                u32 bb[2];
                frag_b(bb, Vt, LDV, n * 8, kk * 16, gid, tig);
                mma16816(acc[n], a, bb);
            }
        }
    }
    l_a = quad_sum(l_a);
    l_b = quad_sum(l_b);
    const float ia = l_a > 0.f ? 1.f / l_a : 0.f, ib = l_b > 0.f ? 1.f / l_b : 0.f;
    if (va) {
        bf16* orow = o + (((long long)b * Tn + i0 + ra) * NH + h) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<u32*>(orow + n * 8 + 2 * tig) =
                pack_bf16x2(acc[n][0] * ia, acc[n][1] * ia);
        if (tig == 0) lse[((long long)b * Tn + i0 + ra) * NH + h] = (m_a + log2f(l_a)) * LN2;
    }
    if (vb) {
        bf16* orow = o + (((long long)b * Tn + i0 + rb) * NH + h) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<u32*>(orow + n * 8 + 2 * tig) =
                pack_bf16x2(acc[n][2] * ib, acc[n][3] * ib);
        if (tig == 0) lse[((long long)b * Tn + i0 + rb) * NH + h] = (m_b + log2f(l_b)) * LN2;
    }
}

// dq: block = 64 queries of one (b, h), key tiles of BC. Per tile: S = Q K^T, dP = dO V^T,
// dS = P (dP - delta), dQ += dS K. Dynamic shared memory: Qs, dOs [64][D+8], Ks, Vs [BC][D+8],
// Kt [D][BC+8].
template <int D, int BC>
__device__ __forceinline__ void attn_dq_mma(const bf16* q, const bf16* k, const bf16* v,
                                            const bf16* dout, const float* lse,
                                            const float* delta, const u32* seg, const u32* lo,
                                            bf16* dq, int Tn, int S, int NH, int NKV, float scale) {
    const int BR = 64, LD = D + 8, LDK = BC + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* dOs = Qs + BR * LD;
    bf16* Ks = dOs + BR * LD;
    bf16* Vs = Ks + BC * LD;
    bf16* Kt = Vs + BC * LD;
    __shared__ u32 segk[BC];
    __shared__ int s_klo;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * BR;
    const int g = h / (NH / NKV), off = S - Tn;
    const u32* segb = seg + (long long)b * S;
    const u32* lob = lo + (long long)b * S;
    const int nq = min(BR, Tn - i0);
    if (tid == 0) s_klo = 0x7fffffff;
    __syncthreads();
    for (int r = tid; r < nq; r += blockDim.x) atomicMin(&s_klo, (int)lob[off + i0 + r]);
    const long long q0 = (((long long)b * Tn + i0) * NH + h) * D;
    tile_rows<D>(Qs, LD, q + q0, (long long)NH * D, nq, BR);
    tile_rows<D>(dOs, LD, dout + q0, (long long)NH * D, nq, BR);
    __syncthreads();
    const int klo = s_klo, p_last = off + i0 + nq - 1;
    const int ra = warp * 16 + gid, rb = ra + 8;
    const bool va = ra < nq, vb = rb < nq;
    const int pa = off + i0 + ra, pb = off + i0 + rb;
    const u32 sa = va ? segb[pa] : 0xffffffffu, sbq = vb ? segb[pb] : 0xffffffffu;
    const long long rowa = ((long long)b * Tn + i0 + ra) * NH + h;
    const long long rowb = ((long long)b * Tn + i0 + rb) * NH + h;
    const float la = va ? lse[rowa] * LOG2E : 0.f, lb = vb ? lse[rowb] * LOG2E : 0.f;
    const float da = va ? delta[rowa] : 0.f, db = vb ? delta[rowb] : 0.f;
    const bool warp_on = warp * 16 < nq;
    const int pw_last = off + i0 + min(warp * 16 + 15, nq - 1);
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const float sl2 = scale * LOG2E;
    for (int j0 = (klo / BC) * BC; j0 <= p_last; j0 += BC) {
        const int nk = min(BC, S - j0);
        __syncthreads();
        const long long kv0 = (((long long)b * S + j0) * NKV + g) * D;
        tile_rows<D>(Ks, LD, k + kv0, (long long)NKV * D, nk, BC);
        tile_rows<D>(Vs, LD, v + kv0, (long long)NKV * D, nk, BC);
        tile_rows_t<D>(Kt, LDK, k + kv0, (long long)NKV * D, nk, BC);
        for (int c = tid; c < BC; c += blockDim.x) segk[c] = c < nk ? segb[j0 + c] : 0xfffffffeu;
        __syncthreads();
        if (!warp_on || j0 > pw_last) continue;
        float s[BC / 8][4], dp[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 aq[4], ad[4];
            frag_a(aq, Qs, LD, warp * 16, kk * 16, gid, tig);
            frag_a(ad, dOs, LD, warp * 16, kk * 16, gid, tig);
#pragma unroll
            for (int n = 0; n < BC / 8; ++n) {
                u32 bk[2], bv[2];
                frag_b(bk, Ks, LD, n * 8, kk * 16, gid, tig);
                frag_b(bv, Vs, LD, n * 8, kk * 16, gid, tig);
                mma16816(s[n], aq, bk);
                mma16816(dp[n], ad, bv);
            }
        }
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n * 8 + 2 * tig + (e & 1);
                const int j = j0 + col;
                const bool ok = e < 2 ? (va && j <= pa && segk[col] == sa)
                                      : (vb && j <= pb && segk[col] == sbq);
                const float pr = ok ? exp2f(s[n][e] * sl2 - (e < 2 ? la : lb)) : 0.f;
                s[n][e] = pr * (dp[n][e] - (e < 2 ? da : db)); // dS
            }
        }
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            u32 a[4];
            frag_a_from_c(a, s, kk);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                u32 bb[2];
                frag_b(bb, Kt, LDK, n * 8, kk * 16, gid, tig);
                mma16816(acc[n], a, bb);
            }
        }
    }
    if (va) {
        bf16* r = dq + rowa * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<u32*>(r + n * 8 + 2 * tig) =
                pack_bf16x2(acc[n][0] * scale, acc[n][1] * scale);
    }
    if (vb) {
        bf16* r = dq + rowb * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<u32*>(r + n * 8 + 2 * tig) =
                pack_bf16x2(acc[n][2] * scale, acc[n][3] * scale);
    }
}

// dk, dv: block = 64 keys of one (b, g), 4 warps x 16 keys; loops over the group's query heads
// and the query tiles (BQ rows) that can see these keys. Per tile: S^T = K Q^T, P^T,
// dP^T = V dO^T, dS^T = P^T (dP^T - delta), dV += P^T dO, dK += dS^T Q.
// Dynamic shared memory: Ks, Vs [64][D+8], Qs, dOs [BQ][D+8], Qt, dOt [D][BQ+8].
template <int D, int BQ>
__device__ __forceinline__ void attn_dkdv_mma(const bf16* q, const bf16* k, const bf16* v,
                                              const bf16* dout, const float* lse,
                                              const float* delta, const u32* seg, const u32* hi,
                                              bf16* dk, bf16* dv, int Tn, int S, int NH, int NKV,
                                              float scale) {
    const int BK = 64, LD = D + 8, LDQ = BQ + 8;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + BK * LD;
    bf16* Qs = Vs + BK * LD;
    bf16* dOs = Qs + BQ * LD;
    bf16* Qt = dOs + BQ * LD;
    bf16* dOt = Qt + D * LDQ;
    __shared__ float lse_s[BQ], dl_s[BQ];
    __shared__ u32 segq[BQ];
    __shared__ int s_phi;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int b = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * BK;
    const int rep = NH / NKV, off = S - Tn;
    const u32* segb = seg + (long long)b * S;
    const u32* hib = hi + (long long)b * S;
    const int nk = min(BK, S - j0);
    if (tid == 0) s_phi = -1;
    __syncthreads();
    for (int r = tid; r < nk; r += blockDim.x) atomicMax(&s_phi, (int)hib[j0 + r]);
    const long long kv0 = (((long long)b * S + j0) * NKV + g) * D;
    tile_rows<D>(Ks, LD, k + kv0, (long long)NKV * D, nk, BK);
    tile_rows<D>(Vs, LD, v + kv0, (long long)NKV * D, nk, BK);
    __syncthreads();
    const int ka = warp * 16 + gid, kb = ka + 8;
    const bool va = ka < nk, vb = kb < nk;
    const int ja = j0 + ka, jb = j0 + kb;
    const u32 sa = va ? segb[ja] : 0xffffffffu, sbk = vb ? segb[jb] : 0xffffffffu;
    const bool warp_on = warp * 16 < nk;
    const int jw_first = j0 + warp * 16;
    const int ilo = max(0, j0 - off), ihi = min(Tn - 1, s_phi - off);
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        ak[n][0] = ak[n][1] = ak[n][2] = ak[n][3] = 0.f;
        av[n][0] = av[n][1] = av[n][2] = av[n][3] = 0.f;
    }
    const float sl2 = scale * LOG2E;
    for (int hh = 0; hh < rep; ++hh) {
        const int h = g * rep + hh;
        for (int i0 = ilo; i0 <= ihi; i0 += BQ) {
            const int nq = min(BQ, Tn - i0);
            __syncthreads();
            const long long q0 = (((long long)b * Tn + i0) * NH + h) * D;
            tile_rows<D>(Qs, LD, q + q0, (long long)NH * D, nq, BQ);
            tile_rows<D>(dOs, LD, dout + q0, (long long)NH * D, nq, BQ);
            tile_rows_t<D>(Qt, LDQ, q + q0, (long long)NH * D, nq, BQ);
            tile_rows_t<D>(dOt, LDQ, dout + q0, (long long)NH * D, nq, BQ);
            for (int r = tid; r < BQ; r += blockDim.x) {
                const long long row = ((long long)b * Tn + i0 + r) * NH + h;
                lse_s[r] = r < nq ? lse[row] * LOG2E : 0.f;
                dl_s[r] = r < nq ? delta[row] : 0.f;
                segq[r] = r < nq ? segb[off + i0 + r] : 0xfffffffeu;
            }
            __syncthreads();
            if (!warp_on || off + i0 + nq - 1 < jw_first) continue;
            float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) {
                st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
                dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                u32 akf[4], avf[4];
                frag_a(akf, Ks, LD, warp * 16, kk * 16, gid, tig);
                frag_a(avf, Vs, LD, warp * 16, kk * 16, gid, tig);
#pragma unroll
                for (int n = 0; n < BQ / 8; ++n) {
                    u32 bq[2], bd[2];
                    frag_b(bq, Qs, LD, n * 8, kk * 16, gid, tig);
                    frag_b(bd, dOs, LD, n * 8, kk * 16, gid, tig);
                    mma16816(st[n], akf, bq);
                    mma16816(dpt[n], avf, bd);
                }
            }
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = n * 8 + 2 * tig + (e & 1);
                    const int p = off + i0 + col;
                    const bool ok = col < nq && (e < 2 ? (va && ja <= p && segq[col] == sa)
                                                       : (vb && jb <= p && segq[col] == sbk));
                    const float pr = ok ? exp2f(st[n][e] * sl2 - lse_s[col]) : 0.f;
                    st[n][e] = pr;                       // P^T
                    dpt[n][e] = pr * (dpt[n][e] - dl_s[col]); // dS^T
                }
            }
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) {
                u32 ap[4], as[4];
                frag_a_from_c(ap, st, kk);
                frag_a_from_c(as, dpt, kk);
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    u32 bo[2], bq[2];
                    frag_b(bo, dOt, LDQ, n * 8, kk * 16, gid, tig);
                    frag_b(bq, Qt, LDQ, n * 8, kk * 16, gid, tig);
                    mma16816(av[n], ap, bo);
                    mma16816(ak[n], as, bq);
                }
            }
        }
    }
    if (va) {
        const long long r = (((long long)b * S + ja) * NKV + g) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            *reinterpret_cast<u32*>(dk + r + n * 8 + 2 * tig) =
                pack_bf16x2(ak[n][0] * scale, ak[n][1] * scale);
            *reinterpret_cast<u32*>(dv + r + n * 8 + 2 * tig) = pack_bf16x2(av[n][0], av[n][1]);
        }
    }
    if (vb) {
        const long long r = (((long long)b * S + jb) * NKV + g) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            *reinterpret_cast<u32*>(dk + r + n * 8 + 2 * tig) =
                pack_bf16x2(ak[n][2] * scale, ak[n][3] * scale);
            *reinterpret_cast<u32*>(dv + r + n * 8 + 2 * tig) = pack_bf16x2(av[n][2], av[n][3]);
        }
    }
}

#define ATTN_MMA(DD, BCQ, BQK)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_mma_d##DD(                       \
        const bf16* q, const bf16* k, const bf16* v, const u32* seg, const u32* lo,             \
        const u32* runs, bf16* o, float* lse, int Tn, int S, int NH, int NKV, float scale) {    \
        attn_fwd_mma<DD>(q, k, v, seg, lo, runs, o, lse, Tn, S, NH, NKV, scale);                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attn_dq_mma_d##DD(                        \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,        \
        const float* delta, const u32* seg, const u32* lo, bf16* dq, int Tn, int S, int NH,     \
        int NKV, float scale) {                                                                 \
        attn_dq_mma<DD, BCQ>(q, k, v, dout, lse, delta, seg, lo, dq, Tn, S, NH, NKV, scale);    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) attn_dkdv_mma_d##DD(                      \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,        \
        const float* delta, const u32* seg, const u32* hi, bf16* dk, bf16* dv, int Tn, int S,   \
        int NH, int NKV, float scale) {                                                         \
        attn_dkdv_mma<DD, BQK>(q, k, v, dout, lse, delta, seg, hi, dk, dv, Tn, S, NH, NKV,      \
                               scale);                                                          \
    }

// (head dim, key tile of the dq kernel, query tile of the dk/dv kernel): smaller tiles at
// D = 128 keep the accumulators in registers.
ATTN_MMA(64, 64, 64)
ATTN_MMA(128, 32, 32)
