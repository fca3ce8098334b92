//! IO threads: where parley reads request bodies and writes answers that could make a
//! thread wait on a client, so that the HTTP workers never do.
//!
//! A bounded, elastic pool. A job gets a thread at once — an idle one, or a new one
//! (`http-io`) — unless `Config::http_io_threads` jobs are running (it is refused) or
//! its client address already runs `Config::http_per_address` of them (so one
//! address, however many connections it opens, cannot take them all). Then it waits
//! in that address's backlog, on no thread, and runs when one of the address's jobs
//! ends: a browser's burst of connections, or an office behind one NAT address, is
//! served a few at a time rather than refused. Backlogs are bounded
//! ([`BACKLOG_PER_ADDRESS`], [`BACKLOG_TOTAL`]); past them the job is refused. A
//! thread idle for a few seconds ends. Every job runs under a deadline that the reaper enforces
//! by shutting the connection down (see [`crate::exchange`]), so no thread waits on a
//! client for long.
//!
//! Created and stopped by [`crate::server`]; stopping lets the running jobs finish
//! (for a bounded time) and refuses new ones.

use crate::sync::{lock, wait_timeout};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an idle IO thread waits for another job before it ends.
const LINGER: Duration = Duration::from_secs(5);
/// Jobs one address may have waiting for its share of threads.
pub const BACKLOG_PER_ADDRESS: usize = 256;
/// Jobs all addresses together may have waiting.
pub const BACKLOG_TOTAL: usize = 4096;

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static IO_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is an IO thread (whose jobs may wait on a client).
pub fn on_io_thread() -> bool {
    IO_THREAD.with(Cell::get)
}

/// The pool.
pub struct Lane {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Jobs queued, or the pool stopping.
    work: Condvar,
    /// A thread ended.
    ended: Condvar,
    max: usize,
    per_address: usize,
    stack: usize,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<(IpAddr, Job)>,
    /// Jobs reserved, queued or running, in total and per address.
    taken: usize,
    by_address: HashMap<IpAddr, usize>,
    /// Jobs (or reserved places for them) waiting for their address's share, per
    /// address, and how many in all.
    backlog: HashMap<IpAddr, VecDeque<Option<Job>>>,
    backlogged: usize,
    threads: usize,
    idle: usize,
    stopped: bool,
}

impl State {
    /// A job of `ip` ended: its place passes to the address's next waiting job (queued
    /// to run), or is given back.
    fn finish(&mut self, ip: IpAddr) {
        // The first waiting job that has arrived (a place reserved a moment ago may
        // still be empty).
        let next = self.backlog.get_mut(&ip).and_then(|q| {
            let i = q.iter().position(Option::is_some)?;
            q.remove(i).flatten()
        });
        if let Some(job) = next {
            self.backlogged -= 1;
            if self.backlog.get(&ip).is_some_and(VecDeque::is_empty) {
                self.backlog.remove(&ip);
            }
            self.jobs.push_back((ip, job));
        } else {
            self.release(ip);
        }
    }

    /// Drops one reserved backlog place of `ip` that never got its job.
    fn unqueue(&mut self, ip: IpAddr) {
        if let Some(q) = self.backlog.get_mut(&ip) {
            if let Some(i) = q.iter().position(Option::is_none) {
                q.remove(i);
                self.backlogged -= 1;
            }
            if q.is_empty() {
                self.backlog.remove(&ip);
            }
        }
    }

    fn release(&mut self, ip: IpAddr) {
        self.taken = self.taken.saturating_sub(1);
        if let Some(n) = self.by_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&ip);
            }
        }
    }
}

/// A place in the pool for one job of `ip`, taken by [`Lane::reserve`]; given back
/// when dropped unused.
pub struct Permit {
    ip: IpAddr,
    /// A place in the address's backlog rather than a running place.
    queued: bool,
    shared: Option<Arc<Shared>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            let mut st = lock(&s.state);
            match self.queued {
                true => st.unqueue(self.ip),
                false => st.release(self.ip),
            }
        }
    }
}

