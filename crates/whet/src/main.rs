//! The `whet` command line. Each subcommand is a few lines of orchestration over the library
//! crates; see `whet --help`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use whet::runtime::Runtime;

#[derive(Parser)]
#[command(
    name = "whet",
    version,
    about = "Fine-tune Llama-family language models: continued pre-training, SFT and instruction tuning, with LoRA or full fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (CUDA needs a whet built with
    /// `--features cuda`, see `cargo xtask cuda-build`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// The forward's dtype: `auto` (bf16 on CUDA with f32 master weights and optimizer state,
    /// f32 on the CPU), `f32` or `bf16`.
    #[arg(long, global = true, default_value = "auto")]
    dtype: String,
    /// How each op runs: `auto` (whet's fused kernels; on CUDA after a self-check against the
    /// composed reference ops, any kernel that disagrees running as its reference), `check`
    /// (that self-check on any device), `fused`, `reference` (every op composed from candle
    /// primitives: slow, correct on any GPU), or `reference:OP,OP..` (e.g.
    /// `reference:attention`).
    #[arg(long, global = true, env = "WHET_KERNELS", default_value = "auto")]
    kernels: String,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML config (`recipes/*.toml`). `output.dir` must be new, empty, or this
    /// run's folder (its `.whet-run` file names the run), which the run resumes; whet never
    /// writes into a folder of other files.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, e.g. `--set train.lr=1e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Skip the base-vs-tuned report (generations and general-text loss).
        #[arg(long)]
        no_report: bool,
    },
    /// Mean cross-entropy of a model (and adapter) on a dataset, and with `--metric` task
    /// metrics of its greedy completions, as one JSON object.
    Eval {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_parser = whet::cli::shape_parser(), default_value = "auto")]
        format: whet_data::Shape,
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        #[command(flatten)]
        task: whet::cli::MetricArgs,
    },
    /// Generate a completion for a prompt.
    Generate {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        #[command(flatten)]
        sampling: whet::cli::GenerateArgs,
    },
    /// Chat with a model in the terminal through its chat template, the answer streamed as it
    /// is generated. Type /help for the commands (/reset, /system, /set, /settings, /quit).
    Chat {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        /// A system prompt (`/system TEXT` changes it).
        #[arg(long)]
        system: Option<String>,
        /// Answer every turn with the base model (the adapter off) and the tuned one.
        #[arg(long)]
        compare: bool,
        #[command(flatten)]
        sampling: whet::cli::SamplingArgs,
    },
    /// An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (streaming or
    /// not), /v1/models. Requests run one at a time, in order, behind a bounded queue.
    Serve {
        /// A Hugging Face model folder, served under its folder's name (or --name).
        #[arg(long)]
        model: PathBuf,
        /// The base model's name in requests.
        #[arg(long)]
        name: Option<String>,
        /// The chat template to use instead of the model's: a `.jinja` file, or a template whet
        /// ships (chatml, llama3, gemma, zephyr, phi3).
        #[arg(long, value_name = "FILE|NAME")]
        chat_template: Option<String>,
        /// A LoRA adapter on the base, served as NAME (repeatable).
        #[arg(long = "adapter", value_name = "NAME=DIR", value_parser = parse_adapter)]
        adapters: Vec<(String, PathBuf)>,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Requests that may wait behind the running one; more are answered 429.
        #[arg(long, default_value_t = 16)]
        queue: usize,
        /// `max_tokens` of a request that gives none.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
    },
    /// Convert a GGUF file into a Hugging Face folder.
    Convert(ConvertArgs),
    /// Merge a LoRA adapter into its base model (in f32) and write a Hugging Face folder.
    Merge {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        /// The folder to write: new, empty, or one an earlier `whet merge` wrote (replaced
        /// whole). A folder with other files is refused.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the model (with an adapter merged in) as one GGUF file for llama.cpp, or as a
    /// folder for Ollama (the GGUF and a Modelfile), then read it back and report the logit
    /// difference.
    #[command(group(clap::ArgGroup::new("to").required(true).args(["gguf", "ollama"])))]
    Export {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        /// The GGUF file to write (written under a temporary name, renamed once complete). An
        /// existing file is refused unless --force is given.
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// A folder for Ollama: `model.gguf` and a `Modelfile` (the chat template as Ollama's Go
        /// template, its default system prompt, the stop tokens); `ollama create NAME -f
        /// DIR/Modelfile`. The folder must be new, empty or an earlier `--ollama` export's
        /// (replaced whole). Chat templates of the ChatML, Llama 3, Gemma and Mistral families
        /// are translated; any other is refused before the work.
        #[arg(long)]
        ollama: Option<PathBuf>,
        /// Replace an existing --gguf file.
        #[arg(long)]
        force: bool,
        /// Matrix type: f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, f32.
        #[arg(long = "type", default_value = "q8_0")]
        ty: String,
        /// `general.name` in the file (default: the model folder's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Time a training step on random tokens (what `cargo xtask bench train-step` compares
    /// with PyTorch + PEFT); prints one JSON line.
    #[command(hide = true)]
    BenchStep(whet::bench::StepArgs),
    /// Look at a dataset before training on it.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!(
            "{s:?}: expected NAME=DIR, e.g. support=out/adapter"
        )),
    }
}

