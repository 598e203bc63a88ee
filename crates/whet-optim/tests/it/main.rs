//! whet-optim integration tests: the optimizers drive real candle autograd problems.

mod converge;
