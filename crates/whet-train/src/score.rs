//! Task metrics: a completion generated for each validation example, scored against that
//! example's reference completion. Pure functions over strings; no model, no tensors.
//!
//! - [`exact_match`] / [`exact_match_rate`]: equality after [`normalize`].
//! - [`classification`]: accuracy, macro-F1, per-label scores and a confusion matrix over a
//!   label set ([`labels_from`] when the user gives none).
//! - [`entity_f1`]: micro precision / recall / F1 of (type, span) pairs for extraction tasks.
//! - [`chrf`]: chrF++ as sacreBLEU's `CHRF(word_order=2)` computes it, corpus-level.
//!
//! Every score is on a 0 to 1 scale, higher is better, 1 is perfect: accuracy and F1 as
//! scikit-learn reports them, and chrF as sacreBLEU's number divided by 100.
//!
//! [`Metric`] names them for configs (`[eval] metrics = ["macro_f1"]`) and the command line.
//! The result types derive `Serialize` so they can go into `report.json` as they are.
//!
//! Corpus-level functions take predictions and references as two slices of equal, nonzero
//! length and return [`TrainError::ScoreInput`] otherwise: a score of an empty set is undefined
//! and a length mismatch means the caller paired the wrong rows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::{Result, TrainError};

// ---- normalisation ----

/// What [`normalize`] folds away before two strings are compared; `true` = fold it away.
///
/// `Default` folds all three: SQuAD v1.1's `normalize_answer` (lowercase, drop punctuation,
/// collapse whitespace) without its removal of the English articles "a", "an", "the", which
/// would make the metrics English-only and can change a label ("A" as a multiple-choice
/// answer would become empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Normalize {
    /// Lowercase with Unicode's full lowercase mapping (`str::to_lowercase`: "ÉCOLE" →
    /// "école"). This is lowercasing, not case folding: "ß" and "ss" stay different.
    pub case: bool,
    /// Collapse every run of Unicode whitespace into one space and trim both ends.
    pub whitespace: bool,
    /// Delete punctuation: Unicode general category P (`\p{P}`: « » — ¿ 。 …) and the 32 ASCII
    /// characters of Python's `string.punctuation` (SQuAD's set, which also holds the symbols
    /// `$`, `+`, `<`, `=`, `>`, `^`, `|`, `~` and the backtick). Other symbols (€, ©) stay.
    /// Deleted, not replaced by a space, as SQuAD does: "state-of-the-art" becomes
    /// "stateoftheart".
    pub punctuation: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Self {
            case: true,
            whitespace: true,
            punctuation: true,
        }
    }
}

impl Normalize {
    /// Fold nothing: strings compare exactly as generated.
    pub const NONE: Self = Self {
        case: false,
        whitespace: false,
        punctuation: false,
    };
}

/// Unicode punctuation plus ASCII punctuation (see [`Normalize::punctuation`]).
static PUNCTUATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[\p{P}[:punct:]]").expect("a valid regex"));

