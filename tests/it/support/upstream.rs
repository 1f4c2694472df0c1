//! A generic upstream for passthrough tests: echoes requests, streams large bodies with gates
//! the test opens (to prove nothing is buffered), answers any status, upgrades to an echo
//! tunnel, or hangs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Gates and signals shared between the test and the upstream.
#[derive(Default)]
pub struct Signals {
    /// Notified when the first chunk of an `/upload` body arrived.
    pub upload_started: Notify,
    /// `/download?gate=1` waits on this after its first chunk.
    pub download_gate: Notify,
}

pub struct EchoUpstream {
    pub addr: SocketAddr,
    pub signals: Arc<Signals>,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A byte pattern both ends can check without storing it.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

impl EchoUpstream {
    pub async fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let signals = Arc::new(Signals::default());
        let s = signals.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let closed = Arc::new(AtomicUsize::new(0));
        let closed_counter = closed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                let closed = closed_counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        EchoUpstream {
            addr,
            signals,
            accepted,
            closed,
            task,
        }
    }

    /// How many of those connections have ended.
    pub fn connections_closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// How many connections the proxy has opened to this upstream so far.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

async fn handle(
    signals: Arc<Signals>,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path.starts_with("/echo") {
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let method = req.method().to_string();
        let uri = req.uri().to_string();
        let version = format!("{:?}", req.version());
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let v = serde_json::json!({
            "method": method, "uri": uri, "version": version, "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        let mut r = full(StatusCode::OK, v.to_string());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r.headers_mut().insert("etag", "\"abc\"".parse().unwrap());
        return Ok(r);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = StatusCode::from_u16(code.parse().unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = if matches!(status.as_u16(), 204 | 304) {
            Bytes::new()
        } else {
            Bytes::from(format!("status {code}"))
        };
        let mut r = full(status, body);
        if status.is_redirection() {
            r.headers_mut()
                .insert("location", "/elsewhere".parse().unwrap());
        }
        r.headers_mut().insert("x-upstream", "yes".parse().unwrap());
        return Ok(r);
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let (mut n, mut sum) = (0u64, 0u64);
        let mut first = true;
        let mut pattern_ok = true;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Ok(full(StatusCode::BAD_REQUEST, "broken body"));
            };
            if let Ok(data) = frame.into_data() {
                if first && !data.is_empty() {
                    first = false;
                    signals.upload_started.notify_one();
                }
                for b in data.iter() {
                    pattern_ok &= *b == pattern(n);
                    sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
                    n += 1;
                }
            }
        }
        return Ok(full(
            StatusCode::OK,
            serde_json::json!({"bytes": n, "sum": sum, "pattern_ok": pattern_ok}).to_string(),
        ));
    }
    if path == "/download" {
        let total: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let gated = query.contains("gate=1");
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut first = true;
            while sent < total {
                let n = (total - sent).min(64 * 1024);
                let chunk: Vec<u8> = (sent..sent + n).map(pattern).collect();
                if tx.send_data(Bytes::from(chunk)).await.is_err() {
                    return;
                }
                sent += n;
                if first && gated {
                    first = false;
                    signals.download_gate.notified().await;
                }
            }
        });
        let mut r = Response::new(rx.boxed());
        r.headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        return Ok(r);
    }
    if path == "/ws" {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut echoed = b"echo:".to_vec();
                            echoed.extend_from_slice(&buf[..n]);
                            if io.write_all(&echoed).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let mut r = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "Upgrade".parse().unwrap());
        return Ok(r);
    }
    if path == "/hang" {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    Ok(full(StatusCode::NOT_FOUND, "not found"))
}
