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
//!   if they never sent a whole request head, for `Config::http_head_timeout`.
//!
//! A shut-down connection's tiny_http thread then ends. [`crate::server`] starts and
//! stops the thread.

use crate::conns::Conns;
use crate::hub::Hub;
use crate::metrics::{add, METRICS};
use crate::service::Periodic;
use crate::sys::KnownSockets;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(250);

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
    /// `--http-idle-timeout`.
    pub idle_timeout: Duration,
    /// `Config::http_head_timeout`.
    pub head_timeout: Duration,
}

/// The reaper thread.
pub struct Reaper {
    thread: Periodic,
}

impl Reaper {
    /// Starts the thread.
    pub fn start(w: Watched) -> std::io::Result<Reaper> {
        let head = w.head_timeout.min(w.idle_timeout);
        let period = (head / 4).clamp(TICK, Duration::from_secs(5));
        let mut state = State {
            first_seen: HashMap::new(),
            next_pass: Instant::now() + period,
            period,
        };
        let thread = Periodic::start("http-reaper", TICK, move || state.tick(&w))?;
        Ok(Reaper { thread })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

struct State {
    /// When each open connection was first listed.
    first_seen: HashMap<SocketAddr, Instant>,
    next_pass: Instant,
    period: Duration,
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
        if now >= self.next_pass {
            self.pass(w, now);
            self.next_pass = now + self.period;
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
        log::trace!(
            "{} descriptors open, {} connections",
            survey.open,
            survey.peers.len()
        );
        let activity = w.conns.activity();
        let head_timeout = w.head_timeout.min(w.idle_timeout);
        let mut seen = HashMap::new();
        let mut idle = HashSet::new();
        for addr in survey.peers.into_iter().filter(|a| !sockets.contains(a)) {
            let first = self.first_seen.get(&addr).copied().unwrap_or(now);
            seen.insert(addr, first);
            let (timeout, since) = match activity.get(&addr) {
                // A request in progress: its deadlines govern.
                Some(a) if a.busy => continue,
                Some(a) => (w.idle_timeout, a.last.max(first)),
                None => (head_timeout, first),
            };
            if now.saturating_duration_since(since) >= timeout {
                idle.insert(addr);
            }
        }
        if !idle.is_empty() {
            log::debug!("closing {} idle HTTP connections", idle.len());
            match w.sockets.shut_down_all(w.port, &idle) {
                Ok(n) => add(&METRICS.http_reaped_idle, n),
                Err(e) => log::warn!("closing idle connections: {e}"),
            }
        }
        let open: HashSet<SocketAddr> = seen.keys().copied().collect();
        w.conns
            .forget(&open, listed_at, now.checked_sub(w.idle_timeout * 2));
        self.first_seen = seen;
    }
}
