//! Exact and MinHash/LSH dedup, leakage check.

use proptest::prelude::*;
use whet_data::dedup::{
    DedupConfig, DuplicateKind, MinHasher, band_keys, dedup, estimate_jaccard, exact_key, jaccard,
    leakage, normalize, optimal_bands, token_shingles,
};
use whet_data::{DataError, Role};

use crate::common::*;

/// A deterministic pseudo-random text of `n` distinct-ish words.
fn prose(seed: u64, n: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 3 + (x % 6) as usize;
            (0..len)
                .map(|i| char::from(b'a' + ((x >> (5 * i)) % 26) as u8))
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn change_word(text: &str, at: usize, to: &str) -> String {
    let mut w: Vec<&str> = text.split(' ').collect();
    let i = at % w.len();
    w[i] = to;
    w.join(" ")
}

#[test]
fn normalization() {
    assert_eq!(normalize("  Hello,   WORLD!! \n ok "), "hello world ok");
    assert_eq!(
        exact_key(&text("Hello, world")),
        exact_key(&text("hello   WORLD!"))
    );
    assert_ne!(exact_key(&text("a b")), exact_key(&pc("a", "b")));
    assert_ne!(exact_key(&pc("a b", "c")), exact_key(&pc("a", "b c")));
}

#[test]
fn exact_duplicates_keep_the_first() {
    let input = vec![
        ex(text("The quick brown fox."), 0),
        ex(text("something else entirely"), 1),
        ex(text("the QUICK brown fox"), 2),
        ex(conv(&[(Role::User, "Hi!"), (Role::Assistant, "Hello.")]), 3),
        ex(conv(&[(Role::User, "hi"), (Role::Assistant, "hello")]), 4),
    ];
    let cfg = DedupConfig {
        near: false,
        ..DedupConfig::default()
    };
    let (kept, report) = dedup(input.clone(), &cfg).unwrap();
    let kept_rows: Vec<u64> = kept.iter().map(|e| e.origin.row).collect();
    assert_eq!(kept_rows, vec![0, 1, 3]);
    assert_eq!((report.input, report.kept, report.removed.len()), (5, 3, 2));
    let r = &report.removed[0];
    assert_eq!((r.origin.row, r.duplicate_of_origin.row), (2, 0));
    assert_eq!((r.id, r.duplicate_of), (input[2].id, input[0].id));
    assert_eq!(r.kind, DuplicateKind::Exact);
    assert_eq!(report.removed[1].duplicate_of_origin.row, 3);
}

#[test]
fn near_duplicate_with_one_word_changed_is_removed_unrelated_text_kept() {
    let a = prose(1, 120);
    let b = change_word(&a, 57, "zebra");
    let c = prose(2, 120);
    assert!(jaccard(&a, &b, 3) > 0.9);
    assert!(jaccard(&a, &c, 3) < 0.05);
    let input = vec![ex(text(&a), 0), ex(text(&c), 1), ex(text(&b), 2)];
    let (kept, report) = dedup(input, &DedupConfig::default()).unwrap();
    assert_eq!(records(&kept), vec![text(&a), text(&c)]);
    assert_eq!(report.removed.len(), 1);
    let r = &report.removed[0];
    assert_eq!(r.kind, DuplicateKind::Near);
    assert_eq!((r.origin.row, r.duplicate_of_origin.row), (2, 0));
    assert!(
        r.similarity >= 0.8 && r.similarity < 1.0,
        "{}",
        r.similarity
    );
}

#[test]
fn threshold_controls_near_matches() {
    // Change every 5th word: Jaccard of 3-shingles drops well below 0.8.
    let a = prose(3, 100);
    let mut b = a.clone();
    for i in (0..100).step_by(5) {
        b = change_word(&b, i, "qqq");
    }
    let j = jaccard(&a, &b, 3);
    assert!(j < 0.5, "{j}");
    let input = vec![ex(text(&a), 0), ex(text(&b), 1)];
    let (kept, _) = dedup(input.clone(), &DedupConfig::default()).unwrap();
    assert_eq!(kept.len(), 2);
    let loose = DedupConfig {
        threshold: 0.05,
        ..DedupConfig::default()
    };
    let (kept, _) = dedup(input, &loose).unwrap();
    assert_eq!(kept.len(), 1);
}

#[test]
fn dedup_is_deterministic() {
    let input: Vec<_> = (0..60)
        .map(|i| ex(text(&change_word(&prose(i / 3, 80), i as usize, "x")), i))
        .collect();
    let (k1, r1) = dedup(input.clone(), &DedupConfig::default()).unwrap();
    let (k2, r2) = dedup(input, &DedupConfig::default()).unwrap();
    assert_eq!(k1, k2);
    assert_eq!(r1, r2);
    assert_eq!(
        k1.len(),
        20,
        "each group of 3 near-identical texts keeps one"
    );
}

#[test]
fn minhash_estimate_tracks_exact_jaccard() {
    let h = MinHasher::new(256, 3, 42);
    let a = prose(9, 200);
    let b = change_word(&change_word(&a, 10, "foo"), 120, "bar");
    let est = estimate_jaccard(&h.signature(&a).unwrap(), &h.signature(&b).unwrap());
    let exact = jaccard(&a, &b, 3);
    assert!((est - exact).abs() < 0.08, "est {est} exact {exact}");
    assert!(h.signature("  ...  ").is_none());
}

#[test]
fn lsh_layout_favours_recall_at_the_threshold() {
    for (t, n) in [(0.8, 128), (0.5, 64), (0.9, 256)] {
        let (b, r) = optimal_bands(t, n);
        assert!(b * r <= n);
        let p = |r: usize, b: usize| 1.0 - (1.0 - f64::powi(t, r as i32)).powi(b as i32);
        assert!(p(r, b) >= 0.95, "t={t} n={n} b={b} r={r}");
        assert!(p(r + 1, n / (r + 1)) < 0.95, "more rows would still do");
    }
}

#[test]
fn invalid_config_is_an_error() {
    for cfg in [
        DedupConfig {
            threshold: 0.0,
            ..DedupConfig::default()
        },
        DedupConfig {
            num_perm: 0,
            ..DedupConfig::default()
        },
        DedupConfig {
            bands: 500,
            ..DedupConfig::default()
        },
    ] {
        let err = dedup(Vec::new(), &cfg).unwrap_err();
        assert!(matches!(err, DataError::InvalidConfig { .. }), "{err:?}");
    }
}

#[test]
fn leakage_reports_exact_and_near_overlaps() {
    let shared = prose(20, 100);
    let train = vec![
        ex(text(&shared), 0),
        ex(pc("What is 2+2?", "4"), 1),
        ex(text(&prose(21, 100)), 2),
    ];
    let validation = vec![
        ex(pc("what is 2 + 2", "4!"), 10),
        ex(text(&change_word(&shared, 40, "changed")), 11),
        ex(text(&prose(22, 100)), 12),
    ];
    let report = leakage(&train, &validation, &DedupConfig::default()).unwrap();
    assert_eq!(report.exact.len(), 1);
    assert_eq!(
        (
            report.exact[0].validation_origin.row,
            report.exact[0].train_origin.row
        ),
        (10, 1)
    );
    assert_eq!(report.near.len(), 1);
    assert_eq!(
        (
            report.near[0].validation_origin.row,
            report.near[0].train_origin.row
        ),
        (11, 0)
    );
    assert_eq!(report.near[0].train_id, train[0].id);
    assert!((report.leaked_fraction() - 2.0 / 3.0).abs() < 1e-12);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn minhash_finds_one_word_change_not_unrelated(
        seed in any::<u64>(), other in any::<u64>(), n in 100usize..200, at in any::<usize>()
    ) {
        prop_assume!(seed != other);
        let a = prose(seed, n);
        let b = change_word(&a, at, "zzzzzz");
        let c = prose(other, n);
        let input = vec![ex(text(&a), 0), ex(text(&b), 1), ex(text(&c), 2)];
        let (kept, report) = dedup(input, &DedupConfig::default()).unwrap();
        let kept_rows: Vec<u64> = kept.iter().map(|e| e.origin.row).collect();
        prop_assert_eq!(kept_rows, vec![0, 2]);
        prop_assert_eq!(report.removed[0].duplicate_of_origin.row, 0);
    }
}

/// `n` pseudo-random token ids below 50_000.
fn ids(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 50_000) as u32
        })
        .collect()
}

