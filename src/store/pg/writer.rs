//! The PostgreSQL engine's writer: every write goes through one thread, which commits
//! whatever is queued as one transaction (group commit).
//!
//! The same design as the SQLite writer ([`crate::store::writer`], whose module doc says
//! why), kept compact rather than shared: its jobs take an SQLite connection, these a
//! PostgreSQL savepoint ([`Tx`]). A batch is one `postgres` [`Transaction`]; each job
//! runs under its own nested one (a savepoint), so a job that fails or panics is rolled
//! back alone and its neighbours still commit. Before the first job, the transaction
//! takes the advisory locks its jobs declared ([`Locks`]), always in the same order;
//! after the last, it sends the notices the successful jobs queued
//! ([`super::notices`]), in one statement.
//!
//! Threads:
//! - `pg-writer` owns the write client (reopening it when the connection was lost),
//!   runs the jobs' SQL and commits. It runs no caller code after a COMMIT: it answers
//!   [`Writer::write`]'s waiting caller over a channel and hands every other job's
//!   completion to
//! - `pg-done`, which runs completions one by one in commit order, only after the
//!   COMMIT returned. A completion may itself write (even wait for a write): it never
//!   runs on the writer thread, so it cannot deadlock it.
//!
//! [`Writer::shutdown`] closes the job queue; the writer commits what is queued and
//! ends, which ends `pg-done` after the last completion; both are joined.
//!
//! A COMMIT of a transaction that an error had aborted reports success and commits
//! nothing, so any failure outside a job's own savepoint (a lock, a savepoint itself)
//! fails the whole batch instead of reaching COMMIT.

use super::{notices, Conn, Db, Tx};
use crate::service::{Worker, SERVICE_STACK};
use crate::store::writer::{WriterStats, QUEUE_CAP};
use crate::store::{Result, StoreError};
use crate::sync::{read, write};
use postgres::{Config, Transaction};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Most jobs in one transaction. Each job that writes gets a subtransaction id, and
/// PostgreSQL tracks at most 64 per session in shared memory: past that, every other
/// session's snapshot checks look them up on disk while the batch runs (subtransaction
/// overflow). 64 jobs per COMMIT still share each WAL flush widely.
const MAX_BATCH: usize = 64;
/// How long a batch of only patient jobs (audit rows) waits for company.
const LINGER: Duration = Duration::from_millis(5);
/// The writer's stack: the client's futures run on it.
const WRITER_STACK: usize = 2 * 1024 * 1024;

thread_local! {
    /// Set on the writer thread, where waiting for a write would wait for ourselves.
    static ON_WRITER: Cell<bool> = const { Cell::new(false) };
    /// Set on the completion thread, where waiting for completions would too.
    static ON_COMPLETIONS: Cell<bool> = const { Cell::new(false) };
}

/// The advisory locks (`pg_advisory_xact_lock`) a job needs held from before its SQL
/// until its batch commits. They are shared by every node on the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::store) struct Locks(u8);

impl Locks {
    /// None.
    pub(in crate::store) const NONE: Locks = Locks(0);
    /// Taken before a room message or DM takes its id: transactions that insert them
    /// commit one at a time, in id order, so ids become visible in order.
    pub(in crate::store) const ORDER: Locks = Locks(1);
    /// Taken before reading the last audit row's hash: one chain, whoever appends.
    pub(in crate::store) const AUDIT: Locks = Locks(2);
    /// Taken by changes whose checks span accounts (the last admin, the first user).
    pub(in crate::store) const ACCOUNTS: Locks = Locks(4);

    /// Each lock's key, in the one order every transaction takes them.
    const KEYS: [(Locks, i64); 3] = [
        (Locks::ORDER, 0x7061_726c_6579_0001),
        (Locks::AUDIT, 0x7061_726c_6579_0002),
        (Locks::ACCOUNTS, 0x7061_726c_6579_0003),
    ];

