//! Parity of the preference losses with TRL on `fixtures/golden/preference/` (made by
//! `fixtures/gen/make_preference_golden.py`, described in `fixtures/MANIFEST.md`): llama_tiny
//! with its LoRA adapter, 3 pairs, DPO (beta 0.1), cDPO (label smoothing 0.1), IPO (beta 0.1) and
//! ORPO (beta 0.1). Each case checks the loss (1e-4 absolute), the logged metrics (1e-4
//! absolute) and every LoRA gradient (1e-3 of the reference tensor's max |grad|), and prints
//! what it reached.
//!
//! The rows are built from the fixture's raw pairs the way TRL's collators lay them out (the P
//! chosen rows, then the P rejected ones, right-padded) and compared with TRL's batch first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use whet_model::{Model, Trainable};
use whet_train::preference::{
    DpoConfig, DpoLoss, PairLogps, PreferenceMetrics, PreferenceOutput, dpo_loss, mean_nll,
    orpo_loss,
};

const LOSS_TOL: f64 = 1e-4;
const METRIC_TOL: f64 = 1e-4;
const LOGPS_TOL: f32 = 1e-4;
const GRAD_TOL: f32 = 1e-3;
const PAD: u32 = 0;
const BETA: f64 = 0.1;

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden")
}

/// The fixture, or `None` with the reason on stderr.
fn fixture() -> Option<HashMap<String, Tensor>> {
    let path = golden_root().join("preference/preference.safetensors");
    if !path.is_file() {
        eprintln!(
            "SKIP preference golden: {} is absent (see fixtures/gen/README.md)",
            path.display()
        );
        return None;
    }
    Some(candle_core::safetensors::load(&path, &Device::Cpu).unwrap())
}

fn policy_model() -> Model {
    let dir = golden_root().join("llama_tiny");
    let mut model = Model::load(&dir, Trainable::None, &Device::Cpu).unwrap();
    model.load_adapter(&dir.join("lora")).unwrap();
    model
}

fn ids_of(g: &HashMap<String, Tensor>, key: &str) -> Vec<u32> {
    g[key]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect()
}

/// TRL's preference batch: 2P rows (prompt + chosen for each pair, then prompt + rejected),
/// right-padded; targets are the next token on the completion (`completion`) or on the whole
/// sequence of the chosen rows (`chosen_full`, ORPO's NLL).
struct Rows {
    ids: Tensor,         // (2P, T) u32
    positions: Tensor,   // (2P, T) u32
    segments: Tensor,    // (2P, T) u32
    completion: Tensor,  // (2P, T) i64
    chosen_full: Tensor, // (2P, T) i64
}

