//! Rows of several sources as one [`RowSource`]: the in-memory mixture's rows tagged with their
//! source ([`Tagged`]), and a mixture of token stores drawn by weight as it streams
//! ([`Mixture`]); both let the trainer count the tokens it trained on from each source.

use std::borrow::Cow;

use rand::{Rng, SeedableRng};
use whet_train::{Row, RowSource};

/// Rows in memory, each tagged with its source (the in-memory mixture draws them per epoch
/// beforehand, so the order is the default shuffle).
pub struct Tagged<'a> {
    pub rows: &'a [Row],
    /// The source of each row, an index into `names`.
    pub sources: &'a [usize],
    pub names: Vec<String>,
}

impl RowSource for Tagged<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn row(&self, i: usize) -> Cow<'_, Row> {
        Cow::Borrowed(&self.rows[i])
    }
    fn source(&self, i: usize) -> usize {
        self.sources[i]
    }
    fn source_names(&self) -> Vec<String> {
        self.names.clone()
    }
}

/// Several sources' rows (in the index space of their concatenation) visited in proportion:
/// each epoch takes `quotas[i]` rows from source `i`, in the source's own order (a store
/// streams shard by shard), continuing where the last epoch left off and starting the source's
/// next epoch whenever one runs out; the sources' rows are interleaved evenly, source `i`'s
/// `j`-th row at a seeded point of `[j, j + 1) / quotas[i]`. Deterministic in the seed and the
/// epoch. With no quotas (validation), the concatenation in order.
pub struct Mixture {
    parts: Vec<Box<dyn RowSource + Send>>,
    names: Vec<String>,
    /// Rows of part `i` are `first[i]..first[i + 1]`.
    first: Vec<usize>,
    quotas: Vec<usize>,
}

/// Salt of the interleaving stream.
const INTERLEAVE: u64 = 0x4d49_5854_5552_4521;

impl Mixture {
    /// `quotas`: rows per epoch of each part (as many as parts), or empty for a plain
    /// concatenation.
    pub fn new(
        parts: Vec<Box<dyn RowSource + Send>>,
        names: Vec<String>,
        quotas: Vec<usize>,
    ) -> Self {
        assert_eq!(parts.len(), names.len(), "one name per source");
        assert!(quotas.is_empty() || quotas.len() == parts.len());
        let mut first = vec![0];
        for p in &parts {
            first.push(first.last().expect("starts with 0") + p.len());
        }
        Mixture {
            parts,
            names,
            first,
            quotas,
        }
    }

    pub fn quotas(&self) -> &[usize] {
        &self.quotas
    }

    fn locate(&self, i: usize) -> (usize, usize) {
        let p = self.first.partition_point(|&f| f <= i) - 1;
        (p, i - self.first[p])
    }

    /// Positions `from..from + n` of part `p`'s endless stream of epochs, as part rows.
    fn stream(&self, p: usize, seed: u64, from: u64, n: usize) -> Vec<usize> {
        let part = &self.parts[p];
        let per = part.epoch_len() as u64;
        let mut out = Vec::with_capacity(n);
        let mut at = from;
        while out.len() < n {
            let epoch = at / per;
            let order = part.epoch_order(seed, epoch);
            let skip = (at - epoch * per) as usize;
            let take = (n - out.len()).min(order.len() - skip);
            out.extend_from_slice(&order[skip..skip + take]);
            at += take as u64;
        }
        out
    }
}

