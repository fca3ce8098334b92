//! The single writer thread: every write goes through it, and it commits whatever is
//! queued as one transaction (group commit).
//!
//! With `synchronous=FULL` each commit costs an fsync; one fsync per batch instead of
//! per message is what makes durable acks affordable (1.4k/s one by one, tens of
//! thousands per second batched). The batch is a rusqlite [`Transaction`] and each job
//! runs under its own [`rusqlite::Savepoint`]: a job that fails or panics is rolled
//! back alone and its neighbours still commit.
//!
//! Threads:
//! - `db-writer` runs the jobs' SQL and commits. It runs no caller code after a
//!   commit: it only answers [`Writer::write`]'s waiting caller over a channel and
//!   hands every other job's completion to
//! - `db-done`, which runs completions one by one in commit order. That is where acks
//!   and broadcasts happen. A completion may itself write (with `submit`, or even
//!   `write`, which blocks only this thread while the writer goes on), so no
//!   completion can deadlock the writer: it never runs there.
//!
//! [`Writer::shutdown`] closes the job queue; the writer commits what is queued and
//! ends, which ends `db-done` after the last completion; both are joined.

use super::StoreError;
use crate::service::{Worker, SERVICE_STACK};
use crate::sync::{read, write};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, RwLock};

/// Most jobs in one transaction; bounds the latency of the first job in a batch.
const MAX_BATCH: usize = 1024;
/// How long a batch of only [`Writer::submit_patient`] jobs waits for company before
/// it commits. Each commit costs an fsync (in a VM, a costly exit to the host too); a
/// reconnect storm queues an audit row per socket a few at a time, and committing each
/// trickle on its own was ~600 fsyncs a second, about 7 % of the server's CPU.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);
/// Most jobs waiting for the writer. Past it, whoever submits waits: the writer never
/// waits on a submitter, so this only slows producers down (sockets already hold
/// theirs to a few each, see `ws::MAX_PENDING`).
pub const QUEUE_CAP: usize = 16_384;

thread_local! {
    /// Set on the writer thread, where waiting for a write would wait for ourselves.
    static ON_WRITER: Cell<bool> = const { Cell::new(false) };
    /// Set on the completion thread, where waiting for completions would too.
    static ON_COMPLETIONS: Cell<bool> = const { Cell::new(false) };
}

/// A queued write, with its result type erased so one queue holds every kind.
trait Task: Send {
    /// Runs the SQL on the batch's connection; true if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Marks the task failed before or after its SQL ran (savepoint errors).
    fn fail(&mut self, e: StoreError);
    /// Whether its completion is only a channel send to a waiting caller, which the
    /// writer thread does itself.
    fn answers_waiter(&self) -> bool;
    /// Whether nobody waits on it, so its batch may wait [`LINGER`] for more jobs.
    fn patient(&self) -> bool {
        false
    }
    /// Reports the outcome: the job's own error first, else the commit's.
    fn finish(self: Box<Self>, commit: Result<(), StoreError>);
}

/// A job's SQL and its result until the batch commits.
struct Job<T, W> {
    work: Option<W>,
    result: Option<Result<T, StoreError>>,
}

impl<T, W: FnOnce(&Connection) -> Result<T, StoreError>> Job<T, W> {
    fn new(work: W) -> Self {
        Job {
            work: Some(work),
            result: None,
        }
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = work(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    /// The final outcome. No result means the SQL never finished: it panicked.
    fn outcome(self, commit: Result<(), StoreError>) -> Result<T, StoreError> {
        match (self.result, commit) {
            (Some(Err(e)), _) | (Some(Ok(_)), Err(e)) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Err(e)) if self.work.is_some() => Err(e),
            (None, _) => Err(StoreError::Panicked),
        }
    }
}

/// A job submitted with a completion, run on the completion thread.
struct Submitted<T, W, D> {
    job: Job<T, W>,
    done: D,
    patient: bool,
}

impl<T, W, D> Submitted<T, W, D>
where
    T: Send + 'static,
    W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    D: FnOnce(Result<T, StoreError>) + Send + 'static,
{
    fn boxed(work: W, done: D, patient: bool) -> Boxed {
        Box::new(Submitted {
            job: Job::new(work),
            done,
            patient,
        })
    }
}

/// A job whose caller waits for it ([`Writer::write`]).
struct Waited<T, W> {
    job: Job<T, W>,
    reply: SyncSender<Result<T, StoreError>>,
}

impl<T, W, D> Task for Submitted<T, W, D>
where
    T: Send + 'static,
    W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    D: FnOnce(Result<T, StoreError>) + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        self.job.run(conn)
    }
    fn fail(&mut self, e: StoreError) {
        self.job.work = None;
        self.job.result = Some(Err(e));
    }
    fn answers_waiter(&self) -> bool {
        false
    }
    fn patient(&self) -> bool {
        self.patient
    }
    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        let this = *self;
        (this.done)(this.job.outcome(commit));
    }
}

