//! Long documents: windows that lose no token, text tokenized in pieces, and the cheap cut of
//! texts that truncation will cut anyway.

use whet_data::{Record, Role};
use whet_tokenize::{
    Error, ExcludeReason, IGNORE_INDEX, LongDocuments, Outcome, PIECE_BYTES, TokenizeConfig,
    TokenizedExample, Truncation, bounded, piece_cuts, targets_from_labels, windows,
};

use crate::common::{conv, load, msg, pc, text};

/// A document of `n` tokens as `tokenize_record` makes it: a BOS (not learned), then tokens
/// 1..n, every one learned (the last standing for EOS).
fn document(n: usize) -> TokenizedExample {
    let input_ids: Vec<u32> = (0..n as u32).collect();
    let mut labels: Vec<i64> = input_ids.iter().map(|&t| t as i64).collect();
    labels[0] = IGNORE_INDEX;
    TokenizedExample { input_ids, labels }
}

#[test]
fn windows_learn_every_token_exactly_once() {
    for n in [1, 2, 7, 8, 9, 16, 17, 100, 257] {
        for max_len in [2, 3, 8, 16] {
            for overlap in [0, 1, 2, 5] {
                if overlap >= max_len {
                    continue;
                }
                let doc = document(n);
                let ws = windows(&doc, max_len, overlap);
                let what = format!("n {n}, max_len {max_len}, overlap {overlap}");
                assert!(
                    ws.iter().all(|w| !w.is_empty() && w.len() <= max_len),
                    "{what}"
                );
                // Consecutive: each window starts `max_len - overlap` after the one before.
                let mut start = 0usize;
                for w in &ws {
                    assert_eq!(w.input_ids[0] as usize, start, "{what}");
                    start += max_len - overlap;
                }
                assert_eq!(
                    *ws.last().unwrap().input_ids.last().unwrap() as usize,
                    n - 1,
                    "{what}: the last window ends the document"
                );
                // Labels: every learned token of the document once, in order.
                let learned: Vec<i64> = ws
                    .iter()
                    .flat_map(|w| w.labels.iter().copied().filter(|&l| l != IGNORE_INDEX))
                    .collect();
                let want: Vec<i64> = (1..n as i64).collect();
                assert_eq!(learned, want, "{what}");
                // Next-token targets (the trainer's, within each window): each token at most
                // once; with an overlap every one but the first; without, every one but the
                // first of each window, which nothing in its window precedes.
                let mut seen = vec![0u32; n];
                for w in &ws {
                    let targets = targets_from_labels(&w.labels, &vec![0; w.len()]);
                    for t in targets.into_iter().filter(|&t| t != IGNORE_INDEX) {
                        seen[t as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c <= 1), "{what}: {seen:?}");
                let missed: Vec<usize> = (1..n).filter(|&t| seen[t] == 0).collect();
                if overlap >= 1 {
                    assert!(missed.is_empty(), "{what}: {missed:?}");
                } else {
                    let starts: Vec<usize> = (1..ws.len()).map(|k| k * max_len).collect();
                    assert_eq!(missed, starts, "{what}");
                }
            }
        }
    }
}

fn windowed(max_len: usize, overlap: usize) -> TokenizeConfig {
    TokenizeConfig {
        max_len: Some(max_len),
        window_overlap: overlap,
        parallel: false,
        ..TokenizeConfig::default()
    }
}

#[test]
fn a_long_text_document_becomes_windows_with_bos_first_and_eos_last() {
    let tok = load("llama3"); // adds BOS
    let (bos, eos) = (tok.bos_id().unwrap(), tok.eos_id());
    let doc = "The tide came in over the flat sand, and the gulls rose. ".repeat(12);
    let short = "A short note.";
    let exs = [text(0, &doc), text(1, short)];
    let (whole, _) = tok
        .tokenize_record(
            &Record::Text { text: doc.clone() },
            &TokenizeConfig::default(),
        )
        .unwrap();
    assert!(whole.len() > 100, "{}", whole.len());
    for overlap in [0, 4] {
        let cfg = windowed(32, overlap);
        let (out, r) = tok.tokenize_examples(&exs, &cfg).unwrap();
        let n = out.len() - 1;
        assert_eq!(n, windows(&whole, 32, overlap).len());
        assert!(n >= 4, "{n} windows");
        assert_eq!((r.rows_in, r.rows_windowed, r.windows), (2, 1, n as u64));
        assert_eq!(
            (r.rows_out, r.rows_truncated, r.rows_excluded()),
            (n as u64 + 1, 0, 0)
        );
        let ws = &out[..n];
        assert!(ws.iter().all(|w| w.len() <= 32));
        assert_eq!(ws[0].input_ids[0], bos);
        assert!(
            ws[1..].iter().all(|w| !w.input_ids.contains(&bos)),
            "BOS only at the start"
        );
        assert_eq!(*ws[n - 1].input_ids.last().unwrap(), eos);
        assert!(
            ws[..n - 1].iter().all(|w| !w.input_ids.contains(&eos)),
            "EOS only at the end"
        );
        // Every learned token of the whole document, once.
        let supervised: usize = ws.iter().map(TokenizedExample::supervised).sum();
        assert_eq!(supervised, whole.supervised(), "overlap {overlap}");
        assert_eq!(
            r.supervised_tokens_out as usize,
            supervised + out[n].supervised()
        );
        // The short document is untouched.
        assert_eq!(out[n].input_ids[0], bos);
        assert_eq!(*out[n].input_ids.last().unwrap(), eos);
    }
    // `truncate` keeps the old rule: one row, cut to max_len.
    let cfg = TokenizeConfig {
        long_documents: LongDocuments::Truncate,
        ..windowed(32, 0)
    };
    let (out, r) = tok.tokenize_examples(&exs[..1], &cfg).unwrap();
    assert_eq!((out.len(), r.rows_truncated, r.windows), (1, 1, 0));
    assert_eq!(out[0].input_ids[..], whole.input_ids[..32]);
}

#[test]
fn prompt_completion_and_chat_rows_are_never_windowed() {
    let tok = load("smollm2");
    let long = "word ".repeat(200);
    let exs = [
        pc(0, "Q:", &long),
        conv(1, vec![msg(Role::User, "Hi"), msg(Role::Assistant, &long)]),
    ];
    let (out, r) = tok.tokenize_examples(&exs, &windowed(128, 0)).unwrap();
    assert_eq!((out.len(), r.rows_truncated, r.windows), (2, 2, 0));
    assert!(out.iter().all(|e| e.len() == 128));
}

#[test]
fn an_overlap_of_max_len_or_more_is_refused_naming_the_field() {
    let tok = load("smollm2");
    for overlap in [32, 33] {
        let err = tok
            .tokenize_examples(&[text(0, "x")], &windowed(32, overlap))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Setting {
                    field: "window_overlap",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("window_overlap"), "{err}");
    }
}

/// One line of `bytes` bytes: words, numbers, punctuation, accents and emoji, one space apart.
fn one_line(bytes: usize) -> String {
    let words = [
        "the",
        "tide",
        "came",
        "in,",
        "over",
        "flat",
        "sand;",
        "1234567",
        "naïve",
        "café",
        "мир",
        "日本語",
        "🚀🚀",
        "(gulls)",
        "rose.",
        "\"quoted\"",
        "it's",
        "well-known",
    ];
    let mut s = String::with_capacity(bytes + 16);
    let mut i = 0usize;
    while s.len() < bytes {
        if i > 0 {
            // Now and then two spaces, or a tab, so cuts meet runs of whitespace too.
            s.push_str(match i % 97 {
                0 => "  ",
                50 => " \t ",
                _ => " ",
            });
        }
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
        i += 1;
    }
    s
}

#[test]
fn a_multi_megabyte_line_is_tokenized_in_pieces_with_the_whole_texts_ids() {
    let line = one_line(3 << 20);
    let cuts = piece_cuts(&line, PIECE_BYTES);
    assert!(cuts.len() > 40, "{} pieces", cuts.len() - 1);
    for w in cuts.windows(2) {
        assert!(w[0] < w[1] && w[1] - w[0] <= PIECE_BYTES);
        assert!(line.is_char_boundary(w[1]));
        if w[1] < line.len() {
            assert_eq!(line.as_bytes()[w[1]], b' ', "cut at {}", w[1]);
        }
    }
    // Byte-level BPE (GPT-2 / SmolLM2 style, with the fast path) and Llama 3's pattern: the
    // cuts are word starts for both, so the ids are exactly the whole text's.
    for name in ["smollm2", "llama3"] {
        let tok = load(name);
        let whole = tok.encode_ids(&line).unwrap();
        let pieces = tok.encode_ids_in_pieces(&line).unwrap();
        assert_eq!(pieces.len(), whole.len(), "{name}");
        assert!(pieces == whole, "{name}: the ids differ");
    }
    // A document of that line becomes windows covering all of it.
    let tok = load("smollm2");
    let (out, r) = tok
        .tokenize_examples(&[text(0, &line)], &windowed(4096, 0))
        .unwrap();
    let total: u64 = out.iter().map(|e| e.len() as u64).sum();
    assert_eq!(
        total,
        tok.encode_ids(&line).unwrap().len() as u64 + 1,
        "+ EOS"
    );
    assert_eq!(r.windows as usize, out.len());
    assert!(out.len() > 100);
}

#[test]
fn text_without_spaces_is_still_cut_at_character_boundaries() {
    let s = "é日🚀x".repeat(40_000);
    let cuts = piece_cuts(&s, PIECE_BYTES);
    assert!(cuts.len() > 3);
    for w in cuts.windows(2) {
        assert!(w[1] - w[0] <= PIECE_BYTES && s.is_char_boundary(w[1]));
    }
    let nl = "line\n".repeat(30_000);
    let cuts = piece_cuts(&nl, PIECE_BYTES);
    assert!(
        cuts[1..cuts.len() - 1]
            .iter()
            .all(|&c| nl.as_bytes()[c] == b'\n')
    );
}

/// Truncation of a row with a 20 MB part gives what it gives on the row cut by hand to a
/// part that is long enough: the pre-cut keeps every token truncation keeps.
#[test]
fn huge_prompts_and_messages_are_cut_before_tokenizing_as_truncation_would() {
    let tok = load("smollm2");
    let huge = one_line(20 << 20);
    let head = bounded(&huge, 20_000, false);
    let tail = bounded(&huge, 20_000, true);
    let tail = &tail[tail.find(' ').unwrap()..];
    let cfg = |truncation| TokenizeConfig {
        max_len: Some(64),
        truncation,
        parallel: false,
        ..TokenizeConfig::default()
    };
    let one = |ex, t| match tok.tokenize_example(&ex, &cfg(t)).unwrap() {
        Outcome::Kept { example, .. } => Some(example),
        Outcome::Excluded { reason, .. } => {
            assert!(matches!(reason, ExcludeReason::SupervisionTruncated { .. }));
            None
        }
        Outcome::Windowed { .. } => panic!("a prompt/completion row was windowed"),
    };
    let started = std::time::Instant::now();
    // Right: the completion lies past max_len either way.
    assert_eq!(one(pc(0, &huge, " yes"), Truncation::Right), None);
    // Left: the end of the prompt and the completion.
    let big = one(pc(0, &huge, " yes"), Truncation::Left).unwrap();
    let small = one(pc(0, tail, " yes"), Truncation::Left).unwrap();
    assert_eq!(big, small);
    // A chat with a huge user turn: the same on both sides.
    let chat = |user: &str| {
        conv(
            1,
            vec![msg(Role::User, user), msg(Role::Assistant, "Sure.")],
        )
    };
    assert_eq!(
        one(chat(&huge), Truncation::Left).unwrap(),
        one(chat(tail), Truncation::Left).unwrap()
    );
    assert_eq!(one(chat(&huge), Truncation::Right), None);
    // A huge text under `truncate` keeps the start.
    let trunc = TokenizeConfig {
        long_documents: LongDocuments::Truncate,
        ..cfg(Truncation::Right)
    };
    let t = |s: &str| match tok.tokenize_example(&text(2, s), &trunc).unwrap() {
        Outcome::Kept { example, .. } => example,
        other => panic!("{other:?}"),
    };
    assert_eq!(t(&huge), t(head));
    assert!(
        started.elapsed().as_secs() < 20,
        "the 20 MB parts were tokenized whole: {:?}",
        started.elapsed()
    );
}
