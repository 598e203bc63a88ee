//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer, rendering a chat template,
/// tokenizing, packing or caching. Each variant says where (file, row, field) and, where
/// there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: not a valid tokenizer.json: {message}; export it with the `tokenizers` library (`tokenizer.save(path)`) or `save_pretrained`",
        path.display()
    )]
    TokenizerFile { path: PathBuf, message: String },

    #[error("{}: field `{field}`: {what}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        what: String,
    },

    #[error(
        "{}: `{field}` is `{token}`, which is not in the tokenizer's vocabulary; add it to `added_tokens` in tokenizer.json or fix `{field}`",
        path.display()
    )]
    UnknownSpecialToken {
        path: PathBuf,
        field: &'static str,
        token: String,
    },

    #[error(
        "{}: no chat template: set `chat_template` in tokenizer_config.json or add chat_template.jinja next to it (conversation records need one)",
        path.display()
    )]
    NoChatTemplate { path: PathBuf },

    #[error("chat template does not compile: {message}")]
    TemplateSyntax { message: String },

    #[error("chat template failed: {message}")]
    TemplateRender { message: String },

    #[error(
        "{template}: the chat template went over its {limit} limit ({what}); templates are untrusted input and run with bounded steps, recursion and output (whet_tokenize::template::limits): check the template, or report it if a real model ships it"
    )]
    TemplateLimit {
        /// Where the template came from (`model/chat_template.jinja`, ...).
        template: String,
        /// Which limit: `step budget (fuel)`, `recursion`, `output size`, `tojson depth`,
        /// `tojson indent`, `tojson size` or `format width`.
        limit: &'static str,
        what: String,
    },

    #[error(
        "message {turn} ({role}): {what}; the assistant span could not be located in the rendered conversation (add `{{% generation %}}` blocks to the template to mark assistant spans explicitly)"
    )]
    AssistantSpan {
        turn: usize,
        role: &'static str,
        what: String,
    },

    #[error("tokenizer failed on {what}: {message}")]
    Encode { what: &'static str, message: String },

    #[error(
        "the token ids start with two BOS tokens ({bos}); the text or template already carries `bos_token`. Set `double_bos = \"fix\"` to drop the extra one, or remove it from the data"
    )]
    DoubleBos { bos: u32 },

    #[error("{}: row {row}: {source}", file.display())]
    AtRow {
        file: PathBuf,
        row: u64,
        #[source]
        source: Box<Error>,
    },

    #[error("invalid setting `{field}`: {what}")]
    Setting { field: &'static str, what: String },

    /// Writing a file failed (`whet_data::atomic`).
    #[error(transparent)]
    Write(#[from] whet_data::atomic::WriteError),

    #[error("{template}: cannot write an Ollama template: {what}")]
    Ollama { template: String, what: String },

    #[error("rows have different shapes: {what}")]
    Shape { what: String },

    #[error("{}: cache file is unreadable ({what}); delete it to rebuild", path.display())]
    Cache { path: PathBuf, what: String },

    #[error("{}: not a usable token store: {what}", path.display())]
    Store { path: PathBuf, what: String },

    /// Reading the records to tokenize failed (`whet_data`: file, row and field in the message).
    #[error(transparent)]
    Data(#[from] whet_data::DataError),
}

impl Error {
    /// Attach the record's origin (file, row) to an error.
    pub fn at(self, file: impl Into<PathBuf>, row: u64) -> Error {
        Error::AtRow {
            file: file.into(),
            row,
            source: Box::new(self),
        }
    }

    /// The innermost error, under any [`Error::AtRow`] wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::AtRow { source, .. } => source.root(),
            other => other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
