//! Throughput (input bytes per second) of whet-data on a generated ~4 MB JSONL file of chat
//! rows: reading + mapping, PII scrubbing, and exact + MinHash dedup.
//!
//!     cargo bench -p whet-benches --bench data

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use whet_data::dedup::{DedupConfig, dedup};
use whet_data::pii::Scrubber;
use whet_data::{ReadOptions, read_all};

const WORDS: &[&str] = &[
    "the", "model", "learns", "every", "token", "of", "raw", "text", "and", "a", "reply",
    "question", "answer", "please", "explain", "why", "data", "matters", "for", "training",
];

/// Writes ~`bytes` of JSONL conversations with the odd email and phone number; returns the path.
fn make_jsonl(bytes: usize) -> PathBuf {
    let path = std::env::temp_dir().join(format!("whet-bench-data-{}.jsonl", std::process::id()));
    let mut out = String::with_capacity(bytes + 1024);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut word = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        WORDS[(x % WORDS.len() as u64) as usize]
    };
    let mut row = 0usize;
    while out.len() < bytes {
        let user: Vec<&str> = (0..40).map(|_| word()).collect();
        let asst: Vec<&str> = (0..80).map(|_| word()).collect();
        let pii = if row.is_multiple_of(10) {
            " mail me at someone@example.com or +44 20 7946 0958"
        } else {
            ""
        };
        out.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{} {row}{pii}\"}},{{\"role\":\"assistant\",\"content\":\"{}\"}}]}}\n",
            user.join(" "),
            asst.join(" ")
        ));
        row += 1;
    }
    std::fs::write(&path, out).expect("write bench file");
    path
}

fn bench(c: &mut Criterion) {
    let path = make_jsonl(4 << 20);
    let size = std::fs::metadata(&path).unwrap().len();
    let opts = ReadOptions::default();
    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Bytes(size));
    g.sample_size(10);
    g.bench_function("read_jsonl", |b| {
        b.iter(|| black_box(read_all(&path, &opts).unwrap().0.len()))
    });
    let (examples, _) = read_all(&path, &opts).unwrap();
    let scrubber = Scrubber::new();
    g.bench_function("scrub", |b| {
        b.iter(|| black_box(scrubber.scrub_all(examples.clone()).1.examples_touched))
    });
    let cfg = DedupConfig::default();
    g.bench_function("dedup_exact_minhash", |b| {
        b.iter(|| black_box(dedup(examples.clone(), &cfg).unwrap().1.kept))
    });
    g.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, bench);
criterion_main!(benches);
