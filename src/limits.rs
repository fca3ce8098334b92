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
        self.take_n(now, 1)
    }

    /// Takes `n` tokens or none, and says how long until `n` are available (more than
    /// the capacity never are: the wait is then one whole period).
    pub fn take_n(&mut self, now: Instant, n: u32) -> Result<(), Duration> {
        self.refill(now);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            let short = (n.min(self.capacity) - self.tokens).max(0.0);
            Err(Duration::from_secs_f64(short.max(1.0) / self.per_sec))
        }
    }

    /// Like [`take`](Self::take) without taking.
    pub fn peek(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// Most keys a [`Generations`] map holds per generation. Past it, the older
/// generation is dropped early: those keys start afresh (documented as the price of a
/// flood of distinct keys; memory stays bounded).
pub const MAX_KEYS: usize = 50_000;

/// A map whose entries are forgotten once unused for one to two `span`s, in O(1) per
/// call: entries live in `current`; every `span` (or when `current` is full) the
/// generations turn and what was not used since the last turn is dropped.
struct Generations<V> {
    current: HashMap<String, V>,
    previous: HashMap<String, V>,
    turned_at: Instant,
    span: Duration,
    max_keys: usize,
}

impl<V> Generations<V> {
    fn new(span: Duration, max_keys: usize) -> Self {
        Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            turned_at: Instant::now(),
            span,
            max_keys,
        }
    }

    /// Turns the generations when a span has passed (or `current` is full): what was
    /// in `previous` was last used before the last turn, at least a span ago.
    fn turn_if_due(&mut self, now: Instant) {
        let due = now.saturating_duration_since(self.turned_at) >= self.span;
        if due || self.current.len() >= self.max_keys {
            self.previous = std::mem::take(&mut self.current);
            self.turned_at = now;
        }
    }

    /// The entry for `key`, moved into the current generation (or made by `new`).
    fn entry(&mut self, key: &str, now: Instant, new: impl FnOnce() -> V) -> &mut V {
        self.turn_if_due(now);
        if let Some(v) = self.previous.remove(key) {
            self.current.insert(key.to_owned(), v);
        }
        self.current.entry(key.to_owned()).or_insert_with(new)
    }

    fn get(&mut self, key: &str, now: Instant) -> Option<&mut V> {
        self.turn_if_due(now);
        match self.current.contains_key(key) {
            true => self.current.get_mut(key),
            false => self.previous.get_mut(key),
        }
    }
}

/// One token bucket per key (an IP, a username); `limit` 0 disables it.
///
/// Memory is bounded: a bucket unused for a whole `per` is full again, so forgetting
/// it loses nothing, and the map turns over every `per` (see [`MAX_KEYS`] for a flood
/// of distinct keys). Each call costs O(1).
pub struct KeyedLimiter {
    buckets: Mutex<Generations<TokenBucket>>,
    limit: u32,
    per: Duration,
}

impl KeyedLimiter {
    /// `limit` events per `per` for each key.
    pub fn new(limit: u32, per: Duration) -> KeyedLimiter {
        KeyedLimiter {
            buckets: Mutex::new(Generations::new(per, MAX_KEYS)),
            limit,
            per,
        }
    }

    /// Counts an event for `key`; `Err(seconds)` to wait if over the limit.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        self.check_n(key, 1)
    }

    /// Counts `n` events for `key` at once, all or none; `Err(seconds)` as for
    /// [`check`](Self::check).
    pub fn check_n(&self, key: &str, n: u32) -> Result<(), u64> {
        if self.limit == 0 || n == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let (limit, per) = (self.limit, self.per);
        lock(&self.buckets)
            .entry(key, now, || TokenBucket::new(limit, per))
            .take_n(now, n)
            .map_err(|wait| wait.as_secs() + 1)
    }

    /// Whether an event for `key` would be allowed now, without counting it;
    /// `Err(seconds)` to wait if not.
    pub fn peek(&self, key: &str) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        match lock(&self.buckets).get(key, now) {
            Some(b) => b.peek(now).map_err(|wait| wait.as_secs() + 1),
            None => Ok(()),
        }
    }
}

/// Keys seen recently (within one to two `span`s), bounded like [`KeyedLimiter`].
pub struct Recent {
    seen: Mutex<Generations<()>>,
}

