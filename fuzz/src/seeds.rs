//! The seed corpus under `fixtures/fuzz/<target>/`, generated here so every seed says how it
//! was made: `cargo run -p whet-fuzz -- seeds` writes it, and a test checks that the
//! committed files are what this module generates.
//!
//! Seeds are small valid inputs that reach deep into each reader (the tiny GGUFs convert, the
//! model folders load, each data file yields examples of every shape); a seed whose name starts
//! with `bad-` is a near miss that fails on purpose, in a place valid files never reach.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

/// Every seed: (target folder, file name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push((target, name.to_string(), bytes));
    };
    add("gguf", "tiny-q8_0.gguf", tiny_gguf(GgmlDType::Q8_0, false));
    add(
        "gguf",
        "tiny-f16-tied.gguf",
        tiny_gguf(GgmlDType::F16, true),
    );
    add("safetensors", "dtypes.safetensors", dtypes_safetensors());
    add("safetensors", "bad-i64.safetensors", i64_safetensors());
    for (name, cfg) in [("llama", llama_config()), ("qwen2", qwen2_config())] {
        add("model_config", &format!("{name}.json"), cfg.clone());
        let mut folder = cfg;
        folder.push(0);
        folder.extend(folder_weights(name == "qwen2"));
        add("model_folder", &format!("{name}.bin"), folder);
    }
    add(
        "model_config",
        "qwen3.json",
        br#"{"model_type": "qwen3", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
 "rope_theta": 1000000.0, "use_sliding_window": true, "sliding_window": 4,
 "max_window_layers": 1, "tie_word_embeddings": true, "max_position_embeddings": 64}
"#
        .to_vec(),
    );
    add(
        "model_config",
        "gemma3.json",
        br#"{"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 8,
 "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
 "num_key_value_heads": 1, "head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 4,
 "hidden_activation": "gelu_pytorch_tanh", "_sliding_window_pattern": 2,
 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
 "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
 "final_logit_softcapping": null, "max_position_embeddings": 64}
"#
        .to_vec(),
    );
    add(
        "model_config",
        "llama3-rope.json",
        br#"{"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "rope_theta": 500000.0,
 "max_position_embeddings": 128, "eos_token_id": [1, 2], "bos_token_id": 0}
"#
        .to_vec(),
    );
    for (name, text) in JSONL {
        add("jsonl", &format!("{name}.jsonl"), text.as_bytes().to_vec());
        let rows: Vec<&str> = text.lines().collect();
        add(
            "json",
            &format!("{name}.json"),
            format!("[\n{}\n]\n", rows.join(",\n")).into_bytes(),
        );
    }
    for (name, text) in CSV {
        add("csv", &format!("{name}.csv"), text.as_bytes().to_vec());
    }
    for (name, batch) in batches() {
        add("parquet", &format!("{name}.parquet"), parquet(&batch));
        add("arrow", &format!("{name}.arrow"), arrow_file(&batch));
        add(
            "arrow",
            &format!("{name}-stream.arrows"),
            arrow_stream(&batch),
        );
    }
    for (name, template) in templates() {
        let mut bytes = template.into_bytes();
        bytes.push(0);
        bytes.extend_from_slice(MESSAGES.as_bytes());
        add("chat_template", &format!("{name}.bin"), bytes);
    }
    for recipe in ["default", "sft", "qlora", "kfold"] {
        let path = crate::workspace().join(format!("recipes/{recipe}.toml"));
        let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // `--set` overrides after the first NUL byte, one per NUL-separated part.
        bytes.extend_from_slice(b"\0train.lr=1e-4\0lora.r=4\0data.max_len=64");
        add("train_config", &format!("{recipe}.bin"), bytes);
    }
    add(
        "train_config",
        "minimal.bin",
        b"[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[output]\ndir = \"out\"\n\0train.epochs=2\0train.micro_batch=2"
            .to_vec(),
    );
    // The `[data]` keys that shape reading and tokenizing: columns, a shipped chat template,
    // long documents as windows with an overlap.
    add(
        "train_config",
        "data_settings.bin",
        b"[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\nmax_len = 64\nwindow_overlap = 8\nchat_template = \"chatml\"\ncolumns = { prompt = \"question\", completion = \"answer\" }\n[output]\ndir = \"out\"\n\0data.long_documents=\"truncate\""
            .to_vec(),
    );
    // A data mixture: two `[[data.sources]]` with their own format, columns and weight.
    add(
        "train_config",
        "data_sources.bin",
        b"[model]\npath = \"m\"\n[data]\nmax_len = 64\n[[data.sources]]\nname = \"manuals\"\npath = \"a.jsonl\"\nformat = \"text\"\ncolumns = { text = \"body\" }\nweight = 3.0\nmax_tokens = 100000\n[[data.sources]]\npath = \"b.jsonl\"\n[output]\ndir = \"out\"\n\0data.max_len=128"
            .to_vec(),
    );
    out
}

