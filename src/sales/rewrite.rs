//! The response rewrite: adds `crmStatus` to the POS's answer and adjusts `message`,
//! `warnings` and the status, by splicing bytes into the original JSON.
//!
//! Re-serialising the document would reorder keys and reformat numbers (`10.10` → `10.1`),
//! which is not acceptable for a till's money; so every byte outside the members changed here
//! stays as the POS wrote it. Applying the same rewrite to an already rewritten body changes
//! nothing more (no second warning, no second message suffix).

use http::StatusCode;

use super::model::CrmStatus;
use crate::json::{self, Object};

/// The message the POS writes when every inventory update worked; the only one the CRM outcome
/// replaces outright.
const ALL_INVENTORY_OK: &str = "Sale completed successfully with all inventory updates";
const SALE_COMPLETED: &str = "Sale completed successfully";
const CREATION_FAILED: &str = "CRM invoice creation failed";
const SERVICE_UNAVAILABLE: &str = "CRM service unavailable - invoice not created";

/// A rewritten answer: the new body and the status to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub body: Vec<u8>,
    pub status: StatusCode,
}

/// Why a body could not be rewritten (it is then passed on untouched).
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("POS answer is not a JSON object: {0}")]
    NotJson(#[from] json::ParseError),
}

/// What to add to the answer.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Completed sale without a customer: only `"crmStatus": null`.
    NoCustomer,
    /// Completed sale with a customer: the CRM outcome.
    Crm(&'a CrmStatus),
}

struct Splice {
    at: std::ops::Range<usize>,
    text: String,
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialise")
}

/// The message after the CRM outcome, or `None` to leave it as it is.
fn new_message(message: &str, status: &CrmStatus) -> Option<String> {
    if status.invoice_created {
        if message == ALL_INVENTORY_OK {
            let number = status.invoice_number.as_deref().unwrap_or("created");
            return Some(format!(
                "Sale completed successfully with inventory updates and CRM invoice {number}"
            ));
        }
        return None;
    }
    let note = if status.service_available {
        CREATION_FAILED
    } else {
        SERVICE_UNAVAILABLE
    };
    if message.contains(note) {
        return None;
    }
    if let Some(open) = message.rfind(" (").filter(|_| message.ends_with(')')) {
        let inner = &message[open + 2..message.len() - 1];
        let head = &message[..open];
        return Some(format!("{head} ({inner}, {note})"));
    }
    if message == ALL_INVENTORY_OK {
        return Some(format!("{SALE_COMPLETED} ({note})"));
    }
    Some(format!("{message} ({note})"))
}

/// Adds the outcome to a POS answer. `status` is the POS's status; a failed invoice turns 200
/// into 207 like the original integration did.
pub fn rewrite(
    body: &[u8],
    status: StatusCode,
    outcome: Outcome<'_>,
) -> Result<Rewritten, RewriteError> {
    let obj = Object::parse_bytes(body)?;
    rewrite_parsed(&obj, status, outcome)
}

