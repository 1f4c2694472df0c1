//! pos-crm-proxy: a sidecar reverse proxy in front of a legacy Point-of-Sale web app that turns
//! every completed sale with a customer into exactly one paid invoice in the shop's CRM.
//!
//! See `ARCHITECTURE.md` for the map of modules and the invariants they keep.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod crm;
pub mod demo;
pub mod encoding;
pub mod error;
pub mod invoice;
pub mod json;
pub mod live;
pub mod metrics;
pub mod outbox;
pub mod sales;
pub mod server;
pub mod tls;
pub mod upstream;

pub use app::App;
pub use config::Config;
