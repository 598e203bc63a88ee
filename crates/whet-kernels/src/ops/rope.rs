//! Rotary position embedding (Su et al. 2021, "RoFormer", arXiv:2104.09864): [`rope`], its op,
//! and the cos/sin tables it reads ([`rope_tables`]).

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, bail};

use super::{hosts, same_dtypes, vec_tensor};
use crate::cpu::{self, Float, contiguous, dispatch_float};

/// Rotary embedding, Hugging Face `rotate_half` convention (first half / second half pairs).
/// x: (B, T, NH, D), cos and sin: (B, T, D/2) -> (B, T, NH, D). cos/sin get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [b, t, d / 2] || sin.dims() != [b, t, d / 2] {
        bail!(
            "rope: x {:?} needs an even D and cos/sin (B, T, D/2), got {:?} and {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    // The kernel takes any strides on (B, T, NH) but needs D contiguous.
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

/// cos/sin tables for [`rope`]: `angle[b, t, i] = positions[b, t] * inv_freq[i]`.
/// positions: (B, T) u32, inv_freq: D/2 values -> ((B, T, D/2), (B, T, D/2)) f32. No gradient.
pub fn rope_tables(positions: &Tensor, inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
    let inv = Tensor::from_slice(inv_freq, (1, 1, inv_freq.len()), positions.device())?;
    let angles = positions
        .to_dtype(candle_core::DType::F32)?
        .unsqueeze(2)?
        .broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Rotary embedding: (x (B, T, NH, D), cos (B, T, D/2), sin (B, T, D/2)).
struct Rope;

impl Rope {
    fn dims(l: &Layout) -> Result<cpu::rope::Dims> {
        let (b, t, nh, d) = l.shape().dims4()?;
        let st = l.stride();
        if st[3] != 1 && d > 1 {
            bail!("whet-rope: x needs a unit stride on its last dim, got strides {st:?}")
        }
        Ok(cpu::rope::Dims {
            b,
            t,
            nh,
            d,
            stride: [st[0], st[1], st[2]],
        })
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "whet-rope"
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
        let dm = Self::dims(l1)?;
        dispatch_float!(s1.dtype(), name, |F| {
            let x = &s1.as_slice::<F>()?[l1.start_offset()..];
            let cos = contiguous::<F>(s2, l2, name)?;
            let sin = contiguous::<F>(s3, l3, name)?;
            let y = cpu::rope::apply(x, cos, sin, dm, F::ONE);
            Ok((F::to_cpu_storage_owned(y), l1.shape().clone()))
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
        let y = crate::cuda::rope::apply(s1, l1, s2, l2, s3, l3, 1.0)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok((Some(crate::cuda::rope::bwd(&grad, cos, sin)?), None, None));
        }
        let dm = Self::dims(grad.layout())?;
        let name = self.name();
        dispatch_float!(x.dtype(), name, |F| {
            let [hg, hc, hs] = hosts([&grad, cos, sin], name)?;
            let dx = cpu::rope::apply(
                hg.slice::<F>()?,
                hc.slice::<F>()?,
                hs.slice::<F>()?,
                dm,
                -F::ONE,
            );
            Ok((Some(vec_tensor(dx, x.shape())?), None, None))
        })
    }
}
