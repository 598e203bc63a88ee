//! Text generation with a KV cache, for evaluation and samples during training.
//!
//! Sampling follows transformers' `generate` order: repetition penalty
//! (`RepetitionPenaltyLogitsProcessor`), then temperature, top-k, top-p
//! (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`), then a draw, or argmax
//! when `temperature == 0` (greedy; the warpers are skipped, as with `do_sample=False`).

use std::ops::ControlFlow;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llama::Model;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 is off.
    pub top_p: f64,
    /// HF semantics: a seen token's positive logit is divided by it, a negative one
    /// multiplied; 1 is off.
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Stop ids; `None` means the model config's `eos_token_id` (one or several).
    pub eos_token_ids: Option<Vec<u32>>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            eos_token_ids: None,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig {
            max_new_tokens,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |expected: &str, found: f64| {
            Err(Error::Input {
                input: "GenerationConfig",
                expected: expected.to_string(),
                found: found.to_string(),
            })
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p in (0, 1]", self.top_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty > 0", self.repetition_penalty);
        }
        Ok(())
    }
}

/// Picks the next token from a logits row. Seeded, so a run is reproducible.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    repetition_penalty: f64,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: &GenerationConfig) -> Self {
        Sampler {
            temperature: cfg.temperature,
            top_k: cfg.top_k,
            top_p: cfg.top_p,
            repetition_penalty: cfg.repetition_penalty,
            rng: StdRng::seed_from_u64(cfg.seed),
        }
    }

    /// logits: (V); history: every token so far (prompt included), for the penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut scores = logits.to_vec(); // (V)
        apply_repetition_penalty(&mut scores, history, self.repetition_penalty as f32);
        if self.temperature == 0.0 {
            return argmax(&scores);
        }
        for s in scores.iter_mut() {
            *s /= self.temperature as f32;
        }
        top_k_filter(&mut scores, self.top_k);
        top_p_filter(&mut scores, self.top_p);
        let probs = softmax(&scores); // (V)
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p;
                last = i;
                if u < acc {
                    return i as u32;
                }
            }
        }
        last as u32 // u landed in the rounding gap at the top
    }
}

