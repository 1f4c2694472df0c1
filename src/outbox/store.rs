//! The outbox table in SQLite: one row per sale, keyed by `saleId`, never deleted on failure.
//!
//! WAL mode so the proxy and an operator's `outbox` command can use the file at the same time;
//! `synchronous=FULL` by default so a committed job survives a power cut, not only a crash.
//! All times are Unix milliseconds. The API is synchronous; [`super::Outbox`] runs it off the
//! async threads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

/// One step of the schema; `PRAGMA user_version` records how many have been applied. Each
/// runs in the transaction that also sets `user_version`.
type Migration = fn(&Connection) -> rusqlite::Result<()>;

const MIGRATIONS: &[Migration] = &[create_jobs, state_check_as_comparisons];

/// 1: the first schema.
const SCHEMA_V1: &str = r#"
CREATE TABLE jobs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    sale_id           TEXT    NOT NULL UNIQUE,
    idempotency_key   TEXT    NOT NULL,
    payload           BLOB    NOT NULL,
    state             TEXT    NOT NULL CHECK (state IN ('pending','in_flight','delivered','dead','held')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    total_attempts    INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    cycle_started_at  INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    next_attempt_at   INTEGER NOT NULL,
    lease_until       INTEGER,
    last_error        TEXT,
    last_status       INTEGER,
    invoice_id        TEXT,
    invoice_number    TEXT,
    delivered_at      INTEGER
);
CREATE INDEX jobs_state_due ON jobs (state, next_attempt_at, id);
"#;

fn create_jobs(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA_V1)
}

const STATE_CHECK_V1: &str = "CHECK (state IN ('pending','in_flight','delivered','dead','held'))";
const STATE_CHECK_V2: &str = "CHECK (state = 'pending' OR state = 'in_flight' \
     OR state = 'delivered' OR state = 'dead' OR state = 'held')";

/// 2: the state CHECK written as comparisons. SQLite evaluates a CHECK of `IN (five
/// constants)` by building a temporary b-tree on every insert and update of a row; that was
/// about a tenth of the instructions of a sale with an invoice (callgrind). The constraint
/// accepts exactly what it did and the file format does not change, so the table's definition
/// is edited in place, as SQLite documents for changing a CHECK constraint (`writable_schema`,
/// then `schema_version` + 1): instant, and no copy of a table that may hold months of sales.
fn state_check_as_comparisons(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.pragma_query_value(None, "schema_version", |r| r.get(0))?;
    conn.pragma_update(None, "writable_schema", true)?;
    conn.execute(
        "UPDATE sqlite_schema SET sql = replace(sql, ?1, ?2) WHERE type = 'table' AND name = 'jobs'",
        params![STATE_CHECK_V1, STATE_CHECK_V2],
    )?;
    conn.pragma_update(None, "schema_version", version + 1)?;
    conn.pragma_update(None, "writable_schema", false)?;
    // The edited definition is parsed here, inside the transaction: were it unreadable, the
    // migration would fail and roll back instead of leaving a file SQLite cannot open.
    conn.prepare("SELECT state FROM jobs LIMIT 0").map(drop)
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its next attempt at `next_attempt_at`.
    Pending,
    /// Claimed by a delivery until `lease_until`; an expired lease means the claimer died.
    InFlight,
    /// The CRM confirmed the invoice. Never sent again.
    Delivered,
    /// The CRM refused it for good, or it ran out of time; an operator can replay it.
    Dead,
    /// The CRM refused our credentials; waits for an operator.
    Held,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Pending,
        State::InFlight,
        State::Delivered,
        State::Dead,
        State::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InFlight => "in_flight",
            State::Delivered => "delivered",
            State::Dead => "dead",
            State::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One job as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: i64,
    pub sale_id: String,
    pub idempotency_key: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub state: State,
    pub attempts: u32,
    pub total_attempts: u32,
    pub created_at: i64,
    pub cycle_started_at: i64,
    pub updated_at: i64,
    pub next_attempt_at: i64,
    pub lease_until: Option<i64>,
    pub last_error: Option<String>,
    pub last_status: Option<u16>,
    pub invoice_id: Option<String>,
    pub invoice_number: Option<String>,
    pub delivered_at: Option<i64>,
}

