//! Everything that is not a sale passes through untouched, streaming, with honest errors.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pos_crm_proxy::demo::sample_pos::{SamplePos, SamplePosOptions};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::raw::{
    open_websocket, read_until, roundtrip, OneAnswerPerConnection, RawUpstream, READ_LIMIT,
};
use crate::support::upstream::{pattern, EchoUpstream};
use crate::support::{client, json_of, Opts, TestProxy, SALE_NO_CUSTOMER};

/// Status, a few headers and the body of one request, for comparing direct and proxied answers.
async fn snapshot(
    req: reqwest::RequestBuilder,
) -> (u16, Option<String>, Option<String>, Option<String>, Bytes) {
    let resp = req.send().await.unwrap();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (status, ct, allow, location) = (
        resp.status().as_u16(),
        h("content-type"),
        h("allow"),
        h("location"),
    );
    (status, ct, allow, location, resp.bytes().await.unwrap())
}

#[tokio::test]
async fn pos_routes_answer_through_the_proxy_exactly_as_directly() {
    let pos = SamplePos::start(SamplePosOptions::default()).await.unwrap();
    let proxy = TestProxy::start(pos.addr(), Opts::default()).await;
    let c = client();
    let direct = pos.url();
    let via = proxy.url("");
    for (method, path, body) in [
        ("GET", "/api/sales?limit=5&offset=0", None),
        ("HEAD", "/api/sales", None),
        ("OPTIONS", "/api/sales", None),
        ("PUT", "/api/sales", Some("{}")),
        ("POST", "/api/sales/", Some(SALE_NO_CUSTOMER)),
        ("GET", "/", None),
    ] {
        let m: reqwest::Method = method.parse().unwrap();
        let mk = |base: &str| {
            let r = c.request(m.clone(), format!("{base}{path}"));
            match body {
                Some(b) => r.body(b.to_string()),
                None => r,
            }
        };
        let a = snapshot(mk(&direct)).await;
        let b = snapshot(mk(&via)).await;
        assert_eq!(a, b, "{method} {path}");
    }
    // spot checks against the captures
    let (status, _, allow, _, body) =
        snapshot(c.request(reqwest::Method::OPTIONS, proxy.url("/api/sales"))).await;
    assert_eq!(
        (status, allow.as_deref(), body.len()),
        (204, Some("GET, HEAD, OPTIONS, POST"), 0)
    );
    let (status, _, _, location, body) =
        snapshot(c.post(proxy.url("/api/sales/")).body("{}")).await;
    assert_eq!(
        (status, location.as_deref(), &body[..]),
        (308, Some("/api/sales"), &b"/api/sales"[..])
    );
    let (status, ct, _, _, body) = snapshot(c.head(proxy.url("/api/sales"))).await;
    assert_eq!(
        (status, ct.as_deref(), body.len()),
        (200, Some("application/json"), 0)
    );
    // the trailing-slash POST is not a sale: the POS never saw a sale, nothing was added
    assert!(pos.completed_sales().is_empty());
}