fn rows(g: &HashMap<String, Tensor>) -> Rows {
    let pairs = (0..)
        .take_while(|i| g.contains_key(&format!("pair{i}.prompt_ids")))
        .count();
    let mut seqs: Vec<(Vec<u32>, usize)> = Vec::new(); // (ids, prompt length)
    for side in ["chosen", "rejected"] {
        for i in 0..pairs {
            let prompt = ids_of(g, &format!("pair{i}.prompt_ids"));
            let completion = ids_of(g, &format!("pair{i}.{side}_ids"));
            seqs.push(([prompt.as_slice(), &completion].concat(), prompt.len()));
        }
    }
    let (b, t) = (seqs.len(), seqs.iter().map(|(s, _)| s.len()).max().unwrap());
    let (mut ids, mut completion, mut full) = (vec![], vec![], vec![]);
    for (r, (s, prompt)) in seqs.iter().enumerate() {
        for i in 0..t {
            ids.push(s.get(i).copied().unwrap_or(PAD));
            let next = s.get(i + 1).map(|&x| x as i64);
            completion.push(next.filter(|_| i + 1 >= *prompt).unwrap_or(-100));
            full.push(next.filter(|_| r < pairs).unwrap_or(-100));
        }
    }
    let dev = Device::Cpu;
    let rows = Rows {
        ids: Tensor::from_vec(ids, (b, t), &dev).unwrap(),
        positions: Tensor::arange(0u32, t as u32, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((b, 1))
            .unwrap(),
        segments: Tensor::zeros((b, t), DType::U32, &dev).unwrap(),
        completion: Tensor::from_vec(completion, (b, t), &dev).unwrap(),
        chosen_full: Tensor::from_vec(full, (b, t), &dev).unwrap(),
    };
    // The same batch as TRL's collators made.
    let ours: Vec<Vec<u32>> = rows.ids.to_vec2().unwrap();
    for key in ["dpo.input_ids", "orpo.input_ids"] {
        let theirs: Vec<Vec<u32>> = g[key].to_dtype(DType::U32).unwrap().to_vec2().unwrap();
        assert_eq!(ours, theirs, "{key}");
    }
    rows
}

fn scalar(g: &HashMap<String, Tensor>, k: &str) -> f64 {
    g[k].to_scalar::<f32>().unwrap() as f64
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The loss, TRL's logged metrics and every LoRA gradient of `out` against the fixture's `case`.
fn check(model: &Model, out: &PreferenceOutput, g: &HashMap<String, Tensor>, case: &str) {
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    let want = scalar(g, &format!("{case}.loss"));
    let dloss = (loss - want).abs();
    assert!(dloss <= LOSS_TOL, "{case}: loss {loss} vs TRL {want}");

    let m: &PreferenceMetrics = &out.metrics;
    let mut metrics = vec![
        ("rewards_chosen", m.rewards_chosen),
        ("rewards_rejected", m.rewards_rejected),
        ("rewards_margins", m.reward_margin),
        ("rewards_accuracies", m.reward_accuracy),
        ("logps_chosen", m.logps_chosen),
        ("logps_rejected", m.logps_rejected),
    ];
    if case == "orpo" {
        metrics.push(("nll_loss", m.nll.unwrap()));
        metrics.push(("log_odds_ratio", m.log_odds_ratio.unwrap()));
        metrics.push(("log_odds_chosen", m.log_odds_chosen.unwrap()));
    } else {
        assert_eq!(
            (m.nll, m.log_odds_ratio, m.log_odds_chosen),
            (None, None, None)
        );
    }
    assert_eq!(m.pairs, 3);
    let mut worst_metric = (0f64, "");
    for (name, got) in metrics {
        let want = scalar(g, &format!("{case}.metrics.{name}"));
        let d = (got - want).abs();
        if d >= worst_metric.0 {
            worst_metric = (d, name);
        }
        assert!(d <= METRIC_TOL, "{case}: {name} {got} vs TRL {want}");
    }

    let grads = model.backward(&out.loss).unwrap();
    let vars = model.trainable();
    let prefix = format!("{case}.grad.");
    let mut theirs: Vec<&str> = g.keys().filter_map(|k| k.strip_prefix(&prefix)).collect();
    let mut ours: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    theirs.sort();
    ours.sort();
    assert_eq!(ours, theirs, "{case}: LoRA weights vs TRL gradients");
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        let want = &g[&format!("{prefix}{name}")];
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let e = max_abs_diff(got, want) / scale.max(1e-12);
        if e >= worst.0 {
            worst = (e, name.clone());
        }
        assert!(
            e <= GRAD_TOL,
            "{case}: gradient of {name} off by {e} (relative to max |grad|)"
        );
    }
    eprintln!(
        "{case}: loss {loss:.6} |loss - TRL| {dloss:.2e}; worst metric diff {:.2e} ({}); {} LoRA gradients, worst relative error {:.2e} ({})",
        worst_metric.0,
        worst_metric.1,
        vars.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn dpo_sigmoid_cdpo_and_ipo_match_trl() {
    let Some(g) = fixture() else {
        return;
    };
    let model = policy_model();
    let x = rows(&g);
    let reference = model
        .reference_sequence_logps(&x.ids, &x.positions, &x.segments, &x.completion)
        .unwrap();
    let d_ref = max_abs_diff(&reference.0, &g["dpo.reference_logps"]);
    assert!(d_ref <= LOGPS_TOL, "reference log-probs off by {d_ref}");
    let reference = PairLogps::from_stacked(reference).unwrap();
    for (case, loss) in [
        (
            "dpo_sigmoid",
            DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        ),
        (
            "dpo_cdpo",
            DpoLoss::Sigmoid {
                label_smoothing: 0.1,
            },
        ),
        ("ipo", DpoLoss::Ipo),
    ] {
        let policy = model
            .sequence_logps(&x.ids, &x.positions, &x.segments, &x.completion)
            .unwrap();
        let d_policy = max_abs_diff(&policy.0, &g["dpo.policy_logps"]);
        assert!(
            d_policy <= LOGPS_TOL,
            "{case}: policy log-probs off by {d_policy}"
        );
        let counts: Vec<i64> = policy.1.iter().map(|&n| n as i64).collect();
        assert_eq!(counts, g["dpo.n_targets"].to_vec1::<i64>().unwrap());
        let policy = PairLogps::from_stacked(policy).unwrap();
        let cfg = DpoConfig { beta: BETA, loss };
        let out = dpo_loss(&policy, &reference, &cfg).unwrap();
        eprintln!("{case}: max |logps - TRL| policy {d_policy:.2e}, reference {d_ref:.2e}");
        check(&model, &out, &g, case);
    }
}

#[test]
fn orpo_matches_trl() {
    let Some(g) = fixture() else {
        return;
    };
    let model = policy_model();
    let x = rows(&g);
    let mut sets = model
        .sequence_logps_sets(
            &x.ids,
            &x.positions,
            &x.segments,
            &[&x.completion, &x.chosen_full],
        )
        .unwrap();
    let (full, full_tokens) = sets.pop().unwrap();
    let nll = mean_nll(&full, &full_tokens).unwrap();
    let d_nll = (nll.to_scalar::<f32>().unwrap() as f64 - scalar(&g, "orpo.nll")).abs();
    assert!(d_nll <= LOSS_TOL, "ORPO NLL off by {d_nll}");
    let policy = PairLogps::from_stacked(sets.pop().unwrap()).unwrap();
    let out = orpo_loss(&policy, &nll, BETA).unwrap();
    eprintln!("orpo: |NLL - TRL| {d_nll:.2e}");
    check(&model, &out, &g, "orpo");
}
