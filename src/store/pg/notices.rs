//! Notices between the nodes that share the database, over PostgreSQL's
//! `LISTEN`/`NOTIFY` on the channel [`CHANNEL`] (see [`crate::store::notice`]).
//!
//! Sending: a [`Publisher`] queues a notice with a write job; the writer sends the
//! notices of the batch's successful jobs (`pg_notify`, one statement) inside the
//! batch's transaction, so they are delivered when it commits and never if it rolls
//! back. Room messages, DMs and deletions queue theirs in the very job that stores
//! them; since message transactions commit in id order (the `ORDER` lock), their
//! notices arrive in id order too. [`super::Postgres::notify`] queues the others
//! (kicks, announcements) as jobs of their own, in commit order with the rest.
//!
//! The payload is the notice's JSON with one more field, `node` (a random id per open
//! [`super::Postgres`]), so a node skips its own; the sink gets the sender's id with
//! every other node's notice (presence is kept per node). PostgreSQL refuses payloads
//! of 8000 bytes or more; a longer notice (a long message) goes as several `part`s in
//! the same transaction, each carrying a base64 slice of the JSON in `data`, and the
//! listener joins them.
//!
//! Receiving: [`Listener`] runs the `pg-listen` thread, started by
//! [`super::Postgres::listen`] and stopped (and joined) by [`super::Postgres::close`].
//! It owns a client of its own (named [`LISTENER_NAME`] in `pg_stat_activity`, so a
//! starting node can count the nodes already listening), waits for notifications, and
//! hands each other node's notice to the sink. When its connection is lost it
//! reconnects (with a pause) and says in the log that notices may have been missed
//! meanwhile: PostgreSQL keeps none for a session that is not listening.

use super::turns::Turns;
use super::{Conn, Tx};
use crate::service::{StopSignal, Worker};
use crate::store::notice::{Notice, Sink};
use crate::store::{Result, StoreError};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use postgres::fallible_iterator::FallibleIterator;
use postgres::Config;
use serde_json::Value;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The channel every node listens on (one per database).
pub const CHANNEL: &str = "parley";
/// The `application_name` of every node's listening session.
pub(super) const LISTENER_NAME: &str = "parley-listen";
/// Longest payload sent whole (PostgreSQL's limit is 7999 bytes).
const MAX_PAYLOAD: usize = 7900;
/// Bytes of notice JSON per part: 6668 in base64, plus the part's other fields.
const PART: usize = 5000;
/// How long the listener waits for a notification before it looks at its stop flag.
const POLL: Duration = Duration::from_millis(250);
/// How often a quiet listener checks that its connection still answers.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How long that check may take before the connection counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before connecting again after the connection was lost.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Unfinished multi-part notices kept at most (parts of one transaction arrive
/// together, so more means parts were lost).
const MAX_PARTIAL: usize = 64;
/// The listener's stack: the client's futures and the sink run on it.
const LISTEN_STACK: usize = 1024 * 1024;

/// Stamps and sends this node's notices.
pub(super) struct Publisher {
    /// This node's id in every payload.
    node: String,
    /// Numbers this node's multi-part notices.
    seq: AtomicU64,
    /// Numbers this node's notices, in the order the writer runs their jobs (which is
    /// commit order): the tickets of [`super::turns`].
    tickets: AtomicU64,
}

impl Publisher {
    /// A publisher with a fresh random node id.
    pub(super) fn new() -> Publisher {
        Publisher {
            node: crate::random::random_token_bytes(12),
            seq: AtomicU64::new(0),
            tickets: AtomicU64::new(1),
        }
    }

    /// This node's id.
    pub(super) fn node(&self) -> &str {
        &self.node
    }

    /// The payloads that carry `notice` with its `ticket`: one, or its parts.
    fn payloads(&self, notice: &Notice, ticket: Option<u64>) -> Result<Vec<String>> {
        let json = |e: serde_json::Error| StoreError::Postgres(format!("notice: {e}"));
        let mut whole = serde_json::to_value(notice).map_err(json)?;
        if let Value::Object(fields) = &mut whole {
            fields.insert("node".into(), Value::String(self.node.clone()));
            if let Some(ticket) = ticket {
                fields.insert("ticket".into(), Value::from(ticket));
            }
        }
        let whole = whole.to_string();
        if whole.len() <= MAX_PAYLOAD {
            return Ok(vec![whole]);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let parts = whole.len().div_ceil(PART);
        Ok(whole
            .as_bytes()
            .chunks(PART)
            .enumerate()
            .map(|(i, chunk)| {
                serde_json::json!({
                    "node": self.node,
                    "seq": seq,
                    "part": i,
                    "parts": parts,
                    "data": STANDARD_NO_PAD.encode(chunk),
                })
                .to_string()
            })
            .collect())
    }

    /// Queues `notice` with the job: the writer sends the notices of a batch's
    /// successful jobs, in job order, in one statement just before COMMIT, so the other
    /// nodes get them when (and only if) the job's changes commit. Returns the
    /// notice's ticket, under which the job's completion waits its turn.
    pub(super) fn queue(&self, c: &mut Tx<'_, '_>, notice: &Notice) -> Result<u64> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        c.outbox.extend(self.payloads(notice, Some(ticket))?);
        Ok(ticket)
    }

