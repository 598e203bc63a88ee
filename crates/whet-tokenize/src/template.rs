//! Chat templates rendered with minijinja the way transformers' `apply_chat_template`
//! renders them with Jinja2, plus the character spans of the assistant turns.
//!
//! Environment (as transformers builds it): `trim_blocks` and `lstrip_blocks` on, the
//! trailing newline of the template dropped, loop controls, `raise_exception(msg)`,
//! `strftime_now(fmt)`, a `tojson` that formats like Python's `json.dumps`
//! (`ensure_ascii=False`), and Python string/dict/list methods (`.strip()`,
//! `.startswith()`, `.split()`, `.items()` ...) through minijinja-contrib's pycompat.
//! Variables: `messages`, `tools` (none), `documents` (none), `add_generation_prompt` and
//! the tokenizer's special tokens (`bos_token`, `eos_token`, ...).
//!
//! `{% generation %}...{% endgeneration %}` is rewritten to a call block, which is what
//! transformers' `AssistantTracker` extension compiles it to; the called function wraps the
//! block's output in two private-use marker characters that are removed after rendering,
//! leaving the spans. Templates without generation blocks get their assistant spans by
//! rendering prefixes of the conversation (see [`ChatTemplate::assistant_spans`]).
//!
//! Templates are untrusted input (they ship with downloaded models): every render runs
//! under the limits of [`limits`] (a step budget, a recursion limit, bounded output and
//! bounded filter results), and going over one is [`Error::TemplateLimit`], naming the
//! template and the limit. The Python-compatible filters live in `template/pycompat.rs`.

pub mod limits;
mod pycompat;
pub mod shipped;

use std::ops::Range;
use std::sync::OnceLock;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, State};
use regex::Regex;
use serde::{Deserialize, Serialize};
use whet_data::{Message, Role};

use crate::error::{Error, Result};

/// Opens a `{% generation %}` block in the raw render (a Unicode noncharacter).
const GEN_OPEN: char = '\u{FDD0}';
/// Closes a `{% generation %}` block in the raw render.
const GEN_CLOSE: char = '\u{FDD1}';
const TEMPLATE_NAME: &str = "chat_template";

/// Which assistant turns of a conversation are learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssistantTurns {
    /// Every assistant message.
    #[default]
    All,
    /// Only the last assistant message.
    Last,
}

/// A rendered conversation and the byte ranges (into `text`) that are learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Sorted, non-overlapping, non-empty byte ranges of `text`.
    pub spans: Vec<Range<usize>>,
    /// How the spans were found.
    pub method: SpanMethod,
}

/// How assistant spans were located.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanMethod {
    /// From `{% generation %}` blocks in the template.
    GenerationBlocks,
    /// By rendering prefixes of the conversation and taking the difference.
    PrefixDiff,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    /// Where the template came from (a file, a model folder), for errors.
    origin: String,
    env: Environment<'static>,
    has_generation: bool,
    special_tokens: Vec<(String, String)>,
    /// Control (special) token strings, longest first: what may follow assistant content
    /// as its end-of-turn when spans are found by prefix rendering.
    control_tokens: Vec<String>,
}

fn generation_open_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\{%(?P<l>[-+]?)\s*generation\s*(?P<r>[-+]?)%\}").expect("valid regex")
    })
}

fn generation_close_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"\{%(?P<l>[-+]?)\s*endgeneration\s*(?P<r>[-+]?)%\}").expect("valid regex")
    })
}

/// Rewrite `{% generation %}`/`{% endgeneration %}` (any whitespace control) into a call
/// block, keeping the whitespace-control modifiers so trimming is unchanged.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let open = generation_open_re();
    if !open.is_match(source) {
        return (source.to_owned(), false);
    }
    let s = open.replace_all(source, "{%${l} call __whet_generation() ${r}%}");
    let s = generation_close_re().replace_all(&s, "{%${l} endcall ${r}%}");
    (s.into_owned(), true)
}

