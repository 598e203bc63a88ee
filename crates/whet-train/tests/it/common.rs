use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use whet_model::{Config as ModelConfig, LoraConfig, Model};
use whet_optim::{AdamWConfig, ScheduleKind, SgdConfig};
use whet_train::comm::Communicator;
use whet_train::{Method, OptimizerChoice, Quiet, Row, Summary, Trainer, TrainerConfig};

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

/// A test run: its output folder and the trainer's settings.
pub struct Config {
    pub out: PathBuf,
    pub trainer: TrainerConfig,
}

/// The test run's settings, with `key=value` overrides named by their run-config keys
/// (`train.max_steps=2`, `output.save_every=1`, `method=full`).
pub fn config(out: &Path, overrides: &[&str]) -> Config {
    // The run config's defaults for each optimizer.
    let adamw = OptimizerChoice::AdamW(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let sgd = OptimizerChoice::Sgd(SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    });
    let mut t = TrainerConfig {
        method: Method::Lora,
        seed: 3,
        epochs: 1.0,
        max_steps: 0,
        micro_batch: 2,
        grad_accum: 1,
        optimizer: adamw,
        lr: 1e-2,
        schedule: ScheduleKind::Cosine,
        warmup_steps: 1,
        min_lr_ratio: 0.0,
        max_grad_norm: 1.0,
        neftune_alpha: 0.0,
        activation_checkpointing: false,
        eval_every: 0,
        patience: 0,
        min_delta: 0.0,
        select_by: None,
        metric_every: 0,
        save_every: 0,
        keep_last: 2,
        config_toml: "# a whet-train test run\n".into(),
        objective: Default::default(),
    };
    for o in overrides {
        let (key, value) = o.split_once('=').unwrap();
        let value = value.trim_matches('"');
        let number = || value.parse::<f64>().unwrap();
        let count = || value.parse::<u64>().unwrap();
        let named = || serde_json::Value::String(value.into());
        match key {
            "method" => t.method = serde_json::from_value(named()).unwrap(),
            "train.optimizer" => {
                t.optimizer = match value {
                    "adamw" => adamw,
                    "sgd" => sgd,
                    other => panic!("no optimizer `{other}`"),
                }
            }
            "train.schedule" => t.schedule = serde_json::from_value(named()).unwrap(),
            "train.epochs" => t.epochs = number(),
            "train.lr" => t.lr = number(),
            "train.max_grad_norm" => t.max_grad_norm = number(),
            "train.min_delta" => t.min_delta = number(),
            "train.neftune_alpha" => t.neftune_alpha = number(),
            "train.max_steps" => t.max_steps = count(),
            "train.eval_every" => t.eval_every = count(),
            "train.warmup_steps" => t.warmup_steps = count(),
            "train.patience" => t.patience = count() as u32,
            "train.micro_batch" => t.micro_batch = count() as usize,
            "train.grad_accum" => t.grad_accum = count() as usize,
            "train.select_by" => t.select_by = Some(value.into()),
            "eval.metric_every" => t.metric_every = count(),
            "output.save_every" => t.save_every = count(),
            "output.keep_last" => t.keep_last = count() as usize,
            other => panic!("the tests have no override `{other}`"),
        }
    }
    Config {
        out: out.to_path_buf(),
        trainer: t,
    }
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
    run_with(model, config, &train, &validation, run_id, None, None)
}

/// [`run`] with a task scorer and a precomputed preference reference.
pub fn run_with<'a>(
    model: &'a mut Model,
    config: &'a Config,
    train: &'a dyn whet_train::RowSource,
    validation: &'a dyn whet_train::RowSource,
    run_id: &str,
    scorer: Option<&'a mut dyn whet_train::TaskScorer>,
    reference: Option<&'a whet_train::preference::ReferenceLogps>,
) -> whet_train::Result<Summary> {
    Trainer {
        model,
        config: &config.trainer,
        train,
        validation,
        out: &config.out,
        device: Device::Cpu,
        run_id: run_id.into(),
        comm: &whet_train::comm::Single,
        eval_sets: &[],
        scorer,
        reference,
    }
    .run(&mut Quiet)
}

/// An in-process group of ranks (threads) implementing the `Communicator` trait: the trainer's
/// data-parallel arithmetic, tested without an MPI installation. Collectives add in rank order,
/// as `sum_over_ranks` does; a rank that waits a minute for the others panics instead of
/// deadlocking the test.
pub mod threads {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    use candle_core::Tensor;
    use whet_train::comm::Communicator;

    struct Shared {
        world: usize,
        round: Mutex<(usize, u64)>,
        cv: Condvar,
        host: Mutex<Vec<Vec<f64>>>,
        buckets: Mutex<Vec<Vec<Vec<f32>>>>,
    }

    pub struct Rank {
        rank: usize,
        bucket_elems: usize,
        shared: Arc<Shared>,
    }

