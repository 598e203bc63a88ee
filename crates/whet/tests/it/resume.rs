//! `kill -9` in the middle of `whet train`, then the same command again: it resumes and ends
//! exactly where an uninterrupted run ends.

use std::fs::{self, File};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const RUN: &str = r#"
method = "lora"

[data]
train = "train.jsonl"
validation = "val.jsonl"
format = "chat"
max_len = 64

[lora]
r = 4
alpha = 8.0
dropout = 0.1

[train]
max_steps = 40
micro_batch = 2
grad_accum = 2
lr = 1e-2
warmup_steps = 2
eval_every = 5

[output]
dir = "out"
save_every = 1
keep_last = 2
"#;

#[test]
fn kill_9_then_rerun_resumes_bit_identically() {
    let tmp = Tmp::new("resume");
    let m = model(&tmp);
    chat_data(&tmp);
    let cfg = config(&tmp, &m, RUN);
    let out = tmp.join("out");
    let args = ["train", "--config", s(&cfg), "--no-report"];

    // The uninterrupted reference, in another folder.
    let reference = tmp.join("reference");
    whet([
        "train",
        "--config",
        s(&cfg),
        "--no-report",
        "--set",
        &format!("output.dir={}", s(&reference)),
    ])
    .ok();

    // Start, wait for the third checkpoint, SIGKILL.
    let log = tmp.join("first.log");
    let mut child = whet_cmd(args)
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("checkpoint-000003").is_dir() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "whet train exited ({status}) before checkpoint 3:\n{}",
                fs::read_to_string(&log).unwrap()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoint-000003 after 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        None,
        "whet train finished before it was killed ({status}); the test needs a longer run"
    );
    assert!(
        !out.join("checkpoint-000040").exists(),
        "the run finished before it was killed"
    );

    // The same command again.
    let r = whet(args).ok();
    let resumed_at: u64 = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("resuming at step "))
        .unwrap_or_else(|| panic!("no 'resuming at step N' on stderr:\n{}", r.stderr))
        .trim()
        .parse()
        .unwrap();
    assert!((3..40).contains(&resumed_at), "resumed at {resumed_at}");
    assert!(
        !r.stderr.contains("step 1/40 "),
        "the resumed run redid step 1:\n{}",
        r.stderr
    );

    // Bit-identical history: every train loss, grad norm and validation loss.
    let expected = series(&reference, "train", "loss");
    assert_eq!(expected.len(), 40);
    assert_eq!(
        series(&out, "train", "loss"),
        expected,
        "train losses differ from the uninterrupted run"
    );
    assert_eq!(
        series(&out, "train", "grad_norm"),
        series(&reference, "train", "grad_norm")
    );
    assert_eq!(
        series(&out, "eval", "val_loss"),
        series(&reference, "eval", "val_loss")
    );
    assert_eq!(
        fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        fs::read(reference.join("adapter/adapter_model.safetensors")).unwrap(),
        "the final adapters differ"
    );
    let leftovers: Vec<_> = walk(&out)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
