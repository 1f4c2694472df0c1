//! The sales route against the contract: every POS answer row, the invoice payload, crmStatus.

use std::time::Duration;

use pos_crm_proxy::demo::sample_crm::CrmScript;
use pos_crm_proxy::demo::sample_pos::{InventoryMode, SamplePos, SamplePosOptions};
use serde_json::{json, Value};

use crate::support::raw::RawUpstream;
use crate::support::{
    client, normalise, post_sale, Opts, Stack, TestProxy, SALE_NO_CUSTOMER, SALE_WITH_CUSTOMER,
};

/// POSTs `body` straight to the POS (no proxy) for comparison.
async fn direct(pos: &SamplePos, body: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{}/api/sales", pos.url()))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn pos_error_rows_pass_through_untouched_and_call_no_crm() {
    let s = Stack::start().await;
    for (body, status) in [
        (r#"{"items":[],"total":5,"customerId":"customer-123"}"#, 400),
        ("[1,2]", 400),
        (
            r#"{"items":[{"id":"a","price":1,"quantity":1}],"total":0,"customerId":"customer-123"}"#,
            400,
        ),
        (
            r#"{"items":[{"id":"a","price":1,"quantity":1}],"customerId":"customer-123"}"#,
            400,
        ),
        (
            r#"{"items":[{"id":"a","price":1,"quantity":1}],"total":-3}"#,
            400,
        ),
        (r#"{"items": [bad json"#, 500),
        ("", 500),
        ("null", 500),
        (
            r#"{"items":"abc","total":5,"customerId":"customer-123"}"#,
            500,
        ),
    ] {
        let (got_status, got, text) = s.sale(body).await;
        let (want_status, want) = direct(&s.pos, body).await;
        assert_eq!(got_status, status, "{body}");
        assert_eq!((got_status, &got), (want_status, &want), "{body}");
        assert!(!text.contains("crmStatus"), "{body}: {text}");
    }
    assert!(s.crm.invoice_posts().is_empty());
    assert!(s.pos.completed_sales().is_empty());
}

#[tokio::test]
async fn completed_sale_without_customer_only_gains_crm_status_null() {
    for mode in [
        InventoryMode::NotConfigured,
        InventoryMode::AllOk,
        InventoryMode::Failing,
    ] {
        let s = Stack::start_with(
            SamplePosOptions {
                inventory: mode,
                ..SamplePosOptions::default()
            },
            |o| o,
        )
        .await;
        let (status, got, text) = s.sale(SALE_NO_CUSTOMER).await;
        let (want_status, want) = direct(&s.pos, SALE_NO_CUSTOMER).await;
        assert_eq!(status, want_status, "{mode:?}");
        assert!(text.ends_with(r#","crmStatus":null}"#), "{mode:?}: {text}");
        let mut got = got;
        assert_eq!(
            got.as_object_mut().unwrap().remove("crmStatus"),
            Some(Value::Null)
        );
        assert_eq!(normalise(got), normalise(want), "{mode:?}");
        assert!(
            s.crm.invoice_posts().is_empty(),
            "no customer: the CRM is never called"
        );
    }
}

/// A POS that answers a fixed body: the proxy's answer must be those exact bytes plus
/// `,"crmStatus":null` — key order, spacing and `10.10` intact.
#[tokio::test]
async fn no_customer_answer_is_byte_identical_but_for_crm_status() {
    const BODY: &str = "{\"success\":true, \"saleId\":\"POS_1_abc\",\"total\":10.10,\"z\":1,\"a\":[1.0, 2.50],\n \"message\":\"Sale completed successfully\"}";
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 207 Multi-Status\r\ncontent-type: application/json\r\ncontent-length: {}\r\netag: \"v1\"\r\nconnection: close\r\n\r\n{BODY}",
            BODY.len()
        )
        .into_boxed_str(),
    );
    let up = RawUpstream::start(response).await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let r = client()
        .post(proxy.url("/api/sales"))
        .body(SALE_NO_CUSTOMER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 207);
    assert!(
        r.headers().get("etag").is_none(),
        "a stale validator must not survive a rewrite"
    );
    let text = r.text().await.unwrap();
    let want = format!("{},\"crmStatus\":null}}", &BODY[..BODY.len() - 1]);
    assert_eq!(text, want);
    // the POS received the request unchanged but for asking for an unencoded answer
    let seen = up.requests.lock().unwrap()[0].clone();
    assert!(
        seen.to_ascii_lowercase()
            .contains("accept-encoding: identity"),
        "{seen}"
    );
}

#[tokio::test]
async fn sale_with_customer_creates_the_contract_invoice() {
    let s = Stack::start().await;
    let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 207);
    let sale_id = v["saleId"].as_str().unwrap().to_string();
    assert!(sale_id.starts_with("POS_"));
    let year = time::OffsetDateTime::now_utc().year();
    let number = format!("INV-{year}-0001");
    assert_eq!(v["crmStatus"]["serviceAvailable"], true);
    assert_eq!(v["crmStatus"]["invoiceCreated"], true);
    assert_eq!(v["crmStatus"]["invoice_number"], number.as_str());
    assert_eq!(v["crmStatus"]["error"], Value::Null);
    let invoice = &s.crm.invoices()[0];
    assert_eq!(v["crmStatus"]["invoice_id"], invoice.invoice_id.as_str());
    // message with a parenthesised list stays, warnings untouched
    assert_eq!(
        v["message"],
        "Sale completed successfully (inventory service unavailable - manual stock adjustment may be required)"
    );
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1);

    let posts = s.crm.invoice_posts();
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert_eq!(post.path, "/api/external/invoices");
    assert_eq!(post.headers["x-api-key"], crate::support::KEY);
    assert_eq!(post.headers["content-type"], "application/json");
    assert_eq!(
        post.headers["idempotency-key"],
        format!("pos-sale-{sale_id}").as_str()
    );
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let want = json!({
        "customer_id": "customer-123", "customer": "John Doe", "amount": 11, "paid_amount": 11,
        "currency": "USD", "status": "paid", "date": today, "payment_method": "Credit Card",
        "pos_sale_id": sale_id, "warehouse_id": "WH1",
        "notes": format!("POS Sale #{sale_id} - Payment: Credit Card"),
        "line_items": [
            {"description": "Test Coffee", "quantity": 2, "price": 4.5, "total": 9, "sku": "test-product-1", "type": "product", "cost_price": 0},
            {"description": "Gift Wrapping", "quantity": 1, "price": 1, "total": 1, "sku": "test-service-1", "type": "service", "cost_price": 0}
        ]
    });
    let got = post.json.clone().unwrap();
    for (k, want_v) in want.as_object().unwrap() {
        assert_eq!(&got[k], want_v, "field {k}");
    }
    assert_eq!(
        got.as_object().unwrap().len(),
        want.as_object().unwrap().len(),
        "{got}"
    );
    // key order of the contract, too
    let raw = String::from_utf8(post.body.to_vec()).unwrap();
    assert!(raw.starts_with(r#"{"customer_id":"customer-123","customer":"John Doe","amount":11,"paid_amount":11,"currency":"USD","status":"paid","date":""#), "{raw}");
}

#[tokio::test]
async fn created_invoice_names_itself_when_all_inventory_updates_worked() {
    let s = Stack::start_with(
        SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..SamplePosOptions::default()
        },
        |o| o,
    )
    .await;
    let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 200);
    let year = time::OffsetDateTime::now_utc().year();
    assert_eq!(
        v["message"],
        format!(
            "Sale completed successfully with inventory updates and CRM invoice INV-{year}-0001"
        )
        .as_str()
    );
    assert!(v.get("warnings").is_none());
}

