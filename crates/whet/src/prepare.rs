//! `whet data prepare`: a corpus larger than memory to a token store on disk. The input is
//! streamed (every format whet reads), scrubbed when asked, tokenized on all cores in batches of
//! a bounded size, and written shard by shard (`whet_tokenize::store`), so memory is bounded by
//! `--memory-mb` whatever the corpus. A document longer than `--max-len` is kept as windows
//! (`data.long_documents`, as training makes them), a huge line tokenized in pieces. With
//! `data.dedup` (`--dedup`) the store's exact and near-duplicate documents are then marked
//! dropped (`whet_tokenize::store_dedup`) in the same budget, before the store appears.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use whet_data::dedup::DedupConfig;
use whet_data::pii::Scrubber;
use whet_data::{Example, Record, Shape};
use whet_tokenize::store::{DedupCounts, Manifest, write_store};
use whet_tokenize::{FingerprintBuilder, Tokenizer};

use crate::config::DataSection;
use crate::pipeline;
use crate::runtime::load_tokenizer_with;

/// What `whet data prepare` is asked to do.
pub struct PrepareArgs<'a> {
    pub data: &'a Path,
    pub model: &'a Path,
    pub out: &'a Path,
    pub chat_template: Option<&'a str>,
    pub format: Shape,
    pub max_len: usize,
    pub skip_invalid: bool,
    pub scrub_pii: bool,
    /// Mark exact and near-duplicate documents dropped (`data.dedup`).
    pub dedup: bool,
    /// The memory the batches and the shard being written may hold, in MiB.
    pub memory_mb: usize,
}

/// What a prepare did, printed and written as `prepare.json` next to the store.
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    pub input_files: usize,
    pub input_bytes: u64,
    /// Bytes of record text tokenized (the input less its JSON/CSV framing).
    pub text_bytes: u64,
    pub examples: u64,
    pub skipped: u64,
    pub documents: u64,
    pub tokens: u64,
    pub learned: u64,
    pub windows: u64,
    pub excluded: u64,
    pub pii_redactions: u64,
    /// Documents marked dropped as duplicates of earlier ones (0 without `data.dedup`).
    pub dedup_removed: u64,
    /// Of those, the exact and the near duplicates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupCounts>,
    pub shards: usize,
    pub seconds: f64,
    /// Input megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
}

/// The text a record tokenizes (for the progress and the batch size).
fn text_len(r: &Record) -> usize {
    match r {
        Record::Text { text } => text.len(),
        Record::PromptCompletion { prompt, completion } => prompt.len() + completion.len(),
        Record::Conversation { messages } => messages.iter().map(|m| m.content.len()).sum(),
    }
}

/// Streams `args.data` into a token store at `args.out` (replacing an older store there whole,
/// never a folder of other files).
pub fn prepare(args: &PrepareArgs<'_>) -> Result<(Manifest, Prepared)> {
    let tok = load_tokenizer_with(args.model, args.chat_template, "--chat-template")?;
    let mut spec = pipeline::flags_section(
        args.data,
        None,
        args.format,
        args.max_len,
        args.skip_invalid,
    );
    spec.scrub_pii = args.scrub_pii;
    spec.dedup = args.dedup;
    let fingerprint = store_fingerprint(&tok, &spec)?;
    prepare_store(&tok, &spec, &fingerprint, args.out, args.memory_mb, true)
}

/// What a store of `data.train` made with `tok` and `data`'s settings is keyed by: the
/// tokenizer (and chat template), the settings that shape the documents, PII scrubbing, the
/// dedup settings when `data.dedup` (a store without dedup keeps its old key), and each input
/// file's path, size and modification time.
pub fn store_fingerprint(tok: &Tokenizer, data: &DataSection) -> Result<String> {
    let opts = pipeline::read_options(data);
    let files = whet_data::read::resolve(&data.train, opts.format)?;
    let mut fp = FingerprintBuilder::new()
        .tokenizer(tok)
        .settings("data", &pipeline::RowSettings::from(data))?
        .settings("scrub_pii", &data.scrub_pii)?;
    if data.dedup {
        fp = fp.settings("dedup", &DedupConfig::default())?;
    }
    for (path, _) in &files {
        fp = fp.data_file(path)?;
    }
    Ok(fp.finish().to_string())
}

