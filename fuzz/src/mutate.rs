//! The mutation engine: a seeded generator and the mutations it stacks on a corpus entry.
//!
//! Everything here is a pure function of the seed, so iteration `i` of a run with seed `s`
//! mutates the same way on every machine. Generic mutations (bit and byte flips, interesting
//! integers at random offsets, chunk insert / delete / duplicate, splices with other corpus
//! entries) apply to every target; [`Structure`] adds mutations that know the input's layout:
//! GGUF header fields, safetensors' JSON header, and tokens of text formats.

/// What a target's inputs look like, for the structure-aware mutations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// Arbitrary bytes (Parquet, Arrow IPC).
    Binary,
    /// A GGUF file: header counts, string lengths, value and tensor types, dims and offsets.
    Gguf,
    /// A safetensors file: an 8-byte header length, then a JSON header, then data.
    Safetensors,
    /// Text with the tokens of its grammar (JSON, TOML, CSV, Jinja).
    Text(&'static [&'static str]),
}

/// SplitMix64: small, fast, and good enough to drive mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The generator for iteration `iter` of the run seeded with `seed`.
    pub fn for_iteration(seed: u64, iter: u64) -> Self {
        let mut r = Rng(seed ^ iter.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that sit on the edges parsers get wrong.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    31,
    32,
    64,
    100,
    127,
    128,
    255,
    256,
    1000,
    1024,
    4096,
    32767,
    32768,
    65535,
    65536,
    (1 << 24) + 1,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    (1 << 32) + 16,
    1 << 40,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// Numbers as text, for text formats.
const INTERESTING_TEXT: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "255",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e309",
    "-1e309",
    "1e-320",
    "0.5",
    "nan",
    "inf",
    "-inf",
    "NaN",
    "Infinity",
    "1000000000000",
];

/// Largest input the engine produces.
pub const MAX_INPUT: usize = 1 << 20;

/// One mutated input: a corpus entry with 1 to 8 stacked mutations.
pub fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], structure: Structure) -> Vec<u8> {
    let mut data = rng.pick(corpus).clone();
    let rounds = 1 + (rng.next_u64().trailing_zeros() as usize).min(7);
    for _ in 0..rounds {
        let structured = match structure {
            Structure::Binary => false,
            _ => rng.chance(2),
        };
        if structured {
            match structure {
                Structure::Gguf => gguf_field(rng, &mut data),
                Structure::Safetensors => safetensors_header(rng, &mut data),
                Structure::Text(tokens) => text(rng, &mut data, tokens),
                Structure::Binary => unreachable!("binary inputs take generic mutations only"),
            }
        } else {
            generic(rng, &mut data, corpus);
        }
        data.truncate(MAX_INPUT);
    }
    data
}

/// One layout-blind mutation.
pub fn generic(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = data[i].wrapping_add(if rng.chance(2) { 1 } else { 255 });
        }
        3 | 4 if len > 0 => {
            let at = rng.below(len);
            let v = *rng.pick(INTERESTING);
            put_int(rng, data, at, v);
        }
        5 => {
            // Insert random bytes, or one byte repeated.
            let at = rng.below(len + 1);
            let max = if rng.chance(8) { 4096 } else { 16 };
            let n = 1 + rng.below(max);
            let chunk: Vec<u8> = if rng.chance(2) {
                vec![rng.next_u64() as u8; n]
            } else {
                (0..n).map(|_| rng.next_u64() as u8).collect()
            };
            data.splice(at..at, chunk);
        }
        6 if len > 0 => {
            let at = rng.below(len);
            let max = if rng.chance(4) { len } else { 32 };
            let n = 1 + rng.below((len - at).min(max));
            data.drain(at..at + n);
        }
        7 if len > 0 => {
            // Duplicate a chunk somewhere else (repeated fields, nested structures).
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(256));
            let chunk = data[at..at + n].to_vec();
            let to = rng.below(len + 1);
            let times = if rng.chance(4) { 1 + rng.below(64) } else { 1 };
            for _ in 0..times {
                data.splice(to..to, chunk.iter().copied());
            }
        }
        8 if !corpus.is_empty() => {
            // Splice: a prefix of this input and a suffix of another.
            let other = rng.pick(corpus);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        9 if len > 0 => {
            let keep = rng.below(len);
            data.truncate(keep);
        }
        _ if len > 1 => {
            // Overwrite a chunk with bytes from elsewhere in the input.
            let from = rng.below(len);
            let to = rng.below(len);
            let n = 1 + rng.below((len - from).min(len - to).min(64));
            let chunk = data[from..from + n].to_vec();
            data[to..to + n].copy_from_slice(&chunk);
        }
        _ => data.push(rng.next_u64() as u8),
    }
}

