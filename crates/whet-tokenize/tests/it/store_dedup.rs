//! Store dedup and leakage: copies and near copies of an earlier document are dropped and the
//! first kept, whatever the memory budget; `dropped.bits` is checked on open; a failed dedup
//! leaves no store; leakage finds validation documents copied from training documents.

use std::path::{Path, PathBuf};

use whet_data::Origin;
use whet_data::dedup::{DedupConfig, MinHasher, band_keys, estimate_jaccard};
use whet_tokenize::TokenizedExample;
use whet_tokenize::store::{DROPPED, MANIFEST, Store, write_store};
use whet_tokenize::store_dedup::{find_duplicates, store_leakage};

fn tempdir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "whet-store-dedup-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` pseudo-random token ids below 30_000.
fn ids(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 30_000) as u32
        })
        .collect()
}

/// `ids` with three far-apart tokens changed: Jaccard ~0.9 over 5-token shingles at 300 ids.
fn near_copy(ids: &[u32], tag: u32) -> Vec<u32> {
    let mut out = ids.to_vec();
    for k in 1..=3 {
        let at = k * ids.len() / 4;
        out[at] = 40_000 + tag * 4 + k as u32;
    }
    out
}

fn doc(ids: Vec<u32>) -> TokenizedExample {
    TokenizedExample {
        labels: ids.iter().map(|&i| i as i64).collect(),
        input_ids: ids,
    }
}

fn write(dir: &Path, docs: &[Vec<u32>], dedup: Option<(DedupConfig, usize)>) -> Store {
    write_store(dir, "fp", 10_000, |w| {
        if let Some((cfg, memory)) = dedup {
            w.set_dedup(cfg, memory);
        }
        for d in docs {
            w.push(&doc(d.clone()))?;
        }
        Ok(())
    })
    .unwrap();
    Store::open(dir).unwrap()
}

fn dropped(store: &Store) -> Vec<u64> {
    (0..store.documents())
        .filter(|&d| store.is_dropped(d))
        .collect()
}

#[test]
fn copies_and_near_copies_of_an_earlier_document_are_dropped_the_first_kept() {
    let a = ids(1, 300);
    let b = ids(2, 300);
    let docs = vec![
        a.clone(),        // 0 kept: the first
        b.clone(),        // 1 kept: distinct
        a.clone(),        // 2 exact copy of 0
        near_copy(&a, 1), // 3 near copy of 0
        ids(3, 300),      // 4 kept: distinct
        vec![],           // 5 empty: never dropped
        vec![],           // 6
        b.clone(),        // 7 exact copy of 1
        ids(4, 3),        // 8 shorter than a shingle: kept
        ids(4, 3),        // 9 its copy
        near_copy(&b, 2), // 10 near copy of 1
    ];
    let dir = tempdir("basic").join("store");
    let store = write(&dir, &docs, Some((DedupConfig::default(), 64 << 20)));
    assert_eq!(dropped(&store), vec![2, 3, 7, 9, 10]);
    let counts = store.manifest().dedup.unwrap();
    assert_eq!((counts.exact, counts.near), (3, 2));
    assert_eq!(store.dropped(), 5);
    // The documents are all still there; only marked.
    assert_eq!(store.documents(), 11);
    assert_eq!(store.doc(2).ids, &a[..]);
    // No scratch files are left in the store.
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            DROPPED,
            MANIFEST,
            "shard-00000.ids",
            "shard-00000.idx",
            "shard-00000.mask"
        ]
    );

    // Without dedup nothing is dropped and there is no bitmap.
    let plain = write(&tempdir("plain").join("store"), &docs, None);
    assert_eq!(plain.dropped(), 0);
    assert!(dropped(&plain).is_empty());
    assert!(plain.manifest().dedup.is_none());

    // Exact only: the near copies stay.
    let exact_only = DedupConfig {
        near: false,
        ..DedupConfig::default()
    };
    let store = write(
        &tempdir("exact").join("store"),
        &docs,
        Some((exact_only, 1 << 20)),
    );
    assert_eq!(dropped(&store), vec![2, 7, 9]);

    // An empty store dedups to an empty bitmap.
    let empty = write(
        &tempdir("empty").join("store"),
        &[],
        Some((DedupConfig::default(), 1 << 20)),
    );
    assert_eq!((empty.documents(), empty.dropped()), (0, 0));
}