/// Writes every seed under `dir/<target>/`, replacing what is there.
pub fn write(dir: &Path) -> std::io::Result<usize> {
    let seeds = all();
    let mut targets: Vec<&str> = seeds.iter().map(|s| s.0).collect();
    targets.dedup();
    for t in targets {
        let _ = std::fs::remove_dir_all(dir.join(t));
    }
    for (target, name, bytes) in &seeds {
        std::fs::create_dir_all(dir.join(target))?;
        std::fs::write(dir.join(target).join(name), bytes)?;
    }
    Ok(seeds.len())
}

// ---------------------------------------------------------------------------------------------
// models

/// Small deterministic weights in [-0.5, 0.5).
fn weights(n: usize, salt: u64) -> Vec<f32> {
    let mut rng = crate::mutate::Rng::new(salt);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

fn tensor(shape: &[usize], salt: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(weights(n, salt), shape, &Device::Cpu).expect("shape matches data")
}

/// A one-layer llama GGUF (hidden 32, 2 heads of 16, 1 KV head, vocabulary 16) with a
/// byte-level BPE tokenizer and a chat template; matrices in `matrix`, norms in F32.
fn tiny_gguf(matrix: GgmlDType, tied: bool) -> Vec<u8> {
    let (h, f, v) = (32usize, 32usize, 16usize);
    let tokens = [
        "<s>",
        "</s>",
        "a",
        "b",
        "c",
        "d",
        "e",
        "Ġ",
        "ab",
        "cd",
        "Ġa",
        "abc",
        "<|im_start|>",
        "<|im_end|>",
        "x",
        "y",
    ];
    let types = [3i32, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 1, 1];
    let s = |x: &str| Value::String(x.into());
    let mut meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("whet fuzz seed")),
        ("llama.context_length", Value::U32(64)),
        ("llama.embedding_length", Value::U32(h as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(f as u32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.rope.dimension_count", Value::U32(16)),
        ("llama.vocab_size", Value::U32(v as u32)),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.pre",
            s(if tied { "qwen2" } else { "llama-bpe" }),
        ),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(["a b", "c d", "Ġ a", "ab c"].iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(!tied)),
        (
            "tokenizer.chat_template",
            s(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            ),
        ),
    ];
    if tied {
        // candle's writer aligns to 32, so that is the value a file may state.
        meta.push(("general.alignment", Value::U32(32)));
    }
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], dtype: GgmlDType| {
        let salt = crate::engine_hash(&name);
        let q = QTensor::quantize(&tensor(shape, salt), dtype).expect("quantizable shape");
        tensors.push((name, q));
    };
    add("token_embd.weight".into(), &[v, h], matrix);
    add("output_norm.weight".into(), &[h], GgmlDType::F32);
    if !tied {
        add("output.weight".into(), &[v, h], matrix);
    }
    for (part, shape) in [
        ("attn_q", [h, h]),
        ("attn_k", [16, h]),
        ("attn_v", [16, h]),
        ("attn_output", [h, h]),
        ("ffn_gate", [f, h]),
        ("ffn_up", [f, h]),
        ("ffn_down", [h, f]),
    ] {
        add(format!("blk.0.{part}.weight"), &shape, matrix);
    }
    add("blk.0.attn_norm.weight".into(), &[h], GgmlDType::F32);
    add("blk.0.ffn_norm.weight".into(), &[h], GgmlDType::F32);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).expect("writing to memory");
    out.into_inner()
}

