//! Crash test: the real binary under a stream of sales is killed with SIGKILL at random moments
//! and restarted, several times. At the end the CRM must hold exactly one invoice for every sale
//! with a customer that a till was answered for: none lost, none duplicated.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pos_crm_proxy::demo::sample_crm::{CrmScript, SampleCrm};
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use serde_json::Value;

use crate::support::{client, json_of, KEY, SALE_NO_CUSTOMER, SALE_WITH_CUSTOMER};

const ROUNDS: usize = 6;

struct Running {
    child: crate::support::Reaped,
    proxy: SocketAddr,
    admin: SocketAddr,
}

fn start(config: &std::path::Path, crm: &SampleCrm) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pos-crm-proxy"))
        .args(["--config", config.to_str().unwrap()])
        .env_clear()
        .env("CRM_API_URL", crm.url())
        .env("CRM_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = |line: &str, key: &str| -> SocketAddr {
        line.split(key)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("proxy did not start");
        };
        if line.contains("pos-crm-proxy started") {
            return Running {
                child: crate::support::Reaped(child),
                proxy: addr(&line, "listen="),
                admin: addr(&line, "admin="),
            };
        }
    }
}

/// Sales a till was answered for, with or without a customer.
#[derive(Default)]
struct Answered {
    with_customer: Vec<String>,
    without: usize,
}

async fn load(proxy: SocketAddr, answered: Arc<Mutex<Answered>>, stop: Arc<tokio::sync::Notify>) {
    let c = client();
    let url = format!("http://{proxy}/api/sales");
    let mut i = 0u64;
    loop {
        i += 1;
        let with_customer = i % 4 != 0;
        let body = if with_customer {
            SALE_WITH_CUSTOMER
        } else {
            SALE_NO_CUSTOMER
        };
        let send = c.post(&url).body(body).send();
        let resp = tokio::select! {
            r = send => r,
            _ = stop.notified() => return,
        };
        let Ok(resp) = resp else { return };
        let Ok(v) = resp.json::<Value>().await else {
            return;
        };
        if v["success"] != true {
            continue;
        }
        let sale_id = v["saleId"].as_str().unwrap().to_string();
        let mut a = answered.lock().unwrap();
        if with_customer {
            assert!(v["crmStatus"].is_object(), "{v}");
            a.with_customer.push(sale_id);
        } else {
            assert!(v["crmStatus"].is_null(), "{v}");
            a.without += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_invoice_and_duplicates_none() {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let crm = SampleCrm::start(KEY).await.unwrap();
    // A CRM that takes a moment widens every window a kill can hit.
    crm.set_default(CrmScript::Delay(
        Duration::from_millis(15),
        Box::new(CrmScript::Normal),
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = false\n\
             [upstream]\nurl = \"{}\"\n[crm]\nsync_budget_ms = 200\ntimeout_ms = 500\nconnect_timeout_ms = 200\n\
             [storage]\ndata_dir = {:?}\n\
             [outbox]\nretry_schedule_ms = [50, 100, 200]\npoll_interval_ms = 50\ndrain_rate_per_sec = 500.0\n\
             [log]\nlevel = \"warn,pos_crm_proxy::app=info\"\n",
            pos.url(),
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();

    let answered = Arc::new(Mutex::new(Answered::default()));
    for _ in 0..ROUNDS {
        let mut running = start(&config, &crm);
        let stop = Arc::new(tokio::sync::Notify::new());
        let clients: Vec<_> = (0..4)
            .map(|_| tokio::spawn(load(running.proxy, answered.clone(), stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.u64(150..600))).await;
        running.child.kill().unwrap(); // SIGKILL
        running.child.wait().unwrap();
        stop.notify_waiters();
        for c in clients {
            let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
        }
    }

    // One last start, no load: the backlog drains.
    let mut last = start(&config, &crm);
    let c = client();
    let mut depth = Value::Null;
    for _ in 0..400 {
        let v: Value = json_of(c.get(format!("http://{}/readyz", last.admin))).await;
        depth = v["outbox"]["depth"].clone();
        if depth == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last.child.kill().unwrap();
    last.child.wait().unwrap();
    assert_eq!(depth, 0, "the outbox drained");

    let answered = answered.lock().unwrap();
    let mut per_sale: HashMap<String, usize> = HashMap::new();
    for inv in crm.invoices() {
        *per_sale
            .entry(inv.pos_sale_id.clone().unwrap())
            .or_default() += 1;
    }
    let duplicated = per_sale.values().filter(|n| **n > 1).count();
    let expected: HashSet<&String> = answered.with_customer.iter().collect();
    let lost = expected
        .iter()
        .filter(|s| !per_sale.contains_key(**s))
        .count();
    let replays = crate::support::creates_after_success(&crm);
    println!(
        "crash test (seed {seed}): {ROUNDS} SIGKILLs, {} sales answered ({} with a customer, {} without), \
         {} invoices in the CRM ({} for sales no till saw answered), {} creates re-sent after a crash \
         (the CRM had confirmed them but the process died before recording it; deduplicated by the \
         Idempotency-Key), lost {lost}, duplicated {duplicated}",
        answered.with_customer.len() + answered.without,
        answered.with_customer.len(),
        answered.without,
        per_sale.len(),
        per_sale.keys().filter(|s| !expected.contains(s)).count(),
        replays,
    );
    assert!(
        answered.with_customer.len() >= ROUNDS,
        "the load really ran"
    );
    assert_eq!(
        lost, 0,
        "seed {seed}: every answered sale with a customer has its invoice"
    );
    assert_eq!(duplicated, 0, "seed {seed}: no sale has two invoices");
    // A create is only re-sent when a kill fell between the CRM's answer and the commit that
    // records it: at most the attempts in flight at each kill (4 clients' sales + the worker's).
    assert!(
        replays <= ROUNDS * 5,
        "seed {seed}: {replays} creates re-sent for sales already invoiced"
    );
}
