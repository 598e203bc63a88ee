//! Loss masks per record shape, EOS with pad == eos, BOS, truncation and the report.

use whet_data::{Record, Role};
use whet_tokenize::{
    DoubleBos, Error, ExcludeReason, IGNORE_INDEX, PackConfig, TokenizeConfig, Truncation, pack,
};

use crate::common::{conv, learned_texts, load, msg, pc, text};

fn seq() -> TokenizeConfig {
    TokenizeConfig {
        parallel: false,
        ..TokenizeConfig::default()
    }
}

#[test]
fn text_learns_every_token_and_eos() {
    let tok = load("llama3");
    let (ex, fixed) = tok
        .tokenize_record(
            &Record::Text {
                text: "The sea is wide.".into(),
            },
            &seq(),
        )
        .unwrap();
    assert!(!fixed);
    let body = tok.encode("The sea is wide.").unwrap().ids;
    let bos = tok.bos_id().unwrap();
    let mut want = vec![bos];
    want.extend(&body);
    want.push(tok.eos_id());
    assert_eq!(ex.input_ids, want);
    assert_eq!(ex.labels[0], IGNORE_INDEX, "nothing predicts BOS");
    let learned: Vec<i64> = want[1..].iter().map(|&t| t as i64).collect();
    assert_eq!(&ex.labels[1..], &learned[..]);
}

#[test]
fn prompt_completion_learns_completion_and_eos_only() {
    let tok = load("mistral_v03");
    let (ex, _) = tok
        .tokenize_record(
            &Record::PromptCompletion {
                prompt: "Q: What is two plus two?\nA:".into(),
                completion: " Four.".into(),
            },
            &seq(),
        )
        .unwrap();
    assert_eq!(ex.input_ids[0], tok.bos_id().unwrap());
    assert_eq!(*ex.input_ids.last().unwrap(), tok.eos_id());
    assert_eq!(learned_texts(&tok, &ex), [" Four.</s>"]);
    // The prompt tokens are exactly the prompt's own tokens.
    let prompt_ids = tok.encode("Q: What is two plus two?\nA:").unwrap().ids;
    assert_eq!(&ex.input_ids[1..1 + prompt_ids.len()], &prompt_ids[..]);
    assert!(
        ex.labels[..1 + prompt_ids.len()]
            .iter()
            .all(|&l| l == IGNORE_INDEX)
    );
}

/// SmolLM2 ships pad == eos == `<|im_end|>`. EOS is still learned everywhere it ends a
/// turn or a document, and only padding is ignored: the mask is positional.
#[test]
fn eos_is_learned_when_pad_equals_eos() {
    let tok = load("smollm2");
    assert_eq!(tok.pad_id(), tok.eos_id());
    let eos = tok.eos_id();
    let exs = vec![
        text(1, "Hello world."),
        pc(2, "Say hi:", " hi"),
        conv(
            3,
            vec![
                msg(Role::User, "Hi"),
                msg(Role::Assistant, "Hello!"),
                msg(Role::User, "Bye"),
                msg(Role::Assistant, "Goodbye!"),
            ],
        ),
    ];
    let (out, report) = tok.tokenize_examples(&exs, &seq()).unwrap();
    assert_eq!(report.rows_out, 3);
    // text and prompt/completion end in a learned EOS.
    for ex in &out[..2] {
        assert_eq!(*ex.input_ids.last().unwrap(), eos);
        assert_eq!(*ex.labels.last().unwrap(), eos as i64);
    }
    // The conversation learns each assistant `<|im_end|>`, and no other `<|im_end|>`.
    let conv_ex = &out[2];
    let learned_eos = conv_ex
        .input_ids
        .iter()
        .zip(&conv_ex.labels)
        .filter(|&(&id, &l)| id == eos && l == eos as i64)
        .count();
    let total_eos = conv_ex.input_ids.iter().filter(|&&id| id == eos).count();
    assert_eq!(learned_eos, 2);
    assert_eq!(
        total_eos, 5,
        "system, 2 user and 2 assistant turns each end in <|im_end|>"
    );
    // Packed with pad id == eos id: padding is ignored, the real EOS targets survive.
    let cfg = PackConfig {
        seq_len: 128,
        pad_id: tok.pad_id(),
        truncation: Truncation::Right,
        bos_id: tok.bos_id(),
    };
    let (rows, prep) = pack(&out, &cfg).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(prep.pad_tokens > 0);
    let row = &rows[0];
    let targets = row.targets();
    let eos_targets = targets.iter().filter(|&&t| t == eos as i64).count();
    assert_eq!(
        eos_targets, 4,
        "text EOS, completion EOS, two assistant <|im_end|>"
    );
    let pad_seg = *row.segment_ids.last().unwrap();
    for (t, &target) in targets.iter().enumerate() {
        if row.segment_ids[t] == pad_seg {
            assert_eq!(row.input_ids[t], eos);
            assert_eq!(row.labels[t], IGNORE_INDEX);
            assert_eq!(target, IGNORE_INDEX);
        }
    }
}

