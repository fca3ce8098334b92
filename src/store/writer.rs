//! The single writer thread: every write goes through it, and it commits whatever is
//! queued as one transaction (group commit).
//!
//! With `synchronous=FULL` each commit costs an fsync; one fsync per batch instead of
//! per message is what makes durable acks affordable (see NOTES.md: 1.4k/s one by one,
//! tens of thousands per second batched). Each job runs inside its own SAVEPOINT so a
//! failing job does not undo its neighbours, and its completion runs only after the
//! batch is on disk — that is where acks and broadcasts happen, in commit order.

use super::StoreError;
use rusqlite::Connection;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

/// Runs after the batch's COMMIT with its outcome.
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Does a job's SQL (or, given `None`, reports that it could not run).
type Job = Box<dyn FnOnce(Option<&Connection>) -> Completion + Send>;

/// Most jobs in one transaction; bounds the latency of the first job in a batch.
const MAX_BATCH: usize = 1024;

/// Counters the writer keeps for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Jobs run.
    pub jobs: AtomicU64,
    /// Largest batch seen.
    pub max_batch: AtomicU64,
}

/// Handle to the writer thread.
pub struct Writer {
    tx: RwLock<Option<Sender<Job>>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    /// Batch statistics.
    pub stats: Arc<WriterStats>,
}

impl Writer {
    /// Starts the thread that owns `conn` for writing.
    pub fn start(conn: Connection) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || run(conn, rx, &thread_stats))?;
        Ok(Writer {
            tx: RwLock::new(Some(tx)),
            handle: Mutex::new(Some(handle)),
            stats,
        })
    }

    /// Queues `work`; after its batch commits, `done` gets its result on the writer
    /// thread. `done` must be quick: it delays the next batch.
    pub fn submit<T, W, D>(&self, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => in_savepoint(conn, work),
                None => Err(StoreError::Closed),
            };
            Box::new(
                move |commit: Result<(), StoreError>| match (result, commit) {
                    (Ok(v), Ok(())) => done(Ok(v)),
                    (Ok(_), Err(e)) | (Err(e), _) => done(Err(e)),
                },
            )
        });
        let sent = match self.tx.read() {
            Ok(guard) => match guard.as_ref() {
                Some(tx) => tx.send(job).map_err(|e| e.0),
                None => Err(job),
            },
            Err(_) => Err(job),
        };
        if let Err(job) = sent {
            job(None)(Err(StoreError::Closed));
        }
    }

    /// Runs `work` in the next batch and waits until it is committed.
    pub fn write<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(work, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Stops taking jobs, lets the queued ones commit, and joins the thread.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.write() {
            tx.take();
        }
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn run(conn: Connection, rx: Receiver<Job>, stats: &WriterStats) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit_batch(&conn, batch, stats);
    }
    log::debug!("db writer stopped");
}

fn commit_batch(conn: &Connection, batch: Vec<Job>, stats: &WriterStats) {
    let n = batch.len() as u64;
    let began = conn
        .execute_batch("BEGIN IMMEDIATE")
        .map_err(StoreError::from);
    let completions: Vec<Completion> = batch
        .into_iter()
        .map(|job| {
            let conn = began.is_ok().then_some(conn);
            catch_unwind(AssertUnwindSafe(|| job(conn))).unwrap_or_else(|_| {
                log::error!("a database job panicked");
                Box::new(|_| {})
            })
        })
        .collect();
    let outcome = match began {
        Ok(()) => conn.execute_batch("COMMIT").map_err(|e| {
            log::error!("commit failed: {e}");
            let _ = conn.execute_batch("ROLLBACK");
            StoreError::from(e)
        }),
        Err(e) => {
            log::error!("could not begin a write transaction: {e}");
            Err(e)
        }
    };
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.jobs.fetch_add(n, Ordering::Relaxed);
    stats.max_batch.fetch_max(n, Ordering::Relaxed);
    for done in completions {
        let outcome = outcome.clone();
        if catch_unwind(AssertUnwindSafe(|| done(outcome))).is_err() {
            log::error!("a write completion panicked");
        }
    }
}

/// Runs `work` so that its failure rolls back only its own changes.
fn in_savepoint<T>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("SAVEPOINT job")?;
    let result = work(conn);
    let end = if result.is_ok() {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    conn.execute_batch(end)?;
    result
}
