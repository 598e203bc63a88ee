//! Parity with PyTorch / transformers / PEFT on the fixtures of `fixtures/golden/` (made by
//! `fixtures/gen/make_golden.py`, described in `fixtures/MANIFEST.md`).
//!
//! The fixture's `loss` and gradients are of the mean over supervised tokens; [`Model::loss`]
//! returns the sum and the count, so the test divides. Tolerances: logits 1e-4 absolute, loss
//! 1e-5 absolute, gradients 1e-3 relative to the reference tensor's max |grad|. Each test
//! prints what it reached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use whet_model::{GenerationConfig, LayerAttention, Model, Trainable, generate};

use crate::common::*;

const LOGITS_TOL: f32 = 1e-4;
const LOSS_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-3;

/// Every architecture's f32 fixture.
const ALL: [&str; 9] = [
    "llama_tiny",
    "llama3_tiny",
    "llama32_tiny",
    "qwen2_tiny",
    "qwen3_tiny",
    "mistral_tiny",
    "gemma3_tiny",
    "phi3_tiny",
    "phi4_tiny",
];

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

/// The model folder and its golden tensors, or `None` (with the reason on stderr).
fn fixture(name: &str) -> Option<(PathBuf, HashMap<String, Tensor>)> {
    let dir = golden_root().join(name);
    let path = dir.join("golden.safetensors");
    if !path.is_file() {
        eprintln!(
            "SKIP golden {name}: {} is absent (see fixtures/gen/README.md)",
            path.display()
        );
        return None;
    }
    let g = candle_core::safetensors::load(&path, &cpu()).unwrap();
    Some((dir, g))
}

struct Inputs {
    ids: Tensor,
    positions: Tensor,
    segments: Tensor,
    targets: Tensor,
    n: usize,
}

fn inputs(g: &HashMap<String, Tensor>) -> Inputs {
    let u32_of = |k: &str| g[k].to_dtype(DType::U32).unwrap();
    Inputs {
        ids: u32_of("input_ids"),
        positions: u32_of("position_ids"),
        segments: u32_of("segment_ids"),
        targets: g["targets"].clone(),
        n: g["n_targets"].to_scalar::<i64>().unwrap() as usize,
    }
}

fn scalar(g: &HashMap<String, Tensor>, k: &str) -> f32 {
    g[k].to_scalar::<f32>().unwrap()
}

/// Checks logits and mean loss against `prefix`logits / `prefix`loss; returns (dlogits, dloss).
fn check_forward(
    model: &Model,
    g: &HashMap<String, Tensor>,
    prefix: &str,
    what: &str,
) -> (f32, f32) {
    let x = inputs(g);
    let logits = model.logits(&x.ids, &x.positions, &x.segments).unwrap();
    let dl = max_abs_diff(&logits, &g[&format!("{prefix}logits")]);
    let (sum, n) = model
        .loss(&x.ids, &x.positions, &x.segments, &x.targets)
        .unwrap();
    assert_eq!(n, x.n, "{what}: supervised count");
    let mean = sum.to_scalar::<f32>().unwrap() / n as f32;
    let want = scalar(g, &format!("{prefix}loss"));
    let dloss = (mean - want).abs();
    eprintln!(
        "{what}: max |logits - golden| = {dl:.2e}, |loss - golden| = {dloss:.2e} (loss {mean})"
    );
    assert!(dl <= LOGITS_TOL, "{what}: logits differ by {dl}");
    assert!(dloss <= LOSS_TOL, "{what}: loss {mean} vs {want}");
    (dl, dloss)
}

