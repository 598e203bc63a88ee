//! The tokenizer inside a GGUF (`tokenizer.ggml.*`) as Hugging Face files: a `tokenizer.json`
//! and a `tokenizer_config.json`, built the way transformers' GGUF loader builds them
//! (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`, 5.x), so token ids match it:
//!
//! * `tokenizer.ggml.model = "gpt2"`: byte-level BPE (`byte_level_tokenizer` into
//!   `GPT2Tokenizer`);
//! * `"llama"`: SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral v0.1:
//!   `sentencepiece_tokenizer` into `LlamaTokenizer`), its merges rebuilt from the scores when
//!   the file has none (`generate_merges`);
//! * `"llama"` in a `gemma`, `gemma2` or `gemma3` file: `gemma_tokenizer` into `GemmaTokenizer`,
//!   the merges ranked by the tokens' order in the file, space runs respelled.
//!
//! Anything else (`t5`, `gemma4`, phi3's variant, ...) is refused with the value named.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

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
        let architecture = self.architecture()?;
        let builder = match model {
            "gpt2" => Builder::ByteLevel,
            "llama" => match architecture {
                "gemma" | "gemma2" | "gemma3" => Builder::Gemma,
                "phi3" => {
                    return Err(Error::GgufUnsupported {
                        path: self.path.clone(),
                        detail: format!(
                            "{model_key} = \"llama\" with general.architecture = \"phi3\": whet does not rebuild phi3's SentencePiece variant; take tokenizer.json from the model's Hugging Face repo"
                        ),
                    });
                }
                _ => Builder::Llama,
            },
            _ => {
                return Err(Error::GgufUnsupported {
                    path: self.path.clone(),
                    detail: format!(
                        "{model_key} = {model:?}: whet rebuilds byte-level BPE (\"gpt2\") and SentencePiece BPE (\"llama\") tokenizers from GGUF; take tokenizer.json from the model's Hugging Face repo"
                    ),
                });
            }
        };
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
        let merges = self.string_array("tokenizer.ggml.merges")?;
        // Without merges transformers derives them from the vocabulary (`get_merges`): ranked by
        // the scores for a SentencePiece vocabulary, by the file order for Gemma's.
        let scores = match (builder, &merges) {
            (Builder::ByteLevel, None) => {
                return Err(self.missing(
                    "tokenizer.ggml.merges",
                    "a byte-level BPE vocabulary needs its merges",
                ));
            }
            (Builder::Llama, None) => {
                let scores = self.float_array("tokenizer.ggml.scores")?.ok_or_else(|| {
                    self.missing(
                        "tokenizer.ggml.scores",
                        "a SentencePiece vocabulary without tokenizer.ggml.merges needs its scores to rank the merges rebuilt from it",
                    )
                })?;
                if scores.len() != n {
                    return Err(self.bad(
                        "tokenizer.ggml.scores",
                        format!("one score per token ({n})"),
                        format!("{} scores", scores.len()),
                    ));
                }
                Some(scores)
            }
            _ => None,
        };
        let pre = self.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let id = |key: &str| self.opt_token_id(key, n);
        Ok(TokenizerParts {
            builder,
            tokens,
            types,
            merges,
            scores,
            pre,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            // `get_gguf_tokenizer`: older SentencePiece files have no flag, and llama.cpp adds
            // BOS to them.
            add_bos: self
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(model == "llama"),
            add_eos: self
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
        })
    }

    /// `tokenizer.ggml.merges[i]` as the pair `tuple(merge.split(" "))` gives.
    fn split_merges<'m>(&self, merges: &[&'m str]) -> Result<Vec<(&'m str, &'m str)>> {
        merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let parts: Vec<&str> = m.split(' ').collect();
                if parts.len() != 2 || parts.iter().any(|s| s.is_empty()) {
                    return Err(self.bad(
                        &format!("tokenizer.ggml.merges[{i}]"),
                        "two tokens separated by one space",
                        format!("{m:?}"),
                    ));
                }
                Ok((parts[0], parts[1]))
            })
            .collect()
    }

    /// A Hugging Face `tokenizer.json` equal to the one transformers builds from this file.
    pub fn tokenizer_json(&self) -> Result<Json> {
        let p = self.tokenizer_parts()?;
        match p.builder {
            Builder::ByteLevel => self.byte_level_tokenizer(&p),
            Builder::Llama | Builder::Gemma => self.sentencepiece_tokenizer(&p),
        }
    }

    /// `byte_level_tokenizer`: `GPT2Tokenizer` over the vocabulary respelled in the byte alphabet.
    fn byte_level_tokenizer(&self, p: &TokenizerParts<'_>) -> Result<Json> {
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
        let merges: Vec<Json> = self
            .split_merges(p.merges.as_deref().unwrap_or_default())?
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect();

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

        let pre_tokenizer =
            split_pre_tokenizer(p.pre).unwrap_or_else(|| byte_level_step(false, true));
        let token = |id: Option<u32>| id.map(|i| (p.tokens[i as usize], i));
        let post_processor = template_processing(
            token(p.bos).filter(|_| p.add_bos),
            token(p.eos).filter(|_| p.add_eos),
        );

        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": byte_level_step(true, true),
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

    /// `sentencepiece_tokenizer` / `gemma_tokenizer`: a BPE model with byte fallback over the
    /// vocabulary as the file spells it, with `LlamaTokenizer`'s or `GemmaTokenizer`'s
    /// normalizer, pre-tokenizer and decoder, then the added tokens and the post-processor the
    /// loader gives every file.
    fn sentencepiece_tokenizer(&self, p: &TokenizerParts<'_>) -> Result<Json> {
        let gemma = p.builder == Builder::Gemma;
        // `gemma_tokenizer`: a token of spaces (and other whitespace) is stored with real spaces,
        // while `GemmaTokenizer` looks it up as "▁" runs; respell it, one "▁" per character.
        let tokens: Vec<Cow<'_, str>> = p
            .tokens
            .iter()
            .map(|&t| {
                if gemma && t.contains(' ') && t.chars().all(py_isspace) {
                    Cow::Owned("\u{2581}".repeat(t.chars().count()))
                } else {
                    Cow::Borrowed(t)
                }
            })
            .collect();

        // `{token: index for index, token in enumerate(tokens)}`: a duplicate keeps the last id.
        let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            vocab.insert(token.as_ref(), id as u32);
        }

        let merges: Vec<(&str, &str)> = match (&p.merges, &p.scores) {
            (Some(m), _) => self.split_merges(m)?,
            // Llama: ranked by the file's scores, `dict(zip(tokens, scores))`.
            (None, Some(scores)) => generate_merges(
                &vocab,
                tokens
                    .iter()
                    .map(|t| t.as_ref())
                    .zip(scores.iter().copied()),
            )
            .map_err(|found| self.bad("tokenizer.ggml.tokens", MERGE_BOUNDS, found))?,
            // Gemma: ranked by position (`-index`); its scores do not follow its merge order.
            (None, None) => generate_merges(
                &vocab,
                tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.as_ref(), -(i as f64))),
            )
            .map_err(|found| self.bad("tokenizer.ggml.tokens", MERGE_BOUNDS, found))?,
        };

        // Added tokens, in the order transformers adds them; a token already added keeps its
        // first entry. Each gets its id in the vocabulary.
        // Departure: a token that is not in the vocabulary (a class default such as "<mask>"
        // missing from a file) would be appended past the vocabulary there; here it is left out,
        // since its id could not index the model's embeddings.
        let mut wanted: Vec<(&str, bool)> = Vec::new();
        // 1. The tokenizer class's own special tokens (`LlamaTokenizer` / `GemmaTokenizer`
        //    defaults), added by its `__init__`.
        let class_specials: &[&str] = if gemma {
            &["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"]
        } else {
            &["<unk>", "<s>", "</s>"]
        };
        wanted.extend(class_specials.iter().map(|&t| (t, true)));
        // 2.-3. `add_gguf_special_tokens`: CONTROL (3) tokens as special, USER_DEFINED (4) ones
        //    found in the vocabulary (as the file spells them, so Gemma's space runs are not) as
        //    plain added tokens.
        if let Some(types) = &p.types {
            let typed = |want: i64| {
                p.tokens
                    .iter()
                    .zip(types)
                    .filter(move |&(_, &ty)| ty == want)
                    .map(|(&t, _)| t)
            };
            wanted.extend(typed(3).map(|t| (t, true)));
            wanted.extend(typed(4).map(|t| (t, false)));
        }
        // 4. The file's bos/eos/unk/pad tokens (and `GemmaTokenizer`'s mask), when not added yet.
        let named = [p.bos, p.eos, p.unk, p.pad].map(|id| id.map(|i| p.tokens[i as usize]));
        let mask = gemma.then_some("<mask>");
        wanted.extend(named.into_iter().chain([mask]).flatten().map(|t| (t, true)));
        let mut added: BTreeMap<u32, (&str, bool)> = BTreeMap::new();
        for (content, special) in wanted {
            if let Some((&key, &id)) = vocab.get_key_value(content) {
                added.entry(id).or_insert((key, special));
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

        let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
        let (normalizer, pre_tokenizer, decoder) = if gemma {
            (
                replace(" ", "\u{2581}"),
                json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
                json!({"type": "Sequence", "decoders": [
                    replace("\u{2581}", " "), {"type": "ByteFallback"}, {"type": "Fuse"},
                ]}),
            )
        } else {
            // `LlamaTokenizer` with `add_prefix_space` unset (True) and `legacy=False`: Metaspace
            // prepending "▁" to the first piece only, and a decoder that strips it.
            (
                Json::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
                json!({"type": "Sequence", "decoders": [
                    replace("\u{2581}", " "), {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ]}),
            )
        };
        // `set_split_regex` applies to every builder.
        let pre_tokenizer = split_pre_tokenizer(p.pre).unwrap_or(pre_tokenizer);

        // `update_post_processor` looks the bos/eos strings up (`convert_tokens_to_ids`).
        let token = |id: Option<u32>| {
            id.map(|i| {
                let t = p.tokens[i as usize];
                (t, vocab.get(t).copied().unwrap_or(i))
            })
        };
        let post_processor = template_processing(
            token(p.bos).filter(|_| p.add_bos),
            token(p.eos).filter(|_| p.add_eos),
        );

        // In id order, whatever order the map keeps, so the file is the same on every run.
        let mut vocab_json = serde_json::Map::with_capacity(vocab.len());
        for (id, token) in tokens.iter().enumerate() {
            if vocab[token.as_ref()] == id as u32 {
                vocab_json.insert(token.to_string(), json!(id));
            }
        }
        let merges: Vec<Json> = merges.iter().map(|(a, b)| json!([a, b])).collect();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": decoder,
            "model": {
                "type": "BPE",
                "dropout": null,
                // `GemmaTokenizer` names its unknown token; `LlamaTokenizer` leaves it unset.
                "unk_token": if gemma { json!("<unk>") } else { Json::Null },
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": vocab_json,
                "merges": merges,
            },
        }))
    }

    /// `tokenizer_config.json`: special tokens, `add_bos_token` / `add_eos_token` as the file
    /// states them (a SentencePiece file that does not adds BOS, as transformers reads it), and
    /// `tokenizer.chat_template`.
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
        let ctx_key = format!("{}.context_length", self.architecture()?);
        if let Some(ctx) = self.opt_u64(&ctx_key)? {
            cfg.insert("model_max_length".into(), json!(ctx));
        }
        if let Some(t) = self.opt_str("tokenizer.chat_template")? {
            cfg.insert("chat_template".into(), json!(t));
        }
        Ok(Json::Object(cfg))
    }
}

