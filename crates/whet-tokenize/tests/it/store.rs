//! The token store: documents written in shards come back as written, in order, from memory
//! maps; a damaged store is an error naming the file; a store is written whole or not at all.

use proptest::prelude::*;
use whet_tokenize::store::{MANIFEST, Store, write_store};
use whet_tokenize::{IGNORE_INDEX, TokenizedExample};

fn tempdir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "whet-store-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A document of `len` tokens whose first `prompt` are not learned.
fn doc(seed: u32, len: usize, prompt: usize) -> TokenizedExample {
    TokenizedExample {
        input_ids: (0..len as u32)
            .map(|i| seed.wrapping_mul(31).wrapping_add(i * 7))
            .collect(),
        labels: (0..len)
            .map(|i| if i < prompt { IGNORE_INDEX } else { i as i64 })
            .collect(),
    }
}

fn write(dir: &std::path::Path, docs: &[TokenizedExample], shard_tokens: usize) {
    write_store(dir, "fp", shard_tokens, |w| {
        for d in docs {
            w.push(d)?;
        }
        Ok(())
    })
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any documents, any shard size: every document reads back with its ids and mask, in order.
    #[test]
    fn documents_read_back_as_written(
        lens in proptest::collection::vec((0usize..40, 0usize..10), 0..30),
        shard_tokens in 1usize..100,
    ) {
        let docs: Vec<TokenizedExample> = lens
            .iter()
            .enumerate()
            .map(|(i, &(len, prompt))| doc(i as u32, len, prompt.min(len)))
            .collect();
        let dir = tempdir("prop").join("store");
        write(&dir, &docs, shard_tokens);
        let store = Store::open(&dir).unwrap();
        prop_assert_eq!(store.documents(), docs.len() as u64);
        let total: usize = docs.iter().map(|d| d.len()).sum();
        prop_assert_eq!(store.manifest().tokens, total as u64);
        for (got, want) in store.iter().zip(&docs) {
            prop_assert_eq!(got.ids, &want.input_ids[..]);
            let mask: Vec<u8> = want.labels.iter().map(|&l| u8::from(l != IGNORE_INDEX)).collect();
            prop_assert_eq!(got.mask, &mask[..]);
        }
        let learned: u64 = store.iter().map(|d| d.mask.iter().map(|&m| m as u64).sum::<u64>()).sum();
        prop_assert_eq!(store.manifest().learned, learned);
    }
}

#[test]
fn shards_hold_at_most_about_shard_tokens() {
    let docs: Vec<TokenizedExample> = (0..50).map(|i| doc(i, 10, 2)).collect();
    let dir = tempdir("shards").join("store");
    write(&dir, &docs, 64);
    let store = Store::open(&dir).unwrap();
    let shards = &store.manifest().shards;
    // A shard is written once it reaches 64 tokens: 7 documents of 10.
    assert_eq!(shards.len(), 8, "{shards:?}");
    assert!(shards.iter().all(|s| s.tokens <= 70), "{shards:?}");
    assert_eq!(store.doc(49).ids, &docs[49].input_ids[..]);
}

#[test]
fn a_damaged_store_is_an_error_naming_the_file() {
    let docs: Vec<TokenizedExample> = (0..5).map(|i| doc(i, 10, 2)).collect();
    let dir = tempdir("damaged").join("store");
    write(&dir, &docs, 1000);
    let ids = dir.join("shard-00000.ids");
    let bytes = std::fs::read(&ids).unwrap();
    std::fs::write(&ids, &bytes[..bytes.len() - 4]).unwrap();
    let msg = Store::open(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("shard-00000.ids") && msg.contains("196 bytes, the manifest says 200"),
        "{msg}"
    );
    std::fs::write(&ids, &bytes).unwrap();
    Store::open(&dir).unwrap();

    let manifest = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
    let msg = Store::open(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("store format 99"),
        "{msg}"
    );
}

/// An error while filling leaves no store behind, and an older store where it was.
#[test]
fn a_failed_write_leaves_the_old_store_intact() {
    let dir = tempdir("atomic").join("store");
    let docs: Vec<TokenizedExample> = (0..3).map(|i| doc(i, 10, 2)).collect();
    write(&dir, &docs, 1000);
    let err = write_store(&dir, "fp2", 10, |w| {
        w.push(&doc(9, 30, 0))?;
        Err(whet_tokenize::Error::Setting {
            field: "test",
            what: "interrupted".into(),
        })
    });
    assert!(err.is_err());
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.manifest().fingerprint, "fp");
    assert_eq!(store.documents(), 3);
    let siblings: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings.len(), 1, "no temporary folder left: {siblings:?}");
}
