//! An Ollama `Modelfile` for a tokenizer's chat template.
//!
//! Ollama renders prompts with Go's `text/template`, not Jinja, and a Jinja template cannot be
//! translated in general. Ollama itself matches a GGUF's Jinja template against a list of known
//! families; whet does the same: [`Family::detect`] recognises the family from the template's
//! control tokens, and [`Modelfile::from_tokenizer`] writes whet's Go template for it, the
//! family's stop tokens (and the tokenizer's EOS), and the template's default system prompt
//! (Modelfile `SYSTEM`, which Ollama inserts when a conversation has no system message).
//! Families: ChatML (`<|im_start|>`: SmolLM2, Qwen2), Llama 3 (`<|start_header_id|>`) and
//! Gemma (`<start_of_turn>`). Any other template (Mistral's `[INST]`, Phi-3's `<|user|>`...) is
//! an [`Error::Ollama`] naming it; a tokenizer without a chat template gets Ollama's raw
//! `{{ .Prompt }}`.
//!
//! Before a Modelfile is returned, the translation is checked: the Go template, rendered by
//! [`render`] under Ollama's rules, must give the same text as the Jinja template for probe
//! conversations (with and without a system message), less a leading BOS where the template
//! writes `bos_token` (llama.cpp adds BOS as a token). A family lookalike that renders differently is refused, not written.
//!
//! The Go templates are whet's own, in the style of Ollama's `template/*.gotmpl`
//! (<https://github.com/ollama/ollama/tree/main/template>, syntax:
//! <https://github.com/ollama/ollama/blob/main/docs/template.md>): messages only (`{{ range
//! .Messages }}`, `{{ .Role }}`, `{{ .Content }}`, `{{ if eq .Role "..." }}`), which Ollama has
//! used for every chat request since 0.3.

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
    /// No chat template: the prompt as given (`{{ .Prompt }}`).
    Raw,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::ChatMl => "chatml",
            Family::Llama3 => "llama3",
            Family::Gemma => "gemma",
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
            Family::Raw => "{{ .Prompt }}",
        }
    }

    /// Tokens that end a turn or start the next one: generation stops at any of them.
    fn stops(self) -> &'static [&'static str] {
        match self {
            Family::ChatMl => &["<|im_start|>", "<|im_end|>"],
            Family::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            Family::Gemma => &["<start_of_turn>", "<end_of_turn>"],
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
            Family::Gemma | Family::Raw => None,
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
                "its family is not one whet translates (ChatML `<|im_start|>`, Llama 3 `<|start_header_id|>`, Gemma `<start_of_turn>`; Mistral `[INST]` and Phi-3 `<|user|>` are not translated yet). Write the Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md), or export with --gguf alone. The template starts: {:?}",
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
    Role,
    Content,
    /// `if eq .Role "x"` branches, then the `else` branch.
    If(Vec<(String, Vec<Node>)>, Vec<Node>),
    Range(Vec<Node>),
}

fn syntax(template: &str, what: impl Into<String>) -> Error {
    Error::Ollama {
        template: format!("Ollama template {template:?}"),
        what: what.into(),
    }
}

/// Renders a Go template of the subset whet writes (`range .Messages`, `.Role`, `.Content`,
/// `if eq .Role "..."`, `else`, `else if`, `end`, `{{-`/`-}}` trimming) for `messages` under
/// Ollama's rules (`template.Execute`): consecutive messages of one role (other than `tool`)
/// are merged with a blank line between them; system messages stay in `.Messages`. Anything
/// outside the subset is an error.
pub fn render(template: &str, messages: &[Message]) -> Result<String> {
    let mut collated: Vec<(String, String)> = Vec::new();
    for m in messages {
        let role = m.role.as_str();
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
    let mut out = String::new();
    eval(&nodes, &collated, None, &mut out);
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
        match action {
            ".Role" => nodes.push(Node::Role),
            ".Content" => nodes.push(Node::Content),
            "end" => return Ok((nodes, Some("end".into()))),
            a if a == "else" || a.starts_with("else if ") => return Ok((nodes, Some(a.into()))),
            "range .Messages" => match parse(template, tokens, pos)? {
                (body, Some(e)) if e == "end" => nodes.push(Node::Range(body)),
                _ => return Err(syntax(template, "`range .Messages` without its `end`")),
            },
            a if a.starts_with("if ") => {
                let mut branches = Vec::new();
                let mut cond = role_eq(template, &a[3..])?;
                loop {
                    let (body, end) = parse(template, tokens, pos)?;
                    match end.as_deref() {
                        Some("end") => {
                            branches.push((cond, body));
                            nodes.push(Node::If(branches, Vec::new()));
                            break;
                        }
                        Some("else") => {
                            branches.push((cond, body));
                            match parse(template, tokens, pos)? {
                                (other, Some(e)) if e == "end" => {
                                    nodes.push(Node::If(branches, other));
                                    break;
                                }
                                _ => return Err(syntax(template, "`else` without its `end`")),
                            }
                        }
                        Some(e) if e.starts_with("else if ") => {
                            branches.push((cond, body));
                            cond = role_eq(template, &e[8..])?;
                        }
                        _ => return Err(syntax(template, "`if` without its `end`")),
                    }
                }
            }
            other => {
                return Err(syntax(
                    template,
                    format!("`{{{{ {other} }}}}` is outside the subset whet writes"),
                ));
            }
        }
    }
    Ok((nodes, None))
}

/// `eq .Role "x"` -> `x`.
fn role_eq(template: &str, cond: &str) -> Result<String> {
    cond.trim()
        .strip_prefix("eq .Role \"")
        .and_then(|r| r.strip_suffix('"'))
        .map(str::to_string)
        .ok_or_else(|| {
            syntax(
                template,
                format!("condition `{cond}` is not `eq .Role \"...\"`"),
            )
        })
}

fn eval(nodes: &[Node], messages: &[(String, String)], dot: Option<usize>, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Role => out.push_str(dot.map_or("", |i| &messages[i].0)),
            Node::Content => out.push_str(dot.map_or("", |i| &messages[i].1)),
            Node::Range(body) => {
                for i in 0..messages.len() {
                    eval(body, messages, Some(i), out);
                }
            }
            Node::If(branches, other) => {
                let role = dot.map_or("", |i| messages[i].0.as_str());
                let body = branches
                    .iter()
                    .find(|(r, _)| r == role)
                    .map_or(other, |(_, b)| b);
                eval(body, messages, dot, out);
            }
        }
    }
}
