use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| (*s).to_owned()).collect()
}

// ---- normalisation ----

#[test]
fn normalize_folds_case_punctuation_and_whitespace() {
    let all = Normalize::default();
    assert_eq!(normalize("  The   Cat!\n", &all), "the cat");
    // « » (Pi, Pf) and — (Pd) are Unicode punctuation; É lowercases to é.
    assert_eq!(
        normalize("ÉCOLE «Normale» — Supérieure", &all),
        "école normale supérieure"
    );
    // SQuAD deletes punctuation without a space; ASCII symbols ($) go, other symbols (€) stay.
    assert_eq!(
        normalize("state-of-the-art $5 €5", &all),
        "stateoftheart 5 €5"
    );
    // CJK punctuation (。、) and a no-break space.
    assert_eq!(normalize("東京、大阪。\u{a0}京都", &all), "東京大阪 京都");
    // Lowercasing, not case folding.
    assert_eq!(normalize("STRASSE Straße", &all), "strasse straße");
}

#[test]
fn normalize_folds_only_what_it_is_told() {
    let text = " A,  b ";
    assert_eq!(normalize(text, &Normalize::NONE), text);
    let case = Normalize {
        case: true,
        ..Normalize::NONE
    };
    assert_eq!(normalize(text, &case), " a,  b ");
    let punct = Normalize {
        punctuation: true,
        ..Normalize::NONE
    };
    assert_eq!(normalize(text, &punct), " A  b ");
    let space = Normalize {
        whitespace: true,
        ..Normalize::NONE
    };
    assert_eq!(normalize(text, &space), "A, b");
}

#[test]
fn exact_match_and_its_rate() {
    let n = Normalize::default();
    assert!(exact_match("Paris.", " paris", &n));
    assert!(!exact_match("Paris.", " paris", &Normalize::NONE));
    assert!(!exact_match("Paris, France", "Paris", &n));
    // 2 of 3 match.
    let rate = exact_match_rate(&["Yes", "no!", "maybe"], &["yes", "No", "no"], &n).unwrap();
    assert!(close(rate, 2.0 / 3.0), "{rate}");
    assert_eq!(exact_match_rate(&["a"], &["b"], &n).unwrap(), 0.0);
}

#[test]
fn empty_or_mismatched_inputs_are_errors() {
    let n = Normalize::default();
    let labels = strings(&["a"]);
    let empty: [&str; 0] = [];
    for err in [
        exact_match_rate(&empty, &empty, &n).unwrap_err(),
        classification(&empty, &empty, &labels, &n).unwrap_err(),
        entity_f1(&empty, &empty, &n).unwrap_err(),
        chrf(&empty, &empty, ChrfOptions::default()).unwrap_err(),
    ] {
        assert!(err.to_string().contains("no examples"), "{err}");
    }
    let err = exact_match_rate(&["a", "b"], &["a"], &n).unwrap_err();
    assert!(
        err.to_string().contains("2 predictions for 1 references"),
        "{err}"
    );
    let err = chrf(&["a"], &["a", "b"], ChrfOptions::default()).unwrap_err();
    assert!(
        matches!(err, TrainError::ScoreInput { metric: "chrf", .. }),
        "{err}"
    );
}

// ---- classification ----

