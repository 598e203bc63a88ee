//! Compliance: redact personal data to typed placeholders, and audit what was redacted.
//!
//! Built-in rules, in priority order (an earlier rule wins where matches overlap; user rules
//! come before all of them):
//!
//! | rule          | placeholder | what matches                                                   |
//! |---------------|-------------|----------------------------------------------------------------|
//! | `email`       | `[EMAIL]`   | `local@domain.tld`                                             |
//! | `iban`        | `[IBAN]`    | `CCdd` + 11..30 alphanumerics, optional spaces, mod-97 checked  |
//! | `card`        | `[CARD]`    | 13..19 digits, optional single spaces/dashes, Luhn checked      |
//! | `national_id` | `[ID]`      | US SSN `ddd-dd-dddd` (invalid ranges excluded), UK NINO         |
//! | `ipv6`        | `[IP]`      | anything `std::net::Ipv6Addr` parses, with at least 4 hex digits |
//! | `ipv4`        | `[IP]`      | dotted quads with octets 0..=255, no leading zeros              |
//! | `phone`       | `[PHONE]`   | `+CC ...` (8..15 digits), NANP `(555) 123-4567`, trunk-0 national `020 7946 0958`, `06 12 34 56 78` |
//!
//! Plain digit runs are never phone numbers (a phone needs a `+`, parentheses or separators),
//! and a 13..19-digit number that fails Luhn is left alone, so order numbers survive. A digit
//! run that is part of a longer number, a decimal or a version string is not matched.
//!
//! The [`Audit`] records counts per rule and the ids and origins of touched examples, never the
//! removed values.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::atomic::Existing;
use crate::error::{DataError, Result};
use crate::record::{Example, Origin, Record};
use crate::split::record_id;

/// A built-in rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Email,
    Iban,
    Card,
    NationalId,
    Ipv6,
    Ipv4,
    Phone,
}

impl Rule {
    /// Every built-in rule, in priority order.
    pub const ALL: [Rule; 7] = [
        Rule::Email,
        Rule::Iban,
        Rule::Card,
        Rule::NationalId,
        Rule::Ipv6,
        Rule::Ipv4,
        Rule::Phone,
    ];

    /// The name used in counts and the audit.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Email => "email",
            Rule::Iban => "iban",
            Rule::Card => "card",
            Rule::NationalId => "national_id",
            Rule::Ipv6 => "ipv6",
            Rule::Ipv4 => "ipv4",
            Rule::Phone => "phone",
        }
    }

    /// The text a match is replaced with.
    pub fn placeholder(self) -> &'static str {
        match self {
            Rule::Email => "[EMAIL]",
            Rule::Iban => "[IBAN]",
            Rule::Card => "[CARD]",
            Rule::NationalId => "[ID]",
            Rule::Ipv6 | Rule::Ipv4 => "[IP]",
            Rule::Phone => "[PHONE]",
        }
    }
}

/// Redaction counts per rule name.
pub type Counts = BTreeMap<String, u64>;

/// One match: the rule's name, its placeholder and the byte range in the scanned text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: String,
    pub placeholder: String,
    pub range: Range<usize>,
}

#[derive(Debug, Clone)]
enum Matcher {
    Builtin(Rule),
    Custom {
        name: String,
        placeholder: String,
        re: Regex,
    },
}

#[derive(Debug, Clone)]
struct Patterns {
    email: Regex,
    iban: Regex,
    digits: Regex,
    ssn: Regex,
    nino: Regex,
    ipv6: Regex,
    ipv4: Regex,
    phone_intl: Regex,
    phone_nanp: Regex,
    phone_trunk: Regex,
    phone_pairs: Regex,
}

