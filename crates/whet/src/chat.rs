//! `whet chat`: a multi-turn conversation through the model's chat template, the answer
//! printed token by token. The loop reads lines from any `BufRead` and writes to any `Write`
//! (the terminal in `whet chat`, buffers in the tests).
//!
//! Line protocol: a line is the user's turn; `/reset` forgets the conversation; `/system
//! TEXT` sets the system prompt (no text: none) and starts over; `/set KEY VALUE` changes a
//! sampling setting (`temperature`, `top_p`, `top_k`, `max_new_tokens`,
//! `repetition_penalty`, `seed`); `/settings` shows them; `/help`; `/quit` or end of input
//! ends the chat. With several models (`--compare`: base, then tuned) each answers in turn
//! under its label and keeps its own conversation.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use anyhow::{Result, bail};
use whet_data::{Message, Role};
use whet_model::{GenerationConfig, Model};
use whet_tokenize::Tokenizer;

use crate::prompt::chat_ids;
use crate::stream::TextStream;

const HELP: &str = "commands: /reset, /system [TEXT], /set KEY VALUE, /settings, /help, /quit";

/// One model of the chat and its side of the conversation.
struct Side<'a> {
    label: &'a str,
    model: &'a Model,
    history: Vec<Message>,
}

/// Runs the chat until `/quit` or the end of `input`. `models`: (label, model); with more
/// than one, every turn is answered by each, labelled. `cfg`'s seed is advanced by one per
/// turn, so sampled turns differ and a rerun is the same.
pub fn repl(
    tok: &Tokenizer,
    models: &[(&str, &Model)],
    system: Option<String>,
    mut cfg: GenerationConfig,
    input: impl BufRead,
    mut out: impl Write,
) -> Result<()> {
    if tok.chat_template().is_none() {
        bail!(
            "whet chat needs a chat template (tokenizer_config.json's chat_template or chat_template.jinja); use `whet generate` for plain text"
        );
    }
    let mut system = system;
    let mut sides: Vec<Side> = models
        .iter()
        .map(|&(label, model)| Side {
            label,
            model,
            history: Vec::new(),
        })
        .collect();
    let labelled = sides.len() > 1;
    let mut turn = 0u64;
    writeln!(out, "{HELP}")?;
    let mut lines = input.lines();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(command) = line.strip_prefix('/') {
            let (name, arg) = command.split_once(' ').unwrap_or((command, ""));
            let arg = arg.trim();
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    sides.iter_mut().for_each(|s| s.history.clear());
                    writeln!(out, "(conversation reset)")?;
                }
                "system" => {
                    system = (!arg.is_empty()).then(|| arg.to_string());
                    sides.iter_mut().for_each(|s| s.history.clear());
                    match &system {
                        Some(s) => writeln!(out, "(system prompt set: {s}; conversation reset)")?,
                        None => writeln!(out, "(no system prompt; conversation reset)")?,
                    }
                }
                "set" => match set(&mut cfg, arg) {
                    Ok(()) => writeln!(out, "({})", settings(&cfg))?,
                    Err(e) => writeln!(out, "error: {e:#}")?,
                },
                "settings" => writeln!(out, "({})", settings(&cfg))?,
                "help" => writeln!(out, "{HELP}")?,
                _ => writeln!(out, "error: unknown command /{name}; {HELP}")?,
            }
            continue;
        }
        let mut turn_cfg = cfg.clone();
        turn_cfg.seed = cfg.seed.wrapping_add(turn);
        turn += 1;
        for side in &mut sides {
            if labelled {
                write!(out, "[{}] ", side.label)?;
            }
            if let Err(e) = answer(tok, side, system.as_deref(), line, &turn_cfg, &mut out) {
                writeln!(out, "\nerror: {e:#}")?;
            }
        }
    }
    writeln!(out)?;
    Ok(())
}

/// One turn of one side: the conversation so far plus `user`, the answer streamed to `out` and
/// added to the conversation. Oldest turns are dropped while the prompt and the new tokens do
/// not fit the model's context.
fn answer(
    tok: &Tokenizer,
    side: &mut Side,
    system: Option<&str>,
    user: &str,
    cfg: &GenerationConfig,
    out: &mut impl Write,
) -> Result<()> {
    side.history.push(Message {
        role: Role::User,
        content: user.to_string(),
    });
    let context = side.model.config().max_position_embeddings;
    let ids = loop {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message {
                role: Role::System,
                content: s.to_string(),
            });
        }
        messages.extend(side.history.iter().cloned());
        let ids = chat_ids(tok, &messages)?;
        if ids.len() + cfg.max_new_tokens <= context || side.history.len() <= 1 {
            break ids;
        }
        side.history.drain(..2.min(side.history.len() - 1));
    };
    if ids.len() >= context {
        side.history.pop();
        bail!(
            "the prompt is {} tokens, the model's context {context}",
            ids.len()
        );
    }
    let mut cfg = cfg.clone();
    cfg.max_new_tokens = cfg.max_new_tokens.min(context - ids.len());
    let mut stream = TextStream::new(tok, &[]);
    let mut failed = None;
    let result = whet_model::generate_stream(side.model, &ids, &cfg, |id| {
        let piece = match stream.push(id) {
            Ok(p) => p,
            Err(e) => {
                failed = Some(e);
                return ControlFlow::Break(());
            }
        };
        match write!(out, "{}", piece.text).and_then(|()| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e.into());
                ControlFlow::Break(())
            }
        }
    });
    if let Some(e) = failed {
        side.history.pop();
        return Err(e);
    }
    if let Err(e) = result {
        side.history.pop();
        return Err(e.into());
    }
    let rest = stream.finish()?;
    writeln!(out, "{rest}")?;
    side.history.push(Message {
        role: Role::Assistant,
        content: stream.text().trim().to_string(),
    });
    Ok(())
}

fn settings(cfg: &GenerationConfig) -> String {
    format!(
        "temperature {}, top_p {}, top_k {}, max_new_tokens {}, repetition_penalty {}, seed {}",
        cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.repetition_penalty, cfg.seed
    )
}

/// `/set KEY VALUE`.
fn set(cfg: &mut GenerationConfig, arg: &str) -> Result<()> {
    let Some((key, value)) = arg.split_once(' ') else {
        bail!("usage: /set KEY VALUE, e.g. /set temperature 0.7");
    };
    let value = value.trim();
    let float = |lo_open: f64, hi: f64| -> Result<f64> {
        match value.parse::<f64>() {
            Ok(v) if v > lo_open && v <= hi => Ok(v),
            _ => bail!("{key} {value:?}: expected a number in ({lo_open}, {hi}]"),
        }
    };
    let int = || -> Result<u64> {
        value
            .parse::<u64>()
            .map_err(|_| anyhow::anyhow!("{key} {value:?}: expected a whole number"))
    };
    match key {
        "temperature" => {
            cfg.temperature = match value.parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => v,
                _ => bail!("temperature {value:?}: expected a number >= 0 (0 is greedy)"),
            }
        }
        "top_p" => cfg.top_p = float(0.0, 1.0)?,
        "repetition_penalty" => cfg.repetition_penalty = float(0.0, 100.0)?,
        "top_k" => cfg.top_k = int()? as usize,
        "max_new_tokens" | "max_tokens" => match int()? {
            0 => bail!("max_new_tokens 0: expected at least 1"),
            n => cfg.max_new_tokens = n as usize,
        },
        "seed" => cfg.seed = int()?,
        _ => bail!(
            "unknown setting {key:?}: temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed"
        ),
    }
    Ok(())
}
