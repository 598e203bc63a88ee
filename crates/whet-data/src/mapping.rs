//! Mapping one decoded row (a JSON object) onto a [`Record`], with column renames.
//!
//! Every reader turns its rows into `serde_json::Value` objects first (Parquet/Arrow batches go
//! through Arrow's JSON encoder), so this is the single place that knows the record layouts.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::record::{Message, Origin, Record, Role, Shape};

/// Which input field holds which part of a record. Defaults are the conventional names; set
/// only what differs, e.g. `Columns { text: "body".into(), ..Columns::default() }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Columns {
    /// Text shape.
    pub text: String,
    /// Prompt/completion shape.
    pub prompt: String,
    pub completion: String,
    /// Conversation shape, OpenAI style: a list of `{role, content}` objects.
    pub messages: String,
    pub role: String,
    pub content: String,
    /// Conversation shape, ShareGPT style: a list of `{from, value}` objects.
    pub conversations: String,
    pub from: String,
    pub value: String,
    /// Conversation shape, Alpaca style.
    pub instruction: String,
    pub input: String,
    pub output: String,
    /// Alpaca's optional per-row system prompt.
    pub system: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text: "text".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            messages: "messages".into(),
            role: "role".into(),
            content: "content".into(),
            conversations: "conversations".into(),
            from: "from".into(),
            value: "value".into(),
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
        }
    }
}

impl Columns {
    /// The top-level field names any shape may read (used to project Parquet/Arrow columns).
    pub fn top_level(&self) -> [&str; 9] {
        [
            &self.text,
            &self.prompt,
            &self.completion,
            &self.messages,
            &self.conversations,
            &self.instruction,
            &self.input,
            &self.output,
            &self.system,
        ]
    }
}

/// How rows become records: the shape to read, the column names, and an optional dataset-level
/// system prompt inserted at the front of every conversation that has no system turn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Mapping {
    pub shape: Shape,
    pub columns: Columns,
    pub system_prompt: Option<String>,
}

/// Parses a role name. Accepts `system`, `user`, `assistant`, `tool` and the common aliases
/// `developer` (system), `human` (user), `gpt`/`model`/`bot` (assistant) and
/// `function`/`ipython`/`observation` (tool), case-insensitively.
pub fn parse_role(name: &str) -> Option<Role> {
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "system" | "developer" => Role::System,
        "user" | "human" => Role::User,
        "assistant" | "gpt" | "model" | "bot" => Role::Assistant,
        "tool" | "function" | "ipython" | "observation" => Role::Tool,
        _ => return None,
    })
}

/// The JSON type of a value, phrased for error messages (never the value itself).
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn present<'v>(obj: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    obj.get(key).filter(|v| !v.is_null())
}

struct Ctx<'a> {
    origin: &'a Origin,
    shape: &'static str,
}

