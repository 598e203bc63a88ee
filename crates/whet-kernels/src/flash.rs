//! candle-flash-attn (FlashAttention-2, Dao 2023, arXiv:2307.08691) for the attention that
//! needs no gradient: GPU evaluation and generation (feature `flash-attn`). It is forward
//! only, so training keeps whet's own kernel, whose backward it lacks.
//!
//! whet's mask (causal, plus "a query sees only keys of its own segment") maps onto
//! FlashAttention's causal mask, aligned bottom-right (query `i` at key position
//! `i + S - T`, as whet's), in two cases:
//! - every row is one segment: batched `flash_attn` (this covers generation: a KV-cache step
//!   has T < S and one document per row);
//! - T == S and each segment is one contiguous run of its row: `flash_attn_varlen` with one
//!   sequence per run (packed evaluation rows).
//!
//! Anything else (bf16/f16 only, head dims up to 256 in multiples of 8) goes to whet's kernel.
//! The planning is plain host code, tested on every machine; the call itself needs the GPU.

/// How FlashAttention covers a mask, from the segments of each row.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// One segment per row: batched causal attention.
    Batched,
    /// T == S, segments as contiguous runs: one varlen sequence per run. `cu_seqlens` holds
    /// the run boundaries over the flattened (B * T) rows, `max_len` the longest run.
    Varlen {
        cu_seqlens: Vec<u32>,
        max_len: usize,
    },
}

/// The plan for segments `seg` (B * S values, row-major) and T queries, or `None` when
/// FlashAttention cannot express the mask.
pub(crate) fn plan(seg: &[u32], b: usize, t: usize, s: usize) -> Option<Plan> {
    if b == 0 || t == 0 || t > s || seg.len() != b * s {
        return None;
    }
    let rows = seg.chunks(s);
    if rows.clone().all(|r| r.iter().all(|&x| x == r[0])) {
        return Some(Plan::Batched);
    }
    if t != s {
        return None;
    }
    let mut cu = vec![0u32];
    let mut max_len = 0;
    for (bi, row) in rows.enumerate() {
        let mut seen: Vec<u32> = Vec::new();
        let mut start = 0;
        for j in 1..=s {
            if j == s || row[j] != row[start] {
                // A segment that comes back after another one is not one run.
                if seen.contains(&row[start]) {
                    return None;
                }
                seen.push(row[start]);
                max_len = max_len.max(j - start);
                cu.push(u32::try_from(bi * s + j).ok()?);
                start = j;
            }
        }
    }
    Some(Plan::Varlen {
        cu_seqlens: cu,
        max_len,
    })
}

/// FlashAttention's forward when it applies (see the module docs), else `None`.
/// q: (B, T, NH, D), k and v: (B, S, NKV, D) on CUDA, `seg` the (B, S) segments on the host.
#[cfg(feature = "flash-attn")]
pub(crate) fn forward(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    seg: &[u32],
    scale: f64,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    use candle_core::{DType, Tensor};

    let (b, t, nh, d) = q.dims4()?;
    let (_, s, nkv, _) = k.dims4()?;
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if tracked
        || !q.device().is_cuda()
        || !matches!(q.dtype(), DType::BF16 | DType::F16)
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
        || d % 8 != 0
        || d > 256
        || nkv == 0
        || nh % nkv != 0
    {
        return Ok(None);
    }
    let Some(plan) = plan(seg, b, t, s) else {
        return Ok(None);
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let y = match plan {
        Plan::Batched => candle_flash_attn::flash_attn(&q, &k, &v, scale as f32, true)?,
        Plan::Varlen {
            cu_seqlens,
            max_len,
        } => {
            let cu = Tensor::from_vec(cu_seqlens.clone(), cu_seqlens.len(), q.device())?;
            candle_flash_attn::flash_attn_varlen(
                &q.reshape((b * t, nh, d))?,
                &k.reshape((b * s, nkv, d))?,
                &v.reshape((b * s, nkv, d))?,
                &cu,
                &cu,
                max_len,
                max_len,
                scale as f32,
                true,
            )?
            .reshape((b, t, nh, d))?
        }
    };
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_segment_per_row_is_batched_even_with_a_cache() {
        assert_eq!(plan(&[0, 0, 0, 5, 5, 5], 2, 3, 3), Some(Plan::Batched));
        assert_eq!(plan(&[0; 8], 2, 1, 4), Some(Plan::Batched));
    }

    #[test]
    fn packed_rows_become_one_sequence_per_run() {
        // Row 0: documents of 2 and 3 tokens; row 1: one of 5.
        let seg = [0, 0, 1, 1, 1, 7, 7, 7, 7, 7];
        assert_eq!(
            plan(&seg, 2, 5, 5),
            Some(Plan::Varlen {
                cu_seqlens: vec![0, 2, 5, 10],
                max_len: 5
            })
        );
    }

    #[test]
    fn masks_flash_attention_cannot_express_are_refused() {
        // A segment that comes back: whet lets its tokens see each other, varlen would not.
        assert_eq!(plan(&[0, 1, 0], 1, 3, 3), None);
        // Several documents with a KV cache (T < S).
        assert_eq!(plan(&[0, 0, 1, 1], 1, 2, 4), None);
        // Shapes that do not add up.
        assert_eq!(plan(&[0, 0, 0], 1, 4, 3), None);
        assert_eq!(plan(&[0, 0], 1, 2, 3), None);
    }
}