/// [`rewrite`] of an answer already parsed (the sales route parses it once, to see whether
/// the sale completed, and splices into that same parse).
pub fn rewrite_parsed(
    obj: &Object<'_>,
    status: StatusCode,
    outcome: Outcome<'_>,
) -> Result<Rewritten, RewriteError> {
    let src = obj.source();
    let mut splices: Vec<Splice> = Vec::new();
    let mut appended = String::new();

    // crmStatus: replace every existing one (an already rewritten body), else append.
    let crm_json = match outcome {
        Outcome::NoCustomer => "null".to_string(),
        Outcome::Crm(s) => serde_json::to_string(s).expect("CrmStatus serialises"),
    };
    let existing: Vec<_> = obj.all("crmStatus").map(|m| obj.span(m.value)).collect();
    if existing.is_empty() {
        appended.push_str(",\"crmStatus\":");
        appended.push_str(&crm_json);
    } else {
        for at in existing {
            splices.push(Splice {
                at,
                text: crm_json.clone(),
            });
        }
    }

    let mut new_status = status;
    if let Outcome::Crm(crm) = outcome {
        if let Some(member) = obj.members.iter().rev().find(|m| m.key == "message") {
            if let Some(message) = json::as_str(member.value) {
                if let Some(text) = new_message(&message, crm) {
                    splices.push(Splice {
                        at: obj.span(member.value),
                        text: json_string(&text),
                    });
                }
            }
        }
        if !crm.invoice_created {
            let warning = format!(
                "{CREATION_FAILED}: {}",
                crm.error.as_deref().unwrap_or("unknown error")
            );
            match obj.members.iter().rev().find(|m| m.key == "warnings") {
                Some(member) if member.value.get() == "null" => {
                    // `"warnings": null` means none: the list starts here.
                    splices.push(Splice {
                        at: obj.span(member.value),
                        text: format!("[{}]", json_string(&warning)),
                    });
                }
                Some(member) => {
                    let raw = member.value.get();
                    if let Ok(list) = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(raw)
                    {
                        let present = list
                            .iter()
                            .any(|w| json::as_str(w).as_deref() == Some(warning.as_str()));
                        if !present {
                            let span = obj.span(member.value);
                            let close = span.end - 1; // the `]`
                            let text = if list.is_empty() {
                                json_string(&warning)
                            } else {
                                format!(",{}", json_string(&warning))
                            };
                            splices.push(Splice {
                                at: close..close,
                                text,
                            });
                        }
                    }
                    // `warnings` that is not an array is the POS's business: left alone.
                }
                None => {
                    appended.push_str(",\"warnings\":[");
                    appended.push_str(&json_string(&warning));
                    appended.push(']');
                }
            }
            if status == StatusCode::OK {
                new_status = StatusCode::MULTI_STATUS;
            }
        }
    }

    if !appended.is_empty() {
        let at = obj.append_position();
        if obj.is_empty() {
            // `{` + `,"crmStatus"...` would be invalid: drop the leading comma.
            appended.remove(0);
        }
        splices.push(Splice {
            at: at..at,
            text: appended,
        });
    }

    splices.sort_by_key(|s| (s.at.start, s.at.end));
    let mut out = Vec::with_capacity(src.len() + 256);
    let mut pos = 0;
    for s in &splices {
        out.extend_from_slice(&src.as_bytes()[pos..s.at.start]);
        out.extend_from_slice(s.text.as_bytes());
        pos = s.at.end;
    }
    out.extend_from_slice(&src.as_bytes()[pos..]);
    Ok(Rewritten {
        body: out,
        status: new_status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> CrmStatus {
        CrmStatus::created(Some("uuid-1".into()), Some("INV-2025-0001".into()))
    }

    fn run(body: &str, status: u16, outcome: Outcome<'_>) -> (String, u16) {
        let r = rewrite(
            body.as_bytes(),
            StatusCode::from_u16(status).unwrap(),
            outcome,
        )
        .unwrap();
        let text = String::from_utf8(r.body).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
        (text, r.status.as_u16())
    }

    const UNAVAILABLE: &str = "Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)";

    #[test]
    fn table() {
        let failed = CrmStatus::failed(
            true,
            "CRM API error: 500 Internal Server Error - Database error",
        );
        let down = CrmStatus::failed(false, "CRM service not configured");
        let ok = created();
        let in_list = format!(r#"{{"message":"{UNAVAILABLE}","warnings":["w1"]}}"#);
        let in_list_created = format!(
            r#"{{"message":"{UNAVAILABLE}","warnings":["w1"],"crmStatus":{{"serviceAvailable":true,"invoiceCreated":true,"invoice_id":"uuid-1","invoice_number":"INV-2025-0001","error":null}}}}"#
        );
        let empty_warnings = format!(r#"{{"message":"{UNAVAILABLE}","warnings":[ ]}}"#);
        let cases: Vec<(&str, u16, Outcome<'_>, &str, u16)> = vec![
            // no customer: exactly `"crmStatus":null` appended, nothing else
            (
                r#"{"success":true,"saleId":"S","total":10.10}"#,
                207,
                Outcome::NoCustomer,
                r#"{"success":true,"saleId":"S","total":10.10,"crmStatus":null}"#,
                207,
            ),
            // created + all inventory ok: message names the invoice
            (
                r#"{"success":true,"message":"Sale completed successfully with all inventory updates"}"#,
                200,
                Outcome::Crm(&ok),
                r#"{"success":true,"message":"Sale completed successfully with inventory updates and CRM invoice INV-2025-0001","crmStatus":{"serviceAvailable":true,"invoiceCreated":true,"invoice_id":"uuid-1","invoice_number":"INV-2025-0001","error":null}}"#,
                200,
            ),
            // created + parenthesised message: message stays
            (&in_list, 207, Outcome::Crm(&ok), &in_list_created, 207),
            // failed, no list, 200 → 207, warnings created after crmStatus
            (
                r#"{"message":"Sale completed successfully with all inventory updates"}"#,
                200,
                Outcome::Crm(&failed),
                r#"{"message":"Sale completed successfully (CRM invoice creation failed)","crmStatus":{"serviceAvailable":true,"invoiceCreated":false,"invoice_id":null,"invoice_number":null,"error":"CRM API error: 500 Internal Server Error - Database error"},"warnings":["CRM invoice creation failed: CRM API error: 500 Internal Server Error - Database error"]}"#,
                207,
            ),
            // failed into an existing list and an existing warnings array
            (
                r#"{"message":"Sale completed successfully (1 inventory updates failed)","warnings":["Inventory update failed for item x: fetch failed"]}"#,
                207,
                Outcome::Crm(&failed),
                r#"{"message":"Sale completed successfully (1 inventory updates failed, CRM invoice creation failed)","warnings":["Inventory update failed for item x: fetch failed","CRM invoice creation failed: CRM API error: 500 Internal Server Error - Database error"],"crmStatus":{"serviceAvailable":true,"invoiceCreated":false,"invoice_id":null,"invoice_number":null,"error":"CRM API error: 500 Internal Server Error - Database error"}}"#,
                207,
            ),
            // service unavailable wording, empty warnings array
            (
                &empty_warnings,
                207,
                Outcome::Crm(&down),
                r#"{"message":"Sale completed successfully (inventory service unavailable - manual stock adjustment may be required, CRM service unavailable - invoice not created)","warnings":[ "CRM invoice creation failed: CRM service not configured"],"crmStatus":{"serviceAvailable":false,"invoiceCreated":false,"invoice_id":null,"invoice_number":null,"error":"CRM service not configured"}}"#,
                207,
            ),
            // empty object: no leading comma
            ("{}", 200, Outcome::NoCustomer, r#"{"crmStatus":null}"#, 200),
            // whitespace and formatting outside the changed members survive
            (
                "{\n  \"a\": 1.50 ,\n  \"b\": [ 1 ]\n}\n",
                201,
                Outcome::NoCustomer,
                "{\n  \"a\": 1.50 ,\n  \"b\": [ 1 ],\"crmStatus\":null\n}\n",
                201,
            ),
            // `warnings: null` is no list yet
            (
                r#"{"message":"m","warnings":null}"#,
                207,
                Outcome::Crm(&failed),
                r#"{"message":"m (CRM invoice creation failed)","warnings":["CRM invoice creation failed: CRM API error: 500 Internal Server Error - Database error"],"crmStatus":{"serviceAvailable":true,"invoiceCreated":false,"invoice_id":null,"invoice_number":null,"error":"CRM API error: 500 Internal Server Error - Database error"}}"#,
                207,
            ),
            // a message that is no string, warnings that are no array: left alone
            (
                r#"{"message":5,"warnings":"x"}"#,
                200,
                Outcome::Crm(&failed),
                r#"{"message":5,"warnings":"x","crmStatus":{"serviceAvailable":true,"invoiceCreated":false,"invoice_id":null,"invoice_number":null,"error":"CRM API error: 500 Internal Server Error - Database error"}}"#,
                207,
            ),
        ];
        for (i, (body, status, outcome, want, want_status)) in cases.into_iter().enumerate() {
            let (got, got_status) = run(body, status, outcome);
            assert_eq!(got, want, "case {i}");
            assert_eq!(got_status, want_status, "case {i}");
        }
    }

    #[test]
    fn rewriting_twice_changes_nothing_more() {
        let failed = CrmStatus::failed(true, "boom");
        for (body, outcome) in [
            (
                r#"{"message":"Sale completed successfully with all inventory updates"}"#,
                Outcome::Crm(&failed),
            ),
            (
                r#"{"message":"Sale completed successfully (x)","warnings":[]}"#,
                Outcome::Crm(&failed),
            ),
            (r#"{"a":1}"#, Outcome::NoCustomer),
        ] {
            let (once, status) = run(body, 200, outcome);
            let (twice, status2) = run(&once, status, outcome);
            assert_eq!(once, twice);
            assert_eq!(status, status2);
        }
        let ok = created();
        let (once, _) = run(
            r#"{"message":"Sale completed successfully with all inventory updates"}"#,
            200,
            Outcome::Crm(&ok),
        );
        let (twice, _) = run(&once, 200, Outcome::Crm(&ok));
        assert_eq!(once, twice);
    }

    #[test]
    fn strings_are_escaped() {
        let nasty = CrmStatus::failed(true, "quote \" backslash \\ newline \n </script>");
        let (text, _) = run(r#"{"message":"m"}"#, 200, Outcome::Crm(&nasty));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["crmStatus"]["error"],
            "quote \" backslash \\ newline \n </script>"
        );
        assert_eq!(v["message"], "m (CRM invoice creation failed)");
    }

    #[test]
    fn not_json_is_refused() {
        for body in ["", "null", "[1]", "<html>", "{\"a\":1"] {
            assert!(
                rewrite(body.as_bytes(), StatusCode::OK, Outcome::NoCustomer).is_err(),
                "{body}"
            );
        }
    }
}
