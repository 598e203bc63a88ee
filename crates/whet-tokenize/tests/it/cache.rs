//! The Parquet cache: hit when nothing changed, miss when anything did, atomic writes.

use std::path::{Path, PathBuf};

use whet_data::Role;
use whet_tokenize::{
    Cache, CacheStatus, CachedDataset, FingerprintBuilder, PackConfig, TokenizeConfig, Tokenizer,
    Truncation, pack,
};

use crate::common::{conv, load, msg, pc, text};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("whet-tok-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build(
    tok: &Tokenizer,
    tcfg: &TokenizeConfig,
    pcfg: &PackConfig,
) -> whet_tokenize::Result<CachedDataset> {
    let exs = vec![
        text(1, "The quick brown fox jumps over the lazy dog."),
        pc(2, "Q: capital of France?\nA:", " Paris."),
        conv(
            3,
            vec![msg(Role::User, "Hi"), msg(Role::Assistant, "Hello there!")],
        ),
        conv(4, vec![msg(Role::User, "no answer")]),
    ];
    let (tokenized, tokenize_report) = tok.tokenize_examples(&exs, tcfg)?;
    let (rows, pack_report) = pack(&tokenized, pcfg)?;
    Ok(CachedDataset {
        rows,
        tokenize_report,
        pack_report: Some(pack_report),
    })
}

fn key(
    data: &Path,
    tok: &Tokenizer,
    tcfg: &TokenizeConfig,
    pcfg: &PackConfig,
) -> whet_tokenize::Fingerprint {
    FingerprintBuilder::new()
        .data_file(data)
        .unwrap()
        .tokenizer(tok)
        .settings("tokenize", tcfg)
        .unwrap()
        .settings("pack", pcfg)
        .unwrap()
        .finish()
}

#[test]
fn hit_when_unchanged_miss_when_a_setting_changes() {
    let dir = TempDir::new("cache");
    let data = dir.0.join("train.jsonl");
    std::fs::write(&data, "{}\n").unwrap();
    let cache = Cache::new(dir.0.join("cache"));
    let tok = load("smollm2");
    let tcfg = TokenizeConfig {
        max_len: Some(64),
        ..TokenizeConfig::default()
    };
    let pcfg = PackConfig {
        seq_len: 64,
        pad_id: tok.pad_id(),
        truncation: Truncation::Right,
        bos_id: tok.bos_id(),
    };

    let fp = key(&data, &tok, &tcfg, &pcfg);
    assert_eq!(fp.as_str().len(), 32);
    let mut builds = 0;
    let (first, st) = cache
        .load_or_build(&fp, || {
            builds += 1;
            build(&tok, &tcfg, &pcfg)
        })
        .unwrap();
    assert_eq!(st, CacheStatus::Miss);
    assert!(cache.path_for(&fp).is_file());
    assert_eq!(first.tokenize_report.rows_without_supervision, 1);

    // Same inputs: same key, read back from disk identical, builder not called.
    let fp2 = key(&data, &tok, &tcfg, &pcfg);
    assert_eq!(fp, fp2);
    let (second, st) = cache
        .load_or_build(&fp2, || {
            builds += 1;
            build(&tok, &tcfg, &pcfg)
        })
        .unwrap();
    assert_eq!(st, CacheStatus::Hit);
    assert_eq!(builds, 1);
    assert_eq!(second, first);

    // Any setting changes the key.
    let tcfg_last = TokenizeConfig {
        assistant_turns: whet_tokenize::AssistantTurns::Last,
        ..tcfg.clone()
    };
    let pcfg_long = PackConfig {
        seq_len: 128,
        ..pcfg.clone()
    };
    let tcfg_left = TokenizeConfig {
        truncation: Truncation::Left,
        ..tcfg.clone()
    };
    let keys = [
        key(&data, &tok, &tcfg_last, &pcfg),
        key(&data, &tok, &tcfg, &pcfg_long),
        key(&data, &tok, &tcfg_left, &pcfg),
        key(&data, &load("qwen2"), &tcfg, &pcfg),
    ];
    for k in &keys {
        assert_ne!(k, &fp);
    }
    let (_, st) = cache
        .load_or_build(&keys[1], || build(&tok, &tcfg, &pcfg_long))
        .unwrap();
    assert_eq!(st, CacheStatus::Miss);
    // `parallel` does not change the output, so it does not change the key.
    let tcfg_seq = TokenizeConfig {
        parallel: false,
        ..tcfg.clone()
    };
    assert_eq!(key(&data, &tok, &tcfg_seq, &pcfg), fp);

    // A changed data file (size) changes the key.
    std::fs::write(&data, "{}\n{}\n").unwrap();
    assert_ne!(key(&data, &tok, &tcfg, &pcfg), fp);

    // A changed chat template changes the key.
    let mut tok2 = load("smollm2");
    tok2.set_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
        .unwrap();
    assert_ne!(
        FingerprintBuilder::new().tokenizer(&tok2).finish(),
        FingerprintBuilder::new().tokenizer(&tok).finish()
    );

    // No temporary files are left behind.
    for entry in std::fs::read_dir(cache.dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name.ends_with(".parquet") && !name.starts_with('.'),
            "{name}"
        );
    }
}

#[test]
fn content_fingerprint_ignores_touches_but_not_edits() {
    let dir = TempDir::new("content");
    let a = dir.0.join("a.jsonl");
    let b = dir.0.join("b.jsonl");
    std::fs::write(&a, "same bytes").unwrap();
    std::fs::write(&b, "same bytes").unwrap();
    let fa = FingerprintBuilder::new()
        .data_file_contents(&a)
        .unwrap()
        .finish();
    let fb = FingerprintBuilder::new()
        .data_file_contents(&b)
        .unwrap()
        .finish();
    assert_eq!(fa, fb);
    std::fs::write(&b, "other bytes").unwrap();
    assert_ne!(
        fa,
        FingerprintBuilder::new()
            .data_file_contents(&b)
            .unwrap()
            .finish()
    );
    assert!(
        FingerprintBuilder::new()
            .data_file(dir.0.join("missing"))
            .is_err()
    );
}

#[test]
fn unreadable_cache_file_is_rebuilt() {
    let dir = TempDir::new("corrupt");
    let cache = Cache::new(&dir.0);
    let tok = load("llama3");
    let tcfg = TokenizeConfig::default();
    let pcfg = PackConfig {
        seq_len: 48,
        pad_id: tok.pad_id(),
        truncation: Truncation::Left,
        bos_id: tok.bos_id(),
    };
    let fp = FingerprintBuilder::new()
        .tokenizer(&tok)
        .settings("t", &tcfg)
        .unwrap()
        .finish();
    std::fs::write(cache.path_for(&fp), b"not parquet").unwrap();
    assert!(cache.load(&fp).is_err());
    let (built, st) = cache
        .load_or_build(&fp, || build(&tok, &tcfg, &pcfg))
        .unwrap();
    assert_eq!(st, CacheStatus::Rebuilt);
    let (again, st) = cache
        .load_or_build(&fp, || build(&tok, &tcfg, &pcfg))
        .unwrap();
    assert_eq!(st, CacheStatus::Hit);
    assert_eq!(again, built);
    assert!(built.rows.iter().all(|r| r.len() == 48));
}
