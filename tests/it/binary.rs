//! The real binary: command line, config errors, and secrets that never reach a log line.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use pos_crm_proxy::demo::sample_crm::{CrmScript, SampleCrm};
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};

use crate::support::{client, SALE_NO_CUSTOMER, SALE_WITH_CUSTOMER};

const BIN: &str = env!("CARGO_BIN_EXE_pos-crm-proxy");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version() {
    let (code, out, _) = run(
        &["--help"],
        &[
            ("CRM_API_KEY", "sk-help-secret"),
            ("PROXY_ADMIN_TOKEN", "tok-help"),
        ],
    );
    assert_eq!(code, 0);
    assert!(
        !out.contains("sk-help-secret") && !out.contains("tok-help"),
        "{out}"
    );
    for word in [
        "--config",
        "demo",
        "check-config",
        "CRM_API_KEY",
        "POS_UPSTREAM_URL",
        "CRM_INTEGRATION_ENABLED",
    ] {
        assert!(out.contains(word), "--help should mention {word}: {out}");
    }
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_config_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[crm]\napi_ur = \"http://crm\"\n", "api_ur"),
        ("[upstream]\nurl = \"pos:3000\"\n", "upstream.url"),
        ("[proxy]\nlisten = \"everywhere\"\n", "proxy.listen"),
        ("[crm]\nsync_budget_ms = -1\n", "sync_budget_ms"),
        ("this is not toml", "config.toml"),
    ] {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run(&["--config", path.to_str().unwrap(), "check-config"], &[]);
        assert_eq!(code, 2, "{text}: {err}");
        assert!(err.contains(key), "{text}: error should name {key}: {err}");
    }
    let (code, _, err) = run(&["--config", "/nonexistent/pos.toml", "run"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/pos.toml"), "{err}");
    let (code, _, err) = run(&["check-config"], &[("CRM_INTEGRATION_ENABLED", "perhaps")]);
    assert_eq!(code, 2);
    assert!(err.contains("CRM_INTEGRATION_ENABLED"), "{err}");
}

#[test]
fn check_config_redacts_the_key() {
    let (code, out, err) = run(
        &["--config", "config.toml", "check-config"],
        &[
            ("CRM_API_URL", "http://crm.local"),
            ("CRM_API_KEY", "sk-live-do-not-print"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration OK"));
    assert!(out.contains("crm.local"));
    assert!(!out.contains("sk-live-do-not-print"), "{out}");
    assert!(!err.contains("sk-live-do-not-print"), "{err}");
}

/// Runs the binary through every error path the CRM can produce, at trace level, stops it with
/// SIGTERM, and checks that the key is nowhere in its output.
#[tokio::test]
async fn the_api_key_never_appears_in_logs() {
    const SECRET: &str = "sk-live-7d3b1e0c9a-top-secret";
    const TOKEN: &str = "adm-3e9f2c71-very-private";
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let crm = SampleCrm::start(SECRET).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n[crm]\nsync_budget_ms = 400\ntimeout_ms = 1000\n[storage]\ndata_dir = {:?}\n[log]\nlevel = \"trace\"\n",
            pos.url(),
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let mut child = crate::support::Reaped(
        Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap()])
            .env_clear()
            .env("CRM_API_URL", crm.url())
            .env("CRM_API_KEY", SECRET)
            .env("PROXY_ADMIN_TOKEN", TOKEN)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("proxy did not start");
        log.push(line.clone());
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let c = client();
    let url = format!("http://{addr}/api/sales");
    let steps = [
        CrmScript::Normal,
        CrmScript::Status(
            500,
            "{\"success\":false,\"error\":\"Database error\"}".into(),
        ),
        CrmScript::Status(302, String::new()),
        CrmScript::NotJson,
        CrmScript::SuccessFalse,
        CrmScript::Close,
        CrmScript::Delay(Duration::from_millis(1500), Box::new(CrmScript::Normal)),
    ];
    for step in steps {
        crm.push_script(step);
        let r = c.post(&url).body(SALE_WITH_CUSTOMER).send().await.unwrap();
        assert_eq!(r.status(), 207);
    }
    crm.set_api_key("another-key"); // 401 path
    let customer_lookup = SALE_WITH_CUSTOMER.replace(r#""customerName":"John Doe","#, "");
    for body in [
        SALE_WITH_CUSTOMER,
        customer_lookup.as_str(),
        SALE_NO_CUSTOMER,
        "{broken",
    ] {
        let _ = c.post(&url).body(body.to_string()).send().await.unwrap();
    }
    let _ = c
        .get(format!("http://{addr}/missing"))
        .send()
        .await
        .unwrap();
    assert!(crm.wait_for_posts(9, Duration::from_secs(10)).await);
    // every post carried the key, so the key was really in use
    assert!(crm
        .invoice_posts()
        .iter()
        .all(|p| p.headers["x-api-key"] == SECRET));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "graceful exit on SIGTERM: {exit:?}");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        log.push(line);
    }
    let all = log.join("\n");
    assert!(all.contains("sale_id="), "access log names sales: {all}");
    assert!(all.contains("invoice=\"created\""), "{all}");
    assert!(all.contains("invoice=\"failed\""), "{all}");
    assert!(all.contains("invoice=\"no-customer\""), "{all}");
    assert!(all.contains("shutting down"), "{all}");
    assert!(!all.contains(SECRET), "the API key leaked into the logs");
    assert!(!all.contains(TOKEN), "the admin token leaked into the logs");
    assert!(
        !all.contains("top-secret"),
        "part of the API key leaked into the logs"
    );
}
