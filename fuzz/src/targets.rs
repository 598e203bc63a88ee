//! The fuzz targets: each a `fn(&Scratch, &[u8]) -> Trace` that feeds the bytes to one of
//! whet's public input APIs the way the CLI does (through a file where the API takes a path).
//!
//! A target returns normally for every input, valid or not: errors are the expected answer to
//! bad input and are only recorded in the [`Trace`] (their text, with numbers and paths left
//! out, tells the engine which inputs behave differently, so those join the corpus). A panic,
//! an abort, a hang or an allocation past the limit is a finding. A few targets also assert
//! invariants on what they got back (a validated run config saves and loads back); a failed
//! assertion is a panic, so a finding too.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use candle_core::Device;
use whet_data::read::{Format, ReadOptions};
use whet_data::{Message, Role};
use whet_model::gguf::GgufFile;
use whet_model::load::SafetensorsFiles;
use whet_model::{Model, Trainable};
use whet_tokenize::{AssistantTurns, ChatTemplate};

use crate::mutate::{CSV_TOKENS, JINJA_TOKENS, JSON_TOKENS, Structure, TOML_TOKENS};

/// A finding kind, for the targets that list known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Panic,
    Hang,
    /// A single request or the live total over the allocator's limit.
    Alloc,
    /// The process died (abort, stack overflow, signal) for another reason.
    Crash,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Panic => "panic",
            Kind::Hang => "hang",
            Kind::Alloc => "unbounded allocation",
            Kind::Crash => "crash",
        }
    }

    pub fn slug(self) -> &'static str {
        match self {
            Kind::Panic => "panic",
            Kind::Hang => "hang",
            Kind::Alloc => "alloc",
            Kind::Crash => "crash",
        }
    }
}

/// A folder for the files a target writes; one per worker process, reused between inputs.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Scratch {
            dir: tempfile::Builder::new().prefix("whet-fuzz-").tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` to `name` in the scratch folder (replacing it) and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("the fuzzer's scratch folder is writable");
        path
    }

    /// An empty sub-folder `name` (emptied when it exists).
    pub fn folder(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("the fuzzer's scratch folder is writable");
        path
    }
}

/// What one input did: each step's outcome, in order.
#[derive(Debug, Default)]
pub struct Trace {
    /// (step, its error if it failed)
    steps: Vec<(String, Option<String>)>,
}

impl Trace {
    /// Records `r`'s outcome under `what`; hands back the value.
    pub fn step<T, E: Display>(&mut self, what: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => {
                self.steps.push((what.to_string(), None));
                Some(v)
            }
            Err(e) => {
                self.steps.push((what.to_string(), Some(e.to_string())));
                None
            }
        }
    }

    /// Records something the input led to that is not an error.
    pub fn note(&mut self, what: impl Into<String>) {
        self.steps.push((what.into(), None));
    }

    pub fn steps(&self) -> usize {
        self.steps.len()
    }

    /// The errors of the failed steps, as `step: error`.
    pub fn errors(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|(what, e)| Some(format!("{what}: {}", e.as_ref()?)))
            .collect()
    }

    /// The behaviour class of the input: its steps with digits, quoted values and the scratch
    /// path left out, so inputs that differ only in values share a class.
    pub fn class(&self, scratch: &Path) -> String {
        let scratch = scratch.display().to_string();
        let mut out = String::new();
        for (what, e) in &self.steps {
            let s = format!("{what}: {}", e.as_deref().unwrap_or("ok")).replace(&scratch, "");
            let mut quoted = false;
            let mut kept = 0;
            for c in s.chars() {
                if c == '"' || c == '`' {
                    quoted = !quoted;
                    continue;
                }
                if quoted || c.is_ascii_digit() {
                    continue;
                }
                out.push(c);
                kept += 1;
                if kept > 80 {
                    break;
                }
            }
            out.push('|');
        }
        out
    }
}

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// Seed corpus folder under `fixtures/fuzz/` (empty: built-in seeds).
    pub corpus: &'static str,
    pub structure: Structure,
    pub run: fn(&Scratch, &[u8]) -> Trace,
    /// Finding kinds expected from this target until another branch fixes them: reported, but
    /// they do not fail a run.
    pub known: &'static [Kind],
    /// Seeds for targets without a corpus folder (the harness's own canaries).
    pub builtin_seeds: &'static [&'static [u8]],
}

