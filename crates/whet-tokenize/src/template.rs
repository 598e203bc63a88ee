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

use std::ops::Range;
use std::sync::OnceLock;

use minijinja::value::{Kwargs, Value, ValueKind};
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
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_function("__whet_generation", generation_block);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, rewritten)
            .map_err(|e| Error::TemplateSyntax {
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            source,
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
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::TemplateSyntax {
                message: describe(&e),
            })?;
        tmpl.render(Value::from_pairs(ctx))
            .map_err(|e| Error::TemplateRender {
                message: describe(&e),
            })
    }
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

// ----------------------------------------------------------------------------------------
// tojson: Python's json.dumps(x, ensure_ascii=False, indent=.., separators=.., sort_keys=..)
// ----------------------------------------------------------------------------------------

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "indent must be an int or str")
            })?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().unwrap_or("").to_string())
                .collect();
            if parts.len() != 2 {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "separators must be (item_separator, key_separator)",
                ));
            }
            (parts[0].clone(), parts[1].clone())
        }
        _ => {
            if indent.is_some() {
                (",".to_string(), ": ".to_string())
            } else {
                (", ".to_string(), ": ".to_string())
            }
        }
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn json_err(what: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, what)
}

fn newline(style: &JsonStyle, level: usize, out: &mut String) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(
    v: &Value,
    style: &JsonStyle,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined => {
            return Err(json_err(
                "Object of type Undefined is not JSON serializable".into(),
            ));
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&py_float_repr(f));
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or(""), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, level + 1, out);
                write_json(item, style, level + 1, out)?;
            }
            newline(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or("").to_string(),
                    ValueKind::Number => {
                        if key.is_integer() {
                            key.to_string()
                        } else {
                            py_float_repr(f64::try_from(key.clone())?)
                        }
                    }
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
                    ValueKind::None => "null".into(),
                    other => {
                        return Err(json_err(format!(
                            "keys must be str, int, float, bool or None, not {other}"
                        )));
                    }
                };
                pairs.push((k, item));
            }
            if style.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, level + 1, out);
                write_json_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(item, style, level + 1, out)?;
            }
            newline(style, level, out);
            out.push('}');
        }
        other => {
            return Err(json_err(format!(
                "Object of type {other} is not JSON serializable"
            )));
        }
    }
    Ok(())
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                s.push_str(&"0".repeat(int_len - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        } else {
            s.push_str("0.");
            s.push_str(&"0".repeat((-exp - 1) as usize));
            s.push_str(&digits);
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        s.push('e');
        s.push(if exp < 0 { '-' } else { '+' });
        s.push_str(&format!("{:02}", exp.abs()));
    }
    s
}

// ----------------------------------------------------------------------------------------
// strftime_now: Python's datetime.now().strftime(fmt), in UTC.
// ----------------------------------------------------------------------------------------

fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(&fmt, secs)))
}

/// Format a Unix time (UTC) with the common C `strftime` directives.
pub(crate) fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let wd = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{:02}", m)),
            Some('d') => out.push_str(&format!("{:02}", d)),
            Some('e') => out.push_str(&format!("{:>2}", d)),
            Some('H') => out.push_str(&format!("{:02}", hh)),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{:02}", mm)),
            Some('S') => out.push_str(&format!("{:02}", ss)),
            Some('j') => out.push_str(&format!("{:03}", yday)),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('u') => out.push_str(&(wd + 1).to_string()),
            Some('w') => out.push_str(&((wd + 1) % 7).to_string()),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (123456.789, "123456.789"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y, %A %j %%", t),
            "29 Feb 2024, Thursday 060 %"
        );
        assert_eq!(strftime("%B %e %I%p", 0), "January  1 12AM");
    }

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
