//! The train/validation leakage check of a run from a token store (`data.store`): the
//! validation documents, as token ids, against the store's training documents streamed from
//! disk (`whet_tokenize::store_dedup::store_leakage`), at the in-memory check's settings.

use anyhow::Result;
use whet_data::dedup::{DedupConfig, LeakageReport};
use whet_data::{Example, Origin};
use whet_tokenize::Tokenizer;
use whet_tokenize::store::Store;

use crate::config::DataSection;

/// Documents `held` of the store (the held-out validation fraction), dropped ones left out as
/// training leaves them out; each one's origin is the store folder and its index.
pub fn held_out(store: &Store, held: &[u64]) -> Vec<(Origin, Vec<u32>)> {
    held.iter()
        .filter(|&&d| !store.is_dropped(d))
        .map(|&d| {
            let origin = Origin {
                file: store.dir().to_path_buf(),
                row: d,
            };
            (origin, store.doc(d).ids.to_vec())
        })
        .collect()
}

/// `examples` tokenized as the store's documents are (one document per window of a long one),
/// each with its example's origin.
pub fn tokenized(
    tok: &Tokenizer,
    examples: &[Example],
    data: &DataSection,
) -> Result<Vec<(Origin, Vec<u32>)>> {
    let mut out = Vec::new();
    for ex in examples {
        let (docs, _) = crate::pipeline::tokenize(tok, std::slice::from_ref(ex), data)?;
        out.extend(docs.into_iter().map(|d| (ex.origin.clone(), d.input_ids)));
    }
    Ok(out)
}

/// The leakage of `validation` into the training documents of `store`: all but those `held`
/// out (sorted store indices) and those dropped (not trained on, not counted). Signing every
/// training document takes a while on a large store (about two minutes for 1.1 billion tokens
/// on 2 cores), so the report is cached (`$WHET_CACHE/datasets/leakage/`), keyed by the
/// store's fingerprint, the held-out documents and the validation documents: a second run over
/// the same data reads it back.
pub fn leakage(
    store: &Store,
    held: &[u64],
    validation: &[(Origin, Vec<u32>)],
) -> Result<LeakageReport> {
    let cfg = DedupConfig::default();
    let mut key = whet_tokenize::FingerprintBuilder::new()
        .bytes("cache", b"store-leakage-v1")
        .bytes("store", store.manifest().fingerprint.as_bytes())
        .settings("dedup", &cfg)?;
    let mut bytes = Vec::with_capacity(8 * held.len());
    for d in held {
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    key = key.bytes("held", &bytes);
    bytes.clear();
    for (origin, ids) in validation {
        bytes.extend_from_slice(origin.file.as_os_str().as_encoded_bytes());
        bytes.extend_from_slice(&origin.row.to_le_bytes());
        bytes.extend_from_slice(&(ids.len() as u64).to_le_bytes());
        for id in ids {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
    }
    key = key.bytes("validation", &bytes);
    let path = crate::pipeline::cache_dir()
        .join("leakage")
        .join(format!("{}.json", key.finish()));
    if let Ok(text) = std::fs::read(&path)
        && let Ok(report) = serde_json::from_slice::<LeakageReport>(&text)
    {
        return Ok(report);
    }
    let is_train = |d: u64| held.binary_search(&d).is_err() && !store.is_dropped(d);
    let report = whet_tokenize::store_dedup::store_leakage(store, is_train, validation, &cfg)?;
    if let Some(dir) = path.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        // A cache: a failed write costs a recomputation next time, nothing else.
        let _ = whet_data::atomic::write_file(
            &path,
            &serde_json::to_vec(&report)?,
            whet_data::atomic::Existing::Replace,
        );
    }
    Ok(report)
}

/// The leakage of one validation set into several stores' training documents, from each
/// store's report over that same set: every validation document once, an exact overlap before a
/// near one, the first store's before a later one's.
pub fn merge(reports: Vec<LeakageReport>) -> Option<LeakageReport> {
    let mut all = reports.into_iter();
    let mut out = all.next()?;
    for r in all {
        out.train += r.train;
        let seen = |out: &LeakageReport, id: u64| {
            out.exact
                .iter()
                .chain(&out.near)
                .any(|o| o.validation_id == id)
        };
        for o in r.exact {
            if !out.exact.iter().any(|e| e.validation_id == o.validation_id) {
                out.near.retain(|n| n.validation_id != o.validation_id);
                out.exact.push(o);
            }
        }
        for o in r.near {
            if !seen(&out, o.validation_id) {
                out.near.push(o);
            }
        }
    }
    out.exact.sort_by_key(|o| o.validation_id);
    out.near.sort_by_key(|o| o.validation_id);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use whet_data::dedup::Overlap;

    fn overlap(validation_id: u64, train_id: u64, similarity: f64) -> Overlap {
        let origin = |row| Origin {
            file: "s".into(),
            row,
        };
        Overlap {
            validation_id,
            validation_origin: origin(validation_id),
            train_id,
            train_origin: origin(train_id),
            similarity,
        }
    }

    #[test]
    fn merged_reports_count_each_validation_document_once_exact_first() {
        let a = LeakageReport {
            train: 10,
            validation: 4,
            exact: vec![overlap(0, 1, 1.0)],
            near: vec![overlap(1, 2, 0.9), overlap(2, 3, 0.85)],
        };
        let b = LeakageReport {
            train: 5,
            validation: 4,
            exact: vec![overlap(1, 7, 1.0), overlap(0, 8, 1.0)],
            near: vec![overlap(2, 9, 0.95), overlap(3, 4, 0.8)],
        };
        let m = merge(vec![a, b]).unwrap();
        assert_eq!((m.train, m.validation), (15, 4));
        let ids = |v: &[Overlap]| -> Vec<(u64, u64)> {
            v.iter().map(|o| (o.validation_id, o.train_id)).collect()
        };
        // 0: the first store's exact; 1: b's exact beats a's near; 2: a's near came first.
        assert_eq!(ids(&m.exact), vec![(0, 1), (1, 7)]);
        assert_eq!(ids(&m.near), vec![(2, 3), (3, 4)]);
        assert_eq!(m.leaked_fraction(), 1.0);
        assert!(merge(Vec::new()).is_none());
    }
}
