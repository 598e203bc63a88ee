//! Causal, document-masked, grouped-query attention: [`attention`] and its op, whose forward
//! stashes the per-row logsumexp for the backward.

use std::sync::Arc;

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType, bail,
};

use super::{Stash, hosts, same_dtypes, vec_tensor};
use crate::cpu::{self, contiguous, dispatch_float};
#[cfg(feature = "flash-attn")]
use crate::flash;

/// Causal, document-masked, grouped-query attention.
///
/// q: (B, T, NH, D), k and v: (B, S, NKV, D) with S >= T and NH a multiple of NKV,
/// segments: (B, S) u32 -> (B, T, NH, D).
/// Query `i` sits at key position `i + S - T` (so a decode step with a KV cache is T = 1).
/// Query at position p attends to key j iff `j <= p` and `segments[j] == segments[p]`:
/// a packed row never attends across documents. Query head h reads key/value head
/// `h / (NH / NKV)` (Hugging Face `repeat_kv`).
///
/// `window` (sliding-window attention: Mistral, Gemma 3's local layers) further limits a query
/// to the `window` latest keys, `p - j < window`, as transformers' `sliding_window_overlay`.
/// It narrows each query's key range (the kernels never build a `[T x T]` mask). On CUDA a
/// window that cuts into a document is not implemented yet and is an error; one at least as
/// long as every document changes nothing and runs everywhere.
///
/// With the `flash-attn` feature, CUDA bf16/f16 attention that tracks no gradient (evaluation,
/// generation) runs candle-flash-attn's FlashAttention-2 forward where it can express the mask
/// (`src/flash.rs`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, s, _, _) = k.dims4()?;
    if segments.dtype() != DType::U32 || segments.dims() != [b, s] {
        bail!(
            "attention: segments must be (B, S) = ({b}, {s}) u32, got {:?} {:?}",
            segments.dims(),
            segments.dtype()
        )
    }
    if window == Some(0) {
        bail!("attention: a sliding window must hold at least one key, got 0")
    }
    let seg = segments.flatten_all()?.to_vec1::<u32>()?;
    // A window no shorter than any document is the plain causal mask.
    let reach = window.map(|_| longest_reach(&seg, b, s)).unwrap_or(0);
    let window = window.filter(|&w| reach > w);
    #[cfg(feature = "flash-attn")]
    if window.is_none()
        && let Some(y) = flash::forward(q, k, v, &seg, scale)?
    {
        return Ok(y);
    }
    let mask = match q.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if window.is_some() => bail!(
            "attention: a sliding window of {} keys shorter than a document (up to {reach} tokens) is implemented on the CPU only; on CUDA keep sequences within the window (data.max_len <= {0})",
            window.unwrap_or(0),
        ),
        #[cfg(feature = "cuda")]
        dev @ Device::Cuda(_) => AttentionMask::Cuda(
            Arc::new(crate::cuda::attention::Masks::new(&seg, b, s, dev)?),
            crate::cuda::attention::Kernel::Auto,
        ),
        _ => AttentionMask::Cpu(Arc::new(cpu::attention::Windows::new(&seg, b, s, window))),
    };
    apply(q, k, v, scale, mask)
}

/// The most keys any query of the (B, S) segment ids sees under the plain causal document mask:
/// from the first occurrence of its segment id to itself.
fn longest_reach(seg: &[u32], b: usize, s: usize) -> usize {
    let mut most = 0;
    for row in seg.chunks(s.max(1)).take(b) {
        let mut first = std::collections::HashMap::new();
        for (p, id) in row.iter().enumerate() {
            let f = *first.entry(*id).or_insert(p);
            most = most.max(p + 1 - f);
        }
    }
    most
}

/// [`attention`] on CUDA through the SIMT kernels only (no tensor cores): the tests compare the
/// tensor-core kernels with these. q, k, v on a CUDA device.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn attention_simt(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, s, _, _) = k.dims4()?;
    let seg = segments.flatten_all()?.to_vec1::<u32>()?;
    let mask = AttentionMask::Cuda(
        Arc::new(crate::cuda::attention::Masks::new(&seg, b, s, q.device())?),
        crate::cuda::attention::Kernel::Simt,
    );
    apply(q, k, v, scale, mask)
}

