//! The tower `Layer` that puts sales interception in front of the upstream.

use std::sync::Arc;

use http::{Method, Request};
use tower::Layer;

use super::service::SalesService;
use crate::config::Config;
use crate::invoice::Invoicer;
use crate::metrics::Metrics;

/// What the sales route needs, shared by every request.
#[derive(Debug)]
pub struct SalesContext {
    /// `false`: pure passthrough, no `crmStatus`.
    pub enabled: bool,
    pub paths: Vec<String>,
    pub max_request_body: usize,
    pub max_response_body: usize,
    /// How long the till waits for the POS's answer to a sale (then 504; the sale task goes on).
    pub answer_timeout: std::time::Duration,
    /// The till's sale body must arrive within this.
    pub body_read_timeout: std::time::Duration,
    pub invoicer: Invoicer,
    pub metrics: Arc<Metrics>,
}

impl SalesContext {
    pub fn new(config: &Config, invoicer: Invoicer, metrics: Arc<Metrics>) -> Self {
        SalesContext {
            enabled: config.crm.enabled,
            paths: config.sales.intercept_paths.clone(),
            max_request_body: config.sales.max_request_body,
            max_response_body: config.sales.max_response_body,
            answer_timeout: config.upstream.timeout,
            body_read_timeout: config.limits.sale_body_read_timeout,
            invoicer,
            metrics,
        }
    }

    /// Exactly `POST` on one of the configured paths (query strings do not matter; a trailing
    /// slash is a different path, which the POS answers with a redirect).
    pub fn intercepts<B>(&self, req: &Request<B>) -> bool {
        self.enabled
            && req.method() == Method::POST
            && self.paths.iter().any(|p| p == req.uri().path())
    }
}

/// Wraps a service (the upstream) with sales interception.
#[derive(Debug, Clone)]
pub struct SalesLayer {
    ctx: Arc<SalesContext>,
}

impl SalesLayer {
    pub fn new(ctx: SalesContext) -> Self {
        SalesLayer { ctx: Arc::new(ctx) }
    }
}

impl<S> Layer<S> for SalesLayer {
    type Service = SalesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SalesService::new(inner, self.ctx.clone())
    }
}
