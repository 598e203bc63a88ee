//! Training rows made on demand from a token store (`whet data prepare`, `[data] store`): the
//! documents are packed as training packs them in memory (`whet_tokenize::pack_plan` on their
//! lengths: the same rows), and each row is read from the memory-mapped shards when the trainer
//! asks for it. Memory holds the plan (a few bytes per document), never the tokens.

use std::borrow::Cow;

use whet_tokenize::store::Store;
use whet_tokenize::{IGNORE_INDEX, PackedRow, TokenizedExample};
use whet_train::{Row, RowSource};

pub struct StoreRows {
    store: Store,
    seq_len: usize,
    pad_id: u32,
    /// Row `r` packs the documents `docs[starts[r]..starts[r + 1]]`.
    starts: Vec<usize>,
    docs: Vec<u64>,
}

impl StoreRows {
    /// The rows of `documents` (store indices; empty and dropped ones left out) packed into rows of
    /// `seq_len` tokens, padded with `pad_id`. Every document must fit `seq_len`.
    pub fn new(store: Store, documents: &[u64], seq_len: usize, pad_id: u32) -> Self {
        let kept: Vec<u64> = documents
            .iter()
            .copied()
            .filter(|&d| !store.doc(d).ids.is_empty() && !store.is_dropped(d))
            .collect();
        let lengths: Vec<usize> = kept
            .iter()
            .map(|&d| store.doc(d).ids.len().min(seq_len))
            .collect();
        let bins = whet_tokenize::pack_plan(&lengths, seq_len);
        let mut starts = Vec::with_capacity(bins.len() + 1);
        let mut docs = Vec::with_capacity(kept.len());
        starts.push(0);
        for bin in bins {
            docs.extend(bin.into_iter().map(|i| kept[i]));
            starts.push(docs.len());
        }
        StoreRows {
            store,
            seq_len,
            pad_id,
            starts,
            docs,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every row, in memory (a validation set held out of a store is small).
    pub fn to_rows(&self) -> Vec<Row> {
        (0..self.len()).map(|i| self.row(i).into_owned()).collect()
    }
}

impl RowSource for StoreRows {
    fn len(&self) -> usize {
        self.starts.len() - 1
    }

    fn row(&self, i: usize) -> Cow<'_, Row> {
        let docs: Vec<TokenizedExample> = self.docs[self.starts[i]..self.starts[i + 1]]
            .iter()
            .map(|&d| {
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
        let row = PackedRow::from_docs(&docs, self.seq_len, self.pad_id);
        Cow::Owned(crate::pipeline::to_row(row))
    }

    fn any_supervised(&self) -> bool {
        self.store.manifest().learned > 0
    }
}