const COLUMNS: &str = "id, sale_id, idempotency_key, payload, state, attempts, total_attempts, created_at, \
     cycle_started_at, updated_at, next_attempt_at, lease_until, last_error, last_status, invoice_id, \
     invoice_number, delivered_at";

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let state: String = row.get(4)?;
    Ok(Job {
        id: row.get(0)?,
        sale_id: row.get(1)?,
        idempotency_key: row.get(2)?,
        payload: row.get(3)?,
        state: State::parse(&state).unwrap_or(State::Pending),
        attempts: row.get(5)?,
        total_attempts: row.get(6)?,
        created_at: row.get(7)?,
        cycle_started_at: row.get(8)?,
        updated_at: row.get(9)?,
        next_attempt_at: row.get(10)?,
        lease_until: row.get(11)?,
        last_error: row.get(12)?,
        last_status: row.get(13)?,
        invoice_id: row.get(14)?,
        invoice_number: row.get(15)?,
        delivered_at: row.get(16)?,
    })
}

/// A store failure, with the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox task failed: {0}")]
    Task(String),
    #[error(
        "outbox {path} was written by a newer version (schema {found}, this build knows {known})"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

/// What enqueueing found.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// A new job, stored in the state asked for.
    New(Job),
    /// The sale already had a job (a repeated saleId): nothing was changed.
    Existing(Job),
}

/// Counts per state and the age of the oldest job waiting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    pub held: u64,
    /// Created-at of the oldest job not yet delivered or dead.
    pub oldest_waiting_created_at: Option<i64>,
}

impl Stats {
    /// Jobs still to deliver.
    pub fn depth(&self) -> u64 {
        self.pending + self.in_flight + self.held
    }
}

/// The outbox database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// `synchronous=FULL` on the commit that makes jobs durable.
    durable: bool,
}

/// A job to store (see [`Store::enqueue_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub sale_id: &'a str,
    pub idempotency_key: &'a str,
    pub payload: &'a [u8],
    pub now: i64,
    /// Set: the job starts claimed (in flight) until then, for the inline attempt.
    pub lease_until: Option<i64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The outbox file inside a data directory.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join("outbox.sqlite3")
}

/// How one delivery attempt ended, as written to its row.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The CRM confirmed the invoice. The CRM's word wins over anything that happened to the
    /// row meanwhile (a lease that ran out, a release at shutdown): only an already delivered
    /// job is left as it is.
    Delivered {
        id: i64,
        invoice_id: Option<String>,
        invoice_number: Option<String>,
        now: i64,
    },
    /// A failed attempt, to `state` (`Pending` until `next_attempt_at`, or `Dead`/`Held`).
    /// `claim` is the job's `total_attempts` when it was claimed: if another claim took the
    /// job since (the lease ran out), this outcome is stale and ignored.
    Failed {
        id: i64,
        claim: u32,
        state: State,
        error: String,
        status: Option<u16>,
        next_attempt_at: i64,
        now: i64,
    },
}

/// Inserts one new job, or finds the sale's existing one. A new job is built from what was
/// inserted rather than read back: the payload does not make a round trip through SQLite.
fn insert_job(conn: &Connection, j: &NewJob<'_>) -> rusqlite::Result<Enqueued> {
    let (state, attempts) = match j.lease_until {
        Some(_) => (State::InFlight, 1),
        None => (State::Pending, 0),
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO jobs (sale_id, idempotency_key, payload, state, attempts, total_attempts, \
             created_at, cycle_started_at, updated_at, next_attempt_at, lease_until) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?6, ?6, ?6, ?7) ON CONFLICT (sale_id) DO NOTHING",
        )?
        .execute(params![
            j.sale_id,
            j.idempotency_key,
            j.payload,
            state.as_str(),
            attempts,
            j.now,
            j.lease_until
        ])?;
    if inserted == 1 {
        return Ok(Enqueued::New(Job {
            id: conn.last_insert_rowid(),
            sale_id: j.sale_id.to_string(),
            idempotency_key: j.idempotency_key.to_string(),
            payload: j.payload.to_vec(),
            state,
            attempts,
            total_attempts: attempts,
            created_at: j.now,
            cycle_started_at: j.now,
            updated_at: j.now,
            next_attempt_at: j.now,
            lease_until: j.lease_until,
            last_error: None,
            last_status: None,
            invoice_id: None,
            invoice_number: None,
            delivered_at: None,
        }));
    }
    let job = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE sale_id = ?1"))?
        .query_row(params![j.sale_id], job_from_row)?;
    Ok(Enqueued::Existing(job))
}