#[test]
fn exactly_one_bos() {
    // Llama-3: the template writes <|begin_of_text|> and the tokenizer adds BOS: one BOS.
    let tok = load("llama3");
    let bos = tok.bos_id().unwrap();
    let c = conv(
        1,
        vec![msg(Role::User, "Hi"), msg(Role::Assistant, "Hello")],
    );
    let (ex, fixed) = tok.tokenize_record(&c.record, &seq()).unwrap();
    assert!(!fixed);
    assert_eq!(ex.input_ids[0], bos);
    assert_eq!(ex.input_ids.iter().filter(|&&t| t == bos).count(), 1);

    // Text that already starts with the BOS string: fixed to one BOS, and counted.
    let t = text(2, "<|begin_of_text|>Already has a BOS.");
    let (out, report) = tok
        .tokenize_examples(std::slice::from_ref(&t), &seq())
        .unwrap();
    assert_eq!(report.double_bos_fixed, 1);
    assert_eq!(out[0].input_ids[0], bos);
    assert_ne!(out[0].input_ids[1], bos);
    assert_eq!(out[0].labels[0], IGNORE_INDEX);

    // ... or refused, naming the row.
    let cfg = TokenizeConfig {
        double_bos: DoubleBos::Error,
        ..seq()
    };
    let e = tok.tokenize_examples(&[t], &cfg).unwrap_err();
    assert!(matches!(e.root(), Error::DoubleBos { .. }), "{e:?}");
    assert!(e.to_string().contains("data/train.jsonl: row 2"), "{e}");

    // A tokenizer without BOS never gets one (Qwen2).
    let qwen = load("qwen2");
    assert!(qwen.bos_id().is_none());
    let (ex, _) = qwen
        .tokenize_record(&Record::Text { text: "x".into() }, &seq())
        .unwrap();
    assert_eq!(ex.input_ids.len(), 2);
}

