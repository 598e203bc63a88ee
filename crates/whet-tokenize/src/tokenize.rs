//! Records to token ids and labels (the loss mask), with truncation and a report.
//!
//! Labels follow the Hugging Face convention: aligned with `input_ids`, `labels[t]` is
//! `input_ids[t]` where token `t` is learned and [`IGNORE_INDEX`] (-100) where it is not;
//! the model shifts them (see [`crate::targets_from_labels`]). Masks are positional: a token is
//! learned because of where it is, never because of its id, so EOS is learned even when
//! the pad token is the EOS token.

use std::ops::Range;
use std::path::PathBuf;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use whet_data::{Example, Message, Record};

use crate::error::{Error, Result};
use crate::template::AssistantTurns;
use crate::tokenizer::{Tokenizer, bounded};

/// Label of a token that is not learned.
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized record.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    /// Aligned with `input_ids`; [`IGNORE_INDEX`] where not learned.
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of learned tokens.
    pub fn supervised(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What to do with a sequence longer than `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// Keep the first `max_len` tokens.
    #[default]
    Right,
    /// Keep the last tokens (and the leading BOS, if there is one).
    Left,
    /// Exclude the row (reported).
    Drop,
}

/// What to do when the ids would start with two BOS tokens (the text or template carried
/// `bos_token` and the tokenizer adds one too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DoubleBos {
    /// Keep one BOS (counted in the report).
    #[default]
    Fix,
    /// Fail with [`Error::DoubleBos`].
    Error,
}

/// What to do with a text document (continued pre-training, every token learned) longer than
/// `max_len`. Prompt/completion and chat rows always follow [`Truncation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LongDocuments {
    /// Cut it into consecutive windows of at most `max_len` tokens, each its own example
    /// (see [`windows`]): no token is lost.
    #[default]
    Window,
    /// Fit it into `max_len` as [`Truncation`] says, like any other row.
    Truncate,
}

impl LongDocuments {
    pub fn is_window(&self) -> bool {
        *self == LongDocuments::Window
    }
}

/// Tokenization settings. Everything but `parallel` changes the output, so all of it
/// goes into the cache fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenizeConfig {
    /// Longest sequence kept; `None` keeps everything.
    pub max_len: Option<usize>,
    pub truncation: Truncation,
    /// Text documents longer than `max_len`: windowed (default) or truncated.
    pub long_documents: LongDocuments,
    /// Tokens each window repeats from the end of the one before, as context only (their
    /// labels are [`IGNORE_INDEX`] the second time); less than `max_len`.
    pub window_overlap: usize,
    /// Conversations: learn all assistant turns or only the last.
    pub assistant_turns: AssistantTurns,
    pub double_bos: DoubleBos,
    /// Exclude (and report) conversations the chat template refuses, instead of failing.
    pub skip_template_errors: bool,
    /// Tokenize records on the rayon pool. Does not change the output.
    #[serde(skip)]
    pub parallel: bool,
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        TokenizeConfig {
            max_len: None,
            truncation: Truncation::Right,
            long_documents: LongDocuments::Window,
            window_overlap: 0,
            assistant_turns: AssistantTurns::All,
            double_bos: DoubleBos::Fix,
            skip_template_errors: false,
            parallel: true,
        }
    }
}

impl TokenizeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_len == Some(0) {
            return Err(Error::Setting {
                field: "max_len",
                what: "must be at least 1".into(),
            });
        }
        if let Some(max_len) = self.max_len
            && self.long_documents.is_window()
            && self.window_overlap >= max_len
        {
            return Err(Error::Setting {
                field: "window_overlap",
                what: format!(
                    "{} must be less than max_len ({max_len}): each window must bring new tokens",
                    self.window_overlap
                ),
            });
        }
        Ok(())
    }
}

/// Why a row is not trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum ExcludeReason {
    /// Longer than `max_len` with `truncation = drop`.
    TooLong { len: usize, max_len: usize },
    /// Truncation to `max_len` removed every learned token.
    SupervisionTruncated { len: usize, max_len: usize },
    /// Nothing to learn in the first place (e.g. a conversation without an assistant turn).
    NoSupervision,
    /// The chat template refused the conversation (`skip_template_errors`).
    TemplateError { message: String },
}