#[tokio::test]
async fn request_line_headers_and_body_are_forwarded_with_forwarding_headers() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let resp = client()
        .patch(proxy.url("/echo/a%20b?x=1&y=%C3%A9"))
        .header("host", "till.shop.example")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "must-not-pass")
        .header("x-custom", "kept")
        .body("payload bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("etag").unwrap(),
        "\"abc\"",
        "validators pass through off the sales route"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["method"], "PATCH");
    assert_eq!(v["uri"], "/echo/a%20b?x=1&y=%C3%A9");
    assert_eq!(v["body"], "payload bytes");
    let headers: Vec<(String, String)> = serde_json::from_value(v["headers"].clone()).unwrap();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("host"), Some("till.shop.example"));
    assert_eq!(get("x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
    assert_eq!(get("x-forwarded-proto"), Some("http"));
    assert_eq!(get("x-forwarded-host"), Some("till.shop.example"));
    assert_eq!(get("x-custom"), Some("kept"));
    assert_eq!(get("x-hop-secret"), None);
    assert_eq!(get("content-length"), Some("13"));
}

#[tokio::test]
async fn a_request_without_forwarding_headers_gets_the_client_address_alone() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let c = client();
    // twice on one connection: the address rendered once per connection serves every request
    for _ in 0..2 {
        let v: Value = json_of(
            c.get(proxy.url("/echo/plain"))
                .header("proxy-connection", "keep-alive"),
        )
        .await;
        let headers: Vec<(String, String)> = serde_json::from_value(v["headers"].clone()).unwrap();
        let all = |n: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(all("x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(all("x-forwarded-proto"), ["http"]);
        assert_eq!(all("proxy-connection"), Vec::<&str>::new(), "hop-by-hop");
    }
}

#[tokio::test]
async fn status_codes_pass_through() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let c = client();
    for code in [
        200u16, 201, 204, 206, 304, 307, 308, 400, 404, 418, 500, 503,
    ] {
        let resp = c
            .get(proxy.url(&format!("/status/{code}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
        assert_eq!(resp.headers().get("x-upstream").unwrap(), "yes");
        if resp.status().is_redirection() && code != 304 {
            assert_eq!(resp.headers().get("location").unwrap(), "/elsewhere");
        }
        let body = resp.bytes().await.unwrap();
        if matches!(code, 204 | 304) {
            assert!(body.is_empty());
        } else {
            assert_eq!(body, format!("status {code}"));
        }
    }
}

const TEN_MB: u64 = 10 * 1024 * 1024;

#[tokio::test]
async fn a_10mb_upload_streams_through_without_buffering() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let client = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::channel::Channel<Bytes>>();
    let req = http::Request::post(proxy.url("/upload"))
        .body(body)
        .unwrap();
    let resp = tokio::spawn(client.request(req));
    let chunk = 256 * 1024u64;
    let mut sent = 0u64;
    // First chunk only: the upstream must see it while the client still holds the rest.
    let first: Vec<u8> = (0..chunk).map(pattern).collect();
    tx.send_data(Bytes::from(first)).await.unwrap();
    sent += chunk;
    tokio::time::timeout(READ_LIMIT, up.signals.upload_started.notified())
        .await
        .expect("upload was buffered: the upstream saw nothing of a streamed body");
    while sent < TEN_MB {
        let part: Vec<u8> = (sent..sent + chunk).map(pattern).collect();
        tx.send_data(Bytes::from(part)).await.unwrap();
        sent += chunk;
    }
    drop(tx);
    let resp = tokio::time::timeout(READ_LIMIT, resp)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["bytes"], TEN_MB);
    assert_eq!(v["pattern_ok"], true);
}

#[tokio::test]
async fn a_10mb_download_streams_through_without_buffering() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let mut resp = client()
        .get(proxy.url(&format!("/download?bytes={TEN_MB}&gate=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The upstream holds the rest back until the client has the first chunk.
    let first = tokio::time::timeout(READ_LIMIT, resp.chunk())
        .await
        .expect("download was buffered: no first chunk while the upstream waits")
        .unwrap()
        .unwrap();
    up.signals.download_gate.notify_one();
    let mut n = 0u64;
    let mut ok = true;
    let mut check = |data: &[u8], n: &mut u64| {
        for b in data {
            ok &= *b == pattern(*n);
            *n += 1;
        }
    };
    check(&first, &mut n);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        check(&chunk, &mut n);
    }
    assert_eq!(n, TEN_MB);
    assert!(ok, "bytes changed on the way");
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let (mut s, head) = open_websocket(proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in ["hello", "second frame"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let got = read_until(&mut s, &format!("echo:{msg}")).await;
        assert!(got.contains(&format!("echo:{msg}")));
    }
}

#[tokio::test]
async fn header_name_case_is_preserved_both_ways() {
    let up = RawUpstream::start(
        "HTTP/1.1 200 OK\r\nX-Custom-CASE: Value\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    )
    .await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let answer = roundtrip(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: pos\r\nX-Till-ID: T1\r\nx-lower: l\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("X-Custom-CASE: Value"), "{answer}");
    assert!(answer.contains("Content-Type: text/plain"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    let seen = up.requests.lock().unwrap()[0].clone();
    assert!(seen.contains("X-Till-ID: T1"), "{seen}");
    assert!(seen.contains("x-lower: l"), "{seen}");
}

#[tokio::test]
async fn http10_and_expect_100_continue_work() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let answer = roundtrip(proxy.addr, b"GET /echo/old HTTP/1.0\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert!(answer.contains("\"uri\":\"/echo/old\""), "{answer}");

    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /echo/e HTTP/1.1\r\nHost: pos\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_until(&mut s, "\r\n\r\n").await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let answer = read_until(&mut s, "\"body\":\"hello\"").await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("\"expect\""),
        "Expect is answered by the proxy, not forwarded: {answer}"
    );
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_idle_closed_ones_do_not_fail_a_sale() {
    let pos = SamplePos::start(SamplePosOptions {
        idle_timeout: Duration::from_millis(150),
        ..SamplePosOptions::default()
    })
    .await
    .unwrap();
    let proxy = TestProxy::start(
        pos.addr(),
        Opts {
            pool_idle_ms: 60_000,
            ..Opts::default()
        },
    )
    .await;
    let c = client();
    for _ in 0..5 {
        let r = c.get(proxy.url("/api/sales")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(
        pos.connections_accepted(),
        1,
        "keep-alive to the POS is reused"
    );
    // The POS closes idle sockets after 150 ms; the closed pooled one must not fail the next sale
    // (the race of a socket closed exactly on reuse is the test after this one).
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = c
            .post(proxy.url("/api/sales"))
            .body(SALE_NO_CUSTOMER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 207, "round {round}");
    }
    assert_eq!(
        pos.completed_sales().len(),
        3,
        "each sale reached the POS exactly once"
    );
}

#[tokio::test]
async fn every_complete_answer_gives_its_pos_connection_back() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let c = client();
    // one after the other: a sized body, a chunked one in many pieces, then bodiless answers
    let r = c.get(proxy.url("/echo/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["uri"], "/echo/a");
    let r = c
        .get(proxy.url("/download?bytes=300000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    let r = c.head(proxy.url("/echo/b")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = c.get(proxy.url("/status/204")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .post(proxy.url("/echo/c"))
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["body"], "hi");
    assert_eq!(
        up.connections_accepted(),
        1,
        "each answer, read to its end, handed the POS connection to the next request"
    );
}

#[tokio::test]
async fn a_half_read_answer_is_never_followed_on_its_pos_connection() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /download?bytes=1000000&gate=1 HTTP/1.1\r\nHost: pos\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // the till goes away with most of the answer unread; the POS then sends the rest
    drop(s);
    up.signals.download_gate.notify_one();
    let c = client();
    for i in 0..3 {
        let path = format!("/echo/{i}");
        let r = c.get(proxy.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["uri"], path.as_str());
    }
    assert_eq!(
        up.connections_accepted(),
        2,
        "the half-read connection was closed, not reused; the next one was reused"
    );
}

#[tokio::test]
async fn a_connection_still_sending_an_upload_the_pos_answered_early_is_not_handed_on() {
    // The POS answers the first request on each connection at once, without reading its body,
    // then reads on and never answers again on that connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pos = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let upstream = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                read_until(&mut s, "\r\n\r\n").await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut s, &mut sink).await;
            });
        }
    });
    let proxy = TestProxy::start(pos, Opts::default()).await;
    // a till starts a large upload, gets the early answer, and stalls with the upload unfinished
    let mut till = TcpStream::connect(proxy.addr).await.unwrap();
    till.write_all(
        b"POST /upload HTTP/1.1\r\nHost: pos\r\nContent-Length: 100000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let answer = read_until(&mut till, "ok").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // the next request must not wait for that connection: it gets one of its own
    let r = tokio::time::timeout(READ_LIMIT, client().get(proxy.url("/next")).send())
        .await
        .expect("the next request was held behind the unfinished upload")
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    drop(till);
    upstream.abort();
}

#[tokio::test]
async fn idle_pos_connections_are_closed_by_the_proxy_after_the_pool_timeout() {
    // The upstream never closes an idle connection itself.
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(
        up.addr,
        Opts {
            pool_idle_ms: 200,
            ..Opts::default()
        },
    )
    .await;
    assert_eq!(
        client()
            .get(proxy.url("/echo"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(up.connections_accepted(), 1);
    let deadline = std::time::Instant::now() + READ_LIMIT;
    while up.connections_closed() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle POS connection is still open long after the pool timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_pos_connection_idle_beyond_the_pool_timeout_is_not_reused() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(
        up.addr,
        Opts {
            pool_idle_ms: 500,
            ..Opts::default()
        },
    )
    .await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            c.get(proxy.url("/echo")).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(up.connections_accepted(), 1);
    // longer than the pool keeps an idle connection (the POS would still accept it)
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        c.get(proxy.url("/echo")).send().await.unwrap().status(),
        200
    );
    assert_eq!(up.connections_accepted(), 2);
}

#[tokio::test]
async fn upstream_down_is_502_and_upstream_timeout_is_504() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(closed, Opts::default()).await;
    let r = client().get(proxy.url("/anything")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "Bad Gateway");
    assert!(
        v["details"].as_str().unwrap().contains("unavailable"),
        "{v}"
    );

    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(
        up.addr,
        Opts {
            upstream_timeout_ms: 300,
            ..Opts::default()
        },
    )
    .await;
    let r = client().get(proxy.url("/hang")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "Gateway Timeout");
    // a sale whose POS does not answer in time is a 504 too: the proxy never invents an outcome
    let pos = SamplePos::start(SamplePosOptions {
        sale_delay: Duration::from_secs(3),
        ..SamplePosOptions::default()
    })
    .await
    .unwrap();
    let proxy = TestProxy::start(
        pos.addr(),
        Opts {
            upstream_timeout_ms: 300,
            ..Opts::default()
        },
    )
    .await;
    let r = client()
        .post(proxy.url("/api/sales"))
        .body(SALE_NO_CUSTOMER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test]
async fn a_pos_that_never_completes_the_tls_handshake_is_a_502_within_the_connect_timeout() {
    // https:// POS that accepts TCP and then says nothing
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pos = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let proxy = TestProxy::start(
        pos,
        Opts {
            upstream_scheme: "https",
            ..Opts::default()
        },
    )
    .await;
    // a request with a body: its answer timeout would only start once the body is sent
    let r = tokio::time::timeout(
        READ_LIMIT,
        client().post(proxy.url("/echo")).body("x").send(),
    )
    .await
    .expect("no answer: the TLS handshake to the POS was waited on without a limit")
    .unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["details"]
            .as_str()
            .unwrap()
            .contains("connect_timeout_ms"),
        "{v}"
    );
    silent.abort();
}

#[tokio::test]
async fn connect_requests_are_refused_clearly() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let answer = roundtrip(
        proxy.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

#[tokio::test]
async fn a_pooled_socket_closed_on_reuse_is_retried_for_get_but_never_for_post() {
    let up = OneAnswerPerConnection::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let c = client();
    for path in ["/a", "/b"] {
        let r = c.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    // /b was sent on the pooled socket, lost, and sent again on a new one
    let seen = up.requests.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|h| h.starts_with("GET /b ")).count(),
        2,
        "{seen:?}"
    );
    // a POST on a pooled socket that dies is a 502, never a second POST
    let r = c
        .post(proxy.url("/api/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let seen = up.requests.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .filter(|h| h.starts_with("POST /api/orders "))
            .count(),
        1,
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_slow_upload_is_not_cut_by_the_answer_timeout() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(
        up.addr,
        Opts {
            upstream_timeout_ms: 300,
            ..Opts::default()
        },
    )
    .await;
    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
    let client = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::channel::Channel<Bytes>>();
    let req = http::Request::post(proxy.url("/upload"))
        .body(body)
        .unwrap();
    let resp = tokio::spawn(client.request(req));
    // five chunks 150 ms apart: the upload takes longer than the timeout, the answer does not
    let mut n = 0u64;
    for _ in 0..5 {
        let chunk: Vec<u8> = (n..n + 1000).map(pattern).collect();
        n += 1000;
        tx.send_data(Bytes::from(chunk)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    drop(tx);
    let resp = tokio::time::timeout(READ_LIMIT, resp)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["bytes"], 5000);
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_answer_are_removed() {
    let up = RawUpstream::start(
        "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-End: kept\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let answer = roundtrip(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: pos\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("x-end: kept"), "{answer}");
    assert!(!lower.contains("x-hop"), "{answer}");
    assert!(!lower.contains("keep-alive: timeout=5"), "{answer}");
}

#[tokio::test]
async fn http10_keep_alive_is_honoured() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..2 {
        s.write_all(format!("GET /echo/{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let got = read_until(&mut s, &format!("\"uri\":\"/echo/{i}\"")).await;
        assert!(got.contains(" 200 OK"), "{got}");
        assert!(
            got.to_ascii_lowercase().contains("connection: keep-alive"),
            "{got}"
        );
    }
}
