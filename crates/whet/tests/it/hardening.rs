//! Hostile settings and model files: every numeric setting checked with an error naming its
//! key before anything runs; broken config.json values and NaN or overflowing weights give
//! a non-zero exit naming the cause, in eval, generate and training alike.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::common::*;

/// `whet train` with `--set` overrides on the chat run; must fail naming `key`, having
/// created nothing.
#[track_caller]
fn refused(tmp: &Tmp, cfg: &Path, sets: &[&str], key: &str) -> String {
    let mut args = vec!["train", "--config", s(cfg)];
    for o in sets {
        args.extend(["--set", o]);
    }
    let r = whet(&args).fails();
    assert!(
        r.stderr.contains(&format!("`{key}`")),
        "{sets:?}: the key `{key}` is not named:\n{}",
        r.stderr
    );
    assert!(
        !tmp.join("out").exists(),
        "{sets:?}: a refused config created its output folder"
    );
    r.stderr
}

#[test]
fn every_numeric_setting_is_checked_naming_the_key_before_anything_runs() {
    let tmp = Tmp::new("settings");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, CHAT_RUN);
    // Used to run forever.
    let err = refused(
        &tmp,
        &cfg,
        &["train.epochs=inf", "train.max_steps=0"],
        "train.epochs",
    );
    assert!(
        err.contains("must be a finite number > 0") && err.contains("got inf"),
        "{err}"
    );
    for (sets, key) in [
        // Used to train one step.
        (
            &["train.epochs=nan", "train.max_steps=0"][..],
            "train.epochs",
        ),
        // 4 * 2^62 wrapped to 0: a division by zero.
        (
            &[
                "train.micro_batch=4",
                "train.grad_accum=4611686018427387904",
            ],
            "train.grad_accum",
        ),
        // 4 * (2^62 + 1) wrapped to 4: silently another batch.
        (
            &[
                "train.micro_batch=4",
                "train.grad_accum=4611686018427387905",
            ],
            "train.grad_accum",
        ),
        // These aborted on allocation.
        (&["train.micro_batch=1000000000000"], "train.micro_batch"),
        (&["data.max_len=1000000000000"], "data.max_len"),
        (&["lora.r=1000000000000"], "lora.r"),
        (&["train.beta2=nan"], "train.beta2"),
        (&["lora.alpha=inf"], "lora.alpha"),
        (&["train.max_grad_norm=-1.0"], "train.max_grad_norm"),
    ] {
        refused(&tmp, &cfg, sets, key);
    }
    // Limits from the model (hidden 64, k/v 32 x 64, 256 positions), read from its config.json
    // before the data or the weights.
    let err = refused(&tmp, &cfg, &["lora.r=1000"], "lora.r");
    assert!(err.contains("config.json") && err.contains("min("), "{err}");
    let err = refused(&tmp, &cfg, &["data.max_len=4096"], "data.max_len");
    assert!(err.contains("max_position_embeddings"), "{err}");
}

