use thiserror::Error;

pub type Result<T> = std::result::Result<T, OptimError>;

#[derive(Debug, Error)]
pub enum OptimError {
    // ---- configuration ----
    #[error("invalid optimizer setting `{field}` = {value}: {expected}")]
    InvalidSetting {
        field: &'static str,
        value: String,
        expected: &'static str,
    },

    // ---- parameters and gradients ----
    #[error("gradient count {found} does not match parameter count {expected}")]
    GradCount { expected: usize, found: usize },
    #[error(
        "parameter `{name}`: gradient shape {found:?} does not match parameter shape {expected:?}"
    )]
    GradShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("parameter `{name}`: only f32 parameters and gradients are supported, found {dtype}")]
    DType { name: String, dtype: String },

    // ---- resume ----
    #[error(
        "optimizer state has no buffer `{name}`: the checkpoint was written for other parameters"
    )]
    MissingState { name: String },
    #[error("optimizer state buffer `{name}` has {found} values, parameter needs {expected}")]
    StateSize {
        name: String,
        expected: usize,
        found: usize,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