#[derive(Args)]
struct ConvertArgs {
    #[arg(long)]
    from_gguf: PathBuf,
    /// The folder to write: new, empty, or one an earlier `whet convert` wrote (replaced whole).
    /// A folder with other files is refused.
    #[arg(long)]
    out: PathBuf,
    /// Refuse a file whose sha256 differs from this (hex), or from a known model's (`smollm2`,
    /// `gemma3-270m`).
    #[arg(long)]
    check_sha256: Option<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Stream a corpus (any size, any format whet reads) into a token store on disk: scrubbed
    /// when asked, tokenized on all cores, long documents in windows, memory bounded by
    /// `--memory-mb`; `prepare.json` beside it says what was done.
    Prepare {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        model: PathBuf,
        /// The store folder (new, empty, or an older store, which is replaced whole).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_parser = whet::cli::shape_parser(), default_value = "auto")]
        format: whet_data::Shape,
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        #[arg(long)]
        skip_invalid: bool,
        #[arg(long)]
        scrub_pii: bool,
        /// Mark exact and near-duplicate documents (MinHash over token ids) dropped: training
        /// skips them.
        #[arg(long)]
        dedup: bool,
        /// Memory for the text being tokenized and the shard being written, in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mb: usize,
        /// The chat template to use instead of the model's: a `.jinja` file, or a template whet
        /// ships (chatml, llama3, gemma, zephyr, phi3).
        #[arg(long, value_name = "FILE|NAME")]
        chat_template: Option<String>,
    },
    /// Rows, tokens, supervision, truncation, BOS/EOS, PII, duplicates, leakage, and one rendered
    /// example with the learned tokens marked.
    Inspect {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        validation: Option<PathBuf>,
        #[arg(long, value_parser = whet::cli::shape_parser(), default_value = "auto")]
        format: whet_data::Shape,
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        #[arg(long)]
        skip_invalid: bool,
        /// Read preference pairs (prompt, chosen, rejected) as a `[preference]` run does.
        #[arg(long)]
        pairs: bool,
        /// The chat template to use instead of the model's: a `.jinja` file, or a template whet
        /// ships (chatml, llama3, gemma, zephyr, phi3).
        #[arg(long, value_name = "FILE|NAME")]
        chat_template: Option<String>,
    },
}

