//! Closes plain HTTP connections that must go.
//!
//! tiny_http has no timeouts: an idle keep-alive connection, a client that opens a
//! connection and sends nothing or half a request head (slowloris), or one that sends
//! a body or reads an answer at a trickle would each pin a thread forever. The
//! `http-reaper` thread wakes every quarter second and
//!
//! - shuts down connections whose body read or answer write is past its deadline
//!   (armed by [`crate::exchange`], kept in [`crate::conns`]);
//! - every few seconds, lists our accepted TCP connections (see [`crate::sys`]),
//!   skips WebSockets and connections with a request in progress, and shuts down
//!   those with no request started or finished for `--http-idle-timeout` seconds — or,
//!   if they never sent a whole request head, for `Config::http_head_timeout`;
//! - when a request waits unread on a connection listed before (tiny_http's pool
//!   queued the connection behind busy threads), makes empty connections that get
//!   queued ones a thread (see [`crate::sys::nudge_pool`]);
//! - when descriptors run short — more than `Config::fd_pressure_percent` of the
//!   open-file limit open (a cheap check each tick, an exact count in each listing) —
//!   lists at once and also shuts down idle connections regardless of the timeout,
//!   least recently active first, until `Config::fd_relief_percent` would be open.
//!   Connections younger than `Config::fd_pressure_grace` are spared. A flood of
//!   connections that takes every descriptor kills tiny_http's accept loop (see
//!   [`crate::front`], which then nudges this thread); this is what frees them.
//!
//! A shut-down connection's tiny_http thread then ends. [`crate::server`] starts and
//! stops the thread.

use crate::conns::Conns;
use crate::hub::Hub;
use crate::metrics::{add, METRICS};
use crate::service::{Nudger, Periodic};
use crate::sys::{fd_limit, lowest_free_fd, KnownSockets};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(250);
/// When new connections were seen with a request unread, how soon the next listing
/// checks whether they got a thread.
const RECHECK: Duration = Duration::from_secs(1);
/// Most empty connections made per listing to get queued connections a thread.
const MAX_NUDGES: usize = 64;

/// What the reaper looks at.
pub struct Watched {
    /// Live WebSockets (never reaped).
    pub hub: Arc<Hub>,
    /// Descriptor numbers of WebSockets, and the way to find connections.
    pub sockets: Arc<KnownSockets>,
    /// Turns, activity and deadlines per connection.
    pub conns: Arc<Conns>,
    /// Our listening port.
    pub port: u16,
    /// Our listening address (to nudge tiny_http's connection pool).
    pub listening: SocketAddr,
    /// `--http-idle-timeout`.
    pub idle_timeout: Duration,
    /// `Config::http_head_timeout`.
    pub head_timeout: Duration,
    /// When descriptors count as short.
    pub pressure: Pressure,
}

/// `Config::fd_pressure_percent`, `fd_relief_percent` and `fd_pressure_grace`.
#[derive(Debug, Clone, Copy)]
pub struct Pressure {
    /// Percent of the open-file limit open past which idle connections are shed.
    pub high: u8,
    /// Percent to shed down to.
    pub low: u8,
    /// Age below which a connection is spared.
    pub grace: Duration,
}

impl Pressure {
    /// How many descriptors `percent` of the limit is.
    fn of(percent: u8, limit: u64) -> usize {
        (limit.min(1 << 30) * u64::from(percent) / 100) as usize
    }
}

/// The reaper thread.
pub struct Reaper {
    thread: Periodic,
    urgent: Arc<AtomicBool>,
}

/// Makes the reaper list connections at once, as descriptors may be short.
#[derive(Clone)]
pub struct Alarm {
    urgent: Arc<AtomicBool>,
    nudger: Nudger,
}

impl Alarm {
    /// Rings it.
    pub fn ring(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        self.nudger.nudge();
    }
}

impl Reaper {
    /// Starts the thread.
    pub fn start(w: Watched) -> std::io::Result<Reaper> {
        let head = w.head_timeout.min(w.idle_timeout);
        let period = (head / 4).clamp(TICK, Duration::from_secs(5));
        let urgent = Arc::new(AtomicBool::new(false));
        let mut state = State {
            first_seen: HashMap::new(),
            next_pass: Instant::now() + period,
            period,
            pressed: false,
            urgent: urgent.clone(),
        };
        let thread = Periodic::start("http-reaper", TICK, move || state.tick(&w))?;
        Ok(Reaper { thread, urgent })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }

    /// A handle that makes the thread list connections at once (as when the accept
    /// loop died).
    pub fn alarm(&self) -> Alarm {
        Alarm {
            urgent: self.urgent.clone(),
            nudger: self.thread.nudger(),
        }
    }
}

struct State {
    /// When each open connection was first listed.
    first_seen: HashMap<SocketAddr, Instant>,
    next_pass: Instant,
    period: Duration,
    /// The last listing found descriptors short, or connections left unread: list
    /// again at the next tick.
    pressed: bool,
    urgent: Arc<AtomicBool>,
}