/// A row left out, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    pub id: u64,
    pub file: PathBuf,
    pub row: u64,
    #[serde(flatten)]
    pub reason: ExcludeReason,
}

/// Counts for a tokenization pass. Rows that are excluded are listed in `excluded`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenizeReport {
    pub rows_in: u64,
    /// Examples kept: one per row, or one per window of a windowed document.
    pub rows_out: u64,
    /// Rows cut to `max_len` and kept (some learned tokens survived).
    pub rows_truncated: u64,
    /// Learned tokens removed by truncation, over kept and excluded rows.
    pub supervised_tokens_cut: u64,
    /// Rows longer than `max_len` excluded under `truncation = drop`.
    pub rows_dropped_too_long: u64,
    /// Rows whose learned part truncation removed entirely (excluded).
    pub rows_supervision_emptied: u64,
    /// Rows with nothing to learn before truncation (excluded).
    pub rows_without_supervision: u64,
    /// Rows the chat template refused (excluded under `skip_template_errors`).
    pub rows_template_error: u64,
    /// Rows where a second BOS was removed.
    pub double_bos_fixed: u64,
    /// Text documents longer than `max_len` cut into windows (`long_documents = window`); each
    /// window is its own example in `rows_out`.
    #[serde(default)]
    pub rows_windowed: u64,
    /// The windows those documents became.
    #[serde(default)]
    pub windows: u64,
    pub tokens_out: u64,
    pub supervised_tokens_out: u64,
    pub excluded: Vec<Excluded>,
}

impl TokenizeReport {
    pub fn rows_excluded(&self) -> u64 {
        self.rows_dropped_too_long
            + self.rows_supervision_emptied
            + self.rows_without_supervision
            + self.rows_template_error
    }
}

/// The result of tokenizing one example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Kept {
        example: TokenizedExample,
        /// Cut to `max_len`.
        truncated: bool,
        supervised_cut: usize,
        double_bos_fixed: bool,
    },
    Excluded {
        reason: ExcludeReason,
        supervised_cut: usize,
    },
    /// A text document longer than `max_len`, cut into windows (`long_documents = window`).
    Windowed {
        windows: Vec<TokenizedExample>,
        double_bos_fixed: bool,
    },
}

/// The result of fitting an example into `max_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Truncated {
    /// Already fits.
    Unchanged(TokenizedExample),
    /// Cut, and still has learned tokens.
    Cut {
        example: TokenizedExample,
        supervised_cut: usize,
    },
    /// Left out.
    Excluded {
        reason: ExcludeReason,
        supervised_cut: usize,
    },
}

/// Fit `ex` into `max_len` tokens. Left truncation keeps a leading BOS (`bos_id`) so the
/// row still starts with exactly one BOS. A row whose learned tokens all fall outside
/// the kept part is excluded, never kept with nothing to learn.
pub fn truncate(
    ex: TokenizedExample,
    max_len: usize,
    mode: Truncation,
    bos_id: Option<u32>,
) -> Truncated {
    let len = ex.len();
    if len <= max_len {
        return Truncated::Unchanged(ex);
    }
    let before = ex.supervised();
    let (input_ids, labels) = match mode {
        Truncation::Drop => {
            return Truncated::Excluded {
                reason: ExcludeReason::TooLong { len, max_len },
                supervised_cut: before,
            };
        }
        Truncation::Right => (
            ex.input_ids[..max_len].to_vec(),
            ex.labels[..max_len].to_vec(),
        ),
        Truncation::Left => {
            let keep_bos =
                max_len >= 2 && bos_id.is_some() && ex.input_ids.first() == bos_id.as_ref();
            if keep_bos {
                let tail = len - (max_len - 1);
                let mut ids = Vec::with_capacity(max_len);
                let mut labs = Vec::with_capacity(max_len);
                ids.push(ex.input_ids[0]);
                labs.push(IGNORE_INDEX);
                ids.extend_from_slice(&ex.input_ids[tail..]);
                labs.extend_from_slice(&ex.labels[tail..]);
                (ids, labs)
            } else {
                (
                    ex.input_ids[len - max_len..].to_vec(),
                    ex.labels[len - max_len..].to_vec(),
                )
            }
        }
    };
    let example = TokenizedExample { input_ids, labels };
    let after = example.supervised();
    if after == 0 {
        Truncated::Excluded {
            reason: ExcludeReason::SupervisionTruncated { len, max_len },
            supervised_cut: before,
        }
    } else {
        Truncated::Cut {
            example,
            supervised_cut: before - after,
        }
    }
}

