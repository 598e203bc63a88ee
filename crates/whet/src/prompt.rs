//! Prompts in, completions out: the prompt's token ids (chat template or raw text), the
//! generation settings and where generation stops, for `whet generate`, the report's generations
//! and the merge/export probes.

use anyhow::{Context, Result};
use whet_data::{Message, Role};
use whet_model::{GenerationConfig, Model};
use whet_tokenize::Tokenizer;

use crate::cli::SamplingArgs;

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

/// Prompt ids of a conversation: `messages` through the chat template, with the generation
/// prompt (the assistant's turn opened).
pub fn chat_ids(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    let template = tok
        .chat_template()
        .context("a chat needs a chat template in tokenizer_config.json or chat_template.jinja")?;
    let text = template.render(messages, true)?;
    Ok(tok.encode_ids(&text)?)
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

/// The tokens generation stops at: the model's `eos_token_id`s and the tokenizer's EOS (or
/// end-of-turn).
pub fn stop_tokens(model: &Model, tok: &Tokenizer) -> Vec<u32> {
    let mut eos = model.config().eos_token_ids();
    eos.push(tok.eos_id());
    eos
}

/// The sampling flags of `whet generate` and `whet chat`, stopping at [`stop_tokens`].
pub fn generation_config(g: &SamplingArgs, model: &Model, tok: &Tokenizer) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_k: g.top_k,
        top_p: g.top_p,
        repetition_penalty: g.repetition_penalty,
        seed: g.seed,
        eos_token_ids: Some(stop_tokens(model, tok)),
    }
}

/// The report's generations: greedy, at most `max_new_tokens`, a mild repetition penalty,
/// stopping at [`stop_tokens`].
pub fn report_generation_config(
    max_new_tokens: usize,
    model: &Model,
    tok: &Tokenizer,
) -> GenerationConfig {
    let mut cfg = GenerationConfig::greedy(max_new_tokens);
    cfg.eos_token_ids = Some(stop_tokens(model, tok));
    cfg.repetition_penalty = 1.1;
    cfg
}