    /// Queues a notice whose job's completion need not wait its turn (a kick, an
    /// announcement: nothing on this node is delivered from it).
    pub(super) fn queue_untracked(&self, c: &mut Tx<'_, '_>, notice: &Notice) -> Result<()> {
        c.outbox.extend(self.payloads(notice, None)?);
        Ok(())
    }
}

/// Sends `payloads` inside the batch's transaction (delivered at COMMIT).
pub(super) fn send(c: &mut Tx<'_, '_>, payloads: &[String]) -> Result<()> {
    c.execute(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
        &[&CHANNEL, &payloads],
    )?;
    Ok(())
}

/// The `pg-listen` thread: hands the notices of other nodes to a sink.
pub(super) struct Listener {
    signal: Arc<StopSignal>,
    worker: Worker,
}

impl Listener {
    /// Connects and listens (so every notice committed after this returns is heard),
    /// then starts the thread.
    pub(super) fn start(
        config: Arc<Config>,
        node: String,
        sink: Sink,
        turns: Arc<Turns>,
    ) -> Result<Listener> {
        let conn = listening(&config)?;
        let signal = Arc::new(StopSignal::default());
        let thread_signal = signal.clone();
        turns.set_listening(true);
        let hear = Hear { node, sink, turns };
        let worker = Worker::spawn("pg-listen", LISTEN_STACK, move || {
            run(conn, &config, &hear, &thread_signal);
            hear.turns.set_listening(false);
        })
        .map_err(|e| StoreError::Postgres(format!("cannot start the listener: {e}")))?;
        Ok(Listener { signal, worker })
    }

    /// Stops the thread and joins it (the completions waiting their turn run).
    pub(super) fn stop(&self) {
        self.signal.stop();
        self.worker.join();
    }
}

/// What the listener does with what it hears.
struct Hear {
    /// This node's id.
    node: String,
    /// Where other nodes' notices go.
    sink: Sink,
    /// Where this node's own completions wait for their notices.
    turns: Arc<Turns>,
}

impl Hear {
    /// Tells the sink that notices were lost while the connection was down.
    fn missed(&self) {
        if catch_unwind(AssertUnwindSafe(|| (self.sink)(&self.node, Notice::Missed))).is_err() {
            log::error!("handling missed notices panicked");
        }
    }

    fn payload(&self, parts: &mut Parts, payload: &str) {
        match parts.read(payload, &self.node) {
            Some(Heard::Other(node, notice)) => {
                if catch_unwind(AssertUnwindSafe(|| (self.sink)(&node, notice))).is_err() {
                    log::error!("a notice's delivery panicked");
                }
            }
            Some(Heard::Own(Some(ticket))) => self.turns.heard(ticket),
            Some(Heard::Own(None)) | None => {}
        }
    }
}

/// A client that listens on [`CHANNEL`].
fn listening(config: &Config) -> Result<Conn> {
    let mut conn = Conn::connect(config)?;
    // Apart from LISTEN, which stays the session's last statement for whoever looks.
    conn.client
        .batch_execute(&format!("SET application_name = '{LISTENER_NAME}'"))?;
    conn.client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(conn)
}

fn run(conn: Conn, config: &Config, hear: &Hear, signal: &StopSignal) {
    let mut conn = Some(conn);
    let mut parts = Parts::default();
    let mut checked = Instant::now();
    while !signal.is_stopped() {
        let Some(c) = conn.as_mut() else {
            if !signal.sleep(RECONNECT_PAUSE) {
                break;
            }
            match listening(config) {
                Ok(c) => {
                    log::info!("listening for other nodes' notices again");
                    hear.turns.set_listening(true);
                    conn = Some(c);
                    hear.missed();
                }
                Err(e) => log::warn!("cannot listen for other nodes' notices: {e}"),
            }
            continue;
        };
        let mut last = Instant::now();
        let mut notifications = c.client.notifications();
        let mut iter = notifications.timeout_iter(POLL);
        // (failed, quiet for less than POLL): the latter only if the connection ended.
        let (failed, early) = loop {
            match iter.next() {
                Ok(Some(n)) => {
                    last = Instant::now();
                    hear.payload(&mut parts, n.payload());
                    if signal.is_stopped() {
                        break (false, false);
                    }
                }
                Ok(None) => break (false, last.elapsed() < POLL),
                Err(e) => {
                    log::warn!("listening for other nodes' notices: {e}");
                    break (true, false);
                }
            }
        };
        drop(iter);
        drop(notifications);
        hear.turns.run_stale();
        // A connection that ended shows as a quiet spell cut short; one that went
        // silent (the server's host gone) only as a check that gets no answer.
        let check = early || checked.elapsed() >= CHECK_EVERY;
        let lost = failed || (check && c.client.is_valid(CHECK_TIMEOUT).is_err());
        if check {
            checked = Instant::now();
        }
        if lost || c.client.is_closed() {
            log::warn!(
                "lost the connection that hears other nodes; once it is back, this node's \
                 sockets are closed (1012) so that their clients catch up with `since`"
            );
            hear.turns.set_listening(false);
            conn = None;
        }
    }
    log::debug!("pg listener stopped");
}

