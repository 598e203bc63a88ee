//! Near-duplicate removal and the train/validation leakage check over a token store, in memory
//! bounded by a budget whatever the number of documents (one bit per document aside).
//!
//! [`find_duplicates`] is the streaming form of `whet_data::dedup::dedup` on token ids:
//!
//! 1. every document's MinHash signature over its `shingle_tokens`-id shingles
//!    ([`MinHasher::signature_of_ids`]) goes to a signature file (`num_perm` u32 per document),
//!    and its LSH band keys (and, with `exact`, the hash of its ids) go to one of `P` partition
//!    files as `(key, document)` pairs; `P` is chosen so one partition fits half the budget;
//! 2. each partition alone is read, sorted, and walked key by key: the documents sharing a key
//!    are candidates, verified against the memory-mapped signatures (`estimate_jaccard >=
//!    threshold`) or, for the ids' hash, by comparing the ids.
//!
//! The rule: document `j` is dropped when some earlier document `i < j` shares a key with it and
//! is similar (or equal), whether or not `i` is itself dropped. Each partition adds drops and
//! never removes one, so the dropped set does not depend on `P` (nor on the budget). It differs
//! from the in-memory `dedup` (which compares with kept examples only) for chains alone: with `a ~
//! b ~ c` and `a` not similar to `c`, the in-memory pass keeps `c`, this one drops it; telling
//! them apart would need the pairs in document order, which do not fit the budget. Empty
//! documents have no shingles and are never dropped. A key shared by `m` mutually dissimilar
//! documents costs `m^2 / 2` comparisons; a group of copies costs `m` (each matches the first).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use whet_data::Origin;
use whet_data::dedup::{
    DedupConfig, LeakageReport, MinHasher, Overlap, band_keys, estimate_jaccard, token_shingles,
};
use whet_data::split::stable_hash;

use crate::error::{Error, Result};
use crate::store::Store;

/// One partition entry: the key, then the document (its top bit set for an exact-ids key).
type Entry = [u64; 2];
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();
const EXACT_KEY: u64 = 1 << 63;

/// The documents [`find_duplicates`] drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicates {
    /// Bit `d % 8` of byte `d / 8` is set when document `d` is dropped.
    pub dropped: Vec<u8>,
    /// Dropped documents whose ids equal an earlier document's (counted only with `cfg.exact`).
    pub exact: u64,
    /// The other dropped documents.
    pub near: u64,
    /// Partition files the keys were spread over.
    pub partitions: usize,
}

impl Duplicates {
    pub fn is_dropped(&self, doc: u64) -> bool {
        bit(&self.dropped, doc)
    }
}

/// Whether bit `i` of a bitmap (least significant bit first) is set.
pub fn bit(bits: &[u8], i: u64) -> bool {
    bits[(i / 8) as usize] >> (i % 8) & 1 == 1
}

