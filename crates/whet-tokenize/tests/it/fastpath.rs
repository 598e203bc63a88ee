//! The plain-text shortcut gives exactly the ids of the `tokenizers` pipeline.

use std::sync::LazyLock;

use proptest::prelude::*;
use whet_tokenize::Tokenizer;

use crate::common::load;

static TOKENIZERS: LazyLock<[Tokenizer; 2]> = LazyLock::new(|| [load("smollm2"), load("gemma2")]);

fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z]{1,8}",
        "[0-9]{1,5}",
        "[ \t\n\r]{1,4}",
        Just("\u{a0}".to_string()),
        Just("\u{2028}".to_string()),
        Just("\u{3000}".to_string()),
        Just("\u{85}".to_string()),
        Just("\r\n".to_string()),
        prop::sample::select(vec!["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'"])
            .prop_map(str::to_string),
        "[!-/:-@\\[-`{-~]{1,3}",
        prop::sample::select(vec![
            "é",
            "e\u{301}",
            "日本語",
            "мир",
            "Straße",
            "🚀",
            "😀✓",
            "\u{0}",
            "\u{7f}",
            "٣",
            "Ⅻ",
            "ǅ"
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec!["<|im_end|>", "<s>", "[INST]", "<eos>"]).prop_map(str::to_string),
        any::<char>().prop_map(|c| c.to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_ids_equal_tokenizers_ids(atoms in prop::collection::vec(atom(), 0..24)) {
        let text: String = atoms.concat();
        for tok in TOKENIZERS.iter() {
            prop_assert!(tok.has_fast_path());
            let want = tok.inner().encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
            prop_assert_eq!(tok.encode_ids(&text).unwrap(), want.clone(), "{:?}", text);
            prop_assert_eq!(tok.encode(&text).unwrap().ids, want);
        }
    }
}

#[test]
fn batch_encoding_matches_single() {
    let tok = load("llama3");
    let texts = [
        "Hello world",
        "  two  spaces\n\nnew lines ",
        "",
        "日本語 🚀 'll",
        "<|eot_id|> special",
    ];
    let batch = tok.encode_batch_ids(&texts).unwrap();
    for (t, ids) in texts.iter().zip(&batch) {
        assert_eq!(
            ids,
            &tok.inner()
                .encode_fast(*t, false)
                .unwrap()
                .get_ids()
                .to_vec(),
            "{t:?}"
        );
    }
}