#[test]
fn token_minhash_identical_disjoint_and_near() {
    let cfg = DedupConfig::default();
    let h = MinHasher::new(cfg.num_perm, cfg.shingle_words, cfg.seed);
    let k = cfg.shingle_tokens;
    let a = ids(1, 300);
    let sig = |x: &[u32]| h.signature_of_ids(x, k).unwrap();
    assert_eq!(estimate_jaccard(&sig(&a), &sig(&a.clone())), 1.0);
    let other = ids(2, 300);
    assert!(estimate_jaccard(&sig(&a), &sig(&other)) < 0.05);
    // Three ids changed of 300, far apart: 15 of ~296 shingles differ on each side, Jaccard
    // ~0.90, above the 0.8 threshold.
    let mut near = a.clone();
    for at in [40, 150, 260] {
        near[at] = 60_000 + at as u32;
    }
    let s = estimate_jaccard(&sig(&a), &sig(&near));
    assert!(s >= cfg.threshold && s < 1.0, "{s}");
    // The LSH bands put the near copy in a shared bucket.
    let (bands, rows) = cfg.lsh_layout();
    let ka: Vec<u64> = band_keys(&sig(&a), bands, rows).collect();
    let kn: Vec<u64> = band_keys(&sig(&near), bands, rows).collect();
    assert!(ka.iter().zip(&kn).any(|(x, y)| x == y));
}

#[test]
fn token_shingles_of_short_and_empty_documents() {
    assert!(token_shingles(&[], 5).is_empty());
    assert_eq!(token_shingles(&[7, 8, 9], 5).len(), 1);
    assert_ne!(token_shingles(&[7, 8, 9], 5), token_shingles(&[7, 8], 5));
    // Repeated windows count once; order matters inside a shingle.
    assert_eq!(token_shingles(&[1, 2, 1, 2, 1, 2], 2).len(), 2);
    let h = MinHasher::new(16, 3, 0);
    assert_eq!(h.signature_of_ids(&[], 5), None);
    let bad = DedupConfig {
        shingle_tokens: 0,
        ..DedupConfig::default()
    };
    assert!(bad.validate().is_err());
}