#[test]
fn classification_three_labels_by_hand() {
    // refs:  a  a  a  b  b  c  c
    // preds: a  a  b  b  x  c  a      (x: outside the label set)
    // Written with case, punctuation and spacing the normalisation folds away.
    let preds = ["A", "a.", "b", " B ", "x", "c!", "a"];
    let refs = ["a", "A", "a", "b", "b", "C", "c"];
    let labels = strings(&["a", "b", "c"]);
    let c = classification(&preds, &refs, &labels, &Normalize::default()).unwrap();
    // Rows = reference, columns = predicted a, b, c, (other):
    //   a: 2 1 0 0
    //   b: 0 1 0 1
    //   c: 1 0 1 0
    assert_eq!(
        c.confusion,
        vec![vec![2, 1, 0, 0], vec![0, 1, 0, 1], vec![1, 0, 1, 0]]
    );
    assert_eq!((c.n, c.outside_label_set), (7, 1));
    // accuracy = diagonal / n = (2 + 1 + 1) / 7
    assert!(close(c.accuracy, 4.0 / 7.0));
    // a: tp 2, predicted 2+0+1 = 3, support 3 -> P 2/3, R 2/3, F1 2/3
    // b: tp 1, predicted 1+1+0 = 2, support 2 -> P 1/2, R 1/2, F1 1/2
    // c: tp 1, predicted 1,         support 2 -> P 1,   R 1/2, F1 2*1/(2*1+0+1) = 2/3
    let expected = [
        ("a", 2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 3),
        ("b", 0.5, 0.5, 0.5, 2),
        ("c", 1.0, 0.5, 2.0 / 3.0, 2),
    ];
    for (got, (label, p, r, f, support)) in c.per_label.iter().zip(expected) {
        assert_eq!((got.label.as_str(), got.support), (label, support));
        assert!(
            close(got.precision, p) && close(got.recall, r) && close(got.f1, f),
            "{got:?}"
        );
    }
    // macro F1 = (2/3 + 1/2 + 2/3) / 3 = 11/18
    assert!(close(c.macro_f1, 11.0 / 18.0), "{}", c.macro_f1);

    // A fourth label with no support and no prediction has F1 0 (zero_division=0) and still
    // counts in the macro mean: (11/6) / 4 = 11/24. The matrix gains a row and a column.
    let labels4 = strings(&["a", "b", "c", "d"]);
    let c4 = classification(&preds, &refs, &labels4, &Normalize::default()).unwrap();
    assert!(close(c4.macro_f1, 11.0 / 24.0), "{}", c4.macro_f1);
    let d = &c4.per_label[3];
    assert_eq!((d.precision, d.recall, d.f1, d.support), (0.0, 0.0, 0.0, 0));
    assert_eq!(c4.confusion[0], vec![2, 1, 0, 0, 0]);
    assert_eq!(c4.confusion[3], vec![0, 0, 0, 0, 0]);
}

#[test]
fn classification_all_wrong_and_all_right() {
    let labels = strings(&["pos", "neg"]);
    let n = Normalize::default();
    // Every prediction is the other label: no tp anywhere.
    let c = classification(&["neg", "pos", "neg"], &["pos", "neg", "pos"], &labels, &n).unwrap();
    assert_eq!((c.accuracy, c.macro_f1), (0.0, 0.0));
    assert_eq!(c.confusion, vec![vec![0, 2, 0], vec![1, 0, 0]]);
    // Every prediction outside the set: recall 0, precision 0/0 -> 0.
    let c = classification(&["maybe", "?"], &["pos", "neg"], &labels, &n).unwrap();
    assert_eq!((c.accuracy, c.macro_f1, c.outside_label_set), (0.0, 0.0, 2));
    assert_eq!(c.confusion, vec![vec![0, 0, 1], vec![0, 0, 1]]);
    // The prediction "?" normalises to "" and still matches no label.
    let c = classification(&["Pos", "NEG"], &["pos", "neg"], &labels, &n).unwrap();
    assert_eq!((c.accuracy, c.macro_f1, c.outside_label_set), (1.0, 1.0, 0));
}

#[test]
fn classification_rejects_bad_label_sets_and_references() {
    let n = Normalize::default();
    let err = classification(&["a", "b"], &["a", "z"], &strings(&["a", "b"]), &n).unwrap_err();
    let TrainError::ReferenceOutsideLabels {
        row, ref reference, ..
    } = err
    else {
        panic!("{err}")
    };
    assert_eq!((row, reference.as_str()), (1, "z"));
    assert!(err.to_string().contains("\"a\", \"b\""), "{err}");

    let err = classification(&["a"], &["a"], &[], &n).unwrap_err();
    assert!(err.to_string().contains("label set is empty"), "{err}");
    let err = classification(&["a"], &["a"], &strings(&["Yes", "yes."]), &n).unwrap_err();
    assert!(
        err.to_string().contains("same after normalisation"),
        "{err}"
    );
    // Without normalisation the two are different labels.
    let c = classification(
        &["yes."],
        &["Yes"],
        &strings(&["Yes", "yes."]),
        &Normalize::NONE,
    )
    .unwrap();
    assert_eq!(c.confusion, vec![vec![0, 1, 0], vec![0, 0, 0]]);
}