    /// Both sets.
    pub(in crate::store) const fn and(self, other: Locks) -> Locks {
        Locks(self.0 | other.0)
    }

    /// The keys of these locks, in the order they are taken.
    pub(super) fn keys(self) -> impl Iterator<Item = i64> {
        Self::KEYS
            .into_iter()
            .filter(move |(l, _)| self.0 & l.0 != 0)
            .map(|(_, k)| k)
    }
}

/// A queued job, its result type erased so one queue holds every kind.
trait Task: Send {
    /// Runs the SQL under the job's savepoint; true if it succeeded.
    fn run(&mut self, tx: &mut Tx<'_, '_>) -> bool;
    /// Marks the job failed without (or after) running its SQL.
    fn fail(&mut self, e: StoreError);
    /// Reports the outcome: the job's own error first, else the commit's.
    fn finish(self: Box<Self>, commit: Result<()>);
}

/// A job's SQL, its result until the batch commits, and what gets the outcome.
struct Job<T, W, D> {
    work: Option<W>,
    result: Option<Result<T>>,
    done: D,
}

impl<T, W, D> Task for Job<T, W, D>
where
    T: Send + 'static,
    W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
    D: FnOnce(Result<T>) + Send + 'static,
{
    fn run(&mut self, tx: &mut Tx<'_, '_>) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = work(tx);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn fail(&mut self, e: StoreError) {
        self.work = None;
        self.result = Some(Err(e));
    }

    fn finish(self: Box<Self>, commit: Result<()>) {
        let this = *self;
        let outcome = match (this.result, commit) {
            (Some(Err(e)), _) | (Some(Ok(_)), Err(e)) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            // The batch failed before the job ran.
            (None, Err(e)) if this.work.is_some() => Err(e),
            // It ran and left no result: it panicked.
            (None, _) => Err(StoreError::Panicked),
        };
        (this.done)(outcome);
    }
}

/// A job in the queue.
struct Queued {
    task: Box<dyn Task>,
    locks: Locks,
    /// Nobody waits on it, so its batch may wait [`LINGER`] for more jobs.
    patient: bool,
    /// Its completion only answers a caller blocked in [`Writer::write`]; the writer
    /// thread sends that answer itself.
    waiter: bool,
}

/// Handle to the writer and completion threads.
pub(super) struct Writer {
    tx: RwLock<Option<SyncSender<Queued>>>,
    writer: Worker,
    completions: Worker,
    /// Batch statistics (the same counters as the SQLite writer's).
    pub(super) stats: Arc<WriterStats>,
}

type Finished = Vec<(Box<dyn Task>, Result<()>)>;

