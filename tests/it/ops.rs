//! Operations: TLS (HTTP/1.1 and h2, mTLS, certificate swap), hot reload, metrics, readiness,
//! graceful shutdown of the real binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pos_crm_proxy::demo::sample_crm::SampleCrm;
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use serde_json::Value;

use crate::support::certs::Ca;
use crate::support::{client, Opts, Stack, TestProxy, KEY, SALE_NO_CUSTOMER, SALE_WITH_CUSTOMER};

/// An HTTPS client that trusts only `ca` and reaches the proxy as `pos.test`.
fn https_client(
    ca: &Ca,
    proxy: SocketAddr,
    identity: Option<reqwest::Identity>,
) -> reqwest::Client {
    pos_crm_proxy::tls::install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca.reqwest_cert()])
        .resolve("pos.test", proxy)
        .timeout(Duration::from_secs(10))
        .no_proxy();
    if let Some(id) = identity {
        b = b.identity(id);
    }
    b.build().unwrap()
}

async fn tls_stack(client_ca: Option<&Ca>) -> (Stack, Ca, tempfile::TempDir) {
    let ca = Ca::new("test server CA");
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca.server(dir.path(), "server");
    let client_ca = client_ca.map(|c| c.write(dir.path(), "clients.pem"));
    let s = Stack::start_with(SamplePosOptions::default(), |o| Opts {
        tls: Some((leaf.cert.clone(), leaf.key.clone(), client_ca)),
        ..o
    })
    .await;
    (s, ca, dir)
}

fn url(proxy: SocketAddr, path: &str) -> String {
    format!("https://pos.test:{}{}", proxy.port(), path)
}

