//! GGML quantization types by name, and the choice of a type a tensor's rows can hold.
//! Used for the QLoRA base ([`crate::Model::load_with`]) and for GGUF export
//! ([`crate::export`]).
//!
//! A GGML block covers `block_size` consecutive elements of one row (32, or 256 for the
//! K-quants), so a row length that is not a multiple of it cannot use that type. llama.cpp
//! (`llama_tensor_get_type` in `src/llama-quant.cpp`) then falls back to a 32-element type of
//! similar size: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0. [`fit`] does the same.

use candle_core::quantized::GgmlDType;

/// The types whet quantizes to, by the names llama.cpp and `whet` configs use.
pub const TYPES: [(&str, GgmlDType); 10] = [
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("q8_0", GgmlDType::Q8_0),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// `"q4_k"` (any case, `Q4_K` too) -> the type; `None` for an unknown name.
pub fn parse(name: &str) -> Option<GgmlDType> {
    let lower = name.to_ascii_lowercase();
    TYPES.iter().find(|(n, _)| *n == lower).map(|(_, t)| *t)
}

/// The lower-case name of a type (`q4_k`).
pub fn name(t: GgmlDType) -> String {
    TYPES
        .iter()
        .find(|(_, x)| *x == t)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| format!("{t:?}").to_ascii_lowercase())
}

/// The names [`parse`] accepts, for error messages.
pub fn names() -> String {
    TYPES.map(|(n, _)| n).join(", ")
}

/// The type a tensor with rows of `row_len` elements gets when `want` is asked for: `want`
/// itself if its blocks tile a row, else llama.cpp's 32-element fallback, else `None` (the
/// row length is not a multiple of 32: keep the tensor unquantized).
pub fn fit(want: GgmlDType, row_len: usize) -> Option<GgmlDType> {
    if row_len.is_multiple_of(want.block_size()) {
        return Some(want);
    }
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => return None,
    };
    row_len
        .is_multiple_of(fallback.block_size())
        .then_some(fallback)
}

/// Bytes one row of `row_len` elements takes in type `t`.
pub fn row_bytes(t: GgmlDType, row_len: usize) -> usize {
    row_len / t.block_size() * t.type_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for (n, t) in TYPES {
            assert_eq!(parse(n), Some(t));
            assert_eq!(parse(&n.to_ascii_uppercase()), Some(t));
            assert_eq!(name(t), n);
        }
        assert_eq!(parse("nf4"), None);
    }

    #[test]
    fn k_quants_fall_back_like_llama_cpp_when_rows_do_not_tile() {
        // SmolLM2-135M: hidden 576 = 2.25 x 256, intermediate 1536 = 6 x 256.
        assert_eq!(fit(GgmlDType::Q4K, 1536), Some(GgmlDType::Q4K));
        assert_eq!(fit(GgmlDType::Q4K, 576), Some(GgmlDType::Q5_0));
        assert_eq!(fit(GgmlDType::Q6K, 576), Some(GgmlDType::Q8_0));
        assert_eq!(fit(GgmlDType::Q4_0, 576), Some(GgmlDType::Q4_0));
        assert_eq!(fit(GgmlDType::Q4_0, 100), None);
        assert_eq!(row_bytes(GgmlDType::Q4_0, 64), 36);
    }
}
