//! Training and validation rows made on demand from a token store (`whet data prepare`,
//! `[data] store`), streamed shard by shard so that memory does not grow with the corpus:
//!
//! - **Packing** is planned per shard (`whet_tokenize::pack_plan` on the lengths of the shard's
//!   documents: with one shard, the very rows training packs in memory). A plan is a few bytes
//!   per document and only the shards in use keep theirs; the tokens stay on disk.
//! - **Shuffling**: each epoch visits the shards in a seeded order, `window` at a time, and
//!   shuffles the rows of the shards it holds together (a shuffle buffer of `window` shards).
//!   The order depends only on the seed and the epoch, so a checkpoint's `(epoch, offset)`
//!   resumes exactly. With every shard in one window (one shard, or `window` >= shards) the
//!   order is the seeded shuffle of all rows the in-memory path uses.
//! - **Validation** held out of the store is chosen per shard: shard `s` holds out its share
//!   of `round(documents * fraction)` documents, picked by a seeded shuffle of its documents.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use whet_tokenize::store::Store;
use whet_tokenize::{IGNORE_INDEX, PackedRow, TokenizedExample};
use whet_train::{Row, RowSource};

/// Which documents of the store rows are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Every document but the held-out ones.
    Train,
    /// The held-out documents (validation).
    Held,
}

/// A seeded share of each shard's documents held out for validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holdout {
    pub fraction: f64,
    pub seed: u64,
}

/// How rows are laid out and visited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Tokens per row.
    pub seq_len: usize,
    pub pad_id: u32,
    /// Pack documents into rows (`data.pack`), or one document per row, unpadded.
    pub pack: bool,
    /// Shards whose rows are shuffled together (at least 1).
    pub window: usize,
}

pub struct StoreRows {
    store: Store,
    layout: Layout,
    part: Part,
    seed: u64,
    /// Documents held out of each shard (empty: none).
    held: Vec<usize>,
    /// Row numbers: shard `s` makes rows `first_row[s]..first_row[s + 1]`.
    first_row: Vec<usize>,
    /// The documents the rows hold.
    count: u64,
    /// The plans of the shards used last, most recent last.
    cache: Mutex<Vec<(usize, Arc<Plan>)>>,
}

/// A shard's rows: row `r` packs the documents `docs[starts[r]..starts[r + 1]]`.
struct Plan {
    starts: Vec<usize>,
    docs: Vec<u64>,
}

/// Salts keeping the seeded streams apart (shard order, hold-out).
const SHARD_ORDER: u64 = 0x5348_4152_445f_4f52;
const HOLDOUT: u64 = 0x484f_4c44_4f55_5421;

impl StoreRows {
    /// The rows of `part` of `store` laid out as `layout` says (empty documents and those
    /// deduplicated away left out); `holdout`: the validation share, if any. Plans every shard
    /// once, from its offsets, to number the rows.
    pub fn new(store: Store, part: Part, holdout: Option<Holdout>, layout: Layout) -> Self {
        let shards = store.shards();
        let held = match holdout {
            Some(h) if h.fraction > 0.0 => held_per_shard(&store, h.fraction),
            _ => Vec::new(),
        };
        let mut rows = StoreRows {
            store,
            layout: Layout {
                window: layout.window.max(1),
                ..layout
            },
            part,
            seed: holdout.map_or(0, |h| h.seed),
            held,
            first_row: Vec::with_capacity(shards + 1),
            count: 0,
            cache: Mutex::new(Vec::new()),
        };
        let mut total = 0;
        rows.first_row.push(0);
        for s in 0..shards {
            let plan = rows.plan(s);
            total += plan.starts.len() - 1;
            rows.count += plan.docs.len() as u64;
            rows.first_row.push(total);
        }
        rows
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The documents the rows hold (empty and dropped ones left out).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Every document held out of the store for validation, ascending (dropped and empty ones
    /// included: what training leaves alone).
    pub fn held_documents(&self) -> Vec<u64> {
        (0..self.store.shards())
            .flat_map(|s| {
                let first = self.store.shard_documents(s).start;
                self.held_in(s)
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, h)| h)
                    .map(move |(d, _)| first + d as u64)
            })
            .collect()
    }

