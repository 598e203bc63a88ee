//! Streamed decoding: token ids in, text out as soon as it is final, for `whet chat` and
//! `whet serve`.
//!
//! A token may end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK
//! across tokens), and the text of the ids so far may end with a stop string's first
//! characters. [`TextStream`] decodes the whole running id list after each token and hands out
//! only the new suffix that can no longer change: not a trailing U+FFFD (an incomplete
//! character), not a tail that could still grow into a stop string. At a stop string the text
//! ends before it.

use anyhow::Result;
use whet_tokenize::Tokenizer;

/// What one token added.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// Text that is now final (often empty: a partial character, a held-back stop prefix).
    pub text: String,
    /// A stop string appeared: generation should end; `text` ends before it.
    pub stop: bool,
}

pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    stops: Vec<String>,
    /// The text handed out so far.
    sent: String,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    /// `stops`: strings that end the text (empty ones are ignored).
    pub fn new(tok: &'a Tokenizer, stops: &[String]) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            sent: String::new(),
            stopped: false,
        }
    }

    /// Adds a generated token (special tokens decode to nothing).
    pub fn push(&mut self, id: u32) -> Result<Piece> {
        if self.stopped {
            return Ok(Piece {
                text: String::new(),
                stop: true,
            });
        }
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true)?;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            return Ok(Piece {
                text: self.advance(&text, cut),
                stop: true,
            });
        }
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        let held = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&text[..safe], s))
            .max()
            .unwrap_or(0);
        safe -= held;
        Ok(Piece {
            text: self.advance(&text, safe),
            stop: false,
        })
    }

    /// The text held back at the end of generation (a trailing partial character stays as
    /// U+FFFD, a stop string's unfinished prefix is plain text).
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.tok.decode(&self.ids, true)?;
        Ok(self.advance(&text, text.len()))
    }

    /// Every piece handed out so far, joined.
    pub fn text(&self) -> &str {
        &self.sent
    }

    /// `text[sent..upto]`, if the decoded text still starts with what was sent.
    fn advance(&mut self, text: &str, upto: usize) -> String {
        let from = self.sent.len();
        if upto <= from || !text.starts_with(self.sent.as_str()) || !text.is_char_boundary(upto) {
            return String::new();
        }
        let new = text[from..upto].to_string();
        self.sent.push_str(&new);
        new
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