/// `text` with what `n` says folded away, in SQuAD's order: case, punctuation, whitespace.
pub fn normalize(text: &str, n: &Normalize) -> String {
    let mut s = if n.case {
        text.to_lowercase()
    } else {
        text.to_owned()
    };
    if n.punctuation {
        s = PUNCTUATION.replace_all(&s, "").into_owned();
    }
    if n.whitespace {
        s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    s
}

/// Whether `pred` and `reference` are equal after [`normalize`] (SQuAD's exact match).
pub fn exact_match(pred: &str, reference: &str, n: &Normalize) -> bool {
    normalize(pred, n) == normalize(reference, n)
}

/// The fraction of predictions that [`exact_match`] their reference (`Metric::ExactMatch`).
pub fn exact_match_rate(preds: &[&str], refs: &[&str], n: &Normalize) -> Result<f64> {
    check_pairs("exact_match", preds.len(), refs.len())?;
    let hits = preds
        .iter()
        .zip(refs)
        .filter(|(p, r)| exact_match(p, r, n))
        .count();
    Ok(hits as f64 / preds.len() as f64)
}

/// Equal, nonzero lengths, or [`TrainError::ScoreInput`].
fn check_pairs(metric: &'static str, preds: usize, refs: usize) -> Result<()> {
    let message = if preds != refs {
        format!("{preds} predictions for {refs} references; each reference needs one prediction")
    } else if preds == 0 {
        "no examples to score: the score of an empty set is undefined".to_owned()
    } else {
        return Ok(());
    };
    Err(TrainError::ScoreInput { metric, message })
}

/// `num / den`, or 0 when `den` is 0 (scikit-learn's `zero_division=0`).
fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// F1 from counts: 2·tp / (2·tp + fp + fn), the harmonic mean of precision and recall written
/// as scikit-learn's `precision_recall_fscore_support` computes it; 0 when nothing was
/// predicted nor expected.
fn f1(tp: usize, fp: usize, fn_: usize) -> f64 {
    ratio(2 * tp, 2 * tp + fp + fn_)
}

// ---- classification ----

/// The column of [`Classification::confusion`] that counts predictions outside the label set.
pub const OTHER_COLUMN: &str = "(other)";

/// Scores of one label of a [`Classification`] (scikit-learn's `classification_report` row).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    /// The label as given to [`classification`].
    pub label: String,
    /// Correct predictions of this label over all predictions of it; 0 when never predicted.
    pub precision: f64,
    /// Correct predictions of this label over its references; 0 when `support` is 0.
    pub recall: f64,
    /// 2·tp / (2·tp + fp + fn); 0 when the label is neither predicted nor expected.
    pub f1: f64,
    /// How many references hold this label.
    pub support: usize,
}

/// What [`classification`] returns: each completion read as one label of a fixed set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// The label set as given, in its order (rows and columns of `confusion`).
    pub labels: Vec<String>,
    /// Correct predictions over all examples; a prediction outside the label set is wrong.
    pub accuracy: f64,
    /// The unweighted mean of the per-label F1 over every given label, also those with no
    /// support: scikit-learn's `f1_score(y_true, y_pred, labels=labels, average="macro",
    /// zero_division=0)`.
    pub macro_f1: f64,
    /// One entry per label, in the order of `labels`.
    pub per_label: Vec<LabelScore>,
    /// `confusion[r][p]`: examples whose reference is label `r` and prediction label `p`; the
    /// last column ([`OTHER_COLUMN`]) counts predictions that match no label.
    pub confusion: Vec<Vec<usize>>,
    /// Predictions that match no label after normalisation (the last column's total).
    pub outside_label_set: usize,
    /// The number of examples.
    pub n: usize,
}

/// Scores predictions as labels: each prediction, reference and label is [`normalize`]d, and a
/// prediction matches a label when the two are equal (a prediction that only contains a label,
/// "The answer is positive", matches nothing).
///
/// Errors ([`TrainError::ScoreInput`]): lengths differ or are 0, the label set is empty, or
/// two labels normalise to the same string. A reference outside the label set is an error
/// too ([`TrainError::ReferenceOutsideLabels`], naming its row): the label set is then wrong,
/// and dropping or counting that row would quietly change every score.
pub fn classification(
    preds: &[&str],
    refs: &[&str],
    labels: &[String],
    n: &Normalize,
) -> Result<Classification> {
    const METRIC: &str = "classification";
    check_pairs(METRIC, preds.len(), refs.len())?;
    if labels.is_empty() {
        return Err(TrainError::ScoreInput {
            metric: METRIC,
            message: "the label set is empty; give the labels, or take them from the references (`labels_from`)".to_owned(),
        });
    }
    let mut index = HashMap::with_capacity(labels.len());
    for (i, label) in labels.iter().enumerate() {
        if let Some(j) = index.insert(normalize(label, n), i) {
            return Err(TrainError::ScoreInput {
                metric: METRIC,
                message: format!(
                    "labels {:?} and {label:?} are the same after normalisation; keep one",
                    labels[j]
                ),
            });
        }
    }
    let k = labels.len();
    let mut confusion = vec![vec![0usize; k + 1]; k];
    for (row, (pred, reference)) in preds.iter().zip(refs).enumerate() {
        let r = *index.get(&normalize(reference, n)).ok_or_else(|| {
            TrainError::ReferenceOutsideLabels {
                row,
                reference: (*reference).to_owned(),
                labels: list_for_error(labels),
            }
        })?;
        let p = index.get(&normalize(pred, n)).copied().unwrap_or(k);
        confusion[r][p] += 1;
    }

    let per_label: Vec<LabelScore> = (0..k)
        .map(|i| {
            let tp = confusion[i][i];
            let support: usize = confusion[i].iter().sum();
            let predicted: usize = confusion.iter().map(|row| row[i]).sum();
            LabelScore {
                label: labels[i].clone(),
                precision: ratio(tp, predicted),
                recall: ratio(tp, support),
                f1: f1(tp, predicted - tp, support - tp),
                support,
            }
        })
        .collect();
    let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
    Ok(Classification {
        labels: labels.to_vec(),
        accuracy: ratio(correct, preds.len()),
        macro_f1: per_label.iter().map(|s| s.f1).sum::<f64>() / k as f64,
        per_label,
        outside_label_set: confusion.iter().map(|row| row[k]).sum(),
        confusion,
        n: preds.len(),
    })
}