impl Lane {
    /// A pool of at most `max` threads, `per_address` of them for one client address,
    /// each with a stack of `stack` bytes. No thread starts before the first job.
    pub fn new(max: usize, per_address: usize, stack: usize) -> Lane {
        Lane {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                ended: Condvar::new(),
                max: max.max(1),
                per_address: per_address.max(1),
                stack,
            }),
        }
    }

    /// A place for a job of `ip` — running, or in the address's backlog — or None if
    /// the pool is full or stopped, or the backlogs are.
    pub fn reserve(&self, ip: IpAddr) -> Option<Permit> {
        let mut st = lock(&self.shared.state);
        let mine = st.by_address.get(&ip).copied().unwrap_or(0);
        if st.stopped {
            return None;
        }
        let permit = |queued| Permit {
            ip,
            queued,
            shared: Some(self.shared.clone()),
        };
        if mine >= self.shared.per_address {
            let waiting = st.backlog.get(&ip).map_or(0, VecDeque::len);
            if waiting >= BACKLOG_PER_ADDRESS || st.backlogged >= BACKLOG_TOTAL {
                return None;
            }
            st.backlog.entry(ip).or_default().push_back(None);
            st.backlogged += 1;
            return Some(permit(true));
        }
        if st.taken >= self.shared.max {
            return None;
        }
        st.taken += 1;
        *st.by_address.entry(ip).or_insert(0) += 1;
        Some(permit(false))
    }

    /// Runs `job` on an IO thread; its place is given back when it ends.
    pub fn run(&self, mut permit: Permit, job: impl FnOnce() + Send + 'static) {
        permit.shared = None;
        let ip = permit.ip;
        let mut st = lock(&self.shared.state);
        let job: Job = Box::new(job);
        let job = match permit.queued {
            true => self.fill_place(&mut st, ip, job),
            false => Some(job),
        };
        if let Some(job) = job {
            self.start(st, ip, job);
        }
    }

    /// Queues a job that holds a running place, and gives it a thread.
    fn start(&self, mut st: std::sync::MutexGuard<'_, State>, ip: IpAddr, job: Job) {
        st.jobs.push_back((ip, job));
        // Each queued job needs a thread of its own: an idle one not yet claimed by an
        // earlier job, or a new one (never more than `max`: every job holds a place).
        if st.jobs.len() <= st.idle {
            drop(st);
            self.shared.work.notify_one();
            return;
        }
        st.threads += 1;
        drop(st);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("http-io".into())
            .stack_size(self.shared.stack)
            .spawn(move || shared.serve());
        if let Err(e) = spawned {
            log::error!("could not start an IO thread: {e}");
            let mut st = lock(&self.shared.state);
            st.threads -= 1;
            if st.threads == 0 {
                // Nobody would ever run it: run it here rather than lose it.
                let (ip, job) = st.jobs.pop_back().unwrap_or((ip, Box::new(|| {})));
                drop(st);
                run_job(job);
                lock(&self.shared.state).finish(ip);
            }
        }
    }

    /// Puts a backlogged job in a place reserved for it. If the address's jobs ended
    /// meanwhile and gave their places back, it is queued to run at once instead (it
    /// may then briefly exceed the pool's total: by at most the address's share).
    /// Returns the job if it is to start now.
    fn fill_place(&self, st: &mut State, ip: IpAddr, job: Job) -> Option<Job> {
        let running = st.by_address.get(&ip).copied().unwrap_or(0);
        let slot = st
            .backlog
            .get_mut(&ip)
            .and_then(|q| q.iter_mut().find(|j| j.is_none()));
        match slot {
            Some(slot) if running >= self.shared.per_address => {
                *slot = Some(job);
                None
            }
            // Room again (or, unreachable while the permit's place exists, no place
            // to wait in): it runs now, holding a running place.
            _ => {
                st.unqueue(ip);
                st.taken += 1;
                *st.by_address.entry(ip).or_insert(0) += 1;
                Some(job)
            }
        }
    }

    /// Refuses new jobs, lets the queued and running ones finish, and waits up to
    /// `within` for the threads to end (one stuck on a client is cut by its deadline).
    pub fn stop(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut st = lock(&self.shared.state);
        st.stopped = true;
        self.shared.work.notify_all();
        while st.threads > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("{} IO threads still busy at shutdown", st.threads);
                return;
            }
            st = wait_timeout(&self.shared.ended, st, left);
        }
    }

    /// Jobs running or queued, and threads alive (for tests).
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let st = lock(&self.shared.state);
        (st.taken, st.threads)
    }
}

fn run_job(job: Job) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
        log::error!("an IO job panicked");
    }
}