    /// Whether each document of shard `s` is held out.
    fn held_in(&self, s: usize) -> Vec<bool> {
        let range = self.store.shard_documents(s);
        let n = (range.end - range.start) as usize;
        let mut held = vec![false; n];
        if let Some(&k) = self.held.get(s) {
            let seed = self.seed ^ HOLDOUT.wrapping_mul(s as u64 + 1);
            for &d in &whet_train::rows::epoch_order(n, seed, u64::MAX)[..k] {
                held[d] = true;
            }
        }
        held
    }

    /// Documents of this part in shard `s` (store indices, ascending; empty and dropped ones
    /// left out).
    pub fn documents(&self, s: usize) -> Vec<u64> {
        self.store
            .shard_documents(s)
            .zip(self.held_in(s))
            .filter(|&(_, h)| h == (self.part == Part::Held))
            .map(|(d, _)| d)
            .filter(|&d| !self.store.is_dropped(d) && !self.store.doc(d).ids.is_empty())
            .collect()
    }

    fn plan(&self, s: usize) -> Plan {
        let docs = self.documents(s);
        let seq_len = self.layout.seq_len;
        let lengths: Vec<usize> = docs
            .iter()
            .map(|&d| self.store.doc(d).ids.len().min(seq_len))
            .collect();
        let bins = if self.layout.pack {
            whet_tokenize::pack_plan(&lengths, seq_len)
        } else {
            (0..docs.len()).map(|i| vec![i]).collect()
        };
        let mut starts = Vec::with_capacity(bins.len() + 1);
        let mut packed = Vec::with_capacity(docs.len());
        starts.push(0);
        for bin in bins {
            packed.extend(bin.into_iter().map(|i| docs[i]));
            starts.push(packed.len());
        }
        Plan {
            starts,
            docs: packed,
        }
    }

    /// Shard `s`'s plan, from the cache (which keeps the plans of a window's shards).
    fn cached(&self, s: usize) -> Arc<Plan> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.iter().position(|(i, _)| *i == s) {
            let hit = cache.remove(k);
            cache.push(hit);
        } else {
            if cache.len() > self.layout.window {
                cache.remove(0);
            }
            cache.push((s, Arc::new(self.plan(s))));
        }
        cache.last().expect("just pushed").1.clone()
    }

    /// The store documents row `i` packs.
    fn docs(&self, i: usize) -> Vec<u64> {
        let s = self.first_row.partition_point(|&r| r <= i) - 1;
        let plan = self.cached(s);
        let r = i - self.first_row[s];
        plan.docs[plan.starts[r]..plan.starts[r + 1]].to_vec()
    }
}

/// Documents held out of each shard: shard `s` gets its share of `round(documents * fraction)`
/// (at least one in the store, and one left to train on), by the cumulative count of documents.
fn held_per_shard(store: &Store, fraction: f64) -> Vec<usize> {
    let n = store.documents();
    let total = ((n as f64 * fraction).round() as u64).clamp(1, n.saturating_sub(1).max(1));
    let upto = |docs: u64| (docs as u128 * total as u128 / n.max(1) as u128) as u64;
    (0..store.shards())
        .map(|s| {
            let r = store.shard_documents(s);
            (upto(r.end) - upto(r.start)) as usize
        })
        .collect()
}

impl RowSource for StoreRows {
    fn len(&self) -> usize {
        *self.first_row.last().expect("first_row starts with 0")
    }

