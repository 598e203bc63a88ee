//! The tokenizer: `tokenizer.json` (Hugging Face `tokenizers`) plus `tokenizer_config.json`
//! (special tokens, `add_bos_token`, chat template).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::fast::FastByteLevelBpe;
use crate::fingerprint::Fnv128;
use crate::template::ChatTemplate;

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// Token ids with the byte range of the input each token came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Byte offsets `(start, end)` into the encoded text, one per id.
    pub offsets: Vec<(usize, usize)>,
}

/// A Hugging Face tokenizer with the settings from its `tokenizer_config.json`.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    bos: Option<SpecialToken>,
    eos: SpecialToken,
    pad: Option<SpecialToken>,
    add_bos: bool,
    chat_template: Option<ChatTemplate>,
    content_hash: u128,
    /// Bytes of the longest vocabulary entry (see [`Tokenizer::text_bound`]).
    max_token_bytes: usize,
    /// Exact shortcut for plain-text ids with GPT-2-style byte-level BPE (see `fast.rs`).
    fast: Option<FastByteLevelBpe>,
}

const SPECIAL_TOKEN_FIELDS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl Tokenizer {
    /// Load `dir/tokenizer.json`, `dir/tokenizer_config.json` and, when present,
    /// `dir/chat_template.jinja` (which wins over the config's `chat_template`, as in
    /// transformers).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        Self::from_files(
            dir.join("tokenizer.json"),
            Some(dir.join("tokenizer_config.json")),
        )
    }

    /// Load a `tokenizer.json` and optionally a `tokenizer_config.json` (a
    /// `chat_template.jinja` next to the config is picked up too). Without a config the
    /// tokenizer has no BOS and no chat template, and `eos_token` is looked up among
    /// common names (`<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>`).
    pub fn from_files(
        tokenizer_json: impl AsRef<Path>,
        tokenizer_config: Option<impl AsRef<Path>>,
    ) -> Result<Self> {
        let tj = tokenizer_json.as_ref();
        let bytes = std::fs::read(tj).map_err(|source| Error::Io {
            path: tj.to_path_buf(),
            action: "read",
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::TokenizerFile {
                path: tj.to_path_buf(),
                message: e.to_string(),
            })?;
        // Whet truncates and pads itself; a tokenizer.json that sets either would silently
        // change the ids.
        inner
            .with_truncation(None)
            .map_err(|e| Error::TokenizerFile {
                path: tj.to_path_buf(),
                message: e.to_string(),
            })?;
        inner.with_padding(None);

        let mut hash = Fnv128::new();
        hash.bytes(b"tokenizer.json");
        hash.bytes(&bytes);

        let (config, config_path) = match tokenizer_config {
            Some(p) => {
                let p = p.as_ref().to_path_buf();
                let text = std::fs::read_to_string(&p).map_err(|source| Error::Io {
                    path: p.clone(),
                    action: "read",
                    source,
                })?;
                hash.bytes(b"tokenizer_config.json");
                hash.bytes(text.as_bytes());
                let json: Json = serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: p.clone(),
                    field: "(file)".into(),
                    what: format!("not valid JSON: {e}"),
                })?;
                if !json.is_object() {
                    return Err(Error::Config {
                        path: p,
                        field: "(file)".into(),
                        what: "expected a JSON object".into(),
                    });
                }
                (json, Some(p))
            }
            None => (Json::Object(Default::default()), None),
        };
        let cfg_path = config_path.clone().unwrap_or_else(|| tj.to_path_buf());

        let special = |field: &'static str| -> Result<Option<SpecialToken>> {
            match token_field(&config, field, &cfg_path)? {
                None => Ok(None),
                Some(text) => {
                    let id =
                        inner
                            .token_to_id(&text)
                            .ok_or_else(|| Error::UnknownSpecialToken {
                                path: cfg_path.clone(),
                                field,
                                token: text.clone(),
                            })?;
                    Ok(Some(SpecialToken { text, id }))
                }
            }
        };
        let bos = special("bos_token")?;
        let pad = special("pad_token")?;
        let eos = match special("eos_token")? {
            Some(e) => e,
            None => ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
                .iter()
                .find_map(|t| {
                    inner.token_to_id(t).map(|id| SpecialToken {
                        text: (*t).to_string(),
                        id,
                    })
                })
                .ok_or_else(|| Error::Config {
                    path: cfg_path.clone(),
                    field: "eos_token".into(),
                    what: "missing; set it to the model's end-of-sequence token".into(),
                })?,
        };

        let add_bos = match config.get("add_bos_token") {
            Some(Json::Bool(b)) => *b && bos.is_some(),
            Some(Json::Null) | None => match &bos {
                // No explicit setting: the tokenizer adds BOS if its post-processor does.
                Some(b) => inner
                    .encode("a", true)
                    .map(|e| e.get_ids().first() == Some(&b.id))
                    .unwrap_or(false),
                None => false,
            },
            Some(other) => {
                return Err(Error::Config {
                    path: cfg_path.clone(),
                    field: "add_bos_token".into(),
                    what: format!("expected true or false, found {other}"),
                });
            }
        };

        let template_source = load_chat_template(&config, config_path.as_deref())?;
        let chat_template = match template_source {
            None => None,
            Some((src, origin)) => {
                hash.bytes(b"chat_template");
                hash.bytes(src.as_bytes());
                let mut vars = Vec::new();
                for field in SPECIAL_TOKEN_FIELDS {
                    if let Some(t) = token_field(&config, field, &cfg_path)? {
                        vars.push((field.to_string(), t));
                    }
                }
                if config.get("eos_token").is_none() {
                    vars.push(("eos_token".to_string(), eos.text.clone()));
                }
                let control: Vec<String> = inner
                    .get_added_tokens_decoder()
                    .into_values()
                    .filter(|t| t.special)
                    .map(|t| t.content)
                    .collect();
                Some(
                    ChatTemplate::new(src)?
                        .with_origin(origin)
                        .with_special_tokens(vars)
                        .with_control_tokens(control),
                )
            }
        };

        let fast = FastByteLevelBpe::new(&inner);
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        Ok(Tokenizer {
            max_token_bytes,
            fast,
            inner,
            source: tj.to_path_buf(),
            bos,
            eos,
            pad,
            add_bos,
            chat_template,
            content_hash: hash.finish(),
        })
    }

    /// The BOS token, if the tokenizer has one.
    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    /// The BOS id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|t| t.id)
    }

    /// The EOS token (`eos_token`); for chat models this is the end-of-turn token.
    pub fn eos(&self) -> &SpecialToken {
        &self.eos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos.id
    }

    /// The configured pad token, if any.
    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }

    /// The id used for padding: `pad_token`, or `eos_token` when there is none. Padding
    /// is never learned (labels -100), so sharing the id with EOS is harmless.
    pub fn pad_id(&self) -> u32 {
        self.pad.as_ref().map_or(self.eos.id, |t| t.id)
    }

    /// Whether text is prefixed with BOS (`add_bos_token`, else what the post-processor
    /// does).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Replace the chat template (e.g. one given on the command line).
    pub fn set_chat_template(&mut self, source: &str) -> Result<()> {
        let origin = format!("chat template set for {}", self.source.display());
        self.set_chat_template_from(source, origin)
    }

    /// Replace the chat template with `source`, which errors name as `origin` (a file, or a
    /// shipped template's name). The content hash, and so every cache key, changes with it.
    pub fn set_chat_template_from(&mut self, source: &str, origin: String) -> Result<()> {
        let mut vars: Vec<(String, String)> = vec![("eos_token".into(), self.eos.text.clone())];
        if let Some(b) = &self.bos {
            vars.push(("bos_token".into(), b.text.clone()));
        }
        if let Some(p) = &self.pad {
            vars.push(("pad_token".into(), p.text.clone()));
        }
        let control: Vec<String> = self
            .inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        self.chat_template = Some(
            ChatTemplate::new(source)?
                .with_origin(origin)
                .with_special_tokens(vars)
                .with_control_tokens(control),
        );
        let mut h = Fnv128::new();
        h.u128(self.content_hash);
        h.bytes(b"override chat_template");
        h.bytes(source.as_bytes());
        self.content_hash = h.finish();
        Ok(())
    }

    /// The path of the tokenizer.json this was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// A stable hash of tokenizer.json, tokenizer_config.json and the chat template.
    pub fn content_hash(&self) -> u128 {
        self.content_hash
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether plain-text encoding uses the byte-level BPE shortcut.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encode without adding special tokens (special-token text in `text` is still
    /// recognised, as in transformers), with byte offsets.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Encode {
            what: "text",
            message: e.to_string(),
        })?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Encode without special tokens and without computing offsets. Same ids as
    /// `encode(text).ids`; GPT-2-style byte-level BPE tokenizers take a faster route to
    /// them for text without special tokens.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(ids) = self.fast.as_ref().and_then(|f| f.encode(text)) {
            return Ok(ids);
        }
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Encode {
                what: "text",
                message: e.to_string(),
            })
    }

    /// [`Tokenizer::encode_ids`] for text of any length: a text longer than [`PIECE_BYTES`] is
    /// never tokenized whole (a tens-of-MB line would hold every intermediate of the tokenizer at
    /// once) but cut into pieces of at most that many bytes ([`piece_cuts`]), tokenized in
    /// parallel, the ids concatenated. The cuts are before a space that follows a non-space,
    /// where GPT-2's, Llama 3's and SentencePiece's pre-tokenizers start a new word anyway, so a
    /// byte-level BPE gives exactly the whole text's ids; a tokenizer whose normalizer adds to
    /// the start of every input (Llama 2's `Prepend("▁")`) may differ at the cuts, and only
    /// there. A piece without such a space is cut before any whitespace, else at a character
    /// boundary (where a word may then be split in two).
    pub fn encode_ids_in_pieces(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() <= PIECE_BYTES {
            return self.encode_ids(text);
        }
        let cuts = piece_cuts(text, PIECE_BYTES);
        let pieces: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
        let ids = self.encode_batch_ids(&pieces)?;
        Ok(ids.concat())
    }

    /// A length in bytes past which a text surely has more than `max_len` tokens: `max_len + 1`
    /// times [`BYTES_PER_TOKEN`] or the longest vocabulary entry, whichever is more (no token
    /// covers more input than that). Texts that are truncated anyway are cut to it before they
    /// are tokenized, so a 50 MB prompt costs what `max_len` tokens do.
    pub fn text_bound(&self, max_len: usize) -> usize {
        max_len
            .saturating_add(1)
            .saturating_mul(BYTES_PER_TOKEN.max(self.max_token_bytes))
    }

    /// Encode many texts in parallel (rayon), without special tokens or offsets.
    pub fn encode_batch_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        if self.fast.is_some() {
            return texts.par_iter().map(|t| self.encode_ids(t)).collect();
        }
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| Error::Encode {
                what: "batch",
                message: e.to_string(),
            })?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Decode ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Encode {
                what: "decode",
                message: e.to_string(),
            })
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The most bytes [`Tokenizer::encode_ids_in_pieces`] tokenizes at once.
pub const PIECE_BYTES: usize = 64 * 1024;