/// Bounds on rebuilding merges from a vocabulary ([`generate_merges`]): Gemma 3's 262144 tokens
/// take 24M bytes of lookups and give 514906 merges.
const MERGE_SEARCH_BYTES: usize = 1 << 30;
const MAX_DERIVED_MERGES: usize = 1 << 21;
const MERGE_BOUNDS: &str =
    "a vocabulary whose merges can be rebuilt within 2^30 bytes of lookups and 2^21 merges";

/// A `ByteLevel` pre-tokenizer or decoder.
fn byte_level_step(add_prefix_space: bool, use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

/// `set_split_regex`: the split regex of a `tokenizer.ggml.pre` transformers knows, then the
/// byte alphabet.
fn split_pre_tokenizer(pre: &str) -> Option<Json> {
    let regex = pre_tokenizer_split(pre)?;
    Some(json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level_step(false, false),
        ],
    }))
}

/// TemplateProcessing as transformers' `update_post_processor` writes it:
/// single = [bos:0] $A:0 [eos:0]; pair = single [bos:1] $B:1 [eos:1].
fn template_processing(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    let mut specials = serde_json::Map::new();
    for (token, id) in [bos, eos].into_iter().flatten() {
        specials.insert(
            token.to_string(),
            json!({"id": token, "ids": [id], "tokens": [token]}),
        );
    }
    let template = |seq: &str, type_id: u32| {
        let mut parts = Vec::new();
        if let Some((b, _)) = bos {
            parts.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
        }
        parts.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if let Some((e, _)) = eos {
            parts.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
        }
        parts
    };
    let single = template("A", 0);
    let pair: Vec<Json> = single.iter().cloned().chain(template("B", 1)).collect();
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": specials,
    })
}