impl Patterns {
    fn new() -> Self {
        let re = |p: &str| Regex::new(p).expect("built-in PII pattern compiles");
        Patterns {
            email: re(
                r"(?i)\b[a-z0-9._%+-]+@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.[a-z]{2,}\b",
            ),
            iban: re(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
            digits: re(r"\d(?:[ -]?\d)*"),
            ssn: re(r"\b(\d{3})-(\d{2})-(\d{4})\b"),
            nino: re(r"\b([A-Z]{2}) ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
            ipv6: re(r"(?i)(?:[0-9a-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{1,4})?"),
            ipv4: re(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
            phone_intl: re(r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}"),
            phone_nanp: re(r"(?:\b1[ .-]?)?(?:\(\d{3}\) ?|\b\d{3}[ .-])\d{3}[ .-]\d{4}\b"),
            phone_trunk: re(r"\b0\d{1,4}[ ./-]\d{3,8}(?:[ .-]\d{2,4}){0,3}\b"),
            // 0X XX XX XX XX (France, Belgium, ...), one separator style throughout.
            phone_pairs: re(r"\b0\d(?: \d{2}){4}\b|\b0\d(?:\.\d{2}){4}\b|\b0\d(?:-\d{2}){4}\b"),
        }
    }
}

/// The scrubber: built-in rules plus named user regexes. Cheap to share (`&self` everywhere).
#[derive(Debug, Clone)]
pub struct Scrubber {
    matchers: Vec<Matcher>,
    patterns: Patterns,
}

impl Default for Scrubber {
    fn default() -> Self {
        Scrubber::new()
    }
}

impl Scrubber {
    /// All built-in rules.
    pub fn new() -> Self {
        Scrubber::with_rules(&Rule::ALL)
    }

    /// Only the given built-in rules (still applied in [`Rule::ALL`] priority order).
    pub fn with_rules(rules: &[Rule]) -> Self {
        let matchers = Rule::ALL
            .iter()
            .filter(|r| rules.contains(r))
            .map(|&r| Matcher::Builtin(r))
            .collect();
        Scrubber {
            matchers,
            patterns: Patterns::new(),
        }
    }

    /// Adds a user rule: matches of `pattern` become `[NAME]` (the name upper-cased). User rules
    /// take priority over built-in ones, in the order added. `name` must be non-empty ASCII
    /// letters, digits or `_`.
    pub fn with_custom(mut self, name: &str, pattern: &str) -> Result<Self> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DataError::InvalidConfig {
                setting: "PII rule name",
                expected: "non-empty ASCII letters, digits or `_`",
                got: format!("{name:?}"),
            });
        }
        let re = Regex::new(pattern).map_err(|e| DataError::BadRuleRegex {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let first_builtin = self
            .matchers
            .iter()
            .position(|m| matches!(m, Matcher::Builtin(_)))
            .unwrap_or(self.matchers.len());
        self.matchers.insert(
            first_builtin,
            Matcher::Custom {
                name: name.to_string(),
                placeholder: format!("[{}]", name.to_ascii_uppercase()),
                re,
            },
        );
        Ok(self)
    }

    /// Every match in `text`, non-overlapping, sorted by position.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let mut taken: Vec<Finding> = Vec::new();
        for m in &self.matchers {
            let (name, placeholder, spans) = match m {
                Matcher::Builtin(rule) => (
                    rule.name(),
                    rule.placeholder(),
                    self.builtin_spans(*rule, text),
                ),
                Matcher::Custom {
                    name,
                    placeholder,
                    re,
                } => (
                    name.as_str(),
                    placeholder.as_str(),
                    re.find_iter(text)
                        .filter(|m| !m.is_empty())
                        .map(|m| m.range())
                        .collect(),
                ),
            };
            for span in spans {
                if taken
                    .iter()
                    .all(|t| span.end <= t.range.start || span.start >= t.range.end)
                {
                    taken.push(Finding {
                        rule: name.to_string(),
                        placeholder: placeholder.to_string(),
                        range: span,
                    });
                }
            }
        }
        taken.sort_by_key(|f| f.range.start);
        taken
    }

    /// Redacts `text`; returns the new text and the counts per rule.
    pub fn scrub_text(&self, text: &str) -> (String, Counts) {
        let findings = self.find(text);
        let mut counts = Counts::new();
        if findings.is_empty() {
            return (text.to_string(), counts);
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            out.push_str(&text[at..f.range.start]);
            out.push_str(&f.placeholder);
            at = f.range.end;
            *counts.entry(f.rule).or_default() += 1;
        }
        out.push_str(&text[at..]);
        (out, counts)
    }

    /// Redacts every text field of a record in place (text; prompt and completion; each
    /// message's content); returns the counts.
    pub fn scrub_record(&self, record: &mut Record) -> Counts {
        let mut counts = Counts::new();
        let mut one = |s: &mut String| {
            let (new, c) = self.scrub_text(s);
            if !c.is_empty() {
                *s = new;
                for (k, v) in c {
                    *counts.entry(k).or_default() += v;
                }
            }
        };
        match record {
            Record::Text { text } => one(text),
            Record::PromptCompletion { prompt, completion } => {
                one(prompt);
                one(completion);
            }
            Record::Conversation { messages } => {
                for m in messages {
                    one(&mut m.content);
                }
            }
        }
        counts
    }

    /// Redacts an example in place. When anything was redacted its id is recomputed from the
    /// new content (ids stay a hash of what the example holds) and a row is added to `audit`.
    pub fn scrub_example(&self, example: &mut Example, audit: &mut Audit) {
        audit.examples_scanned += 1;
        let counts = self.scrub_record(&mut example.record);
        if counts.is_empty() {
            return;
        }
        example.id = record_id(&example.record);
        audit.touched(example.id, &example.origin, counts);
    }

    /// Redacts both sides of a preference pair, with one audit row per pair whose counts take the
    /// prompt the sides share once (each side is prompt + answer).
    pub fn scrub_pair(&self, pair: &mut crate::read::PairExample, audit: &mut Audit) {
        audit.examples_scanned += 1;
        let mut shared = shared_prompt(&pair.chosen, &pair.rejected);
        let mut counts = self.scrub_record(&mut pair.chosen);
        for (k, v) in self.scrub_record(&mut pair.rejected) {
            *counts.entry(k).or_default() += v;
        }
        if let Some(prompt) = shared.as_mut() {
            for (k, v) in self.scrub_record(prompt) {
                let c = counts.entry(k).or_default();
                *c = c.saturating_sub(v);
            }
        }
        counts.retain(|_, v| *v > 0);
        if counts.is_empty() {
            return;
        }
        pair.id = record_id(&pair.chosen) ^ record_id(&pair.rejected).rotate_left(1);
        audit.touched(pair.id, &pair.origin, counts);
    }

    /// Redacts a whole dataset; returns the examples (same order) and the audit.
    pub fn scrub_all(&self, examples: impl IntoIterator<Item = Example>) -> (Vec<Example>, Audit) {
        let mut audit = Audit::default();
        let out = examples
            .into_iter()
            .map(|mut ex| {
                self.scrub_example(&mut ex, &mut audit);
                ex
            })
            .collect();
        (out, audit)
    }

    fn builtin_spans(&self, rule: Rule, text: &str) -> Vec<Range<usize>> {
        let p = &self.patterns;
        match rule {
            Rule::Email => p.email.find_iter(text).map(|m| m.range()).collect(),
            Rule::Iban => iban_spans(&p.iban, text),
            Rule::Card => card_spans(&p.digits, text),
            Rule::NationalId => {
                let mut v: Vec<Range<usize>> = p
                    .ssn
                    .captures_iter(text)
                    .filter(|c| {
                        let r = c.get(0).map(|m| m.range()).unwrap_or_default();
                        valid_ssn(&c[1], &c[2], &c[3]) && isolated(text, &r)
                    })
                    .filter_map(|c| c.get(0).map(|m| m.range()))
                    .collect();
                v.extend(
                    p.nino
                        .captures_iter(text)
                        .filter(|c| valid_nino_prefix(&c[1]))
                        .filter_map(|c| c.get(0).map(|m| m.range())),
                );
                v
            }
            Rule::Ipv6 => p
                .ipv6
                .find_iter(text)
                .map(|m| m.range())
                .filter(|r| valid_ipv6(text, r))
                .collect(),
            Rule::Ipv4 => p
                .ipv4
                .find_iter(text)
                .map(|m| m.range())
                .filter(|r| valid_ipv4(&text[r.clone()]) && isolated_by(text, r, ".", false))
                .collect(),
            Rule::Phone => {
                let mut v = Vec::new();
                for (re, min, max) in [
                    (&p.phone_intl, 8, 15),
                    (&p.phone_nanp, 10, 11),
                    (&p.phone_trunk, 9, 12),
                    (&p.phone_pairs, 10, 10),
                ] {
                    v.extend(re.find_iter(text).map(|m| m.range()).filter(|r| {
                        let n = text[r.clone()].bytes().filter(u8::is_ascii_digit).count();
                        // A phone written with spaces must not run on into more
                        // space-separated digits (e.g. a grouped 16-digit number).
                        let spaced = text[r.clone()].contains(' ');
                        (min..=max).contains(&n) && isolated_by(text, r, ".,-:/", spaced)
                    }));
                }
                v
            }
        }
    }
}

// ---- validators ----

/// The Luhn checksum over ASCII digits (other bytes ignored).
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    let mut n = 0usize;
    for b in digits.bytes().rev().filter(u8::is_ascii_digit) {
        let mut d = u32::from(b - b'0');
        if n % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        n += 1;
    }
    n > 0 && sum.is_multiple_of(10)
}

