//! A token store on disk: tokenized documents in shards, memory-mapped for reading, so a corpus
//! larger than memory is tokenized once and read back without loading it (`whet data prepare`).
//!
//! A store is a folder:
//!
//! - `manifest.json`: the format version, the fingerprint of what made it (tokenizer, settings,
//!   input files), and per shard its documents and tokens;
//! - per shard `shard-NNNNN.ids` (the documents' token ids, u32 little-endian, one after the
//!   other), `shard-NNNNN.mask` (one byte per token: 1 where the token is learned) and
//!   `shard-NNNNN.idx` (u64 little-endian offsets into the shard's tokens: document `d` is
//!   `offsets[d]..offsets[d + 1]`);
//! - with dedup (`StoreWriter::set_dedup`), `dropped.bits`: one bit per document (bit `d % 8` of
//!   byte `d / 8`), set for a duplicate of an earlier document ([`crate::store_dedup`]), and the
//!   manifest's `dedup` counts. The dedup runs in the temporary folder before it is renamed into
//!   place, so a store that looks deduplicated is.
//!
//! [`StoreWriter`] buffers one shard at a time (`shard_tokens` tokens, five bytes each), so
//! writing needs that much memory whatever the corpus. [`write_store`] writes the folder as a
//! whole (`whet_data::atomic::write_dir`): a store is complete or absent, never half written.
//! [`Store::open`] maps the shards and checks every size against the manifest.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenize::{IGNORE_INDEX, TokenizedExample};

/// The store format written by this version of whet.
pub const STORE_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
/// The dropped-documents bitmap of a deduplicated store.
pub const DROPPED: &str = "dropped.bits";

/// What a store holds, as `manifest.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Identifies the tokenizer, settings and inputs that made the store (hex).
    pub fingerprint: String,
    pub documents: u64,
    pub tokens: u64,
    /// Tokens with a loss (mask 1).
    pub learned: u64,
    pub shards: Vec<ShardInfo>,
    /// What the writer wants to keep beside the documents (whet: the settings it tokenized
    /// with), for the reader to check.
    #[serde(default)]
    pub meta: serde_json::Value,
    /// What the dedup dropped (`dropped.bits`); absent when the store was not deduplicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupCounts>,
}

/// Documents a store's dedup dropped: `exact + near` bits are set in `dropped.bits`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupCounts {
    /// Equal to an earlier document, token for token.
    pub exact: u64,
    /// Similar to an earlier document (MinHash estimate at or above the threshold).
    pub near: u64,
}

