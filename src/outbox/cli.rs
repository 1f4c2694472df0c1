//! `pos-crm-proxy outbox ...`: the operator's view of the outbox file, safe while the proxy
//! runs (SQLite WAL; the running proxy picks replays up within `outbox.poll_interval_ms`).

use std::io::Write;
use std::path::Path;

use super::store::{self, Job, State, Store, StoreError};

/// An operator command.
#[derive(Debug, Clone)]
pub enum Command {
    List {
        state: Option<State>,
        limit: usize,
        json: bool,
    },
    Show {
        sale_id: String,
    },
    Retry(Target),
    Stats {
        json: bool,
    },
}

/// What `outbox retry` replays.
#[derive(Debug, Clone)]
pub enum Target {
    Sale(String),
    AllDead,
    AllHeld,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no outbox at {0} (is storage.data_dir / PROXY_DATA_DIR right?)")]
    Missing(String),
    #[error("no job for sale {0}")]
    UnknownSale(String),
    #[error("sale {0} is already delivered (invoice {1}); delivered jobs are never sent again")]
    Delivered(String, String),
    #[error("sale {0} is being delivered right now; look again with `outbox show`")]
    InFlight(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
}

fn time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs `cmd` against the outbox in `data_dir`, writing to `out`.
pub fn run(
    cmd: Command,
    data_dir: &Path,
    synchronous_full: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let path = store::path_in(data_dir);
    if !path.exists() {
        return Err(CliError::Missing(path.display().to_string()));
    }
    let mut store = Store::open(data_dir, synchronous_full)?;
    match cmd {
        Command::List { state, limit, json } => {
            let jobs = store.list(state, limit)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &jobs).map_err(std::io::Error::from)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{:<32} {:<10} {:>8}  {:<24} {:<16} LAST ERROR",
                    "SALE ID", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "INVOICE"
                )?;
                for j in &jobs {
                    let next = match j.state {
                        State::Pending => time(j.next_attempt_at),
                        _ => "-".into(),
                    };
                    writeln!(
                        out,
                        "{:<32} {:<10} {:>8}  {:<24} {:<16} {}",
                        j.sale_id,
                        j.state.as_str(),
                        j.total_attempts,
                        next,
                        j.invoice_number.as_deref().unwrap_or("-"),
                        j.last_error.as_deref().unwrap_or("")
                    )?;
                }
                writeln!(out, "{} job(s)", jobs.len())?;
            }
        }
        Command::Show { sale_id } => {
            let job = store.get(&sale_id)?.ok_or(CliError::UnknownSale(sale_id))?;
            show(&job, out)?;
        }
        Command::Retry(target) => {
            let now = now_ms();
            let n = match target {
                Target::Sale(id) => {
                    let job = store
                        .retry(&id, now)?
                        .ok_or_else(|| CliError::UnknownSale(id.clone()))?;
                    if job.state == State::Delivered {
                        return Err(CliError::Delivered(
                            id,
                            job.invoice_number.unwrap_or_default(),
                        ));
                    }
                    if job.state == State::InFlight {
                        return Err(CliError::InFlight(id));
                    }
                    usize::from(job.state == State::Pending)
                }
                Target::AllDead => store.retry_all(State::Dead, now)?,
                Target::AllHeld => store.retry_all(State::Held, now)?,
            };
            writeln!(out, "{n} job(s) queued for delivery")?;
        }
        Command::Stats { json } => {
            let s = store.stats()?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &s).map_err(std::io::Error::from)?;
                writeln!(out)?;
            } else {
                writeln!(out, "pending    {}", s.pending)?;
                writeln!(out, "in_flight  {}", s.in_flight)?;
                writeln!(out, "held       {}", s.held)?;
                writeln!(out, "dead       {}", s.dead)?;
                writeln!(out, "delivered  {}", s.delivered)?;
                let oldest = s
                    .oldest_waiting_created_at
                    .map(time)
                    .unwrap_or_else(|| "-".into());
                writeln!(out, "oldest waiting since {oldest}")?;
            }
        }
    }
    Ok(())
}

fn show(job: &Job, out: &mut dyn Write) -> Result<(), CliError> {
    let payload: serde_json::Value = serde_json::from_slice(&job.payload)
        .unwrap_or_else(|_| String::from_utf8_lossy(&job.payload).into());
    let mut v = serde_json::to_value(job).map_err(std::io::Error::from)?;
    v["payload"] = payload;
    serde_json::to_writer_pretty(&mut *out, &v).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(cmd: Command, dir: &Path) -> Result<String, CliError> {
        let mut out = Vec::new();
        run(cmd, dir, true, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn commands_over_a_real_outbox() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            output(Command::Stats { json: false }, dir.path()),
            Err(CliError::Missing(_))
        ));
        {
            let mut s = Store::open(dir.path(), true).unwrap();
            s.enqueue("S-dead", "k1", br#"{"amount":10.10}"#, 1, Some(10))
                .unwrap();
            let id = s.get("S-dead").unwrap().unwrap().id;
            s.mark_stopped(
                id,
                1,
                State::Dead,
                "CRM API error: 400 Bad Request - nope",
                Some(400),
                2,
            )
            .unwrap();
            s.enqueue("S-ok", "k2", b"{}", 3, Some(10)).unwrap();
            let id = s.get("S-ok").unwrap().unwrap().id;
            s.mark_delivered(id, Some("uuid"), Some("INV-2026-0007"), 4)
                .unwrap();
        }
        let list = output(
            Command::List {
                state: None,
                limit: 10,
                json: false,
            },
            dir.path(),
        )
        .unwrap();
        assert!(
            list.contains("S-dead") && list.contains("dead") && list.contains("400 Bad Request"),
            "{list}"
        );
        assert!(list.contains("INV-2026-0007"), "{list}");
        let dead = output(
            Command::List {
                state: Some(State::Dead),
                limit: 10,
                json: true,
            },
            dir.path(),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&dead).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 1);
        let show = output(
            Command::Show {
                sale_id: "S-dead".into(),
            },
            dir.path(),
        )
        .unwrap();
        assert!(
            show.contains("\"amount\": 10.10") || show.contains("\"amount\": 10.1"),
            "{show}"
        );
        assert!(matches!(
            output(
                Command::Show {
                    sale_id: "nope".into()
                },
                dir.path()
            ),
            Err(CliError::UnknownSale(_))
        ));
        assert!(matches!(
            output(Command::Retry(Target::Sale("S-ok".into())), dir.path()),
            Err(CliError::Delivered(..))
        ));
        let r = output(Command::Retry(Target::AllDead), dir.path()).unwrap();
        assert!(r.starts_with("1 job(s)"), "{r}");
        let stats = output(Command::Stats { json: true }, dir.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
        assert_eq!(
            (
                v["pending"].as_u64(),
                v["delivered"].as_u64(),
                v["dead"].as_u64()
            ),
            (Some(1), Some(1), Some(0))
        );
    }
}
