//! Pure data of the sales route: the sale as the POS client sent it, the POS's answer, the CRM
//! invoice payload and the `crmStatus` the client gets back. No I/O here.
//!
//! Money never goes through a float: prices, quantities and totals are kept as the JSON number
//! text the POS client wrote, and line totals are computed in decimal.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json::{self, Object};

/// The fields of a sale request that the invoice needs. Everything else is ignored (and still
/// forwarded to the POS untouched, since the request body itself is never changed).
#[derive(Debug, Clone, Default)]
pub struct Sale {
    /// Set when a customer was selected (a non-empty string `customerId`).
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    pub currency: Option<String>,
    pub payment_method: Option<String>,
    pub warehouse_id: Option<Box<RawValue>>,
    pub total: Option<Box<RawValue>>,
    pub items: Vec<SaleItem>,
}

/// One line of a sale.
#[derive(Debug, Clone)]
pub struct SaleItem {
    pub sku: Option<Box<RawValue>>,
    pub name: Option<String>,
    pub price: Option<Box<RawValue>>,
    pub quantity: Option<Box<RawValue>>,
    pub kind: Option<String>,
    pub cost: Option<Box<RawValue>>,
}

/// Why a request body is not a sale we can read.
#[derive(Debug, thiserror::Error)]
pub enum SaleParseError {
    #[error("sale body is not a JSON object: {0}")]
    NotAnObject(#[from] json::ParseError),
}

/// A non-empty JSON string, as written (no trimming: `" "` is a value the POS accepts).
fn non_empty_string(raw: Option<&RawValue>) -> Option<String> {
    let s = json::as_str(raw?)?;
    (!s.is_empty()).then(|| s.into_owned())
}

fn owned(raw: Option<&RawValue>) -> Option<Box<RawValue>> {
    raw.filter(|r| r.get() != "null").map(|r| r.to_owned())
}

impl Sale {
    /// Reads a sale request body. Lenient on purpose: the POS is the judge of a sale's validity,
    /// this only extracts what an invoice needs; odd fields just come out as `None`. Bytes are
    /// decoded as the POS's `request.json()` does: a UTF-8 byte-order mark is skipped and
    /// invalid UTF-8 becomes U+FFFD, so every body the POS accepts is read here too.
    ///
    /// The lines are read only when a customer is selected: without one there is no invoice,
    /// and reading them was a tenth of the work of such a sale.
    pub fn parse(body: &[u8]) -> Result<Sale, SaleParseError> {
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        // Strict validation first: it is several times faster than the lossy scan, which is
        // only needed for the rare body that is not UTF-8.
        let text = match std::str::from_utf8(body) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(body),
        };
        let obj = Object::parse(&text).map_err(json::ParseError::from)?;
        let customer_id = non_empty_string(obj.get("customerId"));
        let items = obj
            .get("items")
            .filter(|_| customer_id.is_some())
            .and_then(|raw| serde_json::from_str::<Vec<&RawValue>>(raw.get()).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|raw| Object::parse(raw.get()).ok())
            .map(|item| SaleItem {
                sku: owned(item.get("id")),
                name: json::as_str(item.get("name").unwrap_or(RawValue::NULL))
                    .map(|s| s.into_owned()),
                price: owned(item.get("price")),
                quantity: owned(item.get("quantity")),
                kind: non_empty_string(item.get("type")),
                cost: owned(item.get("cost")),
            })
            .collect();
        Ok(Sale {
            customer_id,
            customer_name: non_empty_string(obj.get("customerName")),
            currency: non_empty_string(obj.get("currency")),
            payment_method: non_empty_string(obj.get("paymentMethod")),
            warehouse_id: owned(obj.get("warehouseId")),
            total: owned(obj.get("total")),
            items,
        })
    }
}