    /// `world` ranks whose gradient buckets hold `bucket_elems` values.
    pub fn group(world: usize, bucket_elems: usize) -> Vec<Rank> {
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new((0, 0)),
            cv: Condvar::new(),
            host: Mutex::new(vec![Vec::new(); world]),
            buckets: Mutex::new(vec![Vec::new(); world]),
        });
        (0..world)
            .map(|rank| Rank {
                rank,
                bucket_elems,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    impl Rank {
        fn barrier(&self) {
            let s = &self.shared;
            let mut g = s.round.lock().unwrap();
            let generation = g.1;
            g.0 += 1;
            if g.0 == s.world {
                *g = (0, generation + 1);
                s.cv.notify_all();
                return;
            }
            while g.1 == generation {
                let (next, timeout) = s.cv.wait_timeout(g, Duration::from_secs(60)).unwrap();
                g = next;
                assert!(
                    !timeout.timed_out() || g.1 != generation,
                    "rank {}: the other ranks never reached the collective",
                    self.rank
                );
            }
        }
    }

    impl Communicator for Rank {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.shared.world
        }
        fn backend(&self) -> &'static str {
            "threads"
        }
        fn all_gather_host(&self, values: &[f64]) -> whet_train::Result<Vec<f64>> {
            self.shared.host.lock().unwrap()[self.rank] = values.to_vec();
            self.barrier();
            let all = self.shared.host.lock().unwrap().concat();
            self.barrier();
            Ok(all)
        }
        fn all_reduce_sum(&self, buckets: &[Tensor]) -> whet_train::Result<Vec<Tensor>> {
            let mine = buckets
                .iter()
                .map(|b| b.to_vec1::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.shared.buckets.lock().unwrap()[self.rank] = mine;
            self.barrier();
            let summed: Vec<Vec<f32>> = {
                let all = self.shared.buckets.lock().unwrap();
                (0..buckets.len())
                    .map(|b| {
                        let mut sum = vec![0f32; all[0][b].len()];
                        for per_rank in all.iter() {
                            for (s, x) in sum.iter_mut().zip(&per_rank[b]) {
                                *s += x;
                            }
                        }
                        sum
                    })
                    .collect()
            };
            self.barrier();
            Ok(summed
                .into_iter()
                .zip(buckets)
                .map(|(v, b)| Tensor::from_vec(v, b.elem_count(), b.device()))
                .collect::<candle_core::Result<Vec<_>>>()?)
        }
        fn abort(&self, code: i32) -> ! {
            panic!("rank {} aborted the group with code {code}", self.rank)
        }
        fn bucket_elems(&self) -> whet_train::Result<usize> {
            Ok(self.bucket_elems)
        }
    }
}

/// What one rank of [`run_ranks`] ended with: its summary and its trainable values.
pub type RankRun = (whet_train::Result<Summary>, Vec<(String, Vec<f32>)>);

/// Runs one trainer per rank of a thread group of `world` ranks, all writing to `config`'s
/// output folder; per rank, the summary and the final trainable values.
pub fn run_ranks(
    world: usize,
    bucket_elems: usize,
    lora: bool,
    config: &Config,
    train: &[Row],
    validation: &[Row],
    run_id: impl Fn(usize) -> String + Sync,
) -> Vec<RankRun> {
    run_ranks_with(
        world,
        bucket_elems,
        lora,
        config,
        train,
        validation,
        run_id,
        |_| None,
    )
}

/// [`run_ranks`] with a task scorer per rank.
#[allow(clippy::too_many_arguments)]
pub fn run_ranks_with(
    world: usize,
    bucket_elems: usize,
    lora: bool,
    config: &Config,
    train: &[Row],
    validation: &[Row],
    run_id: impl Fn(usize) -> String + Sync,
    scorer: impl Fn(usize) -> Option<Box<dyn whet_train::TaskScorer + Send>> + Sync,
) -> Vec<RankRun> {
    let ranks = threads::group(world, bucket_elems);
    let out = config.out.clone();
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|comm| {
                let (out, run_id, scorer) = (&out, &run_id, &scorer);
                s.spawn(move || {
                    let mut model = tiny_model(lora);
                    let mut scorer = scorer(comm.rank());
                    let summary = Trainer {
                        model: &mut model,
                        config: &config.trainer,
                        train: &train,
                        validation: &validation,
                        out,
                        device: Device::Cpu,
                        run_id: run_id(comm.rank()),
                        comm,
                        eval_sets: &[],
                        scorer: scorer
                            .as_deref_mut()
                            .map(|s| s as &mut dyn whet_train::TaskScorer),
                        reference: None,
                    }
                    .run(&mut Quiet);
                    (summary, trainable_values(&model))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The reference of each pair row, from `model` as it is now (the base: LoRA's B is 0).
pub fn precompute(
    model: &mut Model,
    train: &[Row],
    val: &[Row],
) -> whet_train::preference::ReferenceLogps {
    model.set_training(false);
    let device = candle_core::Device::Cpu;
    whet_train::preference::ReferenceLogps {
        train: whet_train::preference::reference_logps(model, train, 3, &device).unwrap(),
        validation: whet_train::preference::reference_logps(model, val, 3, &device).unwrap(),
    }
}
