//! The end-of-run report: base vs tuned validation loss and perplexity, loss on held-out
//! general text (what general ability was lost), and generations side by side.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use serde::Serialize;
use whet_data::Shape;
use whet_data::atomic::{self, Existing};
use whet_model::Model;
use whet_tokenize::Tokenizer;
use whet_train::{Row, SetLoss, Summary, evaluate};

use crate::config::Config;
use crate::pipeline::DataReport;
use crate::prompt::{complete, prompt_ids, report_generation_config};
use crate::task_eval::{self, TaskExample, TaskScores, TaskSettings};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Losses {
    pub val_loss: Option<f64>,
    pub val_tokens: usize,
    pub general_loss: Option<f64>,
    pub general_tokens: usize,
    /// `[eval] sets`, in their order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<SetLoss>,
    /// Task metrics on the validation examples (`[eval] metrics`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskScores>,
    /// A preference run's validation pairs: rewards, margin, accuracy (`val_loss` is then the
    /// mean preference loss and `val_tokens` the pairs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<whet_train::preference::PreferenceMetrics>,
}

pub struct Measured {
    pub losses: Losses,
    /// (prompt, completion)
    pub generations: Vec<(String, String)>,
    /// Seconds spent scoring the losses.
    pub eval_s: f64,
    /// Seconds spent generating.
    pub generate_s: f64,
    /// Seconds spent generating and scoring for the task metrics.
    pub task_s: f64,
}

/// Where a run's wall time went, in seconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RunTime {
    /// Reading, scrubbing and tokenizing the data.
    pub data_s: f64,
    /// Loading the model (and quantizing it, for QLoRA).
    pub load_s: f64,
    /// Scoring the base model (validation, general text, named sets).
    pub base_eval_s: f64,
    /// The base model's generations for the report.
    pub base_generate_s: f64,
    /// The base model's task metrics (generation for every scored validation example).
    pub base_task_s: f64,
    /// The reference log-probabilities of a preference run, computed before training.
    pub reference_s: f64,
    /// The training loop: steps, validation during training, checkpoints.
    pub train: whet_train::TrainTime,
    /// Writing the adapter or model.
    pub save_s: f64,
    /// Scoring the tuned model.
    pub tuned_eval_s: f64,
    /// The tuned model's generations.
    pub tuned_generate_s: f64,
    /// The tuned model's task metrics.
    pub tuned_task_s: f64,
}

