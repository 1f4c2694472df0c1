//! Latency the proxy adds to a sale, with a fake POS and a fake CRM that answer at once.
//!
//! `cargo bench --bench sales_latency [-- N]`: N sequential requests per scenario (default
//! 2000) over one keep-alive connection, on loopback, all in one process. Reports p50/p90/p99
//! and the p50 the proxy adds over going to the POS directly. Ratios and differences are what
//! count; absolute numbers drift between machines and runs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pos_crm_proxy::config::{Config, CrmEndpoint, NoEnv, Secret};
use pos_crm_proxy::demo::sample_crm::SampleCrm;
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use pos_crm_proxy::App;

const WITH_CUSTOMER: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","customerName":"John Doe","currency":"USD"}"#;
const NO_CUSTOMER: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Cash","user":"test-cashier","warehouseId":"WH1"}"#;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn measure(
    client: &HttpClient,
    method: &str,
    url: &str,
    body: &str,
    n: usize,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let start = Instant::now();
        let resp = client.request(req).await.expect("request failed");
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        out.push(start.elapsed());
        assert!(status.is_success(), "{method} {url}: {status}");
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let crm = SampleCrm::start("bench-key").await.unwrap();
    let mut config = Config::from_toml("", std::path::Path::new("(bench)"), &NoEnv).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    config.access_log = false;
    config.upstream.authority = pos.addr().to_string().parse().unwrap();
    config.crm.endpoint = Some(CrmEndpoint {
        base_url: crm.url(),
        api_key: Secret::new("bench-key"),
    });
    let data = tempfile::tempdir().unwrap();
    config.data_dir = data.path().to_path_buf();
    let app = App::start(config).await.unwrap();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let direct = pos.url();
    let proxy = format!("http://{}", app.proxy_addr());

    let scenarios: [(&str, &str, String, &str); 5] = [
        (
            "GET /api/sales direct",
            "GET",
            format!("{direct}/api/sales"),
            "",
        ),
        (
            "GET /api/sales via proxy",
            "GET",
            format!("{proxy}/api/sales"),
            "",
        ),
        (
            "sale direct (POS only)",
            "POST",
            format!("{direct}/api/sales"),
            WITH_CUSTOMER,
        ),
        (
            "sale via proxy, no customer",
            "POST",
            format!("{proxy}/api/sales"),
            NO_CUSTOMER,
        ),
        (
            "sale via proxy, customer + CRM",
            "POST",
            format!("{proxy}/api/sales"),
            WITH_CUSTOMER,
        ),
    ];
    // warm up pools and caches
    for (_, m, url, body) in &scenarios {
        measure(&client, m, url, body, 200).await;
    }
    println!("pos-crm-proxy sales latency, {n} sequential requests per scenario, loopback, 2 worker threads\n");
    println!("| scenario | p50 µs | p90 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    let mut p50 = Vec::new();
    for (name, m, url, body) in &scenarios {
        let d = measure(&client, m, url, body, n).await;
        p50.push(pct(&d, 0.5));
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            pct(&d, 0.5),
            pct(&d, 0.9),
            pct(&d, 0.99)
        );
    }
    println!();
    println!(
        "added p50 by the proxy, GET passthrough:        {:+.0} µs",
        p50[1] - p50[0]
    );
    println!(
        "added p50 by the proxy, sale without customer:  {:+.0} µs",
        p50[3] - p50[2]
    );
    println!(
        "added p50 by the proxy, sale with CRM invoice:  {:+.0} µs (includes the CRM round trip)",
        p50[4] - p50[2]
    );
    app.shutdown().await;
}