impl ChatTemplate {
    /// Compile a chat template (the Jinja source as the model ships it).
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let (rewritten, has_generation) = rewrite_generation_tags(&source);
        if let Some((n, line)) = (rewritten.split('\n').enumerate())
            .find(|(_, line)| line.len() > limits::MAX_LINE_BYTES)
        {
            return Err(Error::TemplateSyntax {
                message: format!(
                    "line {} is {} bytes long; a template line may have at most {} (minijinja counts columns in 16 bits)",
                    n + 1,
                    line.len(),
                    limits::MAX_LINE_BYTES
                ),
            });
        }
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .map_err(|e| Error::TemplateSyntax {
                    message: e.to_string(),
                })?,
        );
        env.set_unknown_method_callback(pycompat::unknown_method_callback);
        env.set_recursion_limit(limits::RECURSION_LIMIT);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", pycompat::strftime_now);
        env.add_function("__whet_generation", generation_block);
        env.add_filter("tojson", pycompat::tojson);
        env.add_filter("format", pycompat::format_filter);
        env.add_template_owned(TEMPLATE_NAME, rewritten)
            .map_err(|e| Error::TemplateSyntax {
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            source,
            origin: "chat template".into(),
            env,
            has_generation,
            special_tokens: Vec::new(),
            control_tokens: Vec::new(),
        })
    }

    /// Template variables for the special tokens (`bos_token`, `eos_token`, ...), as
    /// transformers passes its `special_tokens_map`.
    pub fn with_special_tokens<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.special_tokens = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// The control-token strings that can close an assistant turn (used only where the
    /// template has no generation blocks).
    pub fn with_control_tokens<I, S>(mut self, tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut t: Vec<String> = tokens
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.is_empty())
            .collect();
        t.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        t.dedup();
        self.control_tokens = t;
        self
    }

    /// Where the template came from (e.g. `model/chat_template.jinja`), named by errors;
    /// "chat template" unless set.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// Where the template came from, as errors name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks assistant spans with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// Render like `apply_chat_template(messages, tokenize=False, add_generation_prompt=..)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let raw = self.render_raw(messages, add_generation_prompt)?;
        if self.has_generation {
            Ok(strip_markers(&raw)?.0)
        } else {
            Ok(raw)
        }
    }

    /// Render and return the spans of the `{% generation %}` blocks (empty without them).
    pub fn render_generation_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let raw = self.render_raw(messages, add_generation_prompt)?;
        let (text, spans) = strip_markers(&raw)?;
        Ok(Rendered {
            text,
            spans,
            method: SpanMethod::GenerationBlocks,
        })
    }

    /// Render a conversation for training (`add_generation_prompt=False`) with the byte
    /// spans of the assistant turns to learn.
    ///
    /// With generation blocks the spans are the blocks' output. Without them, for each
    /// assistant message `i` the conversation is rendered up to `i` (with the generation
    /// prompt, else without) and up to and including `i`; the difference holds the
    /// assistant turn, and within it the learned span is the message content (as is, else
    /// trimmed) plus the control tokens (end-of-turn, e.g. `<|im_end|>`, `<|eot_id|>`,
    /// `</s>`) that directly follow it, with any whitespace between. The span is then
    /// located in the full rendering (same offsets where the partial rendering is a prefix
    /// of it, else by searching forward, which covers templates such as Mistral's that
    /// move the system prompt into the last user turn).
    pub fn assistant_spans(&self, messages: &[Message], turns: AssistantTurns) -> Result<Rendered> {
        if self.has_generation {
            let mut r = self.render_generation_spans(messages, false)?;
            if turns == AssistantTurns::Last && r.spans.len() > 1 {
                r.spans = r.spans.split_off(r.spans.len() - 1);
            }
            return Ok(r);
        }
        let full = self.render_raw(messages, false)?;
        let mut targets: Vec<usize> = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Assistant)
            .map(|(i, _)| i)
            .collect();
        if turns == AssistantTurns::Last && targets.len() > 1 {
            targets = targets.split_off(targets.len() - 1);
        }
        let mut spans = Vec::with_capacity(targets.len());
        let mut cursor = 0usize;
        for i in targets {
            let upto = if i + 1 == messages.len() {
                full.clone()
            } else {
                self.render_raw(&messages[..=i], false)?
            };
            let base = if i == 0 {
                Some(0)
            } else {
                [true, false].into_iter().find_map(|agp| {
                    self.render_raw(&messages[..i], agp)
                        .ok()
                        .filter(|p| upto.starts_with(p.as_str()))
                        .map(|p| p.len())
                })
            };
            let content = messages[i].content.as_str();
            let found = match base {
                Some(b) => locate_content(&upto, b, content, false),
                None => locate_content(&upto, 0, content, true),
            };
            let Some((lo, hi)) = found else {
                return Err(Error::AssistantSpan {
                    turn: i,
                    role: messages[i].role.as_str(),
                    what: "its content does not appear in the rendered text".into(),
                });
            };
            let hi = self.extend_over_end_of_turn(&upto, hi);
            let learned = &upto[lo..hi];
            let pos = if lo >= cursor && full.as_bytes().get(..hi) == upto.as_bytes().get(..hi) {
                Some(lo)
            } else {
                full[cursor..].find(learned).map(|p| p + cursor)
            };
            let Some(pos) = pos else {
                return Err(Error::AssistantSpan {
                    turn: i,
                    role: messages[i].role.as_str(),
                    what: format!(
                        "the turn `{}` is not in the full rendering",
                        learned.escape_debug()
                    ),
                });
            };
            if hi > lo {
                spans.push(pos..pos + (hi - lo));
            }
            cursor = pos + (hi - lo);
        }
        Ok(Rendered {
            text: full,
            spans,
            method: SpanMethod::PrefixDiff,
        })
    }

    /// Extend `end` over optional whitespace and then the control tokens directly after it.
    fn extend_over_end_of_turn(&self, text: &str, end: usize) -> usize {
        let rest = &text[end..];
        let trimmed = rest.trim_start();
        let ws = rest.len() - trimmed.len();
        let mut pos = ws;
        let mut matched = false;
        loop {
            let tail = &rest[pos..];
            match self
                .control_tokens
                .iter()
                .find(|t| tail.starts_with(t.as_str()))
            {
                Some(t) => {
                    pos += t.len();
                    matched = true;
                }
                None => break,
            }
        }
        if matched { end + pos } else { end }
    }

    fn render_raw(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if self.has_generation {
            for m in messages {
                if m.content.contains([GEN_OPEN, GEN_CLOSE]) {
                    return Err(Error::TemplateRender {
                        message: "a message contains U+FDD0/U+FDD1, which mark generation blocks; remove them".into(),
                    });
                }
            }
        }
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(8 + self.special_tokens.len());
        for (k, v) in &self.special_tokens {
            ctx.push((k.clone(), Value::from(v.as_str())));
        }
        ctx.push(("messages".into(), Value::from(msgs)));
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let content_bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        let fuel = limits::fuel_budget(messages.len(), content_bytes);
        // The budget grows with the conversation, so each render gets its own environment
        // (a clone shares the compiled template and the filter tables).
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel));
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::TemplateSyntax {
                message: describe(&e),
            })?;
        let mut out = limits::CappedWriter {
            buf: Vec::new(),
            max: limits::max_output(content_bytes),
            full: false,
        };
        // Everything the template creates is dropped inside, on the render's own stack;
        // the error is turned into text there too (minijinja's carries the template's
        // variables).
        stacker::grow(limits::stack_bytes(fuel), || {
            let rendered = tmpl.render_captured_to(Value::from_pairs(ctx), &mut out);
            rendered
                .map(drop)
                .map_err(|e| match limits::exceeded(&e, out.full) {
                    Some((limit, what)) => Error::TemplateLimit {
                        template: self.origin.clone(),
                        limit,
                        what: if out.full {
                            format!("the rendered text is over {} bytes", out.max)
                        } else if e.kind() == ErrorKind::OutOfFuel {
                            format!("the render used all of its {fuel} fuel")
                        } else {
                            what
                        },
                    },
                    None => Error::TemplateRender {
                        message: describe(&e),
                    },
                })
        })?;
        String::from_utf8(out.buf).map_err(|e| Error::TemplateRender {
            message: format!("the rendered text is not UTF-8: {e}"),
        })
    }
}