fn set_bit(bits: &mut [u8], i: u64) {
    bits[(i / 8) as usize] |= 1 << (i % 8);
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// The hash that finds documents with equal ids: of their little-endian bytes, which on the
/// little-endian machines stores exist on (`Store::open` refuses others) are the ids in memory,
/// hashed in place rather than copied for every document.
fn ids_hash(ids: &[u32]) -> u64 {
    stable_hash(bytemuck::cast_slice(ids))
}

/// Signature and keys of one document.
struct Keyed {
    sig: Option<Vec<u32>>,
    exact: Option<u64>,
}

fn keyed(ids: &[u32], cfg: &DedupConfig, hasher: &MinHasher) -> Keyed {
    if ids.is_empty() {
        return Keyed {
            sig: None,
            exact: None,
        };
    }
    Keyed {
        sig: cfg
            .near
            .then(|| hasher.signature_of_ids(ids, cfg.shingle_tokens))
            .flatten(),
        exact: cfg.exact.then(|| ids_hash(ids)),
    }
}

/// Finds the documents of `store` that duplicate an earlier one (module docs: the rule), with
/// `cfg`'s checks and LSH layout, in about `memory_bytes` of memory besides the two bitmaps (two
/// bits per document). The signature and partition files go to the folder `scratch`, which must
/// not exist yet (it is created, and removed when done).
pub fn find_duplicates(
    store: &Store,
    cfg: &DedupConfig,
    memory_bytes: usize,
    scratch: &Path,
) -> Result<Duplicates> {
    cfg.validate()?;
    let n = store.documents();
    let bitmap_len = n.div_ceil(8) as usize;
    let mut dropped = vec![0u8; bitmap_len];
    let mut exact = vec![0u8; bitmap_len];
    let bands = cfg.lsh_layout().0;
    let keys_per_doc = if cfg.near { bands } else { 0 } + usize::from(cfg.exact);
    let memory_bytes = memory_bytes.max(1 << 16);
    let total = n as u128 * keys_per_doc as u128 * ENTRY_BYTES as u128;
    let partitions = total.div_ceil(memory_bytes as u128 / 2).max(1) as usize;
    // A new folder: what is removed afterwards is only what this function wrote.
    std::fs::create_dir(scratch).map_err(io(scratch, "create the folder"))?;
    let result = (|| {
        let (sigs, parts) = write_keys(store, cfg, memory_bytes, scratch, partitions)?;
        // Little-endian u32s; the map is page-aligned, so the cast never fails on alignment.
        let sigs: &[u32] = sigs.as_ref().map_or(&[], |m| bytemuck::cast_slice(&m[..]));
        let sig_of = |d: u64| {
            let at = d as usize * cfg.num_perm;
            &sigs[at..at + cfg.num_perm]
        };
        for path in &parts {
            let mut entries = read_entries(path)?;
            std::fs::remove_file(path).map_err(io(path, "remove"))?;
            entries.par_sort_unstable();
            let groups = entries.chunk_by(|a, b| a[0] == b[0] && a[1] >> 63 == b[1] >> 63);
            for group in groups.filter(|g| g.len() > 1) {
                let docs = group.iter().map(|e| e[1] & !EXACT_KEY);
                if group[0][1] & EXACT_KEY != 0 {
                    // Equal ids: compared, not trusted to the hash.
                    let docs: Vec<u64> = docs.collect();
                    for (k, &j) in docs.iter().enumerate().skip(1) {
                        if !bit(&exact, j)
                            && docs[..k]
                                .iter()
                                .any(|&i| store.doc(i).ids == store.doc(j).ids)
                        {
                            set_bit(&mut exact, j);
                            set_bit(&mut dropped, j);
                        }
                    }
                } else {
                    let docs: Vec<u64> = docs.collect();
                    for (k, &j) in docs.iter().enumerate().skip(1) {
                        if !bit(&dropped, j)
                            && docs[..k]
                                .iter()
                                .any(|&i| estimate_jaccard(sig_of(i), sig_of(j)) >= cfg.threshold)
                        {
                            set_bit(&mut dropped, j);
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    let removed = std::fs::remove_dir_all(scratch).map_err(io(scratch, "remove"));
    result.and(removed)?;
    let ones = |bits: &[u8]| bits.iter().map(|b| b.count_ones() as u64).sum::<u64>();
    let exact_count = ones(&exact);
    Ok(Duplicates {
        near: ones(&dropped) - exact_count,
        exact: exact_count,
        dropped,
        partitions,
    })
}

/// Pass 1: the signature file (mapped back, when `cfg.near`) and the partition files.
fn write_keys(
    store: &Store,
    cfg: &DedupConfig,
    memory_bytes: usize,
    scratch: &Path,
    partitions: usize,
) -> Result<(Option<Mmap>, Vec<PathBuf>)> {
    let n = store.documents();
    let hasher = MinHasher::new(cfg.num_perm, cfg.shingle_words, cfg.seed);
    let (bands, rows) = cfg.lsh_layout();
    let create = |path: &Path, capacity: usize| -> Result<BufWriter<File>> {
        let f = File::create(path).map_err(io(path, "create"))?;
        Ok(BufWriter::with_capacity(capacity, f))
    };
    // A quarter of the budget buffers the partition writers, at least 4 KiB each.
    let buffer = (memory_bytes / 4 / partitions).clamp(4 << 10, 1 << 20);
    let part_paths: Vec<PathBuf> = (0..partitions)
        .map(|p| scratch.join(format!("keys-{p:05}")))
        .collect();
    let mut parts = part_paths
        .iter()
        .map(|p| create(p, buffer))
        .collect::<Result<Vec<_>>>()?;
    let sig_path = scratch.join("signatures");
    let mut sig_file = if cfg.near && n > 0 {
        Some(create(&sig_path, 1 << 20)?)
    } else {
        None
    };
    // A quarter of the budget holds a chunk's signatures while it is hashed on all cores.
    let chunk = (memory_bytes / 4 / (cfg.num_perm * 4 + 64)).clamp(16, 1 << 16) as u64;
    let zeros = vec![0u32; cfg.num_perm];
    for start in (0..n).step_by(chunk as usize) {
        let end = (start + chunk).min(n);
        let keyed: Vec<Keyed> = (start..end)
            .into_par_iter()
            .map(|d| keyed(store.doc(d).ids, cfg, &hasher))
            .collect();
        for (d, k) in (start..end).zip(keyed) {
            let mut put = |key: u64, doc: u64| {
                let p = &part_paths[(key % partitions as u64) as usize];
                let w = &mut parts[(key % partitions as u64) as usize];
                w.write_all(&key.to_le_bytes())
                    .and_then(|()| w.write_all(&doc.to_le_bytes()))
                    .map_err(io(p, "write"))
            };
            if let Some(h) = k.exact {
                put(h, d | EXACT_KEY)?;
            }
            if let Some(sig) = &k.sig {
                for key in band_keys(sig, bands, rows) {
                    put(key, d)?;
                }
            }
            if let Some(w) = &mut sig_file {
                let sig = k.sig.as_deref().unwrap_or(&zeros);
                sig.iter()
                    .try_for_each(|v| w.write_all(&v.to_le_bytes()))
                    .map_err(io(&sig_path, "write"))?;
            }
        }
    }
    for (w, p) in parts.iter_mut().zip(&part_paths) {
        w.flush().map_err(io(p, "write"))?;
    }
    drop(parts);
    let sigs = match sig_file {
        Some(mut w) => {
            w.flush().map_err(io(&sig_path, "write"))?;
            drop(w);
            let f = File::open(&sig_path).map_err(io(&sig_path, "open"))?;
            // SAFETY: a scratch file of this function, written above and not modified again.
            Some(unsafe { Mmap::map(&f) }.map_err(io(&sig_path, "map"))?)
        }
        None => None,
    };
    Ok((sigs, part_paths))
}

fn read_entries(path: &Path) -> Result<Vec<Entry>> {
    let mut f = File::open(path).map_err(io(path, "open"))?;
    let len = f.metadata().map_err(io(path, "stat"))?.len() as usize;
    let mut entries: Vec<Entry> = vec![[0; 2]; len / ENTRY_BYTES];
    f.read_exact(bytemuck::cast_slice_mut(&mut entries))
        .map_err(io(path, "read"))?;
    Ok(entries)
}

/// A training document's match with validation document `v`.
struct Hit {
    v: usize,
    similarity: f64,
    /// The same ids.
    equal: bool,
}

/// Reports which `validation` documents (token ids, each with where it came from; the overlap's
/// `validation_id` is its index here) have an exact or near duplicate among the store's training
/// documents (`is_train`), as `whet_data::dedup::leakage` does for examples: equal ids are
/// exact; otherwise the most similar training document at `cfg.threshold` or above (ties to the
/// earliest) is near. A training overlap's `train_id` and `train_origin.row` are its document
/// index, `train_origin.file` the store's folder.
///
/// Memory holds the validation documents' shingles, signatures and keys; the training documents
/// are streamed, and only one sharing a shingle with some validation document is signed.
pub fn store_leakage(
    store: &Store,
    is_train: impl Fn(u64) -> bool + Sync,
    validation: &[(Origin, Vec<u32>)],
    cfg: &DedupConfig,
) -> Result<LeakageReport> {
    cfg.validate()?;
    let hasher = MinHasher::new(cfg.num_perm, cfg.shingle_words, cfg.seed);
    let (bands, rows) = cfg.lsh_layout();
    let mut shingle_set: HashSet<u64> = HashSet::new();
    let mut by_band: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut by_ids: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut sigs: Vec<Option<Vec<u32>>> = Vec::with_capacity(validation.len());
    for (v, (_, ids)) in validation.iter().enumerate() {
        let sh = token_shingles(ids, cfg.shingle_tokens);
        let sig = if cfg.near {
            hasher.signature_of_shingles(&sh)
        } else {
            None
        };
        if let Some(sig) = &sig {
            shingle_set.extend(&sh);
            for key in band_keys(sig, bands, rows) {
                by_band.entry(key).or_default().push(v);
            }
        }
        if cfg.exact && !ids.is_empty() {
            by_ids.entry(ids_hash(ids)).or_default().push(v);
        }
        sigs.push(sig);
    }
    // Per validation document: the first equal training document, and the most similar one.
    let mut exact: Vec<Option<u64>> = vec![None; validation.len()];
    let mut near: Vec<Option<(u64, f64)>> = vec![None; validation.len()];
    let n = store.documents();
    let mut train = 0usize;
    const CHUNK: u64 = 4096;
    for start in (0..n).step_by(CHUNK as usize) {
        let end = (start + CHUNK).min(n);
        // Per document: `None` when it is not a training one, else its hits.
        let found: Vec<Option<Vec<Hit>>> = (start..end)
            .into_par_iter()
            .map(|d| {
                if !is_train(d) {
                    return None;
                }
                let ids = store.doc(d).ids;
                let mut hits = Vec::new();
                if ids.is_empty() {
                    return Some(hits);
                }
                if let Some(vs) = by_ids.get(&ids_hash(ids)) {
                    hits.extend(
                        vs.iter()
                            .filter(|&&v| validation[v].1 == ids)
                            .map(|&v| Hit {
                                v,
                                similarity: 1.0,
                                equal: true,
                            }),
                    );
                }
                if !by_band.is_empty() {
                    let sh = token_shingles(ids, cfg.shingle_tokens);
                    if sh.iter().any(|s| shingle_set.contains(s))
                        && let Some(sig) = hasher.signature_of_shingles(&sh)
                    {
                        let mut cands: Vec<usize> = band_keys(&sig, bands, rows)
                            .filter_map(|k| by_band.get(&k))
                            .flatten()
                            .copied()
                            .collect();
                        cands.sort_unstable();
                        cands.dedup();
                        for v in cands {
                            let vs = sigs[v].as_deref().expect("indexed with a signature");
                            let s = estimate_jaccard(&sig, vs);
                            if s >= cfg.threshold {
                                hits.push(Hit {
                                    v,
                                    similarity: s,
                                    equal: false,
                                });
                            }
                        }
                    }
                }
                Some(hits)
            })
            .collect();
        for (d, hits) in (start..end).zip(found) {
            let Some(hits) = hits else { continue };
            train += 1;
            for Hit {
                v,
                similarity,
                equal,
            } in hits
            {
                if equal {
                    exact[v].get_or_insert(d);
                } else if near[v].is_none_or(|(_, best)| similarity > best) {
                    near[v] = Some((d, similarity));
                }
            }
        }
    }
    let mut report = LeakageReport {
        train,
        validation: validation.len(),
        ..LeakageReport::default()
    };
    let overlap = |v: usize, d: u64, similarity| Overlap {
        validation_id: v as u64,
        validation_origin: validation[v].0.clone(),
        train_id: d,
        train_origin: Origin {
            file: store.dir().to_path_buf(),
            row: d,
        },
        similarity,
    };
    for v in 0..validation.len() {
        if let Some(d) = exact[v] {
            report.exact.push(overlap(v, d, 1.0));
        } else if let Some((d, s)) = near[v] {
            report.near.push(overlap(v, d, s));
        }
    }
    Ok(report)
}
