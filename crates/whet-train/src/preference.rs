//! Preference-tuning losses on per-sequence log-probabilities ([`whet_model::Model::sequence_logps`]):
//! DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290) with the
//! conservative label smoothing of cDPO (Mitchell 2023, "A note on DPO with noisy preferences"),
//! IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
//! Preferences", arXiv:2310.12036) and ORPO (Hong et al. 2024, "ORPO: Monolithic Preference
//! Optimization without Reference Model", arXiv:2403.07691), written to match TRL value for value
//! (`fixtures/golden/preference/`, made by `fixtures/gen/make_preference_golden.py`).
//!
//! Pure functions of candle tensors: no model, no data. Inputs are (P) f32 log-probabilities of
//! the P pairs' chosen and rejected completions ([`PairLogps`]); the loss is the mean over pairs,
//! a differentiable f32 scalar; the logged metrics are TRL's, as plain numbers. The arithmetic
//! runs in f64 (on P numbers, free), which keeps `log(1 - exp(x))` exact near `x = 0`.
//!
//! Layout, as TRL's: a batch of P pairs is 2P rows, the P chosen sequences (prompt + chosen
//! completion) and then the P rejected ones, targets supervised on the completion only
//! ([`PairLogps::from_stacked`] splits them).
//!
//! # Example
//!
//! One DPO step's loss on the tiny model with a fresh LoRA: one pair, prompt `40 41 42`, chosen
//! completion `43 44`, rejected `50`; the reference is the same model with the adapter off.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use whet_model::{LoraConfig, Model, Trainable};
//! use whet_train::preference::{DpoConfig, DpoLoss, PairLogps, dpo_loss};
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_chat");
//! let dev = Device::Cpu;
//! let lora = Trainable::Lora { config: LoraConfig::new(4, 8.0), seed: 0 };
//! let model = Model::load(&dir, lora, &dev)?;
//! // Rows: prompt + chosen, prompt + rejected (right-padded); targets on the completion only.
//! let ids = Tensor::new(&[[40u32, 41, 42, 43, 44], [40, 41, 42, 50, 0]], &dev)?; // (2, T)
//! let targets = Tensor::new(&[[-100i64, -100, 43, 44, -100], [-100, -100, 50, -100, -100]], &dev)?;
//! let positions = Tensor::new(&[[0u32, 1, 2, 3, 4], [0, 1, 2, 3, 4]], &dev)?;
//! let segments = Tensor::zeros((2, 5), DType::U32, &dev)?;
//! let policy = model.sequence_logps(&ids, &positions, &segments, &targets)?;
//! let reference = model.reference_sequence_logps(&ids, &positions, &segments, &targets)?;
//! let cfg = DpoConfig { beta: 0.1, loss: DpoLoss::Sigmoid { label_smoothing: 0.0 } };
//! let out = dpo_loss(
//!     &PairLogps::from_stacked(policy)?,
//!     &PairLogps::from_stacked(reference)?,
//!     &cfg,
//! )?;
//! // A fresh adapter (B = 0) is the reference: every margin is 0 and the loss is ln 2.
//! assert!((out.loss.to_scalar::<f32>()? - 2f32.ln()).abs() < 1e-6);
//! let grads = model.backward(&out.loss)?; // reaches every lora_B
//! assert!(model.trainable().iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use whet_model::Model;

use crate::rows::{Batch, Row};
use crate::{Result, TrainError};

/// What a run optimises: next-token cross-entropy on its rows (SFT, continued pre-training), or
/// a preference loss on pairs of rows. The trainer's rows for a preference run are laid out pair
/// by pair, `[chosen_0, rejected_0, chosen_1, rejected_1, ...]`; `micro_batch` then counts pairs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Objective {
    /// Cross-entropy per supervised token.
    #[default]
    Sft,
    /// A preference loss, the mean over pairs.
    Preference(PreferenceObjective),
}

impl Objective {
    /// Rows per unit of data: 1 for SFT, 2 (chosen, rejected) for a preference pair.
    pub fn rows_per_unit(&self) -> usize {
        match self {
            Objective::Sft => 1,
            Objective::Preference(_) => 2,
        }
    }
}

