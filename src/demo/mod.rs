//! `pos-crm-proxy demo`: a sample POS and a sample CRM on loopback with the proxy in front, so a
//! new user sees an invoice number come back within a minute. The same sample servers back the
//! integration tests, so the demo shows what is tested.

pub mod sample_crm;
pub mod sample_pos;

use std::net::SocketAddr;
use std::path::Path;

use crate::app::{App, StartError};
use crate::config::{Config, CrmEndpoint, NoEnv, Secret};

pub use sample_crm::SampleCrm;
pub use sample_pos::{SamplePos, SamplePosOptions};

/// The API key the sample CRM expects in the demo.
pub const DEMO_API_KEY: &str = "demo-api-key";

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the sample {0}: {1}")]
    Sample(&'static str, std::io::Error),
    #[error(transparent)]
    Proxy(#[from] StartError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The three running parts of the demo.
pub struct Demo {
    pub pos: SamplePos,
    pub crm: SampleCrm,
    pub app: App,
}

impl Demo {
    /// Starts the sample POS and CRM on free loopback ports and the proxy on `listen`.
    pub async fn start(listen: SocketAddr, admin_listen: SocketAddr) -> Result<Demo, DemoError> {
        let pos = SamplePos::start(SamplePosOptions::default())
            .await
            .map_err(|e| DemoError::Sample("POS", e))?;
        let crm = SampleCrm::start(DEMO_API_KEY)
            .await
            .map_err(|e| DemoError::Sample("CRM", e))?;
        let mut config = Config::from_toml("", Path::new("(demo)"), &NoEnv)?;
        config.listen = listen;
        config.admin_listen = admin_listen;
        config.upstream.authority = pos
            .addr()
            .to_string()
            .parse()
            .expect("a socket address is an authority");
        config.crm.endpoint = Some(CrmEndpoint {
            base_url: crm.url(),
            api_key: Secret::new(DEMO_API_KEY),
        });
        let app = App::start(config).await?;
        Ok(Demo { pos, crm, app })
    }

    /// What to type next.
    pub fn instructions(&self) -> String {
        let proxy = self.app.proxy_addr();
        let admin = self.app.admin_addr();
        let with = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"},{"id":"test-service-1","name":"Gift Wrapping","price":1,"quantity":1,"type":"service"}],"subtotal":10,"tax":1,"total":11,"paymentMethod":"Credit Card","user":"test-cashier","warehouseId":"WH1","customerId":"customer-123","customerName":"John Doe","currency":"USD"}"#;
        let without = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":2,"type":"product"}],"subtotal":9,"tax":0.9,"total":9.9,"paymentMethod":"Cash","user":"test-cashier"}"#;
        let lookup = r#"{"items":[{"id":"test-product-1","name":"Test Coffee","price":4.5,"quantity":1,"type":"product"}],"total":4.5,"paymentMethod":"Cash","customerId":"customer-456"}"#;
        format!(
            "pos-crm-proxy demo is running.\n\
             \n  proxy      http://{proxy}   (in front of the sample POS)\
             \n  sample POS {pos}\
             \n  sample CRM {crm}   (x-api-key: {key})\
             \n  admin      http://{admin}/healthz\n\
             \nA sale with a customer (the answer carries crmStatus with an invoice number):\n\
             \n  curl -s -X POST http://{proxy}/api/sales -H 'content-type: application/json' \\\n    -d '{with}'\n\
             \nA sale without a customer (the answer gains \"crmStatus\": null):\n\
             \n  curl -s -X POST http://{proxy}/api/sales -H 'content-type: application/json' \\\n    -d '{without}'\n\
             \nA customer id without a name (the proxy asks the CRM for the name):\n\
             \n  curl -s -X POST http://{proxy}/api/sales -H 'content-type: application/json' \\\n    -d '{lookup}'\n\
             \nThe invoices the CRM holds:\n\
             \n  curl -s '{crm}/api/external/invoices?page=1&perPage=50' -H 'x-api-key: {key}'\n\
             \nPress Ctrl-C to stop.\n",
            pos = self.pos.url(),
            crm = self.crm.url(),
            key = DEMO_API_KEY,
        )
    }

    pub async fn shutdown(self) {
        self.app.shutdown().await;
        self.pos.shutdown().await;
        self.crm.shutdown().await;
    }
}
