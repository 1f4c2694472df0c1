//! The CRM client: creates invoices and looks up customer names, and classifies every failure
//! by who caused it and whether trying again makes sense.
//!
//! Redirects are never followed (a redirect would carry `x-api-key` to another host), the key
//! header is marked sensitive, and response bodies are read only up to a cap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::StatusCode;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::{CrmConfig, CrmEndpoint};
use crate::json::{self, Object};

/// CRM answers longer than this are cut: we only need ids or an error text.
const MAX_CRM_BODY: usize = 64 * 1024;
/// Error texts from the CRM are shortened to this many characters before they reach a client.
const MAX_ERROR_TEXT: usize = 300;
/// Customer names kept at most (the cache is cleared of expired entries when full).
const MAX_CACHED_NAMES: usize = 10_000;

/// Path segment encoding: everything but unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// An invoice the CRM confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedInvoice {
    pub invoice_id: Option<String>,
    pub invoice_number: Option<String>,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient: try the same request again later.
    Later,
    /// The CRM refuses our credentials: stop sending anything until an operator fixes the key.
    Hold,
    /// The CRM will never accept this request as it is.
    Never,
}

/// Why an invoice was not created. The `Display` text is what operators and tills see.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CrmError {
    #[error("CRM service not configured")]
    NotConfigured,
    #[error("CRM unreachable: {0}")]
    Unreachable(String),
    #[error("CRM did not answer within {0} ms")]
    Timeout(u128),
    #[error("CRM API error: {status} - {text}")]
    Status {
        status: StatusCode,
        text: String,
        retry_after: Option<Duration>,
    },
    #[error("CRM answered {0} with a body that is not JSON")]
    NotJson(StatusCode),
    #[error("CRM refused the invoice: {0}")]
    Rejected(String),
    #[error("CRM answered {status} redirecting to {location}; redirects are not followed")]
    Redirect {
        status: StatusCode,
        location: String,
    },
    #[error("CRM request failed: {0}")]
    Other(String),
}

impl CrmError {
    /// `serviceAvailable` in `crmStatus`: false when the CRM is not configured, unreachable,
    /// timed out, or its gateway says it is down.
    pub fn service_available(&self) -> bool {
        match self {
            CrmError::NotConfigured | CrmError::Unreachable(_) | CrmError::Timeout(_) => false,
            CrmError::Status { status, .. } => !matches!(status.as_u16(), 502..=504),
            _ => true,
        }
    }

    /// Whether and when delivering the same invoice again can succeed.
    pub fn retry(&self) -> Retry {
        match self {
            CrmError::NotConfigured | CrmError::Unreachable(_) | CrmError::Timeout(_) => {
                Retry::Later
            }
            CrmError::Other(_) => Retry::Later,
            CrmError::Status { status, .. } => match status.as_u16() {
                401 | 403 => Retry::Hold,
                408 | 425 | 429 => Retry::Later,
                500..=599 => Retry::Later,
                _ => Retry::Never,
            },
            // A 2xx without a usable answer may still have created the invoice; the same
            // Idempotency-Key makes a retry safe with a CRM that honours it.
            CrmError::NotJson(_) => Retry::Later,
            CrmError::Rejected(_) | CrmError::Redirect { .. } => Retry::Never,
        }
    }