/// Writes `v` at `at` as 1, 2, 4 or 8 bytes, little or big endian, negated sometimes; clipped at
/// the end of `data`.
fn put_int(rng: &mut Rng, data: &mut [u8], at: usize, v: u64) {
    let width = *rng.pick(&[1usize, 2, 4, 8]);
    let v = if rng.chance(4) { v.wrapping_neg() } else { v };
    let bytes = if rng.chance(4) {
        v.to_be_bytes()[8 - width..].to_vec()
    } else {
        v.to_le_bytes()[..width].to_vec()
    };
    let end = (at + width).min(data.len());
    data[at..end].copy_from_slice(&bytes[..end - at]);
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// A field of a GGUF header: where it is and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufField {
    TensorCount,
    KvCount,
    /// A string's length prefix (key, value, tensor name).
    Length,
    /// A metadata value type or an array's element type.
    ValueType,
    /// An array's element count.
    ArrayCount,
    /// A scalar metadata value (alignment, counts, token ids).
    Scalar(usize),
    Dims,
    Dim,
    TensorType,
    TensorOffset,
}

/// The header fields of a GGUF file as `(offset, width, field)`, as far as the header parses;
/// a malformed header yields the fields before the fault.
pub fn gguf_fields(data: &[u8]) -> Vec<(usize, usize, GgufField)> {
    let mut out = Vec::new();
    let _ = walk_gguf(data, &mut out);
    out
}