#[test]
fn labels_from_sorts_distinct_normalised_references() {
    let got = labels_from(
        &["Neg", "pos", "neg.", "Pos", "neutral"],
        &Normalize::default(),
    );
    assert_eq!(got, strings(&["neg", "neutral", "pos"]));
}

#[test]
fn confusion_matrix_as_markdown() {
    let labels = strings(&["a|b", "c"]);
    let c = classification(
        &["a|b", "c", "x"],
        &["a|b", "a|b", "c"],
        &labels,
        &Normalize::NONE,
    )
    .unwrap();
    assert_eq!(
        c.to_markdown(),
        "| reference \\ predicted | a\\|b | c | (other) |\n\
         |---|---:|---:|---:|\n\
         | a\\|b | 1 | 1 | 0 |\n\
         | c | 0 | 0 | 1 |\n"
    );
}

#[test]
fn classification_serializes_for_the_report() {
    let c = classification(&["a"], &["a"], &strings(&["a"]), &Normalize::default()).unwrap();
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["accuracy"], 1.0);
    assert_eq!(json["per_label"][0]["support"], 1);
    assert_eq!(json["confusion"], serde_json::json!([[1, 0]]));
}

// ---- entity F1 ----

#[test]
fn entity_f1_by_hand() {
    let preds = [
        // 0: PER right (after normalisation), LOC wrong span.
        r#"[{"type": "per", "text": "ada lovelace"}, {"type": "LOC", "text": "Paris"}]"#,
        // 1: one of the two Bobs.
        "PER: Bob",
        // 2: not an entity list: predicts nothing.
        "not json {",
        // 3: an entity where none is expected.
        r#"{"MISC": ["x"]}"#,
    ];
    let refs = [
        r#"{"PER": ["Ada Lovelace"], "LOC": "London"}"#,
        "ORG: Acme\nPER: Bob\nPER: Bob",
        r#"{"LOC": ["Rome"]}"#,
        "",
    ];
    let s = entity_f1(&preds, &refs, &Normalize::default()).unwrap();
    // tp: (per, ada lovelace) in 0, (per, bob) in 1                    = 2
    // fp: (loc, paris) in 0, (misc, x) in 3                            = 2
    // fn: (loc, london) in 0, the second (per, bob) and (org, acme) in 1,
    //     (loc, rome) in 2                                             = 4
    // P = 2/4, R = 2/6, F1 = 2*2 / (2*2 + 2 + 4) = 0.4
    let o = &s.overall;
    assert_eq!((o.true_pos, o.false_pos, o.false_neg), (2, 2, 4));
    assert!(close(o.precision, 0.5) && close(o.recall, 1.0 / 3.0) && close(o.f1, 0.4));
    assert_eq!((s.unparseable, s.truncated, s.n), (1, 0, 4));
    // per: tp 2, fn 1 -> P 1, R 2/3, F1 4/5; the others have no tp -> all 0.
    assert_eq!(
        s.per_type.keys().collect::<Vec<_>>(),
        ["loc", "misc", "org", "per"]
    );
    let per = &s.per_type["per"];
    assert_eq!((per.true_pos, per.false_pos, per.false_neg), (2, 0, 1));
    assert!(close(per.precision, 1.0) && close(per.recall, 2.0 / 3.0) && close(per.f1, 0.8));
    let loc = &s.per_type["loc"];
    assert_eq!((loc.true_pos, loc.false_pos, loc.false_neg), (0, 1, 2));
    assert_eq!((loc.precision, loc.recall, loc.f1), (0.0, 0.0, 0.0));
    assert_eq!(s.per_type["misc"].false_pos, 1);
    assert_eq!(s.per_type["org"].false_neg, 1);
}