/// Documents in clusters: a root, then (later, interleaved with others) exact and near copies.
fn clustered(n: usize) -> Vec<Vec<u32>> {
    (0..n as u64)
        .map(|i| match i % 7 {
            3 => ids(i - 3, 200 + (i - 3) as usize % 50),
            5 => near_copy(&ids(i - 5, 200 + (i - 5) as usize % 50), i as u32),
            6 => ids(i / 100, 200 + (i / 100) as usize % 50),
            _ => ids(i, 200 + i as usize % 50),
        })
        .collect()
}

/// The rule, checked pair by pair: `j` is dropped when an earlier document shares a band key
/// with it and its estimate is at the threshold, or has the same ids.
fn reference(docs: &[Vec<u32>], cfg: &DedupConfig) -> Vec<u64> {
    let h = MinHasher::new(cfg.num_perm, cfg.shingle_words, cfg.seed);
    let (bands, rows) = cfg.lsh_layout();
    let sigs: Vec<Option<Vec<u32>>> = docs
        .iter()
        .map(|d| h.signature_of_ids(d, cfg.shingle_tokens))
        .collect();
    let keys: Vec<Vec<u64>> = sigs
        .iter()
        .map(|s| {
            s.as_ref()
                .map_or(Vec::new(), |s| band_keys(s, bands, rows).collect())
        })
        .collect();
    (0..docs.len())
        .filter(|&j| {
            let Some(sj) = &sigs[j] else { return false };
            (0..j).any(|i| {
                docs[i] == docs[j]
                    || sigs[i].as_ref().is_some_and(|si| {
                        keys[i].iter().zip(&keys[j]).any(|(a, b)| a == b)
                            && estimate_jaccard(si, sj) >= cfg.threshold
                    })
            })
        })
        .map(|j| j as u64)
        .collect()
}

#[test]
fn a_tiny_budget_spreads_the_keys_over_partitions_and_drops_the_same_documents() {
    let docs = clustered(1400);
    let cfg = DedupConfig::default();
    let dir = tempdir("budget").join("store");
    let store = write(&dir, &docs, None);
    let scratch = tempdir("scratch").join("s");
    let tiny = find_duplicates(&store, &cfg, 1, &scratch).unwrap();
    assert!(!scratch.exists(), "scratch files removed");
    let big = find_duplicates(&store, &cfg, 1 << 30, &scratch).unwrap();
    // 1400 documents x 19 keys x 16 bytes in halves of the 64 KiB floor: 13 partitions.
    assert_eq!((tiny.partitions, big.partitions), (13, 1));
    assert_eq!(tiny.dropped, big.dropped);
    assert_eq!((tiny.exact, tiny.near), (big.exact, big.near));
    let want = reference(&docs, &cfg);
    let got: Vec<u64> = (0..store.documents())
        .filter(|&d| tiny.is_dropped(d))
        .collect();
    assert_eq!(got, want);
    // Every copy (i % 7 == 3 or 6) and every near copy (5) goes; no root does.
    assert!(got.len() > 550, "{}", got.len());
    assert!(got.iter().all(|d| [3, 5, 6].contains(&(d % 7))), "{got:?}");
    assert_eq!(tiny.exact + tiny.near, want.len() as u64);
}

#[test]
fn open_refuses_a_bitmap_that_does_not_match_the_manifest() {
    let docs: Vec<Vec<u32>> = (0..20).map(|i| ids(i % 15, 40)).collect();
    let dir = tempdir("bits").join("store");
    let store = write(&dir, &docs, Some((DedupConfig::default(), 1 << 20)));
    assert_eq!(store.dropped(), 5);
    drop(store);
    let bits = dir.join(DROPPED);
    let good = std::fs::read(&bits).unwrap();
    assert_eq!(good.len(), 3);
    std::fs::write(&bits, &good[..2]).unwrap();
    let msg = Store::open(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("dropped.bits") && msg.contains("2 bytes, 3 expected for 20 documents"),
        "{msg}"
    );
    std::fs::write(&bits, [0u8, 0, 0]).unwrap();
    let msg = Store::open(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("0 documents marked dropped, the manifest says 5"),
        "{msg}"
    );
    std::fs::remove_file(&bits).unwrap();
    let msg = Store::open(&dir).err().unwrap().to_string();
    assert!(msg.contains("dropped.bits"), "{msg}");
    std::fs::write(&bits, &good).unwrap();
    assert_eq!(Store::open(&dir).unwrap().dropped(), 5);

    // A bitmap beside a manifest that records no dedup is refused too.
    let plain = tempdir("bits-plain").join("store");
    write(&plain, &docs, None);
    std::fs::write(plain.join(DROPPED), &good).unwrap();
    let msg = Store::open(&plain).err().unwrap().to_string();
    assert!(msg.contains("manifest records no dedup"), "{msg}");
}

