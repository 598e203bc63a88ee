//! Deduplication: exact (hash of the normalized record) and near-duplicate (MinHash over word
//! shingles with LSH banding), plus a train/validation leakage check. [`token_shingles`] and
//! [`MinHasher::signature_of_ids`] are the same MinHash over token ids, for tokenized documents
//! (whet-tokenize's store dedup).
//!
//! All hashing is deterministic ([`stable_hash`] and seeded [`mix64`] permutations), so the same
//! input and config remove the same examples on every run and platform. The first occurrence of
//! a duplicate group (in input order) is kept.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::record::{Example, Origin, Record};
use crate::split::{mix64, stable_hash};

/// Dedup settings. `Default` is exact + near at Jaccard 0.8, 128 permutations, 3-word shingles
/// (5-token shingles for token ids).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DedupConfig {
    /// Remove examples whose normalized content equals an earlier one's.
    pub exact: bool,
    /// Remove examples whose estimated Jaccard similarity to an earlier one is `>= threshold`.
    pub near: bool,
    /// Jaccard similarity threshold for near duplicates, in `(0, 1]`.
    pub threshold: f64,
    /// MinHash permutations (signature length).
    pub num_perm: usize,
    /// LSH bands; `0` picks the bands/rows split that best separates pairs around `threshold`.
    pub bands: usize,
    /// Words per shingle.
    pub shingle_words: usize,
    /// Token ids per shingle, for tokenized documents (about as long as 3 words).
    pub shingle_tokens: usize,
    /// Seed of the MinHash permutations.
    pub seed: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            exact: true,
            near: true,
            threshold: 0.8,
            num_perm: 128,
            bands: 0,
            shingle_words: 3,
            shingle_tokens: 5,
            seed: 0x5eed,
        }
    }
}

impl DedupConfig {
    /// Checks the threshold, `num_perm`, the shingle lengths and `bands`.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting, expected, got: String| {
            Err(DataError::InvalidConfig {
                setting,
                expected,
                got,
            })
        };
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad(
                "dedup threshold",
                "a Jaccard similarity in (0, 1]",
                self.threshold.to_string(),
            );
        }
        if self.num_perm == 0 {
            return bad("dedup num_perm", "at least 1", "0".into());
        }
        if self.shingle_words == 0 {
            return bad("dedup shingle_words", "at least 1", "0".into());
        }
        if self.shingle_tokens == 0 {
            return bad("dedup shingle_tokens", "at least 1", "0".into());
        }
        if self.bands > self.num_perm {
            return bad(
                "dedup bands",
                "0 (automatic) or at most num_perm",
                format!("{} with num_perm = {}", self.bands, self.num_perm),
            );
        }
        Ok(())
    }

    /// The `(bands, rows)` LSH layout this config uses.
    pub fn lsh_layout(&self) -> (usize, usize) {
        if self.bands > 0 {
            (self.bands, self.num_perm / self.bands)
        } else {
            optimal_bands(self.threshold, self.num_perm)
        }
    }
}

/// Picks `(bands, rows)` for a threshold: the most rows per band (fewest false candidates) such
/// that a pair exactly at `threshold` still becomes a candidate with probability >= 0.95
/// (`1 - (1 - t^rows)^bands`). Candidates are then verified against the threshold, so the LSH
/// stage errs towards recall. For 128 permutations at 0.8 this is 18 bands of 7 rows.
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let num_perm = num_perm.max(1);
    for rows in (1..=num_perm).rev() {
        let bands = num_perm / rows;
        let p = 1.0 - (1.0 - threshold.powi(rows as i32)).powi(bands as i32);
        if p >= 0.95 {
            return (bands, rows);
        }
    }
    (num_perm, 1)
}

/// Lower-cases and replaces every run of non-alphanumeric characters by one space, trimmed:
/// `"Hello,  World!"` -> `"hello world"`.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.extend(c.to_lowercase());
        } else {
            pending_space = true;
        }
    }
    out
}

