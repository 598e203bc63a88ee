//! The tokenizer inside a GGUF (`tokenizer.ggml.*`) as Hugging Face files: a byte-level BPE
//! `tokenizer.json` and a `tokenizer_config.json`, built the way transformers' GGUF loader
//! builds them, so token ids match it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value as Json, json};
use whet_data::byte_level::bytes_to_unicode;

use super::GgufFile;
use crate::error::{Error, Result};

/// The pre-tokenizer split regexes transformers' GGUF loader knows, by `tokenizer.ggml.pre`
/// (`GGUF_PRE_TOKENIZER_SPLITS`). Any other value keeps GPT-2's byte-level regex, as it does.
pub(crate) fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

impl GgufFile {
    fn tokenizer_parts(&self) -> Result<TokenizerParts<'_>> {
        let model_key = "tokenizer.ggml.model";
        let model = self.req_str(model_key, "the file carries no tokenizer")?;
        if model != "gpt2" {
            return Err(Error::GgufUnsupported {
                path: self.path.clone(),
                detail: format!(
                    "{model_key} = {model:?}: whet rebuilds only byte-level BPE (\"gpt2\") tokenizers from GGUF; take tokenizer.json from the model's Hugging Face repo"
                ),
            });
        }
        let tokens = self.string_array("tokenizer.ggml.tokens")?.ok_or_else(|| {
            self.missing("tokenizer.ggml.tokens", "the file carries no vocabulary")
        })?;
        let n = tokens.len();
        let types = self.int_array("tokenizer.ggml.token_type")?;
        if let Some(t) = &types
            && t.len() != n
        {
            return Err(self.bad(
                "tokenizer.ggml.token_type",
                format!("one type per token ({n})"),
                format!("{} types", t.len()),
            ));
        }
        let merges = self.string_array("tokenizer.ggml.merges")?.ok_or_else(|| {
            self.missing(
                "tokenizer.ggml.merges",
                "a byte-level BPE vocabulary needs its merges",
            )
        })?;
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let id = |key: &str| self.opt_token_id(key, n);
        Ok(TokenizerParts {
            tokens,
            types,
            merges,
            pre,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: self
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            add_eos: self
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
        })
    }

    /// A Hugging Face `tokenizer.json` equal to the one transformers builds from this file.
    pub fn tokenizer_json(&self) -> Result<Json> {
        let p = self.tokenizer_parts()?;
        let table = bytes_to_unicode();
        let alphabet: BTreeSet<char> = table.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));

        // Tokens outside the byte alphabet are respelled byte by byte; a duplicate keeps the
        // last id, as transformers' dict comprehension does.
        let mut vocab = serde_json::Map::new();
        for (id, token) in p.tokens.iter().enumerate() {
            let key = if in_alphabet(token) {
                (*token).to_string()
            } else {
                token.bytes().map(|b| table[b as usize]).collect()
            };
            vocab.insert(key, json!(id));
        }
        let mut merges = Vec::with_capacity(p.merges.len());
        for (i, m) in p.merges.iter().enumerate() {
            let parts: Vec<&str> = m.split(' ').collect();
            if parts.len() != 2 || parts.iter().any(|s| s.is_empty()) {
                return Err(self.bad(
                    &format!("tokenizer.ggml.merges[{i}]"),
                    "two tokens separated by one space",
                    format!("{m:?}"),
                ));
            }
            merges.push(json!([parts[0], parts[1]]));
        }

        // Added tokens: CONTROL (3) ones as special (skipping mislabelled ones outside the byte
        // alphabet), USER_DEFINED (4) ones present in the vocabulary as plain added tokens, and
        // the bos/eos/unk/pad tokens as special, as transformers' tokenizer classes do.
        let mut added: BTreeMap<u64, (String, bool)> = BTreeMap::new();
        let vocab_id = |content: &str| vocab.get(content).and_then(Json::as_u64);
        if let Some(types) = &p.types {
            for (token, &ty) in p.tokens.iter().zip(types) {
                let special = match ty {
                    3 if in_alphabet(token) => true,
                    4 => false,
                    _ => continue,
                };
                if let Some(id) = vocab_id(token) {
                    added.entry(id).or_insert(((*token).to_string(), special));
                }
            }
        }
        for id in [p.bos, p.eos, p.unk, p.pad].into_iter().flatten() {
            let token = p.tokens[id as usize];
            if let Some(vid) = vocab_id(token) {
                added.insert(vid, (token.to_string(), true));
            }
        }
        let added_tokens: Vec<Json> = added
            .iter()
            .map(|(id, (content, special))| {
                json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                })
            })
            .collect();

        let byte_level = |add_prefix_space: bool, use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match pre_tokenizer_split(p.pre) {
            Some(regex) => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                    byte_level(false, false),
                ],
            }),
            None => byte_level(false, true),
        };

        // TemplateProcessing as transformers' `update_post_processor` writes it:
        // single = [bos:0] $A:0 [eos:0]; pair = single [bos:1] $B:1 [eos:1].
        let mut specials = serde_json::Map::new();
        let mut special = |id: Option<u32>, enabled: bool| -> Option<String> {
            let id = id.filter(|_| enabled)?;
            let token = p.tokens[id as usize].to_string();
            specials.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
            Some(token)
        };
        let bos = special(p.bos, p.add_bos);
        let eos = special(p.eos, p.add_eos);
        let template = |seq: &str, type_id: u32| {
            let mut parts = Vec::new();
            if let Some(b) = &bos {
                parts.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            }
            parts.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some(e) = &eos {
                parts.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            }
            parts
        };
        let single = template("A", 0);
        let pair: Vec<Json> = single.iter().cloned().chain(template("B", 1)).collect();

        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": single,
                "pair": pair,
                "special_tokens": specials,
            },
            "decoder": byte_level(true, true),
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            },
        }))
    }

    /// `tokenizer_config.json`: special tokens, `add_bos_token` / `add_eos_token` as the file
    /// states them, and `tokenizer.chat_template`.
    pub fn tokenizer_config_json(&self) -> Result<Json> {
        let p = self.tokenizer_parts()?;
        let name = |id: Option<u32>| id.map(|i| p.tokens[i as usize].to_string());
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("add_bos_token".into(), json!(p.add_bos));
        cfg.insert("add_eos_token".into(), json!(p.add_eos));
        cfg.insert("bos_token".into(), json!(name(p.bos)));
        cfg.insert("eos_token".into(), json!(name(p.eos)));
        cfg.insert("pad_token".into(), json!(name(p.pad)));
        cfg.insert("unk_token".into(), json!(name(p.unk)));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(ctx) = self.opt_u64("llama.context_length")? {
            cfg.insert("model_max_length".into(), json!(ctx));
        }
        if let Some(t) = self.opt_str("tokenizer.chat_template")? {
            cfg.insert("chat_template".into(), json!(t));
        }
        Ok(Json::Object(cfg))
    }
}

/// The `tokenizer.ggml.*` values a tokenizer is rebuilt from, checked.
struct TokenizerParts<'a> {
    tokens: Vec<&'a str>,
    types: Option<Vec<i64>>,
    merges: Vec<&'a str>,
    pre: &'a str,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}
