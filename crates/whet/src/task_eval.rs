//! Task metrics: a completion is generated for each evaluation example (greedy, batched, one KV
//! cache per batch) and scored against the example's reference completion with
//! `whet_train::score` (exact match, accuracy and macro-F1 over a label set, entity F1, chrF++).
//! The report shows them for the base and the tuned model; `whet eval --metric` for one model.

use std::time::Instant;

use anyhow::{Result, bail};
use serde::Serialize;
use whet_data::{Example, Record, Role};
use whet_model::{Finish, Model, generate_batch};
use whet_tokenize::Tokenizer;
use whet_train::score::{self, ChrfOptions, Classification, EntityScores, Metric, Normalize};

use crate::prompt::{chat_ids, stop_tokens};

/// What scoring needs of one evaluation example.
#[derive(Debug, Clone)]
pub struct TaskExample {
    /// The prompt as training tokenized it, ready for generation: BOS + prompt for
    /// prompt/completion data, the chat template with the assistant's turn opened for chat data.
    pub prompt_ids: Vec<u32>,
    /// The completion the model should produce (the last assistant turn of a conversation).
    pub reference: String,
}

/// The evaluation examples as [`TaskExample`]s: prompt/completion records and conversations
/// that end in an assistant turn. A text record has no reference and is an error naming its
/// file and row; so is a conversation without an assistant turn.
pub fn task_examples(tok: &Tokenizer, examples: &[Example]) -> Result<Vec<TaskExample>> {
    examples
        .iter()
        .map(|e| {
            let (prompt_ids, reference) = match &e.record {
                Record::PromptCompletion { prompt, completion } => {
                    let mut ids = Vec::new();
                    if tok.adds_bos() {
                        ids.extend(tok.bos_id());
                    }
                    ids.extend(tok.encode_ids(prompt)?);
                    (ids, completion.clone())
                }
                Record::Conversation { messages } => {
                    let Some(last) = messages.iter().rposition(|m| m.role == Role::Assistant)
                    else {
                        bail!(
                            "{}: task metrics score the last assistant turn, and this conversation has none",
                            e.origin
                        );
                    };
                    (
                        chat_ids(tok, &messages[..last])?,
                        messages[last].content.clone(),
                    )
                }
                Record::Text { .. } => bail!(
                    "{}: task metrics need a reference completion (prompt/completion or chat data); this record is plain text",
                    e.origin
                ),
            };
            Ok(TaskExample {
                prompt_ids,
                reference,
            })
        })
        .collect()
}

/// The reference completion of a record: a prompt/completion's completion, a conversation's
/// last assistant turn; `None` for text and conversations without an assistant turn.
fn reference_of(record: &Record) -> Option<&str> {
    match record {
        Record::PromptCompletion { completion, .. } => Some(completion),
        Record::Conversation { messages } => messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Assistant)
            .map(|m| m.content.as_str()),
        Record::Text { .. } => None,
    }
}

/// The label set of `accuracy` / `macro_f1`: `given`, else the distinct normalised references
/// of `examples` (the training and validation examples: a label the training data lacks is
/// still a label).
pub fn label_set<'a>(
    given: Option<&[String]>,
    examples: impl IntoIterator<Item = &'a Example>,
    n: &Normalize,
) -> Vec<String> {
    if let Some(labels) = given {
        return labels.to_vec();
    }
    let refs: Vec<&str> = examples
        .into_iter()
        .filter_map(|e| reference_of(&e.record))
        .collect();
    score::labels_from(&refs, n)
}

/// The first `limit` of `examples` (0: all of them): the ones task metrics score.
pub fn first(examples: &[Example], limit: usize) -> &[Example] {
    match limit {
        0 => examples,
        n => &examples[..n.min(examples.len())],
    }
}

/// How to generate and score: `[eval]`'s metric settings.
#[derive(Debug, Clone)]
pub struct TaskSettings<'a> {
    pub metrics: &'a [Metric],
    /// The label set of `accuracy` / `macro_f1`; `None`: the distinct references.
    pub labels: Option<&'a [String]>,
    pub normalize: Normalize,
    pub max_new_tokens: usize,
    /// Prompts generated together.
    pub batch: usize,
    /// Prompts longer than this (tokens) are not generated for; counted in `skipped_long`.
    pub max_prompt_len: usize,
}

/// One model's task scores, as the report keeps them.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScores {
    /// Each requested metric's value, 0 to 1, in the order requested (`{"accuracy": 0.9, ...}`
    /// in report.json).
    #[serde(serialize_with = "as_map")]
    pub values: Vec<(Metric, f64)>,
    /// Examples scored.
    pub n: usize,
    /// Generations that ran into `max_new_tokens` before a stop token.
    pub hit_token_limit: usize,
    /// Examples whose prompt did not fit `data.max_len` (not scored).
    pub skipped_long: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entities: Option<EntityScores>,
    /// The first few (reference, prediction) pairs, to read what the model answered.
    pub samples: Vec<(String, String)>,
    /// Seconds spent generating.
    pub generate_s: f64,
}

