//! A faster, exactly equivalent path for encoding plain text (ids only) with GPT-2-style
//! byte-level BPE tokenizers.
//!
//! `tokenizers` spends most of its time in the byte-level pre-tokenizer, which tracks
//! alignments for every byte through its `NormalizedString` machinery; ids alone do not
//! need them. This path applies only when the pipeline is exactly: no normalizer, the
//! `ByteLevel` pre-tokenizer with the GPT-2 regex (`use_regex`, no `add_prefix_space`),
//! and a BPE model without dropout; and only to texts that contain no added-token string.
//! It splits with the same GPT-2 pattern (the `\s+(?!\S)` look-ahead emulated), maps
//! bytes to the byte-level alphabet, and asks the same BPE model for each word's ids,
//! caching them per word. Everything else goes through `tokenizers` unchanged. The
//! integration tests compare both paths on random text.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::RwLock;

use regex::Regex;
use tokenizers::models::bpe::BPE;
use tokenizers::{Model, ModelWrapper, PreTokenizerWrapper};
use whet_data::byte_level::bytes_to_unicode;

/// The GPT-2 pattern without its look-ahead alternative `\s+(?!\S)`, which is applied by
/// giving the last character of a whitespace run back when a non-space follows.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
const CACHE_LIMIT: usize = 1 << 18;

/// FxHash (rustc's hasher): fast for short keys; the keys are words of the input, and a
/// collision only costs speed.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type WordCache = HashMap<Box<str>, Box<[u32]>, BuildHasherDefault<FxHasher>>;

pub(crate) struct FastByteLevelBpe {
    re: Regex,
    bpe: BPE,
    /// Strings that the added vocabulary would split out; texts containing any of them
    /// take the general path.
    added: Vec<String>,
    byte_char: [char; 256],
    cache: RwLock<WordCache>,
}

impl std::fmt::Debug for FastByteLevelBpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastByteLevelBpe").finish_non_exhaustive()
    }
}

impl FastByteLevelBpe {
    /// The fast path for this tokenizer, if its pipeline is one it reproduces exactly.
    pub(crate) fn new(tok: &tokenizers::Tokenizer) -> Option<Self> {
        if tok.get_normalizer().is_some() {
            return None;
        }
        match tok.get_pre_tokenizer() {
            Some(PreTokenizerWrapper::ByteLevel(bl)) if bl.use_regex && !bl.add_prefix_space => {}
            _ => return None,
        }
        let bpe = match tok.get_model() {
            ModelWrapper::BPE(b) if b.dropout.is_none() => b.clone(),
            _ => return None,
        };
        let added = tok
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .filter(|c| !c.is_empty())
            .collect();
        Some(FastByteLevelBpe {
            re: Regex::new(GPT2_SPLIT).ok()?,
            bpe,
            added,
            byte_char: bytes_to_unicode(),
            cache: RwLock::new(WordCache::default()),
        })
    }

    /// Ids of `text` without special tokens, or `None` when the text needs the general
    /// path (it contains an added token) or the model fails.
    pub(crate) fn encode(&self, text: &str) -> Option<Vec<u32>> {
        if self.added.iter().any(|a| text.contains(a.as_str())) {
            return None;
        }
        let mut ids = Vec::with_capacity(text.len() / 3 + 4);
        let mut pos = 0;
        while pos < text.len() {
            // Every character is matched by some alternative, so the match starts at pos.
            let m = self.re.find_at(text, pos)?;
            let mut end = m.end();
            let piece = m.as_str();
            if end < text.len() && piece.chars().all(char::is_whitespace) {
                // `\s+` stopped before a non-space: `\s+(?!\S)` would leave out the last
                // whitespace character (unless that leaves nothing).
                let last = piece.chars().next_back()?.len_utf8();
                if piece.len() > last {
                    end -= last;
                }
            }
            self.word(&text[m.start()..end], &mut ids)?;
            pos = end;
        }
        Some(ids)
    }

    fn word(&self, word: &str, out: &mut Vec<u32>) -> Option<()> {
        // Never wait for the lock (as `tokenizers` does): a busy cache is skipped.
        if let Ok(cache) = self.cache.try_read()
            && let Some(ids) = cache.get(word)
        {
            out.extend_from_slice(ids);
            return Some(());
        }
        let mapped: String = word.bytes().map(|b| self.byte_char[b as usize]).collect();
        let toks = self.bpe.tokenize(&mapped).ok()?;
        let ids: Box<[u32]> = toks.iter().map(|t| t.id).collect();
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.try_write()
            && cache.len() < CACHE_LIMIT
        {
            cache.insert(word.into(), ids);
        }
        Some(())
    }
}
