//! Fuzzes configuration parsing: `Config::from_toml` on any text must return Ok or Err, never
//! panic. A config it accepts must also be accepted again after a second parse of the same
//! text (it reads nothing but the text and the (empty) environment).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pos_crm_proxy::config::{Config, NoEnv};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = Config::from_toml(text, Path::new("fuzz.toml"), &NoEnv);
    if first.is_ok() {
        let again = Config::from_toml(text, Path::new("fuzz.toml"), &NoEnv);
        assert!(again.is_ok(), "accepted once, refused the second time");
        // Debug output must work (and is what logs show): exercise it.
        let _ = format!("{:?}", first.unwrap());
    }
});