/// The first labels of a set, for an error message.
fn list_for_error(labels: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = labels
        .iter()
        .take(SHOWN)
        .map(|l| format!("{l:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if labels.len() > SHOWN {
        s.push_str(&format!(", ... ({} in all)", labels.len()));
    }
    s
}

/// The label set implied by the references: their distinct [`normalize`]d forms, sorted by
/// code point (Rust's `str` order), for when the user names no labels.
pub fn labels_from(refs: &[&str], n: &Normalize) -> Vec<String> {
    refs.iter()
        .map(|r| normalize(r, n))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

impl Classification {
    /// The confusion matrix as a Markdown table: a row per reference label, a column per
    /// predicted label and a last [`OTHER_COLUMN`]; `|` in a label is escaped.
    pub fn to_markdown(&self) -> String {
        let cell = |s: &str| s.replace('|', "\\|");
        let mut out = String::from("| reference \\ predicted |");
        for label in &self.labels {
            out.push_str(&format!(" {} |", cell(label)));
        }
        out.push_str(&format!(" {OTHER_COLUMN} |\n|---|"));
        out.push_str(&"---:|".repeat(self.labels.len() + 1));
        out.push('\n');
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            out.push_str(&format!("| {} |", cell(label)));
            for count in row {
                out.push_str(&format!(" {count} |"));
            }
            out.push('\n');
        }
        out
    }
}

// ---- entity F1 ----

/// At most this many entities of one completion are scored; the rest are dropped and the
/// example counted in [`EntityScores::truncated`]. Completions are model outputs bounded by
/// the generation length, and a reference with more entities than this is not a fine-tuning
/// example; the cap keeps a runaway generation from dominating the counts.
pub const MAX_ENTITIES_PER_EXAMPLE: usize = 1024;

/// Span keys accepted in a JSON list item, the first one present wins.
const SPAN_KEYS: [&str; 5] = ["text", "span", "value", "word", "entity"];
/// Type keys accepted in a JSON list item, the first one present that is not the span key
/// wins: `"entity"` is the span of `{"type": "LOC", "entity": "Paris"}` and the type of
/// `{"entity": "LOC", "text": "Paris"}` (Hugging Face's pipeline output names them
/// `entity_group` and `word`).
const TYPE_KEYS: [&str; 5] = ["type", "label", "entity_type", "entity_group", "entity"];

/// Counts and scores of (type, span) pairs, micro-averaged (summed before dividing).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prf {
    /// Predicted pairs that the reference holds (multiset intersection).
    pub true_pos: usize,
    /// Predicted pairs beyond those the reference holds.
    pub false_pos: usize,
    /// Reference pairs that were not predicted.
    pub false_neg: usize,
    /// tp / (tp + fp); 0 when nothing was predicted.
    pub precision: f64,
    /// tp / (tp + fn); 0 when nothing was expected.
    pub recall: f64,
    /// 2·tp / (2·tp + fp + fn); 0 when nothing was predicted nor expected.
    pub f1: f64,
}