    /// The CRM's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CrmError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The CRM client, shared by every sale.
#[derive(Debug)]
pub struct CrmClient {
    http: reqwest::Client,
    endpoint: Option<CrmEndpoint>,
    /// `{base}/api/external/invoices` and the key header, made once: parsing the URL for every
    /// invoice showed in the sales profile. `None` when the URL does not parse (the request
    /// path then reports it as before).
    invoices: Option<(reqwest::Url, HeaderValue)>,
    timeout: Duration,
    name_ttl: Duration,
    names: Mutex<HashMap<String, (String, Instant)>>,
}

/// Building the HTTP client failed (TLS roots could not be loaded).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the CRM HTTP client: {0}")]
pub struct BuildError(String);

impl CrmClient {
    pub fn new(cfg: &CrmConfig) -> Result<Self, BuildError> {
        crate::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &cfg.ca_file {
            for cert in
                crate::tls::load_certs("CRM CA", path).map_err(|e| BuildError(e.to_string()))?
            {
                let cert = reqwest::Certificate::from_der(&cert)
                    .map_err(|e| BuildError(format!("CRM CA {}: {e}", path.display())))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.timeout)
            // Below the 5 s a Node.js server keeps idle sockets, so a pooled socket is not reused
            // just as the CRM closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .no_proxy()
            .user_agent(concat!("pos-crm-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError(e.to_string()))?;
        let invoices = cfg.endpoint.as_ref().and_then(|e| {
            let url = reqwest::Url::parse(&format!("{}/api/external/invoices", e.base_url)).ok()?;
            Some((url, Self::key_header(e).ok()?))
        });
        Ok(CrmClient {
            http,
            invoices,
            endpoint: cfg.endpoint.clone(),
            timeout: cfg.timeout,
            name_ttl: cfg.customer_cache_ttl,
            names: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_configured(&self) -> bool {
        self.endpoint.is_some()
    }

    fn key_header(endpoint: &CrmEndpoint) -> Result<HeaderValue, CrmError> {
        let mut v = HeaderValue::from_str(endpoint.api_key.expose())
            .map_err(|_| CrmError::Other("the API key is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }

    /// `POST /api/external/invoices` with the frozen payload and its idempotency key.
    ///
    /// A pooled connection the CRM closed just as it was reused fails before any answer; that
    /// one case is sent again at once on a new connection (the idempotency key makes it safe).
    pub async fn create_invoice(
        &self,
        payload: Bytes,
        idempotency_key: &str,
    ) -> Result<CreatedInvoice, CrmError> {
        match self.create_once(payload.clone(), idempotency_key).await {
            Err(Stale) => self
                .create_once(payload, idempotency_key)
                .await
                .map_err(|e| match e {
                    // Twice, on a fresh connection too: the CRM is not answering.
                    Stale => {
                        CrmError::Unreachable("connection closed before the CRM answered".into())
                    }
                    Failed(e) => e,
                }),
            Err(Failed(e)) => Err(e),
            Ok(created) => Ok(created),
        }
    }

    async fn create_once(
        &self,
        payload: Bytes,
        idempotency_key: &str,
    ) -> Result<CreatedInvoice, Attempt> {
        let endpoint = self
            .endpoint
            .as_ref()
            .ok_or(Failed(CrmError::NotConfigured))?;
        let (url, key) = match &self.invoices {
            Some((url, key)) => (url.clone(), key.clone()),
            None => (
                reqwest::Url::parse(&format!("{}/api/external/invoices", endpoint.base_url))
                    .map_err(|e| Failed(CrmError::Other(format!("CRM URL: {e}"))))?,
                Self::key_header(endpoint)?,
            ),
        };
        let request = self
            .http
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("x-api-key", key)
            .header(
                "idempotency-key",
                HeaderValue::from_str(idempotency_key)
                    .map_err(|_| CrmError::Other("idempotency key is not a header value".into()))?,
            )
            .body(payload);
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) if closed_before_answer(&e) => return Err(Stale),
            Err(e) => return Err(Failed(self.classify(e))),
        };
        let redact = |text: String| text.replace(endpoint.api_key.expose(), "[redacted]");
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(no location)")
                .to_string();
            return Err(Failed(CrmError::Redirect {
                status,
                location: redact(location),
            }));
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let body = read_capped(&mut response)
            .await
            .map_err(|e| self.classify(e))?;
        if !status.is_success() {
            return Err(Failed(CrmError::Status {
                status,
                text: redact(error_text(&body)),
                retry_after,
            }));
        }
        let Ok(answer) = Object::parse_bytes(&body) else {
            return Err(Failed(CrmError::NotJson(status)));
        };
        if answer.get("success").map(|v| v.get()) == Some("false") {
            return Err(Failed(CrmError::Rejected(redact(error_text(&body)))));
        }
        let string = |k: &str| answer.get(k).and_then(json::as_str).map(|s| s.into_owned());
        Ok(CreatedInvoice {
            invoice_id: string("invoice_id").or_else(|| string("id")),
            invoice_number: string("invoice_number"),
        })
    }

    /// The customer's display name from `GET /api/external/customers/{id}`, cached; `None` when
    /// the CRM does not know it or cannot be asked within `within`.
    pub async fn customer_name(&self, id: &str, within: Duration) -> Option<String> {
        if let Some(name) = self.cached_name(id) {
            return Some(name);
        }
        let endpoint = self.endpoint.as_ref()?;
        let url = format!(
            "{}/api/external/customers/{}",
            endpoint.base_url,
            utf8_percent_encode(id, SEGMENT)
        );
        let request = self
            .http
            .get(url)
            .header("x-api-key", Self::key_header(endpoint).ok()?)
            .timeout(within.min(self.timeout));
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %self.classify(e), "customer lookup failed");
                return None;
            }
        };
        if !response.status().is_success() {
            tracing::debug!(status = %response.status(), "customer lookup refused");
            return None;
        }
        let body = read_capped(&mut response).await.ok()?;
        let obj = Object::parse_bytes(&body).ok()?;
        let name = obj
            .get("name")
            .and_then(json::as_str)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())?;
        self.remember_name(id, &name);
        Some(name)
    }

    fn cached_name(&self, id: &str) -> Option<String> {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names
            .get(id)
            .filter(|(_, at)| at.elapsed() < self.name_ttl)
            .map(|(n, _)| n.clone())
    }

    fn remember_name(&self, id: &str, name: &str) {
        if self.name_ttl.is_zero() {
            return;
        }
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= MAX_CACHED_NAMES {
            let ttl = self.name_ttl;
            names.retain(|_, (_, at)| at.elapsed() < ttl);
            if names.len() >= MAX_CACHED_NAMES {
                names.clear();
            }
        }
        names.insert(id.to_string(), (name.to_string(), Instant::now()));
    }

    fn classify(&self, e: reqwest::Error) -> CrmError {
        let root = root_cause(&e);
        if e.is_timeout() && !e.is_connect() {
            return CrmError::Timeout(self.timeout.as_millis());
        }
        if e.is_connect() {
            let host = e
                .url()
                .and_then(|u| {
                    u.host_str()
                        .map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(0)))
                })
                .unwrap_or_default();
            return CrmError::Unreachable(format!("cannot connect to {host}: {root}"));
        }
        CrmError::Other(root)
    }
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Why one send did not produce an answer to classify.
enum Attempt {
    /// A reused connection closed before any answer: safe to send again once.
    Stale,
    Failed(CrmError),
}
use Attempt::{Failed, Stale};

impl From<CrmError> for Attempt {
    fn from(e: CrmError) -> Self {
        Failed(e)
    }
}

/// hyper's "connection closed before message completed" on a request: a pooled socket that the
/// server had closed.
fn closed_before_answer(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message();
        }
        cur = err.source();
    }
    false
}

/// The innermost error message, which names the real problem ("connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

async fn read_capped(response: &mut reqwest::Response) -> Result<Bytes, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_CRM_BODY.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= MAX_CRM_BODY {
            break;
        }
    }
    Ok(Bytes::from(buf))
}

