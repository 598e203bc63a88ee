use whet_train::TrainError;
use whet_train::metrics::{self, MetricsLine, MetricsLog};
use whet_train::preference::PreferenceMetrics;
use whet_train::{EvalMetrics, StepMetrics};

use crate::common::tempdir;

/// What the writer appends, the typed reader gives back; a NaN validation loss (no supervised
/// token) is written as `null` and read as NaN; a cut line is an error naming its number.
#[test]
fn metrics_lines_read_back_typed() {
    let path = tempdir("metrics").join("metrics.jsonl");
    let step = StepMetrics {
        step: 1,
        total_steps: 2,
        epoch: 0.5,
        loss: 3.25,
        lr: 1e-4,
        grad_norm: 0.75,
        supervised_tokens: 10,
        tokens: 16,
        tokens_per_s: 100.0,
        elapsed_s: 0.16,
        preference: Some(PreferenceMetrics {
            pairs: 2,
            reward_margin: 0.25,
            reward_accuracy: 0.5,
            ..Default::default()
        }),
    };
    let eval = EvalMetrics {
        step: 1,
        val_loss: f64::NAN,
        val_ppl: f64::NAN,
        val_tokens: 0,
        improved: true,
        sets: Vec::new(),
        preference: None,
        task: None,
    };
    let mut log = MetricsLog::open(&path, 0).unwrap();
    log.step(&step).unwrap();
    log.eval(&eval).unwrap();
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(r#""kind":"train""#)
            && text.contains(r#""val_loss":null"#)
            && text.contains(r#""reward_accuracy":0.5"#),
        "{text}"
    );
    match metrics::read(&path).unwrap().as_slice() {
        [MetricsLine::Step(s), MetricsLine::Eval(e)] => {
            assert_eq!((s.step, s.loss, s.grad_norm, s.tokens), (1, 3.25, 0.75, 16));
            assert!(e.val_loss.is_nan() && e.improved && e.preference.is_none());
            // A preference step's rewards are top-level fields, read back whole.
            assert_eq!(s.preference, step.preference);
        }
        other => panic!("{other:?}"),
    }
    // A line cut by a kill is an error to the reader; a resume drops it.
    std::fs::write(&path, format!("{}{{\"step\": 2, \"lo", text)).unwrap();
    let err = metrics::read(&path).unwrap_err();
    assert!(
        matches!(err, TrainError::MetricsRead { line: 3, .. }),
        "{err}"
    );
    MetricsLog::open(&path, 1).unwrap();
    assert_eq!(
        metrics::read(&path).unwrap().len(),
        2,
        "the cut line is dropped on resume"
    );
}
