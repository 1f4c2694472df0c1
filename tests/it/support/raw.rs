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
