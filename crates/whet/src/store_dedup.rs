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

/// The leakage of `validation` into the training documents `train_docs` (sorted store indices;
/// dropped ones are not trained on and not counted); `None` without validation documents.
pub fn leakage(
    store: &Store,
    train_docs: &[u64],
    validation: &[(Origin, Vec<u32>)],
) -> Result<Option<LeakageReport>> {
    if validation.is_empty() {
        return Ok(None);
    }
    let is_train = |d: u64| train_docs.binary_search(&d).is_ok() && !store.is_dropped(d);
    let report = whet_tokenize::store_dedup::store_leakage(
        store,
        is_train,
        validation,
        &DedupConfig::default(),
    )?;
    Ok(Some(report))
}