impl<T, W> Task for Waited<T, W>
where
    T: Send + 'static,
    W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> bool {
        self.job.run(conn)
    }
    fn fail(&mut self, e: StoreError) {
        self.job.work = None;
        self.job.result = Some(Err(e));
    }
    fn answers_waiter(&self) -> bool {
        true
    }
    fn finish(self: Box<Self>, commit: Result<(), StoreError>) {
        // The caller may have given up (it never does today); nothing to do then.
        let _ = self.reply.try_send(self.job.outcome(commit));
    }
}

type Boxed = Box<dyn Task>;
/// Runs on the writer thread before each batch (the store measures its room there).
pub type BeforeBatch = Box<dyn FnMut(&Connection) + Send>;
type Finished = Vec<(Boxed, Result<(), StoreError>)>;

/// Counters the writer keeps for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Jobs run.
    pub jobs: AtomicU64,
    /// Largest batch seen.
    pub max_batch: AtomicU64,
    /// Jobs submitted and not yet committed.
    pub queued: AtomicU64,
}

/// Handle to the writer and completion threads.
pub struct Writer {
    tx: RwLock<Option<SyncSender<Boxed>>>,
    writer: Worker,
    completions: Worker,
    /// Batch statistics.
    pub stats: Arc<WriterStats>,
}

impl Writer {
    /// Starts the threads; the writer owns `conn`.
    pub fn start(conn: Connection, before_batch: BeforeBatch) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAP);
        // Unbounded on purpose: the writer must never wait on a completion (one may
        // itself be waiting on the writer); it holds at most what the writer took.
        let (done_tx, done_rx) = mpsc::channel::<Finished>();
        let stats = Arc::new(WriterStats::default());
        let completions = Worker::spawn("db-done", SERVICE_STACK, move || {
            ON_COMPLETIONS.with(|c| c.set(true));
            run_completions(&done_rx)
        })?;
        let thread_stats = stats.clone();
        let writer = Worker::spawn("db-writer", 1024 * 1024, move || {
            ON_WRITER.with(|w| w.set(true));
            run(conn, &rx, &done_tx, &thread_stats, before_batch)
        })?;
        Ok(Writer {
            tx: RwLock::new(Some(tx)),
            writer,
            completions,
            stats,
        })
    }

    /// Queues `work`; after its batch commits, `done` gets its result on the
    /// completion thread, in commit order.
    pub fn submit<T, W, D>(&self, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        self.enqueue(Submitted::boxed(work, done, false));
    }

    /// As [`Writer::submit`], for a write nobody waits on (an audit row): a batch of
    /// only such jobs waits up to [`LINGER`] for more before it commits, and any
    /// other job ends the wait at once.
    pub fn submit_patient<T, W, D>(&self, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        self.enqueue(Submitted::boxed(work, done, true));
    }

    /// Runs `work` in the next batch and waits until it is committed. Called on the
    /// writer thread itself (from inside another job's SQL), where it could only wait
    /// forever, it fails at once instead.
    pub fn write<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        if ON_WRITER.with(Cell::get) {
            log::error!("a write waited on the writer thread; refused");
            return Err(StoreError::Reentrant);
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.enqueue(Box::new(Waited {
            job: Job::new(work),
            reply,
        }));
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Waits until every write queued so far is committed and its completion has run.
    /// On the completion thread (a completion calling it) it returns at once: the
    /// completions before it have run, the later ones cannot be waited for there.
    pub fn sync(&self) {
        if ON_COMPLETIONS.with(Cell::get) || ON_WRITER.with(Cell::get) {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            |_| Ok(()),
            move |_: Result<(), StoreError>| {
                let _ = tx.send(());
            },
        );
        let _ = rx.recv();
    }

    fn enqueue(&self, task: Boxed) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let refused = match read(&self.tx).as_ref() {
            Some(tx) => tx.send(task).err().map(|e| e.0),
            None => Some(task),
        };
        if refused.is_some() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(mut task) = refused {
            task.fail(StoreError::Closed);
            task.finish(Err(StoreError::Closed));
        }
    }

    /// Stops taking jobs, lets the queued ones commit and complete, and joins both
    /// threads.
    pub fn shutdown(&self) {
        write(&self.tx).take();
        self.writer.join();
        self.completions.join();
    }
}

