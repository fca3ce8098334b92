//! Batched presence: every 250 ms at most, the `presence` thread takes each room's
//! presence changes from the hub and sends them as one `presence_batch` frame to the
//! room's sockets that joined with `"presence": "batch"`, and the room's new online
//! count as a `presence_count` frame to those that joined with `"presence": "count"`,
//! each at most once a second and not within a second of its `joined`
//! ([`crate::hub::COUNT_EVERY`]).
//!
//! A reconnect storm of n users all joining one room costs n²/2 `presence` frames
//! when every socket hears each change; with batches it costs about one frame per
//! socket per 250 ms of storm, and with counts about one frame of a few dozen bytes
//! per socket per second. [`crate::server`] starts and stops the thread.
//!
//! [`announce`] sends one change the unbatched way; the socket threads (their own
//! joins and leaves) and [`crate::cluster`] (other nodes' changes, on the `pg-listen`
//! and `heartbeat` threads) call it. Batches need no call: the hub keeps every change,
//! local or remote, for the next one.

use crate::app::App;
use crate::fanout::{Fanout, Target};
use crate::hub::{Hub, PresenceBatch, PresenceMode};
use crate::peer::{text_frame, Peer};
use crate::protocol::event;
use crate::service::Periodic;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The longest a presence change waits before it is sent in a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(250);

/// The batching thread.
pub struct Batcher {
    thread: Periodic,
}

impl Batcher {
    /// Starts the thread. It ticks a little more often than the window, so a change
    /// never waits longer than the window plus the fan-out.
    pub fn start(hub: Arc<Hub>, fanout: Arc<Fanout>) -> std::io::Result<Batcher> {
        let thread = Periodic::start("presence", BATCH_WINDOW * 4 / 5, move || {
            let batches = hub.take_presence_batches();
            if !batches.is_empty() {
                fanout.deliver(batches.into_iter().flat_map(frames).collect());
            }
        })?;
        Ok(Batcher { thread })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// The `presence_batch` and `presence_count` frames for one room (each if it has
/// news), and who gets them.
fn frames(b: PresenceBatch) -> Vec<(Target, crate::peer::Frame)> {
    let mut out = Vec::new();
    if let Some((n, due)) = b.count {
        let v = json!({"type": "presence_count", "room": b.room, "online_count": n});
        out.push((Target::Peers(due), text_frame(&v.to_string())));
    }
    if !b.online.is_empty() || !b.offline.is_empty() {
        let v = json!({"type": "presence_batch", "room": b.room, "online": b.online, "offline": b.offline});
        let to = Target::Takers {
            room: b.room,
            mode: PresenceMode::Batch,
        };
        out.push((to, text_frame(&v.to_string())));
    }
    out
}

/// Tells `tell` (the room's sockets that hear each change, as the hub chose them) that
/// `user` came online in `room` or went offline (`status`); GraphQL's `presence`
/// subscribers hear it too.
pub fn announce(app: &App, user: &str, room: &str, status: &'static str, tell: Vec<Arc<Peer>>) {
    let change = || crate::model::Presence {
        user: user.to_owned(),
        room: room.to_owned(),
        status,
    };
    if !tell.is_empty() {
        let frame = text_frame(&event("presence", &change()));
        app.fanout.deliver(vec![(Target::Peers(tell), frame)]);
    }
    app.fanout
        .publish(|| crate::events::Event::Presence(Arc::new(change())));
}