/// Training allocates and frees tensors of a few MiB thousands of times a step. glibc serves
/// large ones with fresh `mmap`s and returns them (and the heap's free top) to the kernel on
/// free, so every step page-faults its working set in again: about 7% of a LoRA step's samples
/// in `perf`, and 49k faults a step for the LM head's 200 MiB logits buffer alone. Everything
/// is served from the heap (no `mmap`), and freed memory is never trimmed: the process keeps its
/// peak, which is what a training step needs again anyway. A SmolLM2 LoRA step then takes ~3k
/// page faults (`perf stat -e page-faults`, 1 vs 4 steps), with the same peak RSS within 1%.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1 is SIZE_MAX to glibc: never trim (mallopt(3)).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn main() -> std::process::ExitCode {
    // candle's element-wise ops (large adds and multiplies) split their work over a pool of
    // spinning worker threads beside rayon's, which runs the matmuls and whet's kernels: with
    // few cores the two pools fight, and the main thread spins waiting for a descheduled
    // worker. One thread for those memory-bound ops measured 1.3x faster on 2 cores (`whet
    // bench-step`). The user's own setting wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let cli = Cli::parse();
    // `data prepare` streams a corpus through allocations of every size: it keeps glibc's
    // defaults (large blocks mapped, freed memory trimmed), so its RSS follows its working set
    // rather than its largest document's high-water mark.
    if !matches!(
        cli.command,
        Command::Data {
            command: DataCommand::Prepare { .. }
        }
    ) {
        tune_malloc();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, not a backtrace: the message names the file, row and field.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // The one runtime of this process, passed to every command that loads a model.
    let rt = Runtime::new(&cli.device, &cli.dtype, &cli.kernels)?;
    match cli.command {
        Command::Train {
            config,
            overrides,
            no_report,
        } => whet::commands::train(&rt, &config, &overrides, !no_report),
        Command::Eval {
            model,
            data,
            format,
            max_len,
            task,
        } => whet::commands::eval(&rt, &model, &data, format, max_len, &task),
        Command::Generate { model, sampling } => whet::commands::generate(&rt, &model, &sampling),
        Command::Chat {
            model,
            system,
            compare,
            sampling,
        } => whet::commands::chat(&rt, &model, &sampling, system, compare),
        Command::Serve {
            model,
            chat_template,
            name,
            adapters,
            host,
            port,
            queue,
            max_tokens,
        } => whet::commands::serve(
            &rt,
            &model,
            chat_template.as_deref(),
            name.as_deref(),
            &adapters,
            &whet::serve::ServeOptions {
                host,
                port,
                queue,
                default_max_tokens: max_tokens,
            },
        ),
        Command::Convert(a) => {
            whet::commands::convert(&a.from_gguf, &a.out, a.check_sha256.as_deref())
        }
        Command::BenchStep(args) => whet::bench::train_step(&rt, &args),
        Command::Merge { model, out } => whet::commands::merge(&rt, &model, &out),
        Command::Export {
            model,
            gguf,
            ollama,
            ty,
            name,
            force,
        } => {
            let to = match (gguf, ollama) {
                (Some(path), _) => whet::commands::ExportTo::Gguf { path, force },
                (None, Some(dir)) => whet::commands::ExportTo::Ollama { dir },
                (None, None) => unreachable!("clap requires --gguf or --ollama"),
            };
            whet::commands::export(&rt, &model, &to, &ty, name.as_deref())
        }
        Command::Data {
            command:
                DataCommand::Prepare {
                    data,
                    model,
                    out,
                    format,
                    max_len,
                    skip_invalid,
                    scrub_pii,
                    dedup,
                    memory_mb,
                    chat_template,
                },
        } => whet::prepare::prepare(&whet::prepare::PrepareArgs {
            data: &data,
            model: &model,
            out: &out,
            chat_template: chat_template.as_deref(),
            format,
            max_len,
            skip_invalid,
            scrub_pii,
            dedup,
            memory_mb,
        })
        .map(|(_, s)| {
            println!(
                "{}: {} examples ({} skipped) -> {} documents ({} windows of long ones), {} tokens ({} learned) in {} shard(s); {:.1} MB of input in {:.1} s ({:.1} MB/s){}{}",
                out.display(),
                s.examples,
                s.skipped,
                s.documents,
                s.windows,
                s.tokens,
                s.learned,
                s.shards,
                s.input_bytes as f64 / 1e6,
                s.seconds,
                s.mb_per_s,
                if scrub_pii {
                    format!("; {} PII redactions (pii_audit.json)", s.pii_redactions)
                } else {
                    String::new()
                },
                match s.dedup {
                    Some(d) => format!(
                        "; {} duplicate documents dropped ({} exact, {} near)",
                        d.dropped(),
                        d.exact,
                        d.near
                    ),
                    None => String::new(),
                }
            )
        }),
        Command::Data {
            command:
                DataCommand::Inspect {
                    data,
                    model,
                    validation,
                    max_len,
                    skip_invalid,
                    pairs: true,
                    chat_template,
                    ..
                },
        } => whet::inspect::inspect_pairs(
            &data,
            validation.as_deref(),
            &model,
            chat_template.as_deref(),
            max_len,
            skip_invalid,
        ),
        Command::Data {
            command:
                DataCommand::Inspect {
                    data,
                    model,
                    validation,
                    format,
                    max_len,
                    skip_invalid,
                    chat_template,
                    ..
                },
        } => whet::inspect::inspect(
            &data,
            validation.as_deref(),
            &model,
            chat_template.as_deref(),
            format,
            max_len,
            skip_invalid,
        ),
    }
}
