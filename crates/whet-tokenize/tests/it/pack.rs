//! Packing, padding-free and padded layouts, batches and next-token targets.

use proptest::prelude::*;
use whet_tokenize::{
    Batch, IGNORE_INDEX, PackConfig, PackedRow, TokenizedExample, Truncation, pack, pad_each,
    padding_free, targets_from_labels,
};

const PAD: u32 = u32::MAX;

/// Examples with ids below PAD and a mix of learned and unlearned positions.
fn examples(max_len: usize) -> impl Strategy<Value = Vec<TokenizedExample>> {
    prop::collection::vec(
        prop::collection::vec((0u32..50_000, any::<bool>()), 1..=max_len).prop_map(|toks| {
            TokenizedExample {
                input_ids: toks.iter().map(|t| t.0).collect(),
                labels: toks
                    .iter()
                    .map(|&(t, learn)| if learn { t as i64 } else { IGNORE_INDEX })
                    .collect(),
            }
        }),
        0..40,
    )
}

/// Split a row into its documents (segments holding non-pad tokens), checking the row's
/// own invariants on the way.
fn documents(row: &PackedRow) -> Result<Vec<TokenizedExample>, TestCaseError> {
    let n = row.len();
    prop_assert_eq!(row.labels.len(), n);
    prop_assert_eq!(row.position_ids.len(), n);
    prop_assert_eq!(row.segment_ids.len(), n);
    let mut docs: Vec<TokenizedExample> = Vec::new();
    let mut expect_seg = 0u32;
    for t in 0..n {
        let new_segment = t == 0 || row.segment_ids[t] != row.segment_ids[t - 1];
        if new_segment {
            // Segment ids are 0, 1, 2.. in order and positions restart at 0.
            prop_assert_eq!(row.segment_ids[t], expect_seg);
            expect_seg += 1;
            prop_assert_eq!(row.position_ids[t], 0);
        } else {
            prop_assert_eq!(row.position_ids[t], row.position_ids[t - 1] + 1);
        }
        if row.input_ids[t] == PAD {
            prop_assert_eq!(row.labels[t], IGNORE_INDEX);
            continue;
        }
        if new_segment {
            docs.push(TokenizedExample::default());
        }
        let d = docs.last_mut().expect("a document is open");
        d.input_ids.push(row.input_ids[t]);
        d.labels.push(row.labels[t]);
    }
    // Padding, if any, is one segment at the end.
    if let Some(first_pad) = row.input_ids.iter().position(|&t| t == PAD) {
        prop_assert!(row.input_ids[first_pad..].iter().all(|&t| t == PAD));
        prop_assert!(
            first_pad == 0 || row.segment_ids[first_pad] != row.segment_ids[first_pad - 1]
        );
        prop_assert_eq!(row.segment_ids[first_pad], docs.len() as u32);
    }
    Ok(docs)
}

fn check_targets(labels: &[i64], segs: &[u32]) -> Result<(), TestCaseError> {
    let targets = targets_from_labels(labels, segs);
    prop_assert_eq!(targets.len(), labels.len());
    for t in 0..labels.len() {
        if t + 1 < labels.len() && segs[t + 1] == segs[t] {
            prop_assert_eq!(targets[t], labels[t + 1]);
        } else {
            prop_assert_eq!(targets[t], IGNORE_INDEX);
        }
    }
    Ok(())
}