/// Cut a tokenized text document into consecutive windows of at most `max_len` tokens, each
/// window starting `max_len - overlap` tokens after the one before, the last one ending with
/// the document's last token. The first `overlap` tokens of every window but the first repeat
/// the end of the window before as context: their labels are [`IGNORE_INDEX`], so every label
/// of `ex` appears in exactly one window. A leading BOS stays at the front of the first window
/// only, and the EOS at the end of the last only: each window is a document of its own (packing
/// never lets it attend to the others), and a window's first token, which no token of its own
/// window precedes, is a next-token target only through an overlap (`overlap >= 1`).
///
/// Panics if `overlap >= max_len` ([`TokenizeConfig::validate`] refuses it first).
pub fn windows(ex: &TokenizedExample, max_len: usize, overlap: usize) -> Vec<TokenizedExample> {
    assert!(
        overlap < max_len,
        "window overlap {overlap} must be less than max_len {max_len}"
    );
    let len = ex.len();
    let stride = max_len - overlap;
    let mut out = Vec::with_capacity(len.saturating_sub(overlap).div_ceil(stride).max(1));
    let mut start = 0usize;
    loop {
        let end = (start + max_len).min(len);
        let mut labels = ex.labels[start..end].to_vec();
        if start > 0 {
            for l in labels.iter_mut().take(overlap) {
                *l = IGNORE_INDEX;
            }
        }
        out.push(TokenizedExample {
            input_ids: ex.input_ids[start..end].to_vec(),
            labels,
        });
        if end == len {
            break;
        }
        start = end - overlap;
    }
    out
}

/// Token mask for character spans, exactly as transformers builds `assistant_masks`: a
/// token is in if its offsets overlap a span.
pub fn mask_from_spans(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    let mut mask = vec![false; offsets.len()];
    let mut s = 0usize;
    for (t, &(start, end)) in offsets.iter().enumerate() {
        while s < spans.len() && start >= spans[s].end {
            s += 1;
        }
        if s == spans.len() {
            break;
        }
        if end > spans[s].start {
            mask[t] = true;
        }
    }
    mask
}