impl Writer {
    /// Starts the threads; the writer owns `conn`, and reopens it from `config` when
    /// its connection is lost.
    pub(super) fn start(conn: Conn, config: Config) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAP);
        // Unbounded on purpose: the writer must never wait on a completion (one may
        // itself be waiting on the writer); it holds at most what the writer took.
        let (done_tx, done_rx) = mpsc::channel::<Finished>();
        let stats = Arc::new(WriterStats::default());
        let completions = Worker::spawn("pg-done", SERVICE_STACK, move || {
            ON_COMPLETIONS.with(|c| c.set(true));
            run_completions(&done_rx);
        })?;
        let thread_stats = stats.clone();
        let writer = Worker::spawn("pg-writer", WRITER_STACK, move || {
            ON_WRITER.with(|w| w.set(true));
            run(Some(conn), &config, &rx, &done_tx, &thread_stats);
        })?;
        Ok(Writer {
            tx: RwLock::new(Some(tx)),
            writer,
            completions,
            stats,
        })
    }

    /// Queues `work`, run after `locks` are held; after its batch commits, `done` gets
    /// its result on the completion thread, in commit order.
    pub(super) fn submit<T, W, D>(&self, locks: Locks, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        self.enqueue(job(work, done), locks, false, false);
    }

    /// As [`Writer::submit`], for a write nobody waits on (an audit row): a batch of
    /// only such jobs waits up to [`LINGER`] for more before it commits.
    pub(super) fn submit_patient<T, W, D>(&self, locks: Locks, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        self.enqueue(job(work, done), locks, true, false);
    }

    /// Runs `work` in the next batch and waits until it is committed. On the writer
    /// thread itself (from inside another job), where it could only wait forever, it
    /// fails at once.
    pub(super) fn write<T, W>(&self, locks: Locks, work: W) -> Result<T>
    where
        T: Send + 'static,
        W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
    {
        if ON_WRITER.with(Cell::get) {
            log::error!("a write waited on the writer thread; refused");
            return Err(StoreError::Reentrant);
        }
        let (reply, rx) = mpsc::sync_channel(1);
        let answer = move |r: Result<T>| {
            let _ = reply.try_send(r);
        };
        self.enqueue(job(work, answer), locks, false, true);
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Waits until every write queued so far is committed and its completion has run.
    /// On the writer or completion thread it returns at once.
    pub(super) fn sync(&self) {
        if ON_COMPLETIONS.with(Cell::get) || ON_WRITER.with(Cell::get) {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            Locks::NONE,
            |_| Ok(()),
            move |_: Result<()>| {
                let _ = tx.send(());
            },
        );
        let _ = rx.recv();
    }

    fn enqueue(&self, task: Box<dyn Task>, locks: Locks, patient: bool, waiter: bool) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let queued = Queued {
            task,
            locks,
            patient,
            waiter,
        };
        let refused = match read(&self.tx).as_ref() {
            Some(tx) => tx.send(queued).err().map(|e| e.0),
            None => Some(queued),
        };
        if let Some(mut q) = refused {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            q.task.fail(StoreError::Closed);
            q.task.finish(Err(StoreError::Closed));
        }
    }

    /// Stops taking jobs, lets the queued ones commit and complete, and joins both
    /// threads.
    pub(super) fn shutdown(&self) {
        write(&self.tx).take();
        self.writer.join();
        self.completions.join();
    }
}

fn job<T, W, D>(work: W, done: D) -> Box<dyn Task>
where
    T: Send + 'static,
    W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
    D: FnOnce(Result<T>) + Send + 'static,
{
    Box::new(Job {
        work: Some(work),
        result: None,
        done,
    })
}

fn run(
    mut conn: Option<Conn>,
    config: &Config,
    rx: &Receiver<Queued>,
    done: &Sender<Finished>,
    stats: &WriterStats,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = gather(first, rx);
        let n = batch.len() as u64;
        let commit = commit_batch(&mut conn, config, &mut batch);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(n, Ordering::Relaxed);
        stats.queued.fetch_sub(n, Ordering::Relaxed);
        stats.max_batch.fetch_max(n, Ordering::Relaxed);
        let mut later = Vec::with_capacity(batch.len());
        for q in batch {
            if q.waiter {
                q.task.finish(commit.clone());
            } else {
                later.push((q.task, commit.clone()));
            }
        }
        if !later.is_empty() {
            let _ = done.send(later);
        }
    }
    log::debug!("pg writer stopped");
}

/// The batch that starts with `first`: whatever else is queued, and, while every job
/// in it is patient, what arrives within [`LINGER`].
fn gather(first: Queued, rx: &Receiver<Queued>) -> Vec<Queued> {
    let mut patient = first.patient;
    let mut batch = vec![first];
    let deadline = Instant::now() + LINGER;
    while batch.len() < MAX_BATCH {
        let next = match rx.try_recv() {
            Ok(q) => Some(q),
            Err(_) if patient => rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok(),
            Err(_) => None,
        };
        let Some(q) = next else { break };
        patient &= q.patient;
        batch.push(q);
    }
    batch
}