/// The CRM's own error text (`error` or `message` of a JSON body), else the body itself,
/// one line, shortened.
pub fn error_text(body: &[u8]) -> String {
    let from_json = Object::parse_bytes(body).ok().and_then(|o| {
        ["error", "message"]
            .iter()
            .find_map(|k| o.get(k).and_then(json::as_str).map(|s| s.into_owned()))
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = one_line.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_string();
    }
    let mut out: String = trimmed.chars().take(MAX_ERROR_TEXT).collect();
    if trimmed.chars().count() > MAX_ERROR_TEXT {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_contract() {
        let s = |code: u16| CrmError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            text: "x".into(),
            retry_after: None,
        };
        assert!(!CrmError::NotConfigured.service_available());
        assert!(!CrmError::Unreachable("x".into()).service_available());
        assert!(!CrmError::Timeout(1).service_available());
        for code in [502, 503, 504] {
            assert!(!s(code).service_available(), "{code}");
            assert_eq!(s(code).retry(), Retry::Later);
        }
        for code in [400, 401, 404, 500] {
            assert!(s(code).service_available(), "{code}");
        }
        assert_eq!(s(401).retry(), Retry::Hold);
        assert_eq!(s(403).retry(), Retry::Hold);
        assert_eq!(s(400).retry(), Retry::Never);
        assert_eq!(s(422).retry(), Retry::Never);
        for code in [408, 425, 429, 500] {
            assert_eq!(s(code).retry(), Retry::Later, "{code}");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after(" 120 "), Some(Duration::from_secs(120)));
        let later = std::time::SystemTime::now() + Duration::from_secs(300);
        let d = retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(290) && d <= Duration::from_secs(300),
            "{d:?}"
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn error_text_prefers_the_crm_message_and_stays_short() {
        assert_eq!(
            error_text(br#"{"success":false,"error":"Database error"}"#),
            "Database error"
        );
        assert_eq!(error_text(b"<html>\nbad\n</html>"), "<html> bad </html>");
        assert_eq!(error_text(b""), "(empty body)");
        let long = "x".repeat(1000);
        assert_eq!(
            error_text(long.as_bytes()).chars().count(),
            MAX_ERROR_TEXT + 1
        );
        assert_eq!(
            CrmError::Status {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                text: "Database error".into(),
                retry_after: None
            }
            .to_string(),
            "CRM API error: 500 Internal Server Error - Database error"
        );
    }
}
