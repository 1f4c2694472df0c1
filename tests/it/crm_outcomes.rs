//! Every way the CRM can fail: the till always gets its sale, with a crmStatus that says what
//! happened.

use std::time::{Duration, Instant};

use pos_crm_proxy::demo::sample_crm::CrmScript;
use pos_crm_proxy::demo::sample_pos::{InventoryMode, SamplePos, SamplePosOptions};
use serde_json::Value;

use crate::support::{post_sale, Opts, Stack, TestProxy, SALE_WITH_CUSTOMER};

/// Runs one sale (inventory all OK, so the POS answers 200) with the CRM scripted as `step`.
async fn sale_with(step: CrmScript) -> (Stack, u16, Value) {
    let s = Stack::start_with(
        SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..SamplePosOptions::default()
        },
        |o| Opts {
            sync_budget_ms: 2_000,
            ..o
        },
    )
    .await;
    s.crm.push_script(step);
    let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    (s, status, v)
}

fn assert_failed(status: u16, v: &Value, available: bool, error_contains: &str) {
    assert_eq!(status, 207, "200 becomes 207 when the invoice failed: {v}");
    assert_eq!(v["success"], true, "the sale itself never fails");
    let crm = &v["crmStatus"];
    assert_eq!(crm["invoiceCreated"], false, "{v}");
    assert_eq!(crm["serviceAvailable"], available, "{v}");
    assert_eq!(crm["invoice_id"], Value::Null);
    assert_eq!(crm["invoice_number"], Value::Null);
    let error = crm["error"].as_str().unwrap();
    assert!(
        error.contains(error_contains),
        "{error:?} should contain {error_contains:?}"
    );
    let note = if available {
        "CRM invoice creation failed"
    } else {
        "CRM service unavailable - invoice not created"
    };
    assert_eq!(
        v["message"],
        format!("Sale completed successfully ({note})").as_str()
    );
    let warnings = v["warnings"].as_array().unwrap();
    assert_eq!(
        warnings.last().unwrap(),
        &Value::String(format!("CRM invoice creation failed: {error}"))
    );
}

#[tokio::test]
async fn crm_400_is_reported_with_its_text() {
    let (_, status, v) = sale_with(CrmScript::Status(
        400,
        r#"{"success":false,"error":"amount: must be greater than 0"}"#.into(),
    ))
    .await;
    assert_failed(
        status,
        &v,
        true,
        "CRM API error: 400 Bad Request - amount: must be greater than 0",
    );
}

#[tokio::test]
async fn crm_401_says_the_key_is_wrong() {
    let s = Stack::start_with(
        SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..SamplePosOptions::default()
        },
        |o| o,
    )
    .await;
    s.crm.set_api_key("rotated-key");
    let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_failed(
        status,
        &v,
        true,
        "CRM API error: 401 Unauthorized - Invalid API key",
    );
}

#[tokio::test]
async fn crm_500_is_reported() {
    let (_, status, v) = sale_with(CrmScript::Status(
        500,
        r#"{"success":false,"error":"Database error"}"#.into(),
    ))
    .await;
    assert_failed(
        status,
        &v,
        true,
        "CRM API error: 500 Internal Server Error - Database error",
    );
}

#[tokio::test]
async fn crm_503_means_service_unavailable() {
    let (_, status, v) = sale_with(CrmScript::Status(503, "upstream connect error".into())).await;
    assert_failed(
        status,
        &v,
        false,
        "503 Service Unavailable - upstream connect error",
    );
}

#[tokio::test]
async fn a_2xx_that_is_not_json_is_not_an_invoice() {
    let (_, status, v) = sale_with(CrmScript::NotJson).await;
    assert_failed(
        status,
        &v,
        true,
        "CRM answered 200 OK with a body that is not JSON",
    );
}

#[tokio::test]
async fn a_2xx_with_success_false_is_not_an_invoice() {
    let (_, status, v) = sale_with(CrmScript::SuccessFalse).await;
    assert_failed(
        status,
        &v,
        true,
        "CRM refused the invoice: Duplicate invoice",
    );
}