impl Tokenizer {
    /// Tokenize one record without truncation. Returns the example and whether a double
    /// BOS was fixed.
    ///
    /// - text: `[BOS if the tokenizer adds one] + text + EOS`; every token but BOS learned.
    /// - prompt/completion: `[BOS] + prompt + completion + EOS`, tokenized as one string;
    ///   tokens overlapping the completion, and EOS, learned.
    /// - conversation: the chat template's rendering (BOS comes from the template;
    ///   prepended only if the tokenizer adds BOS and the template did not), with the
    ///   assistant spans (see [`crate::ChatTemplate::assistant_spans`]) learned.
    ///
    /// With `max_len` set, a text that truncation will cut is first cut to
    /// [`Tokenizer::text_bound`] bytes (its start, or its end under left truncation), so a
    /// 50 MB prompt is never tokenized whole; the tokens truncation keeps are the same.
    pub fn tokenize_record(
        &self,
        record: &Record,
        cfg: &TokenizeConfig,
    ) -> Result<(TokenizedExample, bool)> {
        let bound = cfg.max_len.map(|m| self.text_bound(m));
        let keep_end = cfg.truncation == Truncation::Left;
        let (mut ids, mut labels) = match record {
            Record::Text { text } => {
                // A document that will be truncated is cut to a length past which it surely
                // has more than `max_len` tokens first; one that will be windowed is tokenized
                // whole, in pieces.
                let text = match bound {
                    Some(b) if !cfg.long_documents.is_window() => bounded(text, b, keep_end),
                    _ => text.as_str(),
                };
                let body = self.encode_ids_in_pieces(text)?;
                let mut ids = Vec::with_capacity(body.len() + 2);
                let mut labels = Vec::with_capacity(body.len() + 2);
                if let (true, Some(b)) = (self.adds_bos(), self.bos_id()) {
                    ids.push(b);
                    labels.push(IGNORE_INDEX);
                }
                labels.extend(body.iter().map(|&t| t as i64));
                ids.extend_from_slice(&body);
                ids.push(self.eos_id());
                labels.push(self.eos_id() as i64);
                (ids, labels)
            }
            Record::PromptCompletion { prompt, completion } => {
                // Each part cut to the bound keeps every token truncation would keep: the
                // first `max_len` lie within the first `bound` bytes of the prompt and of the
                // completion, the last `max_len` within their last `bound` bytes.
                let (prompt, completion) = match bound {
                    Some(b) => (
                        bounded(prompt, b, keep_end),
                        bounded(completion, b, keep_end),
                    ),
                    None => (prompt.as_str(), completion.as_str()),
                };
                let full = format!("{prompt}{completion}");
                let enc = self.encode(&full)?;
                let cut = prompt.len();
                let mut ids = Vec::with_capacity(enc.ids.len() + 2);
                let mut labels = Vec::with_capacity(enc.ids.len() + 2);
                if let (true, Some(b)) = (self.adds_bos(), self.bos_id()) {
                    ids.push(b);
                    labels.push(IGNORE_INDEX);
                }
                for (&id, &(_, end)) in enc.ids.iter().zip(&enc.offsets) {
                    ids.push(id);
                    labels.push(if end > cut { id as i64 } else { IGNORE_INDEX });
                }
                ids.push(self.eos_id());
                labels.push(self.eos_id() as i64);
                (ids, labels)
            }
            Record::Conversation { messages } => {
                // Every message cut to the bound, for the same reason as a prompt's.
                let cut: Vec<Message>;
                let messages = match bound {
                    Some(b) if messages.iter().any(|m| m.content.len() > b) => {
                        cut = messages
                            .iter()
                            .map(|m| Message {
                                role: m.role,
                                content: bounded(&m.content, b, keep_end).to_string(),
                            })
                            .collect();
                        &cut
                    }
                    _ => messages,
                };
                self.tokenize_conversation(messages, cfg)?
            }
        };
        let mut fixed = false;
        if let Some(b) = self.bos_id()
            && ids.len() >= 2
            && ids[0] == b
            && ids[1] == b
        {
            match cfg.double_bos {
                DoubleBos::Error => return Err(Error::DoubleBos { bos: b }),
                DoubleBos::Fix => {
                    while ids.len() >= 2 && ids[1] == b {
                        ids.remove(1);
                        labels.remove(1);
                    }
                    labels[0] = IGNORE_INDEX;
                    fixed = true;
                }
            }
        }
        Ok((
            TokenizedExample {
                input_ids: ids,
                labels,
            },
            fixed,
        ))
    }

    fn tokenize_conversation(
        &self,
        messages: &[Message],
        cfg: &TokenizeConfig,
    ) -> Result<(Vec<u32>, Vec<i64>)> {
        let tmpl = self.chat_template().ok_or_else(|| Error::NoChatTemplate {
            path: self.source().to_path_buf(),
        })?;
        let rendered = tmpl.assistant_spans(messages, cfg.assistant_turns)?;
        let enc = self.encode(&rendered.text)?;
        let mask = mask_from_spans(&enc.offsets, &rendered.spans);
        let mut ids = Vec::with_capacity(enc.ids.len() + 1);
        let mut labels = Vec::with_capacity(enc.ids.len() + 1);
        if let (true, Some(b)) = (self.adds_bos(), self.bos_id())
            && enc.ids.first() != Some(&b)
        {
            ids.push(b);
            labels.push(IGNORE_INDEX);
        }
        for (&id, &m) in enc.ids.iter().zip(&mask) {
            ids.push(id);
            labels.push(if m { id as i64 } else { IGNORE_INDEX });
        }
        Ok((ids, labels))
    }