impl Prf {
    /// Scores from counts (seqeval / CoNLL-2003's micro precision, recall, F1).
    fn from_counts(true_pos: usize, false_pos: usize, false_neg: usize) -> Self {
        Self {
            true_pos,
            false_pos,
            false_neg,
            precision: ratio(true_pos, true_pos + false_pos),
            recall: ratio(true_pos, true_pos + false_neg),
            f1: f1(true_pos, false_pos, false_neg),
        }
    }
}

/// What [`entity_f1`] returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityScores {
    /// Over every type (`Metric::EntityF1` is `overall.f1`).
    pub overall: Prf,
    /// Per normalised type, for every type seen in a prediction or a reference.
    pub per_type: BTreeMap<String, Prf>,
    /// Predictions that could not be read as an entity list; scored as predicting none.
    pub unparseable: usize,
    /// Examples whose prediction or reference held more than [`MAX_ENTITIES_PER_EXAMPLE`].
    pub truncated: usize,
    /// The number of examples.
    pub n: usize,
}

/// Scores extraction: each prediction and reference is read as a multiset of (type, span)
/// pairs, both [`normalize`]d, and a predicted pair counts as correct when the reference holds
/// it (exact match of type and span, as seqeval and the CoNLL-2003 script score spans, here on
/// strings instead of token offsets). Counts are summed over the examples, then
/// precision, recall and F1 computed once (micro average), overall and per type.
///
/// A completion is one of (optionally inside a Markdown code fence):
/// - a JSON object of type to span(s): `{"PER": ["Ada", "Bob"], "LOC": "Paris"}` (a number
///   is read as its JSON text, `null` or `[]` as no span);
/// - a JSON list of objects, each with a span key (`text`, `span`, `value`, `word`, `entity`)
///   and a type key (`type`, `label`, `entity_type`, `entity_group`, `entity`):
///   `[{"type": "PER", "text": "Ada"}]`;
/// - lines `type: span` (split at the first colon; blank lines and a leading `- ` or `* `
///   skipped);
/// - empty or blank: no entities.
///
/// A prediction in none of these forms predicts nothing and is counted in `unparseable`; a
/// reference in none of them is [`TrainError::UnparseableReference`]. JSON is read with
/// serde_json's nesting limit (128), so deep nesting is a parse error, not a stack overflow.
pub fn entity_f1(preds: &[&str], refs: &[&str], n: &Normalize) -> Result<EntityScores> {
    check_pairs("entity_f1", preds.len(), refs.len())?;
    // type -> (tp, fp, fn)
    let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let (mut unparseable, mut truncated) = (0, 0);
    for (row, (pred, reference)) in preds.iter().zip(refs).enumerate() {
        let (expected, ref_cut) = match parse_entities(reference, n) {
            Ok(parsed) => parsed,
            Err(reason) => return Err(TrainError::UnparseableReference { row, reason }),
        };
        let (predicted, pred_cut) = parse_entities(pred, n).unwrap_or_else(|_| {
            unparseable += 1;
            (Vec::new(), false)
        });
        truncated += usize::from(ref_cut || pred_cut);
        // (type, span) -> (times predicted, times expected)
        let mut pairs: HashMap<(String, String), (usize, usize)> = HashMap::new();
        for pair in predicted {
            pairs.entry(pair).or_default().0 += 1;
        }
        for pair in expected {
            pairs.entry(pair).or_default().1 += 1;
        }
        for ((kind, _), (p, e)) in pairs {
            let tp = p.min(e);
            let c = counts.entry(kind).or_default();
            c.0 += tp;
            c.1 += p - tp;
            c.2 += e - tp;
        }
    }
    let (tp, fp, fn_) = counts
        .values()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    Ok(EntityScores {
        overall: Prf::from_counts(tp, fp, fn_),
        per_type: counts
            .into_iter()
            .map(|(kind, (tp, fp, fn_))| (kind, Prf::from_counts(tp, fp, fn_)))
            .collect(),
        unparseable,
        truncated,
        n: preds.len(),
    })
}

