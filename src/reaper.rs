//! Closes plain HTTP connections that sit idle.
//!
//! tiny_http has no timeouts: an idle keep-alive connection, or a client that opens a
//! connection and sends nothing (slowloris), pins one of its threads forever. Every few
//! seconds this thread lists our accepted TCP connections (see [`crate::sys`]), skips
//! WebSockets, and shuts down any connection with no request started or finished for
//! `--http-idle-timeout` seconds; its tiny_http thread then ends.

use crate::app::App;
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
        if let Ok(mut m) = self.last.lock() {
            m.insert(addr, Instant::now());
        }
    }

    fn last(&self, addr: &SocketAddr) -> Option<Instant> {
        self.last.lock().ok()?.get(addr).copied()
    }

    fn forget_before(&self, cutoff: Instant) {
        if let Ok(mut m) = self.last.lock() {
            m.retain(|_, t| *t >= cutoff);
        }
    }
}

/// Starts the reaper thread.
pub fn start(app: &Arc<App>) -> Result<(), String> {
    let timeout = app.cfg.http_idle_timeout;
    let period = (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    let app = Arc::downgrade(app);
    std::thread::Builder::new()
        .name("http-reaper".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut first_seen = HashMap::new();
            loop {
                std::thread::sleep(period);
                let Some(app) = app.upgrade() else { return };
                first_seen = reap(&app, timeout, first_seen);
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One pass; returns when each still-open connection was first seen.
fn reap(
    app: &App,
    timeout: Duration,
    first_seen: HashMap<SocketAddr, Instant>,
) -> HashMap<SocketAddr, Instant> {
    let port = app.local_addr.port();
    let sockets: HashSet<SocketAddr> = app.hub.all_peers().iter().map(|p| p.remote).collect();
    let conns = match app.known_sockets.unclaimed_peers(port) {
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
        let last = app.activity.last(&addr).map_or(first, |t| t.max(first));
        if now.saturating_duration_since(last) >= timeout {
            log::debug!("closing idle HTTP connection from {addr}");
            let _ = app.known_sockets.shut_down(port, addr);
        }
    }
    if let Some(cutoff) = now.checked_sub(timeout * 2) {
        app.activity.forget_before(cutoff);
    }
    seen
}
