//! The one body type that flows through the proxy, and size-limited collection.
//!
//! Passthrough traffic keeps hyper's `Incoming` body as it is, so it streams in both directions
//! without being buffered or boxed. Only the sales route collects a body, and only up to a limit:
//! when the limit is hit, the bytes already read are put back in front of the rest of the stream
//! (`Body::Prefixed`) so the request or response still goes through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::upstream::Lease;

/// Errors of any body in the proxy; boxed because they come from hyper, TLS or our own limits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy handles it.
#[derive(Debug, Default)]
pub enum Body {
    /// Nothing to send.
    #[default]
    Empty,
    /// Bytes fully in memory (rewritten sales, error pages).
    Full(Option<Bytes>),
    /// A streamed body straight from a hyper connection.
    Incoming(Incoming),
    /// An answer from the POS on a pooled connection, which goes back to the pool once this
    /// body has been read to its end (dropped earlier, the connection is closed instead).
    Leased {
        inner: Incoming,
        lease: Option<Lease>,
    },
    /// Bytes already read from `rest` by a size-limited collect, to be sent first.
    Prefixed {
        prefix: Option<Bytes>,
        rest: Box<Body>,
    },
    /// A streamed body that reports when it has been sent in full (or dropped), so the
    /// upstream timeout can start after a slow upload instead of during it.
    Watched {
        inner: Box<Body>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

impl Body {
    /// A body holding `bytes`; empty bytes give an empty body with an exact length of zero.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }

    /// The body of an answer on the leased connection; a body that is already complete (HEAD,
    /// 204, 304, `Content-Length: 0`) gives the connection back at once.
    pub fn leased(inner: Incoming, lease: Lease) -> Self {
        if http_body::Body::is_end_stream(&inner) {
            lease.release();
            Body::Incoming(inner)
        } else {
            Body::Leased {
                inner,
                lease: Some(lease),
            }
        }
    }
}

impl From<Incoming> for Body {
    fn from(incoming: Incoming) -> Self {
        Body::Incoming(incoming)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(incoming) => Pin::new(incoming)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            Body::Leased { inner, lease } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    // hyper stops polling a body with a known length after its last byte, so
                    // the end counts as soon as the length is used up.
                    Poll::Ready(None) => release(lease),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => release(lease),
                    Poll::Ready(Some(Err(_))) => drop(lease.take()),
                    _ => {}
                }
                polled.map(|f| f.map(|r| r.map_err(BoxError::from)))
            }
            Body::Prefixed { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                Pin::new(rest.as_mut()).poll_frame(cx)
            }
            Body::Watched { inner, done } => {
                let polled = Pin::new(inner.as_mut()).poll_frame(cx);
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    if let Some(done) = done.take() {
                        let _ = done.send(());
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(bytes) => bytes.is_none(),
            Body::Incoming(incoming) => incoming.is_end_stream(),
            Body::Leased { inner, .. } => inner.is_end_stream(),
            Body::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Body::Watched { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(incoming) => incoming.size_hint(),
            Body::Leased { inner, .. } => inner.size_hint(),
            Body::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
            Body::Watched { inner, .. } => inner.size_hint(),
        }
    }
}

/// Gives a leased connection back, once.
fn release(lease: &mut Option<Lease>) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
}

/// What a size-limited collect ended with.
#[derive(Debug)]
pub enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// The body is larger than the limit: the bytes read so far plus the unread rest,
    /// ready to be forwarded untouched.
    TooLarge(Body),
}

/// Reading the body failed part-way (the peer hung up or sent bad framing).
#[derive(Debug, thiserror::Error)]
#[error("body could not be read: {0}")]
pub struct ReadError(#[source] pub BoxError);

/// Collects `body` if it is at most `limit` bytes; otherwise hands it back unchanged.
///
/// The declared size is checked first so an announced oversized body is not read at all.
/// Trailers, which nothing on the sales route uses, are dropped.
pub async fn collect_limited(body: Body, limit: usize) -> Result<Collected, ReadError> {
    use http_body::Body as _;
    if body.size_hint().lower() > limit as u64 {
        return Ok(Collected::TooLarge(body));
    }
    let mut streamed = match body {
        Body::Empty => return Ok(Collected::Complete(Bytes::new())),
        Body::Full(bytes) => return Ok(Collected::Complete(bytes.unwrap_or_default())),
        Body::Prefixed { .. } | Body::Watched { .. } => return Ok(Collected::TooLarge(body)),
        Body::Incoming(_) | Body::Leased { .. } => body,
    };
    let mut buf = BytesMut::new();
    while let Some(frame) = streamed.frame().await {
        let frame = frame.map_err(ReadError)?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Collected::TooLarge(Body::Prefixed {
                    prefix: Some(buf.freeze()),
                    rest: Box::new(streamed),
                }));
            }
        }
    }
    Ok(Collected::Complete(buf.freeze()))
}
