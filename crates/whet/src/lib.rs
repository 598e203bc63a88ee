//! whet's orchestrator: the only crate that knows every other crate. The `whet` binary
//! (`src/main.rs`) parses arguments and calls [`commands`].

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod inspect;
pub mod kfold;
pub mod pipeline;
pub mod plot;
pub mod report;