#[test]
fn entity_formats_agree() {
    let n = Normalize::default();
    let reference = r#"{"PER": ["Ada", "Bob"], "LOC": "Paris", "ORG": null, "DATE": 1843}"#;
    for pred in [
        reference,
        // The list form with each accepted key variant, in another order.
        r#"[{"label": "LOC", "value": "Paris"}, {"entity_type": "PER", "span": "Ada"},
            {"type": "PER", "entity": "Bob"}, {"entity_group": "DATE", "word": "1843"}]"#,
        // "entity" as the type when another key holds the span.
        r#"[{"entity": "LOC", "text": "Paris"}, {"entity": "PER", "text": "Ada"},
            {"entity": "PER", "text": "Bob"}, {"entity": "DATE", "text": 1843}]"#,
        "- PER: Ada\n* PER: Bob\n\nLOC: Paris\nDATE: 1843\n",
        "```json\n{\"PER\": [\"Ada\", \"Bob\"], \"LOC\": [\"Paris\"], \"DATE\": [\"1843\"]}\n```",
        "```\nPER: Ada\nPER: Bob\nLOC: Paris\nDATE: 1843",
    ] {
        let s = entity_f1(&[pred], &[reference], &n).unwrap();
        assert_eq!(
            (
                s.overall.true_pos,
                s.overall.false_pos,
                s.overall.false_neg,
                s.unparseable
            ),
            (4, 0, 0, 0),
            "{pred}"
        );
    }
    // A time in the span: only the first colon splits.
    let s = entity_f1(
        &["TIME: 10:30"],
        &[r#"{"TIME": "10:30"}"#],
        &Normalize::NONE,
    )
    .unwrap();
    assert_eq!(s.overall.true_pos, 1);
}

#[test]
fn entity_f1_empty_both_sides_is_zero_not_nan() {
    // Nothing predicted, nothing expected: every ratio is 0/0 -> 0 (seqeval's convention).
    let s = entity_f1(&["", "[]", "{}"], &["", "  ", "[]"], &Normalize::default()).unwrap();
    assert_eq!(s.overall, Prf::from_counts(0, 0, 0));
    assert_eq!((s.overall.f1, s.unparseable), (0.0, 0));
    assert!(s.per_type.is_empty());
}

#[test]
fn unparseable_predictions_count_and_references_fail() {
    let n = Normalize::default();
    let reference = r#"{"PER": ["Ada"]}"#;
    for pred in [
        "{\"PER\": [\"Ada\"]",             // cut-off JSON
        "{\"PER\": [\"Ada\"]} and more",   // trailing text
        "[\"Ada\"]",                       // list of strings, not objects
        r#"[{"type": "PER"}]"#,            // no span key
        r#"[{"text": "Ada"}]"#,            // no type key
        r#"[{"type": 3, "text": "Ada"}]"#, // type not a string
        r#"{"PER": [{"text": "Ada"}]}"#,   // span not a string
        "Ada was a mathematician",         // prose: no colon
        "PER:",                            // no span
        ": Ada",                           // no type
    ] {
        let s = entity_f1(&[pred], &[reference], &n).unwrap();
        assert_eq!(
            (
                s.unparseable,
                s.overall.true_pos,
                s.overall.false_pos,
                s.overall.false_neg
            ),
            (1, 0, 0, 1),
            "{pred}"
        );
    }
    let err = entity_f1(&["PER: Ada", "PER: Bob"], &[reference, "{oops"], &n).unwrap_err();
    let TrainError::UnparseableReference { row, .. } = err else {
        panic!("{err}")
    };
    assert_eq!(row, 1);
    assert!(
        err.to_string().contains("reference 1 (counting from 0)"),
        "{err}"
    );
}