fn sorted(mut v: Vec<TokenizedExample>) -> Vec<(Vec<u32>, Vec<i64>)> {
    let mut out: Vec<_> = v.drain(..).map(|e| (e.input_ids, e.labels)).collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn packing_keeps_every_token_once_with_correct_ids(
        exs in examples(40),
        seq_len in 8usize..64,
    ) {
        let cfg = PackConfig { seq_len, pad_id: PAD, truncation: Truncation::Right, bos_id: None };
        let (rows, report) = pack(&exs, &cfg).unwrap();
        // What should be packed: every example, cut to seq_len when longer.
        let mut want = Vec::new();
        let mut truncated = 0;
        for e in &exs {
            if e.len() > seq_len {
                truncated += 1;
                let cut = TokenizedExample {
                    input_ids: e.input_ids[..seq_len].to_vec(),
                    labels: e.labels[..seq_len].to_vec(),
                };
                if cut.supervised() > 0 {
                    want.push(cut);
                }
            } else {
                want.push(e.clone());
            }
        }
        let mut got = Vec::new();
        let mut real = Vec::new();
        for row in &rows {
            prop_assert_eq!(row.len(), seq_len);
            let docs = documents(row)?;
            real.push(docs.iter().map(TokenizedExample::len).sum::<usize>());
            got.extend(docs);
            check_targets(&row.labels, &row.segment_ids)?;
            // cu_seqlens are the segment boundaries.
            let cu = row.cu_seqlens();
            prop_assert_eq!(cu[0], 0);
            prop_assert_eq!(*cu.last().unwrap() as usize, seq_len);
        }
        prop_assert_eq!(got.len() as u64, report.docs_packed);
        prop_assert_eq!(sorted(got), sorted(want.clone()));
        prop_assert_eq!(report.tokens, want.iter().map(|e| e.len() as u64).sum::<u64>());
        prop_assert_eq!(report.tokens + report.pad_tokens, (rows.len() * seq_len) as u64);
        prop_assert!(report.docs_truncated + report.docs_excluded.len() as u64 == truncated);
        // Best fit never leaves two rows that would fit into one.
        for i in 0..real.len() {
            for j in i + 1..real.len() {
                prop_assert!(real[i] + real[j] > seq_len, "rows {} and {} fit together", i, j);
            }
        }
        // Deterministic.
        let (again, _) = pack(&exs, &cfg).unwrap();
        prop_assert_eq!(again, rows.clone());
        // Batch: flat (rows, len) with per-row targets.
        let batch = Batch::from_rows(&rows).unwrap();
        let want_len = if rows.is_empty() { 0 } else { seq_len };
        prop_assert_eq!((batch.rows, batch.len), (rows.len(), want_len));
        prop_assert_eq!(batch.input_ids.len(), rows.len() * seq_len);
        let targets = batch.targets();
        for (r, row) in rows.iter().enumerate() {
            prop_assert_eq!(&targets[r * seq_len..(r + 1) * seq_len], &row.targets()[..]);
        }
    }

    #[test]
    fn padding_free_concatenates_in_order(exs in examples(30)) {
        let row = padding_free(&exs);
        let docs = documents(&row)?;
        let want: Vec<(Vec<u32>, Vec<i64>)> =
            exs.iter().map(|e| (e.input_ids.clone(), e.labels.clone())).collect();
        let got: Vec<(Vec<u32>, Vec<i64>)> =
            docs.into_iter().map(|e| (e.input_ids, e.labels)).collect();
        prop_assert_eq!(got, want);
        let mut cu = vec![0u32];
        for e in &exs {
            cu.push(cu.last().unwrap() + e.len() as u32);
        }
        if exs.is_empty() {
            cu = vec![0];
        }
        prop_assert_eq!(row.cu_seqlens(), cu);
        prop_assert_eq!(row.max_seqlen(), exs.iter().map(TokenizedExample::len).max().unwrap_or(0));
        check_targets(&row.labels, &row.segment_ids)?;
    }

    #[test]
    fn padded_rows_hold_one_example_each(exs in examples(30)) {
        let rows = pad_each(&exs, PAD, None).unwrap();
        let longest = exs.iter().map(TokenizedExample::len).max().unwrap_or(0);
        prop_assert_eq!(rows.len(), exs.len());
        for (row, e) in rows.iter().zip(&exs) {
            prop_assert_eq!(row.len(), longest);
            let docs = documents(row)?;
            prop_assert_eq!(docs.len(), 1);
            prop_assert_eq!(&docs[0], e);
        }
    }

    #[test]
    fn targets_never_cross_a_segment(
        segs in prop::collection::vec(1usize..6, 1..8),
        labels in prop::collection::vec(prop_oneof![Just(IGNORE_INDEX), 0i64..100], 40),
    ) {
        let mut seg_ids = Vec::new();
        for (s, &n) in segs.iter().enumerate() {
            seg_ids.extend(std::iter::repeat_n(s as u32, n));
        }
        let n = seg_ids.len().min(labels.len());
        check_targets(&labels[..n], &seg_ids[..n])?;
    }
}

#[test]
fn left_truncation_keeps_bos_and_drop_excludes() {
    let bos = 7;
    let long = TokenizedExample {
        input_ids: vec![bos, 1, 2, 3, 4, 5],
        labels: vec![IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5],
    };
    let cfg = |truncation| PackConfig {
        seq_len: 4,
        pad_id: 0,
        truncation,
        bos_id: Some(bos),
    };
    let (rows, rep) = pack(std::slice::from_ref(&long), &cfg(Truncation::Left)).unwrap();
    assert_eq!(rows[0].input_ids, [bos, 3, 4, 5]);
    assert_eq!(rows[0].labels, [IGNORE_INDEX, 3, 4, 5]);
    assert_eq!(rep.docs_truncated, 1);
    // Right truncation keeps [bos, 1, 2, 3]: one learned token left.
    let (rows, rep) = pack(std::slice::from_ref(&long), &cfg(Truncation::Right)).unwrap();
    assert_eq!(
        rows[0].labels,
        [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3]
    );
    assert_eq!(rep.supervised_tokens_cut, 2);
    let (rows, rep) = pack(std::slice::from_ref(&long), &cfg(Truncation::Drop)).unwrap();
    assert!(rows.is_empty());
    assert_eq!(rep.docs_excluded.len(), 1);
    // A row whose learned part is cut away entirely is excluded, not packed.
    let cfg3 = PackConfig {
        seq_len: 3,
        ..cfg(Truncation::Right)
    };
    let (rows, rep) = pack(std::slice::from_ref(&long), &cfg3).unwrap();
    assert!(rows.is_empty());
    assert!(matches!(
        rep.docs_excluded[0].1,
        whet_tokenize::ExcludeReason::SupervisionTruncated { len: 6, max_len: 3 }
    ));
}

#[test]
fn batch_rejects_ragged_rows() {
    let a = padding_free(&[TokenizedExample {
        input_ids: vec![1, 2],
        labels: vec![1, 2],
    }]);
    let b = padding_free(&[TokenizedExample {
        input_ids: vec![1],
        labels: vec![1],
    }]);
    assert!(Batch::from_rows(&[a, b]).is_err());
    let e = pad_each(
        &[TokenizedExample {
            input_ids: vec![1, 2],
            labels: vec![1, 2],
        }],
        0,
        Some(1),
    );
    assert!(e.is_err());
}
