//! Batched presence: every 250 ms at most, the `presence` thread takes each room's
//! presence changes from the hub and sends them as one `presence_batch` frame to the
//! room's sockets that joined with `"presence": "batch"`.
//!
//! A reconnect storm of n users all joining one room costs n²/2 `presence` frames
//! when every socket hears each change; with batches it costs about one frame per
//! socket per 250 ms of storm. [`crate::server`] starts and stops the thread.

use crate::fanout::{Fanout, Target};
use crate::hub::{Hub, PresenceBatch};
use crate::peer::text_frame;
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
                fanout.deliver(batches.into_iter().map(frame).collect());
            }
        })?;
        Ok(Batcher { thread })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// The `presence_batch` frame for one room, and who gets it.
fn frame(b: PresenceBatch) -> (Target, crate::peer::Frame) {
    let v =
        json!({"type": "presence_batch", "room": b.room, "online": b.online, "offline": b.offline});
    (Target::BatchTakers(b.room), text_frame(&v.to_string()))
}