/// A generous bound on the bytes of input one token covers (see [`Tokenizer::text_bound`]).
pub const BYTES_PER_TOKEN: usize = 64;

/// Where [`Tokenizer::encode_ids_in_pieces`] cuts `text`: `0`, the cuts, `text.len()`, each
/// piece at most `piece` bytes (at least one character). A cut is the last position in reach
/// that holds a space following a non-whitespace byte, else the last whitespace byte, else the
/// last character boundary.
pub fn piece_cuts(text: &str, piece: usize) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut cuts = vec![0];
    let mut start = 0;
    while text.len() - start > piece {
        let reach = start + piece;
        let word = (start + 1..=reach)
            .rev()
            .find(|&p| bytes[p] == b' ' && !bytes[p - 1].is_ascii_whitespace());
        let space = || {
            (start + 1..=reach)
                .rev()
                .find(|&p| bytes[p].is_ascii_whitespace())
        };
        let char_edge = || {
            (start + 1..=reach)
                .rev()
                .find(|&p| text.is_char_boundary(p))
                // A piece shorter than one character: take the whole character.
                .unwrap_or_else(|| {
                    (reach + 1..=text.len())
                        .find(|&p| text.is_char_boundary(p))
                        .unwrap_or(text.len())
                })
        };
        let cut = word.or_else(space).unwrap_or_else(char_edge);
        cuts.push(cut);
        start = cut;
    }
    cuts.push(text.len());
    cuts
}