fn as_map<S: serde::Serializer>(values: &[(Metric, f64)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(values.len()))?;
    for (metric, v) in values {
        m.serialize_entry(metric.name(), v)?;
    }
    m.end()
}

impl TaskScores {
    pub fn value(&self, metric: Metric) -> Option<f64> {
        self.values.iter().find(|(m, _)| *m == metric).map(|v| v.1)
    }
}

/// Examples listed in [`TaskScores::samples`].
const SAMPLES: usize = 5;

/// Generates a completion for every example with `model` and scores them.
pub fn score_model(
    model: &Model,
    tok: &Tokenizer,
    examples: &[TaskExample],
    s: &TaskSettings<'_>,
) -> Result<TaskScores> {
    let clock = Instant::now();
    let (fits, skipped_long): (Vec<&TaskExample>, Vec<&TaskExample>) = examples
        .iter()
        .partition(|e| e.prompt_ids.len() <= s.max_prompt_len);
    if fits.is_empty() {
        bail!(
            "task metrics: none of the {} evaluation prompts fits data.max_len = {} tokens",
            examples.len(),
            s.max_prompt_len
        );
    }
    let (predictions, hit_token_limit) = predict(model, tok, &fits, s)?;
    let generate_s = clock.elapsed().as_secs_f64();
    let refs: Vec<&str> = fits.iter().map(|e| e.reference.as_str()).collect();
    let preds: Vec<&str> = predictions.iter().map(String::as_str).collect();
    let n = &s.normalize;
    let mut values = Vec::with_capacity(s.metrics.len());
    let mut classification = None;
    let mut entities = None;
    for &metric in s.metrics {
        let value = match metric {
            Metric::ExactMatch => score::exact_match_rate(&preds, &refs, n)?,
            Metric::Accuracy | Metric::MacroF1 => {
                let c = match &classification {
                    Some(c) => c,
                    None => {
                        let labels = match s.labels {
                            Some(l) => l.to_vec(),
                            None => score::labels_from(&refs, n),
                        };
                        classification.insert(score::classification(&preds, &refs, &labels, n)?)
                    }
                };
                if metric == Metric::Accuracy {
                    c.accuracy
                } else {
                    c.macro_f1
                }
            }
            Metric::EntityF1 => {
                entities
                    .insert(score::entity_f1(&preds, &refs, n)?)
                    .overall
                    .f1
            }
            Metric::Chrf => score::chrf(&preds, &refs, ChrfOptions::default())?,
        };
        values.push((metric, value));
    }
    Ok(TaskScores {
        values,
        n: fits.len(),
        hit_token_limit,
        skipped_long: skipped_long.len(),
        classification,
        entities,
        samples: refs
            .iter()
            .zip(&predictions)
            .take(SAMPLES)
            .map(|(r, p)| (r.to_string(), p.clone()))
            .collect(),
        generate_s,
    })
}

/// Greedy completions in the examples' order, and how many ran into the token limit. The
/// prompts are generated in batches of similar length. A reference of one line keeps the
/// prediction's first line only (a label or a short answer; the base model tends to go on).
fn predict(
    model: &Model,
    tok: &Tokenizer,
    examples: &[&TaskExample],
    s: &TaskSettings<'_>,
) -> Result<(Vec<String>, usize)> {
    let mut cfg = whet_model::GenerationConfig::greedy(s.max_new_tokens);
    cfg.eos_token_ids = Some(stop_tokens(model, tok));
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].prompt_ids.len());
    let mut out = vec![String::new(); examples.len()];
    let mut hit_limit = 0;
    for chunk in order.chunks(s.batch.max(1)) {
        let prompts: Vec<&[u32]> = chunk
            .iter()
            .map(|&i| examples[i].prompt_ids.as_slice())
            .collect();
        for (&i, g) in chunk.iter().zip(generate_batch(model, &prompts, &cfg)?) {
            if g.finish == Finish::Length {
                hit_limit += 1;
            }
            let text = tok.decode(&g.ids, true)?;
            out[i] = if examples[i].reference.trim().contains('\n') {
                text
            } else {
                text.trim_start().lines().next().unwrap_or("").to_string()
            };
        }
    }
    Ok((out, hit_limit))
}

/// The task metrics the trainer scores during training (`train.select_by`,
/// `eval.metric_every`): generates for `examples` and returns the values of `settings.metrics`.
pub struct Scorer<'a> {
    pub tok: &'a Tokenizer,
    pub examples: &'a [TaskExample],
    pub settings: TaskSettings<'a>,
}

impl whet_train::TaskScorer for Scorer<'_> {
    fn names(&self) -> Vec<String> {
        self.settings
            .metrics
            .iter()
            .map(|m| m.name().to_string())
            .collect()
    }

    fn score(
        &mut self,
        model: &Model,
    ) -> std::result::Result<Vec<f64>, Box<dyn std::error::Error + Send + Sync>> {
        let scores = score_model(model, self.tok, self.examples, &self.settings)
            .map_err(|e| format!("{e:#}"))?;
        Ok(scores.values.iter().map(|(_, v)| *v).collect())
    }
}
