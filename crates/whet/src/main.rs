//! The `whet` command line. Each subcommand is a few lines of orchestration over the library
//! crates; see `whet --help`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "whet",
    version,
    about = "Fine-tune Llama-family language models: continued pre-training, SFT and instruction tuning, with LoRA or full fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML config (`recipes/*.toml`); resumes when the output folder holds this run.
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
    /// Mean cross-entropy of a model (and adapter) on a dataset, as one JSON object.
    Eval {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        format: whet::cli::FormatArg,
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
    },
    /// Generate a completion for a prompt.
    Generate {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        #[command(flatten)]
        sampling: whet::cli::GenerateArgs,
    },
    /// Convert a GGUF file into a Hugging Face folder.
    Convert(ConvertArgs),
    /// Merge a LoRA adapter into its base model (in f32) and write a Hugging Face folder.
    Merge {
        #[command(flatten)]
        model: whet::cli::ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Time a training step on random tokens (what `cargo xtask bench train-step` compares
    /// with PyTorch + PEFT); prints one JSON line.
    #[command(hide = true)]
    BenchStep {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "lora")]
        method: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Look at a dataset before training on it.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Args)]
struct ConvertArgs {
    #[arg(long)]
    from_gguf: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Refuse a file whose sha256 differs from this (hex), or from a known model's (`smollm2`).
    #[arg(long)]
    check_sha256: Option<String>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Rows, tokens, supervision, truncation, BOS/EOS, PII, duplicates, leakage, and one rendered
    /// example with the learned tokens marked.
    Inspect {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        validation: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "auto")]
        format: whet::cli::FormatArg,
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
        #[arg(long)]
        skip_invalid: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain, not a backtrace: the message names the file, row and field.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            overrides,
            no_report,
        } => whet::commands::train(&config, &overrides, !no_report),
        Command::Eval {
            model,
            data,
            format,
            max_len,
        } => whet::commands::eval(&model, &data, format.into(), max_len),
        Command::Generate { model, sampling } => whet::commands::generate(&model, &sampling),
        Command::Convert(a) => {
            whet::commands::convert(&a.from_gguf, &a.out, a.check_sha256.as_deref())
        }
        Command::BenchStep {
            model,
            method,
            batch,
            seq,
            steps,
            warmup,
        } => whet::bench::train_step(&model, &method, batch, seq, steps, warmup),
        Command::Merge { model, out } => whet::commands::merge(&model, &out),
        Command::Data {
            command:
                DataCommand::Inspect {
                    data,
                    model,
                    validation,
                    format,
                    max_len,
                    skip_invalid,
                },
        } => whet::inspect::inspect(
            &data,
            validation.as_deref(),
            &model,
            format.into(),
            max_len,
            skip_invalid,
        ),
    }
}