/// First index of the largest value (torch.argmax's tie rule).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// HF `RepetitionPenaltyLogitsProcessor`: for each distinct token in `history`, a positive
/// score is divided by `penalty`, a negative one multiplied.
pub fn apply_repetition_penalty(scores: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &t in history {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// HF `TopKLogitsWarper`: scores below the k-th largest become -inf (ties with it stay).
pub fn top_k_filter(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// HF `TopPLogitsWarper`: keep the most likely tokens until their probability mass reaches
/// `p` (always at least one); the rest become -inf.
pub fn top_p_filter(scores: &mut [f32], p: f64) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    // HF sorts ascending and drops tokens whose cumulative mass is <= 1 - p; equivalently,
    // descending, token i stays iff the mass strictly above it is < p.
    let mut mass_before = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        if rank > 0 && mass_before >= p {
            scores[i] = f32::NEG_INFINITY;
        }
        mass_before += probs[i];
    }
}

/// Softmax in f64 (-inf scores get probability 0).
pub fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = scores.iter().map(|&s| ((s as f64) - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// Why [`generate_stream`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The last token is a stop id.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The callback asked to stop (a stop string, a client that went away).
    Halted,
}

/// Generates up to `max_new_tokens` after `prompt_ids`, stopping after the first stop id
/// (which is included, as transformers does). Returns the new tokens only. Runs on a
/// detached copy of the model: no autograd graph, no LoRA dropout.
pub fn generate(model: &Model, prompt_ids: &[u32], cfg: &GenerationConfig) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    generate_stream(model, prompt_ids, cfg, |id| {
        out.push(id);
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// [`generate`] token by token: `on_token` gets each new token as soon as it is sampled (the
/// stop id included) and may end generation early with `ControlFlow::Break`.
pub fn generate_stream(
    model: &Model,
    prompt_ids: &[u32],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Finish> {
    cfg.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::Input {
            input: "prompt_ids",
            expected: "at least one token (e.g. the BOS id)".into(),
            found: "an empty prompt".into(),
        });
    }
    let model = model.detached();
    let stop = cfg
        .eos_token_ids
        .clone()
        .unwrap_or_else(|| model.config().eos_token_ids());
    let mut sampler = Sampler::new(cfg);
    let mut cache = model.new_cache();
    let mut history = prompt_ids.to_vec();
    let mut step_ids = prompt_ids.to_vec();
    for _ in 0..cfg.max_new_tokens {
        let n = step_ids.len();
        let ids = Tensor::from_vec(step_ids, (1, n), model.device())?; // (1, T)
        let logits = model.forward_cached(&ids, &mut cache)?; // (1, V)
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?; // (V)
        if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
            model.ensure_finite("a logit", *bad)?;
        }
        let next = sampler.sample(&logits, &history);
        history.push(next);
        if on_token(next).is_break() {
            return Ok(Finish::Halted);
        }
        if stop.contains(&next) {
            return Ok(Finish::Stop);
        }
        step_ids = vec![next];
    }
    Ok(Finish::Length)
}

/// One row's result of [`generate_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The new tokens (the stop id included when it ended the row).
    pub ids: Vec<u32>,
    pub finish: Finish,
}

/// [`generate`] for several prompts at once: the prompts are left-padded to one length (the
/// padding in a segment of its own, so no real token attends to it, and each row's positions
/// start at 0 at its first real token) and decoded together with one KV cache, every row
/// stopping at its own stop id or `max_new_tokens`. Each row gets the same tokens as
/// [`generate`] alone would give it (up to float reordering in the batched matmuls); sampling
/// draws from one seeded sampler per row.
pub fn generate_batch(
    model: &Model,
    prompts: &[&[u32]],
    cfg: &GenerationConfig,
) -> Result<Vec<Generated>> {
    cfg.validate()?;
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::Input {
            input: "prompts",
            expected: "at least one token per prompt (e.g. the BOS id)".into(),
            found: format!("an empty prompt at index {i}"),
        });
    }
    let b = prompts.len();
    let mut out: Vec<Generated> = (0..b)
        .map(|_| Generated {
            ids: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    if b == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let model = model.detached();
    let dev = model.device().clone();
    let stop = cfg
        .eos_token_ids
        .clone()
        .unwrap_or_else(|| model.config().eos_token_ids());
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    // Row r: `longest - len` padding tokens (id 0, segment 1), then the prompt (segment 0).
    const REAL: u32 = 0;
    const PAD: u32 = 1;
    let (mut ids, mut positions, mut segments) = (
        Vec::with_capacity(b * longest),
        Vec::with_capacity(b * longest),
        Vec::with_capacity(b * longest),
    );
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
        positions.extend(std::iter::repeat_n(0u32, pad).chain(0..p.len() as u32));
        segments.extend(std::iter::repeat_n(PAD, pad).chain(std::iter::repeat_n(REAL, p.len())));
    }
    let mut lens: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut histories: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut samplers: Vec<Sampler> = (0..b).map(|_| Sampler::new(cfg)).collect();
    let mut done = vec![false; b];
    let mut cache = model.new_cache();
    let mut step = Tensor::from_vec(ids, (b, longest), &dev)?; // (B, T)
    let mut step_positions = Tensor::from_vec(positions, (b, longest), &dev)?; // (B, T)
    for _ in 0..cfg.max_new_tokens {
        let key_segments = Tensor::from_vec(segments.clone(), (b, segments.len() / b), &dev)?; // (B, S)
        let logits =
            model.forward_cached_with(&step, &step_positions, &key_segments, &mut cache)?; // (B, V)
        let logits = logits.to_vec2::<f32>()?;
        let mut next = vec![0u32; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            if let Some(bad) = logits[r].iter().find(|v| !v.is_finite()) {
                model.ensure_finite("a logit", *bad)?;
            }
            let id = samplers[r].sample(&logits[r], &histories[r]);
            histories[r].push(id);
            out[r].ids.push(id);
            next[r] = id;
            if stop.contains(&id) {
                out[r].finish = Finish::Stop;
                done[r] = true;
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        // Finished rows keep decoding a placeholder (same shapes); their outputs are unused.
        let positions: Vec<u32> = lens.clone();
        lens.iter_mut().for_each(|l| *l += 1);
        // Append one key column: every row's new token is in its real segment.
        let s = segments.len() / b;
        segments = (0..b)
            .flat_map(|r| {
                segments[r * s..(r + 1) * s]
                    .iter()
                    .copied()
                    .chain([REAL])
                    .collect::<Vec<_>>()
            })
            .collect();
        step = Tensor::from_vec(next, (b, 1), &dev)?; // (B, 1)
        step_positions = Tensor::from_vec(positions, (b, 1), &dev)?; // (B, 1)
    }
    Ok(out)
}
