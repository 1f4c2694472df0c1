//! The admin listener and the built-in demo.

use pos_crm_proxy::demo::Demo;
use serde_json::Value;

use crate::support::{client, Stack, SALE_WITH_CUSTOMER};

#[tokio::test]
async fn health_and_readiness() {
    let s = Stack::start().await;
    let c = client();
    let admin = format!("http://{}", s.proxy.admin);
    let r = c.get(format!("{admin}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");
    let r = c.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.get(format!("{admin}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        c.post(format!("{admin}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    // the admin port is not the proxy: nothing reaches the POS from it
    assert!(s.pos.requests().is_empty());
}

#[tokio::test]
async fn the_demo_gives_an_invoice_number() {
    let demo = Demo::start(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let text = demo.instructions();
    let proxy_url = format!("http://{}/api/sales", demo.app.proxy_addr());
    assert!(text.contains(&proxy_url), "{text}");
    assert!(text.contains("curl"), "{text}");
    let resp = client()
        .post(&proxy_url)
        .body(SALE_WITH_CUSTOMER)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 207);
    let v: Value = resp.json().await.unwrap();
    let number = v["crmStatus"]["invoice_number"].as_str().unwrap();
    assert!(
        number.starts_with("INV-") && number.len() == "INV-2026-0001".len(),
        "{v}"
    );
    assert_eq!(demo.crm.invoices().len(), 1);
    demo.shutdown().await;
}