/// The dedup runs before the store is renamed into place: when it fails, the older store stays
/// as it was and no deduplicated-looking store appears.
#[test]
fn a_failed_dedup_leaves_the_old_store_and_no_temporary_folder() {
    let docs: Vec<Vec<u32>> = (0..10).map(|i| ids(i % 5, 40)).collect();
    let dir = tempdir("crash").join("store");
    write(&dir, &docs, None);
    let bad = DedupConfig {
        threshold: 0.0,
        ..DedupConfig::default()
    };
    let err = write_store(&dir, "fp2", 10_000, |w| {
        w.set_dedup(bad, 1 << 20);
        w.push(&doc(ids(1, 40)))
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("threshold"), "{err}");
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.manifest().fingerprint, "fp");
    assert_eq!((store.documents(), store.dropped()), (10, 0));
    let siblings = std::fs::read_dir(dir.parent().unwrap()).unwrap().count();
    assert_eq!(siblings, 1, "no temporary folder left");
}

#[test]
fn leakage_finds_validation_documents_copied_from_training_ones() {
    let docs: Vec<Vec<u32>> = (0..50).map(|i| ids(i, 150 + i as usize)).collect();
    let dir = tempdir("leak").join("store");
    let store = write(&dir, &docs, None);
    let origin = |row| Origin {
        file: "val.jsonl".into(),
        row,
    };
    let validation = vec![
        (origin(1), docs[7].clone()), // exact copy of training document 7
        (origin(2), near_copy(&docs[20], 9)), // near copy of 20
        (origin(3), ids(999, 200)),   // unrelated
        (origin(4), docs[40].clone()), // copy of a held-out document: no leak
        (origin(5), Vec::new()),      // empty
    ];
    let held = |d: u64| d == 40 || d == 41;
    let cfg = DedupConfig::default();
    let r = store_leakage(&store, |d| !held(d), &validation, &cfg).unwrap();
    assert_eq!((r.train, r.validation), (48, 5));
    assert_eq!(r.exact.len(), 1);
    assert_eq!((r.exact[0].validation_id, r.exact[0].train_id), (0, 7));
    assert_eq!(r.exact[0].validation_origin, origin(1));
    assert_eq!(r.exact[0].train_origin.file, dir);
    assert_eq!(r.exact[0].train_origin.row, 7);
    assert_eq!(r.near.len(), 1);
    assert_eq!((r.near[0].validation_id, r.near[0].train_id), (1, 20));
    assert!(r.near[0].similarity >= 0.8 && r.near[0].similarity < 1.0);
    assert!((r.leaked_fraction() - 0.4).abs() < 1e-9);

    // With 40 in training, its copy leaks as well.
    let r = store_leakage(&store, |_| true, &validation, &cfg).unwrap();
    assert_eq!(
        r.exact.iter().map(|o| o.train_id).collect::<Vec<_>>(),
        [7, 40]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

    /// Any documents (copies, near copies, empty and short ones), any budget (up to 300
    /// documents over one to three partitions at the 64 KiB floor): the pair-by-pair rule's
    /// dropped set.
    #[test]
    fn any_budget_drops_what_the_rule_says(
        picks in proptest::collection::vec((0u64..40, 0u8..4, 0usize..120), 0..300),
        memory in 1usize..(256 << 10),
    ) {
        // A document is a fresh one, a copy or a near copy of seed `s`, or empty.
        let docs: Vec<Vec<u32>> = picks
            .iter()
            .enumerate()
            .map(|(i, &(s, kind, len))| match kind {
                0 => ids(1000 + i as u64, len),
                1 => ids(s, 100),
                2 => near_copy(&ids(s, 100), i as u32),
                _ => if len % 3 == 0 { Vec::new() } else { ids(s, len % 4) },
            })
            .collect();
        let dir = tempdir("prop").join("store");
        let store = write(&dir, &docs, Some((DedupConfig::default(), memory)));
        proptest::prop_assert_eq!(dropped(&store), reference(&docs, &DedupConfig::default()));
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
