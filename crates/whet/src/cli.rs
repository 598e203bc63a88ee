//! Argument groups shared by several subcommands.

use std::path::PathBuf;

use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use whet_data::Shape;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The chat template to use instead of the model's (a run's `data.chat_template`): a
    /// `.jinja` file, or a template whet ships (chatml, llama3, gemma, zephyr, phi3).
    #[arg(long, value_name = "FILE|NAME")]
    pub chat_template: Option<String>,
}

impl ModelArgs {
    /// The model's tokenizer, with `--chat-template` in place of its own template, else the
    /// adapter's `chat_template.jinja` (a run with `data.chat_template` saves it there).
    pub fn tokenizer(&self) -> anyhow::Result<whet_tokenize::Tokenizer> {
        let from_adapter = self
            .adapter
            .as_ref()
            .map(|a| a.join(crate::commands::CHAT_TEMPLATE_FILE))
            .filter(|p| p.is_file());
        match (&self.chat_template, from_adapter) {
            (Some(t), _) => {
                crate::runtime::load_tokenizer_with(&self.model, Some(t), "--chat-template")
            }
            (None, Some(file)) => crate::runtime::load_tokenizer_with(
                &self.model,
                file.to_str(),
                "--adapter's chat_template.jinja",
            ),
            (None, None) => crate::runtime::load_tokenizer(&self.model),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system prompt for `--chat`.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Sampling flags of `whet generate` and `whet chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `--format`: a record [`Shape`], spelled as `data.format` in a training config (`auto`,
/// `text`, `prompt-completion`, `chat`).
pub fn shape_parser() -> impl TypedValueParser<Value = Shape> {
    PossibleValuesParser::new(Shape::ALL.map(Shape::name)).map(|name| {
        Shape::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .unwrap_or_default()
    })
}

/// The task-metric flags of `whet eval`.
#[derive(Debug, Clone, Args)]
pub struct MetricArgs {
    /// A task metric of greedy completions against the references (repeatable): exact_match,
    /// accuracy, macro_f1, entity_f1, chrf.
    #[arg(long = "metric", value_name = "NAME")]
    pub metrics: Vec<whet_train::score::Metric>,
    /// A label of the label set of accuracy / macro_f1 (repeatable; default: the distinct
    /// references of the data).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// Tokens generated per example at most.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Score the first N examples only (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Compare as generated: keep case, whitespace and punctuation.
    #[arg(long)]
    pub exact: bool,
}