/// Every target `cargo test -p whet-fuzz` and `cargo xtask fuzz` run.
pub const TARGETS: &[Target] = &[
    Target {
        name: "gguf",
        corpus: "gguf",
        structure: Structure::Gguf,
        run: gguf,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "safetensors",
        corpus: "safetensors",
        structure: Structure::Safetensors,
        run: safetensors,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "model_config",
        corpus: "model_config",
        structure: Structure::Text(JSON_TOKENS),
        run: model_config,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "model_folder",
        corpus: "model_folder",
        structure: Structure::Text(JSON_TOKENS),
        run: model_folder,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "jsonl",
        corpus: "jsonl",
        structure: Structure::Text(JSON_TOKENS),
        run: jsonl,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "json",
        corpus: "json",
        structure: Structure::Text(JSON_TOKENS),
        run: json,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "csv",
        corpus: "csv",
        structure: Structure::Text(CSV_TOKENS),
        run: csv,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "parquet",
        corpus: "parquet",
        structure: Structure::Binary,
        run: parquet,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "arrow",
        corpus: "arrow",
        structure: Structure::Binary,
        run: arrow,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "chat_template",
        corpus: "chat_template",
        structure: Structure::Text(JINJA_TOKENS),
        run: chat_template,
        known: &[],
        builtin_seeds: &[],
    },
    Target {
        name: "train_config",
        corpus: "train_config",
        structure: Structure::Text(TOML_TOKENS),
        run: train_config,
        known: &[],
        builtin_seeds: &[],
    },
];

/// Targets that check the harness itself (each finds its kind on its first seed); run only
/// when named.
pub const CANARIES: &[Target] = &[
    Target {
        name: "canary_panic",
        corpus: "",
        structure: Structure::Binary,
        run: |_, data| {
            assert!(!data.starts_with(b"P"), "canary: input starts with P");
            Trace::default()
        },
        known: &[],
        builtin_seeds: &[b"ok", b"Panic"],
    },
    Target {
        name: "canary_hang",
        corpus: "",
        structure: Structure::Binary,
        run: |_, data| {
            while data.starts_with(b"H") {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Trace::default()
        },
        known: &[],
        builtin_seeds: &[b"ok", b"Hang"],
    },
    Target {
        name: "canary_alloc",
        corpus: "",
        structure: Structure::Binary,
        run: |_, data| {
            let mut t = Trace::default();
            if data.starts_with(b"A") {
                // Unhandled: the allocator refuses, `handle_alloc_error` aborts the worker.
                let v = vec![1u8; 3 << 30];
                t.note(format!("{}", v[0]));
            } else if data.starts_with(b"T") {
                // Handled: `try_reserve` sees the refusal and the input goes on.
                let mut v: Vec<u8> = Vec::new();
                t.note(format!("{:?}", v.try_reserve(3 << 30).is_ok()));
            } else if data.starts_with(b"L") {
                // Many blocks under the single-request limit, over it live in total.
                let blocks: Vec<Vec<u8>> = (0..12).map(|_| vec![0u8; 100 << 20]).collect();
                t.note(format!("{}", blocks.len()));
            }
            t
        },
        known: &[],
        builtin_seeds: &[b"ok", b"Abort", b"Try", b"Live"],
    },
    Target {
        name: "canary_stack",
        corpus: "",
        structure: Structure::Binary,
        run: |_, data| {
            fn deep(n: u64, pad: [u8; 256]) -> u64 {
                let pad = std::hint::black_box(pad);
                if n == 0 {
                    return pad[0] as u64;
                }
                deep(n - 1, pad) + pad[(n % 256) as usize] as u64
            }
            let mut t = Trace::default();
            if data.starts_with(b"S") {
                t.note(format!("{}", deep(u64::MAX, [1; 256])));
            }
            t
        },
        known: &[],
        builtin_seeds: &[b"ok", b"Stack"],
    },
];

/// The target named `name` (a canary too).
pub fn find(name: &str) -> Option<&'static Target> {
    TARGETS.iter().chain(CANARIES).find(|t| t.name == name)
}

