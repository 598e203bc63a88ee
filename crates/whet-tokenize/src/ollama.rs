//! An Ollama `Modelfile` for a tokenizer's chat template.
//!
//! Ollama renders prompts with Go's `text/template`, not Jinja, and a Jinja template cannot be
//! translated in general. Ollama itself matches a GGUF's Jinja template against a list of known
//! families; whet does the same: [`Family::detect`] recognises the family from the template's
//! control tokens, and [`Modelfile::from_tokenizer`] writes whet's Go template for it, the
//! family's stop tokens (and the tokenizer's EOS), and the template's default system prompt
//! (Modelfile `SYSTEM`, which Ollama inserts when a conversation has no system message).
//! Families: ChatML (`<|im_start|>`: SmolLM2, Qwen2), Llama 3 (`<|start_header_id|>`), Gemma
//! (`<start_of_turn>`) and Mistral (`[INST]`, v0.3's layout). Any other template (Phi-3's
//! `<|user|>`, Llama 2's `<<SYS>>` variant of `[INST]`...) is an [`Error::Ollama`] naming it;
//! a tokenizer without a chat template gets Ollama's raw `{{ .Prompt }}`.
//!
//! Before a Modelfile is returned, the translation is checked: the Go template, rendered by
//! [`render`] under Ollama's rules, must give the same text as the Jinja template for probe
//! conversations (with and without a system message), less a leading BOS where the template
//! writes `bos_token` (llama.cpp adds BOS as a token). A family lookalike that renders
//! differently is refused, not written.
//!
//! The Go templates are whet's own, in the style of Ollama's `template/*.gotmpl`
//! (<https://github.com/ollama/ollama/tree/main/template>, syntax:
//! <https://github.com/ollama/ollama/blob/main/docs/template.md>): messages only (`{{ range
//! .Messages }}`, `{{ .Role }}`, `{{ .Content }}`, `{{ if eq .Role "..." }}`; Mistral's needs
//! `$.System` and "is this the last message"), which Ollama has used for every chat request
//! since 0.3.

use whet_data::{Message, Role};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// A chat-template family whet translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2, ...).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
    /// `<start_of_turn>user|model\ncontent<end_of_turn>\n`.
    Gemma,
    /// `[INST] user[/INST] assistant</s>`, the system prompt before the last user message
    /// (Mistral 7B Instruct v0.3).
    Mistral,
    /// No chat template: the prompt as given (`{{ .Prompt }}`).
    Raw,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::ChatMl => "chatml",
            Family::Llama3 => "llama3",
            Family::Gemma => "gemma",
            Family::Mistral => "mistral",
            Family::Raw => "raw",
        }
    }

    /// The family of a Jinja chat template, from the control tokens it writes.
    pub fn detect(jinja: &str) -> Option<Family> {
        if jinja.contains("<|start_header_id|>") {
            Some(Family::Llama3)
        } else if jinja.contains("<|im_start|>") {
            Some(Family::ChatMl)
        } else if jinja.contains("<start_of_turn>") {
            Some(Family::Gemma)
        } else if jinja.contains("[INST]") {
            Some(Family::Mistral)
        } else {
            None
        }
    }

    /// The Go template (Ollama's `TEMPLATE`).
    pub fn template(self) -> &'static str {
        match self {
            Family::ChatMl => {
                "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
            }
            Family::Llama3 => {
                "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
            }
            Family::Gemma => {
                "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n"
            }
            Family::Mistral => {
                "{{- range $i, $_ := .Messages }}\n{{- if eq .Role \"user\" }}[INST] {{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]\n{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>\n{{- end }}\n{{- end }}"
            }
            Family::Raw => "{{ .Prompt }}",
        }
    }

    /// Tokens that end a turn or start the next one: generation stops at any of them.
    fn stops(self) -> &'static [&'static str] {
        match self {
            Family::ChatMl => &["<|im_start|>", "<|im_end|>"],
            Family::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            Family::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            Family::Mistral => &["[INST]", "[/INST]"],
            Family::Raw => &[],
        }
    }

    /// How a system turn opens and closes in the rendered text.
    fn system_turn(self) -> Option<(&'static str, &'static str)> {
        match self {
            Family::ChatMl => Some(("<|im_start|>system\n", "<|im_end|>")),
            Family::Llama3 => Some((
                "<|start_header_id|>system<|end_header_id|>\n\n",
                "<|eot_id|>",
            )),
            Family::Gemma | Family::Mistral | Family::Raw => None,
        }
    }
}