#[test]
fn deep_json_is_unparseable_not_a_stack_overflow() {
    // serde_json stops at 128 levels of nesting.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let s = entity_f1(&[deep.as_str()], &["PER: Ada"], &Normalize::default()).unwrap();
    assert_eq!((s.unparseable, s.overall.false_neg), (1, 1));
    let err = entity_f1(&["PER: Ada"], &[deep.as_str()], &Normalize::default()).unwrap_err();
    assert!(err.to_string().contains("recursion limit"), "{err}");
}

#[test]
fn entities_past_the_cap_are_dropped_and_counted() {
    // MAX + 10 distinct predicted spans, one of which (the first) is expected.
    let pred: String = (0..MAX_ENTITIES_PER_EXAMPLE + 10)
        .map(|i| format!("PER: p{i}\n"))
        .collect();
    let s = entity_f1(
        &[pred.as_str(), "PER: p0"],
        &["PER: p0", "PER: p0"],
        &Normalize::default(),
    )
    .unwrap();
    // Example 0: 1 tp, MAX - 1 fp (the 10 past the cap are not scored); example 1: 1 tp.
    assert_eq!(
        (s.overall.true_pos, s.overall.false_pos, s.overall.false_neg),
        (2, MAX_ENTITIES_PER_EXAMPLE - 1, 0)
    );
    assert_eq!((s.truncated, s.unparseable), (1, 0));
}

// ---- chrF++ against sacreBLEU ----
//
// Expected values: sacreBLEU 2.6.0 (Python 3.11), each case run as
//
//     from sacrebleu.metrics import CHRF
//     CHRF(word_order=2, **options).corpus_score(preds, [refs]).score
//
// and printed with repr(); `chrf` returns that score / 100, checked to 1e-8 (1e-6 on
// sacreBLEU's 0-100 scale).

fn sacrebleu_case(preds: &[&str], refs: &[&str], opts: ChrfOptions, sacrebleu: f64) {
    let got = chrf(preds, refs, opts).unwrap();
    assert!(
        (got * 100.0 - sacrebleu).abs() < 1e-6,
        "{preds:?} / {refs:?}: {} vs sacreBLEU {sacrebleu}",
        got * 100.0
    );
}

const CORPUS_PREDS: [&str; 3] = ["the quick brown fox", "jumps over (the) lazy dog!", "hello"];
const CORPUS_REFS: [&str; 3] = [
    "a quick brown fox",
    "jumped over the lazy dog.",
    "hello world",
];

#[test]
fn chrf_matches_sacrebleu() {
    let d = ChrfOptions::default();
    let s = ["the cat sat on the mat"];
    sacrebleu_case(&s, &s, d, 100.0);
    sacrebleu_case(&["abc"], &["xyz"], d, 0.0);
    sacrebleu_case(
        &["the cat sat on the mat"],
        &["the cat is on the mat."],
        d,
        61.52370564566261,
    );
    sacrebleu_case(&CORPUS_PREDS, &CORPUS_REFS, d, 53.8667305352018);
    sacrebleu_case(
        &["Größe des Gebäudes: 東京タワー", "naïve café"],
        &["Die Größe des Gebäudes: 東京スカイツリー", "naive café"],
        d,
        64.27659603046794,
    );
    sacrebleu_case(&[""], &["hello world"], d, 0.0);
    sacrebleu_case(
        &["", "hello world"],
        &["hello there", "hello world"],
        d,
        55.55555555555556,
    );
    // Shorter than the orders: no bigram in the prediction, none of order > 2 anywhere.
    sacrebleu_case(&["ab"], &["ab c"], d, 60.97560975609755);
    // "hi" has no n-gram of order 3 and up, nor a word bigram: the prediction's n-grams of those
    // orders are not counted for that example (sacreBLEU's "don't count hits if no reference
    // exists for that n-gram"), though the next example's are.
    sacrebleu_case(
        &["hello world", "the cat sat"],
        &["hi", "the cat sat"],
        d,
        91.70551045282737,
    );
    // U+001C is whitespace to Python's str.split (not to Rust's char::is_whitespace).
    sacrebleu_case(&["a\u{1c}b c"], &["a b c"], d, 100.0);
}

