use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use whet_kernels::{attention, reference};

use crate::common::*;

fn segments(rows: &[Vec<u32>]) -> Result<Tensor> {
    let s = rows[0].len();
    Ok(Tensor::from_vec(
        rows.concat(),
        (rows.len(), s),
        &Device::Cpu,
    )?)
}

/// Documents of the given lengths, numbered from 0, packed into one row.
fn docs(lens: &[usize]) -> Vec<u32> {
    lens.iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n))
        .collect()
}

struct Case {
    b: usize,
    t: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    d: usize,
    seg: Vec<Vec<u32>>,
    /// Sliding window, keys.
    window: Option<usize>,
}

impl Case {
    fn inputs(&self, seed: u64, dtype: DType) -> Result<Vec<Tensor>> {
        Ok(vec![
            rand(&[self.b, self.t, self.nh, self.d], seed, dtype)?,
            rand(&[self.b, self.s, self.nkv, self.d], seed + 1, dtype)?,
            rand(&[self.b, self.s, self.nkv, self.d], seed + 2, dtype)?,
        ])
    }

    fn check(&self, what: &str) -> Result<()> {
        let seg = segments(&self.seg)?;
        let scale = 1.0 / (self.d as f64).sqrt();
        let fast = |a: &[Tensor]| attention(&a[0], &a[1], &a[2], &seg, scale, self.window);
        let refr =
            |a: &[Tensor]| reference::attention(&a[0], &a[1], &a[2], &seg, scale, self.window);
        let x = self.inputs(11, DType::F32)?;
        check_against_reference(what, &fast, &refr, &x, &[true, true, true], 1e-5, 1e-5)?;
        check_against_reference(
            &format!("{what}, k frozen"),
            &fast,
            &refr,
            &x,
            &[true, false, true],
            1e-5,
            1e-5,
        )
    }
}

#[test]
fn packed_gqa_matches_reference() -> Result<()> {
    Case {
        b: 2,
        t: 20,
        s: 20,
        nh: 4,
        nkv: 2,
        d: 8,
        window: None,
        seg: vec![docs(&[9, 11]), vec![3; 20]],
    }
    .check("packed gqa")
}

#[test]
fn long_rows_span_several_tiles() -> Result<()> {
    // S = 150 > one key tile (64) and one query block (16); three documents.
    Case {
        b: 1,
        t: 150,
        s: 150,
        nh: 2,
        nkv: 1,
        d: 16,
        window: None,
        seg: vec![docs(&[40, 70, 40])],
    }
    .check("three docs, 150 keys")
}

/// The golden llama3_tiny batch: two rows of 100 tokens, one packing documents of 40 and 60,
/// GQA 4:2. The backward's query chunks then end in a partial query block whose rows see only
/// some key tiles; stale probabilities from an earlier tile once leaked into dk/dv there.
#[test]
fn partial_query_blocks_with_packed_documents() -> Result<()> {
    Case {
        b: 2,
        t: 100,
        s: 100,
        nh: 4,
        nkv: 2,
        d: 16,
        window: None,
        seg: vec![vec![0; 100], docs(&[40, 60])],
    }
    .check("two rows of 100, docs 40 + 60")
}

#[test]
fn query_offset_matches_reference() -> Result<()> {
    // T < S: the queries are the last T positions (a chunk of a KV-cached sequence).
    Case {
        b: 2,
        t: 5,
        s: 13,
        nh: 4,
        nkv: 2,
        d: 8,
        window: None,
        seg: vec![docs(&[6, 7]), docs(&[10, 3])],
    }
    .check("T = 5, S = 13")?;
    // Decode step: one query against the whole cache.
    Case {
        b: 2,
        t: 1,
        s: 9,
        nh: 4,
        nkv: 2,
        d: 8,
        window: None,
        seg: vec![docs(&[4, 5]), vec![0; 9]],
    }
    .check("decode, T = 1")?;
    // Longer than a tile, offset.
    Case {
        b: 1,
        t: 20,
        s: 100,
        nh: 2,
        nkv: 2,
        d: 8,
        window: None,
        seg: vec![docs(&[30, 70])],
    }
    .check("T = 20, S = 100")
}

