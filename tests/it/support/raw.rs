//! Raw TCP for what a high-level client hides: exact header spelling, HTTP/1.0,
//! `Expect: 100-continue`, upgrades.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bounded wait for anything a test reads from a socket.
pub const READ_LIMIT: Duration = Duration::from_secs(10);

/// Sends `request` and reads until the server closes the connection.
pub async fn roundtrip(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(READ_LIMIT, s.read_to_end(&mut out))
        .await
        .expect("server did not close in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a WebSocket upgrade to `/ws` (the echo upstream tunnels it); returns the stream and
/// the answer head.
pub async fn open_websocket(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: pos\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_until(&mut s, "\r\n\r\n").await;
    (s, head)
}

/// Sends `GET {path}` on a new connection and checks it is *not* answered within 300 ms (the
/// proxy is at its connection cap); the caller frees a slot and reads the answer.
pub async fn request_waiting_for_a_slot(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: pos\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "{path} was served while every connection slot was taken"
    );
    s
}

/// Reads from `s` until `needle` has been seen; returns everything read.
pub async fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(needle) {
        let n = tokio::time::timeout(READ_LIMIT, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {needle:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "EOF before {needle:?}; got {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An upstream that records the raw bytes of each request and answers with a fixed raw
/// response, then closes.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    pub async fn start(response: &'static str) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let r = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let head = read_until(&mut s, "\r\n\r\n").await;
                    r.lock().unwrap().push(head);
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        RawUpstream {
            addr,
            requests,
            task,
        }
    }
}

/// An upstream that answers the first request on each connection (keeping it alive), then
/// reads the next request on that connection and closes without answering: a pooled socket
/// that dies just as it is reused. Records every request head it read.
pub struct OneAnswerPerConnection {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OneAnswerPerConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OneAnswerPerConnection {
    pub async fn start() -> OneAnswerPerConnection {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let r = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let head = read_until(&mut s, "\r\n\r\n").await;
                    r.lock().unwrap().push(head);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let mut buf = [0u8; 4096];
                    if let Ok(Ok(n)) = tokio::time::timeout(READ_LIMIT, s.read(&mut buf)).await {
                        if n > 0 {
                            r.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                        }
                    }
                    // closes without answering the second request
                });
            }
        });
        OneAnswerPerConnection {
            addr,
            requests,
            task,
        }
    }
}
