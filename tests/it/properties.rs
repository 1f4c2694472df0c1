//! Property tests: the response rewrite, the sale parser and the config parser on generated
//! input. Case counts are kept moderate so CI stays fast; the fuzz targets go deeper.

use std::path::Path;

use http::StatusCode;
use pos_crm_proxy::config::{Config, NoEnv};
use pos_crm_proxy::json::Object;
use pos_crm_proxy::sales::model::{CrmStatus, InvoicePayload, Sale};
use pos_crm_proxy::sales::rewrite::{rewrite, Outcome};
use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value, a few levels deep, with awkward strings and numbers.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("\"\\\\\u{0}\u{2028}é𝄞".to_string()),
            Just(String::new())
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-zA-Z]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A POS-like answer object as text, with the keys the rewrite touches sometimes present and
/// sometimes of the wrong type, pretty or compact.
fn pos_answer() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(("[a-z]{1,6}", json_value()), 0..5),
        prop::option::of(prop_oneof![
            "\\PC{0,30}".prop_map(Value::String),
            Just(Value::String(
                "Sale completed successfully with all inventory updates".into()
            )),
            Just(Value::String(
                "Sale completed successfully (1 inventory updates failed)".into()
            )),
            json_value(),
        ]),
        prop::option::of(prop_oneof![
            prop::collection::vec("\\PC{0,10}".prop_map(Value::String), 0..3)
                .prop_map(Value::Array),
            Just(Value::Null),
            json_value(),
        ]),
        any::<bool>(),
    )
        .prop_map(|(members, message, warnings, pretty)| {
            let mut obj = serde_json::Map::new();
            obj.insert("success".into(), Value::Bool(true));
            obj.insert("saleId".into(), Value::String("POS_1_x".into()));
            for (k, v) in members {
                obj.insert(k, v);
            }
            if let Some(m) = message {
                obj.insert("message".into(), m);
            }
            if let Some(w) = warnings {
                obj.insert("warnings".into(), w);
            }
            let v = Value::Object(obj);
            if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            }
        })
}

fn crm_status() -> impl Strategy<Value = Option<CrmStatus>> {
    prop_oneof![
        Just(None),
        ("\\PC{0,10}", "\\PC{0,10}")
            .prop_map(|(id, n)| Some(CrmStatus::created(Some(id), Some(n)))),
        (any::<bool>(), "\\PC{0,40}", prop::option::of(any::<bool>())).prop_map(|(avail, e, q)| {
            let mut s = CrmStatus::failed(avail, e);
            s.queued = q;
            Some(s)
        }),
    ]
}

const CHANGED: [&str; 3] = ["crmStatus", "message", "warnings"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn rewrite_keeps_every_other_byte_yields_json_and_is_idempotent(
        body in pos_answer(),
        status in prop::sample::select(vec![200u16, 201, 207]),
        crm in crm_status(),
    ) {
        let outcome = match &crm { None => Outcome::NoCustomer, Some(s) => Outcome::Crm(s) };
        let status = StatusCode::from_u16(status).unwrap();
        let once = rewrite(body.as_bytes(), status, outcome).unwrap();
        let v: Value = serde_json::from_slice(&once.body).expect("valid JSON");
        prop_assert!(v.get("crmStatus").is_some());
        // every member outside the spliced keys keeps its exact bytes, in order
        let before = Object::parse(&body).unwrap();
        let after_text = String::from_utf8(once.body.clone()).unwrap();
        let after = Object::parse(&after_text).unwrap();
        let kept = |o: &Object<'_>| o.members.iter()
            .filter(|m| !CHANGED.contains(&m.key.as_ref()))
            .map(|m| (m.key.to_string(), m.value.get().to_string()))
            .collect::<Vec<_>>();
        prop_assert_eq!(kept(&before), kept(&after));
        // and everything before the first changed member is byte-identical (no reformatting)
        let first_change = before.members.iter()
            .filter(|m| CHANGED.contains(&m.key.as_ref()))
            .map(|m| before.span(m.value).start)
            .min()
            .unwrap_or(before.append_position());
        prop_assert_eq!(&once.body[..first_change], &body.as_bytes()[..first_change]);
        let twice = rewrite(&once.body, once.status, outcome).unwrap();
        prop_assert_eq!(&twice.body, &once.body);
        prop_assert_eq!(twice.status, once.status);
    }

    #[test]
    fn rewrite_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let failed = CrmStatus::failed(true, "x");
        for outcome in [Outcome::NoCustomer, Outcome::Crm(&failed)] {
            if let Ok(r) = rewrite(&bytes, StatusCode::OK, outcome) {
                prop_assert!(serde_json::from_slice::<Value>(&r.body).is_ok());
            }
        }
    }

    #[test]
    fn the_sale_parser_never_panics_and_its_invoice_is_json(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            json_value().prop_map(|v| serde_json::to_vec(&serde_json::json!({
                "items": [v.clone(), {"id": v.clone(), "price": v.clone(), "quantity": v.clone(), "cost": v.clone(), "name": v.clone()}],
                // a fixed customer: the lines are only read when there is one
                "total": v.clone(), "customerId": "c", "customerName": v.clone(), "currency": v.clone(),
                "warehouseId": v.clone(), "paymentMethod": v,
            })).unwrap()),
        ],
    ) {
        if let Ok(sale) = Sale::parse(&bytes) {
            let p = InvoicePayload::build(&sale, "c", "n", "S", "2026-01-01", "USD");
            let text = serde_json::to_vec(&p).unwrap();
            let v: Value = serde_json::from_slice(&text).expect("the invoice payload is JSON");
            prop_assert_eq!(v["line_items"].as_array().map(|a| a.len()), Some(sale.items.len()));
        }
    }

    #[test]
    fn config_parsing_never_panics(text in "\\PC{0,120}", table in prop::sample::select(vec!["proxy", "upstream", "sales", "crm", "outbox", "tls", "limits", "log", "storage"]), key in "[a-z_]{1,24}", value in prop_oneof!["-?[0-9]{1,20}", "\"\\PC{0,20}\"", "\\[[0-9, ]{0,20}\\]", "true", "1e400"]) {
        let _ = Config::from_toml(&text, Path::new("p.toml"), &NoEnv);
        let _ = Config::from_toml(&format!("[{table}]\n{key} = {value}\n"), Path::new("p.toml"), &NoEnv);
    }
}
