//! Property tests: invariants over random shapes and segmentations.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use whet_kernels::{
    IGNORE_INDEX, attention, cross_entropy_sum, linear_cross_entropy_sum, reference,
};

use crate::common::{closeness, rand};

/// (B, T, S, NH, NKV, D, segment ids (B, S)): ids either runs of random lengths or arbitrary
/// small ids (which reuse ids across runs).
fn attention_case() -> impl Strategy<Value = (usize, usize, usize, usize, usize, usize, Vec<u32>)> {
    (
        1usize..3,
        1usize..40,
        0usize..30,
        1usize..4,
        1usize..3,
        prop::sample::select(vec![1usize, 4, 8, 17]),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(b, t, extra, nkv, rep, d, runs, seed)| {
            let s = t + extra;
            let mut x = seed | 1;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let seg: Vec<u32> = (0..b)
                .flat_map(|_| {
                    let mut id = 0u32;
                    (0..s)
                        .map(|_| {
                            if runs {
                                if next() % 6 == 0 {
                                    id += 1;
                                }
                                id
                            } else {
                                (next() % 3) as u32
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            (b, t, s, nkv * rep, nkv, d, seg)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every row's weights sum to one: with v = 1 the output is 1 everywhere, and the forward
    /// equals the reference for any segmentation.
    #[test]
    fn attention_rows_are_convex_combinations((b, t, s, nh, nkv, d, seg) in attention_case()) {
        let seg = Tensor::from_vec(seg, (b, s), &Device::Cpu).unwrap();
        let q = (rand(&[b, t, nh, d], 1, DType::F32).unwrap() * 3.0).unwrap();
        let k = rand(&[b, s, nkv, d], 2, DType::F32).unwrap();
        let ones = Tensor::ones((b, s, nkv, d), DType::F32, &Device::Cpu).unwrap();
        let out = attention(&q, &k, &ones, &seg, 0.7, None).unwrap();
        let want = Tensor::ones((b, t, nh, d), DType::F32, &Device::Cpu).unwrap();
        prop_assert!(closeness(&out, &want, 0.0, 1e-5).unwrap() <= 1.0);
        let v = rand(&[b, s, nkv, d], 3, DType::F32).unwrap();
        let fast = attention(&q, &k, &v, &seg, 0.7, None).unwrap();
        let refr = reference::attention(&q, &k, &v, &seg, 0.7, None).unwrap();
        prop_assert!(closeness(&fast, &refr, 1e-5, 1e-5).unwrap() <= 1.0);
    }

    /// Ignored rows contribute nothing: the loss equals the loss of the supervised rows alone,
    /// and is zero when every row is ignored; the LM-head version agrees for every chunk size.
    #[test]
    fn ignored_rows_contribute_nothing(n in 1usize..12, v in 1usize..20, mask in any::<u64>(), chunk in 1usize..14, seed in any::<u64>()) {
        let logits = (rand(&[n, v], seed, DType::F32).unwrap() * 5.0).unwrap();
        let tg: Vec<i64> = (0..n).map(|i| if mask >> i & 1 == 1 { IGNORE_INDEX } else { (i * 7 % v) as i64 }).collect();
        let loss = cross_entropy_sum(&logits, &Tensor::new(tg.as_slice(), &Device::Cpu).unwrap()).unwrap().to_scalar::<f32>().unwrap();
        let kept: Vec<u32> = (0..n as u32).filter(|&i| tg[i as usize] != IGNORE_INDEX).collect();
        let want = if kept.is_empty() {
            0.0
        } else {
            let idx = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
            let tk: Vec<i64> = kept.iter().map(|&i| tg[i as usize]).collect();
            cross_entropy_sum(&logits.index_select(&idx, 0).unwrap(), &Tensor::new(tk.as_slice(), &Device::Cpu).unwrap())
                .unwrap().to_scalar::<f32>().unwrap()
        };
        prop_assert!((loss - want).abs() <= 1e-5 * (1.0 + want.abs()), "{} vs {}", loss, want);
        let h = rand(&[n, 6], seed ^ 1, DType::F32).unwrap();
        let w = rand(&[v, 6], seed ^ 2, DType::F32).unwrap();
        let targets = Tensor::new(tg.as_slice(), &Device::Cpu).unwrap();
        let a = linear_cross_entropy_sum(&h, &w, &targets, chunk).unwrap().to_scalar::<f32>().unwrap();
        let b = linear_cross_entropy_sum(&h, &w, &targets, n).unwrap().to_scalar::<f32>().unwrap();
        prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "chunk {}: {} vs {}", chunk, a, b);
        if kept.is_empty() {
            prop_assert_eq!(a, 0.0);
        }
    }
}
