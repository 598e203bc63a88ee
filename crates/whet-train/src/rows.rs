//! Trainer-ready rows and the deterministic order in which they are visited.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::Result;

/// One packed row, ready for the model: next-token targets already shifted so that no target
/// crosses a document boundary (`-100` = not supervised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
    pub targets: Vec<i64>,
}

impl Row {
    pub fn supervised(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// The training rows a [`crate::Trainer`] visits: in memory (`[Row]`, `Vec<Row>`), or made on
/// demand from a store on disk, so a corpus larger than memory trains. Row `i` must be the same
/// at every call (the seeded order and an exact resume rely on it).
pub trait RowSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Row `i`, `i < len()`.
    fn row(&self, i: usize) -> std::borrow::Cow<'_, Row>;
    /// Whether any row has a supervised token (a source on disk may know without reading them).
    fn any_supervised(&self) -> bool {
        (0..self.len()).any(|i| self.row(i).supervised() > 0)
    }
    /// The supervised tokens of row `i` (a source on disk may count them without making the
    /// row).
    fn supervised(&self, i: usize) -> usize {
        self.row(i).supervised()
    }
    /// The rows one epoch visits: the length of [`RowSource::epoch_order`].
    fn epoch_len(&self) -> usize {
        self.len()
    }
    /// The rows one epoch visits, in order: a seeded shuffle of every row by default. A source
    /// may order them otherwise (a store streams shard by shard, a mixture repeats or skips
    /// rows by weight); the order must depend only on `seed` and `epoch`, so a resumed run
    /// visits the same rows. Its length is the epoch's length.
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        epoch_order(self.len(), seed, epoch)
    }
    /// The data source row `i` comes from, for counting tokens by source (`0` unless the rows
    /// are a mixture of several: then an index into [`RowSource::source_names`]).
    fn source(&self, _i: usize) -> usize {
        0
    }
    /// The names of a mixture's sources; empty for rows of one source.
    fn source_names(&self) -> Vec<String> {
        Vec::new()
    }
}

impl RowSource for [Row] {
    fn len(&self) -> usize {
        <[Row]>::len(self)
    }
    fn row(&self, i: usize) -> std::borrow::Cow<'_, Row> {
        std::borrow::Cow::Borrowed(&self[i])
    }
}

impl<T: RowSource + ?Sized> RowSource for &T {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn row(&self, i: usize) -> std::borrow::Cow<'_, Row> {
        (**self).row(i)
    }
    fn any_supervised(&self) -> bool {
        (**self).any_supervised()
    }
    fn supervised(&self, i: usize) -> usize {
        (**self).supervised(i)
    }
    fn epoch_len(&self) -> usize {
        (**self).epoch_len()
    }
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        (**self).epoch_order(seed, epoch)
    }
    fn source(&self, i: usize) -> usize {
        (**self).source(i)
    }
    fn source_names(&self) -> Vec<String> {
        (**self).source_names()
    }
}

impl<const N: usize> RowSource for [Row; N] {
    fn len(&self) -> usize {
        N
    }
    fn row(&self, i: usize) -> std::borrow::Cow<'_, Row> {
        std::borrow::Cow::Borrowed(&self[i])
    }
}

impl RowSource for Vec<Row> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn row(&self, i: usize) -> std::borrow::Cow<'_, Row> {
        std::borrow::Cow::Borrowed(&self[i])
    }
}

/// A micro-batch as tensors: ids/positions/segments (B, T) u32, targets (B, T) i64.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub segments: Tensor,
    pub targets: Tensor,
    pub supervised: usize,
    pub tokens: usize,
    /// A preference batch's reference log-probabilities computed before training
    /// ([`crate::preference::reference_logps`]), row by row as the batch stacks them, with the
    /// rows' supervised tokens; `None`: the loss computes them from the model.
    pub reference: Option<(Tensor, Vec<usize>)>,
}

impl Batch {
    /// Stacks rows of equal length; shorter rows are padded with unsupervised padding in a
    /// segment of their own.
    pub fn from_rows(rows: &[&Row], device: &Device) -> Result<Self> {
        let t = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
        let b = rows.len();
        let (mut ids, mut pos, mut seg, mut tgt) = (
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
            Vec::with_capacity(b * t),
        );
        let mut tokens = 0;
        for r in rows {
            let pad = t - r.input_ids.len();
            tokens += r.input_ids.len();
            ids.extend_from_slice(&r.input_ids);
            ids.extend(std::iter::repeat_n(0, pad));
            pos.extend_from_slice(&r.position_ids);
            pos.extend(0..pad as u32);
            seg.extend_from_slice(&r.segment_ids);
            let pad_seg = r.segment_ids.iter().max().map_or(0, |m| m + 1);
            seg.extend(std::iter::repeat_n(pad_seg, pad));
            tgt.extend_from_slice(&r.targets);
            tgt.extend(std::iter::repeat_n(-100i64, pad));
        }
        let supervised = tgt.iter().filter(|&&x| x >= 0).count();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            segments: Tensor::from_vec(seg, (b, t), device)?,
            targets: Tensor::from_vec(tgt, (b, t), device)?,
            supervised,
            tokens,
            reference: None,
        })
    }
}

impl Batch {
    /// A batch of preference pairs from rows laid out pair by pair (`[chosen_0, rejected_0,
    /// chosen_1, ...]`, see [`crate::preference::Objective`]): the P chosen rows, then the P
    /// rejected rows, right-padded (TRL's `concatenated_inputs`). `supervised` counts pairs,
    /// the unit a preference loss is averaged over.
    pub fn from_pair_rows(rows: &[&Row], device: &Device) -> Result<Self> {
        let chosen = rows.iter().step_by(2);
        let rejected = rows.iter().skip(1).step_by(2);
        let stacked: Vec<&Row> = chosen.chain(rejected).copied().collect();
        let mut batch = Self::from_rows(&stacked, device)?;
        batch.supervised = rows.len() / 2;
        Ok(batch)
    }

    /// [`Batch::from_pair_rows`] with the pairs' precomputed reference log-probabilities,
    /// `reference[k]` being that of `rows[k]`.
    pub fn from_pair_rows_with_reference(
        rows: &[&Row],
        reference: &[crate::preference::SeqLogp],
        device: &Device,
    ) -> Result<Self> {
        assert_eq!(rows.len(), reference.len(), "one reference value per row");
        let mut batch = Self::from_pair_rows(rows, device)?;
        let stacked: Vec<&crate::preference::SeqLogp> = reference
            .iter()
            .step_by(2)
            .chain(reference.iter().skip(1).step_by(2))
            .collect();
        let logps: Vec<f32> = stacked.iter().map(|r| r.logp).collect();
        let n = logps.len();
        batch.reference = Some((
            Tensor::from_vec(logps, n, device)?,
            stacked.iter().map(|r| r.tokens).collect(),
        ));
        Ok(batch)
    }
}

/// The visiting order of epoch `epoch`: a seeded shuffle, identical on every run and resume.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Where the data stream stands: enough to resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Rows of this epoch's order already consumed.
    pub offset: usize,
}
