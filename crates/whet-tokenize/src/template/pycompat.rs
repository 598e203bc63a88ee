//! The Python-compatibility layer of the chat-template environment: what transformers'
//! Jinja2 environment has that minijinja lacks or does differently. `tojson` formats like
//! Python's `json.dumps`, floats print like `repr(float)`, `strftime_now` formats like
//! `datetime.strftime`, and string methods come from minijinja-contrib's pycompat behind a
//! guard on `str.format`.
//!
//! Every function here takes its input from an untrusted template, so each bounds what it
//! produces: `tojson` its nesting depth, indent and text size; `format` and `str.format`
//! their field widths and precisions (see [`super::limits`]).

use minijinja::value::{Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{ErrorKind, State};

use super::limits::{
    MAX_FORMAT_WIDTH, MAX_JSON_BYTES, MAX_JSON_DEPTH, MAX_JSON_INDENT, limit_error,
};

// ----------------------------------------------------------------------------------------
// Python string methods (minijinja-contrib) and the `format` filter, with bounded widths
// ----------------------------------------------------------------------------------------

/// minijinja-contrib's pycompat methods (`.strip()`, `.items()`, ...), with `str.format`'s
/// widths and precisions bounded first (Python would try to allocate them).
pub(super) fn unknown_method_callback(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if method == "format"
        && let Some(s) = value.as_str()
    {
        check_format_numbers(s, b'{', b'}')?;
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The `format` filter (printf style, `"%5d" | format(x)`), with bounded widths.
pub(super) fn format_filter(
    state: &mut State,
    format_str: &Value,
    args: Rest<ValueOrKwargs>,
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = format_str.as_str() {
        check_format_numbers(s, b'%', 0)?;
    }
    minijinja::filters::format(state, format_str, args)
}

/// Refuse a format string in which a field's width or precision (any number inside a
/// replacement field: from `open` to `close`, or to the next letter for printf's `%`) is
/// over [`MAX_FORMAT_WIDTH`].
fn check_format_numbers(s: &str, open: u8, close: u8) -> std::result::Result<(), minijinja::Error> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != open {
            i += 1;
            continue;
        }
        i += 1;
        // `{{` and `%%` are escapes.
        if i < b.len() && b[i] == open {
            i += 1;
            continue;
        }
        while i < b.len() {
            let c = b[i];
            if (close != 0 && c == close) || (close == 0 && c.is_ascii_alphabetic()) {
                break;
            }
            if c.is_ascii_digit() {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let digits = &s[start..i];
                let n: usize = digits.parse().unwrap_or(usize::MAX);
                if n > MAX_FORMAT_WIDTH {
                    return Err(limit_error(
                        "format width",
                        format!("a width or precision of {digits} is over {MAX_FORMAT_WIDTH}"),
                    ));
                }
                continue;
            }
            i += 1;
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------
// tojson: Python's json.dumps(x, ensure_ascii=False, indent=.., separators=.., sort_keys=..)
// ----------------------------------------------------------------------------------------

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

pub(super) fn tojson(
    value: &Value,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "indent must be an int or str")
            })?;
            if n > MAX_JSON_INDENT as i64 {
                return Err(limit_error(
                    "tojson indent",
                    format!("indent={n} is over {MAX_JSON_INDENT}"),
                ));
            }
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    if let Some(ind) = &indent
        && ind.len() > MAX_JSON_INDENT
    {
        return Err(limit_error(
            "tojson indent",
            format!(
                "an indent string of {} bytes is over {MAX_JSON_INDENT}",
                ind.len()
            ),
        ));
    }
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().unwrap_or("").to_string())
                .collect();
            if parts.len() != 2 {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "separators must be (item_separator, key_separator)",
                ));
            }
            (parts[0].clone(), parts[1].clone())
        }
        _ => {
            if indent.is_some() {
                (",".to_string(), ": ".to_string())
            } else {
                (", ".to_string(), ": ".to_string())
            }
        }
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    check_json_size(&out)?;
    Ok(Value::from_safe_string(out))
}

fn json_err(what: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, what)
}