#[test]
fn reused_segment_ids_match_reference() -> Result<()> {
    // An id that comes back after another document (not one run per id): the per-key path.
    let row = [0, 0, 1, 1, 1, 0, 0, 2, 2, 1, 1, 0].to_vec();
    Case {
        b: 1,
        t: 12,
        s: 12,
        nh: 3,
        nkv: 3,
        d: 4,
        window: None,
        seg: vec![row],
    }
    .check("reused ids")?;
    // The same with an offset and a block of keys larger than a tile.
    let row: Vec<u32> = (0..90).map(|j| ((j / 7) % 3) as u32).collect();
    Case {
        b: 1,
        t: 30,
        s: 90,
        nh: 2,
        nkv: 1,
        d: 8,
        window: None,
        seg: vec![row],
    }
    .check("reused ids, offset")
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let case = Case {
        b: 1,
        t: 5,
        s: 7,
        nh: 4,
        nkv: 2,
        d: 4,
        window: None,
        seg: vec![docs(&[3, 4])],
    };
    let seg = segments(&case.seg)?;
    let f = |a: &[Tensor]| attention(&a[0], &a[1], &a[2], &seg, 0.5, None);
    let x = case.inputs(21, DType::F64)?;
    check_finite_differences("attention dq", &f, &x, 0, 80, 1e-6)?;
    check_finite_differences("attention dk", &f, &x, 1, 56, 1e-6)?;
    check_finite_differences("attention dv", &f, &x, 2, 56, 1e-6)
}

#[test]
fn no_attention_across_documents() -> Result<()> {
    let (t, nh, nkv, d) = (24, 4, 2, 8);
    let seg = segments(&[docs(&[10, 14])])?;
    let q = rand(&[1, t, nh, d], 31, DType::F32)?;
    let k = rand(&[1, t, nkv, d], 32, DType::F32)?;
    let v = rand(&[1, t, nkv, d], 33, DType::F32)?;
    let out = attention(&q, &k, &v, &seg, 0.3, None)?;
    // Change document 0's keys and values: document 1's outputs must not move at all.
    let bump = (Tensor::ones((1, 10, nkv, d), DType::F32, &Device::Cpu)? * 5.0)?;
    let k2 = Tensor::cat(&[(k.narrow(1, 0, 10)? + &bump)?, k.narrow(1, 10, 14)?], 1)?;
    let v2 = Tensor::cat(&[(v.narrow(1, 0, 10)? - &bump)?, v.narrow(1, 10, 14)?], 1)?;
    let out2 = attention(&q, &k2, &v2, &seg, 0.3, None)?;
    let diff = (out.narrow(1, 10, 14)? - out2.narrow(1, 10, 14)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "document 1 saw document 0");
    let moved = (out.narrow(1, 0, 10)? - out2.narrow(1, 0, 10)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        moved > 1e-3,
        "document 0's outputs should depend on its own keys"
    );
    // And no gradient flows from document 1's outputs into document 0's keys/values.
    let (kv, vv) = (Var::from_tensor(&k)?, Var::from_tensor(&v)?);
    let out = attention(&q, kv.as_tensor(), vv.as_tensor(), &seg, 0.3, None)?;
    let loss = (out.narrow(1, 10, 14)? * weighting(&out.narrow(1, 10, 14)?)?)?.sum_all()?;
    let g = loss.backward()?;
    for (name, var) in [("dk", &kv), ("dv", &vv)] {
        let gr = g.get(var.as_tensor()).expect("gradient");
        let doc0 = gr.narrow(1, 0, 10)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let doc1 = gr.narrow(1, 10, 14)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(doc0, 0.0, "{name}: gradient leaked into document 0");
        assert!(doc1 > 0.0, "{name}: document 1 should get a gradient");
    }
    Ok(())
}

