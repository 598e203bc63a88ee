//! `whet data inspect`: what the model will be taught, before paying for training.

use std::path::Path;

use anyhow::Result;
use whet_data::Shape;
use whet_data::dedup::DedupConfig;
use whet_data::pii::Scrubber;
use whet_tokenize::{TokenizedExample, Tokenizer};

use crate::pipeline;
use crate::runtime::load_tokenizer_with;

/// Decodes `ex` with every learned span wrapped in `⟦...⟧`.
pub fn marked(tok: &Tokenizer, ex: &TokenizedExample) -> Result<String> {
    marked_ids(tok, &ex.input_ids, |i| ex.labels[i] >= 0)
}

/// Decodes a trainer row with every learned token (the target of the position before it)
/// wrapped in `⟦...⟧`.
fn marked_row(tok: &Tokenizer, row: &whet_train::Row) -> Result<String> {
    marked_ids(tok, &row.input_ids, |i| i > 0 && row.targets[i - 1] >= 0)
}

fn marked_ids(tok: &Tokenizer, ids: &[u32], learned_at: impl Fn(usize) -> bool) -> Result<String> {
    let mut s = String::new();
    let mut i = 0;
    while i < ids.len() {
        let learned = learned_at(i);
        let start = i;
        while i < ids.len() && learned_at(i) == learned {
            i += 1;
        }
        let text = tok.decode(&ids[start..i], false)?;
        if learned {
            s.push_str(&format!("⟦{text}⟧"));
        } else {
            s.push_str(&text);
        }
    }
    Ok(s)
}

/// `PII: 3 example(s) with personal data (email=2, phone=1)`.
fn print_pii(audit: &whet_data::pii::Audit, rows: &str) {
    let pii: Vec<String> = audit
        .redactions
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "PII: {} {rows} with personal data{}",
        audit.examples_touched,
        if pii.is_empty() {
            String::new()
        } else {
            format!(" ({})", pii.join(", "))
        }
    );
}

pub fn inspect(
    data: &Path,
    validation: Option<&Path>,
    model: &Path,
    chat_template: Option<&str>,
    format: Shape,
    max_len: usize,
    skip_invalid: bool,
) -> Result<()> {
    let tok = load_tokenizer_with(model, chat_template, "--chat-template")?;
    let spec = pipeline::flags_section(data, validation, format, max_len, skip_invalid);
    let (examples, read) = pipeline::read(data, &spec)?;
    println!("source: {} ({} file(s))", data.display(), read.files.len());
    println!(
        "rows read: {}, examples: {}, skipped: {}",
        read.rows,
        read.examples,
        read.skipped_total()
    );
    for (reason, n) in &read.skipped {
        println!("  skipped {n} row(s): {reason:?}");
    }
    for s in &read.samples {
        println!("  e.g. {}", s.message);
    }
    let (tokenized, rep) = pipeline::tokenize(&tok, &examples, &spec)?;
    let ratio = rep.supervised_tokens_out as f64 / rep.tokens_out.max(1) as f64;
    println!(
        "tokens: {} total, {} supervised ({:.1}%), mean {:.1} tokens per example",
        rep.tokens_out,
        rep.supervised_tokens_out,
        100.0 * ratio,
        rep.tokens_out as f64 / tokenized.len().max(1) as f64
    );
    println!(
        "truncated to {max_len}: {} row(s) ({} supervised tokens cut); long text documents cut into windows: {} (-> {} windows); excluded: {} with no supervised token, {} emptied by truncation, {} template errors",
        rep.rows_truncated,
        rep.supervised_tokens_cut,
        rep.rows_windowed,
        rep.windows,
        rep.rows_without_supervision,
        rep.rows_supervision_emptied,
        rep.rows_template_error
    );
    for e in rep.excluded.iter().take(5) {
        println!(
            "  excluded {}: row {}: {:?}",
            e.file.display(),
            e.row,
            e.reason
        );
    }
    // BOS/EOS: every example starts with at most one BOS and ends with a learned EOS/end-of-turn.
    let bos = tok.bos_id();
    let double_bos = tokenized
        .iter()
        .filter(|t| {
            bos.is_some()
                && t.input_ids.len() > 1
                && t.input_ids[0] == t.input_ids[1]
                && Some(t.input_ids[0]) == bos
        })
        .count();
    let eos = tok.eos_id();
    let eos_learned = tokenized
        .iter()
        .filter(|t| {
            t.input_ids
                .iter()
                .zip(&t.labels)
                .any(|(&id, &l)| id == eos && l >= 0)
        })
        .count();
    println!(
        "BOS: {} ({} example(s) with a double BOS); EOS/end-of-turn `{}` learned in {}/{} examples{}",
        bos.map_or("none".into(), |b| tok
            .decode(&[b], false)
            .unwrap_or_default()),
        double_bos,
        tok.eos().text,
        eos_learned,
        tokenized.len(),
        if tok.pad_id() == eos {
            " (pad == eos: the EOS label is kept)"
        } else {
            ""
        }
    );
    let (_, audit) = Scrubber::new().scrub_all(examples.iter().cloned());
    print_pii(&audit, "example(s)");
    let (kept, dups) = whet_data::dedup::dedup(examples.iter().cloned(), &DedupConfig::default())?;
    println!(
        "duplicates: {} exact or near ({} kept)",
        examples.len() - kept.len(),
        kept.len()
    );
    let _ = dups;
    if let Some(v) = &spec.validation {
        let (val, _) = pipeline::read(v, &spec)?;
        let leak = whet_data::dedup::leakage(&examples, &val, &DedupConfig::default())?;
        println!(
            "leakage: {:.1}% of {} validation examples overlap train",
            100.0 * leak.leaked_fraction(),
            val.len()
        );
    }
    if let Some(ex) = tokenized.first() {
        println!(
            "\nexample 1 (learned tokens in ⟦ ⟧):\n{}",
            marked(&tok, ex)?
        );
    }
    Ok(())
}