/// Stops `tojson` once its text is over [`MAX_JSON_BYTES`] (a value that holds the same
/// list many times over is small in memory and huge as text).
fn check_json_size(out: &str) -> std::result::Result<(), minijinja::Error> {
    if out.len() > MAX_JSON_BYTES {
        return Err(limit_error(
            "tojson size",
            format!("the JSON text is over {MAX_JSON_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn newline(style: &JsonStyle, level: usize, out: &mut String) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(
    v: &Value,
    style: &JsonStyle,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if level > MAX_JSON_DEPTH {
        // Python raises RecursionError here; a value that contains itself (a namespace
        // set as its own attribute) would otherwise recurse until the stack overflows.
        return Err(limit_error(
            "tojson depth",
            format!(
                "the value is nested more than {MAX_JSON_DEPTH} levels deep (or contains itself)"
            ),
        ));
    }
    check_json_size(out)?;
    match v.kind() {
        ValueKind::Undefined => {
            return Err(json_err(
                "Object of type Undefined is not JSON serializable".into(),
            ));
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&py_float_repr(f));
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or(""), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, level + 1, out);
                write_json(item, style, level + 1, out)?;
            }
            newline(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or("").to_string(),
                    ValueKind::Number => {
                        if key.is_integer() {
                            key.to_string()
                        } else {
                            py_float_repr(f64::try_from(key.clone())?)
                        }
                    }
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
                    ValueKind::None => "null".into(),
                    other => {
                        return Err(json_err(format!(
                            "keys must be str, int, float, bool or None, not {other}"
                        )));
                    }
                };
                pairs.push((k, item));
            }
            if style.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, item)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, level + 1, out);
                write_json_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(item, style, level + 1, out)?;
            }
            newline(style, level, out);
            out.push('}');
        }
        other => {
            return Err(json_err(format!(
                "Object of type {other} is not JSON serializable"
            )));
        }
    }
    Ok(())
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{:e}", f);
    let (mant, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                s.push_str(&"0".repeat(int_len - digits.len()));
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        } else {
            s.push_str("0.");
            s.push_str(&"0".repeat((-exp - 1) as usize));
            s.push_str(&digits);
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        s.push('e');
        s.push(if exp < 0 { '-' } else { '+' });
        s.push_str(&format!("{:02}", exp.abs()));
    }
    s
}

// ----------------------------------------------------------------------------------------
// strftime_now: Python's datetime.now().strftime(fmt), in UTC.
// ----------------------------------------------------------------------------------------

pub(super) fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(&fmt, secs)))
}

/// Format a Unix time (UTC) with the common C `strftime` directives.
pub(crate) fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let wd = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{:02}", m)),
            Some('d') => out.push_str(&format!("{:02}", d)),
            Some('e') => out.push_str(&format!("{:>2}", d)),
            Some('H') => out.push_str(&format!("{:02}", hh)),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{:02}", mm)),
            Some('S') => out.push_str(&format!("{:02}", ss)),
            Some('j') => out.push_str(&format!("{:03}", yday)),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('u') => out.push_str(&(wd + 1).to_string()),
            Some('w') => out.push_str(&((wd + 1) % 7).to_string()),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (123456.789, "123456.789"),
            (-2.5, "-2.5"),
            (0.0001, "0.0001"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime("%d %b %Y, %A %j %%", t),
            "29 Feb 2024, Thursday 060 %"
        );
        assert_eq!(strftime("%B %e %I%p", 0), "January  1 12AM");
    }

    #[test]
    fn format_numbers_are_bounded_in_fields_only() {
        assert!(check_format_numbers("{:>10} {0} {name:.3f} 123456789", b'{', b'}').is_ok());
        assert!(check_format_numbers("{{123456789}}", b'{', b'}').is_ok());
        assert!(check_format_numbers("{:>123456789}", b'{', b'}').is_err());
        assert!(check_format_numbers("%05d %.2f %% 123456789 %s", b'%', 0).is_ok());
        assert!(check_format_numbers("%123456789d", b'%', 0).is_err());
        assert!(check_format_numbers("%.99999999999999999999999f", b'%', 0).is_err());
    }
}
