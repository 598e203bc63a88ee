//! The PII scrubber: every rule, its false-positive guards, the audit, and proptests.

use std::sync::LazyLock;

use proptest::prelude::*;
use whet_data::pii::{Audit, Rule, Scrubber, iban_valid, luhn_valid};
use whet_data::split::record_id;
use whet_data::{DataError, Role};

use crate::common::*;

static SCRUBBER: LazyLock<Scrubber> = LazyLock::new(Scrubber::new);

fn scrub(s: &str) -> String {
    SCRUBBER.scrub_text(s).0
}

#[test]
fn email() {
    assert_eq!(
        scrub("Contact jane.doe+tag@mail.example.co.uk today."),
        "Contact [EMAIL] today."
    );
}

#[test]
fn phones_international_and_national() {
    for phone in [
        "+1 555 123 4567",
        "+44 20 7946 0958",
        "+49 (0)30 1234567",
        "+33 6 12 34 56 78",
        "+15551234567",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "1-555-123-4567",
        "020 7946 0958",
        "06 12 34 56 78",
        "030 1234567",
    ] {
        assert_eq!(
            scrub(&format!("call {phone} now")),
            "call [PHONE] now",
            "{phone}"
        );
    }
}

#[test]
fn not_phones() {
    for s in [
        "order 12345678901 shipped",
        "it costs 5551234567 dollars",
        "on 2024-01-15 at 12:30:45",
        "on 15.01.2024 and 01/02/2024",
        "room 101, floor 3",
        "call 12345",
    ] {
        assert_eq!(scrub(s), s);
    }
}

#[test]
fn cards_luhn_checked_with_separators() {
    for card in [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "378282246310005",
        "6011111111111117",
        "5555 5555 5555 4444",
    ] {
        assert!(luhn_valid(card), "{card}");
        assert_eq!(scrub(&format!("card: {card}.")), "card: [CARD].", "{card}");
    }
    // Two cards written back to back are both found.
    assert_eq!(
        scrub("4111 1111 1111 1111 5555 5555 5555 4444"),
        "[CARD] [CARD]"
    );
    // A card followed by a year is still found, and the year survives.
    assert_eq!(scrub("4111 1111 1111 1111 2031"), "[CARD] 2031");
}

#[test]
fn numbers_failing_luhn_are_left_alone() {
    for s in [
        "order 4111111111111112",
        "tracking 1234 5678 9012 3456",
        "pi is 3.14159265358979323846",
        "id 40000000000000000000000001",
    ] {
        assert_eq!(scrub(s), s);
    }
}

#[test]
fn iban_mod97() {
    for iban in [
        "DE89 3704 0044 0532 0130 00",
        "GB82WEST12345698765432",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
    ] {
        assert!(iban_valid(iban), "{iban}");
        assert_eq!(
            scrub(&format!("pay to {iban} please")),
            "pay to [IBAN] please"
        );
    }
    for bad in ["DE00 3704 0044 0532 0130 00", "GB82WEST12345698765433"] {
        assert!(!iban_valid(bad), "{bad}");
        assert!(!scrub(bad).contains("[IBAN]"), "{bad}");
    }
    // An IBAN followed by an unrelated upper-case code.
    assert_eq!(scrub("DE89 3704 0044 0532 0130 00 REF1 X"), "[IBAN] REF1 X");
}

#[test]
fn ip_addresses() {
    assert_eq!(scrub("from 192.168.1.254:8080"), "from [IP]:8080");
    assert_eq!(scrub("host 8.8.8.8."), "host [IP].");
    assert_eq!(scrub("v6 2001:db8::8a2e:370:7334 ok"), "v6 [IP] ok");
    assert_eq!(scrub("ll fe80::1ff:fe23:4567:890a"), "ll [IP]");
    assert_eq!(scrub("mapped ::ffff:192.0.2.1"), "mapped [IP]");
    for s in [
        "256.1.1.1",
        "1.2.3.4.5",
        "version 10.0.01.2",
        "std::collections::HashMap",
        "a::b",
        "12:30:45",
    ] {
        assert_eq!(scrub(s), s);
    }
}

#[test]
fn national_ids() {
    assert_eq!(scrub("SSN 123-45-6789."), "SSN [ID].");
    assert_eq!(scrub("NINO AB123456C"), "NINO [ID]");
    assert_eq!(scrub("NINO AB 12 34 56 C"), "NINO [ID]");
    for s in [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "123-00-4567",
        "123-45-0000",
        "GB123456A",
        "123-45-6789-0",
    ] {
        assert_eq!(scrub(s), s);
    }
}

#[test]
fn custom_rules_named_and_prioritised() {
    let s = Scrubber::new()
        .with_custom("employee_id", r"EMP-\d{5}")
        .unwrap();
    let (out, counts) = s.scrub_text("EMP-12345 mailed bob@example.com");
    assert_eq!(out, "[EMPLOYEE_ID] mailed [EMAIL]");
    assert_eq!(counts.get("employee_id"), Some(&1));
    assert_eq!(counts.get("email"), Some(&1));

    let err = Scrubber::new().with_custom("bad", "(unclosed").unwrap_err();
    assert!(matches!(err, DataError::BadRuleRegex { .. }), "{err:?}");
    assert!(err.to_string().contains("`bad`"));
    let err = Scrubber::new().with_custom("has space", "x").unwrap_err();
    assert!(matches!(err, DataError::InvalidConfig { .. }), "{err:?}");
}

