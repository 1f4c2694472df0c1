//! Turning a completed sale into an invoice, within the time a till can wait.
//!
//! The delivery runs as its own task: if the client hangs up, or the sale's budget runs out, the
//! CRM call still finishes. The sale's response waits for it at most `sync_budget`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::crm::{CreatedInvoice, CrmClient, CrmError};
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

/// Creates invoices for completed sales.
#[derive(Debug, Clone)]
pub struct Invoicer {
    crm: Arc<CrmClient>,
    budget: Duration,
    default_currency: Arc<str>,
}

impl Invoicer {
    pub fn new(crm: Arc<CrmClient>, budget: Duration, default_currency: &str) -> Self {
        Invoicer {
            crm,
            budget,
            default_currency: default_currency.into(),
        }
    }

    /// Creates the invoice for `req` and reports, within the budget, what the till should see.
    pub async fn invoice(&self, req: InvoiceRequest) -> CrmStatus {
        let deadline = Instant::now() + self.budget;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let sale_id = req.sale_id.clone();
        tokio::spawn(async move {
            let result = this.deliver(req, deadline).await;
            match &result {
                Ok(inv) => tracing::info!(
                    sale_id = %sale_id,
                    invoice_number = inv.invoice_number.as_deref().unwrap_or("-"),
                    "CRM invoice created"
                ),
                Err(e) => tracing::warn!(sale_id = %sale_id, error = %e, "CRM invoice not created"),
            }
            let _ = tx.send(result);
        });
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(inv))) => CrmStatus::created(inv.invoice_id, inv.invoice_number),
            Ok(Ok(Err(e))) => CrmStatus::failed(e.service_available(), e.to_string()),
            Ok(Err(_)) => CrmStatus::failed(true, "internal error: invoice task ended without a result"),
            Err(_) => CrmStatus::failed(
                false,
                format!(
                    "CRM did not answer within {} ms; the invoice request continues in the background",
                    self.budget.as_millis()
                ),
            ),
        }
    }

    /// Resolves the customer's name (within what is left of the budget), freezes the payload
    /// and sends it.
    async fn deliver(
        &self,
        req: InvoiceRequest,
        deadline: Instant,
    ) -> Result<CreatedInvoice, CrmError> {
        if !self.crm.is_configured() {
            return Err(CrmError::NotConfigured);
        }
        let customer = match &req.sale.customer_name {
            Some(name) => name.clone(),
            None => {
                let left = deadline.saturating_duration_since(Instant::now());
                self.crm
                    .customer_name(&req.customer_id, left)
                    .await
                    .unwrap_or_else(|| req.customer_id.clone())
            }
        };
        let payload = InvoicePayload::build(
            &req.sale,
            &req.customer_id,
            &customer,
            &req.sale_id,
            &req.date,
            &self.default_currency,
        );
        let body = serde_json::to_vec(&payload)
            .map_err(|e| CrmError::Other(format!("invoice payload: {e}")))?;
        self.crm
            .create_invoice(Bytes::from(body), &idempotency_key(&req.sale_id))
            .await
    }
}