/// What `whet export --ollama` writes as `Modelfile` beside the GGUF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modelfile {
    pub family: Family,
    /// The Go template (`TEMPLATE """..."""`).
    pub template: String,
    /// The chat template's default system prompt (`SYSTEM """..."""`).
    pub system: Option<String>,
    /// `PARAMETER stop "..."` lines: the family's turn tokens the tokenizer has, and its EOS.
    pub stop: Vec<String>,
}

const PROBE_SYSTEM: &str = "You answer in one word.";
const PROBE: [(&str, &str); 3] = [
    ("user", "Hello, how are you?"),
    ("assistant", "Fine, thanks. And you?"),
    ("user", "Tell me about the sea."),
];

fn probe(system: bool) -> Vec<Message> {
    let mut m = Vec::new();
    if system {
        m.push(Message {
            role: Role::System,
            content: PROBE_SYSTEM.into(),
        });
    }
    for (role, content) in PROBE {
        m.push(Message {
            role: if role == "user" {
                Role::User
            } else {
                Role::Assistant
            },
            content: content.into(),
        });
    }
    m
}

impl Modelfile {
    /// The Modelfile for `tok`'s chat template, checked against it (see the module docs).
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Modelfile> {
        let eos = tok.eos().text.clone();
        let Some(chat) = tok.chat_template() else {
            return Ok(Modelfile {
                family: Family::Raw,
                template: Family::Raw.template().into(),
                system: None,
                stop: vec![eos],
            });
        };
        let origin = chat.origin().to_string();
        let fail = |what: String| Error::Ollama {
            template: origin.clone(),
            what,
        };
        let family = Family::detect(chat.source()).ok_or_else(|| {
            fail(format!(
                "its family is not one whet translates (ChatML `<|im_start|>`, Llama 3 `<|start_header_id|>`, Gemma `<start_of_turn>`, Mistral `[INST]`; Phi-3 `<|user|>` and others are not translated yet). Write the Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md), or export with --gguf alone. The template starts: {:?}",
                chat.source().chars().take(120).collect::<String>()
            ))
        })?;
        // A template that writes `bos_token` itself: llama.cpp adds BOS as a token
        // (`tokenizer.ggml.add_bos_token`), Ollama's template does not write it.
        let bos = tok
            .bos()
            .filter(|_| chat.source().contains("bos_token"))
            .map(|b| b.text.clone());
        let jinja = |messages: &[Message]| -> Result<String> {
            let text = chat.render(messages, true)?;
            Ok(match &bos {
                Some(b) => text.strip_prefix(b.as_str()).unwrap_or(&text).to_string(),
                None => text,
            })
        };

        // The default system prompt: a system turn the template writes by itself.
        let without = jinja(&probe(false))?;
        let system = family.system_turn().and_then(|(open, close)| {
            let rest = without.strip_prefix(open)?;
            Some(rest[..rest.find(close)?].to_string())
        });
        let template = family.template().to_string();
        let check = |messages: Vec<Message>, expected: String| -> Result<()> {
            let go = render(&template, &with_default_system(system.as_deref(), messages))?;
            if go != expected {
                return Err(fail(format!(
                    "it looks like the {} family but renders differently from whet's Ollama template, so a Modelfile would change the prompts the model sees:\n  chat template:   {expected:?}\n  Ollama template: {go:?}",
                    family.name()
                )));
            }
            Ok(())
        };
        check(probe(false), without)?;
        match jinja(&probe(true)) {
            Ok(expected) => check(probe(true), expected)?,
            // A template that refuses a system turn (Gemma): nothing to compare.
            Err(Error::TemplateRender { .. }) => {}
            Err(e) => return Err(e),
        }

        let mut stop: Vec<String> = family
            .stops()
            .iter()
            .filter(|t| tok.token_to_id(t).is_some())
            .map(|t| t.to_string())
            .collect();
        if !stop.contains(&eos) {
            stop.push(eos);
        }
        if let Some(s) = &system
            && s.contains("\"\"\"")
        {
            return Err(fail(format!(
                "its default system prompt contains `\"\"\"`, which a Modelfile cannot quote: {s:?}"
            )));
        }
        Ok(Modelfile {
            family,
            template,
            system,
            stop,
        })
    }