/// Render an untrusted template over untrusted messages, as the fuzzing harness does:
/// `messages_json` is a JSON array of `{"role": .., "content": ..}` objects (serde_json's
/// nesting limit of 128 bounds its depth). The same as [`ChatTemplate::new`] followed by
/// [`ChatTemplate::render`], with no special tokens; every render runs under [`limits`].
pub fn render_untrusted(
    template_source: &str,
    messages_json: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let messages: Vec<Message> =
        serde_json::from_str(messages_json).map_err(|e| Error::TemplateRender {
            message: format!("messages are not a JSON list of {{role, content}}: {e}"),
        })?;
    ChatTemplate::new(template_source)?
        .with_origin("untrusted template")
        .render(&messages, add_generation_prompt)
}

/// Find the assistant content in `text[from..]` (first or last occurrence), as is or
/// trimmed; without it, the whole remainder minus trailing whitespace.
fn locate_content(text: &str, from: usize, content: &str, last: bool) -> Option<(usize, usize)> {
    let region = &text[from..];
    let find = |needle: &str| {
        if last {
            region.rfind(needle)
        } else {
            region.find(needle)
        }
    };
    if let Some(p) = find(content) {
        return Some((from + p, from + p + content.len()));
    }
    let trimmed = content.trim();
    if !trimmed.is_empty()
        && let Some(p) = find(trimmed)
    {
        return Some((from + p, from + p + trimmed.len()));
    }
    if last {
        return None;
    }
    let body = region.trim_end();
    let lead = body.len() - body.trim_start().len();
    (body.len() > lead).then_some((from + lead, from + body.len()))
}