/// transformers' `generate_merges(vocab, vocab_scores)` (`tokenization_utils_base.py`), line for
/// line: every split of every token into two vocabulary tokens, those of one token ordered by
/// the pieces' ids, then all of them by (score, left length, right length), highest first, ties
/// in that order (Python's sort is stable, `reverse=True` included). `scores` is iterated as
/// the dict `dict(vocab_scores)`: a token's first position, its last value. Lengths count
/// characters, as Python's do.
///
/// Departure: bounded, so that no file makes it hang or fill memory (`Err` says which bound):
/// at most [`MERGE_SEARCH_BYTES`] bytes looked up while searching for splits and
/// [`MAX_DERIVED_MERGES`] merges.
fn generate_merges<'t>(
    vocab: &HashMap<&str, u32>,
    scores: impl Iterator<Item = (&'t str, f64)>,
) -> std::result::Result<Vec<(&'t str, &'t str)>, String> {
    let mut order: Vec<(&str, f64)> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (token, score) in scores {
        match seen.get(token) {
            Some(&at) => order[at].1 = score,
            None => {
                seen.insert(token, order.len());
                order.push((token, score));
            }
        }
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    let mut searched = 0usize;
    for (merge, score) in order {
        let mut local: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
        for (index, (at, _)) in merge.char_indices().enumerate().skip(1) {
            // Both lookups hash their piece: the token's length in all.
            searched += merge.len();
            if searched > MERGE_SEARCH_BYTES {
                return Err(format!(
                    "tokens whose splits take over {MERGE_SEARCH_BYTES} bytes of lookups"
                ));
            }
            let (l, r) = merge.split_at(at);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push((l, r, score, index, merge[at..].chars().count()));
            }
        }
        local.sort_by_key(|&(l, r, ..)| (vocab[l], vocab[r]));
        merges.extend(local);
        if merges.len() > MAX_DERIVED_MERGES {
            return Err(format!("over {MAX_DERIVED_MERGES} merges"));
        }
    }
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
    });
    Ok(merges.into_iter().map(|(l, r, ..)| (l, r)).collect())
}

/// Python's `str.isspace` for one character: Unicode White_Space, plus the separators
/// U+001C..U+001F that Python also counts.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Which of transformers' GGUF tokenizer builders a file gets (`select_tokenizer_builder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builder {
    /// `tokenizer.ggml.model = "gpt2"`: `byte_level_tokenizer`.
    ByteLevel,
    /// `"llama"`: `sentencepiece_tokenizer` (`LlamaTokenizer`).
    Llama,
    /// `"llama"` with `general.architecture` gemma, gemma2 or gemma3: `gemma_tokenizer`.
    Gemma,
}

/// The `tokenizer.ggml.*` values a tokenizer is rebuilt from, checked.
struct TokenizerParts<'a> {
    builder: Builder,
    tokens: Vec<&'a str>,
    types: Option<Vec<i64>>,
    /// Required for byte-level BPE; SentencePiece files usually have none.
    merges: Option<Vec<&'a str>>,
    /// `tokenizer.ggml.scores`, read only when `Llama` merges must be rebuilt from them.
    scores: Option<Vec<f64>>,
    pre: &'a str,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}
