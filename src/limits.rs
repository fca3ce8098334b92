//! Abuse limits: token buckets for login attempts and socket messages, the bounded
//! "slow lane" that runs bcrypt, and the tarpit that slows refused clients down.
//!
//! bcrypt at cost 12 takes about half a second of a core, so a flood of logins could
//! otherwise occupy every HTTP worker and starve chat. Password work runs on as many
//! threads as there are cores, at a lower scheduling priority than chat, behind a
//! queue whose jobs give up (429) after waiting too long. Refusals themselves are
//! answered after a pause: a client that retries at once would otherwise turn cheap
//! 429s into tens of thousands of connections a second, which costs chat more than
//! the hashing did.
//!
//! Threads: `bcrypt-N` (one per core) run password jobs; `tarpit` answers held
//! refusals. Both are started and stopped by [`crate::server`]; stopping lets the
//! queued password jobs finish and answers every held refusal at once.

use crate::service::{Worker, SERVICE_STACK};
use crate::sync::{lock, wait_timeout};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// `capacity` events at once, refilled at `per_sec`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    capacity: f64,
    per_sec: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, per: Duration) -> TokenBucket {
        let capacity = f64::from(capacity.max(1));
        TokenBucket {
            tokens: capacity,
            last: Instant::now(),
            capacity,
            per_sec: capacity / per.as_secs_f64().max(0.001),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

/// One bucket per key (an IP, a username); `limit` 0 disables it.
pub struct KeyedLimiter {
    buckets: Mutex<HashMap<String, TokenBucket>>,
    limit: u32,
    per: Duration,
}

/// Keys kept before idle (full) buckets are forgotten.
const PRUNE_AT: usize = 10_000;

impl KeyedLimiter {
    /// `limit` events per `per` for each key.
    pub fn new(limit: u32, per: Duration) -> KeyedLimiter {
        KeyedLimiter {
            buckets: Mutex::new(HashMap::new()),
            limit,
            per,
        }
    }

    /// Counts an event for `key`; `Err(seconds)` to wait if over the limit.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut map = lock(&self.buckets);
        if map.len() >= PRUNE_AT {
            map.retain(|_, b| !b.is_full(now));
        }
        map.entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.limit, self.per))
            .take(now)
            .map_err(|wait| wait.as_secs() + 1)
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A small pool for CPU-heavy password work that admits only so many jobs at once.
pub struct SlowLane {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    admitted: Arc<AtomicUsize>,
    max: usize,
    workers: Vec<Worker>,
}

/// A place in the slow lane, given back when its job ends (or if it is dropped unused).
pub struct Permit {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Nice value of the password threads: chat threads win the CPU when both want it.
const SLOW_LANE_NICE: i32 = 10;

impl SlowLane {
    /// `threads` workers; at most `threads + queue` jobs admitted at once.
    pub fn start(threads: usize, queue: usize) -> std::io::Result<SlowLane> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                Worker::spawn(format!("bcrypt-{i}"), SERVICE_STACK, move || {
                    run_password_jobs(&rx)
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(SlowLane {
            tx: Mutex::new(Some(tx)),
            admitted: Arc::new(AtomicUsize::new(0)),
            max: threads.max(1) + queue,
            workers,
        })
    }

    /// A place for one job, or `None` when the lane is full (answer 429).
    pub fn reserve(&self) -> Option<Permit> {
        let admitted = self.admitted.fetch_add(1, Ordering::AcqRel);
        let permit = Permit {
            admitted: self.admitted.clone(),
        };
        (admitted < self.max).then_some(permit)
    }

    /// Runs `job` in the lane, holding `permit` until it ends; `job` is told how long
    /// it waited in the queue, so it can give up instead of hashing for a client that
    /// has waited too long. After [`stop`](Self::stop) the job is dropped unrun.
    pub fn run(&self, permit: Permit, job: impl FnOnce(Duration) + Send + 'static) {
        let queued = Instant::now();
        let job: Job = Box::new(move || {
            job(queued.elapsed());
            drop(permit);
        });
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(job);
        }
    }

    /// Lets the queued jobs finish, then ends the threads and joins them.
    pub fn stop(&self) {
        lock(&self.tx).take();
        for w in &self.workers {
            w.join();
        }
    }
}

/// One password thread: takes jobs until the lane is stopped and drained.
fn run_password_jobs(rx: &Mutex<mpsc::Receiver<Job>>) {
    // Per-thread on Linux: only this thread is deprioritised.
    let me = rustix::thread::gettid();
    let _ = rustix::process::setpriority_process(Some(me), SLOW_LANE_NICE);
    loop {
        let job = lock(rx).recv();
        let Ok(job) = job else { return };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            log::error!("a password job panicked");
        }
    }
}

/// Actions waiting in the tarpit, in the order they are due.
#[derive(Default)]
struct Held {
    due: VecDeque<(Instant, Job)>,
    stopped: bool,
}

/// Runs each held action a fixed delay after it was held, in order, on one thread;
/// used to answer refused requests slowly. When full, actions run at once.
pub struct Tarpit {
    shared: Arc<Pit>,
    worker: Worker,
}

struct Pit {
    held: Mutex<Held>,
    wake: Condvar,
    delay: Duration,
    capacity: usize,
}

impl Tarpit {
    /// Starts the tarpit thread.
    pub fn start(delay: Duration, capacity: usize) -> std::io::Result<Tarpit> {
        let shared = Arc::new(Pit {
            held: Mutex::new(Held::default()),
            wake: Condvar::new(),
            delay,
            capacity,
        });
        let s = shared.clone();
        let worker = Worker::spawn("tarpit", SERVICE_STACK, move || s.run())?;
        Ok(Tarpit { shared, worker })
    }

    /// Runs `action` after the delay (or now, if the tarpit is full or stopped).
    pub fn hold(&self, action: impl FnOnce() + Send + 'static) {
        let mut held = lock(&self.shared.held);
        if held.stopped || held.due.len() >= self.shared.capacity {
            drop(held);
            return action();
        }
        held.due
            .push_back((Instant::now() + self.shared.delay, Box::new(action)));
        self.shared.wake.notify_one();
    }

    /// Runs every held action now, ends the thread and joins it.
    pub fn stop(&self) {
        lock(&self.shared.held).stopped = true;
        self.shared.wake.notify_all();
        self.worker.join();
    }
}

impl Pit {
    fn run(&self) {
        let mut held = lock(&self.held);
        loop {
            let now = Instant::now();
            let next = held.due.front().map(|(due, _)| *due);
            match next {
                Some(due) if due <= now || held.stopped => {
                    if let Some((_, action)) = held.due.pop_front() {
                        drop(held);
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(action));
                        held = lock(&self.held);
                    }
                }
                None if held.stopped => return,
                next => {
                    let wait = next.map_or(Duration::from_secs(60), |due| due - now);
                    held = wait_timeout(&self.wake, held, wait);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_capacity_then_refuses() {
        let mut b = TokenBucket::new(3, Duration::from_secs(60));
        let t = Instant::now();
        for _ in 0..3 {
            assert!(b.take(t).is_ok());
        }
        let wait = b.take(t).unwrap_err();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(b.take(t + Duration::from_secs(21)).is_ok());
    }

    #[test]
    fn keyed_limits_are_per_key_and_zero_is_off() {
        let l = KeyedLimiter::new(1, Duration::from_secs(60));
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_err());
        assert!(l.check("b").is_ok());
        let off = KeyedLimiter::new(0, Duration::from_secs(60));
        for _ in 0..100 {
            assert!(off.check("a").is_ok());
        }
    }

    #[test]
    fn slow_lane_admits_threads_plus_queue() {
        let lane = SlowLane::start(1, 1).unwrap();
        let (hold_tx, hold_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let first = lane.reserve().expect("a thread is free");
        lane.run(first, move |_waited| {
            let _ = hold_rx.recv();
            let _ = done_tx.send(());
        });
        let second = lane.reserve().expect("the queue has one place");
        assert!(lane.reserve().is_none(), "lane is full");
        drop(second);
        assert!(lane.reserve().is_some(), "an unused permit is given back");
        drop(hold_tx);
        done_rx.recv().unwrap();
    }

    #[test]
    fn tarpit_delays_in_order_and_runs_at_once_when_full() {
        let pit = Tarpit::start(Duration::from_millis(200), 2).unwrap();
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        for i in 0..3 {
            let tx = tx.clone();
            pit.hold(move || tx.send((i, start.elapsed())).unwrap());
        }
        let order: Vec<(i32, Duration)> = (0..3).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(
            order[0].0, 2,
            "the third action found the tarpit full and ran at once"
        );
        assert!(order[0].1 < Duration::from_millis(150));
        assert_eq!((order[1].0, order[2].0), (0, 1));
        assert!(order[1].1 >= Duration::from_millis(200));
    }
}
