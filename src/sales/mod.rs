//! The sales route: `POST /api/sales` (configurable) is read, forwarded, and its answer turned
//! into a CRM invoice plus a `crmStatus` for the till. Everything else passes by untouched.
//!
//! Split the tower-http way: [`layer`] builds the middleware, [`service`] decides per request,
//! [`future`] is its response future; [`model`] and [`rewrite`] are pure and I/O-free.

pub mod future;
pub mod layer;
pub mod model;
pub mod rewrite;
pub mod service;

pub use layer::{SalesContext, SalesLayer};
pub use service::{SaleNote, SalesService};