/// Hash of the normalized record: shape, then each normalized field (and each message's role).
/// Two records with the same key are exact duplicates.
pub fn exact_key(record: &Record) -> u64 {
    let mut buf = Vec::new();
    let mut put = |s: &str| {
        let n = normalize(s);
        buf.extend_from_slice(&(n.len() as u64).to_le_bytes());
        buf.extend_from_slice(n.as_bytes());
    };
    match record {
        Record::Text { text } => {
            put("text");
            put(text);
        }
        Record::PromptCompletion { prompt, completion } => {
            put("prompt-completion");
            put(prompt);
            put(completion);
        }
        Record::Conversation { messages } => {
            put("conversation");
            for m in messages {
                put(m.role.as_str());
                put(&m.content);
            }
        }
    }
    stable_hash(&buf)
}

/// The text near-duplicate detection compares: every text field, in order, joined by newlines.
pub fn comparable_text(record: &Record) -> String {
    match record {
        Record::Text { text } => text.clone(),
        Record::PromptCompletion { prompt, completion } => format!("{prompt}\n{completion}"),
        Record::Conversation { messages } => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// Hashes of the `k`-word shingles of the normalized text (sorted, deduplicated). A text with
/// fewer than `k` words is one shingle; an empty text has none.
pub fn shingles(text: &str, k: usize) -> Vec<u64> {
    let norm = normalize(text);
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    let k = k.max(1);
    let mut out: Vec<u64> = if words.is_empty() {
        Vec::new()
    } else if words.len() <= k {
        vec![stable_hash(words.join(" ").as_bytes())]
    } else {
        words
            .windows(k)
            .map(|w| stable_hash(w.join(" ").as_bytes()))
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Hashes of the windows of `k` consecutive token ids (sorted, deduplicated). Fewer than `k`
/// ids are one shingle; no ids, none.
pub fn token_shingles(ids: &[u32], k: usize) -> Vec<u64> {
    let mut bytes = Vec::new();
    let mut hash = |w: &[u32]| {
        bytes.clear();
        bytes.extend(w.iter().flat_map(|i| i.to_le_bytes()));
        stable_hash(&bytes)
    };
    let k = k.max(1);
    let mut out: Vec<u64> = if ids.is_empty() {
        Vec::new()
    } else if ids.len() <= k {
        vec![hash(ids)]
    } else {
        ids.windows(k).map(&mut hash).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Exact Jaccard similarity of two texts' shingle sets (1.0 for two empty texts).
pub fn jaccard(a: &str, b: &str, k: usize) -> f64 {
    let (a, b) = (shingles(a, k), shingles(b, k));
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    inter as f64 / (a.len() + b.len() - inter) as f64
}

/// MinHash signatures with deterministic, seeded permutations `h_i(x) = mix64(x ^ seed_i)`.
#[derive(Debug, Clone)]
pub struct MinHasher {
    seeds: Vec<u64>,
    shingle_words: usize,
}

impl MinHasher {
    pub fn new(num_perm: usize, shingle_words: usize, seed: u64) -> Self {
        let seeds = (0..num_perm as u64)
            .map(|i| mix64(seed ^ mix64(i.wrapping_add(0x9e37_79b9_7f4a_7c15))))
            .collect();
        MinHasher {
            seeds,
            shingle_words,
        }
    }

    /// The signature of a text (low 32 bits of each minimum); `None` when it has no words.
    pub fn signature(&self, text: &str) -> Option<Vec<u32>> {
        self.signature_of_shingles(&shingles(text, self.shingle_words))
    }

    /// The signature of token ids over their `shingle_tokens`-id shingles ([`token_shingles`]);
    /// `None` when there are no ids.
    pub fn signature_of_ids(&self, ids: &[u32], shingle_tokens: usize) -> Option<Vec<u32>> {
        self.signature_of_shingles(&token_shingles(ids, shingle_tokens))
    }

    /// The signature of a set of shingle hashes; `None` for the empty set.
    pub fn signature_of_shingles(&self, shingles: &[u64]) -> Option<Vec<u32>> {
        if shingles.is_empty() {
            return None;
        }
        Some(
            self.seeds
                .iter()
                .map(|&s| {
                    shingles
                        .iter()
                        .map(|&x| mix64(x ^ s))
                        .min()
                        .unwrap_or(u64::MAX) as u32
                })
                .collect(),
        )
    }
}

/// The LSH bucket keys of a signature: one per band, the hash of the band's index and its
/// `rows` values. Two signatures are candidates when they share a key.
pub fn band_keys(sig: &[u32], bands: usize, rows: usize) -> impl Iterator<Item = u64> + '_ {
    let mut bytes = Vec::with_capacity(8 + rows * 4);
    (0..bands).map(move |b| {
        bytes.clear();
        bytes.extend_from_slice(&(b as u64).to_le_bytes());
        for v in &sig[b * rows..(b + 1) * rows] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        stable_hash(&bytes)
    })
}

/// The fraction of equal positions: an unbiased estimate of the Jaccard similarity.
pub fn estimate_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// An LSH index over signatures: `bands` buckets per signature.
struct LshIndex {
    bands: usize,
    rows: usize,
    num_perm: usize,
    buckets: HashMap<u64, Vec<u32>>,
    signatures: Vec<u32>,
    count: u32,
}

impl LshIndex {
    fn new(cfg: &DedupConfig) -> Self {
        let (bands, rows) = cfg.lsh_layout();
        LshIndex {
            bands,
            rows,
            num_perm: cfg.num_perm,
            buckets: HashMap::new(),
            signatures: Vec::new(),
            count: 0,
        }
    }

    fn band_keys<'a>(&self, sig: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
        band_keys(sig, self.bands, self.rows)
    }

    fn sig(&self, i: u32) -> &[u32] {
        let i = i as usize * self.num_perm;
        &self.signatures[i..i + self.num_perm]
    }

    /// The most similar indexed signature with similarity `>= threshold`, ties to the earliest.
    fn best_match(&self, sig: &[u32], threshold: f64) -> Option<(u32, f64)> {
        let mut cands: Vec<u32> = self
            .band_keys(sig)
            .filter_map(|k| self.buckets.get(&k))
            .flatten()
            .copied()
            .collect();
        cands.sort_unstable();
        cands.dedup();
        let mut best: Option<(u32, f64)> = None;
        for c in cands {
            let s = estimate_jaccard(sig, self.sig(c));
            if s >= threshold && best.is_none_or(|(_, bs)| s > bs) {
                best = Some((c, s));
            }
        }
        best
    }

    /// Adds a signature; returns its index.
    fn insert(&mut self, sig: &[u32]) -> u32 {
        let idx = self.count;
        let keys: Vec<u64> = self.band_keys(sig).collect();
        for k in keys {
            self.buckets.entry(k).or_default().push(idx);
        }
        self.signatures.extend_from_slice(sig);
        self.count += 1;
        idx
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateKind {
    Exact,
    Near,
}

/// A removed example and the kept one it duplicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    pub id: u64,
    pub origin: Origin,
    pub duplicate_of: u64,
    pub duplicate_of_origin: Origin,
    pub kind: DuplicateKind,
    /// Estimated Jaccard similarity (1.0 for exact duplicates).
    pub similarity: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DedupReport {
    pub input: usize,
    pub kept: usize,
    pub removed: Vec<Removed>,
}

/// Removes exact and/or near duplicates, keeping the first of each group in input order.
pub fn dedup(
    examples: impl IntoIterator<Item = Example>,
    cfg: &DedupConfig,
) -> Result<(Vec<Example>, DedupReport)> {
    cfg.validate()?;
    let hasher = MinHasher::new(cfg.num_perm, cfg.shingle_words, cfg.seed);
    let mut index = LshIndex::new(cfg);
    let mut exact: HashMap<u64, usize> = HashMap::new();
    // kept[i] for LSH entry i
    let mut lsh_to_kept: Vec<usize> = Vec::new();
    let mut kept: Vec<Example> = Vec::new();
    let mut report = DedupReport::default();
    for ex in examples {
        report.input += 1;
        let removed = |of: &Example, kind, similarity| Removed {
            id: ex.id,
            origin: ex.origin.clone(),
            duplicate_of: of.id,
            duplicate_of_origin: of.origin.clone(),
            kind,
            similarity,
        };
        let key = cfg.exact.then(|| exact_key(&ex.record));
        if let Some(&k) = key.as_ref().and_then(|k| exact.get(k)) {
            report
                .removed
                .push(removed(&kept[k], DuplicateKind::Exact, 1.0));
            continue;
        }
        let sig = if cfg.near {
            hasher.signature(&comparable_text(&ex.record))
        } else {
            None
        };
        if let Some(sig) = &sig
            && let Some((j, s)) = index.best_match(sig, cfg.threshold)
        {
            report.removed.push(removed(
                &kept[lsh_to_kept[j as usize]],
                DuplicateKind::Near,
                s,
            ));
            continue;
        }
        if let Some(k) = key {
            exact.insert(k, kept.len());
        }
        if let Some(sig) = &sig {
            index.insert(sig);
            lsh_to_kept.push(kept.len());
        }
        kept.push(ex);
    }
    report.kept = kept.len();
    Ok((kept, report))
}

/// A validation example that also appears (exactly or nearly) in train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    pub validation_id: u64,
    pub validation_origin: Origin,
    pub train_id: u64,
    pub train_origin: Origin,
    pub similarity: f64,
}

/// Train/validation overlaps; every validation example appears at most once, in `exact` or
/// `near`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeakageReport {
    pub train: usize,
    pub validation: usize,
    pub exact: Vec<Overlap>,
    pub near: Vec<Overlap>,
}

impl LeakageReport {
    /// Fraction of validation examples that leak (exact or near).
    pub fn leaked_fraction(&self) -> f64 {
        if self.validation == 0 {
            0.0
        } else {
            (self.exact.len() + self.near.len()) as f64 / self.validation as f64
        }
    }
}

/// Reports validation examples that duplicate a train example, exactly (normalized content) or
/// nearly (MinHash/LSH at `cfg.threshold`). Uses `cfg.exact` / `cfg.near` to pick the checks.
pub fn leakage(
    train: &[Example],
    validation: &[Example],
    cfg: &DedupConfig,
) -> Result<LeakageReport> {
    cfg.validate()?;
    let hasher = MinHasher::new(cfg.num_perm, cfg.shingle_words, cfg.seed);
    let mut index = LshIndex::new(cfg);
    let mut lsh_to_train: Vec<usize> = Vec::new();
    let mut exact: HashMap<u64, usize> = HashMap::new();
    for (i, ex) in train.iter().enumerate() {
        if cfg.exact {
            exact.entry(exact_key(&ex.record)).or_insert(i);
        }
        if cfg.near
            && let Some(sig) = hasher.signature(&comparable_text(&ex.record))
        {
            index.insert(&sig);
            lsh_to_train.push(i);
        }
    }
    let mut report = LeakageReport {
        train: train.len(),
        validation: validation.len(),
        ..LeakageReport::default()
    };
    for v in validation {
        let overlap = |t: &Example, similarity| Overlap {
            validation_id: v.id,
            validation_origin: v.origin.clone(),
            train_id: t.id,
            train_origin: t.origin.clone(),
            similarity,
        };
        if cfg.exact
            && let Some(&t) = exact.get(&exact_key(&v.record))
        {
            report.exact.push(overlap(&train[t], 1.0));
            continue;
        }
        if cfg.near
            && let Some(sig) = hasher.signature(&comparable_text(&v.record))
            && let Some((j, s)) = index.best_match(&sig, cfg.threshold)
        {
            report
                .near
                .push(overlap(&train[lsh_to_train[j as usize]], s));
        }
    }
    Ok(report)
}
