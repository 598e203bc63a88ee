//! `rope_freqs.weight`: Llama 3.1-style rope scaling as llama.cpp writes it
//! (`LlamaModel.generate_extra_tensors`, and whet's own [`crate::export`]): one factor per rotary
//! pair that the pair's frequency is divided by, and no scaling keys in the metadata.
//!
//! [`recover_llama3`] finds a `rope_scaling` of type `llama3` that gives those factors;
//! [`GgufFile::check_rope_freqs`] then recomputes whet's own frequencies from the finished
//! config ([`Config::inv_freq`]) and refuses the file unless they are the file's, divided by the
//! file's factors, within [`REL_TOL`].
//!
//! Per pair `i` of a head of size `d` at base `b`, with wavelength `w = 2 pi b^(2i/d)` and the
//! original context `L`, the factor is 1 when `w < L / high`, `factor` when `w > L / low`, and
//! `1 / ((1 - s) / factor + s)` with `s = (L / w - low) / (high - low)` between. So `factor` is
//! the largest factor; each pair in the ramp gives one `s`, linear in `1 / w`:
//! `s = (L / (high - low)) / w - low / (high - low)`. With `low = 1` (every Llama 3.x release),
//! two or more ramp pairs fix `high` and `L` (least squares); one ramp pair fixes `L` with
//! `high = 4`; with none, `high = 4` and `L` is the largest power of two the bands allow (any `L`
//! there gives the same factors).

use super::GgufFile;
use crate::config::{Config, RopeKind, RopeParameters, RopeScaling};
use crate::error::{Error, Result};

/// The tensor's name.
pub(super) const ROPE_FREQS: &str = "rope_freqs.weight";

/// How close whet's recomputed factors must be to the file's, relative.
pub(super) const REL_TOL: f64 = 1e-5;

/// Llama 3 rope scaling as recovered from its factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Llama3 {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl Llama3 {
    pub(super) fn kind(self) -> RopeKind {
        RopeKind::Llama3 {
            factor: self.factor,
            low_freq_factor: self.low_freq_factor,
            high_freq_factor: self.high_freq_factor,
            original_max_position_embeddings: self.original_max_position_embeddings,
        }
    }
}

