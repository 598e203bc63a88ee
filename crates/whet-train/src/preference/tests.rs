//! The preference losses on hand-computed scalars; parity with TRL is `tests/it/preference.rs`.

use candle_core::{Device, Tensor, Var};

use super::*;

fn vec(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

fn var(values: &[f32]) -> Var {
    Var::from_tensor(&vec(values)).unwrap()
}

fn pairs(chosen: &Tensor, rejected: &Tensor, tokens: &[usize]) -> PairLogps {
    PairLogps::new(
        (chosen.clone(), tokens.to_vec()),
        (rejected.clone(), tokens.to_vec()),
    )
    .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn grad(loss: &Tensor, v: &Var) -> Vec<f32> {
    loss.backward()
        .unwrap()
        .get(v.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

const SIGMOID: DpoConfig = DpoConfig {
    beta: 0.1,
    loss: DpoLoss::Sigmoid {
        label_smoothing: 0.0,
    },
};

#[test]
fn log_sigmoid_is_exact_and_its_gradient_is_sigmoid_of_minus_x_even_at_zero() {
    let xs: [f64; 9] = [-800.0, -30.0, -1.5, -1e-3, 0.0, 1e-3, 2.0, 40.0, 800.0];
    let x = Var::from_tensor(&Tensor::new(&xs, &Device::Cpu).unwrap()).unwrap();
    let y = log_sigmoid(x.as_tensor()).unwrap();
    let got = y.to_vec1::<f64>().unwrap();
    let g = y
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for ((&x, y), g) in xs.iter().zip(got).zip(g) {
        // log(sigmoid(x)) = -log(1 + exp(-x)); for large |x|, x or -exp(-x).
        let want = if x < -30.0 { x } else { -(-x).exp().ln_1p() };
        close(
            y,
            want,
            1e-12 * want.abs().max(1.0),
            &format!("logsigmoid({x})"),
        );
        close(g, sigmoid(-x), 1e-15, &format!("d logsigmoid({x})"));
    }
}

#[test]
fn log1m_exp_keeps_its_accuracy_near_zero() {
    let xs = [-20.0, -0.7, -1e-3, -1e-6];
    let y = log1m_exp(&Tensor::new(&xs, &Device::Cpu).unwrap())
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (&x, y) in xs.iter().zip(y) {
        let want = (-f64::exp_m1(x)).ln();
        close(y, want, 1e-9 * want.abs(), &format!("log1mexp({x})"));
    }
}

#[test]
fn a_zero_margin_costs_ln_2_and_pulls_with_beta_over_2p() {
    // Policy = reference (a fresh LoRA, B = 0): every margin is 0.
    let (pc, pr) = (var(&[-3.0, -5.0]), var(&[-4.0, -1.0]));
    let policy = pairs(pc.as_tensor(), pr.as_tensor(), &[2, 3]);
    let reference = pairs(&vec(&[-3.0, -5.0]), &vec(&[-4.0, -1.0]), &[2, 3]);
    let out = dpo_loss(&policy, &reference, &SIGMOID).unwrap();
    close(scalar(&out.loss), 2f64.ln(), 1e-7, "loss");
    assert_eq!(out.loss.dtype(), DType::F32);
    assert_eq!(out.loss.dims(), [] as [usize; 0]);
    // d/d pi_c of mean(-logsigmoid(beta z)) = -beta sigmoid(0) / P = -0.1 * 0.5 / 2.
    let grads = out.loss.backward().unwrap();
    for g in grads.get(pc.as_tensor()).unwrap().to_vec1::<f32>().unwrap() {
        close(g as f64, -0.025, 1e-9, "d loss / d chosen");
    }
    for g in grads.get(pr.as_tensor()).unwrap().to_vec1::<f32>().unwrap() {
        close(g as f64, 0.025, 1e-9, "d loss / d rejected");
    }
    let m = &out.metrics;
    assert_eq!(m.pairs, 2);
    assert_eq!((m.rewards_chosen, m.rewards_rejected), (0.0, 0.0));
    assert_eq!((m.reward_margin, m.reward_accuracy), (0.0, 0.0)); // a tie is no win
    close(m.logps_chosen, -4.0, 1e-12, "logps/chosen");
    close(m.logps_rejected, -2.5, 1e-12, "logps/rejected");
    assert_eq!(
        (m.nll, m.log_odds_ratio, m.log_odds_chosen),
        (None, None, None)
    );
}

#[test]
fn label_smoothing_is_cdpo() {
    // z = (pi_c - ref_c) - (pi_r - ref_r): pair 0: (1 - 0) - (-1 - 0) = 2, pair 1: -3.
    let pc = var(&[1.0, -3.0]);
    let policy = pairs(pc.as_tensor(), &vec(&[-1.0, 0.0]), &[1, 1]);
    let reference = pairs(&vec(&[0.0, 0.0]), &vec(&[0.0, 0.0]), &[1, 1]);
    let (beta, eps) = (0.5, 0.1);
    let cfg = DpoConfig {
        beta,
        loss: DpoLoss::Sigmoid {
            label_smoothing: eps,
        },
    };
    let out = dpo_loss(&policy, &reference, &cfg).unwrap();
    let ls = |x: f64| sigmoid(x).ln();
    let per = |z: f64| -(1.0 - eps) * ls(beta * z) - eps * ls(-beta * z);
    close(
        scalar(&out.loss),
        (per(2.0) + per(-3.0)) / 2.0,
        1e-7,
        "cDPO loss",
    );
    // d/dz = -beta (sigmoid(-beta z) - eps), over P = 2.
    let g = grad(&out.loss, &pc);
    for (g, z) in g.iter().zip([2.0, -3.0]) {
        let want = -beta * (sigmoid(-beta * z) - eps) / 2.0;
        close(*g as f64, want, 1e-7, "d cDPO / d chosen");
    }
    // Without smoothing the same margins cost more on the wrong pair and less on the right one.
    let plain = dpo_loss(
        &policy,
        &reference,
        &DpoConfig {
            beta,
            loss: DpoLoss::Sigmoid {
                label_smoothing: 0.0,
            },
        },
    )
    .unwrap();
    close(
        scalar(&plain.loss),
        (-ls(beta * 2.0) - ls(-beta * 3.0)) / 2.0,
        1e-7,
        "DPO loss",
    );
    // Rewards: beta * (pi - ref).
    let m = &out.metrics;
    close(
        m.rewards_chosen,
        beta * (1.0 - 3.0) / 2.0,
        1e-12,
        "rewards/chosen",
    );
    close(
        m.rewards_rejected,
        beta * (-1.0 + 0.0) / 2.0,
        1e-12,
        "rewards/rejected",
    );
    close(
        m.reward_margin,
        beta * (2.0 - 3.0) / 2.0,
        1e-12,
        "rewards/margins",
    );
    assert_eq!(m.reward_accuracy, 0.5);
}

#[test]
fn ipo_is_zero_at_its_optimum_and_averages_per_token() {
    // beta 0.5: the optimum is a per-token margin of 1 / (2 beta) = 1.
    // Pair 0: chosen +4 over 4 tokens (avg 1), rejected 0 -> delta 1 -> loss 0.
    // Pair 1: chosen +1 over 1 token, rejected -2 over 2 tokens (avg -1) -> delta 2 -> loss 1.
    let pc = var(&[4.0, 1.0]);
    let policy = PairLogps::new(
        (pc.as_tensor().clone(), vec![4, 1]),
        (vec(&[0.0, -2.0]), vec![3, 2]),
    )
    .unwrap();
    let reference = PairLogps::new(
        (vec(&[0.0, 0.0]), vec![4, 1]),
        (vec(&[0.0, 0.0]), vec![3, 2]),
    )
    .unwrap();
    let cfg = DpoConfig {
        beta: 0.5,
        loss: DpoLoss::Ipo,
    };
    let out = dpo_loss(&policy, &reference, &cfg).unwrap();
    close(scalar(&out.loss), (0.0 + 1.0) / 2.0, 1e-7, "IPO loss");
    let g = grad(&out.loss, &pc);
    close(g[0] as f64, 0.0, 1e-9, "no pull at the optimum");
    // d/d pi_c of (delta - 1)^2 / P with delta = pi_c / 1 + ...: 2 (2 - 1) / 1 / 2 = 1.
    close(g[1] as f64, 1.0, 1e-7, "d IPO / d chosen");
    // Only the pair at its optimum alone: 0.
    let at_opt = PairLogps::new((vec(&[4.0]), vec![4]), (vec(&[0.0]), vec![3])).unwrap();
    let zero_ref = PairLogps::new((vec(&[0.0]), vec![4]), (vec(&[0.0]), vec![3])).unwrap();
    let out = dpo_loss(&at_opt, &zero_ref, &cfg).unwrap();
    assert_eq!(scalar(&out.loss), 0.0);
    // IPO's rewards are of the summed log-probs, as TRL 1.16 logs them.
    close(
        out.metrics.rewards_chosen,
        0.5 * 4.0,
        1e-12,
        "rewards/chosen",
    );
}

#[test]
fn reward_accuracy_counts_strict_wins() {
    // chosen rewards beta * (pi - ref): 0.2, 0.0, -0.1; rejected: 0.1, 0.0, -0.3.
    let policy = pairs(&vec(&[2.0, 0.0, -1.0]), &vec(&[1.0, 0.0, -3.0]), &[1, 1, 1]);
    let reference = pairs(&vec(&[0.0; 3]), &vec(&[0.0; 3]), &[1, 1, 1]);
    let out = dpo_loss(&policy, &reference, &SIGMOID).unwrap();
    close(out.metrics.reward_accuracy, 2.0 / 3.0, 1e-12, "accuracy");
    close(
        out.metrics.reward_margin,
        (0.1 + 0.0 + 0.2) / 3.0,
        1e-9,
        "margin",
    );
}

#[test]
fn orpo_by_hand() {
    // Average log-probs: chosen -2/2 = -1, rejected -6/3 = -2.
    let (pc, pr) = (var(&[-2.0]), var(&[-6.0]));
    let policy = PairLogps::new(
        (pc.as_tensor().clone(), vec![2]),
        (pr.as_tensor().clone(), vec![3]),
    )
    .unwrap();
    let nll_var = Var::from_tensor(&Tensor::new(1.5f32, &Device::Cpu).unwrap()).unwrap();
    let beta = 0.25;
    let out = orpo_loss(&policy, nll_var.as_tensor(), beta).unwrap();
    let (c, r) = (-1.0f64, -2.0f64);
    let log_odds = (c - r) - ((1.0 - c.exp()).ln() - (1.0 - r.exp()).ln());
    let ratio = sigmoid(log_odds).ln();
    close(scalar(&out.loss), 1.5 - beta * ratio, 1e-6, "ORPO loss");
    let m = &out.metrics;
    close(
        m.log_odds_chosen.unwrap(),
        log_odds,
        1e-12,
        "log_odds_chosen",
    );
    close(m.log_odds_ratio.unwrap(), ratio, 1e-12, "log_odds_ratio");
    close(m.nll.unwrap(), 1.5, 1e-12, "nll");
    close(m.rewards_chosen, beta * c, 1e-12, "rewards/chosen");
    close(m.rewards_rejected, beta * r, 1e-12, "rewards/rejected");
    close(m.logps_chosen, c, 1e-12, "logps/chosen");
    assert_eq!(m.reward_accuracy, 1.0);
    // The NLL term enters with weight 1; the odds ratio through the averages:
    // d/dc [-beta logsigmoid(L)] = -beta sigmoid(-L) dL/dc, dL/dc = 1 + e^c / (1 - e^c);
    // d c / d pi_c = 1/2.
    let grads = out.loss.backward().unwrap();
    let g_nll = grads
        .get(nll_var.as_tensor())
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    close(g_nll as f64, 1.0, 1e-9, "d loss / d nll");
    let dl_dc = 1.0 + c.exp() / (1.0 - c.exp());
    let want = -beta * sigmoid(-log_odds) * dl_dc / 2.0;
    let g = grads.get(pc.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    close(g as f64, want, 1e-7, "d loss / d chosen");
}

#[test]
fn mean_nll_is_per_token_over_the_rows() {
    let nll = mean_nll(&vec(&[-6.0, -2.0]), &[3, 1]).unwrap();
    close(scalar(&nll), 2.0, 1e-7, "nll");
    assert!(mean_nll(&vec(&[0.0, 0.0]), &[0, 0]).is_err());
    assert!(mean_nll(&vec(&[0.0]), &[1, 1]).is_err());
}

#[test]
fn stacked_rows_split_into_chosen_then_rejected() {
    let p = PairLogps::from_stacked((vec(&[1.0, 2.0, 3.0, 4.0]), vec![5, 6, 7, 8])).unwrap();
    assert_eq!(p.pairs(), 2);
    assert_eq!(p.chosen.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    assert_eq!(p.rejected.to_vec1::<f32>().unwrap(), [3.0, 4.0]);
    assert_eq!(
        (p.chosen_tokens, p.rejected_tokens),
        (vec![5, 6], vec![7, 8])
    );
    assert!(PairLogps::from_stacked((vec(&[1.0, 2.0, 3.0]), vec![1, 1, 1])).is_err());
    assert!(PairLogps::from_stacked((vec(&[1.0, 2.0]), vec![1, 1, 1, 1])).is_err());
}

#[test]
fn bad_inputs_are_errors_that_say_what_to_do() {
    let one = |x: f32| PairLogps::new((vec(&[x]), vec![1]), (vec(&[x]), vec![1])).unwrap();
    let msg = |r: Result<PreferenceOutput>| r.unwrap_err().to_string();
    let bad_beta = DpoConfig {
        beta: 0.0,
        ..SIGMOID
    };
    assert!(msg(dpo_loss(&one(0.0), &one(0.0), &bad_beta)).contains("beta = 0"));
    let bad_ls = DpoConfig {
        beta: 0.1,
        loss: DpoLoss::Sigmoid {
            label_smoothing: 0.7,
        },
    };
    assert!(msg(dpo_loss(&one(0.0), &one(0.0), &bad_ls)).contains("[0, 0.5]"));
    let other_counts = PairLogps::new((vec(&[0.0]), vec![2]), (vec(&[0.0]), vec![1])).unwrap();
    assert!(msg(dpo_loss(&one(0.0), &other_counts, &SIGMOID)).contains("same rows"));
    let empty = PairLogps::new((vec(&[0.0]), vec![1]), (vec(&[0.0]), vec![0])).unwrap();
    let nll = Tensor::new(1f32, &Device::Cpu).unwrap();
    assert!(msg(orpo_loss(&empty, &nll, 0.1)).contains("rejected completion of pair 0"));
    assert!(msg(orpo_loss(&one(-1.0), &vec(&[1.0]), 0.1)).contains("scalar"));
    assert!(PairLogps::new((vec(&[0.0, 1.0]), vec![1, 1]), (vec(&[0.0]), vec![1])).is_err());
}