/// Sliding windows (Mistral, Gemma 3's local layers): shorter than the documents, across key
/// tiles, with packing, reused ids, a query offset and a decode step, fused against the
/// reference's dense mask, values and gradients.
#[test]
fn sliding_window_matches_reference() -> Result<()> {
    let cases = [
        (1, 24, 24, 4, 2, 8, docs(&[10, 14]), 6, "two docs, window 6"),
        (
            1,
            150,
            150,
            2,
            1,
            16,
            docs(&[40, 110]),
            70,
            "window 70 across tiles",
        ),
        (
            1,
            150,
            150,
            2,
            1,
            16,
            docs(&[150]),
            1,
            "window 1: each query sees itself",
        ),
        (
            1,
            30,
            90,
            2,
            1,
            8,
            (0..90).map(|j| ((j / 7) % 3) as u32).collect(),
            20,
            "reused ids, offset",
        ),
        (2, 1, 40, 4, 2, 8, docs(&[40]), 16, "decode step"),
    ];
    for (b, t, s, nh, nkv, d, row, w, what) in cases {
        Case {
            b,
            t,
            s,
            nh,
            nkv,
            d,
            window: Some(w),
            seg: vec![row; b],
        }
        .check(what)?;
    }
    Ok(())
}

#[test]
fn sliding_window_finite_differences_f64() -> Result<()> {
    let case = Case {
        b: 1,
        t: 9,
        s: 9,
        nh: 2,
        nkv: 1,
        d: 4,
        window: Some(3),
        seg: vec![docs(&[4, 5])],
    };
    let seg = segments(&case.seg)?;
    let f = |a: &[Tensor]| attention(&a[0], &a[1], &a[2], &seg, 0.5, Some(3));
    let x = case.inputs(23, DType::F64)?;
    check_finite_differences("windowed attention dq", &f, &x, 0, 72, 1e-6)?;
    check_finite_differences("windowed attention dk", &f, &x, 1, 36, 1e-6)?;
    check_finite_differences("windowed attention dv", &f, &x, 2, 36, 1e-6)
}

/// A query sees exactly its `w` latest keys: keys further back never move its output, and a
/// window as long as the document is the plain causal mask.
#[test]
fn sliding_window_limits_each_query() -> Result<()> {
    let (t, nh, d, w) = (40, 2, 8, 8);
    let seg = Tensor::zeros((1, t), DType::U32, &Device::Cpu)?;
    let q = rand(&[1, t, nh, d], 41, DType::F32)?;
    let k = rand(&[1, t, nh, d], 42, DType::F32)?;
    let v = rand(&[1, t, nh, d], 43, DType::F32)?;
    let out = attention(&q, &k, &v, &seg, 0.3, Some(w))?;
    // Move keys and values 0..10: queries 17.. (whose windows start at 10 or later) stay.
    let bump = (Tensor::ones((1, 10, nh, d), DType::F32, &Device::Cpu)? * 5.0)?;
    let k2 = Tensor::cat(
        &[(k.narrow(1, 0, 10)? + &bump)?, k.narrow(1, 10, t - 10)?],
        1,
    )?;
    let v2 = Tensor::cat(
        &[(v.narrow(1, 0, 10)? - &bump)?, v.narrow(1, 10, t - 10)?],
        1,
    )?;
    let out2 = attention(&q, &k2, &v2, &seg, 0.3, Some(w))?;
    let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    };
    assert_eq!(
        diff(&out.narrow(1, 17, t - 17)?, &out2.narrow(1, 17, t - 17)?)?,
        0.0
    );
    // Query 16's window is keys 9..=16: it moves.
    assert!(diff(&out.narrow(1, 16, 1)?, &out2.narrow(1, 16, 1)?)? > 1e-3);
    let full = attention(&q, &k, &v, &seg, 0.3, None)?;
    assert_eq!(
        diff(&attention(&q, &k, &v, &seg, 0.3, Some(t))?, &full)?,
        0.0
    );
    assert!(diff(&out, &full)? > 1e-3);
    Ok(())
}