    /// The Modelfile's text, `FROM` the GGUF file `gguf` (a path relative to the Modelfile).
    pub fn to_text(&self, gguf: &str) -> String {
        let mut s = format!(
            "# Written by whet (`whet export --ollama`), chat template family: {}.\n# ollama create NAME -f Modelfile\nFROM ./{gguf}\nTEMPLATE \"\"\"{}\"\"\"\n",
            self.family.name(),
            self.template
        );
        if let Some(system) = &self.system {
            s.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
        }
        for t in &self.stop {
            s.push_str(&format!("PARAMETER stop {}\n", go_quote(t)));
        }
        s
    }
}

/// A double-quoted string as Ollama's Modelfile parser reads it.
fn go_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Ollama's default system prompt rule: the Modelfile's `SYSTEM` goes first when the
/// conversation has no system message.
pub fn with_default_system(system: Option<&str>, mut messages: Vec<Message>) -> Vec<Message> {
    if let Some(s) = system
        && messages.first().is_none_or(|m| m.role != Role::System)
    {
        messages.insert(
            0,
            Message {
                role: Role::System,
                content: s.to_string(),
            },
        );
    }
    messages
}

// ---------------------------------------------------------------------------------------------
// The Go template subset whet writes, evaluated as Ollama does.

#[derive(Debug)]
enum Node {
    Text(String),
    /// `{{ EXPR }}`: its value as text.
    Print(Expr),
    /// `if` / `else if` branches, then the `else` branch.
    If(Vec<(Expr, Vec<Node>)>, Vec<Node>),
    /// `range .Messages` or `range $i, $_ := .Messages` (`$i` the index).
    Range(Option<String>, Vec<Node>),
}

/// An argument or a call: `.Role`, `.Content`, `.System`, `$.System`, `$.Messages`, `$i`,
/// `"text"`, `1`, and the calls `eq`, `and`, `not`, `len`, `slice` (parenthesised inside).
#[derive(Debug)]
enum Expr {
    Field(String),
    Var(String),
    Str(String),
    Int(i64),
    Call(String, Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    /// The messages from this index on.
    Messages(usize),
}

fn syntax(template: &str, what: impl Into<String>) -> Error {
    Error::Ollama {
        template: format!("Ollama template {template:?}"),
        what: what.into(),
    }
}

/// Renders a Go template of the subset whet writes for `messages` under Ollama's rules
/// (`template.Execute`): consecutive messages of one role (other than `tool`) are merged with
/// a blank line between them; system messages stay in `.Messages`, and `.System` is all of
/// them joined by a blank line. The subset: text, `{{-`/`-}}` trimming, `range .Messages`
/// (optionally `$i, $_ :=`), `if`/`else if`/`else`/`end`, the fields `.Role`, `.Content`,
/// `.System`, `.Messages` (`$.` for the top level inside a range), and `eq`, `and`, `not`,
/// `len`, `slice`. Anything else is an error.
pub fn render(template: &str, messages: &[Message]) -> Result<String> {
    let mut collated: Vec<(String, String)> = Vec::new();
    let mut system: Vec<&str> = Vec::new();
    for m in messages {
        let role = m.role.as_str();
        if m.role == Role::System {
            system.push(&m.content);
        }
        match collated.last_mut() {
            Some((r, c)) if r == role && role != "tool" => {
                c.push_str("\n\n");
                c.push_str(&m.content);
            }
            _ => collated.push((role.to_string(), m.content.clone())),
        }
    }
    let tokens = lex(template)?;
    let mut pos = 0;
    let (nodes, end) = parse(template, &tokens, &mut pos)?;
    if end.is_some() {
        return Err(syntax(
            template,
            "an `end` or `else` without its `if`/`range`",
        ));
    }
    let ctx = Ctx {
        template,
        messages: &collated,
        system: system.join("\n\n"),
    };
    let mut out = String::new();
    ctx.eval(&nodes, None, &mut out)?;
    Ok(out)
}

enum Token {
    Text(String),
    Action(String),
}

fn lex(template: &str) -> Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    while !rest.is_empty() {
        let (text, action) = match rest.find("{{") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut text = text.to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let Some(after) = action else {
            tokens.push(Token::Text(text));
            break;
        };
        // `{{- ` trims the whitespace before it, ` -}}` the whitespace after it.
        let (after, trim_left) = match after.strip_prefix("- ") {
            Some(a) => (a, true),
            None => (after, false),
        };
        if trim_left {
            text = text.trim_end().to_string();
        }
        tokens.push(Token::Text(text));
        let close = after
            .find("}}")
            .ok_or_else(|| syntax(template, "a `{{` without its `}}`"))?;
        let mut body = &after[..close];
        trim_next = false;
        if let Some(b) = body.strip_suffix(" -") {
            body = b;
            trim_next = true;
        }
        tokens.push(Token::Action(body.trim().to_string()));
        rest = &after[close + 2..];
    }
    Ok(tokens)
}