impl RowSource for Mixture {
    fn len(&self) -> usize {
        *self.first.last().expect("starts with 0")
    }
    fn row(&self, i: usize) -> Cow<'_, Row> {
        let (p, r) = self.locate(i);
        self.parts[p].row(r)
    }
    fn any_supervised(&self) -> bool {
        self.parts.iter().any(|p| p.any_supervised())
    }
    fn supervised(&self, i: usize) -> usize {
        let (p, r) = self.locate(i);
        self.parts[p].supervised(r)
    }
    fn epoch_len(&self) -> usize {
        if self.quotas.is_empty() {
            self.len()
        } else {
            self.quotas.iter().sum()
        }
    }
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        if self.quotas.is_empty() {
            return (0..self.len()).collect();
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            seed ^ INTERLEAVE ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut keyed: Vec<(f64, usize)> = Vec::with_capacity(self.epoch_len());
        for (p, &q) in self.quotas.iter().enumerate() {
            if self.parts[p].is_empty() {
                continue;
            }
            // Each part streams with a seed of its own, so two stores never move in lockstep.
            let part_seed = seed.wrapping_add((p as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let rows = self.stream(p, part_seed, epoch * q as u64, q);
            for (j, r) in rows.into_iter().enumerate() {
                let at = (j as f64 + rng.random::<f64>()) / q as f64;
                keyed.push((at, self.first[p] + r));
            }
        }
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        keyed.into_iter().map(|(_, i)| i).collect()
    }
    fn source(&self, i: usize) -> usize {
        self.locate(i).0
    }
    fn source_names(&self) -> Vec<String> {
        self.names.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, tag: u32) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                input_ids: vec![tag, i as u32],
                position_ids: vec![0, 1],
                segment_ids: vec![0, 0],
                targets: vec![i as i64, -100],
            })
            .collect()
    }

    fn mixture(sizes: &[usize], quotas: Vec<usize>) -> Mixture {
        let parts: Vec<Box<dyn RowSource + Send>> = sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| Box::new(rows(n, t as u32)) as Box<dyn RowSource + Send>)
            .collect();
        let names = (0..sizes.len()).map(|i| format!("s{i}")).collect();
        Mixture::new(parts, names, quotas)
    }

    #[test]
    fn each_epoch_takes_every_sources_quota_and_streams_on_across_epochs() {
        let m = mixture(&[10, 3, 7], vec![5, 6, 7]);
        assert_eq!(m.len(), 20);
        assert_eq!(m.epoch_len(), 18);
        // Source 1 (3 rows, 6 a epoch): each of its rows twice an epoch.
        let mut seen = [vec![0; 10], vec![0; 3], vec![0; 7]];
        for epoch in 0..2 {
            let order = m.epoch_order(7, epoch);
            assert_eq!(order.len(), 18);
            assert_eq!(order, m.epoch_order(7, epoch), "deterministic");
            let mut per = [0; 3];
            for &i in &order {
                let (p, r) = m.locate(i);
                per[p] += 1;
                seen[p][r] += 1;
                assert_eq!(m.source(i), p);
                assert_eq!(m.row(i).input_ids[0] as usize, p);
            }
            assert_eq!(per, [5, 6, 7]);
        }
        // Two epochs of 5 from a 10-row source: every row once (it continued, not restarted).
        assert_eq!(seen[0], vec![1; 10]);
        assert_eq!(seen[1], vec![4; 3]);
        assert_eq!(seen[2], vec![2; 7]);
        assert_ne!(m.epoch_order(7, 0), m.epoch_order(8, 0), "the seed matters");
    }

    #[test]
    fn sources_are_interleaved_evenly_not_one_after_another() {
        let m = mixture(&[300, 100], vec![300, 100]);
        let order = m.epoch_order(1, 0);
        // Every window of 40 rows holds source 1 at about its share (10).
        for w in order.chunks(40) {
            let ones = w.iter().filter(|&&i| m.source(i) == 1).count();
            assert!((6..=14).contains(&ones), "{ones} of 40");
        }
    }

    #[test]
    fn without_quotas_it_is_the_concatenation() {
        let m = mixture(&[2, 3], Vec::new());
        assert_eq!(m.epoch_order(1, 0), vec![0, 1, 2, 3, 4]);
        assert_eq!(m.row(3).input_ids, vec![1, 1]);
        assert_eq!(m.supervised(3), 1);
        assert_eq!(m.source_names(), vec!["s0", "s1"]);
    }
}