/// The preference loss of a run (`[preference]` in a run config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreferenceObjective {
    /// DPO or IPO against the reference policy (for LoRA: the base with the adapter off).
    Dpo(DpoConfig),
    /// ORPO with weight `beta` (the paper's lambda) on the odds-ratio term; no reference.
    Orpo {
        /// TRL `ORPOConfig.beta`.
        beta: f64,
    },
}

impl PreferenceObjective {
    /// Whether the loss needs a reference policy.
    pub fn needs_reference(&self) -> bool {
        matches!(self, PreferenceObjective::Dpo(_))
    }

    /// The loss and metrics of one batch of P pairs, as [`Batch::from_pair_rows`] lays them out
    /// (P chosen rows then P rejected rows). The reference of DPO / IPO is the batch's
    /// precomputed one ([`Batch::reference`]) or else [`Model::reference_sequence_logps`] (the
    /// adapter switched off); ORPO's NLL term is the mean over the chosen rows' prompt and
    /// completion tokens.
    pub fn batch_loss(&self, model: &Model, batch: &Batch) -> Result<PreferenceOutput> {
        let (ids, pos, seg, tgt) = (
            &batch.ids,
            &batch.positions,
            &batch.segments,
            &batch.targets,
        );
        match *self {
            PreferenceObjective::Dpo(cfg) => {
                let policy = PairLogps::from_stacked(model.sequence_logps(ids, pos, seg, tgt)?)?;
                let reference = PairLogps::from_stacked(match &batch.reference {
                    Some(precomputed) => precomputed.clone(),
                    None => model.reference_sequence_logps(ids, pos, seg, tgt)?,
                })?;
                dpo_loss(&policy, &reference, &cfg)
            }
            PreferenceObjective::Orpo { beta } => {
                let full = chosen_full_targets(batch)?;
                let mut sets = model.sequence_logps_sets(ids, pos, seg, &[tgt, &full])?;
                let (nll_logps, nll_counts) = sets.remove(1);
                let policy = PairLogps::from_stacked(sets.remove(0))?;
                let p = policy.pairs();
                let nll = mean_nll(&nll_logps.narrow(0, 0, p)?, &nll_counts[..p])?;
                orpo_loss(&policy, &nll, beta)
            }
        }
    }
}

/// ORPO's NLL targets: on the first half of the rows (the chosen ones), the next token at every
/// position of the row's first segment (prompt and completion; TRL's `chosen_nll_loss`), on the
/// rest `-100`. (B, T) i64.
fn chosen_full_targets(batch: &Batch) -> Result<Tensor> {
    let ids = batch.ids.to_vec2::<u32>()?;
    let seg = batch.segments.to_vec2::<u32>()?;
    let p = ids.len() / 2;
    let mut out = Vec::with_capacity(ids.len() * ids.first().map_or(0, Vec::len));
    for (r, (ids, seg)) in ids.iter().zip(&seg).enumerate() {
        for t in 0..ids.len() {
            let next = t + 1 < ids.len() && seg[t] == seg[0] && seg[t + 1] == seg[0];
            out.push(if r < p && next {
                ids[t + 1] as i64
            } else {
                -100
            });
        }
    }
    Ok(Tensor::from_vec(
        out,
        batch.targets.dims2()?,
        batch.targets.device(),
    )?)
}

/// One row's summed completion log-probability under the reference policy, and its
/// supervised tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqLogp {
    pub logp: f32,
    pub tokens: usize,
}

/// The reference policy's [`SeqLogp`] of every row, in batches of `micro_batch` rows: computed
/// once before training, where no reference can be had during it (full fine-tuning changes the
/// very weights a reference would read; TRL's `precompute_ref_log_probs`). `model` is the
/// reference itself (or, for LoRA, the model whose adapters [`Model::reference_sequence_logps`]
/// switches off), in evaluation mode.
pub fn reference_logps(
    model: &Model,
    rows: &[Row],
    micro_batch: usize,
    device: &candle_core::Device,
) -> Result<Vec<SeqLogp>> {
    // With adapters, the base under them; without, the model's weights as they are now (a view
    // holding no `Var`: no graph is built).
    let reference = match model.lora_config() {
        Some(_) => model.adapters_disabled()?,
        None => model.detached(),
    };
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(micro_batch.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let b = Batch::from_rows(&refs, device)?;
        let (logps, tokens) =
            reference.sequence_logps(&b.ids, &b.positions, &b.segments, &b.targets)?;
        let logps = logps.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (&logp, tokens) in logps.iter().zip(tokens) {
            model.ensure_finite("a reference log-probability", logp)?;
            out.push(SeqLogp { logp, tokens });
        }
    }
    Ok(out)
}

