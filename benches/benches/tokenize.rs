//! Throughput (input bytes per second) of tokenize + pack on plain text with the fixture
//! byte-level BPE tokenizer (fixtures/templates/smollm2), single-threaded and parallel.
//!
//!     cargo bench -p whet-benches --bench tokenize
//!
//! Target: >= 5 MB/s per core.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use whet_data::{Example, Origin, Record};
use whet_tokenize::{PackConfig, TokenizeConfig, TokenizedExample, Tokenizer, Truncation, pack};

const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "every",
    "token",
    "of",
    "raw",
    "text",
    "and",
    "a",
    "tokenizer",
    "splits",
    "into",
    "pieces",
    "packing",
    "places",
    "several",
    "short",
    "documents",
    "in",
    "one",
    "row",
    "position",
    "ids",
    "restart",
    "at",
    "zero",
    "for",
    "document",
    "fine-tuning",
    "adapts",
    "pretrained",
    "language",
    "to",
    "new",
    "task",
    "with",
    "small",
    "amount",
    "data",
    "assistant",
    "user",
    "conversation",
    "is",
    "wide",
    "blue",
    "sea",
    "waves",
    "come",
    "out",
    "capital",
    "France",
    "Paris",
    "two",
    "plus",
    "four",
    "list",
    "tuple",
    "Python",
    "order",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "2024",
    "42",
    "3.14",
    "café",
    "naïve",
    "Straße",
    "мир",
    "日本語",
    "🚀",
];

/// Deterministic English-like documents of 200..4000 bytes, about `total` bytes in all.
/// One word in 16 is a random lowercase string, so the per-word cache also meets a long
/// tail of unseen words as real text does.
fn corpus(total: usize) -> Vec<String> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut docs = Vec::new();
    let mut bytes = 0;
    while bytes < total {
        let target = 200 + (next() % 3800) as usize;
        let mut doc = String::with_capacity(target + 16);
        let mut sentence = 0;
        while doc.len() < target {
            let random_word: String;
            let w = if next() % 16 == 0 {
                let n = 3 + (next() % 8) as usize;
                random_word = (0..n)
                    .map(|_| (b'a' + (next() % 26) as u8) as char)
                    .collect();
                random_word.as_str()
            } else {
                WORDS[(next() % WORDS.len() as u64) as usize]
            };
            if sentence == 0 {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    doc.extend(f.to_uppercase());
                    doc.push_str(c.as_str());
                }
            } else {
                doc.push_str(w);
            }
            sentence += 1;
            if sentence > 6 && next() % 5 == 0 {
                doc.push_str(if next() % 7 == 0 { ".\n" } else { ". " });
                sentence = 0;
            } else if next() % 11 == 0 {
                doc.push_str(", ");
            } else {
                doc.push(' ');
            }
        }
        bytes += doc.len();
        docs.push(doc);
    }
    docs
}

fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/templates/smollm2");
    Tokenizer::from_dir(&dir).expect("fixture tokenizer (run fixtures/gen/make_templates.py)")
}

fn bench(c: &mut Criterion) {
    let tok = tokenizer();
    let docs = corpus(2 << 20);
    let bytes: usize = docs.iter().map(String::len).sum();
    let examples: Vec<Example> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| Example {
            id: i as u64,
            origin: Origin {
                file: PathBuf::from("bench.txt"),
                row: i as u64,
            },
            record: Record::Text { text: d.clone() },
        })
        .collect();
    let pack_cfg = PackConfig {
        seq_len: 2048,
        pad_id: tok.pad_id(),
        truncation: Truncation::Right,
        bos_id: tok.bos_id(),
    };
    let tcfg = |parallel| TokenizeConfig {
        max_len: Some(2048),
        parallel,
        ..TokenizeConfig::default()
    };

    // Each iteration gets a freshly loaded tokenizer (setup, not timed), so the per-word
    // cache starts cold and the numbers include every first encounter of a word.
    let mut g = c.benchmark_group("tokenize_pack_text");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.sample_size(10);
    g.bench_function("single_thread", |b| {
        b.iter_batched(
            tokenizer,
            |tok| {
                let (exs, _) = tok.tokenize_examples(&examples, &tcfg(false)).unwrap();
                black_box(pack(&exs, &pack_cfg).unwrap())
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("parallel_examples", |b| {
        b.iter_batched(
            tokenizer,
            |tok| {
                let (exs, _) = tok.tokenize_examples(&examples, &tcfg(true)).unwrap();
                black_box(pack(&exs, &pack_cfg).unwrap())
            },
            BatchSize::PerIteration,
        )
    });
    let texts: Vec<&str> = docs.iter().map(String::as_str).collect();
    g.bench_function("parallel_encode_batch", |b| {
        b.iter_batched(
            tokenizer,
            |tok| {
                let ids = tok.encode_batch_ids(&texts).unwrap();
                let exs: Vec<TokenizedExample> = ids
                    .into_iter()
                    .map(|mut body| {
                        body.truncate(2047);
                        let mut labels: Vec<i64> = body.iter().map(|&t| t as i64).collect();
                        body.push(tok.eos_id());
                        labels.push(tok.eos_id() as i64);
                        TokenizedExample {
                            input_ids: body,
                            labels,
                        }
                    })
                    .collect();
                black_box(pack(&exs, &pack_cfg).unwrap())
            },
            BatchSize::PerIteration,
        )
    });
    // The general `tokenizers` pipeline alone, for reference: what a tokenizer without the
    // byte-level shortcut (e.g. one with a normalizer or a Split pre-tokenizer) gets.
    g.bench_function("reference_tokenizers_encode_single_thread", |b| {
        b.iter(|| {
            for d in &docs {
                black_box(tok.inner().encode_fast(d.as_str(), false).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