/// Writes one attempt's outcome; `false` when the row had moved on (see [`Outcome`]).
fn record_outcome(conn: &Connection, outcome: &Outcome) -> rusqlite::Result<bool> {
    let n = match outcome {
        Outcome::Delivered {
            id,
            invoice_id,
            invoice_number,
            now,
        } => conn
            .prepare_cached(
                "UPDATE jobs SET state = 'delivered', invoice_id = ?2, invoice_number = ?3, \
                 delivered_at = ?4, updated_at = ?4, lease_until = NULL, last_error = NULL \
                 WHERE id = ?1 AND state != 'delivered'",
            )?
            .execute(params![id, invoice_id, invoice_number, now])?,
        Outcome::Failed {
            id,
            claim,
            state,
            error,
            status,
            next_attempt_at,
            now,
        } => conn
            .prepare_cached(
                "UPDATE jobs SET state = ?2, last_error = ?3, last_status = ?4, next_attempt_at = ?5, \
                 updated_at = ?6, lease_until = NULL \
                 WHERE id = ?1 AND state = 'in_flight' AND total_attempts = ?7",
            )?
            .execute(params![id, state.as_str(), error, status, next_attempt_at, now, claim])?,
    };
    Ok(n == 1)
}

impl Store {
    /// Opens (creating if needed) the outbox in `data_dir` and migrates it.
    pub fn open(data_dir: &Path, synchronous_full: bool) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = path_in(data_dir);
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // NORMAL for everything but the commit that makes a job durable (see `enqueue_batch`):
        // in WAL mode that commit's fsync also covers every write before it, and losing the
        // last outcome updates to a power cut only means one resend with the same key.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        let version = |c: &Connection| -> rusqlite::Result<i64> {
            c.pragma_query_value(None, "user_version", |r| r.get(0))
        };
        let mut found = version(&conn).map_err(err)?;
        // One write transaction per step, the version read again inside it: another process
        // (the CLI, a second proxy) opening the same old file at the same moment waits for
        // this one and then finds the step done, instead of running it twice or failing.
        while found < MIGRATIONS.len() as i64 {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(err)?;
            found = version(&tx).map_err(err)?;
            if let Some(migrate) = MIGRATIONS.get(found as usize) {
                migrate(&tx).map_err(err)?;
                found += 1;
                tx.pragma_update(None, "user_version", found).map_err(err)?;
            }
            tx.commit().map_err(err)?;
        }
        if found > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew {
                path,
                found,
                known: MIGRATIONS.len(),
            });
        }
        Ok(Store {
            conn,
            path,
            durable: synchronous_full,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Stores a new job for `sale_id`, or returns the one it already has. With `lease_until`
    /// the job starts `in_flight` (claimed for the inline attempt, counted as attempt 1);
    /// otherwise `pending` and due at `now`.
    pub fn enqueue(
        &mut self,
        sale_id: &str,
        idempotency_key: &str,
        payload: &[u8],
        now: i64,
        lease_until: Option<i64>,
    ) -> Result<Enqueued, StoreError> {
        let job = NewJob {
            sale_id,
            idempotency_key,
            payload,
            now,
            lease_until,
        };
        self.enqueue_batch(std::slice::from_ref(&job))?
            .pop()
            .expect("one result per job")
    }

    /// Stores several new jobs in one transaction: one fsync for all of them (group commit,
    /// so concurrent sales do not queue behind each other's disk flush). Each job gets its own
    /// result; an error of the commit itself fails them all.
    pub fn enqueue_batch(
        &mut self,
        jobs: &[NewJob<'_>],
    ) -> Result<Vec<Result<Enqueued, StoreError>>, StoreError> {
        self.write_batch(jobs, &[]).map(|(enqueued, _)| enqueued)
    }

    /// One transaction for new jobs and attempt outcomes together, so the writer thread pays
    /// one commit for everything that queued up while the previous one was flushed. The commit
    /// uses `synchronous=FULL` when it stores new jobs (unless the store was opened without
    /// it): in WAL mode that fsync also covers every write before it. A batch of outcomes
    /// alone commits with `NORMAL`: losing the last outcomes to a power cut only means one
    /// resend with the same key. Each item gets its own result; an error of the commit itself
    /// fails them all.
    #[allow(clippy::type_complexity)]
    pub fn write_batch(
        &mut self,
        jobs: &[NewJob<'_>],
        outcomes: &[Outcome],
    ) -> Result<
        (
            Vec<Result<Enqueued, StoreError>>,
            Vec<Result<bool, StoreError>>,
        ),
        StoreError,
    > {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let full = self.durable && !jobs.is_empty();
        if full {
            self.set_synchronous("FULL").map_err(err)?;
        }
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(err)?;
            let enqueued: Vec<_> = jobs
                .iter()
                .map(|j| insert_job(&tx, j).map_err(err))
                .collect();
            let recorded: Vec<_> = outcomes
                .iter()
                .map(|o| record_outcome(&tx, o).map_err(err))
                .collect();
            tx.commit().map_err(err)?;
            Ok((enqueued, recorded))
        })();
        if full {
            let _ = self.set_synchronous("NORMAL");
        }
        result
    }

    /// A cached statement: the batch path runs these thousands of times a second, and parsing
    /// the pragma each time showed in the profile.
    fn set_synchronous(&self, level: &str) -> rusqlite::Result<()> {
        let sql = if level == "FULL" {
            "PRAGMA synchronous = FULL"
        } else {
            "PRAGMA synchronous = NORMAL"
        };
        self.conn.prepare_cached(sql)?.execute([]).map(|_| ())
    }

    /// Records how one attempt ended, in its own transaction (see [`Outcome`]).
    pub fn record(&mut self, outcome: &Outcome) -> Result<bool, StoreError> {
        record_outcome(&self.conn, outcome).map_err(|e| self.err(e))
    }

    pub fn get(&self, sale_id: &str) -> Result<Option<Job>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE sale_id = ?1"),
                params![sale_id],
                job_from_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Claims up to `limit` due jobs, oldest first: pending ones whose time has come and
    /// in-flight ones whose lease expired (their claimer died). Each claim is one attempt.
    pub fn claim_due(
        &mut self,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // IMMEDIATE: take the write lock up front, so a second process holding it makes us wait
        // (busy timeout) instead of failing on the upgrade from read to write.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let ids: Vec<i64> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT id FROM jobs WHERE (state = 'pending' AND next_attempt_at <= ?1) \
                     OR (state = 'in_flight' AND lease_until <= ?1) ORDER BY id LIMIT ?2",
                )
                .map_err(err)?;
            let rows = stmt
                .query_map(params![now, limit as i64], |r| r.get(0))
                .map_err(err)?;
            rows.collect::<Result<_, _>>().map_err(err)?
        };
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            tx.prepare_cached(
                "UPDATE jobs SET state = 'in_flight', lease_until = ?2, attempts = attempts + 1, \
                 total_attempts = total_attempts + 1, updated_at = ?3 WHERE id = ?1",
            )
            .and_then(|mut st| st.execute(params![id, lease_until, now]))
            .map_err(err)?;
            let job = tx
                .prepare_cached(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"))
                .and_then(|mut st| st.query_row(params![id], job_from_row))
                .map_err(err)?;
            jobs.push(job);
        }
        tx.commit().map_err(err)?;
        Ok(jobs)
    }

    /// Records a confirmed invoice (see [`Outcome::Delivered`]).
    pub fn mark_delivered(
        &mut self,
        id: i64,
        invoice_id: Option<&str>,
        invoice_number: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.record(&Outcome::Delivered {
            id,
            invoice_id: invoice_id.map(str::to_string),
            invoice_number: invoice_number.map(str::to_string),
            now,
        })
    }

    /// A failed attempt: back to `pending` until `next_attempt_at` (see [`Outcome::Failed`]).
    pub fn mark_retry(
        &mut self,
        id: i64,
        claim: u32,
        error: &str,
        status: Option<u16>,
        next_attempt_at: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.record(&Outcome::Failed {
            id,
            claim,
            state: State::Pending,
            error: error.to_string(),
            status,
            next_attempt_at,
            now,
        })
    }

    /// A failed attempt that will not be retried by itself (`Dead` or `Held`).
    pub fn mark_stopped(
        &mut self,
        id: i64,
        claim: u32,
        state: State,
        error: &str,
        status: Option<u16>,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.record(&Outcome::Failed {
            id,
            claim,
            state,
            error: error.to_string(),
            status,
            next_attempt_at: now,
            now,
        })
    }

    /// Puts in-flight jobs back to `pending` (shutdown, or start-up after a crash), due now.
    /// With `only_expired`, only jobs whose lease has run out.
    pub fn release_in_flight(&mut self, now: i64, only_expired: bool) -> Result<usize, StoreError> {
        let sql = if only_expired {
            "UPDATE jobs SET state = 'pending', lease_until = NULL, next_attempt_at = ?1, updated_at = ?1 \
             WHERE state = 'in_flight' AND lease_until <= ?1"
        } else {
            "UPDATE jobs SET state = 'pending', lease_until = NULL, next_attempt_at = ?1, updated_at = ?1 \
             WHERE state = 'in_flight'"
        };
        self.conn
            .execute(sql, params![now])
            .map_err(|e| self.err(e))
    }

    /// Makes every pending job due now (the CRM came back: drain the backlog oldest first
    /// instead of waiting out each job's back-off).
    pub fn make_pending_due(&mut self, now: i64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE jobs SET next_attempt_at = ?1 WHERE state = 'pending' AND next_attempt_at > ?1",
                params![now],
            )
            .map_err(|e| self.err(e))
    }

    /// Deletes at most `limit` delivered jobs whose invoice was confirmed before `before`;
    /// returns how many. Only delivered jobs: a job that still needs a delivery or an operator
    /// is never deleted. The range on `(state, next_attempt_at)` lets the index find them; a
    /// job is nearly always confirmed after it was due, and the rare exception (the late
    /// confirmation of an earlier claim, after a retry was scheduled) goes once its retry time
    /// has passed too, a few hours at most.
    pub fn prune_delivered(&mut self, before: i64, limit: usize) -> Result<usize, StoreError> {
        self.conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state = 'delivered' \
                 AND next_attempt_at < ?1 AND delivered_at < ?1 ORDER BY next_attempt_at LIMIT ?2)",
            )
            .and_then(|mut st| st.execute(params![before, limit as i64]))
            .map_err(|e| self.err(e))
    }

    /// An operator's replay of one job in `dead` or `held` (or a pending one, to make it due
    /// now): a fresh retry cycle. Delivered jobs are never replayed.
    pub fn retry(&mut self, sale_id: &str, now: i64) -> Result<Option<Job>, StoreError> {
        self.conn
            .execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, cycle_started_at = ?2, next_attempt_at = 0, \
                 updated_at = ?2 WHERE sale_id = ?1 AND state IN ('dead', 'held', 'pending')",
                params![sale_id, now],
            )
            .map_err(|e| self.err(e))?;
        self.get(sale_id)
    }

    /// Replays every job in `state` (`Dead` or `Held`); returns how many. Replayed jobs are due
    /// at once (`next_attempt_at = 0`, whatever the running proxy's clock says). Releasing a
    /// held queue also restarts the retry cycle of the jobs that waited behind the hold, so the
    /// time spent held does not count against their maximum age.
    pub fn retry_all(&mut self, state: State, now: i64) -> Result<usize, StoreError> {
        if !matches!(state, State::Dead | State::Held) {
            return Ok(0);
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        let n = tx
            .execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, cycle_started_at = ?2, next_attempt_at = 0, \
                 updated_at = ?2 WHERE state = ?1",
                params![state.as_str(), now],
            )
            .and_then(|n| {
                if state == State::Held {
                    tx.execute(
                        "UPDATE jobs SET attempts = 0, cycle_started_at = ?1 WHERE state = 'pending'",
                        params![now],
                    )?;
                }
                Ok(n)
            })
            .and_then(|n| tx.commit().map(|_| n))
            .map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        Ok(n)
    }

    /// Jobs, newest first, optionally in one state.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Job>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE (?1 IS NULL OR state = ?1) ORDER BY id DESC LIMIT ?2"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![state.map(State::as_str), limit as i64],
                job_from_row,
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let mut stats = Stats::default();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (state, n) = row.map_err(|e| self.err(e))?;
            let n = n.max(0) as u64;
            match State::parse(&state) {
                Some(State::Pending) => stats.pending = n,
                Some(State::InFlight) => stats.in_flight = n,
                Some(State::Delivered) => stats.delivered = n,
                Some(State::Dead) => stats.dead = n,
                Some(State::Held) => stats.held = n,
                None => {}
            }
        }
        stats.oldest_waiting_created_at = self
            .conn
            .query_row(
                "SELECT MIN(created_at) FROM jobs WHERE state IN ('pending', 'in_flight', 'held')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(stats)
    }

    /// Whether any job is held (the whole queue then waits for an operator).
    pub fn any_held(&self) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'held')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// When the next pending job is due, if any.
    pub fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row(
                "SELECT MIN(CASE WHEN state = 'pending' THEN next_attempt_at ELSE lease_until END) \
                 FROM jobs WHERE state IN ('pending', 'in_flight')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), true).unwrap();
        (dir, s)
    }

    #[test]
    fn one_row_per_sale_and_the_first_payload_wins() {
        let (_d, mut s) = store();
        assert!(matches!(
            s.enqueue("S1", "k1", b"{}", 100, None).unwrap(),
            Enqueued::New(_)
        ));
        match s.enqueue("S1", "k1", b"{\"other\":1}", 200, None).unwrap() {
            Enqueued::Existing(job) => {
                assert_eq!(job.payload, b"{}");
                assert_eq!(job.created_at, 100);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stats().unwrap().pending, 1);
    }

    #[test]
    fn a_group_commit_stores_each_job_once() {
        let (_d, mut s) = store();
        s.enqueue("OLD", "k", b"old", 1, None).unwrap();
        let job = |id: &'static str| NewJob {
            sale_id: id,
            idempotency_key: id,
            payload: b"p",
            now: 5,
            lease_until: Some(100),
        };
        let out = s
            .enqueue_batch(&[job("A"), job("OLD"), job("B"), job("A")])
            .unwrap();
        let kinds: Vec<&str> = out
            .iter()
            .map(|r| match r.as_ref().unwrap() {
                Enqueued::New(_) => "new",
                Enqueued::Existing(_) => "existing",
            })
            .collect();
        assert_eq!(kinds, ["new", "existing", "new", "existing"]);
        let st = s.stats().unwrap();
        assert_eq!((st.pending, st.in_flight), (1, 2));
    }

    #[test]
    fn one_batch_holds_new_jobs_and_outcomes_and_a_new_job_reads_back_as_built() {
        let (_d, mut s) = store();
        let Enqueued::New(a) = s.enqueue("A", "ka", b"pa", 1, Some(50)).unwrap() else {
            panic!("new job expected")
        };
        let Enqueued::New(b) = s.enqueue("B", "kb", b"pb", 1, Some(50)).unwrap() else {
            panic!("new job expected")
        };
        let c = NewJob {
            sale_id: "C",
            idempotency_key: "kc",
            payload: b"pc",
            now: 7,
            lease_until: Some(60),
        };
        let (enqueued, recorded) = s
            .write_batch(
                &[c],
                &[
                    Outcome::Delivered {
                        id: a.id,
                        invoice_id: Some("i".into()),
                        invoice_number: Some("INV-1".into()),
                        now: 8,
                    },
                    // A stale claim (B's claim is attempt 1): ignored.
                    Outcome::Failed {
                        id: b.id,
                        claim: 9,
                        state: State::Dead,
                        error: "late".into(),
                        status: None,
                        next_attempt_at: 8,
                        now: 8,
                    },
                ],
            )
            .unwrap();
        let built = match enqueued.into_iter().next().unwrap().unwrap() {
            Enqueued::New(job) => job,
            Enqueued::Existing(_) => panic!("C is new"),
        };
        assert_eq!(
            recorded.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            [true, false]
        );
        // The job handed to the inline attempt is exactly what the row says.
        let stored = s.get("C").unwrap().unwrap();
        assert_eq!(format!("{built:?}"), format!("{stored:?}"));
        assert_eq!(stored.payload, b"pc");
        assert_eq!(s.get("A").unwrap().unwrap().state, State::Delivered);
        assert_eq!(s.get("B").unwrap().unwrap().state, State::InFlight);
    }

    #[test]
    fn claim_lease_retry_deliver() {
        let (_d, mut s) = store();
        s.enqueue("A", "ka", b"a", 10, None).unwrap();
        s.enqueue("B", "kb", b"b", 11, Some(1_000)).unwrap(); // claimed inline
                                                              // B is leased until 1000: not claimable at 500, A is
        let got = s.claim_due(500, 600, 10).unwrap();
        assert_eq!(
            got.iter().map(|j| j.sale_id.as_str()).collect::<Vec<_>>(),
            ["A"]
        );
        assert_eq!(got[0].attempts, 1);
        assert!(s
            .mark_retry(got[0].id, got[0].total_attempts, "503", Some(503), 700, 500)
            .unwrap());
        assert!(
            s.claim_due(650, 800, 10).unwrap().is_empty(),
            "A not due yet, B leased"
        );
        // at 1001 B's lease has expired (its claimer died) and A is due: oldest first
        let got = s.claim_due(1_001, 2_000, 10).unwrap();
        assert_eq!(
            got.iter().map(|j| j.sale_id.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert_eq!(got[0].attempts, 2);
        assert!(s
            .mark_delivered(got[0].id, Some("uuid"), Some("INV-1"), 1_002)
            .unwrap());
        assert!(
            !s.mark_delivered(got[0].id, Some("uuid"), Some("INV-1"), 1_003)
                .unwrap(),
            "only once"
        );
        let a = s.get("A").unwrap().unwrap();
        assert_eq!(
            (a.state, a.invoice_number.as_deref()),
            (State::Delivered, Some("INV-1"))
        );
        // a delivered job is never claimed again, nor replayed
        assert!(s
            .claim_due(10_000, 20_000, 10)
            .unwrap()
            .iter()
            .all(|j| j.sale_id != "A"));
        assert_eq!(
            s.retry("A", 30_000).unwrap().unwrap().state,
            State::Delivered
        );
    }

    #[test]
    fn a_superseded_claim_cannot_record_a_failure_but_a_confirmation_always_lands() {
        let (_d, mut s) = store();
        s.enqueue("A", "ka", b"a", 0, Some(100)).unwrap(); // claim 1 (inline), lease to 100
        let first = s.get("A").unwrap().unwrap();
        // the lease ran out; the worker claims it again (claim 2)
        let second = s.claim_due(100, 200, 1).unwrap().pop().unwrap();
        assert_eq!((first.total_attempts, second.total_attempts), (1, 2));
        // the first attempt's late failure is stale: ignored
        assert!(!s
            .mark_retry(first.id, first.total_attempts, "503", Some(503), 500, 150)
            .unwrap());
        assert_eq!(s.get("A").unwrap().unwrap().state, State::InFlight);
        // the second attempt's failure is recorded
        assert!(s
            .mark_retry(second.id, second.total_attempts, "503", Some(503), 500, 160)
            .unwrap());
        // and a late 201 of the first attempt still makes it delivered: the CRM created it
        assert!(s
            .mark_delivered(first.id, Some("id"), Some("INV-9"), 170)
            .unwrap());
        let a = s.get("A").unwrap().unwrap();
        assert_eq!(
            (a.state, a.invoice_number.as_deref()),
            (State::Delivered, Some("INV-9"))
        );
        // a replayed job is due at once, whatever clock the replaying process has
        s.enqueue("B", "kb", b"b", 0, None).unwrap();
        let b = s.get("B").unwrap().unwrap();
        s.mark_retry(b.id, 0, "x", None, 10_000_000, 1)
            .unwrap_or_default();
        assert_eq!(s.retry("B", 5).unwrap().unwrap().next_attempt_at, 0);
    }

    #[test]
    fn dead_and_held_wait_for_an_operator() {
        let (_d, mut s) = store();
        s.enqueue("D", "kd", b"d", 1, Some(100)).unwrap();
        s.enqueue("H", "kh", b"h", 2, Some(100)).unwrap();
        let d = s.get("D").unwrap().unwrap();
        let h = s.get("H").unwrap().unwrap();
        s.mark_stopped(d.id, 1, State::Dead, "400 bad", Some(400), 5)
            .unwrap();
        s.mark_stopped(h.id, 1, State::Held, "401", Some(401), 5)
            .unwrap();
        assert!(s.any_held().unwrap());
        assert!(s.claim_due(1_000_000, 2_000_000, 10).unwrap().is_empty());
        assert_eq!(s.retry_all(State::Held, 50).unwrap(), 1);
        assert!(!s.any_held().unwrap());
        let d2 = s.retry("D", 60).unwrap().unwrap();
        assert_eq!(
            (
                d2.state,
                d2.attempts,
                d2.total_attempts,
                d2.cycle_started_at
            ),
            (State::Pending, 0, 1, 60)
        );
        assert_eq!(d2.last_error.as_deref(), Some("400 bad"), "history kept");
        let st = s.stats().unwrap();
        assert_eq!((st.pending, st.dead, st.held, st.depth()), (2, 0, 0, 2));
        assert_eq!(st.oldest_waiting_created_at, Some(1));
    }

    #[test]
    fn release_and_reopen_keep_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), true).unwrap();
            s.enqueue("X", "kx", b"x", 1, Some(1_000)).unwrap();
            s.enqueue("Y", "ky", b"y", 2, Some(50)).unwrap();
            assert_eq!(
                s.release_in_flight(100, true).unwrap(),
                1,
                "only Y's lease expired"
            );
        }
        let mut s = Store::open(dir.path(), false).unwrap();
        assert_eq!(s.get("Y").unwrap().unwrap().state, State::Pending);
        assert_eq!(s.release_in_flight(100, false).unwrap(), 1);
        assert_eq!(s.stats().unwrap().pending, 2);
        assert_eq!(s.list(Some(State::Pending), 10).unwrap().len(), 2);
        assert_eq!(s.list(None, 1).unwrap()[0].sale_id, "Y", "newest first");
        assert_eq!(s.next_due().unwrap(), Some(100));
    }

    #[test]
    fn a_first_version_outbox_gets_the_new_check_in_place_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let pages = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap()
        };
        let v1_pages = {
            let conn = Connection::open(path_in(dir.path())).unwrap();
            create_jobs(&conn).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            for (sale, state) in [("S1", "delivered"), ("S2", "held"), ("S3", "pending")] {
                conn.execute(
                    "INSERT INTO jobs (sale_id, idempotency_key, payload, state, created_at, \
                     cycle_started_at, updated_at, next_attempt_at) VALUES (?1, ?1, x'7b7d', ?2, 1, 1, 1, 1)",
                    params![sale, state],
                )
                .unwrap();
            }
            // the newest id was handed out and its row removed by hand: never reuse it
            conn.execute("DELETE FROM jobs WHERE sale_id = 'S3'", [])
                .unwrap();
            pages(&conn)
        };
        let mut s = Store::open(dir.path(), true).unwrap();
        assert_eq!(pages(&s.conn), v1_pages, "edited in place, nothing copied");
        let sql: String = s
            .conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'jobs'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            sql.contains(STATE_CHECK_V2) && !sql.contains(" IN "),
            "{sql}"
        );
        let check: String = s
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let s2 = s.get("S2").unwrap().unwrap();
        assert_eq!(
            (s2.id, s2.state, &s2.payload[..]),
            (2, State::Held, &b"{}"[..])
        );
        assert_eq!(s.get("S1").unwrap().unwrap().state, State::Delivered);
        s.enqueue("S4", "k4", b"x", 5, None).unwrap();
        assert_eq!(s.get("S4").unwrap().unwrap().id, 4, "id 3 is not reused");
        let bad = s
            .conn
            .execute("UPDATE jobs SET state = 'lost' WHERE id = 2", []);
        assert!(bad.is_err(), "the state check still holds");
        let plan: Vec<String> = s
            .conn
            .prepare("EXPLAIN UPDATE jobs SET state = 'delivered', updated_at = 9 WHERE id = 2")
            .unwrap()
            .query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|op| op == "IdxInsert"), "{plan:?}");
        assert!(
            !plan.iter().any(|op| op == "OpenEphemeral"),
            "no temporary b-tree per write: {plan:?}"
        );
        assert_eq!(s.next_due().unwrap(), Some(5));
    }

    #[test]
    fn only_delivered_jobs_older_than_the_cutoff_are_pruned() {
        let (_d, mut s) = store();
        for (i, sale) in ["D1", "D2", "D3", "P", "H", "X"].iter().enumerate() {
            s.enqueue(sale, sale, b"{}", i as i64 * 10, Some(1_000))
                .unwrap();
        }
        let id = |s: &Store, sale: &str| s.get(sale).unwrap().unwrap().id;
        for (sale, at) in [("D1", 100), ("D2", 200), ("D3", 300)] {
            let job = id(&s, sale);
            assert!(s.mark_delivered(job, Some("i"), Some("n"), at).unwrap());
        }
        let h = id(&s, "H");
        s.mark_stopped(h, 1, State::Held, "401", Some(401), 50)
            .unwrap();
        let x = id(&s, "X");
        s.mark_stopped(x, 1, State::Dead, "400", Some(400), 50)
            .unwrap();
        // everything but D3 is older than 250; only the delivered D1 and D2 go, one per call
        assert_eq!(s.prune_delivered(250, 1).unwrap(), 1);
        assert!(s.get("D1").unwrap().is_none(), "oldest first");
        assert_eq!(s.prune_delivered(250, 10).unwrap(), 1);
        assert_eq!(s.prune_delivered(250, 10).unwrap(), 0);
        for kept in ["D3", "P", "H", "X"] {
            assert!(s.get(kept).unwrap().is_some(), "{kept}");
        }
        // a pruned sale's id is not reused, and the sale can no longer be found
        s.enqueue("N", "kn", b"{}", 400, None).unwrap();
        assert!(id(&s, "N") > id(&s, "X"));
    }

    #[test]
    fn two_processes_opening_an_old_outbox_at_once_both_start() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            {
                let conn = Connection::open(path_in(dir.path())).unwrap();
                conn.pragma_update(None, "journal_mode", "WAL").unwrap();
                create_jobs(&conn).unwrap();
                conn.pragma_update(None, "user_version", 1).unwrap();
            }
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                let opens: Vec<_> = (0..2)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            Store::open(dir.path(), true).map(|_| ())
                        })
                    })
                    .collect();
                for open in opens {
                    open.join().unwrap().unwrap();
                }
            });
            let mut s = Store::open(dir.path(), true).unwrap();
            s.enqueue("A", "ka", b"{}", 1, None).unwrap();
            assert_eq!(s.get("A").unwrap().unwrap().id, 1);
        }
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), true).unwrap();
            s.conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("newer version"), "{err}");
    }
}
