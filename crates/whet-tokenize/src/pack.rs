//! Rows for training: bin-packed fixed-length rows, one padding-free long row, or one
//! padded row per example; and [`Batch`], rows flattened to `(rows, len)`.
//!
//! Every row carries `position_ids` (restarting at 0 for each document) and
//! `segment_ids` (0, 1, 2.. per document; padding is one more segment, labelled -100),
//! so attention can be confined to a document and no target crosses a boundary
//! ([`targets_from_labels`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenize::{
    ExcludeReason, IGNORE_INDEX, TokenizedExample, Truncated, Truncation, truncate,
};

/// One training row.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PackedRow {
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids` (HF convention); -100 where not learned and on padding.
    pub labels: Vec<i64>,
    /// Position within the document, from 0 for each document (and for the padding).
    pub position_ids: Vec<u32>,
    /// 0, 1, 2.. per document; padding has its own, last, segment id.
    pub segment_ids: Vec<u32>,
}

impl PackedRow {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Boundaries of the segments, `cu_seqlens`-style: `[0, end_0, end_1, .., len]`.
    pub fn cu_seqlens(&self) -> Vec<u32> {
        let mut cu = vec![0u32];
        for t in 1..self.segment_ids.len() {
            if self.segment_ids[t] != self.segment_ids[t - 1] {
                cu.push(t as u32);
            }
        }
        if !self.segment_ids.is_empty() {
            cu.push(self.segment_ids.len() as u32);
        }
        cu
    }

    /// Length of the longest segment.
    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens()
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Next-token targets for this row (see [`targets_from_labels`]).
    pub fn targets(&self) -> Vec<i64> {
        targets_from_labels(&self.labels, &self.segment_ids)
    }

    fn check(&self) -> Result<()> {
        let n = self.input_ids.len();
        if self.labels.len() != n || self.position_ids.len() != n || self.segment_ids.len() != n {
            return Err(Error::Shape {
                what: format!(
                    "row fields differ in length: input_ids {n}, labels {}, position_ids {}, segment_ids {}",
                    self.labels.len(),
                    self.position_ids.len(),
                    self.segment_ids.len()
                ),
            });
        }
        Ok(())
    }
}

/// Next-token targets for a (packed) row: `targets[t] = labels[t+1]` when token `t+1` is
/// in the same segment as token `t`, else -100. The last token has no target.
pub fn targets_from_labels(labels: &[i64], segment_ids: &[u32]) -> Vec<i64> {
    assert_eq!(
        labels.len(),
        segment_ids.len(),
        "labels and segment_ids must be aligned"
    );
    let n = labels.len();
    let mut out = vec![IGNORE_INDEX; n];
    for t in 0..n.saturating_sub(1) {
        if segment_ids[t + 1] == segment_ids[t] {
            out[t] = labels[t + 1];
        }
    }
    out
}

/// Packing settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackConfig {
    /// Row length L.
    pub seq_len: usize,
    /// Id written into padding positions (labels there are -100 whatever the id).
    pub pad_id: u32,
    /// How examples longer than `seq_len` are fitted before packing.
    pub truncation: Truncation,
    /// BOS id, kept at the front under left truncation.
    pub bos_id: Option<u32>,
}

/// Counts for a packing pass.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PackReport {
    pub docs_in: u64,
    pub docs_packed: u64,
    pub rows: u64,
    /// Non-padding tokens placed in rows.
    pub tokens: u64,
    pub pad_tokens: u64,
    /// Documents cut to `seq_len` and kept.
    pub docs_truncated: u64,
    pub supervised_tokens_cut: u64,
    /// Documents left out: too long under `drop`, or truncation removed all learned
    /// tokens, or empty. Indices into the input.
    pub docs_excluded: Vec<(usize, ExcludeReason)>,
}

impl PackReport {
    /// Fraction of row positions holding real tokens.
    pub fn efficiency(&self) -> f64 {
        let total = self.tokens + self.pad_tokens;
        if total == 0 {
            0.0
        } else {
            self.tokens as f64 / total as f64
        }
    }
}

fn fit_all(
    examples: &[TokenizedExample],
    seq_len: usize,
    truncation: Truncation,
    bos_id: Option<u32>,
    report: &mut PackReport,
) -> Vec<(usize, TokenizedExample)> {
    let mut docs = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        if ex.is_empty() {
            report.docs_excluded.push((i, ExcludeReason::NoSupervision));
            continue;
        }
        match truncate(ex.clone(), seq_len, truncation, bos_id) {
            Truncated::Unchanged(e) => docs.push((i, e)),
            Truncated::Cut {
                example,
                supervised_cut,
            } => {
                report.docs_truncated += 1;
                report.supervised_tokens_cut += supervised_cut as u64;
                docs.push((i, example));
            }
            Truncated::Excluded {
                reason,
                supervised_cut,
            } => {
                report.supervised_tokens_cut += supervised_cut as u64;
                report.docs_excluded.push((i, reason));
            }
        }
    }
    docs
}

/// Bin-pack examples into rows of exactly `cfg.seq_len` tokens with best-fit decreasing:
/// documents are taken longest first (ties by input order) and each goes into the open row
/// with the least room that still fits it (ties: the earliest row), else a new row.
/// Deterministic. Within a row documents keep their input order; rows are ordered by
/// their first document. Examples longer than `seq_len` are truncated first per
/// `cfg.truncation` (and counted). No token is lost or duplicated otherwise.
pub fn pack(
    examples: &[TokenizedExample],
    cfg: &PackConfig,
) -> Result<(Vec<PackedRow>, PackReport)> {
    if cfg.seq_len == 0 {
        return Err(Error::Setting {
            field: "seq_len",
            what: "must be at least 1".into(),
        });
    }
    let mut report = PackReport {
        docs_in: examples.len() as u64,
        ..Default::default()
    };
    let docs = fit_all(
        examples,
        cfg.seq_len,
        cfg.truncation,
        cfg.bos_id,
        &mut report,
    );

    let lengths: Vec<usize> = docs.iter().map(|(_, d)| d.len()).collect();
    let bins = pack_plan(&lengths, cfg.seq_len);

    let mut rows = Vec::with_capacity(bins.len());
    for bin in bins {
        let tokens: usize = bin.iter().map(|&d| docs[d].1.len()).sum();
        report.docs_packed += bin.len() as u64;
        report.tokens += tokens as u64;
        report.pad_tokens += (cfg.seq_len - tokens) as u64;
        let row = PackedRow::from_docs(bin.iter().map(|&d| &docs[d].1), cfg.seq_len, cfg.pad_id);
        rows.push(row);
    }
    report.rows = rows.len() as u64;
    Ok((rows, report))
}

/// [`pack`]'s rows as indices into `lengths` (documents of at most `seq_len` tokens): best-fit
/// decreasing, longest first (ties by index), each into the open row with the least room that
/// still fits it (ties: the earliest row), else a new row; indices ascending within a row, rows
/// ordered by their first index. Deterministic; needs only the lengths, so rows can be planned
/// for documents that stay on disk.
pub fn pack_plan(lengths: &[usize], seq_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));

    // (room left, row index) of rows that are not full.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut bins: Vec<Vec<usize>> = Vec::new();
    for d in order {
        let len = lengths[d];
        let slot = open.range((len, 0)..).next().copied();
        match slot {
            Some((room, row)) => {
                open.remove(&(room, row));
                bins[row].push(d);
                if room > len {
                    open.insert((room - len, row));
                }
            }
            None => {
                bins.push(vec![d]);
                if seq_len > len {
                    open.insert((seq_len - len, bins.len() - 1));
                }
            }
        }
    }
    for bin in &mut bins {
        bin.sort_unstable();
    }
    bins.sort_by_key(|b| b[0]);
    bins
}

impl PackedRow {
    /// A row of `seq_len` tokens as [`pack`] lays one out: the documents one after the other,
    /// each in a segment of its own with positions from 0, then padding (`pad_id`, not learned)
    /// in the next segment. Rows planned by [`pack_plan`] over documents kept elsewhere (a token
    /// store) are made with it too, so they equal [`pack`]'s.
    pub fn from_docs<'a>(
        docs: impl IntoIterator<Item = &'a TokenizedExample>,
        seq_len: usize,
        pad_id: u32,
    ) -> PackedRow {
        let mut row = PackedRow {
            input_ids: Vec::with_capacity(seq_len),
            labels: Vec::with_capacity(seq_len),
            position_ids: Vec::with_capacity(seq_len),
            segment_ids: Vec::with_capacity(seq_len),
        };
        let mut segments = 0;
        for doc in docs {
            push_doc(&mut row, doc, segments);
            segments += 1;
        }
        let pad = seq_len.saturating_sub(row.len());
        push_padding(&mut row, pad, pad_id, segments);
        row
    }
}

fn push_doc(row: &mut PackedRow, doc: &TokenizedExample, seg: u32) {
    row.input_ids.extend_from_slice(&doc.input_ids);
    row.labels.extend_from_slice(&doc.labels);
    row.position_ids.extend(0..doc.len() as u32);
    row.segment_ids.extend(std::iter::repeat_n(seg, doc.len()));
}

fn push_padding(row: &mut PackedRow, n: usize, pad_id: u32, seg: u32) {
    row.input_ids.extend(std::iter::repeat_n(pad_id, n));
    row.labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
    row.position_ids.extend(0..n as u32);
    row.segment_ids.extend(std::iter::repeat_n(seg, n));
}

/// Padding-free layout: all examples concatenated, in order, into one row with
/// per-document position and segment ids (boundaries: [`PackedRow::cu_seqlens`]).
/// Empty examples are skipped.
pub fn padding_free(examples: &[TokenizedExample]) -> PackedRow {
    let total: usize = examples.iter().map(TokenizedExample::len).sum();
    let mut row = PackedRow {
        input_ids: Vec::with_capacity(total),
        labels: Vec::with_capacity(total),
        position_ids: Vec::with_capacity(total),
        segment_ids: Vec::with_capacity(total),
    };
    for (seg, ex) in examples.iter().filter(|e| !e.is_empty()).enumerate() {
        push_doc(&mut row, ex, seg as u32);
    }
    row
}

/// One row per example, right-padded to `len` (or to the longest example when `None`).
/// An example longer than `len` is an error: truncate first.
pub fn pad_each(
    examples: &[TokenizedExample],
    pad_id: u32,
    len: Option<usize>,
) -> Result<Vec<PackedRow>> {
    let target = len.unwrap_or_else(|| {
        examples
            .iter()
            .map(TokenizedExample::len)
            .max()
            .unwrap_or(0)
    });
    let mut rows = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        if ex.len() > target {
            return Err(Error::Shape {
                what: format!(
                    "example {i} has {} tokens, more than the row length {target}; truncate it first",
                    ex.len()
                ),
            });
        }
        let mut row = PackedRow::default();
        push_doc(&mut row, ex, 0);
        push_padding(&mut row, target - ex.len(), pad_id, 1);
        rows.push(row);
    }
    Ok(rows)
}

/// Rows of equal length flattened row-major into `(rows, len)`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
}

impl Batch {
    /// Stack rows; they must all have the same length.
    pub fn from_rows(rows: &[PackedRow]) -> Result<Batch> {
        let len = rows.first().map_or(0, PackedRow::len);
        let mut b = Batch {
            rows: rows.len(),
            len,
            input_ids: Vec::with_capacity(rows.len() * len),
            labels: Vec::with_capacity(rows.len() * len),
            position_ids: Vec::with_capacity(rows.len() * len),
            segment_ids: Vec::with_capacity(rows.len() * len),
        };
        for (i, r) in rows.iter().enumerate() {
            r.check()?;
            if r.len() != len {
                return Err(Error::Shape {
                    what: format!("row {i} has length {}, row 0 has {len}", r.len()),
                });
            }
            b.input_ids.extend_from_slice(&r.input_ids);
            b.labels.extend_from_slice(&r.labels);
            b.position_ids.extend_from_slice(&r.position_ids);
            b.segment_ids.extend_from_slice(&r.segment_ids);
        }
        Ok(b)
    }

    /// Next-token targets, row by row (a target never crosses a row or a segment).
    pub fn targets(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.labels.len());
        for r in 0..self.rows {
            let s = r * self.len..(r + 1) * self.len;
            out.extend(targets_from_labels(
                &self.labels[s.clone()],
                &self.segment_ids[s],
            ));
        }
        out
    }
}