impl Ctx<'_> {
    fn missing(&self, field: &str) -> DataError {
        DataError::MissingField {
            origin: self.origin.clone(),
            field: field.to_string(),
            shape: self.shape,
        }
    }

    fn wrong(&self, field: &str, expected: &'static str, found: &Value) -> DataError {
        DataError::WrongType {
            origin: self.origin.clone(),
            field: field.to_string(),
            expected,
            found: type_name(found),
        }
    }

    fn req_str(&self, obj: &Map<String, Value>, key: &str) -> Result<String> {
        match present(obj, key) {
            None => Err(self.missing(key)),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn opt_str(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
        match present(obj, key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }
}

/// Maps one row onto a record. `row` should be a JSON object; `origin` is used for errors only.
pub fn to_record(row: &Value, origin: &Origin, mapping: &Mapping) -> Result<Record> {
    let Value::Object(obj) = row else {
        return Err(DataError::WrongType {
            origin: origin.clone(),
            field: "<row>".into(),
            expected: "an object with the record's fields",
            found: type_name(row),
        });
    };
    let c = &mapping.columns;
    let has = |k: &str| present(obj, k).is_some();
    let shape = match mapping.shape {
        Shape::Auto => {
            if has(&c.messages) || has(&c.conversations) || has(&c.instruction) {
                Shape::Conversation
            } else if has(&c.prompt) || has(&c.completion) {
                Shape::PromptCompletion
            } else if has(&c.text) {
                Shape::Text
            } else {
                let mut found: Vec<&str> = obj.keys().map(String::as_str).collect();
                found.truncate(16);
                return Err(DataError::UnknownShape {
                    origin: origin.clone(),
                    found: found.join(", "),
                    expected: format!(
                        "`{}` (text), `{}`+`{}` (prompt/completion), or `{}`, `{}` or `{}`+`{}` \
                         (conversation)",
                        c.text,
                        c.prompt,
                        c.completion,
                        c.messages,
                        c.conversations,
                        c.instruction,
                        c.output
                    ),
                });
            }
        }
        explicit => explicit,
    };
    match shape {
        Shape::Text => {
            let ctx = Ctx {
                origin,
                shape: "text",
            };
            Ok(Record::Text {
                text: ctx.req_str(obj, &c.text)?,
            })
        }
        Shape::PromptCompletion => {
            let ctx = Ctx {
                origin,
                shape: "prompt-completion",
            };
            Ok(Record::PromptCompletion {
                prompt: ctx.req_str(obj, &c.prompt)?,
                completion: ctx.req_str(obj, &c.completion)?,
            })
        }
        Shape::Conversation | Shape::Auto => {
            let ctx = Ctx {
                origin,
                shape: "conversation",
            };
            let (field, mut messages) = if let Some(v) = present(obj, &c.messages) {
                (c.messages.as_str(), messages_from(&ctx, &c.messages, v, c)?)
            } else if let Some(v) = present(obj, &c.conversations) {
                (
                    c.conversations.as_str(),
                    messages_from(&ctx, &c.conversations, v, c)?,
                )
            } else if has(&c.instruction) {
                (c.output.as_str(), alpaca(&ctx, obj, c)?)
            } else {
                return Err(ctx.missing(&c.messages));
            };
            finish_conversation(&ctx, field, &mut messages, mapping.system_prompt.as_deref())?;
            Ok(Record::Conversation { messages })
        }
    }
}

fn alpaca(ctx: &Ctx<'_>, obj: &Map<String, Value>, c: &Columns) -> Result<Vec<Message>> {
    let instruction = ctx.req_str(obj, &c.instruction)?;
    let input = ctx.opt_str(obj, &c.input)?.unwrap_or_default();
    let output = ctx.req_str(obj, &c.output)?;
    let system = ctx.opt_str(obj, &c.system)?;
    let mut messages = Vec::with_capacity(3);
    if let Some(system) = system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message {
            role: Role::System,
            content: system,
        });
    }
    let user = if input.trim().is_empty() {
        instruction
    } else {
        format!("{instruction}\n\n{input}")
    };
    messages.push(Message {
        role: Role::User,
        content: user,
    });
    messages.push(Message {
        role: Role::Assistant,
        content: output,
    });
    Ok(messages)
}

const MESSAGES_EXPECTED: &str = "an array of {role, content} or {from, value} objects";

fn messages_from(ctx: &Ctx<'_>, field: &str, v: &Value, c: &Columns) -> Result<Vec<Message>> {
    // CSV cells (and some Parquet exports) carry the list as a JSON-encoded string.
    let parsed;
    let v = match v {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(inner @ Value::Array(_)) => {
                parsed = inner;
                &parsed
            }
            _ => return Err(ctx.wrong(field, MESSAGES_EXPECTED, v)),
        },
        other => other,
    };
    let Value::Array(items) = v else {
        return Err(ctx.wrong(field, MESSAGES_EXPECTED, v));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(ctx.wrong(&format!("{field}[{i}]"), "a {role, content} object", item));
        };
        let (role_key, role_v) = match (present(m, &c.role), present(m, &c.from)) {
            (Some(v), _) => (&c.role, v),
            (None, Some(v)) => (&c.from, v),
            (None, None) => return Err(ctx.missing(&format!("{field}[{i}].{}", c.role))),
        };
        let role_path = format!("{field}[{i}].{role_key}");
        let Value::String(role_name) = role_v else {
            return Err(ctx.wrong(&role_path, "a role name string", role_v));
        };
        let Some(role) = parse_role(role_name) else {
            return Err(DataError::UnknownRole {
                origin: ctx.origin.clone(),
                field: role_path,
                role: role_name.chars().take(40).collect(),
            });
        };
        let (content_key, content_v) = match (present(m, &c.content), present(m, &c.value)) {
            (Some(v), _) => (&c.content, v),
            (None, Some(v)) => (&c.value, v),
            (None, None) => return Err(ctx.missing(&format!("{field}[{i}].{}", c.content))),
        };
        let Value::String(content) = content_v else {
            return Err(ctx.wrong(
                &format!("{field}[{i}].{content_key}"),
                "a string",
                content_v,
            ));
        };
        out.push(Message {
            role,
            content: content.clone(),
        });
    }
    Ok(out)
}

