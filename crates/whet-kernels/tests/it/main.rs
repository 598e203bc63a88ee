//! Integration tests of whet-kernels: every fast op against `reference` (forward and gradients
//! through candle autograd, f32) and against central finite differences (f64: the CPU kernels
//! run in f64 too, so the step can be 1e-6 and the tolerance tight).

mod attention;
mod backprop;
mod checkpoint;
mod common;
mod cpu_path;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod errors;
mod linear;
mod linear_cross_entropy;
mod lora_linear;
mod props;
mod quantized;
mod rms_norm;
mod rope;
mod self_check;
mod swiglu;
