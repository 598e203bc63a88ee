//! candle's backward as whet builds it (candle-core patched to store a tensor's first gradient
//! instead of adding it to zeros, `third_party/README.md`): exact gradients for tensors used
//! once, several times, broadcast, reshaped and transposed, and gradients that are views.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_vec1::<f64>()?)
}

#[test]
fn first_and_accumulated_gradients_are_exact() -> Result<()> {
    let dev = Device::Cpu;
    let av = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let bv = [0.5, -1.0, 2.0];
    let a = Var::from_vec(av.to_vec(), (2, 3), &dev)?;
    let b = Var::from_vec(bv.to_vec(), (1, 3), &dev)?;
    let c = Var::from_vec(vec![7.0f64; 6], (2, 3), &dev)?;
    // f = sum((a + a*a) * b) + sum(reshape(a^T)) + sum(rowsum(a) broadcast * a) + sum(a + c):
    // a reaches the loss along five paths, b through a broadcast, c through one add whose
    // other argument is a (so both get the node's own gradient tensor).
    let t1 = (a.as_tensor() + a.as_tensor().sqr()?)?
        .broadcast_mul(b.as_tensor())?
        .sum_all()?;
    let t2 = a.as_tensor().t()?.reshape(6)?.sum_all()?;
    let s = a.as_tensor().sum_keepdim(1)?; // (2, 1)
    let t3 = (s.broadcast_as((2, 3))? * a.as_tensor())?.sum_all()?;
    let t4 = (a.as_tensor() + c.as_tensor())?.sum_all()?;
    let f = (((t1 + t2)? + t3)? + t4)?;
    let grads = f.backward()?;

    let (ga, gb, gc) = (
        grads.get(a.as_tensor()).expect("a has a gradient"),
        grads.get(b.as_tensor()).expect("b has a gradient"),
        grads.get(c.as_tensor()).expect("c has a gradient"),
    );
    for g in [ga, gb, gc] {
        assert!(g.is_contiguous(), "a stored gradient is contiguous");
    }
    // df/da_ij = (1 + 2 a_ij) b_j + 1 + 2 rowsum_i + 1; df/db_j = sum_i a_ij + a_ij^2; df/dc = 1.
    let rows = [av[0] + av[1] + av[2], av[3] + av[4] + av[5]];
    let want_a: Vec<f64> = (0..6)
        .map(|k| (1.0 + 2.0 * av[k]) * bv[k % 3] + 1.0 + 2.0 * rows[k / 3] + 1.0)
        .collect();
    let want_b: Vec<f64> = (0..3)
        .map(|j| av[j] + av[j] * av[j] + av[j + 3] + av[j + 3] * av[j + 3])
        .collect();
    assert_eq!(values(ga)?, want_a);
    assert_eq!(values(gb)?, want_b);
    assert_eq!(values(gc)?, vec![1.0; 6]);
    assert_eq!(ga.dims(), &[2, 3]);
    assert_eq!(gb.dims(), &[1, 3]);
    Ok(())
}
