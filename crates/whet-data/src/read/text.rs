//! Row sources for the text formats: JSON Lines, JSON arrays and CSV.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::RowSource;
use crate::error::{DataError, Result};
use crate::record::Origin;

fn open_file(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        action: "open",
        source,
    })
}

fn read_err(path: &Path, source: io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        action: "read",
        source,
    }
}

fn malformed_json(path: &Path, row: u64, message: impl Into<String>) -> DataError {
    DataError::MalformedJson {
        origin: Origin {
            file: path.to_path_buf(),
            row,
        },
        message: message.into(),
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

// ---- JSON Lines ----

/// One JSON value per line; blank lines are ignored; rows are 1-based line numbers.
pub(crate) struct JsonlSource {
    reader: BufReader<File>,
    path: PathBuf,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl JsonlSource {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        Ok(Self::from_reader(BufReader::new(open_file(path)?), path))
    }

    fn from_reader(reader: BufReader<File>, path: &Path) -> Self {
        JsonlSource {
            reader,
            path: path.to_path_buf(),
            line: 0,
            buf: Vec::new(),
            done: false,
        }
    }
}

impl RowSource for JsonlSource {
    fn next_row(&mut self) -> Option<Result<(u64, Value)>> {
        while !self.done {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line += 1;
                    let mut bytes = self.buf.as_slice();
                    if self.line == 1 {
                        bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
                    }
                    if bytes.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(
                        serde_json::from_slice(bytes)
                            .map(|v| (self.line, v))
                            .map_err(|e| malformed_json(&self.path, self.line, e.to_string())),
                    );
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(read_err(&self.path, e)));
                }
            }
        }
        None
    }
}

// ---- JSON arrays ----

/// Opens a `.json` file: a top-level array is streamed element by element; anything else is
/// read as JSON Lines.
pub(crate) fn open_json(path: &Path) -> Result<Box<dyn RowSource>> {
    let mut reader = BufReader::new(open_file(path)?);
    let first = first_significant_byte(&mut reader).map_err(|e| read_err(path, e))?;
    if first == Some(b'[') {
        reader.consume(1);
        Ok(Box::new(JsonArraySource {
            reader,
            path: path.to_path_buf(),
            index: 0,
            buf: Vec::new(),
            state: ArrayState::First,
        }))
    } else {
        Ok(Box::new(JsonlSource::from_reader(reader, path)))
    }
}

/// Skips a UTF-8 BOM and whitespace; peeks (does not consume) the next byte.
fn first_significant_byte(reader: &mut BufReader<File>) -> io::Result<Option<u8>> {
    let buf = reader.fill_buf()?;
    if buf.starts_with(BOM) {
        reader.consume(BOM.len());
    }
    skip_ws(reader)
}

fn skip_ws(reader: &mut BufReader<File>) -> io::Result<Option<u8>> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        let n = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if n < buf.len() {
            let b = buf[n];
            reader.consume(n);
            return Ok(Some(b));
        }
        let len = buf.len();
        reader.consume(len);
    }
}

#[derive(PartialEq, Eq)]
enum ArrayState {
    First,
    Next,
    Done,
}

/// Streams the elements of a top-level JSON array; rows are 0-based element indices.
///
/// Each element's bytes are delimited by a small scanner (bracket depth, string and escape
/// state) and parsed on their own, so a malformed element is a row error while the rest of the
/// array still reads; a broken array structure ends the file.
struct JsonArraySource {
    reader: BufReader<File>,
    path: PathBuf,
    index: u64,
    buf: Vec<u8>,
    state: ArrayState,
}

enum Scan {
    Element,
    Fatal(String),
}