fn safetensors_bytes(tensors: &[(&str, Tensor)]) -> Vec<u8> {
    let map: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let views: Vec<(&String, &Tensor)> = map.iter().collect();
    safetensors::serialize(views, None).expect("serializing to memory")
}

/// F32, BF16 and F16 tensors, a scalar and an empty one.
fn dtypes_safetensors() -> Vec<u8> {
    let cpu = &Device::Cpu;
    safetensors_bytes(&[
        ("a.f32", tensor(&[2, 3], 1)),
        ("b.bf16", tensor(&[4], 2).to_dtype(DType::BF16).unwrap()),
        ("c.f16", tensor(&[2, 2], 3).to_dtype(DType::F16).unwrap()),
        ("d.scalar", Tensor::new(1.5f32, cpu).unwrap()),
        ("e.empty", Tensor::zeros((0, 3), DType::F32, cpu).unwrap()),
    ])
}

/// An integer tensor, which the loader refuses by dtype.
fn i64_safetensors() -> Vec<u8> {
    let ids = Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap();
    safetensors_bytes(&[("ids", ids), ("w", tensor(&[2, 2], 4))])
}

fn llama_config() -> Vec<u8> {
    br#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
 "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
 "num_key_value_heads": 1, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
 "max_position_embeddings": 32, "tie_word_embeddings": true, "hidden_act": "silu",
 "bos_token_id": 0, "eos_token_id": 1}
"#
    .to_vec()
}

fn qwen2_config() -> Vec<u8> {
    br#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 16,
 "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
 "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_parameters": {"rope_type": "default",
 "rope_theta": 1000000.0}, "max_position_embeddings": 32, "tie_word_embeddings": false,
 "hidden_act": "silu", "eos_token_id": [1], "sliding_window": 32, "use_sliding_window": false}
"#
    .to_vec()
}