/// A complete payload.
#[derive(Debug, PartialEq)]
enum Heard {
    /// This node's own notice, with its ticket.
    Own(Option<u64>),
    /// Another node's, with that node's id.
    Other(String, Notice),
}

/// The parts of multi-part notices received so far, by sender and number.
#[derive(Default)]
struct Parts {
    pending: HashMap<(String, u64), Vec<Option<Vec<u8>>>>,
}

impl Parts {
    /// What `payload` says, once complete: another node's notice, or this node's own
    /// (with its ticket); `None` for a part of one still incomplete, or a payload that
    /// is no notice (logged).
    fn read(&mut self, payload: &str, own: &str) -> Option<Heard> {
        let mut value: Value = match serde_json::from_str(payload) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("ignored a notice that is not JSON: {e}");
                return None;
            }
        };
        if value.get("data").is_some() {
            let whole = self.join(&value)?;
            value = serde_json::from_slice(&whole)
                .map_err(|e| log::warn!("ignored a notice that is not JSON: {e}"))
                .ok()?;
        }
        let node = value.get("node").and_then(Value::as_str).unwrap_or("");
        if node == own {
            return Some(Heard::Own(value.get("ticket").and_then(Value::as_u64)));
        }
        let node = node.to_owned();
        serde_json::from_value(value)
            .map(|notice| Heard::Other(node, notice))
            .map_err(|e| log::warn!("ignored a notice parley cannot read: {e}"))
            .ok()
    }

    /// Adds a part; the whole JSON once every part is in.
    fn join(&mut self, part: &Value) -> Option<Vec<u8>> {
        let field = |name: &str| part.get(name).and_then(Value::as_u64);
        let node = part.get("node").and_then(Value::as_str).unwrap_or("");
        let (Some(seq), Some(i), Some(n)) = (field("seq"), field("part"), field("parts")) else {
            log::warn!("ignored a malformed notice part");
            return None;
        };
        let data = part.get("data").and_then(Value::as_str).unwrap_or("");
        let (Ok(i), Ok(n), Ok(data)) = (
            usize::try_from(i),
            usize::try_from(n),
            STANDARD_NO_PAD.decode(data),
        ) else {
            log::warn!("ignored a malformed notice part");
            return None;
        };
        if i >= n || n > 1024 {
            log::warn!("ignored a malformed notice part");
            return None;
        }
        if self.pending.len() >= MAX_PARTIAL {
            log::warn!("dropped {} incomplete notices", self.pending.len());
            self.pending.clear();
        }
        let key = (node.to_owned(), seq);
        let slots = self
            .pending
            .entry(key.clone())
            .or_insert_with(|| vec![None; n]);
        if let Some(slot) = slots.get_mut(i) {
            *slot = Some(data);
        }
        if slots.iter().any(Option::is_none) {
            return None;
        }
        let slots = self.pending.remove(&key)?;
        Some(slots.into_iter().flatten().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Deleted, Message};

    /// Long notices go in parts and come back whole; a node skips its own.
    #[test]
    fn notices_round_trip_whole_or_in_parts() {
        let (a, b) = (Publisher::new(), Publisher::new());
        let mut parts = Parts::default();
        let short = Notice::Deleted {
            deleted: Deleted {
                id: 1,
                room: "general".into(),
                by: "mod".into(),
            },
        };
        let long = Notice::Message {
            message: Message {
                id: 2,
                room: "general".into(),
                from: "alice".into(),
                body: "€\"\\".repeat(4000),
                ts: "t".into(),
                client_id: None,
            },
        };
        let one = a.payloads(&short, Some(7)).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            parts.read(&one[0], b.node()),
            Some(Heard::Other(a.node().to_owned(), short.clone()))
        );
        assert_eq!(parts.read(&one[0], a.node()), Some(Heard::Own(Some(7))));
        let many = a.payloads(&long, Some(8)).unwrap();
        assert!(many.len() > 1);
        assert!(many.iter().all(|p| p.len() < 8000));
        let mut got = None;
        for p in many.iter().rev() {
            assert!(got.is_none(), "whole before its last part");
            got = parts.read(p, b.node());
        }
        assert_eq!(got, Some(Heard::Other(a.node().to_owned(), long)));
        let mut mine = None;
        for p in &many {
            mine = parts.read(p, a.node());
        }
        assert_eq!(mine, Some(Heard::Own(Some(8))), "its own, in parts");
        assert!(parts.pending.is_empty());
        assert_eq!(parts.read("not json", b.node()), None);
        assert_eq!(parts.read(r#"{"kind":"nope"}"#, b.node()), None);
    }
}