#[tokio::test]
async fn a_crm_slower_than_the_budget_does_not_hold_the_till() {
    let s = Stack::start_with(
        SamplePosOptions {
            inventory: InventoryMode::AllOk,
            ..SamplePosOptions::default()
        },
        |o| Opts {
            sync_budget_ms: 300,
            crm_timeout_ms: 5_000,
            ..o
        },
    )
    .await;
    s.crm.push_script(CrmScript::Delay(
        Duration::from_millis(1_500),
        Box::new(CrmScript::Normal),
    ));
    let started = Instant::now();
    let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1_400),
        "answered at the budget, not when the CRM answered: {took:?}"
    );
    assert_failed(status, &v, false, "CRM did not answer within 300 ms");
    // the CRM call was not abandoned
    assert!(s.crm.wait_for_invoices(1, Duration::from_secs(10)).await);
    assert_eq!(
        s.crm.invoice_posts().len(),
        1,
        "exactly one create was sent"
    );
}

#[tokio::test]
async fn unreachable_crm_means_service_unavailable() {
    let pos = SamplePos::start(SamplePosOptions {
        inventory: InventoryMode::AllOk,
        ..SamplePosOptions::default()
    })
    .await
    .unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(
        pos.addr(),
        Opts {
            crm: Some((format!("http://{closed}"), "k".into())),
            ..Opts::default()
        },
    )
    .await;
    let (status, v, _) = post_sale(&proxy, SALE_WITH_CUSTOMER).await;
    assert_failed(
        status,
        &v,
        false,
        "CRM unreachable: cannot connect to 127.0.0.1",
    );
}

#[tokio::test]
async fn unconfigured_crm_says_so() {
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let proxy = TestProxy::start(pos.addr(), Opts::default()).await;
    let (status, v, _) = post_sale(&proxy, SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 207);
    assert_eq!(v["crmStatus"]["serviceAvailable"], false);
    assert_eq!(v["crmStatus"]["error"], "CRM service not configured");
    // the capture of the original integration, reproduced
    assert_eq!(
        v["message"],
        "Sale completed successfully (inventory service unavailable - manual stock adjustment may be required, CRM service unavailable - invoice not created)"
    );
    assert_eq!(
        v["warnings"][1],
        "CRM invoice creation failed: CRM service not configured"
    );
}

#[tokio::test]
async fn failures_add_to_existing_inventory_warnings() {
    let s = Stack::start_with(
        SamplePosOptions {
            inventory: InventoryMode::Failing,
            ..SamplePosOptions::default()
        },
        |o| o,
    )
    .await;
    s.crm.push_script(CrmScript::Status(
        500,
        r#"{"success":false,"error":"Database error"}"#.into(),
    ));
    let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(status, 207);
    assert_eq!(
        v["message"],
        "Sale completed successfully (1 inventory updates failed, CRM invoice creation failed)"
    );
    assert_eq!(
        v["warnings"],
        serde_json::json!([
            "Inventory update failed for item test-product-1: fetch failed",
            "CRM invoice creation failed: CRM API error: 500 Internal Server Error - Database error"
        ])
    );
}

#[tokio::test]
async fn a_crm_redirect_is_not_followed_and_the_key_goes_nowhere_else() {
    let thief =
        crate::support::raw::RawUpstream::start("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .await;
    let redirect: &'static str = Box::leak(
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{}/steal\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            thief.addr
        )
        .into_boxed_str(),
    );
    let crm = crate::support::raw::RawUpstream::start(redirect).await;
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let proxy = TestProxy::start(
        pos.addr(),
        Opts {
            crm: Some((format!("http://{}", crm.addr), "k-redirect".into())),
            ..Opts::default()
        },
    )
    .await;
    let (_, v, _) = post_sale(&proxy, SALE_WITH_CUSTOMER).await;
    let error = v["crmStatus"]["error"].as_str().unwrap();
    assert!(
        error.contains("307")
            && error.contains(&format!("{}/steal", thief.addr))
            && error.contains("not followed"),
        "{error}"
    );
    assert_eq!(
        v["crmStatus"]["queued"], false,
        "a redirect is a configuration problem, not retried"
    );
    assert_eq!(crm.requests.lock().unwrap().len(), 1);
    assert!(
        thief.requests.lock().unwrap().is_empty(),
        "nothing, and no key, went to the redirect target"
    );
}