#[tokio::test]
async fn https_with_http1_and_h2_including_the_sales_route() {
    let (s, ca, _dir) = tls_stack(None).await;
    let addr = s.proxy.addr;
    // h2 by ALPN (reqwest offers h2 first)
    let c = https_client(&ca, addr, None);
    let r = c.get(url(addr, "/api/sales?limit=5")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let r = c
        .post(url(addr, "/api/sales"))
        .body(SALE_WITH_CUSTOMER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 207);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["crmStatus"]["invoiceCreated"], true, "{v}");
    // the POS saw the sale over HTTP/1.1 with the forwarding headers of an HTTPS client
    let seen = s.pos.requests().pop().unwrap();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(
        seen.headers["host"],
        format!("pos.test:{}", addr.port()).as_str()
    );
    // HTTP/1.1 over TLS as well
    let c1 = reqwest::Client::builder()
        .tls_certs_only([ca.reqwest_cert()])
        .resolve("pos.test", addr)
        .http1_only()
        .no_proxy()
        .build()
        .unwrap();
    let r = c1
        .post(url(addr, "/api/sales"))
        .body(SALE_NO_CUSTOMER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["crmStatus"], Value::Null);
    // plain HTTP on a TLS port is refused, and counted
    let plain = client().get(format!("http://{addr}/")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    let metrics = client()
        .get(s.proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metric(&metrics, "pos_crm_proxy_tls_handshake_failures_total") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn mutual_tls_accepts_known_clients_and_refuses_others() {
    let clients = Ca::new("till CA");
    let (s, ca, dir) = tls_stack(Some(&clients)).await;
    let till = clients.client(dir.path(), "till");
    let id = reqwest::Identity::from_pem(format!("{}{}", till.cert_pem, till.key_pem).as_bytes())
        .unwrap();
    let r = https_client(&ca, s.proxy.addr, Some(id))
        .get(url(s.proxy.addr, "/api/sales"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // no certificate, or one from another CA: no connection
    let stranger_ca = Ca::new("stranger CA");
    let stranger = stranger_ca.client(dir.path(), "stranger");
    let id = reqwest::Identity::from_pem(
        format!("{}{}", stranger.cert_pem, stranger.key_pem).as_bytes(),
    )
    .unwrap();
    for identity in [None, Some(id)] {
        let r = https_client(&ca, s.proxy.addr, identity)
            .get(url(s.proxy.addr, "/api/sales"))
            .send()
            .await;
        assert!(r.is_err(), "refused without a trusted client certificate");
    }
    assert!(
        s.pos.requests().len() == 1,
        "only the trusted till reached the POS"
    );
}

#[tokio::test]
async fn a_certificate_swap_is_picked_up_without_restart() {
    let (s, old_ca, dir) = tls_stack(None).await;
    let addr = s.proxy.addr;
    assert_eq!(
        https_client(&old_ca, addr, None)
            .get(url(addr, "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // the operator renews: new files from a new CA at the same paths, then SIGHUP / file change
    let new_ca = Ca::new("renewed CA");
    new_ca.server(dir.path(), "server");
    s.proxy.app().reload().await.unwrap();
    assert_eq!(
        https_client(&new_ca, addr, None)
            .get(url(addr, "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        https_client(&old_ca, addr, None)
            .get(url(addr, "/"))
            .send()
            .await
            .is_err(),
        "the old certificate is gone"
    );
    // a broken file on reload is refused and the running certificate stays
    std::fs::write(dir.path().join("server.key"), "not a key").unwrap();
    let err = s.proxy.app().reload().await.unwrap_err().to_string();
    assert!(err.contains("server.key"), "{err}");
    assert_eq!(
        https_client(&new_ca, addr, None)
            .get(url(addr, "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// One HTTP/1.1 connection to the proxy, kept open across reloads.
struct KeptConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeptConnection {
    async fn open(addr: SocketAddr) -> KeptConnection {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        KeptConnection { sender }
    }

    async fn sale(&mut self, body: &str) -> Value {
        let req = http::Request::post("/api/sales")
            .header("host", "pos")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = self
            .sender
            .send_request(req)
            .await
            .expect("the kept connection still works");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }
}

#[tokio::test]
async fn reload_flips_the_integration_off_and_on_under_a_kept_connection() {
    let s = Stack::start_with(SamplePosOptions::default(), |o| Opts {
        reload_poll_ms: 50,
        ..o
    })
    .await;
    let mut conn = KeptConnection::open(s.proxy.addr).await;
    let on = Opts {
        reload_poll_ms: 50,
        ..Opts::with_crm(&s.crm)
    };
    assert!(conn.sale(SALE_WITH_CUSTOMER).await["crmStatus"].is_object());

    // off, by editing the file (the watcher notices)
    s.proxy.rewrite_config(&Opts {
        enabled: false,
        ..on.clone()
    });
    wait_for(|| !s.proxy.app().config().crm.enabled).await;
    let v = conn.sale(SALE_WITH_CUSTOMER).await;
    assert!(v.get("crmStatus").is_none(), "pure passthrough: {v}");

    // and on again, by an explicit reload (as SIGHUP does)
    s.proxy.rewrite_config(&on);
    s.proxy.app().reload().await.unwrap();
    assert!(conn.sale(SALE_WITH_CUSTOMER).await["crmStatus"].is_object());
    assert_eq!(s.crm.invoices().len(), 2);
    assert_eq!(
        s.pos.connections_accepted(),
        1,
        "one pooled POS connection throughout"
    );
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_running_config_and_restart_only_settings_are_reported() {
    let s = Stack::start().await;
    let path = s.proxy.dir.path().join("config.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}\n[crm]\nbogus = 1\n")).unwrap();
    let err = s.proxy.app().reload().await.unwrap_err().to_string();
    assert!(err.contains("bogus") || err.contains("duplicate"), "{err}");
    std::fs::write(
        &path,
        good.replace("sync_budget_ms = 3000", "sync_budget_ms = 0"),
    )
    .unwrap();
    let err = s.proxy.app().reload().await.unwrap_err().to_string();
    assert!(err.contains("crm.sync_budget_ms"), "{err}");
    assert_eq!(
        s.proxy.app().config().crm.sync_budget,
        Duration::from_millis(3000)
    );
    let (_, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(
        v["crmStatus"]["invoiceCreated"], true,
        "still working with the old config"
    );

    // a changed listen address cannot move under a running listener: reported, kept
    std::fs::write(
        &path,
        good.replace(
            "[proxy]\nlisten = \"127.0.0.1:0\"",
            "[proxy]\nlisten = \"127.0.0.1:1\"",
        ),
    )
    .unwrap();
    let report = s.proxy.app().reload().await.unwrap();
    assert_eq!(report.need_restart, ["proxy.listen"]);
    let metrics = client()
        .get(s.proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            "pos_crm_proxy_config_reloads_total{outcome=\"error\"}"
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "pos_crm_proxy_config_reloads_total{outcome=\"ok\"}"
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reload_switches_the_crm_key_for_queued_and_new_invoices() {
    let s = Stack::start().await;
    // the CRM rotates its key; the proxy's file still has the old one
    s.crm.set_api_key("rotated-key");
    let (_, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    assert_eq!(v["crmStatus"]["queued"], true);
    let mut opts = Opts::with_crm(&s.crm);
    opts.crm = Some((s.crm.url(), "rotated-key".into()));
    s.proxy.rewrite_config(&opts);
    s.proxy.app().reload().await.unwrap();
    let (_, v, _) = s.sale(SALE_WITH_CUSTOMER).await;
    // the queue is still held (401 earlier) until an operator releases it
    assert_eq!(v["crmStatus"]["queued"], true, "{v}");
    s.proxy
        .app()
        .outbox()
        .retry(pos_crm_proxy::outbox::RetryTarget::All(
            pos_crm_proxy::outbox::store::State::Held,
        ))
        .await
        .unwrap();
    assert!(s.crm.wait_for_invoices(2, Duration::from_secs(10)).await);
    assert!(s
        .crm
        .invoice_posts()
        .iter()
        .skip(1)
        .all(|p| p.headers["x-api-key"] == "rotated-key"));
}

/// The value of one sample line in a Prometheus text exposition.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_sales() {
    let s = Stack::start().await;
    let get = || async {
        client()
            .get(s.proxy.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = get().await;
    s.sale(SALE_WITH_CUSTOMER).await;
    s.sale(SALE_NO_CUSTOMER).await;
    client()
        .get(s.proxy.url("/api/sales"))
        .send()
        .await
        .unwrap();
    let after = get().await;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        delta("pos_crm_proxy_requests_total{route=\"sales\",status=\"207\"}"),
        2.0,
        "{after}"
    );
    assert_eq!(
        delta("pos_crm_proxy_requests_total{route=\"passthrough\",status=\"200\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("pos_crm_proxy_invoices_total{outcome=\"created\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("pos_crm_proxy_crm_attempts_total{outcome=\"delivered\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "pos_crm_proxy_outbox_jobs{state=\"delivered\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(metric(&after, "pos_crm_proxy_outbox_depth"), 0.0);
    assert_eq!(
        metric(&after, "pos_crm_proxy_crm_circuit{state=\"closed\"}"),
        1.0
    );
    assert!(
        delta("pos_crm_proxy_upstream_duration_seconds_count{outcome=\"ok\"}") >= 3.0,
        "{after}"
    );
}

#[tokio::test]
async fn readiness_fails_when_the_pos_is_unreachable() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(closed, Opts::default()).await;
    let r = client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["upstream_reachable"], false);
    assert_eq!(
        client()
            .get(proxy.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn sigterm_lets_a_slow_sale_finish_then_exits_0() {
    let pos = SamplePos::start(SamplePosOptions {
        sale_delay: Duration::from_millis(800),
        ..SamplePosOptions::default()
    })
    .await
    .unwrap();
    let crm = SampleCrm::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            // One worker: the single-threaded runtime's shutdown path (the other binary tests run
            // one worker per CPU).
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 5000\nworker_threads = 1\n\
             [upstream]\nurl = \"{}\"\n[storage]\ndata_dir = {:?}\n",
            pos.url(),
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let mut child = crate::support::Reaped(
        Command::new(env!("CARGO_BIN_EXE_pos-crm-proxy"))
            .args(["--config", cfg.to_str().unwrap(), "--log-format", "json"])
            .env_clear()
            .env("CRM_API_URL", crm.url())
            .env("CRM_API_KEY", KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("proxy did not start");
        };
        // --log-format json: every line is a JSON object
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["fields"]["message"] == "pos-crm-proxy started" {
            break v["fields"]["listen"].as_str().unwrap().parse().unwrap();
        }
    };
    let sale = tokio::spawn(async move {
        client()
            .post(format!("http://{addr}/api/sales"))
            .body(SALE_WITH_CUSTOMER)
            .send()
            .await
    });
    // the POS has the sale in hand; now the signal
    for _ in 0..200 {
        if !pos.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pos.requests().len(), 1);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let resp = sale
        .await
        .unwrap()
        .expect("the in-flight sale was answered");
    assert_eq!(resp.status(), 207);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["crmStatus"]["invoiceCreated"], true);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "exit 0 after a graceful shutdown: {status:?}"
    );
    // no new connections after the signal
    assert!(std::net::TcpStream::connect(addr).is_err());
    drop(lines);
}
