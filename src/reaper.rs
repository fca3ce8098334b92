//! Closes plain HTTP connections that sit idle.
//!
//! tiny_http has no timeouts: an idle keep-alive connection, or a client that opens a
//! connection and sends nothing (slowloris), pins one of its threads forever. Every few
//! seconds the `http-reaper` thread lists our accepted TCP connections (see
//! [`crate::sys`]), skips WebSockets, and shuts down any connection with no request
//! started or finished for `--http-idle-timeout` seconds; its tiny_http thread then
//! ends. [`crate::server`] starts and stops it.

use crate::hub::Hub;
use crate::service::Periodic;
use crate::sync::lock;
use crate::sys::KnownSockets;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When each HTTP connection last started or finished a request.
#[derive(Default)]
pub struct Activity {
    last: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Activity {
    /// Records activity on the connection from `addr`.
    pub fn touch(&self, addr: SocketAddr) {
        lock(&self.last).insert(addr, Instant::now());
    }

    fn last(&self, addr: &SocketAddr) -> Option<Instant> {
        lock(&self.last).get(addr).copied()
    }

    fn forget_before(&self, cutoff: Instant) {
        lock(&self.last).retain(|_, t| *t >= cutoff);
    }
}

/// What the reaper looks at.
pub struct Watched {
    /// Live WebSockets (never reaped).
    pub hub: Arc<Hub>,
    /// Descriptor numbers of WebSockets, and the way to find connections.
    pub sockets: Arc<KnownSockets>,
    /// Request times per connection.
    pub activity: Arc<Activity>,
    /// Our listening port.
    pub port: u16,
    /// `--http-idle-timeout`.
    pub timeout: Duration,
}

/// The reaper thread.
pub struct Reaper {
    thread: Periodic,
}

impl Reaper {
    /// Starts the thread.
    pub fn start(w: Watched) -> std::io::Result<Reaper> {
        let period = (w.timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let mut first_seen = HashMap::new();
        let thread = Periodic::start("http-reaper", period, move || {
            first_seen = reap(&w, std::mem::take(&mut first_seen));
        })?;
        Ok(Reaper { thread })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// One pass; returns when each still-open connection was first seen.
fn reap(w: &Watched, first_seen: HashMap<SocketAddr, Instant>) -> HashMap<SocketAddr, Instant> {
    let sockets: HashSet<SocketAddr> = w.hub.all_peers().iter().map(|p| p.remote).collect();
    let conns = match w.sockets.unclaimed_peers(w.port) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("listing connections: {e}");
            return first_seen;
        }
    };
    let now = Instant::now();
    let mut seen = HashMap::new();
    for addr in conns.into_iter().filter(|a| !sockets.contains(a)) {
        let first = first_seen.get(&addr).copied().unwrap_or(now);
        seen.insert(addr, first);
        let last = w.activity.last(&addr).map_or(first, |t| t.max(first));
        if now.saturating_duration_since(last) >= w.timeout {
            log::debug!("closing idle HTTP connection from {addr}");
            let _ = w.sockets.shut_down(w.port, addr);
        }
    }
    if let Some(cutoff) = now.checked_sub(w.timeout * 2) {
        w.activity.forget_before(cutoff);
    }
    seen
}
