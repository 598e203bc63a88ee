//! Deterministic splits: train/validation by a stable hash of the example id, and k-fold
//! assignment for cross-validation.
//!
//! Everything here is a pure function of the example ids and the seed: no Rust `RandomState`,
//! no platform-dependent widths, so the same data lands in the same split on every machine and
//! every run. Exact duplicates share an id and therefore always share a split.

use crate::error::{DataError, Result};
use crate::record::{Example, Record};

/// The FNV-1a 64-bit offset basis: the hash of no bytes, where [`fnv1a64_continue`] starts.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_continue(FNV_OFFSET, bytes)
}

/// Folds `bytes` into the FNV-1a hash `h`: `fnv1a64_continue(fnv1a64(a), b) == fnv1a64(a ++ b)`,
/// for hashing a stream of pieces without joining them.
pub fn fnv1a64_continue(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The `fmix64` finalizer of MurmurHash3: a bijection on `u64` that spreads every input bit over
/// every output bit (FNV-1a alone has weak low bits, which `% k` would expose).
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// The crate's stable hash: `mix64(fnv1a64(bytes))`. Same value on every platform and run.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    mix64(fnv1a64(bytes))
}

/// Canonical, unambiguous byte encoding of a record: a shape tag, then every string as a
/// little-endian `u64` length followed by its UTF-8 bytes (roles as their lowercase names).
pub fn canonical_bytes(record: &Record) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    match record {
        Record::Text { text } => {
            out.push(b'T');
            put(&mut out, text);
        }
        Record::PromptCompletion { prompt, completion } => {
            out.push(b'P');
            put(&mut out, prompt);
            put(&mut out, completion);
        }
        Record::Conversation { messages } => {
            out.push(b'C');
            out.extend_from_slice(&(messages.len() as u64).to_le_bytes());
            for m in messages {
                put(&mut out, m.role.as_str());
                put(&mut out, &m.content);
            }
        }
    }
    out
}

/// The id of a record: [`stable_hash`] of its [`canonical_bytes`]. Depends on content only, not
/// on the file or row it came from.
pub fn record_id(record: &Record) -> u64 {
    stable_hash(&canonical_bytes(record))
}

/// The per-example hash used for split decisions: the id re-mixed with the seed.
fn seeded(id: u64, seed: u64) -> u64 {
    mix64(id ^ mix64(seed ^ 0x9e37_79b9_7f4a_7c15))
}

/// A train/validation partition; both halves keep the input order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
}

fn check_fraction(fraction: f64) -> Result<()> {
    if (0.0..=1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(DataError::InvalidConfig {
            setting: "validation fraction",
            expected: "a number in [0, 1]",
            got: fraction.to_string(),
        })
    }
}

/// Whether the example with this id goes to validation: its seeded hash, read as a uniform
/// number in `[0, 1)` (top 53 bits), is below `fraction`.
pub fn is_validation(id: u64, fraction: f64, seed: u64) -> bool {
    let u = (seeded(id, seed) >> 11) as f64 / (1u64 << 53) as f64;
    u < fraction
}

/// Deterministic train/validation split: each example goes to validation with probability
/// `fraction`, decided by [`is_validation`] on its id. Errors when `fraction` is outside `[0, 1]`.
pub fn train_validation_split(
    examples: impl IntoIterator<Item = Example>,
    fraction: f64,
    seed: u64,
) -> Result<Split> {
    check_fraction(fraction)?;
    let mut split = Split::default();
    for ex in examples {
        if is_validation(ex.id, fraction, seed) {
            split.validation.push(ex);
        } else {
            split.train.push(ex);
        }
    }
    Ok(split)
}

fn check_k(k: usize) -> Result<()> {
    if k >= 1 {
        Ok(())
    } else {
        Err(DataError::InvalidConfig {
            setting: "number of folds k",
            expected: "at least 1",
            got: k.to_string(),
        })
    }
}

/// The fold (in `0..k`) of the example with this id: seeded hash `% k`. Panics if `k == 0`.
pub fn fold_of(id: u64, k: usize, seed: u64) -> usize {
    assert!(k > 0, "fold_of: k must be at least 1");
    (seeded(id, seed) % k as u64) as usize
}

/// Assigns every example to one of `k` folds by [`fold_of`]; returns the `k` folds, each in input
/// order. Folds are disjoint and together hold every example.
pub fn k_fold(
    examples: impl IntoIterator<Item = Example>,
    k: usize,
    seed: u64,
) -> Result<Vec<Vec<Example>>> {
    check_k(k)?;
    let mut folds = vec![Vec::new(); k];
    for ex in examples {
        folds[fold_of(ex.id, k, seed)].push(ex);
    }
    Ok(folds)
}

/// The cross-validation split for one fold: `validation` is fold `fold`, `train` is all others.
pub fn fold_split(
    examples: impl IntoIterator<Item = Example>,
    k: usize,
    fold: usize,
    seed: u64,
) -> Result<Split> {
    check_k(k)?;
    if fold >= k {
        return Err(DataError::InvalidConfig {
            setting: "fold index",
            expected: "an index below k",
            got: format!("{fold} with k = {k}"),
        });
    }
    let mut split = Split::default();
    for ex in examples {
        if fold_of(ex.id, k, seed) == fold {
            split.validation.push(ex);
        } else {
            split.train.push(ex);
        }
    }
    Ok(split)
}