impl JsonArraySource {
    /// Reads the next element's bytes into `buf` and the separator after it.
    fn scan(&mut self) -> io::Result<Option<Scan>> {
        self.buf.clear();
        let Some(first) = skip_ws(&mut self.reader)? else {
            return Ok(Some(Scan::Fatal(
                "unexpected end of file inside the array".into(),
            )));
        };
        if self.state == ArrayState::First && first == b']' {
            self.reader.consume(1);
            return Ok(None);
        }
        if first == b']' || first == b',' {
            return Ok(Some(Scan::Fatal(format!(
                "expected a value, found `{}`",
                first as char
            ))));
        }
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        'outer: loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(Some(Scan::Fatal(
                    "unexpected end of file inside an element".into(),
                )));
            }
            let mut used = 0;
            for &b in buf {
                if in_string {
                    used += 1;
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                        if depth == 0 {
                            self.buf.extend_from_slice(&buf[..used]);
                            self.reader.consume(used);
                            break 'outer;
                        }
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => {
                        depth -= 1;
                        if depth == 0 {
                            used += 1;
                            self.buf.extend_from_slice(&buf[..used]);
                            self.reader.consume(used);
                            break 'outer;
                        }
                    }
                    b',' | b']' if depth == 0 => {
                        // End of a bare scalar element; leave the separator in the reader.
                        self.buf.extend_from_slice(&buf[..used]);
                        self.reader.consume(used);
                        break 'outer;
                    }
                    _ => {}
                }
                used += 1;
            }
            self.buf.extend_from_slice(buf);
            let len = buf.len();
            self.reader.consume(len);
        }
        match skip_ws(&mut self.reader)? {
            Some(b',') => {
                self.reader.consume(1);
                self.state = ArrayState::Next;
            }
            Some(b']') => {
                self.reader.consume(1);
                self.state = ArrayState::Done;
            }
            Some(other) => {
                return Ok(Some(Scan::Fatal(format!(
                    "expected `,` or `]` after an element, found `{}`",
                    other as char
                ))));
            }
            None => {
                return Ok(Some(Scan::Fatal(
                    "unexpected end of file: the array is not closed with `]`".into(),
                )));
            }
        }
        Ok(Some(Scan::Element))
    }
}

impl RowSource for JsonArraySource {
    fn next_row(&mut self) -> Option<Result<(u64, Value)>> {
        if self.state == ArrayState::Done {
            return None;
        }
        let row = self.index;
        match self.scan() {
            Ok(None) => {
                self.state = ArrayState::Done;
                None
            }
            Ok(Some(Scan::Fatal(msg))) => {
                self.state = ArrayState::Done;
                Some(Err(malformed_json(&self.path, row, msg)))
            }
            Ok(Some(Scan::Element)) => {
                self.index += 1;
                Some(
                    serde_json::from_slice(&self.buf)
                        .map(|v| (row, v))
                        .map_err(|e| malformed_json(&self.path, row, e.to_string())),
                )
            }
            Err(e) => {
                self.state = ArrayState::Done;
                Some(Err(read_err(&self.path, e)))
            }
        }
    }
}

// ---- CSV ----

/// A CSV file with a header row; each row becomes an object of header -> string cell. Rows are
/// the 1-based line where the record starts (the header is line 1).
pub(crate) struct CsvSource {
    reader: csv::Reader<File>,
    headers: Vec<String>,
    record: csv::StringRecord,
    path: PathBuf,
    done: bool,
}

impl CsvSource {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = open_file(path)?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(file);
        let headers = reader
            .headers()
            .map_err(|e| csv_err(path, 1, &e))?
            .iter()
            .map(str::to_string)
            .collect();
        Ok(CsvSource {
            reader,
            headers,
            record: csv::StringRecord::new(),
            path: path.to_path_buf(),
            done: false,
        })
    }
}

fn csv_err(path: &Path, line: u64, e: &csv::Error) -> DataError {
    if let csv::ErrorKind::Io(io) = e.kind() {
        return read_err(path, io::Error::new(io.kind(), io.to_string()));
    }
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("expected {expected_len} fields like the header, found {len}"),
        csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8 in field {}", err.field() + 1),
        _ => e.to_string(),
    };
    DataError::MalformedCsv {
        origin: Origin {
            file: path.to_path_buf(),
            row: line,
        },
        message,
    }
}

impl RowSource for CsvSource {
    fn next_row(&mut self) -> Option<Result<(u64, Value)>> {
        if self.done {
            return None;
        }
        match self.reader.read_record(&mut self.record) {
            Ok(false) => {
                self.done = true;
                None
            }
            Ok(true) => {
                let line = self.record.position().map_or(0, |p| p.line());
                let mut obj = Map::with_capacity(self.headers.len());
                for (h, cell) in self.headers.iter().zip(self.record.iter()) {
                    obj.insert(h.clone(), Value::String(cell.to_string()));
                }
                Some(Ok((line, Value::Object(obj))))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    self.done = true;
                }
                Some(Err(csv_err(&self.path, line, &e)))
            }
        }
    }
}
