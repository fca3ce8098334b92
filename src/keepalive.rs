//! WebSocket keepalive (`--ws-ping`): a socket silent for one interval is pinged; one
//! silent for two intervals (no pong, no frame) is closed with 1001 and so counts as
//! disconnected — its slot frees and its presence goes offline.
//!
//! Without it, a phone that leaves the Wi-Fi without closing keeps its thread, its
//! slot and its `online` presence until TCP gives up, which on an idle socket is never;
//! and a reverse proxy with the usual 60 s read timeout cuts idle but healthy sockets.
//! TCP keepalive on every accepted connection ([`crate::sys::listen`]) is the
//! backstop.
//!
//! The `keepalive` thread looks at every socket twice per interval; each socket's
//! reader notes what it hears ([`crate::peer::Peer::heard`]). [`crate::server`] starts
//! and stops the thread.

use crate::clock;
use crate::hub::Hub;
use crate::peer::close;
use crate::service::Periodic;
use std::sync::Arc;
use std::time::Duration;

/// The keepalive thread.
pub struct Keepalive {
    thread: Periodic,
}

impl Keepalive {
    /// Starts the thread; `None` when `interval` is zero (keepalive off).
    pub fn start(hub: Arc<Hub>, interval: Duration) -> std::io::Result<Option<Keepalive>> {
        if interval.is_zero() {
            return Ok(None);
        }
        let tick = (interval / 2).max(Duration::from_millis(100));
        let thread = Periodic::start("keepalive", tick, move || check(&hub, interval))?;
        Ok(Some(Keepalive { thread }))
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// Pings the sockets silent for an interval, closes those silent for two.
fn check(hub: &Hub, interval: Duration) {
    let now = clock::mono_ms();
    for peer in hub.all_peers() {
        let silent = peer.silent_for(now);
        if silent >= interval * 2 {
            peer.close(close::GOING_AWAY, "no answer to ping");
        } else if silent >= interval {
            peer.ping_once(now);
        }
    }
}
