//! Fuzzes the sale parser and the invoice payload built from it.
//!
//! Input: a sale request body, as a till would POST it. Checks, beyond "no panic":
//! - `Sale::parse` accepts exactly the bodies that are one JSON object once a UTF-8 BOM is
//!   skipped and invalid UTF-8 is replaced (as the POS reads them);
//! - for every parsed sale, `InvoicePayload::build` (fixed ids) serialises with `serde_json`
//!   to JSON (strictly, via `serde_json::Value`, whenever the body was strict JSON) that reads
//!   back as an `InvoicePayload`;
//! - every money field of the payload (`amount`, `paid_amount`, and each line's `quantity`,
//!   `price`, `total`, `cost_price`) is a JSON number;
//! - a `total` written as a JSON number (within f64's range) reaches `amount` digit for digit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pos_crm_proxy::json::Object;
use pos_crm_proxy::sales::model::{InvoicePayload, Sale};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// Whether `raw` is a JSON number (RFC 8259 grammar; JSON puts no limit on its range).
fn is_number(raw: &RawValue) -> bool {
    let t = raw.get().as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < t.len() && t[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if t.first() == Some(&b'-') {
        i += 1;
    }
    match t.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if t.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == t.len()
}

fuzz_target!(|data: &[u8]| {
    let unbommed = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let text = String::from_utf8_lossy(unbommed);
    let is_object = Object::parse(&text).is_ok();
    let sale = match Sale::parse(data) {
        Ok(sale) => sale,
        Err(e) => {
            assert!(!is_object, "a JSON object was refused: {e}");
            return;
        }
    };
    assert!(is_object, "a body that is no JSON object was read as a sale");

    let payload = InvoicePayload::build(
        &sale,
        "customer-123",
        "John Doe",
        "POS_1795586791062_cnttqx05g",
        "2026-11-25",
        "USD",
    );
    let bytes = match serde_json::to_vec(&payload) {
        Ok(b) => b,
        Err(e) => panic!("payload does not serialise: {e}"),
    };
    if let Err(e) = serde_json::from_slice::<IgnoredAny>(&bytes) {
        panic!("payload is not JSON: {e}");
    }
    if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            panic!("payload of a strict JSON sale is not strict JSON: {e}");
        }
    }
    let back: InvoicePayload = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => panic!("payload does not read back: {e}"),
    };
    assert_eq!(back.line_items.len(), sale.items.len(), "line count");

    let money = |what: &str, raw: &RawValue| {
        assert!(
            is_number(raw),
            "{what} is not a JSON number: {} (sale: {text:?})",
            raw.get()
        );
    };
    money("amount", &payload.amount);
    money("paid_amount", &payload.paid_amount);
    for line in &payload.line_items {
        money("quantity", &line.quantity);
        money("price", &line.price);
        money("total", &line.total);
        money("cost_price", &line.cost_price);
    }
    // (A total beyond f64's range, such as 1e400, is not taken as a number by the parser and
    // gives an amount of 0: left out of this check.)
    let in_range = |t: &&RawValue| serde_json::from_str::<serde_json::Number>(t.get()).is_ok();
    if let Some(total) = sale.total.as_deref().filter(in_range) {
        assert_eq!(payload.amount.get(), total.get(), "amount lost digits");
    }
});