#[test]
fn chrf_options_match_sacrebleu() {
    let d = ChrfOptions::default();
    let eps = ChrfOptions {
        eps_smoothing: true,
        ..d
    };
    // CHRF(word_order=2, eps_smoothing=True)
    sacrebleu_case(&CORPUS_PREDS, &CORPUS_REFS, eps, 53.862323503060935);
    sacrebleu_case(&[""], &["hello world"], eps, 0.0);
    sacrebleu_case(
        &["hello world", "the cat sat"],
        &["hi", "the cat sat"],
        eps,
        90.78316861335729,
    );
    // CHRF(word_order=0): plain chrF
    let plain = ChrfOptions { word_order: 0, ..d };
    sacrebleu_case(&CORPUS_PREDS, &CORPUS_REFS, plain, 56.53914109602651);
    // CHRF(word_order=2, lowercase=True, whitespace=True)
    let lower_ws = ChrfOptions {
        lowercase: true,
        whitespace: true,
        ..d
    };
    sacrebleu_case(
        &["The Cat SAT"],
        &["the cat sat down"],
        lower_ws,
        69.40473103198738,
    );
}

#[test]
fn chrf_by_hand() {
    // "ab" vs "ab": char orders 1 and 2 match fully (P = R = 1); orders 3..6 have no n-gram on
    // either side; word unigram "ab" matches, no word bigram. Effective orders: 1, 2 and the
    // word unigram, each P = R = 1, so F = 1.
    assert_eq!(chrf(&["ab"], &["ab"], ChrfOptions::default()).unwrap(), 1.0);
    // chrF with char_order 1 only: "ab" vs "ac": 1 of 2 characters matches both ways,
    // P = R = 1/2, F_beta = (1 + 4) * 1/4 / (4 * 1/2 + 1/2) = 1/2.
    let unigrams = ChrfOptions {
        char_order: 1,
        word_order: 0,
        ..ChrfOptions::default()
    };
    assert!(close(chrf(&["ab"], &["ac"], unigrams).unwrap(), 0.5));
    // "a" vs "abcd", char unigrams: P = 1/1, R = 1/4: F2 = 5 * 1/4 / (4 + 1/4) = 5/17.
    assert!(close(
        chrf(&["a"], &["abcd"], unigrams).unwrap(),
        5.0 / 17.0
    ));
    let none = ChrfOptions {
        char_order: 0,
        word_order: 0,
        ..ChrfOptions::default()
    };
    assert!(chrf(&["a"], &["a"], none).is_err());
}

#[test]
fn chrf_words_split_punctuation_like_sacrebleu() {
    // One character off the end, else off the start; single characters stay whole.
    assert_eq!(
        chrf_words("(hi) there! ... x 'é"),
        ["(hi", ")", "there", "!", "..", ".", "x", "'", "é"]
    );
    // The last character is multi-byte: nothing is split.
    assert_eq!(chrf_words("«hi»"), ["«hi»"]);
}

// ---- metric names ----

#[test]
fn metric_names_parse_and_round_trip() {
    for m in Metric::ALL {
        assert_eq!(m.name().parse::<Metric>().unwrap(), m);
        assert_eq!(m.to_string(), m.name());
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, format!("\"{}\"", m.name()));
        assert_eq!(serde_json::from_str::<Metric>(&json).unwrap(), m);
    }
    let err = "f1".parse::<Metric>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown metric \"f1\"; the metrics are exact_match, accuracy, macro_f1, entity_f1, chrf"
    );
    let err = serde_json::from_str::<Vec<Metric>>(r#"["chrf", "bleu"]"#).unwrap_err();
    assert!(err.to_string().contains("unknown metric \"bleu\""), "{err}");
}