impl Recent {
    /// Keys are remembered for at least `span`.
    pub fn new(span: Duration) -> Recent {
        Recent {
            seen: Mutex::new(Generations::new(span, MAX_KEYS)),
        }
    }

    /// Remembers `key`.
    pub fn note(&self, key: &str) {
        lock(&self.seen).entry(key, Instant::now(), || ());
    }

    /// Whether `key` was noted recently.
    pub fn contains(&self, key: &str) -> bool {
        lock(&self.seen).get(key, Instant::now()).is_some()
    }
}

/// How many times `--login-rate` the failures for one name from all addresses
/// together may reach in a minute.
const NAME_CEILING: u32 = 5;

/// The login limits (`--login-rate`), built so that brute force stays bounded without
/// handing a stranger the power to lock the owner out:
/// - every attempt from an address counts against that address, failed or not;
/// - failures for a name count against the (name, address) pair, so one guessing
///   address stops itself long before it touches the name's own budget;
/// - failures for a name from all addresses together have a looser ceiling
///   ([`NAME_CEILING`] times the rate), which only a guesser spread over several
///   addresses reaches — and an address that logged in as that name within the last
///   day is never held back by it.
///
/// Names are keyed only once valid (bounded and lower-cased); an invalid name counts
/// against its address alone.
pub struct LoginLimits {
    per_address: KeyedLimiter,
    per_pair: KeyedLimiter,
    per_name: KeyedLimiter,
    trusted: Recent,
}

impl LoginLimits {
    /// Limits of `rate` attempts per minute (0 = off).
    pub fn new(rate: u32) -> LoginLimits {
        let minute = Duration::from_secs(60);
        LoginLimits {
            per_address: KeyedLimiter::new(rate, minute),
            per_pair: KeyedLimiter::new(rate, minute),
            per_name: KeyedLimiter::new(rate.saturating_mul(NAME_CEILING), minute),
            trusted: Recent::new(Duration::from_secs(24 * 3600)),
        }
    }

    /// Counts an attempt from `address` for `name` (a valid, lower-cased username, or
    /// `None`); `Err(seconds)` when it must be refused before the password is checked.
    pub fn admit(&self, name: Option<&str>, address: &str) -> Result<(), u64> {
        self.per_address.check(address)?;
        let Some(name) = name else { return Ok(()) };
        let pair = format!("{name}\n{address}");
        self.per_pair.peek(&pair)?;
        if !self.trusted.contains(&pair) {
            self.per_name.peek(name)?;
        }
        Ok(())
    }

    /// Records a wrong password (or unknown name) for `name` from `address`.
    pub fn failed(&self, name: &str, address: &str) {
        let _ = self.per_pair.check(&format!("{name}\n{address}"));
        let _ = self.per_name.check(name);
    }

    /// Records a successful login: this address may log in as `name` whatever
    /// strangers do to the name's budget.
    pub fn succeeded(&self, name: &str, address: &str) {
        self.trusted.note(&format!("{name}\n{address}"));
    }
}

/// Distinct addresses folded separately per window; the rest share one fold.
pub const MAX_FOLDS: usize = 256;

/// Whether a refusal gets its own audit row now or is counted into a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    /// The first of its kind from this address in the window: write it in full.
    First,
    /// Counted; the window's summary row carries it.
    Folded,
}

/// Repeated refusals of one kind from one address, since the window began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fold {
    /// The audit action (`ws_rejected`, `login_failed`).
    pub action: &'static str,
    /// The address, an IPv6 /64, or `*` for "many addresses".
    pub ip: String,
    /// Refusals after the first.
    pub repeated: u64,
}