fn walk_gguf(d: &[u8], out: &mut Vec<(usize, usize, GgufField)>) -> Option<()> {
    if d.len() < 8 || &d[..4] != b"GGUF" {
        return None;
    }
    let version = u32::from_le_bytes(d[4..8].try_into().ok()?);
    let w = if version == 1 { 4 } else { 8 };
    let read = |at: usize, n: usize| -> Option<u64> {
        let b = d.get(at..at + n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let mut at = 8;
    let tensors = read(at, w)?;
    out.push((at, w, GgufField::TensorCount));
    at += w;
    let kvs = read(at, w)?;
    out.push((at, w, GgufField::KvCount));
    at += w;
    // Bound the walk: a mutated count must not make the mutator itself slow.
    let string = |at: &mut usize, out: &mut Vec<_>| -> Option<()> {
        let n = read(*at, w)? as usize;
        out.push((*at, w, GgufField::Length));
        *at = at.checked_add(w)?.checked_add(n)?;
        (*at <= d.len()).then_some(())
    };
    fn value(
        d: &[u8],
        w: usize,
        ty: u64,
        at: &mut usize,
        out: &mut Vec<(usize, usize, GgufField)>,
        depth: usize,
    ) -> Option<()> {
        let read = |at: usize, n: usize| -> Option<u64> {
            let b = d.get(at..at + n)?;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(b);
            Some(u64::from_le_bytes(v))
        };
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = read(*at, w)? as usize;
                out.push((*at, w, GgufField::Length));
                *at = at.checked_add(w)?.checked_add(n)?;
                return (*at <= d.len()).then_some(());
            }
            9 if depth < 3 => {
                let elem = read(*at, 4)?;
                out.push((*at, 4, GgufField::ValueType));
                *at += 4;
                let count = read(*at, w)?;
                out.push((*at, w, GgufField::ArrayCount));
                *at += w;
                for _ in 0..count.min(1 << 16) {
                    value(d, w, elem, at, out, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        if at.checked_add(size)? > d.len() {
            return None;
        }
        if depth == 0 {
            out.push((*at, size, GgufField::Scalar(size)));
        }
        *at += size;
        (*at <= d.len()).then_some(())
    }
    for _ in 0..kvs.min(4096) {
        string(&mut at, out)?;
        let ty = read(at, 4)?;
        out.push((at, 4, GgufField::ValueType));
        at += 4;
        value(d, w, ty, &mut at, out, 0)?;
    }
    for _ in 0..tensors.min(4096) {
        string(&mut at, out)?;
        let dims = read(at, 4)?;
        out.push((at, 4, GgufField::Dims));
        at += 4;
        for _ in 0..dims.min(8) {
            read(at, w)?;
            out.push((at, w, GgufField::Dim));
            at += w;
        }
        read(at, 4)?;
        out.push((at, 4, GgufField::TensorType));
        at += 4;
        read(at, 8)?;
        out.push((at, 8, GgufField::TensorOffset));
        at += 8;
    }
    Some(())
}

/// Rewrites one header field with a value chosen for what it means.
fn gguf_field(rng: &mut Rng, data: &mut Vec<u8>) {
    let fields = gguf_fields(data);
    if fields.is_empty() {
        return generic(rng, data, &[]);
    }
    let (at, width, field) = *rng.pick(&fields);
    if at + width > data.len() {
        return generic(rng, data, &[]);
    }
    let old = {
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&data[at..at + width]);
        u64::from_le_bytes(v)
    };
    let len = data.len() as u64;
    let v = match (field, rng.below(4)) {
        (GgufField::ValueType | GgufField::TensorType, 0) => rng.below(40) as u64,
        (GgufField::ValueType, _) => *rng.pick(&[0u64, 4, 5, 6, 8, 9, 10, 12, 13, 255]),
        (GgufField::TensorType, _) => *rng.pick(&[0u64, 1, 2, 8, 9, 12, 14, 15, 30, 39]),
        (GgufField::Dims, _) => rng.below(9) as u64,
        (GgufField::Dim | GgufField::Scalar(_), 0) => old.wrapping_mul(2),
        (GgufField::TensorOffset, 0) => old.wrapping_add(*rng.pick(&[1u64, 4, 32, 4096])),
        (_, 1) => old.wrapping_add(1),
        (_, 2) => old.wrapping_sub(1),
        _ if rng.chance(3) => len
            .wrapping_sub(at as u64)
            .wrapping_add(rng.below(16) as u64),
        _ => *rng.pick(INTERESTING),
    };
    data[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// Mutates the JSON header of a safetensors file (and keeps its length prefix right, mostly).
fn safetensors_header(rng: &mut Rng, data: &mut Vec<u8>) {
    if data.len() < 8 {
        return generic(rng, data, &[]);
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if rng.chance(6) {
        let v = match rng.below(3) {
            0 => n.wrapping_add(1),
            1 => n.wrapping_sub(1),
            _ => *rng.pick(INTERESTING),
        };
        data[..8].copy_from_slice(&v.to_le_bytes());
        return;
    }
    let end = usize::try_from(n)
        .map_or(data.len(), |n| n.saturating_add(8))
        .min(data.len());
    let mut header = data[8..end].to_vec();
    text(rng, &mut header, JSON_TOKENS);
    let tail = data[end..].to_vec();
    data.truncate(8);
    data[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
    data.extend_from_slice(&header);
    data.extend_from_slice(&tail);
}

// ---------------------------------------------------------------------------------------------
// text

pub const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "false",
    "\"\"",
    "{}",
    "[]",
    "\\",
    "\\u0000",
    "\\ud800",
    "\"\\ud83d\\ude00\"",
    "[[[[[[[[[[",
    "]]]]]]]]]]",
    "{\"a\":",
    "\n",
    "\"F32\"",
    "\"BF16\"",
    "\"F16\"",
    "\"I64\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"__metadata__\"",
    "\"messages\"",
    "\"role\"",
    "\"content\"",
    "\"text\"",
    "\"prompt\"",
    "\"completion\"",
    "\"conversations\"",
    "\"from\"",
    "\"value\"",
    "\"instruction\"",
    "\"output\"",
    "\"system\"",
    "\"user\"",
    "\"assistant\"",
    "\"tool\"",
    "\"head_dim\"",
    "\"hidden_size\"",
    "\"rope_scaling\"",
    "\"rope_type\"",
    "\"llama3\"",
    "\"factor\"",
];

pub const TOML_TOKENS: &[&str] = &[
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "#",
    "inf",
    "nan",
    "-inf",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "0x7fffffffffffffff",
    "[train]",
    "[data]",
    "[lora]",
    "[model]",
    "[eval]",
    "[output]",
    "epochs",
    "micro_batch",
    "grad_accum",
    "lr",
    "max_len",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "k_folds",
    "method",
    "max_steps",
    "quantize",
    "\0train.epochs=",
    "\0lora.r=",
    "\0data.max_len=",
    "\0train.lr=",
    "\0model.quantize=",
    "\0output.dir=",
    "\0a.b.c=",
    "\0=",
];

pub const CSV_TOKENS: &[&str] = &[
    ",",
    "\"",
    "\"\"",
    "\n",
    "\r\n",
    "\r",
    "text",
    "prompt",
    "completion",
    "messages",
    "[{\"\"role\"\":\"\"user\"\",\"\"content\"\":\"\"x\"\"}]",
    "\u{feff}",
    "\0",
];

pub const JINJA_TOKENS: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{%-",
    "-%}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{% if ",
    "{% endif %}",
    "{% else %}",
    "{% set ",
    "messages",
    "message['content']",
    "m.role",
    "loop.index",
    "loop.last",
    "|tojson",
    "|length",
    "|trim",
    "|join(', ')",
    "|upper",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "raise_exception('x')",
    "{% generation %}",
    "{% endgeneration %}",
    "range(3)",
    "namespace(a=1)",
    "{% macro f(x) %}{{ x }}{% endmacro %}",
    "f(1)",
    ".strip()",
    ".split(' ')",
    ".startswith('a')",
    "strftime_now('%Y')",
    "[0]",
    "[-1]",
    "[1:]",
    "~",
    " + ",
    " * ",
    "\0",
];

/// One token-aware edit of a text input.
fn text(rng: &mut Rng, data: &mut Vec<u8>, tokens: &[&str]) {
    let len = data.len();
    match rng.below(6) {
        0 | 1 => {
            let at = rng.below(len + 1);
            let t = rng.pick(tokens).as_bytes().to_vec();
            data.splice(at..at, t);
        }
        2 => {
            // Replace a run of digits with an edge-case number.
            let digits: Vec<usize> = (0..len).filter(|&i| data[i].is_ascii_digit()).collect();
            if digits.is_empty() {
                return generic(rng, data, &[]);
            }
            let start = *rng.pick(&digits);
            let mut end = start;
            while end < len && (data[end].is_ascii_digit() || data[end] == b'.') {
                end += 1;
            }
            let n = rng.pick(INTERESTING_TEXT).as_bytes().to_vec();
            data.splice(start..end, n);
        }
        3 | 4 => {
            // Delete, duplicate or swap lines.
            let lines: Vec<usize> = std::iter::once(0)
                .chain((0..len).filter(|&i| data[i] == b'\n').map(|i| i + 1))
                .collect();
            let a = *rng.pick(&lines);
            let a_end = data[a..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(len, |p| a + p + 1);
            let line = data[a..a_end].to_vec();
            match rng.below(3) {
                0 => {
                    data.drain(a..a_end);
                }
                1 => {
                    let times = if rng.chance(4) { 1 + rng.below(100) } else { 1 };
                    for _ in 0..times {
                        data.splice(a..a, line.iter().copied());
                    }
                }
                _ => {
                    let to = *rng.pick(&lines);
                    if to <= a {
                        data.drain(a..a_end);
                        data.splice(to..to, line);
                    }
                }
            }
        }
        _ => {
            // Nest: wrap a random range in a token pair of this grammar.
            let (open, close) = *rng.pick(&[("[", "]"), ("{", "}"), ("\"", "\""), ("(", ")")]);
            let a = rng.below(len + 1);
            let b = a + rng.below(len - a + 1);
            let max = if rng.chance(8) { 200 } else { 3 };
            let times = 1 + rng.below(max);
            data.splice(b..b, close.repeat(times).into_bytes());
            data.splice(a..a, open.repeat(times).into_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_mutates_the_same_way() {
        let corpus = vec![b"{\"text\": \"hello 123\"}\n".to_vec(), b"GGUF".to_vec()];
        for structure in [
            Structure::Binary,
            Structure::Gguf,
            Structure::Safetensors,
            Structure::Text(JSON_TOKENS),
        ] {
            let run = |seed| {
                (0..200)
                    .map(|i| mutate(&mut Rng::for_iteration(seed, i), &corpus, structure))
                    .collect::<Vec<_>>()
            };
            let (a, b, c) = (run(7), run(7), run(8));
            assert_eq!(a, b);
            assert_ne!(a, c);
            // Mutations change the input most of the time.
            let changed = a.iter().filter(|m| !corpus.contains(m)).count();
            assert!(changed > 150, "{structure:?}: {changed} of 200 changed");
        }
    }

    #[test]
    fn gguf_walker_finds_header_fields() {
        // v3, 1 tensor, 1 kv: "k" = u32 7; tensor "t" 1 dim [4] F32 at 0.
        let mut d = b"GGUF".to_vec();
        d.extend_from_slice(&3u32.to_le_bytes());
        d.extend_from_slice(&1u64.to_le_bytes());
        d.extend_from_slice(&1u64.to_le_bytes());
        d.extend_from_slice(&1u64.to_le_bytes());
        d.push(b'k');
        d.extend_from_slice(&4u32.to_le_bytes());
        d.extend_from_slice(&7u32.to_le_bytes());
        d.extend_from_slice(&1u64.to_le_bytes());
        d.push(b't');
        d.extend_from_slice(&1u32.to_le_bytes());
        d.extend_from_slice(&4u64.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        d.extend_from_slice(&0u64.to_le_bytes());
        let kinds: Vec<GgufField> = gguf_fields(&d).into_iter().map(|f| f.2).collect();
        assert_eq!(
            kinds,
            [
                GgufField::TensorCount,
                GgufField::KvCount,
                GgufField::Length,
                GgufField::ValueType,
                GgufField::Scalar(4),
                GgufField::Length,
                GgufField::Dims,
                GgufField::Dim,
                GgufField::TensorType,
                GgufField::TensorOffset,
            ]
        );
        assert_eq!(gguf_fields(&d)[4].0, 8 + 8 + 8 + 8 + 1 + 4);
        // A cut header yields only fields that lie inside it (the mutator writes into them).
        for cut in 0..d.len() {
            for (at, width, field) in gguf_fields(&d[..cut]) {
                assert!(at + width <= cut, "{field:?} at {at} in {cut} bytes");
            }
        }
    }
}