/// The reference log-probabilities of a preference run's training and validation rows, computed
/// once before training ([`reference_logps`]); `train[i]` is that of training row `i`.
#[derive(Debug, Clone, Default)]
pub struct ReferenceLogps {
    pub train: Vec<SeqLogp>,
    pub validation: Vec<SeqLogp>,
}

/// The P pairs' summed completion log-probabilities and supervised-token counts.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// (P) f32: `sum_t log p(y_t)` over each chosen completion.
    pub chosen: Tensor,
    /// (P) f32: the same for each rejected completion.
    pub rejected: Tensor,
    /// Supervised tokens of each chosen completion (IPO and ORPO average by them).
    pub chosen_tokens: Vec<usize>,
    /// Supervised tokens of each rejected completion.
    pub rejected_tokens: Vec<usize>,
}

impl PairLogps {
    /// From the chosen rows' and the rejected rows' [`whet_model::Model::sequence_logps`],
    /// pair `i` being row `i` of each.
    pub fn new(chosen: (Tensor, Vec<usize>), rejected: (Tensor, Vec<usize>)) -> Result<Self> {
        let p = PairLogps {
            chosen: chosen.0,
            chosen_tokens: chosen.1,
            rejected: rejected.0,
            rejected_tokens: rejected.1,
        };
        p.check()?;
        Ok(p)
    }

    /// From one [`whet_model::Model::sequence_logps`] over 2P rows laid out as TRL's
    /// `concatenated_inputs` / `DataCollatorForPreference` do: the P chosen rows, then the P
    /// rejected rows (`logps.chunk(2, dim=0)`).
    pub fn from_stacked((logps, tokens): (Tensor, Vec<usize>)) -> Result<Self> {
        let rows = tokens.len();
        if rows == 0 || rows % 2 != 0 || logps.dims() != [rows] {
            return Err(TrainError::Preference {
                loss: "preference pairs",
                message: format!(
                    "expected 2P stacked rows (P chosen, then P rejected) with one count each; got log-probs of shape {:?} and {rows} counts",
                    logps.dims()
                ),
            });
        }
        let p = rows / 2;
        PairLogps::new(
            (logps.narrow(0, 0, p)?, tokens[..p].to_vec()),
            (logps.narrow(0, p, p)?, tokens[p..].to_vec()),
        )
    }

    /// P.
    pub fn pairs(&self) -> usize {
        self.chosen_tokens.len()
    }

    fn check(&self) -> Result<()> {
        let p = self.chosen_tokens.len();
        let ok = p > 0
            && self.rejected_tokens.len() == p
            && self.chosen.dims() == [p]
            && self.rejected.dims() == [p];
        if !ok {
            return Err(TrainError::Preference {
                loss: "preference pairs",
                message: format!(
                    "chosen and rejected must hold the same number P >= 1 of pairs, each a (P) tensor with P counts; got chosen {:?} with {} counts, rejected {:?} with {} counts",
                    self.chosen.dims(),
                    p,
                    self.rejected.dims(),
                    self.rejected_tokens.len()
                ),
            });
        }
        Ok(())
    }

    /// (chosen, rejected) as f64, the graph kept.
    fn f64(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.chosen.to_dtype(DType::F64)?,
            self.rejected.to_dtype(DType::F64)?,
        ))
    }
}

