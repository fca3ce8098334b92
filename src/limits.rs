//! Abuse limits: token buckets for login attempts and socket messages, and the
//! bounded "slow lane" that runs bcrypt.
//!
//! bcrypt at cost 12 takes about half a second of a core, so a flood of logins could
//! otherwise occupy every HTTP worker and starve chat. Password work runs on as many
//! threads as there are cores, behind a short queue; when the queue is full the request
//! gets 429 at once instead of waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
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
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
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
    tx: Mutex<mpsc::Sender<Job>>,
    admitted: Arc<AtomicUsize>,
    max: usize,
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

impl SlowLane {
    /// `threads` workers; at most `threads + queue` jobs admitted at once.
    pub fn start(threads: usize, queue: usize) -> std::io::Result<SlowLane> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("bcrypt-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        log::error!("a password job panicked");
                    }
                })?;
        }
        Ok(SlowLane {
            tx: Mutex::new(tx),
            admitted: Arc::new(AtomicUsize::new(0)),
            max: threads.max(1) + queue,
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

    /// Runs `job` in the lane, holding `permit` until it ends.
    pub fn run(&self, permit: Permit, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(move || {
            job();
            drop(permit);
        });
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(job);
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
        lane.run(first, move || {
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
}
