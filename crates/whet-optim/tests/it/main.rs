//! whet-optim integration tests: the optimizers drive real candle autograd problems.

mod converge;
#[cfg(feature = "cuda")]
mod cuda;