fn finish_conversation(
    ctx: &Ctx<'_>,
    field: &str,
    messages: &mut Vec<Message>,
    system_prompt: Option<&str>,
) -> Result<()> {
    if messages.is_empty() {
        return Err(DataError::EmptyConversation {
            origin: ctx.origin.clone(),
            field: field.to_string(),
        });
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(DataError::NoAssistantTurn {
            origin: ctx.origin.clone(),
            field: field.to_string(),
        });
    }
    if let Some(sp) = system_prompt
        && !messages.iter().any(|m| m.role == Role::System)
    {
        messages.insert(
            0,
            Message {
                role: Role::System,
                content: sp.to_string(),
            },
        );
    }
    Ok(())
}

/// An implicit-prompt pair as the explicit row `{prompt, chosen, rejected}` (the mapped column
/// names): the shared leading messages (or text) of `chosen` and `rejected` become the prompt.
fn extract_prompt(ctx: &Ctx<'_>, chosen: &Value, rejected: &Value, c: &Columns) -> Result<Value> {
    let no_prompt = |why: &'static str| DataError::InvalidPair {
        origin: ctx.origin.clone(),
        field: c.prompt.clone(),
        why,
    };
    let text = |v: &Value| match v {
        Value::String(s) if !s.trim_start().starts_with('[') => Some(s.clone()),
        _ => None,
    };
    let mut row = Map::new();
    if let (Some(a), Some(b)) = (text(chosen), text(rejected)) {
        let mut split = a
            .char_indices()
            .zip(b.chars())
            .find(|((_, x), y)| x != y)
            .map_or(a.len().min(b.len()), |((i, _), _)| i);
        // Keep the answers' leading space with them (TRL moves the split back over one).
        if a[..split].ends_with(' ') {
            split -= 1;
        }
        if split == 0 {
            return Err(no_prompt(
                "is absent, and `chosen` and `rejected` share no leading text to take as the prompt",
            ));
        }
        row.insert(c.prompt.clone(), Value::String(a[..split].to_string()));
        row.insert(PAIR_FIELDS[0].into(), Value::String(a[split..].to_string()));
        row.insert(PAIR_FIELDS[1].into(), Value::String(b[split..].to_string()));
        return Ok(Value::Object(row));
    }
    let a = messages_from(ctx, PAIR_FIELDS[0], chosen, c)?;
    let b = messages_from(ctx, PAIR_FIELDS[1], rejected, c)?;
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if shared == 0 {
        return Err(no_prompt(
            "is absent, and `chosen` and `rejected` share no leading messages to take as the prompt",
        ));
    }
    let list = |m: &[Message]| {
        Value::Array(
            m.iter()
                .map(|m| {
                    let mut o = Map::new();
                    o.insert(c.role.clone(), Value::String(m.role.as_str().into()));
                    o.insert(c.content.clone(), Value::String(m.content.clone()));
                    Value::Object(o)
                })
                .collect(),
        )
    };
    row.insert(c.prompt.clone(), list(&a[..shared]));
    row.insert(PAIR_FIELDS[0].into(), list(&a[shared..]));
    row.insert(PAIR_FIELDS[1].into(), list(&b[shared..]));
    Ok(Value::Object(row))
}

/// The fields of a preference row: `prompt` (or the mapped prompt column), `chosen`, `rejected`.
pub const PAIR_FIELDS: [&str; 2] = ["chosen", "rejected"];

