//! The one table from proxy errors to HTTP responses.
//!
//! Every service in the stack is `Infallible`: a failure becomes a response here, with a short
//! JSON body that says who failed, so a till's screen (which shows `error`) says something useful.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::body::Body;

/// Failures the proxy answers itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The POS could not be reached (refused, reset, DNS).
    #[error("POS upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The POS did not answer in time.
    #[error("POS upstream did not answer within {0} ms")]
    UpstreamTimeout(u128),
    /// The POS broke off its answer part-way.
    #[error("POS upstream answer broke off: {0}")]
    UpstreamBroken(String),
    /// The client's request cannot be proxied as it is.
    #[error("{0}")]
    BadRequest(String),
    /// The client did not send its request body in time.
    #[error("request body not received within {0} ms")]
    RequestTimeout(u128),
    /// A method this proxy does not tunnel.
    #[error("{0} is not supported by this proxy")]
    MethodNotAllowed(String),
    /// The request head is larger than `limits.max_header_bytes`.
    #[error("request head of {0} bytes is larger than the limit of {1} bytes")]
    HeadTooLarge(usize, usize),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UpstreamUnavailable(_) | ProxyError::UpstreamBroken(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::HeadTooLarge(..) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The response a client gets: `{"error": "<reason phrase>", "details": "<what happened>"}`.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = serde_json::json!({
            "error": status.canonical_reason().unwrap_or("Error"),
            "details": self.to_string(),
        });
        let mut resp = Response::new(Body::full(body.to_string()));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}