/// The wavelength of each rotary pair of a head of `head_dim` at rope base `base`.
fn wavelengths(head_dim: usize, base: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 2.0 * std::f64::consts::PI * base.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

/// llama.cpp's factors for `p` (f64), one per wavelength.
fn factors_of(p: Llama3, wavelengths: &[f64]) -> Vec<f64> {
    let old = p.original_max_position_embeddings as f64;
    let (low, high) = (p.low_freq_factor, p.high_freq_factor);
    wavelengths
        .iter()
        .map(|&w| {
            if w < old / high {
                1.0
            } else if w > old / low {
                p.factor
            } else {
                let s = (old / w - low) / (high - low);
                1.0 / ((1.0 - s) / p.factor + s)
            }
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= REL_TOL * b.abs().max(1.0)
}

/// `x` rounded to `digits` decimals.
fn snap(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// The llama3 rope scaling whose factors are `factors` (one per rotary pair of a head of
/// `head_dim` at base `base`), or `None` when every factor is 1. `Err` says why the factors are
/// not llama3's.
pub(super) fn recover_llama3(
    factors: &[f32],
    head_dim: usize,
    base: f64,
) -> std::result::Result<Option<Llama3>, String> {
    let r: Vec<f64> = factors.iter().map(|&x| f64::from(x)).collect();
    if let Some(i) = r
        .iter()
        .position(|&x| !(x.is_finite() && x >= 1.0 - REL_TOL))
    {
        return Err(format!(
            "factor {} at pair {i}: llama3 rope divides frequencies by factors >= 1",
            r[i]
        ));
    }
    let factor = r.iter().copied().fold(1.0, f64::max);
    if close(factor, 1.0) {
        return Ok(None);
    }
    let w = wavelengths(head_dim, base);
    // Each pair is unscaled (0), in the ramp (1) or scaled by the full factor (2); wavelengths
    // grow with the pair index, so the classes must too.
    let class: Vec<u8> = r
        .iter()
        .map(|&x| {
            if close(x, 1.0) {
                0
            } else if close(x, factor) {
                2
            } else {
                1
            }
        })
        .collect();
    if let Some(i) = (1..r.len()).find(|&i| class[i] < class[i - 1] || r[i] < r[i - 1] - REL_TOL) {
        return Err(format!(
            "factors {} then {} at pairs {} and {i}: llama3 rope factors grow with the wavelength",
            r[i - 1],
            r[i],
            i - 1
        ));
    }
    // `s` of each ramp pair, against 1 / wavelength.
    let ramp: Vec<(f64, f64)> = (0..r.len())
        .filter(|&i| class[i] == 1)
        .map(|i| {
            (
                1.0 / w[i],
                (1.0 / r[i] - 1.0 / factor) / (1.0 - 1.0 / factor),
            )
        })
        .collect();
    let low = 1.0;
    let (high, old) = match ramp.len() {
        0 => {
            let high = 4.0;
            // Unscaled: w < old / high; scaled: w > old / low.
            let above = (0..r.len())
                .filter(|&i| class[i] == 0)
                .map(|i| w[i] * high)
                .fold(0.0, f64::max);
            let below = (0..r.len())
                .filter(|&i| class[i] == 2)
                .map(|i| w[i] * low)
                .fold(f64::INFINITY, f64::min);
            if above >= below {
                return Err(format!(
                    "no pair in the ramp, and no original context L with (longest unscaled wavelength) {:.4} < L / 4 and L < {below:.4} (shortest scaled wavelength)",
                    above / high
                ));
            }
            let mut old = 1.0f64;
            while old * 2.0 < below {
                old *= 2.0;
            }
            if old <= above {
                old = (above + below) / 2.0;
            }
            (high, old)
        }
        1 => {
            let (x, s) = ramp[0];
            let high = 4.0;
            (high, (1.0 + s * (high - low)) / x)
        }
        n => {
            // Least squares s = a x + b; then high = low - 1 / b... with low = 1:
            // b = -low / (high - low), a = L / (high - low).
            let n = n as f64;
            let (sx, sy) = ramp
                .iter()
                .fold((0.0, 0.0), |(sx, sy), &(x, y)| (sx + x, sy + y));
            let (mx, my) = (sx / n, sy / n);
            let (sxx, sxy) = ramp.iter().fold((0.0, 0.0), |(sxx, sxy), &(x, y)| {
                (sxx + (x - mx) * (x - mx), sxy + (x - mx) * (y - my))
            });
            let a = sxy / sxx;
            let b = my - a * mx;
            if !(a > 0.0 && b < 0.0 && a.is_finite()) {
                return Err(format!(
                    "the ramp's factors do not follow llama3's smooth interpolation (fit s = {a:.4e} / wavelength + {b:.4})"
                ));
            }
            let high = low - low / b;
            (high, a * (high - low))
        }
    };
    if !((1.0..1e12).contains(&old) && high > low) {
        return Err(format!(
            "no llama3 parameters fit (high_freq_factor {high}, original context {old})"
        ));
    }
    // The values a config would hold: the context an integer, the factors with as few decimals
    // as still give the same factors.
    let old = old.round() as usize;
    let mut best = None;
    'search: for digits in 0..=12 {
        for df in 0..=digits {
            let candidate = Llama3 {
                factor: snap(factor, df),
                low_freq_factor: low,
                high_freq_factor: snap(high, digits - df),
                original_max_position_embeddings: old,
            };
            let fits = factors_of(candidate, &w)
                .iter()
                .zip(&r)
                .all(|(&g, &want)| close(g, want));
            if fits {
                best = Some(candidate);
                break 'search;
            }
        }
    }
    best.map(Some).ok_or_else(|| {
        format!(
            "llama3 rope with factor {factor}, low_freq_factor 1, high_freq_factor {high:.6}, original context {old} (the closest fit) does not give these factors"
        )
    })
}

impl GgufFile {
    /// The llama3 rope scaling a llama file's `rope_freqs.weight` encodes (`None` without the
    /// tensor, or when every factor is 1), for a head of `head_dim` at base `theta`.
    pub(super) fn rope_freqs_llama3(&self, head_dim: usize, theta: f64) -> Result<Option<Llama3>> {
        let Some(entry) = self.tensor(ROPE_FREQS) else {
            return Ok(None);
        };
        if entry.shape != [head_dim / 2] {
            return Err(Error::GgufTensor {
                path: self.path.clone(),
                tensor: ROPE_FREQS.into(),
                expected: format!("shape [{}] (one factor per rotary pair)", head_dim / 2),
                found: format!("shape {:?}", entry.shape),
            });
        }
        let factors = self.dequantize_entry(entry)?;
        recover_llama3(&factors, head_dim, theta).map_err(|found| Error::GgufTensor {
            path: self.path.clone(),
            tensor: ROPE_FREQS.into(),
            expected: "Llama 3.1-style rope factors (1 for short wavelengths, the scaling factor for long ones, a smooth ramp between)".into(),
            found,
        })
    }

    /// Refuses `cfg` (of a llama file) unless whet's own frequencies for it
    /// ([`Config::inv_freq`]) are the plain ones divided by the file's `rope_freqs.weight`, pair
    /// by pair, within [`REL_TOL`].
    pub(super) fn check_rope_freqs(&self, cfg: &Config) -> Result<()> {
        // Other architectures do not read the tensor: `plan` refuses it there.
        if self.tensor(ROPE_FREQS).is_none() || self.arch()? != super::GgufArch::Llama {
            return Ok(());
        }
        let factors = self.dequantize(ROPE_FREQS)?;
        let mut plain = cfg.clone();
        plain.rope_scaling = None;
        plain.rope_parameters = Some(RopeParameters::One(crate::config::RopeScaling {
            rope_theta: Some(cfg.rope_base()),
            partial_rotary_factor: None,
            kind: RopeKind::Default,
        }));
        let whet: Vec<f64> = plain
            .inv_freq()
            .iter()
            .zip(cfg.inv_freq())
            .map(|(&p, s)| f64::from(p) / f64::from(s))
            .collect();
        let bad = factors
            .iter()
            .zip(&whet)
            .position(|(&f, &g)| (g - f64::from(f)).abs() > REL_TOL * f64::from(f).abs());
        if let Some(i) = bad.or((factors.len() != whet.len()).then_some(whet.len())) {
            return Err(Error::GgufTensor {
                path: self.path.clone(),
                tensor: ROPE_FREQS.into(),
                expected: format!(
                    "the factors whet's rope ({:?}, recovered from this tensor) divides each frequency by, within {REL_TOL:e} relative",
                    cfg.rope_kind()
                ),
                found: format!(
                    "pair {i}: {} in the file, {} from the recovered config",
                    factors.get(i).copied().unwrap_or(f32::NAN),
                    whet.get(i).copied().unwrap_or(f64::NAN)
                ),
            });
        }
        Ok(())
    }
}

/// Phi-3's LongRoPE factors as llama.cpp's `Phi3MiniModel.generate_extra_tensors` writes them:
/// `long_factor`, then `short_factor`, one per rotated pair.
pub const PHI3_ROPE_FACTORS: [&str; 2] = ["rope_factors_long.weight", "rope_factors_short.weight"];

impl GgufFile {
    /// Phi-3's LongRoPE from the two factor tensors (none: `None`); `phi3.rope.scaling.attn_factor`
    /// becomes `attention_factor` only where it differs from the one transformers derives.
    pub(super) fn phi3_longrope(
        &self,
        head_dim: usize,
        partial_rotary_factor: Option<f64>,
    ) -> Result<Option<RopeScaling>> {
        let [long_name, short_name] = PHI3_ROPE_FACTORS;
        let (long, short) = match (self.tensor(long_name), self.tensor(short_name)) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => (self.dequantize(long_name)?, self.dequantize(short_name)?),
            (l, _) => {
                let missing = if l.is_none() { long_name } else { short_name };
                return Err(Error::GgufTensor {
                    path: self.path.clone(),
                    tensor: missing.to_string(),
                    expected: "present: LongRoPE needs both factor tensors".into(),
                    found: "no such tensor in the file".into(),
                });
            }
        };
        let pairs = (head_dim as f64 * partial_rotary_factor.unwrap_or(1.0)) as usize / 2;
        for (name, v) in [(long_name, &long), (short_name, &short)] {
            if v.len() != pairs || v.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(Error::GgufTensor {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    expected: format!("{pairs} finite factors > 0, one per rotated pair"),
                    found: format!("{} values", v.len()),
                });
            }
        }
        let attn_key = "phi3.rope.scaling.attn_factor";
        let attention_factor = match self.opt_f64(attn_key)? {
            Some(a) if !(a.is_finite() && a > 0.0) => {
                return Err(self.bad(attn_key, "a finite number > 0", a.to_string()));
            }
            Some(a) => {
                let ctx = self.opt_u64("phi3.context_length")?.unwrap_or(0) as f64;
                let original = self
                    .opt_u64("phi3.rope.scaling.original_context_length")?
                    .unwrap_or(4096) as f64;
                let scale = ctx / original;
                let derived = if scale > 1.0 {
                    (1.0 + scale.ln() / original.ln()).sqrt()
                } else {
                    1.0
                };
                ((a - derived).abs() > 1e-6 * derived).then_some(a)
            }
            None => None,
        };
        let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect();
        Ok(Some(RopeScaling {
            rope_theta: None,
            partial_rotary_factor: None,
            kind: RopeKind::LongRope {
                short_factor: widen(short),
                long_factor: widen(long),
                factor: None,
                attention_factor,
                original_max_position_embeddings: None,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama31() -> Llama3 {
        Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    fn as_f32(v: Vec<f64>) -> Vec<f32> {
        v.into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn llama_3_1_and_3_2_parameters_come_back_from_their_factors() {
        // Llama 3.1 8B (head 128, base 500000, factor 8) and Llama 3.2 1B (factor 32).
        let w = wavelengths(128, 500_000.0);
        for factor in [8.0, 32.0] {
            let p = Llama3 {
                factor,
                ..llama31()
            };
            let got = recover_llama3(&as_f32(factors_of(p, &w)), 128, 500_000.0).unwrap();
            assert_eq!(got, Some(p));
        }
        // Other ramps: low 1 is assumed, high and the context are solved for.
        let p = Llama3 {
            factor: 16.0,
            high_freq_factor: 2.5,
            original_max_position_embeddings: 4096,
            ..llama31()
        };
        let got = recover_llama3(&as_f32(factors_of(p, &w)), 128, 500_000.0).unwrap();
        assert_eq!(got, Some(p));
    }

    #[test]
    fn factors_without_a_ramp_give_a_config_with_the_same_factors() {
        // The tiny golden models: head 16 at base 5e5 puts no pair in the ramp.
        let w = wavelengths(16, 500_000.0);
        let p = Llama3 {
            factor: 32.0,
            original_max_position_embeddings: 32,
            ..llama31()
        };
        let factors = as_f32(factors_of(p, &w));
        let got = recover_llama3(&factors, 16, 500_000.0).unwrap().unwrap();
        assert_eq!(got, p, "32 is the power of two the bands allow");
        assert_eq!(as_f32(factors_of(got, &w)), factors);
        assert_eq!(recover_llama3(&[1.0; 8], 16, 500_000.0), Ok(None));
    }

    #[test]
    fn factors_that_are_not_llama3s_are_refused() {
        let w = wavelengths(128, 500_000.0);
        let mut factors = as_f32(factors_of(llama31(), &w));
        factors[3] = 5.0; // a short wavelength scaled, then unscaled again
        let err = recover_llama3(&factors, 128, 500_000.0).unwrap_err();
        assert!(err.contains("grow with the wavelength"), "{err}");
        let err = recover_llama3(&[1.0, 0.5, 2.0], 6, 10_000.0).unwrap_err();
        assert!(err.contains(">= 1"), "{err}");
        // A ramp that is not llama3's interpolation (here: linear in the pair index).
        let mut factors = as_f32(factors_of(llama31(), &w));
        let ramp: Vec<usize> = (0..64)
            .filter(|&i| factors[i] > 1.0 && factors[i] < 8.0)
            .collect();
        for (k, &i) in ramp.iter().enumerate() {
            factors[i] = 1.0 + 7.0 * (k + 1) as f32 / (ramp.len() + 1) as f32;
        }
        assert!(recover_llama3(&factors, 128, 500_000.0).is_err());
    }
}
