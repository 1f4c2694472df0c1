//! Turning a completed sale into an invoice request: the customer's name, the frozen payload,
//! the idempotency key. The outbox makes it durable and delivers it; the sale's answer waits for
//! that at most `sync_budget`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::live::CrmHandle;
use crate::outbox::{Outbox, Sender};
use crate::sales::model::{CrmStatus, InvoicePayload, Sale};

/// A completed sale with a customer, ready to become an invoice.
#[derive(Debug, Clone)]
pub struct InvoiceRequest {
    pub sale: Sale,
    pub customer_id: String,
    pub sale_id: String,
    /// UTC `YYYY-MM-DD` of the sale.
    pub date: String,
}

/// The `Idempotency-Key` for a sale: derived from the POS sale id alone, so every attempt for
/// the same sale, from any process, carries the same key.
pub fn idempotency_key(sale_id: &str) -> String {
    format!("pos-sale-{sale_id}")
}

/// Today's date in UTC as `YYYY-MM-DD`.
pub fn utc_date_today() -> String {
    time::OffsetDateTime::now_utc().date().to_string()
}

/// How an invoice attempt ended, as the access log and metrics name it.
pub fn outcome_label(status: &CrmStatus) -> &'static str {
    match (status.invoice_created, status.queued) {
        (true, _) => "created",
        (false, Some(true)) => "queued",
        (false, _) => "failed",
    }
}

/// Creates invoices for completed sales, through the durable outbox.
#[derive(Debug, Clone)]
pub struct Invoicer {
    crm: Arc<CrmHandle>,
    outbox: Arc<Outbox>,
    budget: Duration,
    default_currency: Arc<str>,
}

impl Invoicer {
    pub fn new(
        crm: Arc<CrmHandle>,
        outbox: Arc<Outbox>,
        budget: Duration,
        default_currency: &str,
    ) -> Self {
        Invoicer {
            crm,
            outbox,
            budget,
            default_currency: default_currency.into(),
        }
    }

    /// Freezes the invoice for `req`, makes it durable, and reports within the budget what the
    /// till should see. Delivery goes on after the budget if it has to.
    pub async fn invoice(&self, req: InvoiceRequest) -> CrmStatus {
        let deadline = Instant::now() + self.budget;
        let customer = match &req.sale.customer_name {
            Some(name) => name.clone(),
            None if self.crm.configured() => {
                // At most half the budget for the name: the invoice itself needs the rest.
                let within = self.budget / 2;
                self.crm
                    .current()
                    .customer_name(&req.customer_id, within)
                    .await
                    .unwrap_or_else(|| req.customer_id.clone())
            }
            None => req.customer_id.clone(),
        };
        let payload = InvoicePayload::build(
            &req.sale,
            &req.customer_id,
            &customer,
            &req.sale_id,
            &req.date,
            &self.default_currency,
        );
        let body = match serde_json::to_vec(&payload) {
            Ok(body) => body,
            Err(e) => {
                return CrmStatus::failed(true, format!("internal error: invoice payload: {e}"))
            }
        };
        self.outbox
            .submit(
                &req.sale_id,
                &idempotency_key(&req.sale_id),
                body,
                deadline,
                self.budget,
            )
            .await
    }
}
