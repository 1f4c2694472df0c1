//! Hardening through real sockets: request smuggling and framing attacks, header limits,
//! slow clients, connection limits.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::raw::{
    open_websocket, read_until, request_waiting_for_a_slot, roundtrip, READ_LIMIT,
};
use crate::support::upstream::EchoUpstream;
use crate::support::{client, json_of, Opts, Stack, TestProxy, SALE_WITH_CUSTOMER};

/// Sends a raw request and returns the status line of the answer (the connection is closed by
/// the proxy after a framing error, or by `Connection: close`).
async fn status_of(proxy: &TestProxy, raw: &[u8]) -> String {
    let answer = roundtrip(proxy.addr, raw).await;
    answer.lines().next().unwrap_or("").to_string()
}

#[tokio::test]
async fn smuggling_and_framing_attacks_get_400_and_never_reach_the_upstream() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let cases: [(&str, &[u8]); 6] = [
        (
            "two different Content-Lengths",
            b"POST /echo HTTP/1.1\r\nHost: pos\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhelloGET /echo/smuggled HTTP/1.1\r\n\r\n",
        ),
        (
            "a list in Content-Length",
            b"POST /echo HTTP/1.1\r\nHost: pos\r\nContent-Length: 5, 30\r\n\r\nhello",
        ),
        (
            "obs-fold",
            b"GET /echo HTTP/1.1\r\nHost: pos\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "a NUL in a header value",
            b"GET /echo HTTP/1.1\r\nHost: pos\r\nX-Bad: a\x00b\r\n\r\n",
        ),
        (
            "a space before the colon",
            b"GET /echo HTTP/1.1\r\nHost: pos\r\nX-Bad : a\r\n\r\n",
        ),
        (
            "Transfer-Encoding that does not end in chunked",
            b"POST /echo HTTP/1.1\r\nHost: pos\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (name, raw) in cases {
        let status = status_of(&proxy, raw).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{name}: {status}");
    }
    // nothing above reached the upstream; a clean request afterwards arrives alone and whole
    let v: serde_json::Value =
        json_of(client().post(proxy.url("/echo/clean")).body("clean body")).await;
    assert_eq!(v["uri"], "/echo/clean");
    assert_eq!(v["body"], "clean body");
}

/// `Content-Length` with `Transfer-Encoding`: processed by the chunked framing alone, the
/// `Content-Length` removed, and the connection closed after the answer (RFC 9112 §6.1), so the
/// bytes after the chunked body are never read as a second request.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_reframed_and_the_connection_closed() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let answer = roundtrip(
        proxy.addr,
        b"POST /echo HTTP/1.1\r\nHost: pos\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: pos\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        !answer.contains("smuggled"),
        "the trailing bytes were not a request: {answer}"
    );
    assert!(
        !answer.to_ascii_lowercase().contains("\"content-length\""),
        "{answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
}