impl DedupCounts {
    pub fn dropped(&self) -> u64 {
        self.exact + self.near
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// `shard-00000`: the stem of its three files.
    pub name: String,
    pub documents: u64,
    pub tokens: u64,
}

fn store_err(path: &Path, what: impl Into<String>) -> Error {
    Error::Store {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Appends documents to a store being written in `dir`, one shard in memory at a time.
pub struct StoreWriter {
    dir: PathBuf,
    shard_tokens: usize,
    ids: Vec<u32>,
    mask: Vec<u8>,
    offsets: Vec<u64>,
    manifest: Manifest,
    dedup: Option<(whet_data::dedup::DedupConfig, usize)>,
}

impl StoreWriter {
    /// A writer into the (existing, empty) folder `dir`; a shard is written out once it holds
    /// `shard_tokens` tokens (at least 1).
    pub fn new(dir: &Path, fingerprint: &str, shard_tokens: usize) -> Self {
        StoreWriter {
            dir: dir.to_path_buf(),
            shard_tokens: shard_tokens.max(1),
            ids: Vec::new(),
            mask: Vec::new(),
            offsets: vec![0],
            manifest: Manifest {
                version: STORE_VERSION,
                fingerprint: fingerprint.to_string(),
                documents: 0,
                tokens: 0,
                learned: 0,
                shards: Vec::new(),
                meta: serde_json::Value::Null,
                dedup: None,
            },
            dedup: None,
        }
    }

    /// Deduplicates the documents when the store is finished ([`crate::store_dedup`]), with
    /// `cfg` in about `memory_bytes` of memory.
    pub fn set_dedup(&mut self, cfg: whet_data::dedup::DedupConfig, memory_bytes: usize) {
        self.dedup = Some((cfg, memory_bytes));
    }

    /// Appends one document; its labels' [`IGNORE_INDEX`] positions are not learned.
    pub fn push(&mut self, doc: &TokenizedExample) -> Result<()> {
        self.ids.extend_from_slice(&doc.input_ids);
        let learned = doc.labels.iter().map(|&l| u8::from(l != IGNORE_INDEX));
        let before = self.mask.len();
        self.mask.extend(learned);
        self.manifest.learned += self.mask[before..].iter().map(|&m| m as u64).sum::<u64>();
        self.offsets.push(self.ids.len() as u64);
        self.manifest.documents += 1;
        self.manifest.tokens += doc.input_ids.len() as u64;
        if self.ids.len() >= self.shard_tokens {
            self.flush()?;
        }
        Ok(())
    }

    /// Sets the manifest's `meta`.
    pub fn set_meta(&mut self, meta: serde_json::Value) {
        self.manifest.meta = meta;
    }

    /// The documents and tokens written so far.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn flush(&mut self) -> Result<()> {
        if self.offsets.len() == 1 {
            return Ok(());
        }
        let name = format!("shard-{:05}", self.manifest.shards.len());
        let write = |ext: &str, bytes: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>| {
            let path = self.dir.join(format!("{name}.{ext}"));
            let file = File::create(&path).map_err(io(&path, "create"))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            bytes(&mut w)
                .and_then(|()| w.flush())
                .map_err(io(&path, "write"))
        };
        write("ids", &mut |w| {
            self.ids
                .iter()
                .try_for_each(|id| w.write_all(&id.to_le_bytes()))
        })?;
        write("mask", &mut |w| w.write_all(&self.mask))?;
        write("idx", &mut |w| {
            self.offsets
                .iter()
                .try_for_each(|o| w.write_all(&o.to_le_bytes()))
        })?;
        self.manifest.shards.push(ShardInfo {
            name,
            documents: self.offsets.len() as u64 - 1,
            tokens: self.ids.len() as u64,
        });
        self.ids.clear();
        self.mask.clear();
        self.offsets.clear();
        self.offsets.push(0);
        Ok(())
    }

    /// Writes the last shard and the manifest; with [`StoreWriter::set_dedup`], then finds the
    /// duplicates and writes `dropped.bits` and the manifest again with their counts.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush()?;
        let path = self.dir.join(MANIFEST);
        let write_manifest = |m: &Manifest| {
            let json = serde_json::to_vec_pretty(m).expect("a manifest serializes");
            std::fs::write(&path, json).map_err(io(&path, "write"))
        };
        write_manifest(&self.manifest)?;
        if let Some((cfg, memory_bytes)) = &self.dedup {
            let store = Store::open(&self.dir)?;
            let scratch = self.dir.join(".dedup-scratch");
            let d = crate::store_dedup::find_duplicates(&store, cfg, *memory_bytes, &scratch)?;
            drop(store);
            let bits = self.dir.join(DROPPED);
            std::fs::write(&bits, &d.dropped).map_err(io(&bits, "write"))?;
            self.manifest.dedup = Some(DedupCounts {
                exact: d.exact,
                near: d.near,
            });
            write_manifest(&self.manifest)?;
        }
        Ok(self.manifest)
    }
}

/// Writes the store `dir` as a whole: `fill` pushes the documents; the folder appears (or
/// replaces an older store) only once every shard and the manifest are written and synced.
pub fn write_store(
    dir: &Path,
    fingerprint: &str,
    shard_tokens: usize,
    fill: impl FnOnce(&mut StoreWriter) -> Result<()>,
) -> Result<Manifest> {
    let mut manifest = None;
    whet_data::atomic::write_dir(dir, |tmp| -> Result<()> {
        let mut w = StoreWriter::new(tmp, fingerprint, shard_tokens);
        fill(&mut w)?;
        manifest = Some(w.finish()?);
        Ok(())
    })?;
    Ok(manifest.expect("write_dir ran fill"))
}

/// One document of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doc<'a> {
    pub ids: &'a [u32],
    /// 1 where the token is learned.
    pub mask: &'a [u8],
}

struct Shard {
    ids: Mmap,
    mask: Mmap,
    offsets: Vec<u64>,
    /// The store-wide index of this shard's first document.
    first_doc: u64,
}

impl Shard {
    fn ids(&self) -> &[u32] {
        // Little-endian u32s; the map is page-aligned, so the cast never fails on alignment.
        bytemuck::cast_slice(&self.ids[..])
    }
}

/// A store opened for reading: the shards memory-mapped, only their document offsets in memory.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// `dropped.bits`, in memory (one bit per document); empty without dedup.
    dropped: Vec<u8>,
}

