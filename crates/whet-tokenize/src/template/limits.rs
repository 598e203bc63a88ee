//! What one render of a chat template may do. Templates ship with downloaded models and are
//! untrusted input, like the data files whose messages they render: a render must end
//! quickly, within bounded memory and stack, with an error and never a hang, an abort or a
//! stack overflow.
//!
//! - fuel (minijinja's step budget: one per instruction, one per 64 bytes of data created)
//!   of [`FUEL_BASE`] plus [`FUEL_PER_MESSAGE`] per message plus one per
//!   [`CONTENT_BYTES_PER_FUEL`] bytes of message content, at most [`MAX_FUEL`]; it bounds
//!   both the time (nested `range` loops) and the memory (`"x" * n`, `%Nd` in the `format`
//!   filter) of a render;
//! - a stack of [`STACK_BYTES_PER_FUEL`] bytes per fuel for each render: minijinja drops
//!   (and compares, and prints) nested values recursively, and a template can nest a list
//!   in itself once per few fuel (`{% set ns.x = [ns.x] %}` in a loop: about 160 bytes of
//!   stack for 7 fuel); the stack is reserved, not touched, unless the template nests;
//! - a recursion limit of [`RECURSION_LIMIT`] (macros, recursive loops, includes);
//! - output of at most [`MAX_OUTPUT_BASE`] bytes plus [`OUTPUT_PER_CONTENT_BYTE`] per byte
//!   of message content;
//! - `tojson`: nesting depth [`MAX_JSON_DEPTH`] (a namespace that holds itself is refused,
//!   not followed), indent [`MAX_JSON_INDENT`], text [`MAX_JSON_BYTES`];
//! - `format` and `str.format`: widths and precisions up to [`MAX_FORMAT_WIDTH`];
//! - `range`: minijinja's own cap of 100 000 items;
//! - template lines of at most [`MAX_LINE_BYTES`] bytes (checked when it compiles).
//!
//! Real templates (Llama 3/3.1, Qwen2/2.5/3, Gemma 2/3, Phi-4, Mistral v0.3 and Small 3.1,
//! SmolLM2) use 50 to 100 fuel per message plus one per 64 bytes of content for each time
//! they copy it, and nest JSON a few levels; the limits leave them tenfold headroom and
//! stop each attack in well under two seconds.

use std::io;

/// Fuel every render gets, whatever its messages.
pub const FUEL_BASE: u64 = 2_000_000;
/// Fuel per message of the conversation (real templates use 50 to 100).
pub const FUEL_PER_MESSAGE: u64 = 1_000;
/// One more fuel per this many bytes of message content (content is charged one fuel per
/// 64 bytes each time it is copied; this pays for copying it 16 times, Qwen3 copies it 7).
pub const CONTENT_BYTES_PER_FUEL: u64 = 4;
/// The most fuel any render gets (a conversation of 14 000 messages; real templates would
/// render 150 000 on it).
pub const MAX_FUEL: u64 = 16_000_000;
/// Stack reserved for a render per fuel of its budget (512 MiB at [`MAX_FUEL`]).
pub const STACK_BYTES_PER_FUEL: u64 = 32;
/// The longest line a template may have, in bytes: minijinja's lexer counts columns in a
/// `u16`, which overflows past 65 535 (a panic with overflow checks; found by whet-fuzz).
pub const MAX_LINE_BYTES: usize = 60_000;
/// minijinja's recursion counter limit (its default is 500; a macro call counts about 10).
pub const RECURSION_LIMIT: usize = 200;
/// Rendered text allowed whatever the messages.
pub const MAX_OUTPUT_BASE: usize = 16 << 20;
/// Rendered text allowed per byte of message content.
pub const OUTPUT_PER_CONTENT_BYTE: usize = 4;
/// Deepest nesting `tojson` writes (Python's `json.dumps` stops near 1000 with a
/// RecursionError; tool schemas nest a few levels).
pub const MAX_JSON_DEPTH: usize = 128;
/// Largest `tojson(indent=..)`, in spaces or characters of an indent string.
pub const MAX_JSON_INDENT: usize = 256;
/// Largest text one `tojson` call writes.
pub const MAX_JSON_BYTES: usize = 16 << 20;
/// Largest width or precision in a `format` / `str.format` field.
pub const MAX_FORMAT_WIDTH: usize = 10_000;

/// The fuel of one render of `messages` messages with `content_bytes` bytes of content.
pub fn fuel_budget(messages: usize, content_bytes: usize) -> u64 {
    FUEL_BASE
        .saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages as u64))
        .saturating_add(content_bytes as u64 / CONTENT_BYTES_PER_FUEL)
        .min(MAX_FUEL)
}

/// The stack one render with `fuel` runs on.
pub fn stack_bytes(fuel: u64) -> usize {
    (fuel.saturating_mul(STACK_BYTES_PER_FUEL) as usize).saturating_add(1 << 20)
}

/// The most rendered text allowed for `content_bytes` bytes of message content.
pub fn max_output(content_bytes: usize) -> usize {
    MAX_OUTPUT_BASE.saturating_add(content_bytes.saturating_mul(OUTPUT_PER_CONTENT_BYTE))
}

/// A limit a filter or function hit; carried as the source of a minijinja error so that the
/// render can name the limit.
#[derive(Debug)]
pub(crate) struct LimitExceeded {
    pub limit: &'static str,
    pub what: String,
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} limit: {}", self.limit, self.what)
    }
}

impl std::error::Error for LimitExceeded {}

pub(crate) fn limit_error(limit: &'static str, what: String) -> minijinja::Error {
    let e = LimitExceeded { limit, what };
    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()).with_source(e)
}

/// The limit behind a render error, if one was hit.
pub(crate) fn exceeded(e: &minijinja::Error, output_full: bool) -> Option<(&'static str, String)> {
    if output_full {
        return Some(("output size", String::new()));
    }
    if e.kind() == minijinja::ErrorKind::OutOfFuel {
        return Some(("step budget (fuel)", String::new()));
    }
    if e.kind() == minijinja::ErrorKind::InvalidOperation
        && e.detail() == Some("recursion limit exceeded")
    {
        return Some((
            "recursion",
            format!("nested macros, loops or includes went past depth {RECURSION_LIMIT}"),
        ));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(l) = s.downcast_ref::<LimitExceeded>() {
            return Some((l.limit, l.what.clone()));
        }
        source = s.source();
    }
    None
}

/// The render's output, refused past `max` bytes.
pub(crate) struct CappedWriter {
    pub buf: Vec<u8>,
    pub max: usize,
    pub full: bool,
}

impl io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.max {
            self.full = true;
            return Err(io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