#[test]
fn truncation_is_counted_and_never_silently_empties_supervision() {
    let tok = load("llama3");
    let long_prompt = "word ".repeat(40);
    let exs = vec![
        pc(1, "short prompt:", " short answer"),    // fits
        pc(2, "Q:", &" answer".repeat(30)),         // completion cut, still learned
        pc(3, &long_prompt, " answer"),             // completion entirely cut away
        conv(4, vec![msg(Role::User, "no reply")]), // nothing to learn at all
    ];
    let cfg = TokenizeConfig {
        max_len: Some(24),
        truncation: Truncation::Right,
        ..seq()
    };
    let (out, r) = tok.tokenize_examples(&exs, &cfg).unwrap();
    assert_eq!(r.rows_in, 4);
    assert_eq!(r.rows_out, 2);
    assert_eq!(r.rows_truncated, 1);
    assert_eq!(r.rows_supervision_emptied, 1);
    assert_eq!(r.rows_without_supervision, 1);
    assert_eq!(r.rows_excluded(), 2);
    assert!(r.supervised_tokens_cut > 0);
    assert!(out.iter().all(|e| e.len() <= 24 && e.supervised() > 0));
    let rows: Vec<(u64, &ExcludeReason)> = r.excluded.iter().map(|x| (x.row, &x.reason)).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, 3);
    assert!(matches!(
        rows[0].1,
        ExcludeReason::SupervisionTruncated { max_len: 24, .. }
    ));
    assert_eq!(rows[1], (4, &ExcludeReason::NoSupervision));
    assert_eq!(r.excluded[0].file.to_str(), Some("data/train.jsonl"));

    // Left truncation keeps the completion (and BOS) of the long-prompt row.
    let left = TokenizeConfig {
        truncation: Truncation::Left,
        ..cfg.clone()
    };
    let (out, r) = tok.tokenize_examples(&exs[2..3], &left).unwrap();
    assert_eq!((r.rows_out, r.rows_truncated), (1, 1));
    assert_eq!(out[0].len(), 24);
    assert_eq!(out[0].input_ids[0], tok.bos_id().unwrap());
    assert_eq!(learned_texts(&tok, &out[0]), [" answer<|eot_id|>"]);

    // Drop: too-long rows are excluded and counted.
    let drop = TokenizeConfig {
        truncation: Truncation::Drop,
        ..cfg
    };
    let (out, r) = tok.tokenize_examples(&exs, &drop).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(r.rows_dropped_too_long, 2);
    assert_eq!(r.rows_truncated, 0);
}

#[test]
fn template_errors_fail_or_are_reported() {
    let tok = load("gemma2");
    let bad = conv(
        7,
        vec![
            msg(Role::System, "sys"),
            msg(Role::User, "hi"),
            msg(Role::Assistant, "hello"),
        ],
    );
    let e = tok
        .tokenize_examples(std::slice::from_ref(&bad), &seq())
        .unwrap_err();
    assert!(
        e.to_string().contains("row 7") && e.to_string().contains("System role not supported"),
        "{e}"
    );
    let cfg = TokenizeConfig {
        skip_template_errors: true,
        ..seq()
    };
    let (out, r) = tok.tokenize_examples(&[bad], &cfg).unwrap();
    assert!(out.is_empty());
    assert_eq!(r.rows_template_error, 1);
    assert!(
        matches!(&r.excluded[0].reason, ExcludeReason::TemplateError { message } if message.contains("System role"))
    );
}

#[test]
fn conversations_need_a_template() {
    let tok = whet_tokenize::Tokenizer::from_files(
        crate::common::fixtures().join("tokenizer.json"),
        None::<&str>,
    )
    .unwrap();
    let c = conv(1, vec![msg(Role::User, "a"), msg(Role::Assistant, "b")]);
    let e = tok.tokenize_examples(&[c], &seq()).unwrap_err();
    assert!(matches!(e.root(), Error::NoChatTemplate { .. }), "{e:?}");
}

#[test]
fn parallel_and_sequential_agree() {
    let tok = load("smollm2");
    let exs: Vec<_> = (0..64)
        .map(|i| match i % 3 {
            0 => text(
                i,
                &format!("Document number {i}. ").repeat(i as usize % 7 + 1),
            ),
            1 => pc(i, &format!("Prompt {i}:"), &format!(" completion {i}")),
            _ => conv(
                i,
                vec![
                    msg(Role::User, &format!("q{i}")),
                    msg(Role::Assistant, &format!("a{i}")),
                ],
            ),
        })
        .collect();
    let par = TokenizeConfig {
        parallel: true,
        max_len: Some(20),
        ..TokenizeConfig::default()
    };
    let (a, ra) = tok.tokenize_examples(&exs, &par).unwrap();
    let (b, rb) = tok
        .tokenize_examples(
            &exs,
            &TokenizeConfig {
                parallel: false,
                ..par
            },
        )
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(ra, rb);
}
