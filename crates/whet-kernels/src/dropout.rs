//! Dropout masks drawn where the tensor lives, from a counter-based hash: element `i` of the
//! mask with seed `s` depends only on `(s, i)`, so the CPU and CUDA versions give identical
//! masks, the CPU fills its elements in parallel, and a CUDA mask costs one kernel launch (no
//! host-side random numbers, no upload).

use candle_core::{DType, Device, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// splitmix64's finaliser (Steele, Lea and Flood 2014), as in `cuda/kernels/dropout.cu`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 24-bit uniform draw of element `i`: `u / 2^24` is uniform on [0, 1).
fn draw(seed: u64, i: usize) -> u32 {
    (mix64(seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40) as u32
}

/// An inverted-dropout mask of `shape` on `device`: each element is 0 with probability `p`
/// and `1 / (1 - p)` otherwise, in `dtype` (f32 or bf16 on CUDA; any float dtype on the CPU).
/// The same `seed` gives the same mask on every device. Multiply the input by it.
pub fn dropout_mask(
    shape: impl Into<Shape>,
    p: f32,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    if !(0.0..1.0).contains(&p) {
        bail!("dropout_mask: p = {p}; expected a value in [0, 1)")
    }
    let keep = 1.0f32 / (1.0 - p);
    // Dropped when the 24-bit draw u satisfies u / 2^24 < p, i.e. u < ceil(p * 2^24).
    let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
    match device {
        Device::Cpu => {
            let n = shape.elem_count();
            let mut mask = vec![0f32; n];
            mask.par_chunks_mut(1 << 14)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let start = c << 14;
                    for (j, m) in chunk.iter_mut().enumerate() {
                        *m = if draw(seed, start + j) < threshold {
                            0.0
                        } else {
                            keep
                        };
                    }
                });
            Tensor::from_vec(mask, shape, device)?.to_dtype(dtype)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => crate::cuda::dropout::mask(dev, &shape, dtype, seed, threshold, keep),
        other => bail!("dropout_mask: no kernel for {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_about_p_scale_the_rest_and_depend_only_on_the_seed() -> Result<()> {
        let (n, p) = (100_000, 0.1f32);
        let mask = |seed| -> Result<Vec<f32>> {
            dropout_mask((10, n / 10), p, seed, DType::F32, &Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let a = mask(7)?;
        let keep = 1.0 / (1.0 - p);
        assert!(a.iter().all(|&m| m == 0.0 || m == keep));
        let dropped = a.iter().filter(|&&m| m == 0.0).count() as f64 / n as f64;
        // 100k Bernoulli(0.1) draws: the standard deviation of the rate is about 0.001.
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert_eq!(a, mask(7)?, "the same seed gives the same mask");
        let b = mask(8)?;
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / n as f64;
        // Independent masks agree where both keep or both drop: 0.9^2 + 0.1^2 = 0.82.
        assert!(
            (same - 0.82).abs() < 0.01,
            "masks of seeds 7 and 8 agree on {same}"
        );
        let bf = dropout_mask((10, n / 10), p, 7, DType::BF16, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(a.iter().zip(&bf).all(|(x, y)| (*x == 0.0) == (*y == 0.0)));
        assert!(dropout_mask(3, 1.0, 0, DType::F32, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn the_threshold_matches_the_float_comparison() {
        // u / 2^24 < p  <=>  u < ceil(p * 2^24), for every u near the boundary.
        for p in [0.05f32, 0.1, 0.5, 0.9] {
            let t = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
            for u in t.saturating_sub(3)..t + 3 {
                assert_eq!(
                    u < t,
                    (u as f32 / (1u64 << 24) as f32) < p,
                    "p {p} u {u} t {t}"
                );
            }
        }
    }
}