/// The id of a completed sale in a POS answer: status 2xx **and** `success: true` **and** a
/// non-empty string `saleId`. Anything else is not a sale the proxy acts on.
pub fn completed_sale_id(status: http::StatusCode, answer: &Object<'_>) -> Option<String> {
    if !status.is_success() {
        return None;
    }
    if answer.get("success")?.get() != "true" {
        return None;
    }
    non_empty_string(answer.get("saleId"))
}

/// The body of `POST /api/external/invoices`, field order as in the contract.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvoicePayload {
    pub customer_id: String,
    pub customer: String,
    pub amount: Box<RawValue>,
    pub paid_amount: Box<RawValue>,
    pub currency: String,
    pub status: String,
    pub date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_method: Option<String>,
    pub pos_sale_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warehouse_id: Option<Box<RawValue>>,
    pub notes: String,
    pub line_items: Vec<LineItem>,
}

/// One invoice line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineItem {
    pub description: String,
    pub quantity: Box<RawValue>,
    pub price: Box<RawValue>,
    pub total: Box<RawValue>,
    pub sku: Box<RawValue>,
    #[serde(rename = "type")]
    pub kind: String,
    pub cost_price: Box<RawValue>,
}

fn raw_number(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string()).unwrap_or_else(|_| zero())
}

fn zero() -> Box<RawValue> {
    RawValue::from_string("0".to_string()).expect("0 is JSON")
}

/// A JSON number as written, or the number inside a numeric string (`"4.50"` → `4.50`).
fn as_number(raw: Option<&RawValue>) -> Option<Box<RawValue>> {
    let raw = raw?;
    let text = raw.get();
    if text.starts_with('"') {
        let s = json::as_str(raw)?;
        let s = s.trim();
        return serde_json::from_str::<serde_json::Number>(s)
            .ok()
            .map(|_| raw_number(s));
    }
    serde_json::from_str::<serde_json::Number>(text)
        .ok()
        .map(|_| raw.to_owned())
}

fn decimal(raw: &RawValue) -> Option<Decimal> {
    let t = raw.get();
    Decimal::from_str(t)
        .ok()
        .or_else(|| Decimal::from_scientific(t).ok())
}

/// `price × quantity`, exact in decimal; falls back to `f64` only for numbers beyond 28 digits.
fn line_total(price: &RawValue, quantity: &RawValue) -> Box<RawValue> {
    if let (Some(p), Some(q)) = (decimal(price), decimal(quantity)) {
        if let Some(t) = p.checked_mul(q) {
            return raw_number(&t.normalize().to_string());
        }
    }
    let p: f64 = serde_json::from_str(price.get()).unwrap_or(0.0);
    let q: f64 = serde_json::from_str(quantity.get()).unwrap_or(0.0);
    let total = p * q;
    if !total.is_finite() {
        // JSON has no infinity (serde_json would write `null`): a line this absurd gets 0.
        tracing::warn!(
            price = price.get(),
            quantity = quantity.get(),
            "line total out of range; sent as 0"
        );
        return zero();
    }
    serde_json::to_string(&total)
        .map(|s| raw_number(&s))
        .unwrap_or_else(|_| zero())
}