/// One completion as normalised (type, span) pairs, at most [`MAX_ENTITIES_PER_EXAMPLE`] of
/// them, and whether more were dropped; `Err` says why it is no entity list.
fn parse_entities(
    text: &str,
    n: &Normalize,
) -> std::result::Result<(Vec<(String, String)>, bool), String> {
    let body = strip_code_fence(text.trim());
    let mut raw: Vec<(String, String)> = Vec::new();
    let mut push = |kind: &str, span: String| raw.push((kind.to_owned(), span));
    if body.starts_with('{') || body.starts_with('[') {
        let value: Value =
            serde_json::from_str(body).map_err(|e| format!("it starts as JSON but {e}"))?;
        match value {
            Value::Object(map) => {
                for (kind, spans) in &map {
                    match spans {
                        Value::Array(items) => {
                            for item in items {
                                push(kind, json_span(item, kind)?);
                            }
                        }
                        Value::Null => {}
                        single => push(kind, json_span(single, kind)?),
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let Value::Object(fields) = item else {
                        return Err(format!("item {i} of the JSON list is not an object"));
                    };
                    let (span_key, span) = first_key(fields, &SPAN_KEYS, "").ok_or_else(|| {
                        format!("item {i} has none of the span keys {SPAN_KEYS:?}")
                    })?;
                    let (_, kind) = first_key(fields, &TYPE_KEYS, span_key).ok_or_else(|| {
                        format!("item {i} has none of the type keys {TYPE_KEYS:?}")
                    })?;
                    let Value::String(kind) = kind else {
                        return Err(format!("item {i}'s type is not a string"));
                    };
                    push(kind, json_span(span, kind)?);
                }
            }
            _ => unreachable!("a JSON text starting with {{ or [ is an object or a list"),
        }
    } else {
        for (i, line) in body.lines().enumerate() {
            let line = line.trim();
            let line = line
                .strip_prefix("- ")
                .or_else(|| line.strip_prefix("* "))
                .unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let (kind, span) = line
                .split_once(':')
                .map(|(k, s)| (k.trim(), s.trim()))
                .filter(|(k, s)| !k.is_empty() && !s.is_empty())
                .ok_or_else(|| format!("line {} is not `type: span`", i + 1))?;
            push(kind, span.to_owned());
        }
    }
    let cut = raw.len() > MAX_ENTITIES_PER_EXAMPLE;
    let pairs = raw
        .into_iter()
        .take(MAX_ENTITIES_PER_EXAMPLE)
        .map(|(kind, span)| (normalize(&kind, n), normalize(&span, n)))
        .collect();
    Ok((pairs, cut))
}

/// The inside of a Markdown code fence (```` ```json ... ``` ````), or `text` unchanged.
fn strip_code_fence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    // Drop the info string ("json") with the opening line, and the closing fence if present.
    let rest = rest.split_once('\n').map_or("", |(_, body)| body);
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

/// The first of `keys`, other than `except`, that `fields` holds, and its value.
fn first_key<'a>(
    fields: &'a serde_json::Map<String, Value>,
    keys: &[&'static str],
    except: &str,
) -> Option<(&'static str, &'a Value)> {
    keys.iter()
        .filter(|&&k| k != except)
        .find_map(|&k| fields.get(k).map(|v| (k, v)))
}

/// A span as a string: a JSON string, or a number's JSON text.
fn json_span(value: &Value, kind: &str) -> std::result::Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(x) => Ok(x.to_string()),
        other => Err(format!(
            "a span of type {kind:?} is {}, not a string",
            json_kind(other)
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// ---- chrF++ ----

/// sacreBLEU's `CHRF` arguments. `Default` is chrF++ as `sacrebleu.metrics.CHRF(word_order=2)`
/// computes it (sacreBLEU 2.x; the signature `chrF2++|nc:6|nw:2|space:no|case:mixed|eff:yes`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChrfOptions {
    /// Character n-gram orders 1..=char_order (6).
    pub char_order: usize,
    /// Word n-gram orders 1..=word_order (2: chrF++; 0: chrF).
    pub word_order: usize,
    /// Recall weighs beta times as much as precision (2).
    pub beta: f64,
    /// Lowercase predictions and references first (false).
    pub lowercase: bool,
    /// Keep whitespace in character n-grams (false: removed before extracting them).
    pub whitespace: bool,
    /// false (sacreBLEU's default, "eff:yes"): average precision and recall over the orders
    /// where both prediction and reference have n-grams, then take one F-score of those means.
    /// true: the F-score of each order with 1e-16 standing in for an undefined precision,
    /// recall or F, averaged over all orders (chrF++.py, Moses and NLTK).
    pub eps_smoothing: bool,
}

impl Default for ChrfOptions {
    fn default() -> Self {
        Self {
            char_order: 6,
            word_order: 2,
            beta: 2.0,
            lowercase: false,
            whitespace: false,
            eps_smoothing: false,
        }
    }
}

/// chrF / chrF++ of a corpus (Popović 2015, 2017), on a 0 to 1 scale: sacreBLEU's
/// `CHRF(...).corpus_score(preds, [refs]).score / 100`, with one reference per prediction.
///
/// As sacreBLEU 2.x (`sacrebleu/metrics/chrf.py`): for every example and order it counts the
/// prediction's n-grams, the reference's n-grams and their clipped matches (min of the two
/// counts per n-gram), where the prediction's count is taken as 0 when the reference has no
/// n-gram of that order; these statistics are summed over the corpus and one F-score is
/// computed from the sums (see [`ChrfOptions::eps_smoothing`]). Character n-grams are taken
/// from the text with whitespace removed (Python's `str.split` whitespace, which adds
/// U+001C..U+001F to Unicode's); words are its whitespace-separated tokens with one ASCII
/// punctuation character split off the end, or else the start, of each token longer than one
/// character (`_remove_punctuation`).
///
/// Errors ([`TrainError::ScoreInput`]): lengths differ or are 0 (sacreBLEU raises too), or
/// both orders are 0.
pub fn chrf(preds: &[&str], refs: &[&str], opts: ChrfOptions) -> Result<f64> {
    check_pairs("chrf", preds.len(), refs.len())?;
    let orders = opts.char_order + opts.word_order;
    if orders == 0 {
        return Err(TrainError::ScoreInput {
            metric: "chrf",
            message: "char_order and word_order are both 0: no n-gram to compare".to_owned(),
        });
    }
    // Per order: [prediction n-grams, reference n-grams, matches], summed over the corpus.
    let mut totals = vec![[0u64; 3]; orders];
    for (pred, reference) in preds.iter().zip(refs) {
        let (pred, reference) = if opts.lowercase {
            (pred.to_lowercase(), reference.to_lowercase())
        } else {
            ((*pred).to_owned(), (*reference).to_owned())
        };
        let chars = |s: &str| -> Vec<char> {
            s.chars()
                .filter(|&c| opts.whitespace || !python_space(c))
                .collect()
        };
        let (pc, rc) = (chars(&pred), chars(&reference));
        for order in 1..=opts.char_order {
            add_stats(&mut totals[order - 1], &pc, &rc, order);
        }
        if opts.word_order > 0 {
            let (pw, rw) = (chrf_words(&pred), chrf_words(&reference));
            for order in 1..=opts.word_order {
                add_stats(&mut totals[opts.char_order + order - 1], &pw, &rw, order);
            }
        }
    }
    Ok(chrf_f_score(&totals, opts))
}

/// Python's `str.isspace`, which `str.split()` splits on: Unicode White_Space plus the
/// information separators U+001C..U+001F.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// sacreBLEU's `CHRF._remove_punctuation`: whitespace tokens, a token longer than one
/// character losing one trailing, or else one leading, ASCII punctuation character to a token
/// of its own ("(hi)" → "(hi", ")").
fn chrf_words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    for w in text.split(python_space).filter(|w| !w.is_empty()) {
        let mut chars = w.chars();
        let (first, last) = (chars.next(), chars.next_back());
        match (first, last) {
            (_, Some(l)) if l.is_ascii_punctuation() => {
                let cut = w.len() - 1;
                words.extend([&w[..cut], &w[cut..]]);
            }
            (Some(f), Some(_)) if f.is_ascii_punctuation() => {
                words.extend([&w[..1], &w[1..]]);
            }
            _ => words.push(w),
        }
    }
    words
}

/// Adds one example's statistics of one n-gram order (sacreBLEU's `_get_match_statistics`).
fn add_stats<T: Eq + Hash>(total: &mut [u64; 3], pred: &[T], reference: &[T], order: usize) {
    fn counts<T: Eq + Hash>(items: &[T], order: usize) -> HashMap<&[T], u64> {
        let mut m: HashMap<&[T], u64> = HashMap::new();
        for gram in items.windows(order) {
            *m.entry(gram).or_default() += 1;
        }
        m
    }
    let (p, r) = (counts(pred, order), counts(reference, order));
    let matches: u64 = p
        .iter()
        .map(|(gram, &c)| c.min(r.get(gram).copied().unwrap_or(0)))
        .sum();
    // "Don't count hits if no reference exists for that n-gram" (sacreBLEU).
    if !r.is_empty() {
        total[0] += p.values().sum::<u64>();
    }
    total[1] += r.values().sum::<u64>();
    total[2] += matches;
}

/// sacreBLEU's `CHRF._compute_f_score` without its final `100 *`, operation for operation.
fn chrf_f_score(totals: &[[u64; 3]], opts: ChrfOptions) -> f64 {
    const EPS: f64 = 1e-16;
    let factor = opts.beta * opts.beta;
    let (mut score, mut avg_prec, mut avg_rec, mut effective) = (0.0, 0.0, 0.0, 0usize);
    for &[n_hyp, n_ref, n_match] in totals {
        let prec = if n_hyp > 0 {
            n_match as f64 / n_hyp as f64
        } else {
            EPS
        };
        let rec = if n_ref > 0 {
            n_match as f64 / n_ref as f64
        } else {
            EPS
        };
        let denom = factor * prec + rec;
        score += if denom > 0.0 {
            (1.0 + factor) * prec * rec / denom
        } else {
            EPS
        };
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += prec;
            avg_rec += rec;
            effective += 1;
        }
    }
    if opts.eps_smoothing {
        return score / totals.len() as f64;
    }
    if effective == 0 {
        return 0.0;
    }
    avg_prec /= effective as f64;
    avg_rec /= effective as f64;
    if avg_prec + avg_rec == 0.0 {
        return 0.0;
    }
    (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec)
}