impl RunTime {
    /// The parts as (name, seconds), in the order they ran.
    pub fn parts(&self) -> [(&'static str, f64); 14] {
        [
            ("data", self.data_s),
            ("model load", self.load_s),
            ("base eval", self.base_eval_s),
            ("base generation", self.base_generate_s),
            ("base task metrics", self.base_task_s),
            ("reference log-probs", self.reference_s),
            ("training steps", self.train.steps_s),
            (
                "validation during training",
                self.train.eval_s - self.train.metric_s,
            ),
            ("task metrics during training", self.train.metric_s),
            ("checkpoints", self.train.checkpoint_s),
            ("saving", self.save_s),
            ("tuned eval", self.tuned_eval_s),
            ("tuned generation", self.tuned_generate_s),
            ("tuned task metrics", self.tuned_task_s),
        ]
    }

    /// One line: `data 0.4 s, model load 0.9 s, ...` (parts under 0.05 s left out).
    pub fn line(&self) -> String {
        self.parts()
            .iter()
            .filter(|(_, t)| *t >= 0.05)
            .map(|(n, t)| format!("{n} {t:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The rows the report scores a model on.
pub struct EvalRows<'a> {
    pub validation: &'a dyn whet_train::RowSource,
    /// Held-out general text (`eval.general_data`).
    pub general: Option<&'a [Row]>,
    /// `[eval] sets`, named.
    pub sets: &'a [(String, Vec<Row>)],
    /// The validation examples task metrics score, with the label set (`[eval] metrics`).
    pub task: Option<(&'a [TaskExample], &'a [String])>,
    /// A preference run's validation reference log-probabilities, computed before training;
    /// `None`: the model with its adapters off is the reference.
    pub reference: Option<&'a [whet_train::preference::SeqLogp]>,
}

/// Validation loss, general-text loss, the named sets' losses and the evaluation prompts'
/// generations of `model` now.
pub fn measure(
    model: &Model,
    tok: &Tokenizer,
    cfg: &Config,
    rows: &EvalRows<'_>,
    generations: bool,
    device: &Device,
) -> Result<Measured> {
    let EvalRows {
        validation,
        general,
        sets,
        task,
        reference,
    } = *rows;
    let mb = cfg.train.micro_batch;
    let clock = std::time::Instant::now();
    let mut losses = Losses::default();
    if let (false, Some(p)) = (validation.is_empty(), &cfg.preference) {
        let (l, m) = whet_train::trainer::evaluate_preference(
            model,
            &p.objective(),
            validation,
            reference,
            mb,
            device,
        )?;
        losses.val_loss = Some(l);
        losses.val_tokens = m.as_ref().map_or(0, |m| m.pairs);
        losses.preference = m;
    } else if !validation.is_empty() {
        let (l, n) = evaluate(model, validation, mb, device)?;
        losses.val_loss = Some(l);
        losses.val_tokens = n;
    }
    if let Some(rows) = general {
        let (l, n) = evaluate(model, rows, mb, device)?;
        losses.general_loss = Some(l);
        losses.general_tokens = n;
    }
    for (name, rows) in sets {
        let (loss, tokens) = evaluate(model, rows, mb, device)?;
        losses.sets.push(SetLoss {
            name: name.clone(),
            loss,
            ppl: loss.exp(),
            tokens,
        });
    }
    let eval_s = clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    if let Some((examples, labels)) = task {
        losses.task = Some(task_eval::score_model(
            model,
            tok,
            examples,
            &task_settings(cfg, labels),
        )?);
    }
    let task_s = clock.elapsed().as_secs_f64();
    let clock = std::time::Instant::now();
    let mut gens = Vec::new();
    if generations {
        let chat = tok.chat_template().is_some()
            && matches!(cfg.data.format, Shape::Conversation | Shape::Auto);
        let gcfg = report_generation_config(cfg.eval.max_new_tokens, model, tok);
        for prompt in &cfg.eval.prompts {
            let ids = prompt_ids(tok, prompt, chat, cfg.data.system_prompt.as_deref())?;
            gens.push((prompt.clone(), complete(model, tok, &ids, &gcfg)?));
        }
    }
    Ok(Measured {
        losses,
        generations: gens,
        eval_s,
        generate_s: clock.elapsed().as_secs_f64(),
        task_s,
    })
}

/// The task metrics of the evaluations during training that scored them (`eval.metric_every`,
/// `train.select_by`), a row per evaluation; nothing when none did.
fn during_training_markdown(s: &mut String, evals: &[whet_train::EvalMetrics]) {
    let scored: Vec<(
        &whet_train::EvalMetrics,
        &std::collections::BTreeMap<String, f64>,
    )> = evals
        .iter()
        .filter_map(|e| Some((e, e.task.as_ref()?)))
        .collect();
    let Some((_, first)) = scored.first() else {
        return;
    };
    let names: Vec<&String> = first.keys().collect();
    let _ = writeln!(s, "### Task metrics during training\n");
    let header: String = names.iter().map(|n| format!(" {n} |")).collect();
    let rule: String = names.iter().map(|_| "---|").collect();
    let _ = writeln!(
        s,
        "| step | validation loss |{header} |\n|---|---|{rule}---|"
    );
    for (e, values) in scored {
        let cells: String = names
            .iter()
            .map(|n| {
                format!(
                    " {} |",
                    values.get(*n).map_or("-".into(), |v| format!("{v:.4}"))
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} |{cells} {} |",
            e.step,
            fmt_loss(Some(e.val_loss)),
            if e.improved { "best so far" } else { "" }
        );
    }
    let _ = writeln!(s);
}

/// `[eval]`'s metric settings; prompts may take all of `data.max_len` but the new tokens.
pub fn task_settings<'a>(cfg: &'a Config, labels: &'a [String]) -> TaskSettings<'a> {
    TaskSettings {
        metrics: &cfg.eval.metrics,
        labels: Some(labels),
        normalize: cfg.eval.normalize,
        max_new_tokens: cfg.eval.max_new_tokens,
        batch: cfg.eval.metric_batch,
        max_prompt_len: cfg
            .data
            .max_len
            .saturating_sub(cfg.eval.max_new_tokens)
            .max(1),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt: String,
    pub base: String,
    pub tuned: String,
}

/// Where a run that continued from an adapter (`model.adapter`) came from.
#[derive(Debug, Clone, Serialize)]
pub struct ContinuedFrom {
    /// The adapter folder.
    pub adapter: PathBuf,
    /// sha256 of its `adapter_model.safetensors`.
    pub sha256: String,
    /// The whet run that wrote it (the `.whet-run` marker of its folder or the folder above), if
    /// a whet run did.
    pub run: Option<String>,
}

impl ContinuedFrom {
    pub fn of(adapter: &Path) -> Result<Self> {
        let weights = adapter.join(whet_model::lora::ADAPTER_WEIGHTS_FILE);
        Ok(ContinuedFrom {
            adapter: adapter.to_path_buf(),
            sha256: crate::commands::sha256_file(&weights)?,
            run: atomic::owner(adapter).or_else(|| adapter.parent().and_then(atomic::owner)),
        })
    }
}

#[derive(Serialize)]
pub struct Report {
    pub config: Config,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continued_from: Option<ContinuedFrom>,
    pub summary: Summary,
    pub data: DataReport,
    pub before: Losses,
    pub after: Losses,
    pub generations: Vec<Generation>,
    pub wall_time_s: f64,
    /// Where `wall_time_s` went.
    pub time: RunTime,
    pub output: PathBuf,
}

fn fmt_loss(l: Option<f64>) -> String {
    l.map_or("-".into(), |l| format!("{l:.4}"))
}

fn fmt_ppl(l: Option<f64>) -> String {
    l.map_or("-".into(), |l| format!("{:.2}", l.exp()))
}

fn delta(before: Option<f64>, after: Option<f64>) -> String {
    match (before, after) {
        (Some(b), Some(a)) => format!("{:+.4} ({:+.1}%)", a - b, 100.0 * (a - b) / b),
        _ => "-".into(),
    }
}

/// The task metrics section: each metric base vs tuned, the generations that hit the token
/// limit, the tuned model's confusion matrix or per-type entity scores, and a few answers.
pub fn task_markdown(s: &mut String, before: &TaskScores, after: &TaskScores) {
    let _ = writeln!(
        s,
        "## Task metrics ({} validation examples, greedy completions)\n",
        after.n
    );
    let _ = writeln!(s, "| metric | base | tuned | change |\n|---|---|---|---|");
    for ((m, b), (_, a)) in before.values.iter().zip(&after.values) {
        let _ = writeln!(s, "| {m} | {b:.4} | {a:.4} | {:+.4} |", a - b);
    }
    let _ = writeln!(
        s,
        "| answers cut at eval.max_new_tokens | {} | {} | |",
        before.hit_token_limit, after.hit_token_limit
    );
    if let (Some(b), Some(a)) = (&before.classification, &after.classification) {
        let _ = writeln!(
            s,
            "| answers outside the label set | {} | {} | |",
            b.outside_label_set, a.outside_label_set
        );
    }
    if after.skipped_long > 0 {
        let _ = writeln!(
            s,
            "\n{} examples were not scored: their prompt leaves no room for the answer within data.max_len.",
            after.skipped_long
        );
    }
    if let Some(c) = &after.classification {
        let _ = writeln!(
            s,
            "\nConfusion matrix of the tuned model (rows: reference, columns: answer):\n\n{}",
            c.to_markdown()
        );
    }
    if let Some(e) = &after.entities {
        let _ = writeln!(
            s,
            "\nEntities of the tuned model ({} answers unreadable):\n\n| type | precision | recall | F1 |\n|---|---|---|---|",
            e.unparseable
        );
        for (t, p) in &e.per_type {
            let _ = writeln!(
                s,
                "| {t} | {:.3} | {:.3} | {:.3} |",
                p.precision, p.recall, p.f1
            );
        }
    }
    if !after.samples.is_empty() {
        let _ = writeln!(
            s,
            "\n| reference | base answer | tuned answer |\n|---|---|---|"
        );
        let cell = |t: &str| t.trim().replace('|', "\\|").replace('\n', " ⏎ ");
        for ((r, b), (_, a)) in before.samples.iter().zip(&after.samples) {
            let _ = writeln!(s, "| {} | {} | {} |", cell(r), cell(b), cell(a));
        }
    }
    let _ = writeln!(s);
}

impl Report {
    pub fn headline(&self) -> String {
        let task = match (&self.before.task, &self.after.task) {
            (Some(b), Some(a)) => b
                .values
                .iter()
                .zip(&a.values)
                .map(|((m, x), (_, y))| format!(", {m} {x:.3} -> {y:.3}"))
                .collect::<String>(),
            _ => String::new(),
        };
        let task = match (&self.before.preference, &self.after.preference) {
            (Some(b), Some(a)) => format!(
                "{task}, reward accuracy {:.3} -> {:.3}, reward margin {:.4} -> {:.4}",
                b.reward_accuracy, a.reward_accuracy, b.reward_margin, a.reward_margin
            ),
            _ => task,
        };
        format!(
            "validation loss {} -> {}{task}, general-text loss {} -> {}, {} steps in {:.0} s",
            fmt_loss(self.before.val_loss),
            fmt_loss(self.after.val_loss),
            fmt_loss(self.before.general_loss),
            fmt_loss(self.after.general_loss),
            self.summary.steps,
            self.wall_time_s
        )
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(s, "# whet report\n");
        let _ = writeln!(
            s,
            "Model `{}`, method {:?}{}, {} optimizer steps ({} resumed), wall time {:.0} s.\n",
            c.model.path.display(),
            c.method,
            if c.method == crate::config::Method::Lora {
                format!(
                    " (r={}, alpha={}, targets {:?}{})",
                    c.lora.r,
                    c.lora.alpha,
                    c.lora.target_modules,
                    match &c.model.quantize {
                        // The base rows of the tables below are this quantized base.
                        Some(q) => format!("; QLoRA: base linear weights kept in {q}"),
                        None => String::new(),
                    }
                )
            } else {
                String::new()
            },
            self.summary.steps,
            self.summary.resumed_from,
            self.wall_time_s
        );
        if let Some(c) = &self.continued_from {
            let _ = writeln!(
                s,
                "Continued from the adapter `{}` (sha256 {}{}): the base column is that adapter.\n",
                c.adapter.display(),
                &c.sha256[..16.min(c.sha256.len())],
                c.run
                    .as_ref()
                    .map_or(String::new(), |r| format!(", written by whet run `{r}`"))
            );
        }
        if let (Some(b), Some(a)) = (&self.before.preference, &self.after.preference) {
            let _ = writeln!(
                s,
                "## Preference ({} validation pairs)\n\nThe loss rows below are the preference loss over pairs. A reward is beta times the policy's log-probability of an answer minus the reference's (DPO, IPO; for ORPO beta times the mean log-probability per token); accuracy is the share of pairs whose chosen answer has the larger reward.\n",
                a.pairs
            );
            let _ = writeln!(s, "| | base | tuned |\n|---|---|---|");
            let rows = [
                ("reward accuracy", b.reward_accuracy, a.reward_accuracy),
                ("reward margin", b.reward_margin, a.reward_margin),
                ("reward chosen", b.rewards_chosen, a.rewards_chosen),
                ("reward rejected", b.rewards_rejected, a.rewards_rejected),
                ("log-prob chosen", b.logps_chosen, a.logps_chosen),
            ];
            for (name, before, after) in rows {
                let _ = writeln!(s, "| {name} | {before:.4} | {after:.4} |");
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "## Loss\n");
        let _ = writeln!(s, "| | base | tuned | change |\n|---|---|---|---|");
        let preference = self.after.preference.is_some();
        let _ = writeln!(
            s,
            "| validation {}loss ({} {}) | {} | {} | {} |",
            if preference { "preference " } else { "" },
            self.after.val_tokens,
            if preference { "pairs" } else { "tokens" },
            fmt_loss(self.before.val_loss),
            fmt_loss(self.after.val_loss),
            delta(self.before.val_loss, self.after.val_loss)
        );
        if !preference {
            let _ = writeln!(
                s,
                "| validation perplexity | {} | {} | |",
                fmt_ppl(self.before.val_loss),
                fmt_ppl(self.after.val_loss)
            );
        }
        let _ = writeln!(
            s,
            "| general-text loss ({} tokens, forgetting check) | {} | {} | {} |",
            self.after.general_tokens,
            fmt_loss(self.before.general_loss),
            fmt_loss(self.after.general_loss),
            delta(self.before.general_loss, self.after.general_loss)
        );
        for (i, after) in self.after.sets.iter().enumerate() {
            let before = self.before.sets.get(i).map(|b| b.loss);
            let _ = writeln!(
                s,
                "| `{}` loss ({} tokens) | {} | {} | {} |",
                after.name,
                after.tokens,
                fmt_loss(before),
                fmt_loss(Some(after.loss)),
                delta(before, Some(after.loss))
            );
        }
        let best = match (
            self.config.train.select_by.metric(),
            self.summary.best_metric,
        ) {
            (Some(m), value) => format!(
                "Best checkpoint by {m} (`train.select_by`): {} at step {} (validation loss {})",
                value.map_or("-".into(), |v| format!("{v:.4}")),
                self.summary.best_step.map_or("-".into(), |s| s.to_string()),
                fmt_loss(self.summary.best_val_loss),
            ),
            (None, _) => format!(
                "Best validation loss {} at step {}",
                fmt_loss(self.summary.best_val_loss),
                self.summary.best_step.map_or("-".into(), |s| s.to_string()),
            ),
        };
        let _ = writeln!(
            s,
            "\nTraining loss {} -> {}. {best}{}.\n",
            fmt_loss(self.summary.first_loss),
            fmt_loss(self.summary.last_loss),
            if self.summary.stopped_early {
                " (stopped early)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "![loss curve](loss.svg)\n");
        if let (Some(b), Some(a)) = (&self.before.task, &self.after.task) {
            task_markdown(&mut s, b, a);
        }
        during_training_markdown(&mut s, &self.summary.evals);
        if !self.generations.is_empty() {
            let _ = writeln!(s, "## Generations (greedy)\n");
            for g in &self.generations {
                let _ = writeln!(s, "### Prompt\n\n> {}\n", g.prompt.replace('\n', "\n> "));
                let _ = writeln!(s, "**Base model**\n\n```text\n{}\n```\n", g.base.trim());
                let _ = writeln!(s, "**Tuned model**\n\n```text\n{}\n```\n", g.tuned.trim());
            }
        }
        let _ = writeln!(s, "## Where the time went\n");
        let _ = writeln!(s, "| part | seconds | share |\n|---|---|---|");
        let wall = self.wall_time_s.max(1e-9);
        let mut counted = 0.0;
        for (name, t) in self.time.parts() {
            counted += t;
            let _ = writeln!(s, "| {name} | {t:.1} | {:.0}% |", 100.0 * t / wall);
        }
        let rest = (self.wall_time_s - counted).max(0.0);
        let _ = writeln!(
            s,
            "| other (plots, report, setup) | {rest:.1} | {:.0}% |\n| **wall time** | {:.1} | |\n",
            100.0 * rest / wall,
            self.wall_time_s
        );
        let _ = writeln!(s, "## Data\n");
        let d = &self.data;
        let _ = writeln!(
            s,
            "- training examples: {}, validation examples: {}",
            d.train_examples, d.validation_examples
        );
        if let Some(t) = &d.train_tokenize {
            let _ = writeln!(
                s,
                "- training tokens: {} ({} supervised); rows truncated: {}, rows excluded: {}{}",
                t.tokens_out,
                t.supervised_tokens_out,
                t.rows_truncated,
                t.rows_excluded(),
                if t.rows_windowed > 0 {
                    format!(
                        "; long documents cut into windows: {} (-> {} windows)",
                        t.rows_windowed, t.windows
                    )
                } else {
                    String::new()
                }
            );
        }
        if let Some(p) = &d.train_pack {
            let _ = writeln!(
                s,
                "- packed into {} rows of {} tokens ({:.1}% filled)",
                p.rows,
                c.data.max_len,
                100.0 * p.efficiency()
            );
        }
        if !d.sources.is_empty() {
            let _ = writeln!(
                s,
                "\n### Data mixture\n\nRows and supervised tokens per epoch as planned, and the supervised tokens training took from each source (counted as it ran, resumed parts included).\n\n| source | path | weight | examples | rows available | rows per epoch | tokens per epoch | share of tokens | tokens trained on |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
            );
            let seen: u64 = self.summary.tokens_by_source.iter().map(|(_, n)| n).sum();
            for m in &d.sources {
                let trained = self
                    .summary
                    .tokens_by_source
                    .iter()
                    .find(|(name, _)| *name == m.name)
                    .map_or("-".into(), |(_, n)| {
                        format!("{n} ({:.1}%)", 100.0 * *n as f64 / seen.max(1) as f64)
                    });
                let _ = writeln!(
                    s,
                    "| {} | `{}` | {} | {} | {} | {} | {} | {:.1}% | {trained} |",
                    m.name,
                    m.path.display(),
                    m.weight,
                    m.examples_read,
                    m.rows_available,
                    m.rows_per_epoch,
                    m.tokens_per_epoch,
                    100.0 * m.token_share
                );
            }
            let _ = writeln!(s);
        }
        if let Some(path) = &d.pii_audit {
            let _ = writeln!(
                s,
                "- PII redactions: {} (audit: `{}`)",
                d.pii_redactions,
                path.display()
            );
        }
        if let Some(c) = &d.store_dedup {
            let _ = writeln!(
                s,
                "- duplicate documents dropped from the token store: {} ({} exact, {} near)",
                c.dropped(),
                c.exact,
                c.near
            );
        }
        if let Some(l) = &d.leakage {
            let _ = writeln!(
                s,
                "- train/validation leakage: {:.1}% of validation examples overlap train",
                100.0 * l.leaked_fraction()
            );
        }
        let _ = writeln!(
            s,
            "\nWeights: `{}`. Metrics per step: `metrics.jsonl`.",
            self.output.display()
        );
        s
    }

    /// Writes `report.md` and `report.json` into `out`; returns the Markdown path.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        let md = out.join("report.md");
        atomic::write_file(&md, self.markdown().as_bytes(), Existing::Replace)?;
        let json = serde_json::to_string_pretty(self)?;
        atomic::write_file(&out.join("report.json"), json.as_bytes(), Existing::Replace)?;
        Ok(md)
    }
}