/// The DPO loss function (TRL `DPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpoLoss {
    /// DPO's loss, Eq. 7 of Rafailov et al.: `-logsigmoid(beta z)` with the margin `z = (pi_c -
    /// pi_r) - (ref_c - ref_r)` of summed log-probabilities. With `label_smoothing` = eps > 0 it
    /// is cDPO's `-(1 - eps) logsigmoid(beta z) - eps logsigmoid(-beta z)` (TRL <= 0.28
    /// `DPOTrainer.dpo_loss`, `loss_type="sigmoid"`; TRL >= 0.29 ignores `label_smoothing` for
    /// this loss, which equals eps = 0 here).
    Sigmoid {
        /// The probability eps in [0, 0.5] that a preference label is flipped.
        label_smoothing: f64,
    },
    /// IPO, Eq. 17 of Azar et al.: `(z - 1 / (2 beta))^2` where the margin `z` is taken on
    /// log-probabilities averaged over each completion's tokens (TRL 1.16 `DPOTrainer._compute_loss`,
    /// `loss_type="ipo"`: `chosen_logratios / chosen_mask.sum(dim=1).clamp(min=1)`; TRL 0.28
    /// divides the log-probabilities in `concatenated_forward`, the same number). `beta` is the
    /// paper's tau.
    Ipo,
}

/// What [`dpo_loss`] computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    /// The KL weight (TRL `DPOConfig.beta`, default 0.1), > 0.
    pub beta: f64,
    pub loss: DpoLoss,
}

/// The numbers TRL logs for a preference batch, means over its P pairs. For DPO and IPO a reward
/// is `beta * (pi - ref)` of summed log-probabilities (TRL 1.16 `_compute_loss`: `chosen_rewards
/// = self.beta * chosen_logratios.detach()`, also for IPO); for ORPO `beta * avg logp`
/// (`ORPOTrainer.odds_ratio_loss`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreferenceMetrics {
    /// P, the pairs the means are over (weights for averaging over micro-batches).
    pub pairs: usize,
    /// `rewards/chosen`.
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/margins`: mean of chosen minus rejected reward.
    pub reward_margin: f64,
    /// `rewards/accuracies`: the share of pairs whose chosen reward is strictly larger.
    pub reward_accuracy: f64,
    /// `logps/chosen`: mean log-probability of the chosen completions (summed for DPO and IPO,
    /// averaged per token for ORPO, as TRL logs them).
    pub logps_chosen: f64,
    /// `logps/rejected`.
    pub logps_rejected: f64,
    /// ORPO `nll_loss`: the NLL term of the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nll: Option<f64>,
    /// ORPO `log_odds_ratio`: mean `logsigmoid(log_odds)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_odds_ratio: Option<f64>,
    /// ORPO `log_odds_chosen`: mean `log_odds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_odds_chosen: Option<f64>,
}

impl PreferenceMetrics {
    /// Values per rank in [`PreferenceMetrics::over_ranks`]: pairs, six means, and a
    /// (present, value) pair for each of the three ORPO means.
    const WIRE: usize = 13;

    /// The pair-weighted mean of every rank's `local` metrics (each rank's own pair-weighted
    /// mean, `None` where it had no pairs): the same value on every rank. One process returns
    /// `local`.
    pub fn over_ranks(
        local: Option<PreferenceMetrics>,
        comm: &dyn crate::comm::Communicator,
    ) -> Result<Option<PreferenceMetrics>> {
        if comm.world_size() == 1 {
            return Ok(local);
        }
        let m = local.unwrap_or_default();
        let opt = |o: Option<f64>| [f64::from(u8::from(o.is_some())), o.unwrap_or(0.0)];
        let mut wire = vec![
            m.pairs as f64,
            m.rewards_chosen,
            m.rewards_rejected,
            m.reward_margin,
            m.reward_accuracy,
            m.logps_chosen,
            m.logps_rejected,
        ];
        for o in [m.nll, m.log_odds_ratio, m.log_odds_chosen] {
            wire.extend(opt(o));
        }
        debug_assert_eq!(wire.len(), Self::WIRE);
        let all = comm.all_gather_host(&wire)?;
        if all.len() != Self::WIRE * comm.world_size() {
            return Err(TrainError::Comm {
                rank: comm.rank(),
                world: comm.world_size(),
                backend: comm.backend(),
                op: "all-gather of preference metrics".into(),
                message: format!(
                    "got {} values, expected {} from each of {} ranks",
                    all.len(),
                    Self::WIRE,
                    comm.world_size()
                ),
            });
        }
        let parts: Vec<PreferenceMetrics> = all
            .chunks_exact(Self::WIRE)
            .filter(|v| v[0] > 0.0)
            .map(|v| {
                let opt = |i: usize| (v[i] > 0.0).then_some(v[i + 1]);
                PreferenceMetrics {
                    pairs: v[0] as usize,
                    rewards_chosen: v[1],
                    rewards_rejected: v[2],
                    reward_margin: v[3],
                    reward_accuracy: v[4],
                    logps_chosen: v[5],
                    logps_rejected: v[6],
                    nll: opt(7),
                    log_odds_ratio: opt(9),
                    log_odds_chosen: opt(11),
                }
            })
            .collect();
        Ok(Self::weighted_mean(&parts))
    }

