//! Fuzzes the response rewrite (`sales::rewrite::rewrite`).
//!
//! Input: one selector byte, then the POS answer body. The selector's low 4 bits pick the CRM
//! outcome, bits 4-5 the POS status. Beyond "no panic", every run checks:
//! - `rewrite` accepts exactly the bodies that are one JSON object (`json::Object::parse_bytes`);
//! - the output is JSON (strictly, via `serde_json::Value`, whenever the input was), an object,
//!   and every `crmStatus` member in it holds exactly the outcome's JSON;
//! - every byte outside the values of `crmStatus`, `message` and `warnings` is kept: the output
//!   is the input with those values blanked out, plus at most the appended
//!   `,"crmStatus":…` / `,"warnings":…` members at the append position;
//! - in particular every other top-level member keeps its exact raw bytes, in order;
//! - the status only changes 200 → 207, and only for a failed invoice;
//! - rewriting the output again with the same outcome gives identical bytes and status.
#![no_main]

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use pos_crm_proxy::json::Object;
use pos_crm_proxy::sales::model::CrmStatus;
use pos_crm_proxy::sales::rewrite::{rewrite, Outcome};
use serde::de::IgnoredAny;

const STATUSES: [u16; 4] = [200, 207, 201, 202];

/// `None`: no customer; otherwise the CRM status to splice in.
fn outcome(selector: u8) -> Option<CrmStatus> {
    let queued = |mut s: CrmStatus| {
        s.queued = Some(true);
        s
    };
    Some(match selector & 0x0f {
        0 => return None,
        1 => CrmStatus::created(Some("uuid-1".into()), Some("INV-2025-0001".into())),
        2 => CrmStatus::created(None, None),
        3 => CrmStatus::created(
            Some("id \"quoted\" \\ \u{2028}".into()),
            Some("INV </script> \u{0} (x)".into()),
        ),
        4 => CrmStatus::failed(
            true,
            "CRM API error: 500 Internal Server Error - Database error",
        ),
        5 => CrmStatus::failed(false, "CRM service not configured"),
        6 => CrmStatus::failed(
            true,
            "quote \" backslash \\ newline \n tab \t nul \0 </script> \u{fffd} \u{1F600} ) (",
        ),
        7 => queued(CrmStatus::failed(
            false,
            "CRM did not answer within 1500 ms; invoice queued for delivery",
        )),
        8 => CrmStatus::failed(true, ""),
        9 => CrmStatus::failed(false, "CRM invoice creation failed"),
        10 => CrmStatus::failed(true, "CRM service unavailable - invoice not created"),
        11 => queued(CrmStatus::failed(true, "x")),
        12 => CrmStatus {
            // not a state the proxy makes, but the rewrite must still hold
            error: Some("created, yet with an error".into()),
            ..CrmStatus::created(Some("i".into()), None)
        },
        13 => CrmStatus {
            error: None,
            ..CrmStatus::failed(true, "")
        },
        14 => CrmStatus::failed(false, ")"),
        _ => CrmStatus::failed(true, " ("),
    })
}

const BLANK: &str = "\u{1}";
const SPLICED: [&str; 3] = ["crmStatus", "message", "warnings"];

/// The source with the values of the spliced keys replaced by `BLANK` (a character raw JSON
/// cannot hold), and the append position in that text.
fn skeleton(obj: &Object<'_>) -> (String, usize) {
    let src = obj.source();
    let append = obj.append_position();
    let mut out = String::with_capacity(src.len());
    let mut pos = 0;
    let mut append_at = None;
    for m in &obj.members {
        let span = obj.span(m.value);
        if !SPLICED.contains(&m.key.as_ref()) {
            continue;
        }
        out.push_str(&src[pos..span.start]);
        out.push_str(BLANK);
        pos = span.end;
        if pos == append {
            append_at = Some(out.len());
        }
    }
    let append_at = append_at.unwrap_or_else(|| out.len() + (append - pos));
    out.push_str(&src[pos..]);
    (out, append_at)
}

fn kept_members<'a>(obj: &'a Object<'a>) -> Vec<(&'a str, &'a str)> {
    obj.members
        .iter()
        .filter(|m| !SPLICED.contains(&m.key.as_ref()))
        .map(|m| (m.key.as_ref(), m.value.get()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let status = StatusCode::from_u16(STATUSES[usize::from(selector >> 4) & 3]).unwrap();
    let crm = outcome(selector);
    let outcome = match &crm {
        None => Outcome::NoCustomer,
        Some(s) => Outcome::Crm(s),
    };
    let crm_json = match &crm {
        None => "null".to_string(),
        Some(s) => serde_json::to_string(s).unwrap(),
    };

    let input = Object::parse_bytes(body);
    let result = rewrite(body, status, outcome);
    let (input, out) = match (input, result) {
        (Err(_), Err(_)) => return,
        (Ok(_), Err(e)) => panic!("a JSON object was refused: {e}"),
        (Err(e), Ok(_)) => panic!("a body that is no JSON object was rewritten ({e})"),
        (Ok(input), Ok(out)) => (input, out),
    };

    // Valid JSON, an object, with the outcome as every crmStatus.
    if let Err(e) = serde_json::from_slice::<IgnoredAny>(&out.body) {
        panic!("output is not JSON: {e}");
    }
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        match serde_json::from_slice::<serde_json::Value>(&out.body) {
            Ok(v) => {
                assert!(v.is_object(), "output is no object");
                assert!(v.get("crmStatus").is_some(), "output has no crmStatus");
            }
            Err(e) => panic!("output of a strict JSON input is not strict JSON: {e}"),
        }
    }
    let output = Object::parse_bytes(&out.body).expect("output is a JSON object");
    assert!(output.get("crmStatus").is_some(), "output has no crmStatus");
    for m in output.all("crmStatus") {
        assert_eq!(m.value.get(), crm_json, "crmStatus is not the outcome");
    }

    // Nothing outside the spliced values changed; additions only at the append position.
    assert_eq!(
        kept_members(&input),
        kept_members(&output),
        "a member other than crmStatus/message/warnings changed"
    );
    let (before, at) = skeleton(&input);
    let (after, _) = skeleton(&output);
    let (head, tail) = before.split_at(at);
    assert!(
        after.len() >= before.len() && after.starts_with(head) && after.ends_with(tail),
        "bytes outside the spliced members changed:\n  in:  {before:?}\n  out: {after:?}"
    );
    let added = &after[head.len()..after.len() - tail.len()];
    let sep = if input.is_empty() { "" } else { "," };
    let allowed = [
        String::new(),
        format!("{sep}\"crmStatus\":{BLANK}"),
        format!("{sep}\"crmStatus\":{BLANK},\"warnings\":{BLANK}"),
        format!("{sep}\"warnings\":{BLANK}"),
    ];
    assert!(
        allowed.iter().any(|a| a == added),
        "unexpected text appended: {added:?}"
    );

    // The status: 200 → 207 for a failed invoice, else unchanged.
    let failed = crm.as_ref().is_some_and(|s| !s.invoice_created);
    let want = if failed && status == StatusCode::OK {
        StatusCode::MULTI_STATUS
    } else {
        status
    };
    assert_eq!(out.status, want, "status");

    // Idempotent.
    let again = rewrite(&out.body, out.status, outcome).expect("output rewrites again");
    assert_eq!(out.status, again.status, "second rewrite changed the status");
    if again.body != out.body {
        panic!(
            "second rewrite changed the body:\n  once:  {:?}\n  twice: {:?}",
            String::from_utf8_lossy(&out.body),
            String::from_utf8_lossy(&again.body)
        );
    }
});