/// `data` up to its first NUL byte, and what follows it (empty without one).
fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

// ---------------------------------------------------------------------------------------------
// models

/// Everything `whet convert --from-gguf` reads from a GGUF, each step on its own.
fn gguf(s: &Scratch, data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let path = s.write("model.gguf", data);
    let Some(f) = t.step("open", GgufFile::open(&path)) else {
        return t;
    };
    t.step("architecture", f.architecture().map(str::to_string));
    for entry in f.tensors().iter().take(64) {
        t.step("dequantize", f.dequantize(&entry.name).map(|v| v.len()));
    }
    let config = t.step("config", f.config());
    t.step("tokenizer.json", f.tokenizer_json());
    t.step("tokenizer_config.json", f.tokenizer_config_json());
    t.step("generation_config.json", f.generation_config_json());
    if config.is_some() {
        t.step("hf_tensors", f.hf_tensors().map(|v| v.len()));
    }
    t
}

/// `model.safetensors` opened as the loader does, every tensor loaded as f32.
fn safetensors(s: &Scratch, data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let path = s.write("model.safetensors", data);
    let Some(files) = t.step("open", SafetensorsFiles::open(&[path])) else {
        return t;
    };
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    for name in names.iter().take(256) {
        t.step(
            "load",
            files
                .load(name, None, &Device::Cpu)
                .map(|x| x.dims().to_vec()),
        );
    }
    t
}

/// `config.json` read and validated, then every value the model derives from it.
fn model_config(s: &Scratch, data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let path = s.write("config.json", data);
    let Some(cfg) = t.step("parse", whet_model::Config::from_file(&path)) else {
        return t;
    };
    t.note(format!(
        "{:?} kv={} head_dim={} qkv_bias={} o_bias={} eos={:?} rope={:?}",
        cfg.model_type(),
        cfg.num_kv_heads(),
        cfg.head_dim(),
        cfg.qkv_bias(),
        cfg.o_bias(),
        cfg.eos_token_ids().len(),
        cfg.rope_kind(),
    ));
    t.note(format!("rope_base={}", cfg.rope_base().is_finite()));
    t.note(format!("inv_freq={}", cfg.inv_freq().len()));
    t
}

/// A model folder: `config.json` (the input up to its first NUL byte) and `model.safetensors`
/// (the rest), loaded as `whet train` / `eval` load a base model.
fn model_folder(s: &Scratch, data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let (config, weights) = split_nul(data);
    let dir = s.folder("model");
    std::fs::write(dir.join("config.json"), config).expect("scratch is writable");
    std::fs::write(dir.join("model.safetensors"), weights).expect("scratch is writable");
    t.step(
        "load",
        Model::load(&dir, Trainable::None, &Device::Cpu).map(|m| m.config().vocab_size),
    );
    t
}

// ---------------------------------------------------------------------------------------------
// data

/// Reads a file of `format` to the end twice: stopping at the first error (`read_all`) and
/// skipping invalid rows (`skip_invalid`), as `whet data inspect` and training do.
fn read(s: &Scratch, data: &[u8], file: &str, format: Format) -> Trace {
    let mut t = Trace::default();
    let path = s.write(file, data);
    let opts = ReadOptions {
        format: Some(format),
        batch_size: 7,
        ..ReadOptions::default()
    };
    if let Some((examples, report)) = t.step("read_all", whet_data::read_all(&path, &opts)) {
        assert_eq!(
            report.examples,
            examples.len() as u64,
            "report counts examples"
        );
        assert!(report.rows >= report.examples, "more examples than rows");
    }
    let skipping = ReadOptions {
        skip_invalid: true,
        ..opts
    };
    if let Some(mut reader) = t.step("open", whet_data::open(&path, &skipping)) {
        let mut n = 0u64;
        for example in reader.by_ref().take(100_000) {
            if t.step("row", example).is_some() {
                n += 1;
            }
        }
        let report = reader.into_report();
        assert_eq!(report.examples, n, "report counts the examples yielded");
        t.note(format!("skipped {}", report.skipped.len()));
    }
    t
}