/// Applies the op, with `mask`, to q, k and v made contiguous.
fn apply(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: AttentionMask) -> Result<Tensor> {
    let op = Attention {
        scale,
        mask,
        lse: Stash::default(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Attention: (q (B, T, NH, D), k (B, S, NKV, D), v (B, S, NKV, D)); the segments travel in
/// the struct. The forward leaves its per-row logsumexp in `lse` for the backward.
struct Attention {
    scale: f64,
    mask: AttentionMask,
    /// (B, T, NH), set by the forward.
    lse: Stash<Tensor>,
}

/// The segment mask in the form the device's kernels read.
enum AttentionMask {
    Cpu(Arc<cpu::attention::Windows>),
    #[cfg(feature = "cuda")]
    Cuda(
        Arc<crate::cuda::attention::Masks>,
        crate::cuda::attention::Kernel,
    ),
}

impl Attention {
    fn dims(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<cpu::attention::Dims> {
        let (b, t, nh, d) = lq.shape().dims4()?;
        let (bk, s, nkv, dk) = lk.shape().dims4()?;
        if lk.shape() != lv.shape() || bk != b || dk != d || s < t || nkv == 0 || nh % nkv != 0 {
            bail!(
                "whet-attention: expected q (B, T, NH, D), k and v (B, S, NKV, D) with S >= T and NH a multiple of NKV, got q {:?} k {:?} v {:?}",
                lq.dims(),
                lk.dims(),
                lv.dims()
            )
        }
        Ok(cpu::attention::Dims {
            b,
            t,
            s,
            nh,
            nkv,
            d,
        })
    }

    fn windows(&self) -> Result<&cpu::attention::Windows> {
        match &self.mask {
            AttentionMask::Cpu(w) => Ok(w),
            #[cfg(feature = "cuda")]
            AttentionMask::Cuda(..) => {
                bail!("whet-attention: the mask was built for a CUDA device")
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_masks(
        &self,
    ) -> Result<(
        &crate::cuda::attention::Masks,
        crate::cuda::attention::Kernel,
    )> {
        match &self.mask {
            AttentionMask::Cuda(m, k) => Ok((m, *k)),
            AttentionMask::Cpu(_) => bail!("whet-attention: the mask was built for the CPU"),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "whet-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        same_dtypes(name, &[s1.dtype(), s2.dtype(), s3.dtype()])?;
        let dm = Self::dims(l1, l2, l3)?;
        dispatch_float!(s1.dtype(), name, |F| {
            let q = contiguous::<F>(s1, l1, name)?;
            let k = contiguous::<F>(s2, l2, name)?;
            let v = contiguous::<F>(s3, l3, name)?;
            let (o, lse) =
                cpu::attention::fwd(q, k, v, self.windows()?, dm, F::from_f64(self.scale));
            self.lse
                .put(Tensor::from_vec(lse, (dm.b, dm.t, dm.nh), &Device::Cpu)?);
            Ok((F::to_cpu_storage_owned(o), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dm = Self::dims(l1, l2, l3)?;
        let (masks, kernel) = self.cuda_masks()?;
        let (o, lse) =
            crate::cuda::attention::fwd(s1, l1, s2, l2, s3, l3, dm, masks, self.scale, kernel)?;
        self.lse.put(lse);
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Self::dims(q.layout(), k.layout(), v.layout())?;
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let name = self.name();
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let (masks, kernel) = self.cuda_masks()?;
            // Not reached through apply_op3 (the forward always stashes), as on the CPU.
            let lse = self.lse.get_or_else(|| {
                crate::cuda::with_storages([q, k, v], name, |[(sq, lq), (sk, lk), (sv, lv)]| {
                    crate::cuda::attention::fwd(
                        sq, lq, sk, lk, sv, lv, dm, masks, self.scale, kernel,
                    )
                    .map(|(_, lse)| lse)
                })
            })?;
            let need = [q.track_op(), k.track_op(), v.track_op()];
            return crate::cuda::attention::bwd(
                q, k, v, &res, &grad, &lse, dm, masks, self.scale, kernel, need,
            );
        }
        dispatch_float!(q.dtype(), name, |F| {
            let [hq, hk, hv] = hosts([q, k, v], name)?;
            let (q_, k_, v_) = (hq.slice::<F>()?, hk.slice::<F>()?, hv.slice::<F>()?);
            let scale = F::from_f64(self.scale);
            // Not reached through apply_op3 (the forward always stashes); kept so the op
            // stays correct if the forward ever runs elsewhere.
            let lse = self.lse.get_or_else(|| {
                let (_, lse) = cpu::attention::fwd(q_, k_, v_, self.windows()?, dm, scale);
                Tensor::from_vec(lse, (dm.b, dm.t, dm.nh), &Device::Cpu)
            })?;
            let [ho, hg, hl] = hosts([&res, &grad, &lse], name)?;
            let (dq, dk, dv) = cpu::attention::bwd(
                q_,
                k_,
                v_,
                ho.slice::<F>()?,
                hg.slice::<F>()?,
                hl.slice::<F>()?,
                self.windows()?,
                dm,
                scale,
            );
            let pick = |t: &Tensor, g: Vec<F>| {
                if t.track_op() {
                    vec_tensor(g, t.shape()).map(Some)
                } else {
                    Ok(None)
                }
            };
            Ok((pick(q, dq)?, pick(k, dk)?, pick(v, dv)?))
        })
    }
}