/// ISO 13616 check: 15..=34 alphanumerics (spaces ignored), country letters, check digits, and
/// the rearranged number mod 97 equal to 1.
pub fn iban_valid(iban: &str) -> bool {
    let compact: Vec<u8> = iban.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len())
        || !compact[..2].iter().all(u8::is_ascii_uppercase)
        || !compact[2..4].iter().all(u8::is_ascii_digit)
        || !compact
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return false;
    }
    let mut rem = 0u32;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        if b.is_ascii_digit() {
            rem = (rem * 10 + u32::from(b - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(b - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

fn valid_ssn(area: &str, group: &str, serial: &str) -> bool {
    let area: u32 = area.parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && group != "00" && serial != "0000"
}

fn valid_nino_prefix(prefix: &str) -> bool {
    let b = prefix.as_bytes();
    !b"DFIQUV".contains(&b[0])
        && !b"DFIOQUV".contains(&b[1])
        && !["BG", "GB", "NK", "KN", "TN", "NT", "ZZ"].contains(&prefix)
}

fn valid_ipv4(s: &str) -> bool {
    s.split('.').all(|o| {
        !o.is_empty()
            && (o == "0" || !o.starts_with('0'))
            && o.parse::<u16>().is_ok_and(|v| v <= 255)
    })
}

fn valid_ipv6(text: &str, r: &Range<usize>) -> bool {
    let s = &text[r.clone()];
    let before = text[..r.start].chars().next_back();
    let after = text[r.end..].chars().next();
    let hex_digits = s.bytes().filter(u8::is_ascii_hexdigit).count();
    hex_digits >= 4
        && !before.is_some_and(|c| c.is_alphanumeric() || c == ':' || c == '_' || c == '.')
        && !after.is_some_and(|c| c.is_alphanumeric() || c == ':' || c == '_')
        && s.parse::<std::net::Ipv6Addr>().is_ok()
}

/// True unless the span is glued to a word or continues a longer number: no letter, digit or
/// `_` right next to it, and no `.`, `,`, `-`, `:` or `/` (or a space, when `space_joins`)
/// that joins it to another digit.
fn isolated(text: &str, r: &Range<usize>) -> bool {
    isolated_by(text, r, ".,-:/", false)
}

fn isolated_by(text: &str, r: &Range<usize>, joiners: &str, space_joins: bool) -> bool {
    let mut before = text[..r.start].chars().rev();
    let mut after = text[r.end..].chars();
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let joiner = |c: char| joiners.contains(c) || (space_joins && c == ' ');
    let ok_side = |first: Option<char>, second: Option<char>| match first {
        None => true,
        Some(c) if word(c) => false,
        Some(c) if joiner(c) => !second.is_some_and(|d| d.is_ascii_digit()),
        Some(_) => true,
    };
    let (b1, b2) = (before.next(), before.next());
    let (a1, a2) = (after.next(), after.next());
    ok_side(b1, b2) && ok_side(a1, a2)
}

fn iban_spans(re: &Regex, text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for m in re.find_iter(text) {
        let s = m.as_str();
        // The pattern is greedy; if the whole match fails the check, retry without trailing
        // space-separated groups (an IBAN followed by an unrelated code).
        let mut end = s.len();
        loop {
            if iban_valid(&s[..end]) {
                out.push(m.start()..m.start() + end);
                break;
            }
            match s[..end].rfind(' ') {
                Some(sp) if sp >= 4 => end = sp,
                _ => break,
            }
        }
    }
    out
}

fn card_spans(digits: &Regex, text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for m in digits.find_iter(text) {
        let r = m.range();
        // Groups of digits between single separators.
        let mut groups: Vec<Range<usize>> = Vec::new();
        let mut start = r.start;
        for (i, b) in m.as_str().bytes().enumerate() {
            if b == b' ' || b == b'-' {
                groups.push(start..r.start + i);
                start = r.start + i + 1;
            }
        }
        groups.push(start..r.end);
        let count = |g: &[Range<usize>]| g.iter().map(|g| g.len()).sum::<usize>();
        let total = count(&groups);
        if total < 13 {
            continue;
        }
        if total <= 19 {
            // The whole number is the candidate: it is a card iff it passes Luhn.
            if luhn_valid(m.as_str()) && isolated(text, &r) {
                out.push(r);
            }
            continue;
        }
        // Too long for one card: look for cards made of whole groups (e.g. two cards in a row).
        let mut i = 0;
        while i < groups.len() {
            let mut found = None;
            for j in (i..groups.len()).rev() {
                let n = count(&groups[i..=j]);
                if (13..=19).contains(&n) {
                    let span = groups[i].start..groups[j].end;
                    if luhn_valid(&text[span.clone()]) {
                        found = Some((j, span));
                        break;
                    }
                }
            }
            match found {
                Some((j, span)) => {
                    out.push(span);
                    i = j + 1;
                }
                None => i += 1,
            }
        }
    }
    out
}

// ---- audit ----

/// One touched example: its id (after scrubbing), where it came from, and counts per rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: u64,
    pub origin: Origin,
    pub redactions: Counts,
}

/// The prompt both sides of a pair start with, as a record of its own: a prompt/completion
/// pair's prompt, or the conversations' shared leading messages.
fn shared_prompt(a: &Record, b: &Record) -> Option<Record> {
    match (a, b) {
        (
            Record::PromptCompletion { prompt, .. },
            Record::PromptCompletion { prompt: other, .. },
        ) if prompt == other => Some(Record::Text {
            text: prompt.clone(),
        }),
        (Record::Conversation { messages }, Record::Conversation { messages: other }) => {
            let k = messages
                .iter()
                .zip(other)
                .take_while(|(x, y)| x == y)
                .count();
            (k > 0).then(|| Record::Conversation {
                messages: messages[..k].to_vec(),
            })
        }
        _ => None,
    }
}

/// What a scrub did: counts per rule and the touched rows. Never holds a removed value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub examples_scanned: u64,
    pub examples_touched: u64,
    /// Redactions per rule name, over all examples.
    pub redactions: Counts,
    pub rows: Vec<AuditRow>,
}

impl Audit {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an audit always serializes")
    }

    /// Writes [`Audit::to_json`] to `path` (conventionally `audit.json`).
    pub fn write_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::atomic::write_file(path, self.to_json().as_bytes(), Existing::Replace)
            .map_err(DataError::from)
    }

    /// Records the redactions of one touched row (an example, or a preference pair).
    fn touched(&mut self, id: u64, origin: &Origin, counts: Counts) {
        self.examples_touched += 1;
        for (k, v) in &counts {
            *self.redactions.entry(k.clone()).or_default() += v;
        }
        self.rows.push(AuditRow {
            id,
            origin: origin.clone(),
            redactions: counts,
        });
    }

    /// Folds another audit (e.g. from another shard) into this one.
    pub fn merge(&mut self, other: Audit) {
        self.examples_scanned += other.examples_scanned;
        self.examples_touched += other.examples_touched;
        for (k, v) in other.redactions {
            *self.redactions.entry(k).or_default() += v;
        }
        self.rows.extend(other.rows);
    }
}