/// Backward of the mean loss; every trainable weight's gradient against `prefix`<name>.
fn check_grads(model: &Model, g: &HashMap<String, Tensor>, prefix: &str, what: &str) {
    let x = inputs(g);
    let (sum, n) = model
        .loss(&x.ids, &x.positions, &x.segments, &x.targets)
        .unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    let vars = model.trainable();
    let mut ours: Vec<String> = vars.iter().map(|(n, _)| format!("{prefix}{n}")).collect();
    let mut theirs: Vec<String> = g
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(
        ours, theirs,
        "{what}: trainable weights vs golden gradients"
    );
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let want = &g[&format!("{prefix}{name}")];
        let e = rel_err(got, want);
        if e > worst.0 {
            worst = (e, name.clone());
        }
        assert!(
            e <= GRAD_TOL,
            "{what}: gradient of {name} off by {e} (relative to max |grad|)"
        );
    }
    eprintln!(
        "{what}: {} gradients, worst relative error {:.2e} ({})",
        vars.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn golden_logits_loss_and_rope() {
    for name in ALL.iter().copied().chain(["llama_tiny_bf16"]) {
        let Some((dir, g)) = fixture(name) else {
            continue;
        };
        let model = Model::load(&dir, Trainable::None, &cpu()).unwrap();
        check_forward(&model, &g, "", name);
        if let Some(want) = g.get("rope.inv_freq") {
            let got = Tensor::new(model.config().inv_freq().as_slice(), &cpu()).unwrap();
            let e = rel_err(&got, want);
            eprintln!("{name}: inv_freq max rel err {e:.2e}");
            assert!(e < 1e-6, "{name}: inv_freq");
        }
        if let Some(want) = g.get("rope.local_inv_freq") {
            let local = model.config().inv_freq_for(LayerAttention::Sliding);
            let e = rel_err(&Tensor::new(local.as_slice(), &cpu()).unwrap(), want);
            eprintln!("{name}: local layers' inv_freq max rel err {e:.2e}");
            assert!(e < 1e-6, "{name}: local inv_freq");
        }
    }
}

/// Phi-4-mini's LongRoPE past the original context (32 in the fixture): a 40-token document
/// switches every position to the long factors, as transformers does per forward.
#[test]
fn golden_longrope_past_the_original_context() {
    let Some((dir, g)) = fixture("phi4_tiny") else {
        return;
    };
    let model = Model::load(&dir, Trainable::None, &cpu()).unwrap();
    let long = model.config().inv_freq_long().expect("longrope");
    let e = rel_err(
        &Tensor::new(long.as_slice(), &cpu()).unwrap(),
        &g["rope.long_inv_freq"],
    );
    assert!(e < 1e-6, "long inv_freq off by {e}");
    let ids = g["long.input_ids"].to_dtype(DType::U32).unwrap(); // (1, 40)
    let t = ids.dim(1).unwrap();
    let positions = Tensor::arange(0u32, t as u32, &cpu())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let segments = Tensor::zeros((1, t), DType::U32, &cpu()).unwrap();
    let logits = model.logits(&ids, &positions, &segments).unwrap();
    let d = max_abs_diff(&logits, &g["long.logits"]);
    eprintln!("phi4_tiny: 40 positions (long factors): max |logits - golden| = {d:.2e}");
    assert!(d <= LOGITS_TOL, "long-context logits differ by {d}");
    // The same tokens within the original context take the short factors: other logits.
    let short = model
        .logits(
            &ids.narrow(1, 0, 24).unwrap(),
            &positions.narrow(1, 0, 24).unwrap(),
            &segments.narrow(1, 0, 24).unwrap(),
        )
        .unwrap();
    let moved = max_abs_diff(&short, &logits.narrow(1, 0, 24).unwrap());
    assert!(moved > 1e-3, "the long factors changed nothing ({moved})");
}

#[test]
fn golden_transformers_4_config_gives_the_same_model() {
    for name in ALL {
        let Some((dir, g)) = fixture(name) else {
            continue;
        };
        let v4 = TempDir::new(&format!("v4-{name}"));
        std::fs::copy(dir.join("config_v4.json"), v4.path().join("config.json")).unwrap();
        std::fs::copy(
            dir.join("model.safetensors"),
            v4.path().join("model.safetensors"),
        )
        .unwrap();
        let a = Model::load(&dir, Trainable::None, &cpu()).unwrap();
        let b = Model::load(v4.path(), Trainable::None, &cpu()).unwrap();
        assert_eq!(a.config().inv_freq(), b.config().inv_freq(), "{name}");
        check_forward(&b, &g, "", &format!("{name} (config_v4.json)"));
    }
}

#[test]
fn golden_full_fine_tuning_gradients() {
    for name in ALL {
        let Some((dir, g)) = fixture(name) else {
            continue;
        };
        let model = Model::load(&dir, Trainable::Full, &cpu()).unwrap();
        check_grads(&model, &g, "grad.", name);
    }
}

#[test]
fn golden_lora_and_rslora() {
    for name in [
        "llama_tiny",
        "llama32_tiny",
        "qwen2_tiny",
        "qwen3_tiny",
        "gemma3_tiny",
        "phi3_tiny",
        "phi4_tiny",
    ] {
        let Some((dir, g)) = fixture(name) else {
            continue;
        };
        for (adapter, prefix) in [("lora", "lora."), ("lora_rs", "rslora.")] {
            let what = format!("{name} {adapter}");
            let mut model = Model::load(&dir, Trainable::None, &cpu()).unwrap();
            let cfg = model.load_adapter(&dir.join(adapter)).unwrap();
            assert_eq!(
                (cfg.r, cfg.alpha, cfg.use_rslora),
                (4, 8.0, adapter == "lora_rs")
            );
            check_forward(&model, &g, prefix, &what);
            check_grads(&model, &g, &format!("{prefix}grad."), &what);

            // Merged, the adapter is part of the weights: same logits without LoRA.
            model.merge_lora().unwrap();
            let x = inputs(&g);
            let merged = model.logits(&x.ids, &x.positions, &x.segments).unwrap();
            let d = max_abs_diff(&merged, &g[&format!("{prefix}logits")]);
            eprintln!("{what}: merged max |logits - golden| = {d:.2e}");
            assert!(d <= LOGITS_TOL, "{what}: merged logits differ by {d}");
        }
    }
}

#[test]
fn golden_greedy_generation() {
    for name in ALL {
        let Some((dir, g)) = fixture(name) else {
            continue;
        };
        let model = Model::load(&dir, Trainable::None, &cpu()).unwrap();
        let prompt: Vec<u32> = g["gen.prompt_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<u32> = g["gen.greedy_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let new = want.len() - prompt.len();
        let mut cfg = GenerationConfig::greedy(new);
        cfg.eos_token_ids = Some(vec![]); // HF ran with eos_token_id=None
        let got = generate(&model, &prompt, &cfg).unwrap();
        assert_eq!(got, want[prompt.len()..].to_vec(), "{name}: greedy ids");

        // The cached decoding logits behind each pick.
        let mut cache = model.new_cache();
        let mut step = Tensor::new(prompt.as_slice(), &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut worst = 0f32;
        for (i, &tok) in got.iter().enumerate() {
            let logits = model
                .forward_cached(&step, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap(); // (V)
            worst = worst.max(max_abs_diff(&logits, &g["gen.step_logits"].get(i).unwrap()));
            step = Tensor::new(&[tok], &cpu()).unwrap().unsqueeze(0).unwrap();
        }
        eprintln!("{name}: greedy ids equal; step logits max diff {worst:.2e}");
        assert!(worst <= LOGITS_TOL, "{name}: step logits off by {worst}");
    }
}

/// Per-sequence log-probabilities of TRL's preference batch (`fixtures/golden/preference/`, made
/// by `fixtures/gen/make_preference_golden.py`): the policy (llama_tiny + its LoRA adapter) and
/// the reference (the adapter off) against TRL's `DPOTrainer` log-probs, and ORPO's averaged
/// log-probs and chosen NLL against `ORPOTrainer.concatenated_forward`. The losses and gradients
/// are checked in whet-train (`tests/it/preference.rs`).
#[test]
fn golden_preference_sequence_logps() {
    let path = golden_root().join("preference/preference.safetensors");
    if !path.is_file() {
        eprintln!(
            "SKIP golden preference: {} is absent (see fixtures/gen/README.md)",
            path.display()
        );
        return;
    }
    let g = candle_core::safetensors::load(&path, &cpu()).unwrap();
    let mut model =
        Model::load(&golden_root().join("llama_tiny"), Trainable::None, &cpu()).unwrap();
    model
        .load_adapter(&golden_root().join("llama_tiny/lora"))
        .unwrap();
    let ids: Vec<Vec<i64>> = g["dpo.input_ids"].to_vec2().unwrap();
    let completion: Vec<Vec<i64>> = g["dpo.completion_mask"].to_vec2().unwrap();
    let attention: Vec<Vec<i64>> = g["dpo.attention_mask"].to_vec2().unwrap();
    let (b, t) = (ids.len(), ids[0].len());
    // The target of position i is token i + 1 where `mask` marks it (TRL's shifted labels).
    let shifted = |mask: &dyn Fn(usize, usize) -> bool| {
        let v: Vec<i64> = (0..b)
            .flat_map(|r| (0..t).map(move |i| (r, i)))
            .map(|(r, i)| {
                if i + 1 < t && mask(r, i + 1) {
                    ids[r][i + 1]
                } else {
                    -100
                }
            })
            .collect();
        Tensor::from_vec(v, (b, t), &cpu()).unwrap()
    };
    let targets = shifted(&|r, i| completion[r][i] == 1);
    // ORPO's NLL: prompt and completion of the chosen rows (the first half).
    let nll_targets = shifted(&|r, i| r < b / 2 && attention[r][i] == 1);
    let ids_t = g["dpo.input_ids"].to_dtype(DType::U32).unwrap();
    let positions = Tensor::arange(0u32, t as u32, &cpu())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((b, 1))
        .unwrap();
    let segments = Tensor::zeros((b, t), DType::U32, &cpu()).unwrap();

    let sets = model
        .sequence_logps_sets(&ids_t, &positions, &segments, &[&targets, &nll_targets])
        .unwrap();
    let (policy, counts) = &sets[0];
    let want_counts: Vec<i64> = g["dpo.n_targets"].to_vec1().unwrap();
    let counts_i64: Vec<i64> = counts.iter().map(|&n| n as i64).collect();
    assert_eq!(counts_i64, want_counts, "supervised targets per row");
    let d_policy = max_abs_diff(policy, &g["dpo.policy_logps"]);
    let (reference, _) = model
        .reference_sequence_logps(&ids_t, &positions, &segments, &targets)
        .unwrap();
    let d_reference = max_abs_diff(&reference, &g["dpo.reference_logps"]);
    let n = Tensor::new(counts.iter().map(|&n| n as f32).collect::<Vec<_>>(), &cpu()).unwrap();
    let d_avg = max_abs_diff(&(policy / n).unwrap(), &g["orpo.avg_logps"]);
    let (full, full_counts) = &sets[1];
    let nll = -full.sum_all().unwrap().to_scalar::<f32>().unwrap()
        / full_counts.iter().sum::<usize>() as f32;
    let d_nll = (nll - g["orpo.nll"].to_scalar::<f32>().unwrap()).abs();
    eprintln!(
        "preference: max |logps - TRL| policy {d_policy:.2e}, reference {d_reference:.2e}, ORPO averages {d_avg:.2e}; |NLL - TRL| {d_nll:.2e}"
    );
    assert!(d_policy <= LOGITS_TOL, "policy log-probs off by {d_policy}");
    assert!(
        d_reference <= LOGITS_TOL,
        "reference log-probs off by {d_reference}"
    );
    assert!(d_avg <= LOGITS_TOL, "ORPO average log-probs off by {d_avg}");
    assert!(d_nll <= LOSS_TOL, "ORPO NLL off by {d_nll}");
}
