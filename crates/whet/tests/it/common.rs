//! Helpers: a temporary folder per test, running the `whet` binary, the tiny model converted
//! from the GGUF fixture, small datasets and configs written by the tests.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_whet");

/// A fresh folder under the system temp dir, removed when the test passes (kept on failure).
pub struct Tmp(PathBuf);

impl Tmp {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "whet-it-{name}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Tmp(dir)
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.join(rel)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// The `whet` command with a clean environment for error-message checks.
pub fn whet_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env(
            "WHET_CACHE",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/whet-cache"),
        )
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    cmd
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    what: String,
}

impl Run {
    /// Asserts exit 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "`whet {}` failed ({}):\n{}\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a non-zero exit and no panic.
    #[track_caller]
    pub fn fails(self) -> Self {
        assert!(
            !self.status.success(),
            "`whet {}` should have failed:\n{}\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        assert_eq!(
            self.status.code(),
            Some(1),
            "`whet {}`: {}\n{}",
            self.what,
            self.status,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "`whet {}` panicked:\n{}",
            self.what,
            self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`whet {}` stdout is not JSON ({e}): {}",
                self.what, self.stdout
            )
        })
    }
}

pub fn whet<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let what = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let Output {
        status,
        stdout,
        stderr,
    } = whet_cmd(&args).output().expect("running whet");
    Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        what,
    }
}

/// `whet convert` of the tiny BPE GGUF into `tmp/model`: an HF folder with a ChatML template.
pub fn model(tmp: &Tmp) -> PathBuf {
    let out = tmp.join("model");
    whet([
        "convert",
        "--from-gguf",
        s(&fixture("gguf/tiny_llama_bpe.gguf")),
        "--out",
        s(&out),
    ])
    .ok();
    out
}

/// A path as `&str` (the temporary folders are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

pub fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

pub fn chat(user: &str, assistant: &str) -> String {
    serde_json::json!({ "messages": [
        { "role": "user", "content": user },
        { "role": "assistant", "content": assistant },
    ]})
    .to_string()
}

pub const CHATS: [(&str, &str); 8] = [
    ("Hi", "Hello! How can I help?"),
    ("Reset my router", "Unplug it for ten seconds."),
    ("Is there an outage?", "No outage in your area."),
    ("Change my plan", "Open the app, then Plans."),
    ("My bill is wrong", "I will check the bill."),
    ("Slow Wi-Fi", "Move the hub up high."),
    ("Cancel please", "Sorry to see you go."),
    ("Thanks", "You are welcome!"),
];

/// Writes `train.jsonl` (8 short chats), `val.jsonl` (2) and `general.jsonl` (2 texts) into `tmp`.
pub fn chat_data(tmp: &Tmp) {
    let train: Vec<String> = CHATS.iter().map(|(u, a)| chat(u, a)).collect();
    write(&tmp.join("train.jsonl"), &(train.join("\n") + "\n"));
    let val = [
        chat("Hello", "Hello! How can I help?"),
        chat("Router reset?", "Unplug it for ten seconds."),
    ];
    write(&tmp.join("val.jsonl"), &(val.join("\n") + "\n"));
    write(
        &tmp.join("general.jsonl"),
        "{\"text\":\"The quick brown fox jumps over the lazy dog.\"}\n{\"text\":\"Rain fell on the quiet town all night.\"}\n",
    );
}

/// A TOML string literal.
pub fn toml_str(p: &Path) -> String {
    toml::Value::String(p.to_string_lossy().into_owned()).to_string()
}

/// Writes `tmp/run.toml`: `body`, then a `[model]` section with `path = model` (relative data
/// paths are relative to the config file, i.e. to `tmp`). Returns its absolute path.
pub fn config(tmp: &Tmp, model: &Path, body: &str) -> PathBuf {
    let path = tmp.join("run.toml");
    write(
        &path,
        &format!("{body}\n[model]\npath = {}\n", toml_str(model)),
    );
    path
}

/// The LoRA chat run of the end-to-end tests: 6 steps, evaluation every 3, a report.
pub const CHAT_RUN: &str = r#"
method = "lora"

[data]
train = "train.jsonl"
validation = "val.jsonl"
format = "chat"
max_len = 64

[lora]
r = 4
alpha = 8.0
dropout = 0.0

[train]
max_steps = 6
micro_batch = 2
lr = 1e-2
eval_every = 3

[eval]
general_data = "general.jsonl"
max_new_tokens = 8
prompts = ["Hi", "Slow Wi-Fi"]

[output]
dir = "out"
"#;

/// Converts the model, writes the chat data and `CHAT_RUN`, trains; returns (model, out).
pub fn trained_chat_run(tmp: &Tmp) -> (PathBuf, PathBuf) {
    let m = model(tmp);
    chat_data(tmp);
    let cfg = config(tmp, &m, CHAT_RUN);
    whet(["train", "--config", s(&cfg)]).ok();
    (m, tmp.join("out"))
}

/// Every line of `metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<Value> {
    let path = out.join("metrics.jsonl");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()))
        })
        .collect()
}

/// (step, value of `field`) of the lines of `kind` ("train" or "eval").
pub fn series(out: &Path, kind: &str, field: &str) -> Vec<(u64, f64)> {
    metrics(out)
        .iter()
        .filter(|v| v["kind"] == kind)
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v[field]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no {field} in {v}")),
            )
        })
        .collect()
}

/// The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}.
pub fn safetensors_header(path: &Path) -> serde_json::Map<String, Value> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.remove("__metadata__");
    header
}

/// Every file under `dir` (relative path -> bytes).
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// Every path under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// The output folder `part` of a run killed right after checkpoint `ckpt` of the finished run
/// `full`: that checkpoint, the claim and the metrics so far (resuming rewinds them).
pub fn killed_after(full: &Path, part: &Path, ckpt: &str) {
    fs::create_dir_all(part.join(ckpt)).unwrap();
    for e in fs::read_dir(full.join(ckpt)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), part.join(ckpt).join(e.file_name())).unwrap();
    }
    fs::copy(
        full.join(whet_data::atomic::MARKER),
        part.join(whet_data::atomic::MARKER),
    )
    .unwrap();
    fs::copy(full.join("metrics.jsonl"), part.join("metrics.jsonl")).unwrap();
}