/// Remove the generation markers, returning the text and the spans they enclosed.
fn strip_markers(raw: &str) -> Result<(String, Vec<Range<usize>>)> {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for c in raw.chars() {
        match c {
            GEN_OPEN => {
                if depth == 0 {
                    start = text.len();
                }
                depth += 1;
            }
            GEN_CLOSE => {
                if depth == 0 {
                    return Err(Error::TemplateRender {
                        message: "unbalanced generation block output".into(),
                    });
                }
                depth -= 1;
                if depth == 0 && text.len() > start {
                    spans.push(start..text.len());
                }
            }
            c => text.push(c),
        }
    }
    if depth != 0 {
        return Err(Error::TemplateRender {
            message: "unbalanced generation block output".into(),
        });
    }
    Ok((text, spans))
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn generation_block(
    state: &mut State,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let caller: Value = kwargs.get("caller")?;
    kwargs.assert_all_used()?;
    let body = caller.call(state, &[])?;
    let body = body
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    let mut out = String::with_capacity(body.len() + 6);
    out.push(GEN_OPEN);
    out.push_str(&body);
    out.push(GEN_CLOSE);
    Ok(Value::from_safe_string(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_are_rewritten_with_their_whitespace_control() {
        let (s, has) = rewrite_generation_tags("a{%- generation %}b{% endgeneration -%}c");
        assert!(has);
        assert_eq!(s, "a{%- call __whet_generation() %}b{% endcall -%}c");
        let (s, has) = rewrite_generation_tags("{{ 'generation' }}");
        assert!(!has);
        assert_eq!(s, "{{ 'generation' }}");
    }
}