/// `text` cut to at most `max_bytes` bytes at a character boundary: its start, or with
/// `keep_end` its end.
pub fn bounded(text: &str, max_bytes: usize, keep_end: bool) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    if keep_end {
        let mut from = text.len() - max_bytes;
        while !text.is_char_boundary(from) {
            from += 1;
        }
        &text[from..]
    } else {
        let mut to = max_bytes;
        while !text.is_char_boundary(to) {
            to -= 1;
        }
        &text[..to]
    }
}

/// Read a special-token field: a string, an AddedToken object `{content: ..}`, or null.
fn token_field(config: &Json, field: &'static str, path: &Path) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Config {
                path: path.to_path_buf(),
                field: field.into(),
                what: "an AddedToken object needs a string `content`".into(),
            }),
        },
        Some(other) => Err(Error::Config {
            path: path.to_path_buf(),
            field: field.into(),
            what: format!("expected a string or {{\"content\": ..}}, found {other}"),
        }),
    }
}

/// The chat template: `chat_template.jinja` next to the config, else the config's
/// `chat_template` (a string, or a list of `{name, template}` from which "default" is
/// taken).
/// The chat template's text and where it came from (for errors).
fn load_chat_template(
    config: &Json,
    config_path: Option<&Path>,
) -> Result<Option<(String, String)>> {
    if let Some(p) = config_path {
        let jinja = p
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                action: "read",
                source,
            })?;
            return Ok(Some((text, jinja.display().to_string())));
        }
    }
    let path = config_path.map(Path::to_path_buf).unwrap_or_default();
    let origin = format!("{} (chat_template)", path.display());
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some((s.clone(), origin))),
        Some(Json::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some((t.to_string(), origin))),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(Error::Config {
                            path,
                            field: "chat_template".into(),
                            what: "list entries must be {\"name\": .., \"template\": ..}".into(),
                        });
                    }
                }
            }
            Err(Error::Config {
                path,
                field: "chat_template".into(),
                what: format!(
                    "several templates ({}) but none named \"default\"; name one \"default\"",
                    names.join(", ")
                ),
            })
        }
        Some(Json::Object(map)) => match map.get("default").and_then(Json::as_str) {
            Some(t) => Ok(Some((t.to_string(), origin))),
            None => Err(Error::Config {
                path,
                field: "chat_template".into(),
                what: "a map of templates needs a \"default\" entry".into(),
            }),
        },
        Some(other) => Err(Error::Config {
            path,
            field: "chat_template".into(),
            what: format!("expected a string or a list of named templates, found {other}"),
        }),
    }
}
