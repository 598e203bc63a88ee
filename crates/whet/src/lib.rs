//! whet's orchestrator: the only crate that knows every other crate. The `whet` binary
//! (`src/main.rs`) parses arguments, builds the process's [`runtime::Runtime`] (device, dtype,
//! kernels) and calls [`commands`] with it.
//!
//! Layers, each importing only from those below it: [`commands`] (the subcommands); [`kfold`],
//! [`report`], [`inspect`], [`bench`], [`chat`], [`serve`] (one job each); [`runtime`] (model
//! loading), [`pipeline`] (files to rows), [`prompt`] (prompts to completions), [`stream`]
//! (token ids to text as it is generated), [`plot`]; [`cli`] (argument groups).
//!
//! # Example
//!
//! A run's configuration: a recipe with `--set` overrides, validated as `whet train` reads it.
//!
//! ```
//! let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/default.toml");
//! let cfg = whet::config::Config::load(&recipe, &["train.lr=1e-4".to_string()])?;
//! assert_eq!(cfg.train.lr, 1e-4);
//! assert!(whet::config::Config::load(&recipe, &["train.lr=fast".to_string()]).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bench;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod config;
pub mod inspect;
pub mod kfold;
pub mod mixture;
pub mod pipeline;
pub mod plot;
pub mod prepare;
pub mod prompt;
pub mod report;
pub mod runtime;
pub mod serve;
pub mod store_dedup;
pub mod store_rows;
pub mod stream;
pub mod task_eval;