fn run(
    conn: Connection,
    rx: &Receiver<Boxed>,
    done: &Sender<Finished>,
    stats: &WriterStats,
    mut before_batch: BeforeBatch,
) {
    let mut conn = conn;
    while let Ok(first) = rx.recv() {
        before_batch(&conn);
        let mut batch = gather(first, rx);
        let n = batch.len() as u64;
        let commit = commit_batch(&mut conn, &mut batch);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(n, Ordering::Relaxed);
        stats.queued.fetch_sub(n, Ordering::Relaxed);
        stats.max_batch.fetch_max(n, Ordering::Relaxed);
        let mut later = Vec::with_capacity(batch.len());
        for task in batch {
            if task.answers_waiter() {
                task.finish(commit.clone());
            } else {
                later.push((task, commit.clone()));
            }
        }
        if !later.is_empty() {
            let _ = done.send(later);
        }
    }
    log::debug!("db writer stopped");
}

/// The batch that starts with `first`: whatever else is queued, and, while every job
/// in it is patient, what arrives within [`LINGER`].
fn gather(first: Boxed, rx: &Receiver<Boxed>) -> Vec<Boxed> {
    let mut batch = vec![first];
    let mut patient = batch.iter().all(|t| t.patient());
    let deadline = std::time::Instant::now() + LINGER;
    while batch.len() < MAX_BATCH {
        let next = match rx.try_recv() {
            Ok(job) => Ok(job),
            Err(_) if patient => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                rx.recv_timeout(left).map_err(|_| ())
            }
            Err(_) => Err(()),
        };
        let Ok(job) = next else { break };
        patient &= job.patient();
        batch.push(job);
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

/// Runs every job of the batch in one transaction and commits it.
fn commit_batch(conn: &mut Connection, batch: &mut [Boxed]) -> Result<(), StoreError> {
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let e = StoreError::from(e);
            log::error!("could not begin a write transaction: {e}");
            return Err(e);
        }
    };
    for task in batch.iter_mut() {
        run_one(&mut tx, task.as_mut());
    }
    tx.commit().map_err(|e| {
        let e = StoreError::from(e);
        log::error!("commit failed: {e}");
        e
    })
}

