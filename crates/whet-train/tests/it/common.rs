use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use whet_model::{Config as ModelConfig, LoraConfig, Model};
use whet_train::{Config, Quiet, Row, Summary, Trainer};

pub fn tiny_model(lora: bool) -> Model {
    let json = r#"{
        "model_type": "llama", "vocab_size": 48, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    }"#;
    let cfg = ModelConfig::from_json_str(json, Path::new("tiny/config.json")).unwrap();
    let mut model = Model::random(&cfg, 7, &Device::Cpu).unwrap();
    if lora {
        let mut l = LoraConfig::new(4, 8.0);
        l.dropout = 0.1;
        model.apply_lora(&l, 11).unwrap();
    } else {
        model.make_full_trainable().unwrap();
    }
    model
}

/// Rows of a learnable pattern: each document counts up modulo the vocabulary from a start
/// token, some rows pack two documents, and the first tokens of each document are unsupervised.
pub fn rows(n: usize, len: usize) -> Vec<Row> {
    (0..n)
        .map(|i| {
            let split = if i % 3 == 0 { len / 2 } else { len };
            let mut row = Row {
                input_ids: vec![],
                position_ids: vec![],
                segment_ids: vec![],
                targets: vec![],
            };
            for (seg, (start, end)) in [(0, split), (split, len)].into_iter().enumerate() {
                let first = 3 + (i * 5 + seg * 7) % 40;
                for p in 0..end - start {
                    row.input_ids.push(((first + p) % 45 + 3) as u32);
                    row.position_ids.push(p as u32);
                    row.segment_ids.push(seg as u32);
                }
                for p in 0..end - start {
                    let last = p + 1 == end - start;
                    let supervised = p >= 2 + i % 3 && !last;
                    row.targets.push(if supervised {
                        ((first + p + 1) % 45 + 3) as i64
                    } else {
                        -100
                    });
                }
            }
            row
        })
        .collect()
}

pub fn config(out: &Path, overrides: &[&str]) -> Config {
    let text = format!(
        r#"
        [model]
        path = "unused"
        [data]
        train = "unused.jsonl"
        [train]
        seed = 3
        micro_batch = 2
        lr = 1e-2
        warmup_steps = 1
        max_grad_norm = 1.0
        [output]
        dir = "{}"
        keep_last = 2
        "#,
        out.display()
    );
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_toml(&text, Path::new("/tmp/test.toml"), &o).unwrap()
}

pub fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "whet-train-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// All trainable values, flattened, in a stable order.
pub fn trainable_values(model: &Model) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = model
        .trainable()
        .into_iter()
        .map(|(n, var)| {
            (
                n,
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Runs a trainer quietly on the CPU.
pub fn run(
    model: &mut Model,
    config: &Config,
    train: &[Row],
    validation: &[Row],
    run_id: &str,
) -> whet_train::Result<Summary> {
    let out = config.output.dir.clone();
    Trainer {
        model,
        config,
        train,
        validation,
        out: &out,
        device: Device::Cpu,
        run_id: run_id.into(),
    }
    .run(&mut Quiet)
}