// ---- metric names ----

/// A task metric by name, as `[eval] metrics = [...]` and `whet eval --metric` spell it.
/// Each is a 0 to 1 score, higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// `exact_match`: [`exact_match_rate`].
    ExactMatch,
    /// `accuracy`: [`Classification::accuracy`].
    Accuracy,
    /// `macro_f1`: [`Classification::macro_f1`].
    MacroF1,
    /// `entity_f1`: [`EntityScores::overall`]'s F1.
    EntityF1,
    /// `chrf`: [`chrf`] with [`ChrfOptions::default`] (chrF++).
    Chrf,
}

impl Metric {
    /// Every metric, in the order of their names in error messages.
    pub const ALL: [Metric; 5] = [
        Self::ExactMatch,
        Self::Accuracy,
        Self::MacroF1,
        Self::EntityF1,
        Self::Chrf,
    ];

    /// The name a config or the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::ExactMatch => "exact_match",
            Self::Accuracy => "accuracy",
            Self::MacroF1 => "macro_f1",
            Self::EntityF1 => "entity_f1",
            Self::Chrf => "chrf",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = TrainError;

    /// Exactly one of the names of [`Metric::name`]; anything else is
    /// [`TrainError::UnknownMetric`], which lists them.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| TrainError::UnknownMetric {
                name: s.to_owned(),
                valid: Self::ALL.map(Metric::name).join(", "),
            })
    }
}

impl Serialize for Metric {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