#[test]
fn only_selected_rules_apply() {
    let s = Scrubber::with_rules(&[Rule::Email]);
    assert_eq!(
        s.scrub_text("a@b.io 4111111111111111").0,
        "[EMAIL] 4111111111111111"
    );
}

#[test]
fn scrubs_every_text_field_and_audits_without_values() {
    let examples = vec![
        ex(text("mail me: a.b@c.org"), 1),
        ex(pc("my ip is 10.0.0.1", "noted, call +1 555 123 4567"), 2),
        ex(
            conv(&[
                (Role::System, "no pii here"),
                (Role::User, "card 4111111111111111"),
                (Role::Assistant, "never share 4111 1111 1111 1111"),
            ]),
            3,
        ),
        ex(text("clean"), 4),
    ];
    let before: Vec<u64> = examples.iter().map(|e| e.id).collect();
    let (out, audit) = Scrubber::new().scrub_all(examples);
    assert_eq!(out[0].record, text("mail me: [EMAIL]"));
    assert_eq!(out[1].record, pc("my ip is [IP]", "noted, call [PHONE]"));
    assert_eq!(
        out[2].record,
        conv(&[
            (Role::System, "no pii here"),
            (Role::User, "card [CARD]"),
            (Role::Assistant, "never share [CARD]"),
        ])
    );
    assert_eq!(out[3].record, text("clean"));
    // Ids follow content: changed for scrubbed examples, same for the clean one.
    for e in &out {
        assert_eq!(e.id, record_id(&e.record));
    }
    assert_ne!(out[0].id, before[0]);
    assert_eq!(out[3].id, before[3]);

    assert_eq!(audit.examples_scanned, 4);
    assert_eq!(audit.examples_touched, 3);
    assert_eq!(audit.redactions.get("card"), Some(&2));
    assert_eq!(audit.redactions.get("email"), Some(&1));
    assert_eq!(audit.redactions.get("ipv4"), Some(&1));
    assert_eq!(audit.redactions.get("phone"), Some(&1));
    let rows: Vec<u64> = audit.rows.iter().map(|r| r.origin.row).collect();
    assert_eq!(rows, vec![1, 2, 3]);
    assert_eq!(audit.rows[2].id, out[2].id);

    let json = audit.to_json();
    for secret in ["a.b@c.org", "10.0.0.1", "555 123 4567", "4111"] {
        assert!(!json.contains(secret), "audit leaks {secret}: {json}");
    }
    let dir = tmp();
    let path = dir.path().join("audit.json");
    audit.write_json(&path).unwrap();
    let back: Audit = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, audit);
}

// ---- properties ----

fn words() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z]{1,8}", 0..6).prop_map(|w| w.join(" "))
}

/// 12..=18 random digits plus the Luhn check digit (or, with `valid = false`, a wrong one).
fn card_digits(valid: bool) -> impl Strategy<Value = String> {
    (prop::collection::vec(0u8..10, 12..=18), 1u8..10).prop_map(move |(body, off)| {
        let mut s: String = body.iter().map(|d| char::from(b'0' + d)).collect();
        let check = (0u8..10)
            .find(|c| luhn_valid(&format!("{s}{c}")))
            .expect("one check digit fits");
        let digit = if valid { check } else { (check + off) % 10 };
        s.push(char::from(b'0' + digit));
        s
    })
}

/// Plain, or grouped by four with spaces or dashes.
fn formatted(digits: &str, style: u8) -> String {
    let sep = match style {
        0 => return digits.to_string(),
        1 => " ",
        _ => "-",
    };
    digits
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(sep)
}

proptest! {
    #[test]
    fn never_leaves_a_luhn_valid_card(
        pre in words(), post in words(), digits in card_digits(true), style in 0u8..3
    ) {
        let card = formatted(&digits, style);
        let input = format!("{pre} {card} {post}");
        let (out, counts) = SCRUBBER.scrub_text(&input);
        prop_assert!(!out.chars().any(|c| c.is_ascii_digit()), "{input:?} -> {out:?}");
        prop_assert_eq!(counts.get("card"), Some(&1));
        prop_assert_eq!(out, format!("{pre} [CARD] {post}"));
    }

    #[test]
    fn never_alters_a_number_failing_luhn(
        pre in words(), post in words(), digits in card_digits(false), style in 0u8..3
    ) {
        let number = formatted(&digits, style);
        prop_assert!(!luhn_valid(&number));
        let input = format!("{pre} {number} {post}");
        prop_assert_eq!(scrub(&input), input);
    }

    #[test]
    fn scrubbing_is_idempotent(s in "[a-zA-Z0-9@.+:() -]{0,60}") {
        let once = scrub(&s);
        prop_assert_eq!(scrub(&once), once.clone());
    }
}