/// Folds anonymous refusals into one audit row per kind, address and window, so that
/// a stranger who can reach the port cannot grow the database without bound: the
/// first refusal is written in full, the rest are counted and written as one summary
/// row when the window closes ([`drain`](Self::drain)). At most [`MAX_FOLDS`] addresses
/// are told apart per window; beyond that they share the address `*`. So an anonymous
/// attacker adds at most 2 × (MAX_FOLDS + 1) rows per action and window, whatever
/// the number of addresses or requests.
pub struct Folds {
    folds: Mutex<HashMap<(&'static str, String), u64>>,
}

impl Default for Folds {
    fn default() -> Self {
        Folds {
            folds: Mutex::new(HashMap::new()),
        }
    }
}

/// The address a fold is kept under: IPv6 addresses by their /64, which one client
/// usually owns whole.
fn fold_address(ip: &str) -> String {
    match ip.parse::<std::net::Ipv6Addr>() {
        Ok(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        _ => ip.to_owned(),
    }
}

impl Folds {
    /// Notes a refusal of kind `action` from `ip`.
    pub fn note(&self, action: &'static str, ip: &str) -> Noted {
        let mut folds = lock(&self.folds);
        let mut key = (action, fold_address(ip));
        if !folds.contains_key(&key) && folds.len() >= MAX_FOLDS {
            key.1 = "*".into();
        }
        match folds.get_mut(&key) {
            Some(n) => {
                *n += 1;
                Noted::Folded
            }
            None => {
                folds.insert(key, 0);
                Noted::First
            }
        }
    }

    /// Ends the window: the folds with repeats, for their summary rows.
    pub fn drain(&self) -> Vec<Fold> {
        std::mem::take(&mut *lock(&self.folds))
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|((action, ip), repeated)| Fold {
                action,
                ip,
                repeated,
            })
            .collect()
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
    fn taking_several_is_all_or_nothing() {
        let mut b = TokenBucket::new(5, Duration::from_secs(5));
        let t = Instant::now();
        assert!(b.take_n(t, 3).is_ok());
        // Three more do not fit in the two left: none are taken.
        let wait = b.take_n(t, 3).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1), "one token short at 1/s");
        assert!(b.take_n(t, 2).is_ok(), "the refusal spent nothing");
        assert!(b.take(t).is_err());
        // More than the capacity never fits.
        assert!(b.take_n(t + Duration::from_secs(60), 6).is_err());
        assert!(b.take_n(t + Duration::from_secs(60), 5).is_ok());
    }

    #[test]
    fn generations_forget_unused_keys_and_stay_bounded() {
        let span = Duration::from_secs(60);
        let mut g: Generations<u32> = Generations::new(span, 3);
        let t = Instant::now();
        *g.entry("a", t, || 0) += 1;
        *g.entry("b", t, || 0) += 1;
        // One span later "a" is used again and survives; "b" lingers one more span.
        *g.entry("a", t + span, || 0) += 1;
        assert_eq!(g.get("b", t + span).copied(), Some(1));
        assert_eq!(g.get("a", t + span * 2).copied(), Some(2));
        assert_eq!(g.get("b", t + span * 2), None, "unused for a whole span");
        // Past max_keys the oldest generation goes early: never more than 2 x 3 keys.
        for (i, k) in ["c", "d", "e", "f", "g", "h", "i"].iter().enumerate() {
            g.entry(k, t + span * 2 + Duration::from_secs(i as u64), || 0);
            assert!(g.current.len() + g.previous.len() <= 6);
        }
    }

    #[test]
    fn folds_count_per_address_and_bound_the_addresses() {
        let f = Folds::default();
        assert_eq!(f.note("ws_rejected", "10.0.0.1"), Noted::First);
        assert_eq!(f.note("ws_rejected", "10.0.0.1"), Noted::Folded);
        assert_eq!(f.note("login_failed", "10.0.0.1"), Noted::First);
        // One IPv6 client rotating through its /64 is one address.
        assert_eq!(f.note("ws_rejected", "2001:db8::1"), Noted::First);
        assert_eq!(f.note("ws_rejected", "2001:db8::2"), Noted::Folded);
        for i in 0..1000 {
            f.note("ws_rejected", &format!("10.1.{}.{}", i / 250, i % 250));
        }
        let mut drained = f.drain();
        drained.sort_by(|a, b| a.ip.cmp(&b.ip));
        let star = drained.iter().find(|d| d.ip == "*").expect("overflow fold");
        assert!(drained.len() <= MAX_FOLDS + 1, "{}", drained.len());
        assert!(star.repeated > 0);
        assert!(drained.contains(&Fold {
            action: "ws_rejected",
            ip: "2001:db8:0:0::/64".into(),
            repeated: 1
        }));
        assert!(f.drain().is_empty(), "a new window starts empty");
    }

    #[test]
    fn peek_does_not_count() {
        let l = KeyedLimiter::new(1, Duration::from_secs(60));
        for _ in 0..5 {
            assert!(l.peek("a").is_ok());
        }
        assert!(l.check("a").is_ok());
        assert!(l.peek("a").is_err());
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