/// Streams `data.train` into a token store at `out` as training would tokenize it with `tok`
/// and `data`'s settings (scrubbed with `data.scrub_pii`, duplicates marked dropped with
/// `data.dedup`), in batches bounded by `memory_mb`; `fingerprint` is theirs
/// ([`store_fingerprint`]).
pub fn prepare_store(
    tok: &Tokenizer,
    data: &DataSection,
    fingerprint: &str,
    out: &Path,
    memory_mb: usize,
    progress: bool,
) -> Result<(Manifest, Prepared)> {
    let started = Instant::now();
    let opts = pipeline::read_options(data);
    let files = whet_data::read::resolve(&data.train, opts.format)?;
    let input_bytes: u64 = files
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    if out.exists() && !out.join(whet_tokenize::store::MANIFEST).is_file() {
        let nonempty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        anyhow::ensure!(
            !nonempty,
            "{}: not a token store (no manifest.json) and not empty; whet writes a store only where it owns the folder: pass a new --out",
            out.display()
        );
    }
    // A batch's text takes a sixteenth of the budget: tokenized, each byte of text becomes up to
    // ~0.6 tokens of 12 bytes (id and label) besides itself, so the batch peaks near half the
    // budget; the shard being written (5 bytes a token) takes two fifths.
    let budget = memory_mb.max(1) << 20;
    let batch_bytes = budget / 16;
    let shard_tokens = budget * 2 / 5 / 5;
    let mut cfg = pipeline::tokenize_config(data);
    cfg.parallel = true;
    let scrubber = data.scrub_pii.then(Scrubber::new);
    let mut audit = whet_data::pii::Audit::default();
    let bar = ProgressBar::new(input_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({binary_bytes_per_sec})  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut reader = whet_data::read::open(&data.train, &opts)?;
    let mut s = Prepared {
        input_files: files.len(),
        input_bytes,
        text_bytes: 0,
        examples: 0,
        skipped: 0,
        documents: 0,
        tokens: 0,
        learned: 0,
        windows: 0,
        excluded: 0,
        pii_redactions: 0,
        dedup_removed: 0,
        dedup: None,
        shards: 0,
        seconds: 0.0,
        mb_per_s: 0.0,
    };
    let meta = serde_json::json!({
        "settings": pipeline::RowSettings::from(data),
        "scrub_pii": data.scrub_pii,
        "dedup": data.dedup,
    });
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let manifest = write_store(out, fingerprint, shard_tokens, |w| {
        w.set_meta(meta);
        if data.dedup {
            // After the last batch: the whole budget is free again.
            w.set_dedup(DedupConfig::default(), budget);
        }
        let mut batch: Vec<Example> = Vec::new();
        let mut held = 0usize;
        let flush = |batch: &mut Vec<Example>,
                     w: &mut whet_tokenize::store::StoreWriter,
                     s: &mut Prepared|
         -> whet_tokenize::Result<()> {
            let (docs, rep) = tok.tokenize_examples(batch, &cfg)?;
            for d in &docs {
                w.push(d)?;
            }
            s.windows += rep.windows;
            s.excluded += rep.rows_excluded();
            s.documents = w.manifest().documents;
            s.tokens = w.manifest().tokens;
            batch.clear();
            bar.set_message(format!("{} tokens", s.tokens));
            Ok(())
        };
        for item in reader.by_ref() {
            let mut ex = item?;
            if let Some(scrubber) = &scrubber {
                scrubber.scrub_example(&mut ex, &mut audit);
            }
            let n = text_len(&ex.record);
            s.text_bytes += n as u64;
            s.examples += 1;
            held += n;
            batch.push(ex);
            if held >= batch_bytes {
                flush(&mut batch, w, &mut s)?;
                held = 0;
                // The reader's position is not known; the text read stands for it.
                bar.set_position(s.text_bytes.min(input_bytes));
            }
        }
        if !batch.is_empty() {
            flush(&mut batch, w, &mut s)?;
        }
        Ok(())
    })
    .with_context(|| format!("preparing {} into {}", data.train.display(), out.display()))?;
    bar.finish_and_clear();
    let report = reader.into_report();
    s.skipped = report.skipped_total() as u64;
    s.documents = manifest.documents;
    s.tokens = manifest.tokens;
    s.learned = manifest.learned;
    s.shards = manifest.shards.len();
    s.dedup = manifest.dedup;
    s.dedup_removed = manifest.dedup.map_or(0, |d| d.dropped());
    s.pii_redactions = audit.redactions.values().sum();
    s.seconds = started.elapsed().as_secs_f64();
    s.mb_per_s = input_bytes as f64 / 1e6 / s.seconds.max(1e-9);
    whet_data::atomic::write_file(
        &out.join("prepare.json"),
        serde_json::to_string_pretty(&s)?.as_bytes(),
        whet_data::atomic::Existing::Replace,
    )?;
    if data.scrub_pii {
        audit.write_json(out.join("pii_audit.json"))?;
    }
    Ok((manifest, s))
}