#[tokio::test]
async fn a_smuggling_attempt_on_the_sales_route_is_refused_too() {
    let s = Stack::start().await;
    let raw = format!(
        "POST /api/sales HTTP/1.1\r\nHost: pos\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{SALE_WITH_CUSTOMER}",
        SALE_WITH_CUSTOMER.len()
    );
    let status = status_of(&s.proxy, raw.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(s.pos.requests().is_empty());
    assert!(s.crm.invoice_posts().is_empty());
}

#[tokio::test]
async fn absolute_form_is_forwarded_by_path_and_connect_is_refused() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    let answer = roundtrip(
        proxy.addr,
        b"GET http://elsewhere.example/echo/abs?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // the request goes to the POS, never to the host named in the URL
    assert!(answer.contains("\"uri\":\"/echo/abs?q=1\""), "{answer}");
    // the target's authority names the host, over a differing Host field (RFC 9112 §3.2.2)
    let answer = roundtrip(
        proxy.addr,
        b"GET http://user@named.example:8080/echo/h HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.contains("[\"host\",\"named.example:8080\"]"),
        "{answer}"
    );
    assert!(!answer.contains("other.example"), "{answer}");
    let status = status_of(&proxy, b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\nConnection: close\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
}

#[tokio::test]
async fn oversized_heads_are_refused_with_431() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    // default limits: 64 KiB of head, 100 header fields
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: pos\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let status = status_of(&proxy, big.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    let mut many = String::from("GET /echo HTTP/1.1\r\nHost: pos\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let status = status_of(&proxy, many.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    // within the limits, fine
    let ok = format!(
        "GET /echo HTTP/1.1\r\nHost: pos\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    assert!(status_of(&proxy, ok.as_bytes())
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_slowloris_head_is_cut_off() {
    let up = EchoUpstream::start().await;
    let proxy = TestProxy::start_with_extra(
        up.addr,
        Opts::default(),
        "[limits]\nheader_read_timeout_ms = 300\n",
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: pos\r\n")
        .await
        .unwrap();
    // ...and never finishes the head: the proxy closes the connection
    let mut buf = Vec::new();
    let read = tokio::time::timeout(READ_LIMIT, s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the proxy");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn a_stalled_sale_body_is_408_and_nothing_reaches_the_pos() {
    let s = Stack::start().await;
    let proxy = TestProxy::start_with_extra(
        s.pos.addr(),
        Opts::with_crm(&s.crm),
        "[limits]\nsale_body_read_timeout_ms = 300\n",
    )
    .await;
    let mut sock = TcpStream::connect(proxy.addr).await.unwrap();
    sock.write_all(
        b"POST /api/sales HTTP/1.1\r\nHost: pos\r\nContent-Length: 100\r\n\r\n{\"items\":",
    )
    .await
    .unwrap();
    let answer = read_until(&mut sock, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(s.pos.requests().is_empty());
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let up = EchoUpstream::start().await;
    let proxy =
        TestProxy::start_with_extra(up.addr, Opts::default(), "[limits]\nmax_connections = 2\n")
            .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /echo/held HTTP/1.1\r\nHost: pos\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut s, "/echo/held").await;
        held.push(s);
    }
    let mut third = request_waiting_for_a_slot(proxy.addr, "/echo/third").await;
    drop(held.pop());
    let answer = read_until(&mut third, "/echo/third").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// An upstream answer with both `Transfer-Encoding: chunked` and a (wrong) `Content-Length`:
/// the chunked framing wins and the stale length never reaches the client, on the sales route
/// and off it (found by the `http_front` fuzz target).
#[tokio::test]
async fn a_stale_content_length_from_the_pos_is_dropped() {
    let up = crate::support::raw::RawUpstream::start(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\nConnection: close\r\n\r\n2\r\nab\r\n0\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(up.addr, Opts::default()).await;
    for req in [
        "GET /x HTTP/1.1\r\nHost: pos\r\nConnection: close\r\n\r\n".to_string(),
        "POST /api/sales HTTP/1.1\r\nHost: pos\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            .to_string(),
    ] {
        let answer = roundtrip(proxy.addr, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("content-length: 1\r"),
            "{answer}"
        );
        assert!(
            answer.ends_with("ab") || answer.ends_with("2\r\nab\r\n0\r\n\r\n"),
            "the whole body: {answer:?}"
        );
    }
}

/// An upgraded (WebSocket) connection keeps its connection slot for as long as the tunnel is
/// open: the connection cap bounds tunnels too.
#[tokio::test]
async fn an_open_websocket_tunnel_holds_its_connection_slot() {
    let up = EchoUpstream::start().await;
    let proxy =
        TestProxy::start_with_extra(up.addr, Opts::default(), "[limits]\nmax_connections = 1\n")
            .await;
    let (mut ws, head) = open_websocket(proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.write_all(b"ping").await.unwrap();
    read_until(&mut ws, "echo:ping").await;
    // The tunnel holds the only slot.
    let mut other = request_waiting_for_a_slot(proxy.addr, "/echo/other").await;
    drop(ws);
    let answer = read_until(&mut other, "/echo/other").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