/// `whet data inspect --pairs`: preference pairs as a `[preference]` run reads and tokenizes
/// them (TRL's shapes, explicit or implicit prompt): pairs kept, cut and skipped, tokens, PII,
/// duplicate pairs, train/validation leakage, and the first pair's two sides with the learned
/// tokens marked.
pub fn inspect_pairs(
    data: &Path,
    validation: Option<&Path>,
    model: &Path,
    chat_template: Option<&str>,
    max_len: usize,
    skip_invalid: bool,
) -> Result<()> {
    let tok = load_tokenizer_with(model, chat_template, "--chat-template")?;
    let mut spec = pipeline::flags_section(data, validation, Shape::Auto, max_len, skip_invalid);
    // Counted, not written: the audit stays in memory.
    spec.scrub_pii = true;
    spec.dedup = true;
    let prepared = pipeline::prepare_pairs(&tok, &spec, 0, Path::new("."))?;
    let r = &prepared.report;
    if let Some(read) = &r.train_read {
        println!("source: {} ({} file(s))", data.display(), read.files.len());
        println!(
            "rows read: {}, pairs: {}, skipped: {}",
            read.rows,
            read.examples,
            read.skipped_total()
        );
        for s in &read.samples {
            println!("  e.g. {}", s.message);
        }
    }
    if let Some(p) = &r.train_pairs {
        println!(
            "pairs tokenized at max_len {max_len}: {} of {} kept, {} with an answer cut, {} skipped",
            p.pairs_out, p.pairs_in, p.pairs_truncated, p.pairs_skipped
        );
        for line in &p.skipped {
            println!("  skipped {line}");
        }
    }
    let rows = &prepared.train;
    let tokens: usize = rows.iter().map(|r| r.input_ids.len()).sum();
    let supervised: usize = rows.iter().map(|r| r.supervised()).sum();
    println!(
        "tokens: {tokens} total over {} sides, {supervised} learned ({:.1}%)",
        rows.len(),
        100.0 * supervised as f64 / tokens.max(1) as f64
    );
    if let Some(audit) = &prepared.pii_audit {
        print_pii(audit, "pair(s)");
    }
    if let Some(d) = &r.dedup {
        println!(
            "duplicates: {} pair(s) exact or near ({} kept)",
            d.input - d.kept,
            d.kept
        );
    }
    if let Some(leak) = &r.leakage {
        println!(
            "leakage: {:.1}% of {} validation pairs overlap train",
            100.0 * leak.leaked_fraction(),
            r.validation_examples
        );
    }
    if let [chosen, rejected, ..] = rows.as_slice() {
        println!(
            "\npair 1 (learned tokens in ⟦ ⟧)\nchosen:\n{}\nrejected:\n{}",
            marked_row(&tok, chosen)?,
            marked_row(&tok, rejected)?
        );
    }
    Ok(())
}