    fn row(&self, i: usize) -> Cow<'_, Row> {
        let docs: Vec<TokenizedExample> = self
            .docs(i)
            .into_iter()
            .map(|d| {
                let doc = self.store.doc(d);
                TokenizedExample {
                    input_ids: doc.ids.to_vec(),
                    labels: doc
                        .ids
                        .iter()
                        .zip(doc.mask)
                        .map(|(&id, &m)| if m == 1 { id as i64 } else { IGNORE_INDEX })
                        .collect(),
                }
            })
            .collect();
        // Unpacked rows stay unpadded: a batch pads its rows to the longest.
        let len = if self.layout.pack {
            self.layout.seq_len
        } else {
            0
        };
        let row = PackedRow::from_docs(&docs, len, self.layout.pad_id);
        Cow::Owned(crate::pipeline::to_row(row))
    }

    fn any_supervised(&self) -> bool {
        self.store.manifest().learned > 0
    }

    /// A document's first token is never a target (targets are the next tokens, inside the
    /// document), so a row learns its documents' learned tokens after their first.
    fn supervised(&self, i: usize) -> usize {
        self.docs(i)
            .into_iter()
            .map(|d| {
                let m = self.store.doc(d).mask;
                m.iter().skip(1).filter(|&&b| b == 1).count()
            })
            .sum()
    }

    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let shards = whet_train::rows::epoch_order(self.store.shards(), seed ^ SHARD_ORDER, epoch);
        let mut order = Vec::with_capacity(self.len());
        for (g, group) in shards.chunks(self.layout.window).enumerate() {
            let rows: Vec<usize> = group
                .iter()
                .flat_map(|&s| self.first_row[s]..self.first_row[s + 1])
                .collect();
            // Group 0 uses the seed itself: one window over the whole store is the in-memory
            // path's shuffle of every row.
            let seed = seed.wrapping_add((g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let shuffled = whet_train::rows::epoch_order(rows.len(), seed, epoch);
            order.extend(shuffled.into_iter().map(|k| rows[k]));
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whet_tokenize::store::write_store;

    fn layout(window: usize) -> Layout {
        Layout {
            seq_len: 64,
            pad_id: 0,
            pack: true,
            window,
        }
    }

    /// A store of `n` documents of 3..=40 tokens (every other token learned), in shards of
    /// about `shard_tokens` tokens.
    fn store(dir: &std::path::Path, n: usize, shard_tokens: usize) -> Store {
        write_store(dir, "test", shard_tokens, |w| {
            for d in 0..n {
                let len = 3 + (d * 7919) % 38;
                let ids: Vec<u32> = (0..len).map(|t| (d * 100 + t) as u32).collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(t, &id)| if t % 2 == 0 { id as i64 } else { IGNORE_INDEX })
                    .collect();
                w.push(&TokenizedExample {
                    input_ids: ids,
                    labels,
                })?;
            }
            Ok(())
        })
        .unwrap();
        Store::open(dir).unwrap()
    }

    #[test]
    fn every_document_trains_once_an_epoch_and_rows_are_made_as_planned() {
        let tmp = tempfile::tempdir().unwrap();
        let st = store(tmp.path(), 300, 500);
        assert!(st.shards() > 5, "{} shards", st.shards());
        let rows = StoreRows::new(st, Part::Train, None, layout(2));
        for epoch in 0..2 {
            let order = rows.epoch_order(5, epoch);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..rows.len()).collect::<Vec<_>>(), "a permutation");
            let mut docs: Vec<u64> = order.iter().flat_map(|&i| rows.docs(i)).collect();
            docs.sort_unstable();
            assert_eq!(docs, (0..300).collect::<Vec<u64>>());
        }
        for i in 0..rows.len() {
            let row = rows.row(i);
            assert_eq!(row.input_ids.len(), 64);
            assert_eq!(rows.supervised(i), row.supervised(), "row {i}");
        }
    }

    #[test]
    fn an_epoch_streams_window_by_window_in_a_seeded_shard_order() {
        let tmp = tempfile::tempdir().unwrap();
        let st = store(tmp.path(), 300, 500);
        let shards = st.shards();
        let rows = StoreRows::new(st, Part::Train, None, layout(2));
        let shard_of = |i: usize| rows.first_row.partition_point(|&r| r <= i) - 1;
        let order = rows.epoch_order(5, 0);
        // Each shard's rows span positions first..=last of the epoch; spans that overlap are a
        // window. Windows follow one another, each of at most two shards.
        let mut spans = vec![(usize::MAX, 0); shards];
        for (at, &i) in order.iter().enumerate() {
            let s = &mut spans[shard_of(i)];
            *s = (s.0.min(at), s.1.max(at));
        }
        spans.sort_unstable();
        let mut windows: Vec<((usize, usize), usize)> = Vec::new();
        for (a, b) in spans {
            match windows.last_mut() {
                Some(((_, end), n)) if a <= *end => {
                    *end = (*end).max(b);
                    *n += 1;
                }
                _ => windows.push(((a, b), 1)),
            }
        }
        assert_eq!(windows.len(), shards.div_ceil(2), "{windows:?}");
        assert!(windows.iter().all(|&(_, n)| n <= 2));
        assert_eq!(windows[0].0.0, 0);
        assert!(windows.windows(2).all(|w| w[1].0.0 == w[0].0.1 + 1));
        // The plan cache holds a window's shards, never the whole store.
        for &i in &order {
            rows.row(i);
        }
        assert!(rows.cache.lock().unwrap().len() <= 3);
        // Seeded: the same per seed and epoch, another for another epoch.
        assert_eq!(order, rows.epoch_order(5, 0));
        assert_ne!(order, rows.epoch_order(5, 1));
        let firsts: std::collections::BTreeSet<usize> = (0..8)
            .map(|e| shard_of(rows.epoch_order(5, e)[0]))
            .collect();
        assert!(firsts.len() > 1, "the shard order changes between epochs");
    }

    #[test]
    fn one_window_over_the_store_is_the_in_memory_shuffle() {
        let tmp = tempfile::tempdir().unwrap();
        let st = store(tmp.path(), 50, 1 << 20);
        assert_eq!(st.shards(), 1);
        let rows = StoreRows::new(st, Part::Train, None, layout(8));
        for epoch in 0..3 {
            assert_eq!(
                rows.epoch_order(9, epoch),
                whet_train::rows::epoch_order(rows.len(), 9, epoch)
            );
        }
    }

    #[test]
    fn held_out_documents_are_a_seeded_share_of_every_shard() {
        let tmp = tempfile::tempdir().unwrap();
        let st = store(tmp.path(), 300, 500);
        let holdout = Some(Holdout {
            fraction: 0.1,
            seed: 3,
        });
        let open = || Store::open(tmp.path()).unwrap();
        let train = StoreRows::new(open(), Part::Train, holdout, layout(4));
        let held = StoreRows::new(open(), Part::Held, holdout, layout(4));
        assert_eq!(held.held_documents().len(), 30);
        assert_eq!((train.count(), held.count()), (270, 30));
        let docs = |r: &StoreRows| -> Vec<u64> {
            let mut d: Vec<u64> = (0..r.len()).flat_map(|i| r.docs(i)).collect();
            d.sort_unstable();
            d
        };
        let (t, h) = (docs(&train), docs(&held));
        assert_eq!(h.len(), 30);
        assert_eq!(t.len(), 270);
        let mut all: Vec<u64> = t.iter().chain(&h).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..300).collect::<Vec<u64>>(), "a partition");
        // Spread over the shards, not the first 30 documents.
        assert!(h.iter().any(|&d| d >= 150), "{h:?}");
        // Another seed holds out others.
        let other = StoreRows::new(
            open(),
            Part::Held,
            Some(Holdout {
                fraction: 0.1,
                seed: 4,
            }),
            layout(4),
        );
        assert_ne!(docs(&other), h);
        drop(st);
    }
}