/// The `model.safetensors` of [`llama_config`] (tied) or [`qwen2_config`] (untied, q/k/v biases).
fn folder_weights(qwen2: bool) -> Vec<u8> {
    let (h, f, v, kv) = (8usize, 16usize, 16usize, 4usize);
    let mut names: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    let l = "model.layers.0";
    for (part, shape) in [
        ("self_attn.q_proj.weight", vec![h, h]),
        ("self_attn.k_proj.weight", vec![kv, h]),
        ("self_attn.v_proj.weight", vec![kv, h]),
        ("self_attn.o_proj.weight", vec![h, h]),
        ("mlp.gate_proj.weight", vec![f, h]),
        ("mlp.up_proj.weight", vec![f, h]),
        ("mlp.down_proj.weight", vec![h, f]),
        ("input_layernorm.weight", vec![h]),
        ("post_attention_layernorm.weight", vec![h]),
    ] {
        names.push((format!("{l}.{part}"), shape));
    }
    if qwen2 {
        names.push(("lm_head.weight".into(), vec![v, h]));
        for (part, n) in [("q_proj", h), ("k_proj", kv), ("v_proj", kv)] {
            names.push((format!("{l}.self_attn.{part}.bias"), vec![n]));
        }
    }
    let tensors: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|(n, shape)| {
            let t = tensor(&shape, crate::engine_hash(&n));
            // One bf16 weight: the loader converts it.
            let t = if n.ends_with("up_proj.weight") {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let refs: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    safetensors_bytes(&refs)
}

// ---------------------------------------------------------------------------------------------
// data

/// One file per record shape and column convention.
const JSONL: &[(&str, &str)] = &[
    (
        "text",
        r#"{"text": "The quick brown fox."}
{"text": "Unicode: caf\u00e9 \ud83d\ude00, tabs\tand\nnewlines", "meta": 1}"#,
    ),
    (
        "prompt-completion",
        r#"{"prompt": "2+2=", "completion": "4"}
{"prompt": "Capital of France?", "completion": " Paris.", "id": 7}"#,
    ),
    (
        "messages",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
{"messages": [{"role": "user", "content": "Use a tool"}, {"role": "assistant", "content": "ok"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "done"}]}"#,
    ),
    (
        "sharegpt",
        r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#,
    ),
    (
        "alpaca",
        r#"{"instruction": "Add", "input": "2 and 3", "output": "5"}
{"instruction": "Greet", "input": "", "output": "Hi", "system": "Be kind."}"#,
    ),
];

const CSV: &[(&str, &str)] = &[
    (
        "text",
        "text,id\n\"Hello, world\",1\nplain,2\n\"multi\nline \"\"quoted\"\"\",3\n",
    ),
    (
        "prompt-completion",
        "prompt,completion\n2+2=,4\n\"a, b\",c\n",
    ),
    (
        "messages",
        "messages\n\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"Hi\"\"}, {\"\"role\"\": \"\"assistant\"\", \"\"content\"\": \"\"Hello\"\"}]\"\n",
    ),
    (
        "alpaca",
        "instruction,input,output\nAdd,2 and 3,5\nGreet,,Hi\n",
    ),
];

fn strings(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

/// Record batches for the columnar formats: text, prompt/completion with a null in an extra
/// column, and a
/// `messages` column of `list<struct<role, content>>`.
fn batches() -> Vec<(&'static str, RecordBatch)> {
    let text = RecordBatch::try_from_iter([
        ("text", strings(&["one", "two", "three"])),
        ("source", strings(&["a", "b", "c"])),
    ])
    .expect("valid batch");
    let pc = RecordBatch::try_from_iter([
        ("prompt", strings(&["2+2=", "Hi", "x"])),
        ("completion", strings(&["4", "Hello", "y"])),
        (
            "note",
            Arc::new(StringArray::from(vec![Some("n"), None, Some("")])) as ArrayRef,
        ),
    ])
    .expect("valid batch");
    let fields = Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ]);
    let structs = StructArray::new(
        fields.clone(),
        vec![
            strings(&["user", "assistant", "user", "assistant", "assistant"]),
            strings(&["Hi", "Hello", "2+2?", "4", "Sure"]),
        ],
        None,
    );
    let item = Arc::new(Field::new("item", DataType::Struct(fields), false));
    let lists = ListArray::new(
        item,
        arrow::buffer::OffsetBuffer::from_lengths([2, 3]),
        Arc::new(structs),
        None,
    );
    let schema = Schema::new(vec![Field::new(
        "messages",
        lists.data_type().clone(),
        false,
    )]);
    let messages =
        RecordBatch::try_new(Arc::new(schema), vec![Arc::new(lists)]).expect("valid batch");
    vec![
        ("text", text),
        ("prompt-completion", pc),
        ("messages", messages),
    ]
}

fn parquet(batch: &RecordBatch) -> Vec<u8> {
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .set_created_by("whet-fuzz seeds".into())
        .build();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .expect("parquet writer");
    w.write(batch).expect("write batch");
    w.close().expect("close parquet");
    out
}

fn arrow_file(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(&mut out, &batch.schema()).expect("ipc writer");
    w.write(batch).expect("write batch");
    w.finish().expect("finish ipc");
    drop(w);
    out
}

fn arrow_stream(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w =
        arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).expect("ipc writer");
    w.write(batch).expect("write batch");
    w.finish().expect("finish ipc");
    drop(w);
    out
}

// ---------------------------------------------------------------------------------------------
// templates

/// The conversation after each template seed's NUL byte.
const MESSAGES: &str = r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]"#;

/// The chat templates of `fixtures/templates/` (each model's `tokenizer_config.json` or
/// `chat_template.jinja`).
fn templates() -> Vec<(String, String)> {
    let root = crate::workspace().join("fixtures/templates");
    let mut out = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("fixtures/templates")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            std::fs::read_to_string(jinja).ok()
        } else {
            std::fs::read_to_string(dir.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("chat_template")?.as_str().map(str::to_string))
        };
        if let Some(t) = template.filter(|t| t.len() > 8) {
            out.push((name, t));
        }
    }
    out
}