impl Store {
    /// Opens the store in `dir`, checking the manifest's version and every file's size.
    pub fn open(dir: &Path) -> Result<Store> {
        if cfg!(target_endian = "big") {
            return Err(store_err(dir, "token stores are little-endian"));
        }
        let path = dir.join(MANIFEST);
        let text = std::fs::read(&path).map_err(io(&path, "read"))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| store_err(&path, format!("not a store manifest: {e}")))?;
        if manifest.version != STORE_VERSION {
            return Err(store_err(
                &path,
                format!(
                    "store format {} (this whet reads {STORE_VERSION}); prepare the data again",
                    manifest.version
                ),
            ));
        }
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let (mut docs, mut tokens) = (0u64, 0u64);
        for info in &manifest.shards {
            if !info
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(store_err(&path, format!("bad shard name {:?}", info.name)));
            }
            let map = |ext: &str, bytes_per_token: u64| -> Result<Mmap> {
                let p = dir.join(format!("{}.{ext}", info.name));
                let f = File::open(&p).map_err(io(&p, "open"))?;
                // SAFETY: the store is whet's own, written whole and never modified in place;
                // a file truncated under the map would fault, which the size check below makes a
                // deliberate act rather than a partial write.
                let m = unsafe { Mmap::map(&f) }.map_err(io(&p, "map"))?;
                let want = info.tokens * bytes_per_token;
                if m.len() as u64 != want {
                    return Err(store_err(
                        &p,
                        format!("{} bytes, the manifest says {want}", m.len()),
                    ));
                }
                Ok(m)
            };
            let ids = map("ids", 4)?;
            let mask = map("mask", 1)?;
            let idx_path = dir.join(format!("{}.idx", info.name));
            let raw = std::fs::read(&idx_path).map_err(io(&idx_path, "read"))?;
            let offsets: Vec<u64> = raw
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            let valid = raw.len() as u64 == 8 * (info.documents + 1)
                && offsets.first() == Some(&0)
                && offsets.last() == Some(&info.tokens)
                && offsets.windows(2).all(|w| w[0] <= w[1]);
            if !valid {
                return Err(store_err(
                    &idx_path,
                    format!(
                        "not {} ascending offsets from 0 to {}",
                        info.documents + 1,
                        info.tokens
                    ),
                ));
            }
            shards.push(Shard {
                ids,
                mask,
                offsets,
                first_doc: docs,
            });
            docs += info.documents;
            tokens += info.tokens;
        }
        if (docs, tokens) != (manifest.documents, manifest.tokens) {
            return Err(store_err(
                &path,
                format!(
                    "the shards hold {docs} documents and {tokens} tokens, the totals say {} and {}",
                    manifest.documents, manifest.tokens
                ),
            ));
        }
        let bits_path = dir.join(DROPPED);
        let dropped = match &manifest.dedup {
            Some(counts) => {
                let bits = std::fs::read(&bits_path).map_err(io(&bits_path, "read"))?;
                let want = manifest.documents.div_ceil(8);
                if bits.len() as u64 != want {
                    return Err(store_err(
                        &bits_path,
                        format!(
                            "{} bytes, {want} expected for {} documents; prepare the data again",
                            bits.len(),
                            manifest.documents
                        ),
                    ));
                }
                let set: u64 = bits.iter().map(|b| b.count_ones() as u64).sum();
                if set != counts.dropped() {
                    return Err(store_err(
                        &bits_path,
                        format!(
                            "{set} documents marked dropped, the manifest says {}; prepare the data again",
                            counts.dropped()
                        ),
                    ));
                }
                bits
            }
            None if bits_path.exists() => {
                return Err(store_err(
                    &bits_path,
                    "present, but the manifest records no dedup; prepare the data again",
                ));
            }
            None => Vec::new(),
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            dropped,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn documents(&self) -> u64 {
        self.manifest.documents
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The store-wide indices of shard `s`'s documents.
    pub fn shard_documents(&self, s: usize) -> std::ops::Range<u64> {
        let shard = &self.shards[s];
        shard.first_doc..shard.first_doc + (shard.offsets.len() as u64 - 1)
    }

    /// Document `i` (store-wide index, in writing order).
    pub fn doc(&self, i: u64) -> Doc<'_> {
        assert!(i < self.documents(), "document {i} of {}", self.documents());
        let s = self.shards.partition_point(|s| s.first_doc <= i) - 1;
        let shard = &self.shards[s];
        let d = (i - shard.first_doc) as usize;
        let (a, b) = (shard.offsets[d] as usize, shard.offsets[d + 1] as usize);
        Doc {
            ids: &shard.ids()[a..b],
            mask: &shard.mask[a..b],
        }
    }

    /// Whether the dedup dropped document `i` (a duplicate of an earlier one); never without
    /// dedup.
    pub fn is_dropped(&self, i: u64) -> bool {
        assert!(i < self.documents(), "document {i} of {}", self.documents());
        !self.dropped.is_empty() && crate::store_dedup::bit(&self.dropped, i)
    }

    /// Documents the dedup dropped.
    pub fn dropped(&self) -> u64 {
        self.manifest.dedup.map_or(0, |c| c.dropped())
    }

    /// Every document in writing order.
    pub fn iter(&self) -> impl Iterator<Item = Doc<'_>> + '_ {
        (0..self.documents()).map(|i| self.doc(i))
    }
}