/// Runs one job under its own savepoint: released if it succeeded, rolled back if it
/// failed or panicked.
fn run_one(tx: &mut Transaction<'_>, task: &mut dyn Task) {
    let sp = match tx.savepoint() {
        Ok(sp) => sp,
        Err(e) => return task.fail(e.into()),
    };
    let ok = catch_unwind(AssertUnwindSafe(|| task.run(&sp))).unwrap_or_else(|_| {
        log::error!("a database job panicked; its writes are rolled back");
        false
    });
    if ok {
        if let Err(e) = sp.commit() {
            task.fail(e.into());
        }
    }
    // Dropping an uncommitted savepoint rolls it back and releases it.
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn writer() -> (Writer, std::path::PathBuf) {
        let dir = crate::store::tests::tempdir();
        let path = dir.join("w.db");
        let conn = Connection::open(&path).unwrap();
        conn.busy_timeout(Duration::ZERO).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x INTEGER PRIMARY KEY)")
            .unwrap();
        (Writer::start(conn, Box::new(|_| {})).unwrap(), path)
    }

    fn rows(path: &std::path::Path) -> Vec<i64> {
        let c = Connection::open(path).unwrap();
        let mut st = c.prepare("SELECT x FROM t ORDER BY x").unwrap();
        let v = st.query_map([], |r| r.get(0)).unwrap();
        v.map(Result::unwrap).collect()
    }

    fn insert(x: i64) -> impl FnOnce(&Connection) -> Result<(), StoreError> + Send {
        move |c| {
            c.execute("INSERT INTO t(x) VALUES (?1)", [x])?;
            Ok(())
        }
    }

    /// Patient jobs trickling in share a commit; a job someone waits on ends the wait.
    #[test]
    fn patient_jobs_linger_for_company_and_others_do_not_wait() {
        let path = crate::store::tests::tempdir().join("w.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; CREATE TABLE t(x INTEGER PRIMARY KEY)",
        )
        .unwrap();
        let w = Writer::start(conn, Box::new(|_| {})).unwrap();
        // A busy machine can oversleep the 0.2 ms gaps past the linger, so a trickle
        // whose five jobs did not all arrive within half a linger is tried again.
        let mut tries = Vec::new();
        let mut next = 0;
        while tries.len() < 10 {
            let before = w.stats.batches.load(Ordering::Relaxed);
            let began = std::time::Instant::now();
            for _ in 0..5 {
                w.submit_patient(insert(next), |_: Result<(), StoreError>| {});
                next += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            let spread = began.elapsed();
            w.sync();
            let batches = w.stats.batches.load(Ordering::Relaxed) - before;
            tries.push((spread, batches));
            if spread < LINGER / 2 {
                break;
            }
        }
        let Some(&(_, batches)) = tries.last().filter(|(spread, _)| *spread < LINGER / 2) else {
            panic!("no trickle of 5 jobs arrived within half a linger: {tries:?}");
        };
        assert!(
            batches <= 2,
            "5 patient jobs 0.2 ms apart took {batches} commits"
        );
        assert_eq!(rows(&path), (0..next).collect::<Vec<i64>>());

        // A waited write behind a patient one does not wait out the linger. Had it
        // waited, every one of the twenty would take a whole linger; the fastest is
        // compared, so a busy machine slowing a few of them cannot fail the test
        // (no fsync here, so commits are cheap).
        let mut fastest = Duration::MAX;
        for x in 1000..1020 {
            w.submit_patient(insert(x), |_: Result<(), StoreError>| {});
            let started = std::time::Instant::now();
            w.write(insert(x + 100)).unwrap();
            fastest = fastest.min(started.elapsed());
        }
        assert!(
            fastest < LINGER / 2,
            "the fastest of 20 waited writes took {fastest:?}"
        );
        assert_eq!(rows(&path).len(), next as usize + 40);
        w.shutdown();
    }

    /// ok, failing, panicking and ok jobs in one batch: the two good ones commit, the
    /// other two leave nothing behind, and each completion hears its own outcome.
    #[test]
    fn a_failing_or_panicking_job_rolls_back_alone() {
        let (w, path) = writer();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (inside_tx, inside_rx) = mpsc::channel::<()>();
        // Hold the writer inside a job so the next four queue up as one batch.
        w.submit(
            move |_| {
                inside_tx.send(()).unwrap();
                let _ = gate_rx.recv_timeout(Duration::from_secs(5));
                Ok(())
            },
            |_: Result<(), StoreError>| {},
        );
        inside_rx.recv().unwrap();
        let (tx, rx) = mpsc::channel();
        let report = |name: &'static str| {
            let tx = tx.clone();
            move |r: Result<(), StoreError>| tx.send((name, r)).unwrap()
        };
        w.submit(insert(1), report("ok1"));
        w.submit(
            |c| {
                c.execute("INSERT INTO t(x) VALUES (2)", [])?;
                Err(StoreError::Conflict("refused".into()))
            },
            report("failing"),
        );
        w.submit(
            |c: &Connection| -> Result<(), StoreError> {
                c.execute("INSERT INTO t(x) VALUES (3)", []).unwrap();
                panic!("a bug in a job")
            },
            report("panicking"),
        );
        w.submit(insert(4), report("ok2"));
        gate_tx.send(()).unwrap();
        let mut got: Vec<_> = (0..4).map(|_| rx.recv().unwrap()).collect();
        got.sort_by_key(|(n, _)| *n);
        assert_eq!(
            got,
            vec![
                ("failing", Err(StoreError::Conflict("refused".into()))),
                ("ok1", Ok(())),
                ("ok2", Ok(())),
                ("panicking", Err(StoreError::Panicked)),
            ]
        );
        assert_eq!(w.stats.max_batch.load(Ordering::Relaxed), 4, "one batch");
        assert_eq!(rows(&path), vec![1, 4]);
        w.shutdown();
    }

    /// A completion that writes (and waits) must not deadlock the writer.
    #[test]
    fn a_completion_may_write_and_wait() {
        let (w, path) = writer();
        let w = Arc::new(w);
        let (tx, rx) = mpsc::channel();
        let w2 = w.clone();
        w.submit(insert(1), move |r| {
            r.unwrap();
            let again = w2.write(insert(2));
            tx.send(again).unwrap();
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the completion's write finished");
        assert_eq!(r, Ok(()));
        assert_eq!(rows(&path), vec![1, 2]);
        w.shutdown();
    }

    /// A job's SQL that waits for another write is refused rather than hanging.
    #[test]
    fn waiting_on_the_writer_thread_is_refused() {
        let (w, _path) = writer();
        let w = Arc::new(w);
        let w2 = w.clone();
        let r = w.write(move |_| Ok(w2.write(insert(1))));
        assert_eq!(r, Ok(Err(StoreError::Reentrant)));
        w.shutdown();
    }

    /// A write that cannot get the database lock fails with its own error.
    #[test]
    fn a_locked_database_is_busy_not_closed() {
        let (w, path) = writer();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        // The writer's connection has no busy timeout here: it fails at once.
        assert_eq!(w.write(insert(1)), Err(StoreError::Busy));
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(w.write(insert(1)), Ok(()));
        w.shutdown();
        assert_eq!(w.write(insert(2)), Err(StoreError::Closed));
    }
}