#[test]
fn a_single_target_module_is_a_list_of_one_name() {
    let tmp = Tmp::new("one-module");
    let m = model(&tmp);
    chat_data(&tmp);
    let body = CHAT_RUN
        .replace(
            "dropout = 0.0",
            "dropout = 0.0\ntarget_modules = [\"q_proj\"]",
        )
        .replace("max_steps = 6", "max_steps = 2")
        .replace("eval_every = 3", "eval_every = 2");
    let cfg = config(&tmp, &m, &body);
    whet(["train", "--config", s(&cfg)]).ok();
    let adapter: Value = serde_json::from_str(
        &fs::read_to_string(tmp.join("out/adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["target_modules"], serde_json::json!(["q_proj"]));
    let names: Vec<String> = safetensors_header(&tmp.join("out/adapter/adapter_model.safetensors"))
        .keys()
        .cloned()
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| n.contains("q_proj")),
        "{names:?}"
    );
}

/// A change to config.json.
type Edit = fn(&mut Value);

/// Rewrites `model/config.json` with `edit` applied.
fn edit_config(m: &Path, edit: impl FnOnce(&mut Value)) {
    let path = m.join("config.json");
    let mut v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    write(&path, &v.to_string());
}

/// `whet eval` and `whet generate` on `m`: both must fail (exit 1, no panic); their stderr.
fn eval_and_generate_fail(tmp: &Tmp, m: &Path) -> [String; 2] {
    let data = tmp.join("general.jsonl");
    let eval = whet(["eval", "--model", s(m), "--data", s(&data)]).fails();
    assert!(
        !eval.stdout.contains("null"),
        "eval printed a result: {}",
        eval.stdout
    );
    let generate = whet([
        "generate",
        "--model",
        s(m),
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "4",
    ])
    .fails();
    [eval.stderr, generate.stderr]
}

#[test]
fn invalid_model_config_values_are_named_in_eval_and_generate() {
    let tmp = Tmp::new("model-config");
    let m = model(&tmp);
    chat_data(&tmp);
    let original = fs::read_to_string(m.join("config.json")).unwrap();
    let cases: [(&str, Edit); 4] = [
        ("rope_theta", |v| {
            v["rope_theta"] = (-1.0).into();
            v["rope_parameters"]["rope_theta"] = (-1.0).into();
        }),
        ("rope_theta", |v| {
            v["rope_theta"] = 0.0.into();
            v["rope_parameters"]["rope_theta"] = 0.0.into();
        }),
        ("rms_norm_eps", |v| v["rms_norm_eps"] = (-1e-5).into()),
        // 2^61: the shape arithmetic overflowed ("capacity overflow" panic).
        ("head_dim", |v| {
            v["head_dim"] = 2305843009213693952u64.into()
        }),
    ];
    for (field, edit) in cases {
        write(&m.join("config.json"), &original);
        edit_config(&m, edit);
        for err in eval_and_generate_fail(&tmp, &m) {
            assert!(
                err.contains("config.json") && err.contains(field),
                "{field}: {err}"
            );
        }
    }
}

/// Overwrites every f32 of tensor `name` in `m/model.safetensors` with `value`.
fn fill_tensor(m: &Path, name: &str, value: f32) {
    let path = m.join("model.safetensors");
    let header = safetensors_header(&path);
    let mut bytes = fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let info = &header[name];
    assert_eq!(info["dtype"], "F32", "{name}");
    let offsets = info["data_offsets"].as_array().unwrap();
    let (a, b) = (
        8 + n + offsets[0].as_u64().unwrap() as usize,
        8 + n + offsets[1].as_u64().unwrap() as usize,
    );
    for chunk in bytes[a..b].chunks_exact_mut(4) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    fs::write(&path, bytes).unwrap();
}

#[test]
fn nan_weights_fail_eval_generate_and_training_naming_the_tensor() {
    let tmp = Tmp::new("nan-weights");
    let m = model(&tmp);
    chat_data(&tmp);
    let tensor = "model.layers.0.mlp.down_proj.weight";
    fill_tensor(&m, tensor, f32::NAN);
    for err in eval_and_generate_fail(&tmp, &m) {
        assert!(err.contains(tensor) && err.contains("NaN"), "{err}");
    }
    let cfg = config(&tmp, &m, CHAT_RUN);
    let r = whet(["train", "--config", s(&cfg)]).fails();
    assert!(r.stderr.contains(tensor), "{}", r.stderr);
}

#[test]
fn overflowing_logits_fail_eval_and_generate_naming_the_likely_cause() {
    let tmp = Tmp::new("overflow-logits");
    let m = model(&tmp);
    chat_data(&tmp);
    // Finite weights, so they load; the final norm's scale overflows f32 in the logits.
    fill_tensor(&m, "model.norm.weight", 3e38);
    for err in eval_and_generate_fail(&tmp, &m) {
        assert!(
            err.contains("weights are finite")
                && err.contains("rope_theta")
                && err.contains("rms_norm_eps"),
            "{err}"
        );
    }
}