impl InvoicePayload {
    /// The paid invoice for a completed sale, per the contract. `customer` is the display name
    /// (already resolved by the caller), `date` is the UTC `YYYY-MM-DD` of the sale.
    pub fn build(
        sale: &Sale,
        customer_id: &str,
        customer: &str,
        sale_id: &str,
        date: &str,
        default_currency: &str,
    ) -> InvoicePayload {
        let amount = as_number(sale.total.as_deref()).unwrap_or_else(zero);
        let line_items = sale
            .items
            .iter()
            .map(|item| {
                let quantity =
                    as_number(item.quantity.as_deref()).unwrap_or_else(|| raw_number("1"));
                let price = as_number(item.price.as_deref()).unwrap_or_else(zero);
                let sku = item.sku.clone().unwrap_or_else(|| raw_number("\"\""));
                let description = item
                    .name
                    .clone()
                    .filter(|n| !n.trim().is_empty())
                    .or_else(|| json::as_str(&sku).map(|s| s.into_owned()))
                    .unwrap_or_else(|| "Item".to_string());
                LineItem {
                    description,
                    total: line_total(&price, &quantity),
                    quantity,
                    price,
                    sku,
                    kind: item.kind.clone().unwrap_or_else(|| "product".to_string()),
                    cost_price: as_number(item.cost.as_deref()).unwrap_or_else(zero),
                }
            })
            .collect();
        let notes = match &sale.payment_method {
            Some(pm) => format!("POS Sale #{sale_id} - Payment: {pm}"),
            None => format!("POS Sale #{sale_id}"),
        };
        InvoicePayload {
            customer_id: customer_id.to_string(),
            customer: customer.to_string(),
            paid_amount: amount.clone(),
            amount,
            currency: sale
                .currency
                .clone()
                .unwrap_or_else(|| default_currency.to_string()),
            status: "paid".to_string(),
            date: date.to_string(),
            payment_method: sale.payment_method.clone(),
            pos_sale_id: sale_id.to_string(),
            warehouse_id: sale.warehouse_id.clone(),
            notes,
            line_items,
        }
    }
}

/// The `crmStatus` object added to a completed sale with a customer. The five contract keys are
/// always present; `queued` is additive and only written when known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrmStatus {
    #[serde(rename = "serviceAvailable")]
    pub service_available: bool,
    #[serde(rename = "invoiceCreated")]
    pub invoice_created: bool,
    pub invoice_id: Option<String>,
    pub invoice_number: Option<String>,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<bool>,
}

impl CrmStatus {
    pub fn created(invoice_id: Option<String>, invoice_number: Option<String>) -> Self {
        CrmStatus {
            service_available: true,
            invoice_created: true,
            invoice_id,
            invoice_number,
            error: None,
            queued: None,
        }
    }