/// Parses until `end`/`else...`, returned as the second value.
fn parse(template: &str, tokens: &[Token], pos: &mut usize) -> Result<(Vec<Node>, Option<String>)> {
    let mut nodes = Vec::new();
    while *pos < tokens.len() {
        let token = &tokens[*pos];
        *pos += 1;
        let action = match token {
            Token::Text(t) => {
                if !t.is_empty() {
                    nodes.push(Node::Text(t.clone()));
                }
                continue;
            }
            Token::Action(a) => a.as_str(),
        };
        if action == "end" || action == "else" || action.starts_with("else if ") {
            return Ok((nodes, Some(action.to_string())));
        }
        if let Some(over) = action.strip_prefix("range ") {
            let index = match over.trim() {
                ".Messages" => None,
                other => {
                    let Some((vars, what)) = other.split_once(":=") else {
                        return Err(syntax(template, format!("`range {other}`")));
                    };
                    let (i, _) = vars.split_once(',').unwrap_or((vars, ""));
                    if what.trim() != ".Messages" || !i.trim().starts_with('$') {
                        return Err(syntax(template, format!("`range {other}`")));
                    }
                    Some(i.trim().to_string())
                }
            };
            match parse(template, tokens, pos)? {
                (body, Some(e)) if e == "end" => nodes.push(Node::Range(index, body)),
                _ => return Err(syntax(template, "`range` without its `end`")),
            }
        } else if let Some(cond) = action.strip_prefix("if ") {
            let mut branches = Vec::new();
            let mut cond = expr(template, cond)?;
            loop {
                let (body, end) = parse(template, tokens, pos)?;
                branches.push((cond, body));
                match end.as_deref() {
                    Some("end") => {
                        nodes.push(Node::If(branches, Vec::new()));
                        break;
                    }
                    Some("else") => match parse(template, tokens, pos)? {
                        (other, Some(e)) if e == "end" => {
                            nodes.push(Node::If(branches, other));
                            break;
                        }
                        _ => return Err(syntax(template, "`else` without its `end`")),
                    },
                    Some(e) if e.starts_with("else if ") => cond = expr(template, &e[8..])?,
                    _ => return Err(syntax(template, "`if` without its `end`")),
                }
            }
        } else {
            nodes.push(Node::Print(expr(template, action)?));
        }
    }
    Ok((nodes, None))
}

/// A pipeline without `|`: one argument, or a function and its arguments.
fn expr(template: &str, text: &str) -> Result<Expr> {
    let words = split_words(template, text)?;
    let mut pos = 0;
    let e = call(template, &words, &mut pos)?;
    if pos != words.len() {
        return Err(syntax(
            template,
            format!("`{text}`: unexpected `{}`", words[pos]),
        ));
    }
    Ok(e)
}

fn split_words(template: &str, text: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '(' || c == ')' {
            words.push(c.to_string());
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut w = String::from('"');
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => return Err(syntax(template, "escapes in strings")),
                    Some(c) => w.push(c),
                    None => return Err(syntax(template, "an unclosed string")),
                }
            }
            words.push(w);
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '(' || c == ')' {
                    break;
                }
                w.push(c);
                chars.next();
            }
            words.push(w);
        }
    }
    Ok(words)
}

const FUNCTIONS: [&str; 5] = ["eq", "and", "not", "len", "slice"];

fn call(template: &str, words: &[String], pos: &mut usize) -> Result<Expr> {
    let first = words
        .get(*pos)
        .ok_or_else(|| syntax(template, "an empty action"))?;
    if FUNCTIONS.contains(&first.as_str()) {
        *pos += 1;
        let mut args = Vec::new();
        while *pos < words.len() && words[*pos] != ")" {
            args.push(arg(template, words, pos)?);
        }
        return Ok(Expr::Call(first.clone(), args));
    }
    arg(template, words, pos)
}