fn jsonl(s: &Scratch, data: &[u8]) -> Trace {
    read(s, data, "data.jsonl", Format::Jsonl)
}

fn json(s: &Scratch, data: &[u8]) -> Trace {
    read(s, data, "data.json", Format::Json)
}

fn csv(s: &Scratch, data: &[u8]) -> Trace {
    read(s, data, "data.csv", Format::Csv)
}

fn parquet(s: &Scratch, data: &[u8]) -> Trace {
    read(s, data, "data.parquet", Format::Parquet)
}

fn arrow(s: &Scratch, data: &[u8]) -> Trace {
    read(s, data, "data.arrow", Format::Arrow)
}

// ---------------------------------------------------------------------------------------------
// chat templates and run configs

/// The conversation rendered when the input carries none (or an unreadable one).
fn default_messages() -> Vec<Message> {
    let m = |role, content: &str| Message {
        role,
        content: content.into(),
    };
    vec![
        m(Role::System, "You are terse."),
        m(Role::User, "Hi {{ there }} <|im_end|>"),
        m(Role::Assistant, "Hello."),
        m(Role::Tool, "{\"result\": 1}"),
        m(Role::User, "  again\n"),
        m(Role::Assistant, ""),
    ]
}

/// A chat template (the input up to its first NUL byte) rendered over a conversation (a JSON
/// list of `{role, content}` after it), with and without the generation prompt, and its
/// assistant spans, as tokenization renders it.
fn chat_template(_s: &Scratch, data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let (source, rest) = split_nul(data);
    let messages: Vec<Message> =
        serde_json::from_slice(rest).unwrap_or_else(|_| default_messages());
    let Some(template) = t.step(
        "compile",
        ChatTemplate::new(String::from_utf8_lossy(source).into_owned()),
    ) else {
        return t;
    };
    let template = template
        .with_special_tokens([("bos_token", "<s>"), ("eos_token", "</s>")])
        .with_control_tokens(["</s>", "<|im_end|>", "<|eot_id|>"]);
    for add_generation_prompt in [false, true] {
        t.step("render", template.render(&messages, add_generation_prompt));
    }
    for turns in [AssistantTurns::All, AssistantTurns::Last] {
        if let Some(r) = t.step("spans", template.assistant_spans(&messages, turns)) {
            for span in &r.spans {
                assert!(
                    span.start < span.end && span.end <= r.text.len(),
                    "span {span:?} outside a rendering of {} bytes",
                    r.text.len()
                );
                assert!(r.text.is_char_boundary(span.start) && r.text.is_char_boundary(span.end));
            }
        }
    }
    t
}

/// A run config (TOML up to the first NUL byte) with `--set` overrides (each NUL-separated
/// part after it), parsed and validated as `whet train` does; a config that validates must save
/// (`to_toml`, written next to every checkpoint) and load back to the same config.
fn train_config(s: &Scratch, data: &[u8]) -> Trace {
    let mut t = Trace::default();
    let (text, rest) = split_nul(data);
    let overrides: Vec<String> = rest
        .split(|&b| b == 0)
        .filter(|o| !o.is_empty())
        .take(64)
        .map(|o| String::from_utf8_lossy(o).into_owned())
        .collect();
    let path = s.write("run.toml", text);
    let Some(cfg) = t.step("load", whet::config::Config::load(&path, &overrides)) else {
        return t;
    };
    let saved = cfg.to_toml();
    let back = whet::config::Config::from_toml(&saved, &path, &[])
        .unwrap_or_else(|e| panic!("a validated config does not load back from its TOML: {e}"));
    assert_eq!(
        back.to_toml(),
        saved,
        "a validated config changes when saved and loaded"
    );
    t
}