    /// Tokenize one example and fit it into `cfg.max_len`. Errors carry the example's
    /// file and row.
    pub fn tokenize_example(&self, example: &Example, cfg: &TokenizeConfig) -> Result<Outcome> {
        let at = |e: Error| e.at(example.origin.file.clone(), example.origin.row);
        let (ex, fixed) = match self.tokenize_record(&example.record, cfg) {
            Ok(v) => v,
            Err(e) if cfg.skip_template_errors && is_template_error(&e) => {
                return Ok(Outcome::Excluded {
                    reason: ExcludeReason::TemplateError {
                        message: e.to_string(),
                    },
                    supervised_cut: 0,
                });
            }
            Err(e) => return Err(at(e)),
        };
        if ex.supervised() == 0 {
            return Ok(Outcome::Excluded {
                reason: ExcludeReason::NoSupervision,
                supervised_cut: 0,
            });
        }
        let Some(max_len) = cfg.max_len else {
            return Ok(Outcome::Kept {
                example: ex,
                truncated: false,
                supervised_cut: 0,
                double_bos_fixed: fixed,
            });
        };
        if ex.len() > max_len
            && cfg.long_documents.is_window()
            && matches!(example.record, Record::Text { .. })
        {
            return Ok(Outcome::Windowed {
                windows: windows(&ex, max_len, cfg.window_overlap),
                double_bos_fixed: fixed,
            });
        }
        Ok(match truncate(ex, max_len, cfg.truncation, self.bos_id()) {
            Truncated::Unchanged(example) => Outcome::Kept {
                example,
                truncated: false,
                supervised_cut: 0,
                double_bos_fixed: fixed,
            },
            Truncated::Cut {
                example,
                supervised_cut,
            } => Outcome::Kept {
                example,
                truncated: true,
                supervised_cut,
                double_bos_fixed: fixed,
            },
            Truncated::Excluded {
                reason,
                supervised_cut,
            } => Outcome::Excluded {
                reason,
                supervised_cut,
            },
        })
    }

    /// Tokenize a dataset, in order. Excluded rows are counted and listed in the report.
    pub fn tokenize_examples(
        &self,
        examples: &[Example],
        cfg: &TokenizeConfig,
    ) -> Result<(Vec<TokenizedExample>, TokenizeReport)> {
        cfg.validate()?;
        let outcomes: Vec<Result<Outcome>> = if cfg.parallel {
            examples
                .par_iter()
                .map(|e| self.tokenize_example(e, cfg))
                .collect()
        } else {
            examples
                .iter()
                .map(|e| self.tokenize_example(e, cfg))
                .collect()
        };
        let mut out = Vec::with_capacity(examples.len());
        let mut report = TokenizeReport {
            rows_in: examples.len() as u64,
            ..Default::default()
        };
        for (example, outcome) in examples.iter().zip(outcomes) {
            match outcome? {
                Outcome::Kept {
                    example: ex,
                    truncated,
                    supervised_cut,
                    double_bos_fixed,
                } => {
                    report.rows_out += 1;
                    report.rows_truncated += truncated as u64;
                    report.supervised_tokens_cut += supervised_cut as u64;
                    report.double_bos_fixed += double_bos_fixed as u64;
                    report.tokens_out += ex.len() as u64;
                    report.supervised_tokens_out += ex.supervised() as u64;
                    out.push(ex);
                }
                Outcome::Windowed {
                    windows,
                    double_bos_fixed,
                } => {
                    report.rows_windowed += 1;
                    report.windows += windows.len() as u64;
                    report.double_bos_fixed += double_bos_fixed as u64;
                    for ex in windows {
                        report.rows_out += 1;
                        report.tokens_out += ex.len() as u64;
                        report.supervised_tokens_out += ex.supervised() as u64;
                        out.push(ex);
                    }
                }
                Outcome::Excluded {
                    reason,
                    supervised_cut,
                } => {
                    report.supervised_tokens_cut += supervised_cut as u64;
                    match &reason {
                        ExcludeReason::TooLong { .. } => report.rows_dropped_too_long += 1,
                        ExcludeReason::SupervisionTruncated { .. } => {
                            report.rows_supervision_emptied += 1
                        }
                        ExcludeReason::NoSupervision => report.rows_without_supervision += 1,
                        ExcludeReason::TemplateError { .. } => report.rows_template_error += 1,
                    }
                    report.excluded.push(Excluded {
                        id: example.id,
                        file: example.origin.file.clone(),
                        row: example.origin.row,
                        reason,
                    });
                }
            }
        }
        Ok((out, report))
    }
}

fn is_template_error(e: &Error) -> bool {
    matches!(
        e.root(),
        Error::TemplateRender { .. } | Error::AssistantSpan { .. }
    )
}