    /// The pair-weighted mean of several batches' metrics (micro-batches of a step, batches of
    /// an evaluation); `None` when there are none.
    pub fn weighted_mean(parts: &[PreferenceMetrics]) -> Option<PreferenceMetrics> {
        let pairs: usize = parts.iter().map(|m| m.pairs).sum();
        if pairs == 0 {
            return None;
        }
        let w = |f: fn(&PreferenceMetrics) -> f64| {
            parts.iter().map(|m| f(m) * m.pairs as f64).sum::<f64>() / pairs as f64
        };
        let wo = |f: fn(&PreferenceMetrics) -> Option<f64>| {
            parts.iter().all(|m| f(m).is_some()).then(|| {
                parts
                    .iter()
                    .map(|m| f(m).unwrap_or(0.0) * m.pairs as f64)
                    .sum::<f64>()
                    / pairs as f64
            })
        };
        Some(PreferenceMetrics {
            pairs,
            rewards_chosen: w(|m| m.rewards_chosen),
            rewards_rejected: w(|m| m.rewards_rejected),
            reward_margin: w(|m| m.reward_margin),
            reward_accuracy: w(|m| m.reward_accuracy),
            logps_chosen: w(|m| m.logps_chosen),
            logps_rejected: w(|m| m.logps_rejected),
            nll: wo(|m| m.nll),
            log_odds_ratio: wo(|m| m.log_odds_ratio),
            log_odds_chosen: wo(|m| m.log_odds_chosen),
        })
    }
}

/// A preference loss and what to log about it.
#[derive(Debug, Clone)]
pub struct PreferenceOutput {
    /// Scalar f32, the mean over pairs; differentiable to the policy's log-probabilities (and, for
    /// ORPO, to the NLL).
    pub loss: Tensor,
    pub metrics: PreferenceMetrics,
}