fn run_completions(rx: &Receiver<Finished>) {
    while let Ok(batch) = rx.recv() {
        for (task, commit) in batch {
            if catch_unwind(AssertUnwindSafe(|| task.finish(commit))).is_err() {
                log::error!("a write completion panicked");
            }
        }
    }
}

/// Runs the batch in one transaction on the write client and commits it. The client
/// is opened first if the last one was lost; one whose connection turns out dead at
/// BEGIN (the server restarted while it was idle) is replaced once, since nothing of
/// the batch ran yet.
fn commit_batch(slot: &mut Option<Conn>, config: &Config, batch: &mut [Queued]) -> Result<()> {
    let mut retried = false;
    loop {
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = None;
            match Conn::connect(config) {
                Ok(c) => *slot = Some(c),
                Err(e) => {
                    log::error!("the database writer cannot reconnect: {e}");
                    return Err(e);
                }
            }
        }
        let Some(Conn { client, stmts }) = slot.as_mut() else {
            return Err(StoreError::Closed);
        };
        let begin_failed = match client.transaction() {
            Ok(tx) => {
                let mut any_failed = false;
                let result = run_batch(tx, stmts, batch, &mut any_failed);
                if let Err(e) = &result {
                    log::error!("a write transaction failed: {e}");
                }
                if any_failed || result.is_err() {
                    // A statement may have failed because its prepared form went stale
                    // (a table altered by hand): prepare afresh.
                    stmts.clear();
                }
                return result;
            }
            Err(e) => e,
        };
        if !retried && client.is_closed() {
            retried = true;
            continue;
        }
        let e = StoreError::from(begin_failed);
        log::error!("could not begin a write transaction: {e}");
        return Err(e);
    }
}

/// Takes the batch's advisory locks, runs its jobs and commits.
fn run_batch(
    mut tx: Transaction<'_>,
    stmts: &mut super::Statements,
    batch: &mut [Queued],
    any_failed: &mut bool,
) -> Result<()> {
    let locks = batch.iter().fold(Locks::NONE, |all, q| all.and(q.locks));
    for key in locks.keys() {
        Db::new(&mut tx, stmts).execute("SELECT pg_advisory_xact_lock($1)", &[&key])?;
    }
    let mut outbox = Vec::new();
    for q in batch.iter_mut() {
        *any_failed |= run_one(&mut tx, stmts, q.task.as_mut(), &mut outbox)?;
    }
    if !outbox.is_empty() {
        notices::send(&mut Db::new(&mut tx, stmts), &outbox)?;
    }
    Ok(tx.commit()?)
}

/// Runs one job under its own savepoint: released if it succeeded (its notices then
/// join `outbox`), rolled back if it failed or panicked. Returns whether a statement
/// failed; an error means the batch's transaction itself is broken and must not reach
/// COMMIT.
fn run_one(
    tx: &mut Transaction<'_>,
    stmts: &mut super::Statements,
    task: &mut dyn Task,
    outbox: &mut Vec<String>,
) -> Result<bool> {
    let mut sp = match tx.transaction() {
        Ok(sp) => sp,
        Err(e) => {
            let e = StoreError::from(e);
            task.fail(e.clone());
            return Err(e);
        }
    };
    let (ok, failed, notices) = match catch_unwind(AssertUnwindSafe(|| {
        let mut db = Db::new(&mut sp, &mut *stmts);
        let ok = task.run(&mut db);
        (ok, db.failed(), std::mem::take(&mut db.outbox))
    })) {
        Ok(r) => r,
        Err(_) => {
            log::error!("a database job panicked; its writes are rolled back");
            (false, true, Vec::new())
        }
    };
    let end = if ok { sp.commit() } else { sp.rollback() };
    if let Err(e) = end {
        let e = StoreError::from(e);
        task.fail(e.clone());
        return Err(e);
    }
    if ok {
        outbox.extend(notices);
    }
    Ok(failed)
}