fn arg(template: &str, words: &[String], pos: &mut usize) -> Result<Expr> {
    let w = words[*pos].as_str();
    *pos += 1;
    Ok(match w {
        "(" => {
            let e = call(template, words, pos)?;
            if words.get(*pos).map(String::as_str) != Some(")") {
                return Err(syntax(template, "a `(` without its `)`"));
            }
            *pos += 1;
            e
        }
        ".Role" | ".Content" | ".System" | ".Messages" | "$.System" | "$.Messages" => {
            Expr::Field(w.to_string())
        }
        _ if w.starts_with('"') => Expr::Str(w[1..].to_string()),
        _ if w.starts_with('$') && w[1..].chars().all(|c| c.is_alphanumeric() || c == '_') => {
            Expr::Var(w.to_string())
        }
        _ => match w.parse::<i64>() {
            Ok(n) => Expr::Int(n),
            Err(_) => {
                return Err(syntax(
                    template,
                    format!("`{w}` is outside the subset whet writes"),
                ));
            }
        },
    })
}

struct Ctx<'a> {
    template: &'a str,
    messages: &'a [(String, String)],
    system: String,
}

/// Inside a range: the message's index, and the index variable's name.
type Dot<'a> = Option<(usize, Option<&'a str>)>;

impl Ctx<'_> {
    fn eval(&self, nodes: &[Node], dot: Dot<'_>, out: &mut String) -> Result<()> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Print(e) => match self.value(e, dot)? {
                    Value::Str(s) => out.push_str(&s),
                    Value::Int(n) => out.push_str(&n.to_string()),
                    Value::Bool(b) => out.push_str(&b.to_string()),
                    Value::Messages(_) => {
                        return Err(syntax(self.template, "printing `.Messages`"));
                    }
                },
                Node::Range(index, body) => {
                    for i in 0..self.messages.len() {
                        self.eval(body, Some((i, index.as_deref())), out)?;
                    }
                }
                Node::If(branches, other) => {
                    let mut body = other;
                    for (cond, b) in branches {
                        if self.truth(&self.value(cond, dot)?) {
                            body = b;
                            break;
                        }
                    }
                    self.eval(body, dot, out)?;
                }
            }
        }
        Ok(())
    }

    fn value(&self, e: &Expr, dot: Dot<'_>) -> Result<Value> {
        let fail = |what: String| Err(syntax(self.template, what));
        Ok(match e {
            Expr::Str(s) => Value::Str(s.clone()),
            Expr::Int(n) => Value::Int(*n),
            Expr::Field(f) => match (f.as_str(), dot) {
                (".Role", Some((i, _))) => Value::Str(self.messages[i].0.clone()),
                (".Content", Some((i, _))) => Value::Str(self.messages[i].1.clone()),
                ("$.System", _) | (".System", None) => Value::Str(self.system.clone()),
                ("$.Messages", _) | (".Messages", None) => Value::Messages(0),
                (f, _) => return fail(format!("`{f}` here (inside a range, `.` is the message)")),
            },
            Expr::Var(v) => match dot {
                Some((i, Some(name))) if name == v => Value::Int(i as i64),
                _ => return fail(format!("`{v}` is not defined here")),
            },
            Expr::Call(f, args) => {
                let vals = args
                    .iter()
                    .map(|a| self.value(a, dot))
                    .collect::<Result<Vec<_>>>()?;
                match (f.as_str(), vals.as_slice()) {
                    ("eq", [a, b]) => Value::Bool(a == b),
                    ("and", [_, ..]) => vals
                        .iter()
                        .find(|v| !self.truth(v))
                        .unwrap_or(&vals[vals.len() - 1])
                        .clone(),
                    ("not", [a]) => Value::Bool(!self.truth(a)),
                    ("len", [Value::Messages(from)]) => {
                        Value::Int((self.messages.len() - from) as i64)
                    }
                    ("len", [Value::Str(s)]) => Value::Int(s.len() as i64),
                    ("slice", [Value::Messages(from), Value::Int(n)])
                        if *n >= 0 && from + (*n as usize) <= self.messages.len() =>
                    {
                        Value::Messages(from + *n as usize)
                    }
                    (f, v) => return fail(format!("`{f}` of {v:?}")),
                }
            }
        })
    }

    /// Go's truth: false, 0, "" and an empty list are false.
    fn truth(&self, v: &Value) -> bool {
        match v {
            Value::Str(s) => !s.is_empty(),
            Value::Int(n) => *n != 0,
            Value::Bool(b) => *b,
            Value::Messages(from) => *from < self.messages.len(),
        }
    }
}