/// DPO or IPO ([`DpoLoss`]) of the policy's log-probabilities against the reference's (TRL
/// `DPOTrainer._compute_loss` with `f_divergence_type="reverse_kl"`, TRL <= 0.28
/// `DPOTrainer.dpo_loss`): with `chosen_logratios = pi_c - ref_c`, `rejected_logratios = pi_r -
/// ref_r` and `z = chosen_logratios - rejected_logratios`, the per-pair loss of `cfg.loss`,
/// averaged over pairs. `reference` is detached: no gradient reaches it.
pub fn dpo_loss(
    policy: &PairLogps,
    reference: &PairLogps,
    cfg: &DpoConfig,
) -> Result<PreferenceOutput> {
    const WHAT: &str = "DPO loss";
    policy.check()?;
    reference.check()?;
    if reference.chosen_tokens != policy.chosen_tokens
        || reference.rejected_tokens != policy.rejected_tokens
    {
        return Err(TrainError::Preference {
            loss: WHAT,
            message: format!(
                "the reference log-probs count other tokens than the policy's (chosen {:?} vs {:?}, rejected {:?} vs {:?}); compute both on the same rows and targets",
                reference.chosen_tokens,
                policy.chosen_tokens,
                reference.rejected_tokens,
                policy.rejected_tokens
            ),
        });
    }
    check_beta(WHAT, cfg.beta)?;
    let beta = cfg.beta;
    let (pc, pr) = policy.f64()?; // (P), (P)
    let (rc, rr) = reference.f64()?;
    let chosen_logratios = (pc - rc.detach())?; // (P)
    let rejected_logratios = (pr - rr.detach())?; // (P)
    let losses = match cfg.loss {
        DpoLoss::Sigmoid { label_smoothing } => {
            if !(0.0..=0.5).contains(&label_smoothing) {
                return Err(TrainError::Preference {
                    loss: WHAT,
                    message: format!(
                        "label_smoothing = {label_smoothing}; cDPO's flip probability must lie in [0, 0.5]"
                    ),
                });
            }
            let z = ((&chosen_logratios - &rejected_logratios)? * beta)?; // beta z, (P)
            let clean = (log_sigmoid(&z)? * -(1.0 - label_smoothing))?;
            if label_smoothing == 0.0 {
                clean
            } else {
                (clean - (log_sigmoid(&z.neg()?)? * label_smoothing)?)?
            }
        }
        DpoLoss::Ipo => {
            let per_token = |lr: &Tensor, n: &[usize]| -> Result<Tensor> {
                let n: Vec<f64> = n.iter().map(|&n| n.max(1) as f64).collect();
                let n = Tensor::from_vec(n, lr.dims1()?, lr.device())?;
                Ok((lr / n)?)
            };
            let delta = (per_token(&chosen_logratios, &policy.chosen_tokens)?
                - per_token(&rejected_logratios, &policy.rejected_tokens)?)?; // (P)
            (delta - 1.0 / (2.0 * beta))?.sqr()?
        }
    };
    let loss = losses.mean_all()?.to_dtype(DType::F32)?; // ()
    let chosen_rewards = host((chosen_logratios.detach() * beta)?)?;
    let rejected_rewards = host((rejected_logratios.detach() * beta)?)?;
    let metrics = PreferenceMetrics {
        logps_chosen: mean(&host(policy.chosen.detach())?),
        logps_rejected: mean(&host(policy.rejected.detach())?),
        ..reward_metrics(&chosen_rewards, &rejected_rewards)
    };
    Ok(PreferenceOutput { loss, metrics })
}

/// ORPO (TRL `ORPOTrainer.get_batch_loss_metrics` and `odds_ratio_loss`): with `c`, `r` the
/// completions' log-probabilities averaged per token (`get_batch_logps(average_log_prob=True)`),
/// `log_odds = (c - r) - (log(1 - exp(c)) - log(1 - exp(r)))` (Eqs. 4 and 7 of Hong et al.), the
/// loss is `nll - beta * mean(logsigmoid(log_odds))`. TRL's `beta` is the paper's lambda.
///
/// `nll` is the scalar NLL term: TRL takes it over the prompt **and** the completion of the
/// chosen rows, the mean over all their predicted tokens (`concatenated_forward`:
/// `chosen_nll_loss`, "computed over the full prompt and response"); [`mean_nll`] computes it from
/// [`whet_model::Model::sequence_logps_sets`]. Every completion needs at least one supervised
/// token.
pub fn orpo_loss(policy: &PairLogps, nll: &Tensor, beta: f64) -> Result<PreferenceOutput> {
    const WHAT: &str = "ORPO loss";
    policy.check()?;
    check_beta(WHAT, beta)?;
    if nll.rank() != 0 {
        return Err(TrainError::Preference {
            loss: WHAT,
            message: format!(
                "the NLL term must be a scalar (see `mean_nll`); got shape {:?}",
                nll.dims()
            ),
        });
    }
    let average = |logps: &Tensor, n: &[usize], side: &str| -> Result<Tensor> {
        if let Some(i) = n.iter().position(|&n| n == 0) {
            return Err(TrainError::Preference {
                loss: WHAT,
                message: format!(
                    "the {side} completion of pair {i} has no supervised token, so its average log-probability is undefined; drop the pair or supervise its completion"
                ),
            });
        }
        let n: Vec<f64> = n.iter().map(|&n| n as f64).collect();
        let n = Tensor::from_vec(n, logps.dims1()?, logps.device())?;
        Ok((logps / n)?)
    };
    let (pc, pr) = policy.f64()?;
    let c = average(&pc, &policy.chosen_tokens, "chosen")?; // (P)
    let r = average(&pr, &policy.rejected_tokens, "rejected")?; // (P)
    let log_odds = ((&c - &r)? - (log1m_exp(&c)? - log1m_exp(&r)?)?)?; // (P)
    let ratio = log_sigmoid(&log_odds)?; // (P)
    let nll64 = nll.to_dtype(DType::F64)?;
    let loss = (nll64 - (ratio.mean_all()? * beta)?)?.to_dtype(DType::F32)?; // ()
    let (c_host, r_host) = (host(c.detach())?, host(r.detach())?);
    let scale = |v: &[f64]| v.iter().map(|x| beta * x).collect::<Vec<_>>();
    let metrics = PreferenceMetrics {
        logps_chosen: mean(&c_host),
        logps_rejected: mean(&r_host),
        nll: Some(nll.to_dtype(DType::F64)?.to_scalar::<f64>()?),
        log_odds_ratio: Some(mean(&host(ratio.detach())?)),
        log_odds_chosen: Some(mean(&host(log_odds.detach())?)),
        ..reward_metrics(&scale(&c_host), &scale(&r_host))
    };
    Ok(PreferenceOutput { loss, metrics })
}