impl State {
    fn tick(&mut self, w: &Watched) {
        let now = Instant::now();
        let late: HashSet<SocketAddr> = w.conns.take_expired(now).into_iter().collect();
        if !late.is_empty() {
            log::debug!("{} HTTP connections past their deadline", late.len());
            match w.sockets.shut_down_all(w.port, &late) {
                Ok(n) => add(&METRICS.http_cut_deadline, n),
                Err(e) => log::warn!("shutting down late connections: {e}"),
            }
        }
        let urgent = self.urgent.swap(false, Ordering::SeqCst);
        if urgent || self.pressed || now >= self.next_pass || short_of_descriptors(w) {
            self.next_pass = now + self.period;
            self.pass(w, now);
        }
    }

    /// Lists the connections and closes the idle ones.
    fn pass(&mut self, w: &Watched, now: Instant) {
        let sockets: HashSet<SocketAddr> = w.hub.all_peers().iter().map(|p| p.remote).collect();
        let listed_at = Instant::now();
        let survey = match w.sockets.survey(w.port) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("listing connections: {e}");
                return;
            }
        };
        let activity = w.conns.activity();
        let head_timeout = w.head_timeout.min(w.idle_timeout);
        let mut seen = HashMap::new();
        let mut idle = HashSet::new();
        // Connections listed before that never started a request, and those of them
        // with bytes waiting unread; and whether new ones have bytes unread.
        let (mut unstarted, mut starving, mut unread_new) = (0, 0, false);
        // Idle connections not (yet) past their timeout, least recently active first.
        let mut spare = Vec::new();
        for addr in survey.peers.into_iter().filter(|a| !sockets.contains(a)) {
            let first = self.first_seen.get(&addr).copied().unwrap_or(now);
            seen.insert(addr, first);
            let (timeout, since) = match activity.get(&addr) {
                // A request in progress: its deadlines govern.
                Some(a) if a.busy => continue,
                Some(a) => (w.idle_timeout, a.last.max(first)),
                None => {
                    let unread = survey.unread.contains(&addr);
                    if self.first_seen.contains_key(&addr) {
                        unstarted += 1;
                        starving += usize::from(unread);
                    } else {
                        unread_new |= unread;
                    }
                    (head_timeout, first)
                }
            };
            let quiet = now.saturating_duration_since(since);
            if quiet >= timeout {
                idle.insert(addr);
            } else if now.saturating_duration_since(first) >= w.pressure.grace {
                spare.push((since, addr));
            }
        }
        if !idle.is_empty() {
            log::debug!("closing {} idle HTTP connections", idle.len());
            match w.sockets.shut_down_all(w.port, &idle) {
                Ok(n) => add(&METRICS.http_reaped_idle, n),
                Err(e) => log::warn!("closing idle connections: {e}"),
            }
        }
        // Each connection holds two descriptors (tiny_http clones it).
        let open = survey.open.saturating_sub(2 * idle.len());
        let limit = fd_limit();
        self.pressed = open > Pressure::of(w.pressure.high, limit);
        if self.pressed {
            let excess = open - Pressure::of(w.pressure.low, limit);
            // Stable: equally quiet ones go in the order they were accepted.
            spare.sort_by_key(|(since, _)| *since);
            let shed: HashSet<SocketAddr> = spare
                .iter()
                .take(excess.div_ceil(2))
                .map(|(_, a)| *a)
                .collect();
            if !shed.is_empty() {
                log::warn!(
                    "{open} of {limit} descriptors open: closing the {} least active idle HTTP connections",
                    shed.len()
                );
            }
            match w.sockets.shut_down_all(w.port, &shed) {
                Ok(n) => add(&METRICS.http_reaped_pressure, n),
                Err(e) => log::warn!("closing idle connections: {e}"),
            }
        }
        let open: HashSet<SocketAddr> = seen.keys().copied().collect();
        if starving > 0 {
            // Requests waiting unread: tiny_http's pool queued their connections
            // behind busy threads (see `sys::nudge_pool`).
            log::debug!("{starving} connections waiting for a thread; nudging the pool");
            crate::sys::nudge_pool(w.listening, unstarted.min(MAX_NUDGES));
        }
        // Look again at the next tick rather than at the next pass: whether the pool
        // took them up. New connections with a request unread are normally just
        // arriving (a reconnect storm has hundreds at any moment), so for them a
        // second look comes after `RECHECK`: listing every descriptor every tick cost
        // a storm about 5 % of the server's CPU.
        self.pressed |= starving > 0;
        if unread_new {
            self.next_pass = self.next_pass.min(now + RECHECK);
        }
        w.conns
            .forget(&open, listed_at, now.checked_sub(w.idle_timeout * 2));
        self.first_seen = seen;
    }
}

/// The cheap check: whether the lowest free descriptor number is past the pressure
/// mark (a flood fills numbers from the bottom), or none is free.
fn short_of_descriptors(w: &Watched) -> bool {
    let high = Pressure::of(w.pressure.high, fd_limit());
    lowest_free_fd().is_none_or(|n| usize::try_from(n).unwrap_or(0) >= high)
}