/// Maps one preference row onto the two records it trains on, `(chosen, rejected)`: the prompt
/// followed by each answer. Shapes (TRL's "standard" and "conversational" preference formats):
///
/// - `{"prompt": "...", "chosen": "...", "rejected": "..."}`: two [`Record::PromptCompletion`]s;
/// - `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`: two
///   [`Record::Conversation`]s, the prompt's messages followed by each side's (which end in an
///   assistant turn, the one learned); a text prompt becomes one user turn, a text answer one
///   assistant turn. The mapping's system prompt is added as for chat data.
///
/// Without a prompt field (TRL's implicit-prompt shapes), `chosen` and `rejected` are whole
/// conversations (or texts) and their shared beginning is the prompt, as TRL's `extract_prompt`
/// takes it: the leading messages equal in both, or the longest common text prefix (a space just
/// before the split goes with the answers).
///
/// A side that is empty (no text, no messages, or an empty last assistant turn) and a pair whose
/// sides are equal are [`DataError::InvalidPair`]s.
pub fn to_pair(row: &Value, origin: &Origin, mapping: &Mapping) -> Result<(Record, Record)> {
    let ctx = Ctx {
        origin,
        shape: "preference",
    };
    let Value::Object(obj) = row else {
        return Err(ctx.wrong("<row>", "an object with prompt, chosen and rejected", row));
    };
    let c = &mapping.columns;
    if present(obj, &c.prompt).is_none()
        && let (Some(chosen), Some(rejected)) =
            (present(obj, PAIR_FIELDS[0]), present(obj, PAIR_FIELDS[1]))
    {
        let explicit = extract_prompt(&ctx, chosen, rejected, c)?;
        return to_pair(&explicit, origin, mapping);
    }
    let prompt_v = present(obj, &c.prompt).ok_or_else(|| ctx.missing(&c.prompt))?;
    let side = |field: &str| -> Result<Value> {
        present(obj, field)
            .cloned()
            .ok_or_else(|| ctx.missing(field))
    };
    let (chosen_v, rejected_v) = (side(PAIR_FIELDS[0])?, side(PAIR_FIELDS[1])?);
    let invalid = |field: &str, why: &'static str| DataError::InvalidPair {
        origin: origin.clone(),
        field: field.to_string(),
        why,
    };
    let is_text = |v: &Value| matches!(v, Value::String(s) if !s.trim_start().starts_with('['));
    let records = if is_text(prompt_v) && is_text(&chosen_v) && is_text(&rejected_v) {
        let prompt = ctx.req_str(obj, &c.prompt)?;
        let answer = |field: &str| -> Result<String> {
            let text = ctx.req_str(obj, field)?;
            if text.trim().is_empty() {
                return Err(invalid(field, "is empty"));
            }
            Ok(text)
        };
        let (chosen, rejected) = (answer(PAIR_FIELDS[0])?, answer(PAIR_FIELDS[1])?);
        (
            Record::PromptCompletion {
                prompt: prompt.clone(),
                completion: chosen,
            },
            Record::PromptCompletion {
                prompt,
                completion: rejected,
            },
        )
    } else {
        let as_messages = |field: &str, v: &Value, role: Role| -> Result<Vec<Message>> {
            match v {
                Value::String(s) if is_text(v) => Ok(vec![Message {
                    role,
                    content: s.clone(),
                }]),
                _ => messages_from(&ctx, field, v, c),
            }
        };
        let prompt = as_messages(&c.prompt, prompt_v, Role::User)?;
        if prompt.is_empty() {
            return Err(invalid(&c.prompt, "has no messages"));
        }
        let conversation = |field: &str, v: &Value| -> Result<Record> {
            let answer = as_messages(field, v, Role::Assistant)?;
            match answer.last() {
                None => return Err(invalid(field, "has no messages")),
                Some(m) if m.role != Role::Assistant => {
                    return Err(invalid(field, "does not end in an assistant turn"));
                }
                Some(m) if m.content.trim().is_empty() => return Err(invalid(field, "is empty")),
                Some(_) => {}
            }
            let mut messages = prompt.clone();
            messages.extend(answer);
            finish_conversation(&ctx, field, &mut messages, mapping.system_prompt.as_deref())?;
            Ok(Record::Conversation { messages })
        };
        (
            conversation(PAIR_FIELDS[0], &chosen_v)?,
            conversation(PAIR_FIELDS[1], &rejected_v)?,
        )
    };
    if records.0 == records.1 {
        return Err(invalid(
            PAIR_FIELDS[1],
            "equals `chosen`, so the pair teaches no preference",
        ));
    }
    Ok(records)
}