/// The mean negative log-likelihood per token over some rows: `-sum(logps) / sum(tokens)`, a
/// scalar f32 (PyTorch's `CrossEntropyLoss()` mean over the rows' supervised tokens, which TRL's
/// ORPO takes over the chosen rows' prompt and completion). `logps` (R) and `tokens` are
/// [`whet_model::Model::sequence_logps`] of those rows.
pub fn mean_nll(logps: &Tensor, tokens: &[usize]) -> Result<Tensor> {
    let total: usize = tokens.iter().sum();
    if total == 0 || logps.dims() != [tokens.len()] {
        return Err(TrainError::Preference {
            loss: "mean NLL",
            message: format!(
                "needs (R) log-probs with R counts summing to at least 1; got shape {:?} and counts {tokens:?}",
                logps.dims()
            ),
        });
    }
    Ok((logps.sum_all()? * (-1.0 / total as f64))?)
}

fn check_beta(loss: &'static str, beta: f64) -> Result<()> {
    if beta > 0.0 && beta.is_finite() {
        return Ok(());
    }
    Err(TrainError::Preference {
        loss,
        message: format!("beta = {beta}; it must be a finite number > 0 (TRL's default is 0.1)"),
    })
}

/// `log(sigmoid(x))` = `min(x, 0) - log(1 + exp(-|x|))`, elementwise, stable for any x. The
/// branches are split with `where_cond` rather than `minimum`/`abs`, whose backward at a tie
/// (x = 0, where a fresh LoRA puts every DPO margin) would double the gradient: here it is
/// exactly `sigmoid(-x)` everywhere, 1/2 at 0.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let nonneg = x.ge(&zero)?;
    let pos = nonneg.where_cond(x, &zero)?; // max(x, 0)
    let neg = nonneg.where_cond(&zero, x)?; // min(x, 0)
    let abs = (&pos - &neg)?; // |x|, d/dx = 1 at 0
    Ok((neg - (abs.neg()?.exp()? + 1.0)?.log()?)?)
}

/// `log(1 - exp(x))` for x < 0, elementwise (TRL ORPO's `log1mexp`, which branches between
/// `log1p(-exp(x))` and `log(-expm1(x))` to keep f32 accuracy near 0; in f64, as here, the plain
/// form is accurate to ~1e-16 / |x| relative, well below f32 resolution).
fn log1m_exp(x: &Tensor) -> Result<Tensor> {
    Ok(x.exp()?.affine(-1.0, 1.0)?.log()?)
}

/// The reward means, margin and accuracy (TRL: `(chosen_rewards > rejected_rewards).float()`).
fn reward_metrics(chosen: &[f64], rejected: &[f64]) -> PreferenceMetrics {
    let p = chosen.len();
    let margins: Vec<f64> = chosen.iter().zip(rejected).map(|(c, r)| c - r).collect();
    let wins = chosen.iter().zip(rejected).filter(|(c, r)| c > r).count();
    PreferenceMetrics {
        pairs: p,
        rewards_chosen: mean(chosen),
        rewards_rejected: mean(rejected),
        reward_margin: mean(&margins),
        reward_accuracy: wins as f64 / p as f64,
        ..PreferenceMetrics::default()
    }
}

fn host(t: Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[cfg(test)]
mod tests;