#[tokio::test]
async fn money_survives_the_rewrite_and_reaches_the_crm_as_written() {
    let s = Stack::start().await;
    let body = r#"{"items":[{"id":"sku-1","name":"Cheese","price":10.10,"quantity":0.5,"type":"product","cost":6.05}],"total":5.05,"paymentMethod":"Cash","customerId":"customer-123","customerName":"John Doe","currency":"EUR"}"#;
    let (status, _, text) = s.sale(body).await;
    assert_eq!(status, 207);
    assert!(text.contains(r#""price":10.10"#), "POS bytes kept: {text}");
    let raw = String::from_utf8(s.crm.invoice_posts()[0].body.to_vec()).unwrap();
    assert!(
        raw.contains(r#""amount":5.05,"paid_amount":5.05,"currency":"EUR""#),
        "{raw}"
    );
    assert!(
        raw.contains(r#""quantity":0.5,"price":10.10,"total":5.05"#),
        "{raw}"
    );
    assert!(raw.contains(r#""cost_price":6.05"#), "{raw}");
}

#[tokio::test]
async fn customer_without_name_is_looked_up_cached_and_falls_back_to_the_id() {
    let s = Stack::start().await;
    let sale = |id: &str| {
        SALE_WITH_CUSTOMER.replace(
            r#""customerId":"customer-123","customerName":"John Doe","#,
            &format!(r#""customerId":"{id}","#),
        )
    };
    let (_, v, _) = s.sale(&sale("customer-456")).await;
    assert_eq!(v["crmStatus"]["invoiceCreated"], true);
    let (_, v, _) = s.sale(&sale("customer-456")).await;
    assert_eq!(v["crmStatus"]["invoiceCreated"], true);
    let (_, v, _) = s.sale(&sale("walk-in-77")).await;
    assert_eq!(v["crmStatus"]["invoiceCreated"], true);
    let names: Vec<String> = s
        .crm
        .invoices()
        .iter()
        .map(|i| i.body["customer"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["Jane Smith", "Jane Smith", "walk-in-77"]);
    assert_eq!(
        s.crm.customer_lookups(),
        ["customer-456", "walk-in-77"],
        "the name is cached"
    );
}

#[tokio::test]
async fn gzip_from_the_pos_is_decoded_before_the_rewrite() {
    let s = Stack::start_with(
        SamplePosOptions {
            force_gzip: true,
            ..SamplePosOptions::default()
        },
        |o| o,
    )
    .await;
    let r = client()
        .post(s.proxy.url("/api/sales"))
        .header("accept-encoding", "gzip")
        .body(SALE_WITH_CUSTOMER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 207);
    assert!(r.headers().get("content-encoding").is_none());
    let len: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()[..len]).unwrap();
    assert_eq!(v["crmStatus"]["invoiceCreated"], true);
    // passthrough of a gzip answer stays gzip
    let r = client()
        .get(s.proxy.url("/api/sales"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn non_json_success_from_the_pos_passes_untouched() {
    let up = RawUpstream::start("HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 13\r\nconnection: close\r\n\r\n<html></html>").await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let (status, _, text) = post_sale(&proxy, SALE_WITH_CUSTOMER).await;
    assert_eq!((status, text.as_str()), (200, "<html></html>"));
}

#[tokio::test]
async fn integration_switched_off_is_pure_passthrough() {
    let s = Stack::start_with(SamplePosOptions::default(), |o| Opts {
        enabled: false,
        ..o
    })
    .await;
    let (status, v, text) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 207);
    assert!(!text.contains("crmStatus"), "{text}");
    assert_eq!(v["success"], true);
    assert!(s.crm.invoice_posts().is_empty());
}

#[tokio::test]
async fn only_exact_configured_paths_are_intercepted() {
    const ANSWER: &str = "HTTP/1.1 207 Multi-Status\r\ncontent-type: application/json\r\ncontent-length: 33\r\nconnection: close\r\n\r\n{\"success\":true,\"saleId\":\"POS_1\"}";
    let up = RawUpstream::start(ANSWER).await;
    let proxy = TestProxy::start(
        up.addr,
        Opts {
            intercept_paths: vec!["/api/sales".into(), "/api/v2/sales".into()],
            ..Opts::default()
        },
    )
    .await;
    let c = client();
    for (method, path, intercepted) in [
        ("POST", "/api/sales?from=till-2", true),
        ("POST", "/api/v2/sales", true),
        ("POST", "/api/v3/sales", false),
        ("POST", "/api/sales/extra", false),
        ("POST", "/API/SALES", false),
        ("PUT", "/api/sales", false),
        ("PATCH", "/api/v2/sales", false),
    ] {
        let r = c
            .request(method.parse().unwrap(), proxy.url(path))
            .body(SALE_NO_CUSTOMER)
            .send()
            .await
            .unwrap();
        let text = r.text().await.unwrap();
        let want = if intercepted {
            r#"{"success":true,"saleId":"POS_1","crmStatus":null}"#
        } else {
            r#"{"success":true,"saleId":"POS_1"}"#
        };
        assert_eq!(text, want, "{method} {path}");
    }
}

#[tokio::test]
async fn client_hanging_up_does_not_cancel_the_invoice() {
    let s = Stack::start_with(
        SamplePosOptions {
            sale_delay: Duration::from_millis(600),
            ..SamplePosOptions::default()
        },
        |o| o,
    )
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let r = impatient
        .post(s.proxy.url("/api/sales"))
        .body(SALE_WITH_CUSTOMER)
        .send()
        .await;
    assert!(r.is_err(), "the client gave up before the POS answered");
    assert!(
        s.crm.wait_for_invoices(1, Duration::from_secs(10)).await,
        "the completed sale still got its invoice"
    );
    assert_eq!(
        s.crm.invoices()[0].pos_sale_id.as_deref(),
        Some(s.pos.completed_sales()[0].as_str())
    );
}

#[tokio::test]
async fn oversized_sale_request_is_forwarded_untouched_without_invoice() {
    let s = Stack::start_with(SamplePosOptions::default(), |o| Opts {
        max_request_body: 64,
        ..o
    })
    .await;
    let (status, v, text) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 207, "the POS still completed the sale");
    assert_eq!(v["success"], true);
    assert!(!text.contains("crmStatus"));
    assert_eq!(
        s.pos.requests().last().unwrap().body,
        SALE_WITH_CUSTOMER.as_bytes()
    );
    assert!(s.crm.invoice_posts().is_empty());
}

#[tokio::test]
async fn a_sale_the_pos_completes_after_the_timeout_still_gets_its_invoice() {
    let s = Stack::start_with(
        SamplePosOptions {
            sale_delay: Duration::from_millis(800),
            ..SamplePosOptions::default()
        },
        |o| Opts {
            upstream_timeout_ms: 300,
            ..o
        },
    )
    .await;
    let (status, _, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(
        status, 504,
        "the till is told the POS did not answer in time"
    );
    assert!(
        s.crm.wait_for_invoices(1, Duration::from_secs(10)).await,
        "the late sale still got its invoice"
    );
    assert_eq!(
        s.crm.invoices()[0].pos_sale_id.as_deref(),
        Some(s.pos.completed_sales()[0].as_str())
    );
}

#[tokio::test]
async fn sales_are_read_the_way_the_pos_reads_them() {
    let s = Stack::start().await;
    // a UTF-8 byte-order mark, as some tills send it
    let bom = format!("\u{FEFF}{SALE_WITH_CUSTOMER}");
    let (status, v, _) = s.sale(&bom).await;
    assert_eq!(status, 207);
    assert_eq!(v["crmStatus"]["invoiceCreated"], true, "{v}");
    // a customer id of one space is a non-empty string: a selected customer. The proxy sends
    // it as written; this CRM refuses it, and the till is told so (not `crmStatus: null`).
    let blank = SALE_WITH_CUSTOMER.replace(r#""customerId":"customer-123""#, r#""customerId":" ""#);
    let (_, v, _) = s.sale(&blank).await;
    assert_eq!(v["crmStatus"]["invoiceCreated"], false, "{v}");
    assert!(
        v["crmStatus"]["error"]
            .as_str()
            .unwrap()
            .contains("customer_id"),
        "{v}"
    );
    let ids: Vec<String> = s
        .crm
        .invoice_posts()
        .iter()
        .map(|p| {
            p.json.as_ref().unwrap()["customer_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["customer-123", " "]);
}

#[tokio::test]
async fn a_crm_that_echoes_the_key_does_not_leak_it_to_the_till() {
    let s = Stack::start().await;
    s.crm.push_script(CrmScript::Status(
        401,
        format!(
            r#"{{"success":false,"error":"Invalid API key '{}'"}}"#,
            crate::support::KEY
        ),
    ));
    let (_, v, text) = s.sale(SALE_WITH_CUSTOMER).await;
    assert!(!text.contains(crate::support::KEY), "{text}");
    assert_eq!(
        v["crmStatus"]["error"].as_str().unwrap(),
        "CRM API error: 401 Unauthorized - Invalid API key '[redacted]'; invoices are held until an operator fixes the API key"
    );
}

#[tokio::test]
async fn an_oversized_pos_answer_passes_untouched_without_invoice() {
    let s = Stack::start_with(SamplePosOptions::default(), |o| Opts {
        max_response_body: 100,
        ..o
    })
    .await;
    let (status, v, text) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 207);
    assert_eq!(v["success"], true);
    assert!(!text.contains("crmStatus"));
    assert!(s.crm.invoice_posts().is_empty());
}

#[tokio::test]
async fn expect_100_continue_works_on_the_sales_route() {
    use tokio::io::AsyncWriteExt;
    let s = Stack::start().await;
    let mut sock = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let head = format!(
        "POST /api/sales HTTP/1.1\r\nHost: pos\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        SALE_WITH_CUSTOMER.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let interim = crate::support::raw::read_until(&mut sock, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    sock.write_all(SALE_WITH_CUSTOMER.as_bytes()).await.unwrap();
    let answer = crate::support::raw::read_until(&mut sock, "\"invoiceCreated\":true").await;
    assert!(answer.contains("HTTP/1.1 207"), "{answer}");
}
