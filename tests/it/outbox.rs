//! The outbox through real sockets: no invoice lost, none created twice.

use std::collections::HashMap;
use std::time::Duration;

use pos_crm_proxy::demo::sample_crm::{CrmScript, SampleCrm};
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use pos_crm_proxy::outbox::store::{State, Store};
use serde_json::Value;

use crate::support::{
    client, creates_after_success, json_of, Opts, Stack, TestProxy, KEY, SALE_WITH_CUSTOMER,
};

const WAIT: Duration = Duration::from_secs(15);

fn unavailable() -> CrmScript {
    CrmScript::Status(503, r#"{"success":false,"error":"maintenance"}"#.into())
}

async fn job_state(proxy: &TestProxy, sale_id: &str) -> State {
    proxy
        .app()
        .outbox()
        .get(sale_id)
        .await
        .unwrap()
        .unwrap()
        .state
}

/// Polls the admin listener (bounded) until the outbox holds no job waiting.
async fn drained(proxy: &TestProxy) -> Value {
    let c = client();
    for _ in 0..300 {
        let v: Value = json_of(c.get(proxy.admin_url("/readyz"))).await;
        if v["outbox"]["depth"] == 0 {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("outbox never drained");
}

#[tokio::test]
async fn crm_down_for_several_sales_then_back_creates_each_invoice_once_in_order() {
    let s = Stack::start().await;
    s.crm.set_default(unavailable());
    let mut sale_ids = Vec::new();
    for _ in 0..6 {
        let (status, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
        assert_eq!(status, 207);
        assert_eq!(v["success"], true);
        assert_eq!(v["crmStatus"]["invoiceCreated"], false);
        assert_eq!(v["crmStatus"]["serviceAvailable"], false);
        assert_eq!(v["crmStatus"]["queued"], true, "{v}");
        sale_ids.push(v["saleId"].as_str().unwrap().to_string());
    }
    s.crm.set_default(CrmScript::Normal);
    assert!(s.crm.wait_for_invoices(6, WAIT).await, "all six delivered");
    drained(&s.proxy).await;
    let delivered: Vec<String> = s
        .crm
        .invoices()
        .iter()
        .map(|i| i.pos_sale_id.clone().unwrap())
        .collect();
    assert_eq!(delivered, sale_ids, "exactly once each, oldest first");
    // every attempt for a sale carried the same key
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for p in s.crm.invoice_posts() {
        let sale = p.json.as_ref().unwrap()["pos_sale_id"]
            .as_str()
            .unwrap()
            .to_string();
        keys.entry(sale)
            .or_default()
            .push(p.headers["idempotency-key"].to_str().unwrap().to_string());
    }
    for (sale, ks) in keys {
        assert!(
            ks.iter().all(|k| *k == format!("pos-sale-{sale}")),
            "{sale}: {ks:?}"
        );
    }
}

#[tokio::test]
async fn two_503s_then_created_is_one_invoice_after_three_attempts_with_one_key() {
    let s = Stack::start().await;
    s.crm.push_script(unavailable());
    s.crm.push_script(unavailable());
    let (_, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(v["crmStatus"]["queued"], true);
    let sale_id = v["saleId"].as_str().unwrap();
    assert!(s.crm.wait_for_invoices(1, WAIT).await);
    drained(&s.proxy).await;
    let posts = s.crm.invoice_posts();
    assert_eq!(posts.len(), 3);
    assert!(posts
        .iter()
        .all(|p| p.headers["idempotency-key"] == format!("pos-sale-{sale_id}").as_str()));
    assert!(
        posts.iter().all(|p| p.body == posts[0].body),
        "the payload was frozen"
    );
    let job = s.proxy.app().outbox().get(sale_id).await.unwrap().unwrap();
    assert_eq!((job.state, job.total_attempts), (State::Delivered, 3));
    assert_eq!(
        job.invoice_number,
        s.crm.invoices()[0].invoice_number.clone().into()
    );
    assert_eq!(s.crm.invoices().len(), 1);
    assert_eq!(creates_after_success(&s.crm), 0);
}

#[tokio::test]
async fn a_400_is_dead_at_once_and_replayable_by_an_operator() {
    let s = Stack::start_with(SamplePosOptions::default(), |o| Opts {
        admin_token: Some("admin-token-1".into()),
        ..o
    })
    .await;
    s.crm.push_script(CrmScript::Status(
        400,
        r#"{"success":false,"error":"customer_id: unknown customer"}"#.into(),
    ));
    let (_, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(v["crmStatus"]["queued"], false);
    assert!(v["crmStatus"]["error"]
        .as_str()
        .unwrap()
        .contains("400 Bad Request - customer_id: unknown customer"));
    let sale_id = v["saleId"].as_str().unwrap().to_string();
    assert_eq!(job_state(&s.proxy, &sale_id).await, State::Dead);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.crm.invoice_posts().len(), 1, "dead means not retried");

    let c = client();
    let retry = s
        .proxy
        .admin_url(&format!("/outbox/retry?sale_id={sale_id}"));
    assert_eq!(
        c.post(&retry).send().await.unwrap().status(),
        401,
        "token required"
    );
    assert_eq!(
        c.post(&retry)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let listed: Value = json_of(c.get(s.proxy.admin_url("/outbox?state=dead"))).await;
    assert_eq!(
        listed["jobs"][0]["sale_id"],
        sale_id.as_str(),
        "reading needs no token"
    );
    let r: Value = c
        .post(&retry)
        .bearer_auth("admin-token-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["replayed"], 1);
    assert!(s.crm.wait_for_invoices(1, WAIT).await);
    drained(&s.proxy).await;
    assert_eq!(job_state(&s.proxy, &sale_id).await, State::Delivered);
}

#[tokio::test]
async fn a_401_holds_the_queue_until_the_key_is_fixed_and_the_cli_releases_it() {
    let s = Stack::start().await;
    s.crm.set_api_key("rotated-by-the-crm-admin");
    let (_, first, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(first["crmStatus"]["queued"], true);
    let (_, second, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert!(
        second["crmStatus"]["error"]
            .as_str()
            .unwrap()
            .contains("held"),
        "{second}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.crm.invoice_posts().len(), 1, "held: no attempts burned");
    let ready: Value = json_of(client().get(s.proxy.admin_url("/readyz"))).await;
    assert_eq!(ready["outbox"]["queue_held"], true, "{ready}");
    assert_eq!(ready["outbox"]["held"], 1, "{ready}");
    assert_eq!(ready["outbox"]["depth"], 2, "{ready}");

    // the key is fixed on the CRM side; the operator releases the queue with the CLI, in
    // another process, while the proxy runs
    s.crm.set_api_key(KEY);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pos-crm-proxy"))
        .args(["outbox", "retry", "--all-held"])
        .env_clear()
        .env("PROXY_DATA_DIR", s.proxy.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1 job(s)"));
    assert!(
        s.crm.wait_for_invoices(2, WAIT).await,
        "both delivered after the release"
    );
    let ready = drained(&s.proxy).await;
    assert_eq!(ready["outbox"]["queue_held"], false);
    let mut got: Vec<String> = s
        .crm
        .invoices()
        .iter()
        .map(|i| i.pos_sale_id.clone().unwrap())
        .collect();
    got.sort();
    let mut want = vec![
        first["saleId"].as_str().unwrap().to_string(),
        second["saleId"].as_str().unwrap().to_string(),
    ];
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_restart_delivers_pending_and_orphaned_jobs_once() {
    let data = tempfile::tempdir().unwrap();
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let crm = SampleCrm::start(KEY).await.unwrap();
    crm.set_default(unavailable());
    let opts = Opts {
        data_dir: Some(data.path().to_path_buf()),
        ..Opts::with_crm(&crm)
    };
    let first = TestProxy::start(pos.addr(), opts.clone()).await;
    let mut sales = Vec::new();
    for _ in 0..2 {
        let (_, v, _) = crate::support::post_sale(&first, SALE_WITH_CUSTOMER).await;
        assert_eq!(v["crmStatus"]["queued"], true);
        sales.push(v["saleId"].as_str().unwrap().to_string());
    }
    first.shutdown().await;
    // a job a crashed process had claimed: in flight, its lease long expired
    {
        let mut store = Store::open(data.path(), true).unwrap();
        let payload = crm.invoice_posts()[0].body.to_vec();
        let payload = String::from_utf8(payload)
            .unwrap()
            .replace(&sales[0], "POS_ORPHAN");
        store
            .enqueue(
                "POS_ORPHAN",
                "pos-sale-POS_ORPHAN",
                payload.as_bytes(),
                1_000,
                Some(2_000),
            )
            .unwrap();
        assert_eq!(
            store.get("POS_ORPHAN").unwrap().unwrap().state,
            State::InFlight
        );
    }
    sales.push("POS_ORPHAN".into());
    // and one claimed by a process that died a moment ago: its lease runs out soon
    {
        let mut store = Store::open(data.path(), true).unwrap();
        let payload = String::from_utf8(crm.invoice_posts()[0].body.to_vec())
            .unwrap()
            .replace(&sales[0], "POS_LEASED");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        store
            .enqueue(
                "POS_LEASED",
                "pos-sale-POS_LEASED",
                payload.as_bytes(),
                now,
                Some(now + 1_500),
            )
            .unwrap();
    }
    sales.push("POS_LEASED".into());
    crm.set_default(CrmScript::Normal);
    let second = TestProxy::start(pos.addr(), opts).await;
    assert!(crm.wait_for_invoices(4, WAIT).await);
    drained(&second).await;
    let mut got: Vec<String> = crm
        .invoices()
        .iter()
        .map(|i| i.pos_sale_id.clone().unwrap())
        .collect();
    got.sort();
    sales.sort();
    assert_eq!(got, sales, "all delivered, none twice");
    assert_eq!(creates_after_success(&crm), 0);
    let leased = crm
        .invoice_posts()
        .iter()
        .filter(|p| p.headers["idempotency-key"] == "pos-sale-POS_LEASED")
        .count();
    assert_eq!(
        leased, 1,
        "the unexpired lease was respected, then the job was taken over once"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn the_same_sale_id_twice_is_one_job() {
    const ANSWER: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 45\r\nconnection: close\r\n\r\n{\"success\":true,\"saleId\":\"POS_SAME\",\"x\":1.10}";
    let up = crate::support::raw::RawUpstream::start(ANSWER).await;
    let crm = SampleCrm::start(KEY).await.unwrap();
    let proxy = TestProxy::start(up.addr, Opts::with_crm(&crm)).await;
    let (_, a, _) = crate::support::post_sale(&proxy, SALE_WITH_CUSTOMER).await;
    let (_, b, _) = crate::support::post_sale(&proxy, SALE_WITH_CUSTOMER).await;
    assert_eq!(a["crmStatus"]["invoiceCreated"], true);
    assert_eq!(
        b["crmStatus"], a["crmStatus"],
        "the second answer reports the same invoice"
    );
    assert_eq!(
        crm.invoice_posts().len(),
        1,
        "a delivered job is never sent again"
    );
}