    pub fn failed(service_available: bool, error: impl Into<String>) -> Self {
        CrmStatus {
            service_available,
            invoice_created: false,
            invoice_id: None,
            invoice_number: None,
            error: Some(error.into()),
            queued: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALE: &str = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","customerName":"John Doe","currency":"USD"}"#;

    #[test]
    fn builds_the_contract_payload() {
        let sale = Sale::parse(SALE.as_bytes()).unwrap();
        assert_eq!(sale.customer_id.as_deref(), Some("customer-123"));
        let p = InvoicePayload::build(
            &sale,
            "customer-123",
            "John Doe",
            "POS_1795586791062_cnttqx05g",
            "2026-11-25",
            "EUR",
        );
        let got = serde_json::to_string(&p).unwrap();
        let want = r#"{"customer_id":"customer-123","customer":"John Doe","amount":11,"paid_amount":11,"currency":"USD","status":"paid","date":"2026-11-25","payment_method":"Credit Card","pos_sale_id":"POS_1795586791062_cnttqx05g","warehouse_id":"WH1","notes":"POS Sale #POS_1795586791062_cnttqx05g - Payment: Credit Card","line_items":[{"description":"Test Coffee","quantity":2,"price":4.5,"total":9,"sku":"test-product-1","type":"product","cost_price":0},{"description":"Gift Wrapping","quantity":1,"price":1,"total":1,"sku":"test-service-1","type":"service","cost_price":0}]}"#;
        assert_eq!(got, want);
    }

    #[test]
    fn money_keeps_its_digits() {
        let body = r#"{"items":[{"id":"a","name":"A","price":10.10,"quantity":3,"cost":"2.50"},{"id":"b","price":"0.1","quantity":0.3}],"total":30.30,"customerId":"c"}"#;
        let sale = Sale::parse(body.as_bytes()).unwrap();
        let p = InvoicePayload::build(&sale, "c", "c", "S", "2026-01-01", "USD");
        let v = serde_json::to_string(&p).unwrap();
        assert!(
            v.contains(r#""amount":30.30,"paid_amount":30.30,"currency":"USD""#),
            "{v}"
        );
        assert!(
            v.contains(r#""quantity":3,"price":10.10,"total":30.3"#),
            "{v}"
        );
        assert!(v.contains(r#""cost_price":2.50"#), "{v}");
        // 0.1 × 0.3 in binary floating point is 0.030000000000000002
        assert!(v.contains(r#""price":0.1,"total":0.03,"sku":"b""#), "{v}");
        // no name: the SKU describes the line; no type: product; no payment: short note
        assert!(v.contains(r#""description":"b""#), "{v}");
        assert!(v.contains(r#""notes":"POS Sale #S""#), "{v}");
        assert!(!v.contains("payment_method"), "{v}");
        assert!(!v.contains("warehouse_id"), "{v}");
    }

    #[test]
    fn an_absurd_line_total_is_still_a_number() {
        let sale = Sale::parse(
            br#"{"items":[{"price":1e200,"quantity":1e200}],"total":1,"customerId":"c"}"#,
        )
        .unwrap();
        let p = InvoicePayload::build(&sale, "c", "c", "S", "2026-01-01", "USD");
        let v: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(v["line_items"][0]["total"], 0);
    }

    #[test]
    fn customer_is_a_non_empty_string() {
        for (body, want) in [
            (r#"{"customerId":"  "}"#, Some("  ")),
            (r#"{"customerId":""}"#, None),
            (r#"{"customerId":null}"#, None),
            (r#"{"customerId":42}"#, None),
            (r#"{"customerId":"c-1"}"#, Some("c-1")),
            (r#"{}"#, None),
        ] {
            let sale = Sale::parse(body.as_bytes()).unwrap();
            assert_eq!(sale.customer_id.as_deref(), want, "{body}");
        }
        // read as the POS reads it: a BOM and Latin-1 bytes do not hide the customer
        let bom = b"\xEF\xBB\xBF{\"customerId\":\"c-1\",\"customerName\":\"Ren\xe9\"}";
        let s = Sale::parse(bom).unwrap();
        assert_eq!(s.customer_id.as_deref(), Some("c-1"));
        assert_eq!(s.customer_name.as_deref(), Some("Ren\u{FFFD}"));
        // no customer, no invoice: the lines are not read
        let s = Sale::parse(br#"{"items":[{"id":"a","price":1,"quantity":1}]}"#).unwrap();
        assert!(s.items.is_empty());
        assert!(Sale::parse(b"[1,2]").is_err());
        assert!(Sale::parse(b"null").is_err());
        assert!(Sale::parse(b"{bad").is_err());
        // items that are not an array of objects give no lines, not an error
        let s = Sale::parse(br#"{"items":"abc","customerId":"c"}"#).unwrap();
        assert!(s.items.is_empty());
    }

    #[test]
    fn completed_means_2xx_success_true_and_a_sale_id() {
        use http::StatusCode as S;
        for (status, body, want) in [
            (S::OK, r#"{"success":true,"saleId":"X"}"#, Some("X")),
            (
                S::MULTI_STATUS,
                r#"{"success":true,"saleId":"X"}"#,
                Some("X"),
            ),
            (S::OK, r#"{"success":"true","saleId":"X"}"#, None),
            (S::OK, r#"{"success":true,"saleId":7}"#, None),
            (S::OK, r#"{"success":true}"#, None),
            (S::OK, r#"{"success":false,"saleId":"X"}"#, None),
            (S::BAD_REQUEST, r#"{"success":true,"saleId":"X"}"#, None),
        ] {
            let obj = Object::parse(body).unwrap();
            assert_eq!(
                completed_sale_id(status, &obj).as_deref(),
                want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn crm_status_has_all_five_keys() {
        let s = serde_json::to_string(&CrmStatus::failed(false, "down")).unwrap();
        assert_eq!(
            s,
            r#"{"serviceAvailable":false,"invoiceCreated":false,"invoice_id":null,"invoice_number":null,"error":"down"}"#
        );
    }
}
