//! Durable enqueues per second into the outbox, with `synchronous=FULL` (the default: a
//! committed job survives a power cut) and `NORMAL` (survives a process crash only).
//!
//! `cargo bench --bench outbox_enqueue [-- N]`: N enqueues per mode (default 2000), one
//! thread, each in its own transaction, as the proxy does one per sale; the data directory is
//! a temp dir on the same disk as `$TMPDIR`.

use std::time::Instant;

use pos_crm_proxy::outbox::store::Store;

fn run(full: bool, n: usize) -> f64 {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let mut store = Store::open(dir.path(), full).unwrap();
    let payload = br#"{"customer_id":"customer-123","customer":"John Doe","amount":11,"paid_amount":11,"currency":"USD","status":"paid","date":"2026-11-25","payment_method":"Credit Card","pos_sale_id":"POS_1795586791062_cnttqx05g","warehouse_id":"WH1","notes":"POS Sale #POS_1795586791062_cnttqx05g - Payment: Credit Card","line_items":[{"description":"Test Coffee","quantity":2,"price":4.5,"total":9,"sku":"test-product-1","type":"product","cost_price":0},{"description":"Gift Wrapping","quantity":1,"price":1,"total":1,"sku":"test-service-1","type":"service","cost_price":0}]}"#;
    let start = Instant::now();
    for i in 0..n {
        let sale = format!("POS_{i}");
        store
            .enqueue(&sale, &sale, payload, i as i64, Some(i as i64 + 1000))
            .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    // interleave and repeat so drift hits both modes alike; report the median
    let mut full = Vec::new();
    let mut normal = Vec::new();
    for _ in 0..3 {
        full.push(run(true, n));
        normal.push(run(false, n));
    }
    full.sort_by(f64::total_cmp);
    normal.sort_by(f64::total_cmp);
    println!("outbox durable enqueues, {n} per run, median of 3, one transaction each\n");
    println!("| synchronous | enqueues/s |");
    println!("|---|---:|");
    println!("| FULL (default) | {:.0} |", full[1]);
    println!("| NORMAL | {:.0} |", normal[1]);
    println!("\nFULL / NORMAL = {:.2}", full[1] / normal[1]);
}