impl Shared {
    /// An IO thread's life: jobs until none comes for `LINGER` or the pool stops.
    fn serve(&self) {
        IO_THREAD.with(|f| f.set(true));
        let mut st = lock(&self.state);
        loop {
            if let Some((ip, job)) = st.jobs.pop_front() {
                drop(st);
                run_job(job);
                st = lock(&self.state);
                st.finish(ip);
                continue;
            }
            if st.stopped {
                break;
            }
            let since = Instant::now();
            st.idle += 1;
            while st.jobs.is_empty() && !st.stopped && since.elapsed() < LINGER {
                let left = LINGER.saturating_sub(since.elapsed());
                st = wait_timeout(&self.work, st, left);
            }
            st.idle -= 1;
            if st.jobs.is_empty() {
                break;
            }
        }
        st.threads -= 1;
        drop(st);
        self.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn caps_in_total_and_per_address() {
        let lane = Lane::new(3, 2, 64 * 1024);
        let (a, b) = (ip(1), ip(2));
        let p1 = lane.reserve(a).expect("first");
        let p2 = lane.reserve(a).expect("second");
        assert!(
            lane.reserve(a).is_some_and(|p| p.queued),
            "past its two, it waits"
        );
        let p3 = lane.reserve(b).expect("another address");
        assert!(lane.reserve(ip(3)).is_none(), "the pool is full");
        drop(p3);
        assert!(
            lane.reserve(ip(3)).is_some(),
            "an unused place is given back"
        );
        // Running jobs hold their places until they end.
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let (done_tx, done) = mpsc::channel();
        for p in [p1, p2] {
            let (gate, done_tx) = (gate.clone(), done_tx.clone());
            lane.run(p, move || {
                assert!(on_io_thread());
                let _ = lock(&gate).recv();
                let _ = done_tx.send(());
            });
        }
        assert!(
            lane.reserve(a).is_some_and(|p| p.queued),
            "running jobs keep their places"
        );
        release.send(()).unwrap();
        release.send(()).unwrap();
        for _ in 0..2 {
            done.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while lane.counts().0 != 0 {
            assert!(Instant::now() < deadline, "places not given back");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(lane.reserve(a).is_some());
        assert!(!on_io_thread(), "the test thread is not an IO thread");
        lane.stop(Duration::from_secs(5));
        assert!(lane.reserve(a).is_none(), "a stopped pool takes nothing");
        assert_eq!(lane.counts().1, 0, "threads ended");
    }

    #[test]
    fn past_its_share_an_address_waits_in_its_backlog() {
        let lane = Lane::new(8, 2, 64 * 1024);
        let (a, b) = (ip(1), ip(2));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let (done_tx, done) = mpsc::channel();
        // Five jobs of `a`: two run, three wait, on no thread.
        for i in 0..5 {
            let p = lane.reserve(a).expect("a place, running or waiting");
            assert_eq!(p.queued, i >= 2);
            let (gate, done_tx) = (gate.clone(), done_tx.clone());
            lane.run(p, move || {
                let _ = lock(&gate).recv();
                let _ = done_tx.send(i);
            });
        }
        assert_eq!(lane.counts(), (2, 2), "two running places, two threads");
        // Another address is not held up by a's backlog.
        let pb = lane.reserve(b).expect("b has its own share");
        assert!(!pb.queued);
        drop(pb);
        // An unused waiting place is given back.
        let spare = lane.reserve(a).expect("room in the backlog");
        drop(spare);
        assert_eq!(lock(&lane.shared.state).backlogged, 3);
        // Each job that ends hands its place to the next waiting one, in order.
        let mut order = Vec::new();
        for _ in 0..5 {
            release.send(()).unwrap();
            order.push(done.recv_timeout(Duration::from_secs(5)).unwrap());
        }
        order.sort_unstable();
        assert_eq!(order, [0, 1, 2, 3, 4], "every job ran");
        let deadline = Instant::now() + Duration::from_secs(5);
        while lane.counts().0 != 0 {
            assert!(Instant::now() < deadline, "places not given back");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(lock(&lane.shared.state).backlogged, 0);
        assert!(lock(&lane.shared.state).backlog.is_empty());
        lane.stop(Duration::from_secs(5));
    }

    #[test]
    fn a_full_backlog_refuses() {
        let lane = Lane::new(4, 1, 64 * 1024);
        let _running = lane.reserve(ip(1)).expect("running");
        let waiting: Vec<Permit> = (0..BACKLOG_PER_ADDRESS)
            .map(|_| lane.reserve(ip(1)).expect("waiting"))
            .collect();
        assert!(
            lane.reserve(ip(1)).is_none(),
            "the address's backlog is full"
        );
        assert!(lane.reserve(ip(2)).is_some(), "others are not");
        drop(waiting);
        assert!(lane.reserve(ip(1)).is_some());
    }

    #[test]
    fn threads_are_reused_and_a_panicking_job_costs_nothing_else() {
        let lane = Lane::new(4, 4, 64 * 1024);
        let (tx, rx) = mpsc::channel();
        for i in 0..20 {
            let p = lane.reserve(ip(1)).expect("a place");
            let tx = tx.clone();
            lane.run(p, move || {
                if i == 3 {
                    panic!("a bug in one job");
                }
                let _ = tx.send(std::thread::current().id());
            });
            // One at a time, so an idle thread is always there to take the next.
            if i != 3 {
                rx.recv_timeout(Duration::from_secs(5)).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while lane.counts().0 != 0 {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(lane.counts().1, 1, "one thread served them all");
        lane.stop(Duration::from_secs(5));
    }
}
