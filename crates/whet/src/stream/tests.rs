use std::path::Path;

use super::*;

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/templates/smollm2");
    Tokenizer::from_dir(&dir).unwrap()
}

/// Pushes every id of `text`'s encoding; returns the pieces and the finish text.
fn stream(tok: &Tokenizer, text: &str, stops: &[&str]) -> (Vec<Piece>, String) {
    let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
    let mut s = TextStream::new(tok, &stops);
    let mut pieces = Vec::new();
    for id in tok.encode_ids(text).unwrap() {
        let p = s.push(id).unwrap();
        let stop = p.stop;
        pieces.push(p);
        if stop {
            break;
        }
    }
    let rest = s.finish().unwrap();
    let joined: String = pieces.iter().map(|p| p.text.as_str()).collect::<String>() + &rest;
    assert_eq!(joined, s.text());
    (pieces, rest)
}

#[test]
fn characters_split_across_tokens_come_out_whole() {
    let tok = tokenizer();
    let text = "Emoji: 😀🎉 and 日本語 done";
    let ids = tok.encode_ids(text).unwrap();
    // The fixture's byte-level BPE splits these characters over several tokens.
    assert!(ids.len() > text.chars().count() / 2, "{ids:?}");
    let (pieces, rest) = stream(&tok, text, &[]);
    assert!(
        pieces.iter().all(|p| !p.text.contains('\u{FFFD}')),
        "{pieces:?}"
    );
    assert!(
        pieces.iter().any(|p| p.text.is_empty()),
        "no token ended inside a character: {pieces:?}"
    );
    let all: String = pieces.iter().map(|p| p.text.as_str()).collect::<String>() + &rest;
    assert_eq!(all, tok.decode(&ids, true).unwrap());
}

#[test]
fn a_stop_string_ends_the_text_before_it_and_prefixes_wait() {
    let tok = tokenizer();
    let (pieces, rest) = stream(&tok, "one two\nUser: three", &["\nUser:"]);
    let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
    assert_eq!(text, "one two");
    assert!(pieces.last().unwrap().stop);
    assert_eq!(rest, "");
    // "\nUs" could grow into the stop string: held back until the end, then handed out.
    let (pieces, rest) = stream(&tok, "one two\nUs", &["\nUser:"]);
    let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
    assert_eq!((text.as_str(), rest.as_str()), ("one two", "\nUs"));
    assert!(pieces.iter().all(|p| !p.stop));
}
