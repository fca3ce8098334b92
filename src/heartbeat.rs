//! Presence across the nodes sharing a database: the `heartbeat` thread.
//!
//! On a node sharing a PostgreSQL database, [`Heartbeat::start`] starts the thread,
//! makes it the outlet for this node's presence changes ([`crate::hub::Hub::share`]:
//! sent through the store's `notify`), asks every other node for its state (`Hello`),
//! and waits (at most [`SETTLE`]) until the nodes listening on the database have
//! answered, so that the first `joined` on this node already lists their users. The
//! thread ticks every [`TICK`], and at once when nudged (by a socket thread whose join
//! or leave queued a change, or by the sink with a request): it asks nodes whose
//! heartbeat digest differs from what this node knows of them, queues this node's
//! state when asked and a heartbeat every [`HEARTBEAT`], sends what the hub queued,
//! and drops nodes silent for [`crate::cluster::SILENCE`] (their users go offline).
//! [`Heartbeat::stop`] sends what is left, stops it and says goodbye.
//!
//! So a killed node's users show offline elsewhere [`crate::cluster::SILENCE`] after it
//! was last heard from, plus at most one tick; a node that stops cleanly takes them
//! offline at once. On SQLite none of this starts: [`Heartbeat::start`] returns `None`.
//!
//! Threads: [`crate::server`] starts and stops it; the ticks run on `heartbeat`, and
//! the notices they send go through the store's writer, in order with this node's
//! other presence notices.

use crate::app::App;
use crate::cluster::HEARTBEAT;
use crate::hub::{Hub, Outlet};
use crate::service::Periodic;
use crate::store::notice::Notice;
use crate::store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the thread looks for work: a fraction of [`HEARTBEAT`], so that a silent
/// node is dropped soon after its time is up.
pub const TICK: Duration = Duration::from_millis(500);
/// The longest a starting node waits for the other nodes' state.
pub const SETTLE: Duration = Duration::from_secs(2);

/// The `heartbeat` thread.
pub struct Heartbeat {
    thread: Periodic,
    store: Arc<Store>,
}

impl Heartbeat {
    /// Starts sharing presence with the other nodes (see the module's docs); `None`
    /// on a lone node. Call once the store listens, before sockets come.
    pub fn start(app: &Arc<App>) -> Result<Option<Heartbeat>, String> {
        let Some(me) = app.store.node_id() else {
            return Ok(None);
        };
        let (a, mut last) = (app.clone(), Instant::now());
        let thread = Periodic::start("heartbeat", TICK, move || tick(&a, &mut last))
            .map_err(|e| format!("cannot start the heartbeat: {e}"))?;
        let (store, nudger) = (app.store.clone(), thread.nudger());
        app.hub.share(Outlet {
            send: Box::new(move |notices| notices.into_iter().for_each(|n| store.notify(n))),
            wake: Box::new(move || nudger.nudge()),
        });
        app.nodes.started(me, thread.nudger());
        // Counted before asking, so every node counted gets the question.
        let others = app.store.other_nodes().unwrap_or_else(|e| {
            log::warn!("cannot count the other nodes: {e}");
            0
        });
        app.nodes.hello_sent();
        app.store.notify(Notice::Hello { to: None });
        settle(app, others);
        Ok(Some(Heartbeat {
            thread,
            store: app.store.clone(),
        }))
    }

    /// Stops the thread, joins it, sends the presence changes still queued, and tells
    /// the other nodes that this node's users are gone (call once its sockets are
    /// closed).
    pub fn stop(&self, hub: &Hub) {
        self.thread.stop();
        hub.flush();
        self.store.notify(Notice::Goodbye);
    }
}

/// One tick: questions, then what the hub queued (with this node's state if asked,
/// and the heartbeat when due), then the silent nodes.
fn tick(app: &App, last: &mut Instant) {
    let (answer, ask) = app.nodes.take_todo();
    for node in ask {
        app.store.notify(Notice::Hello { to: Some(node) });
    }
    if answer || last.elapsed() >= HEARTBEAT {
        app.hub.share_presence(answer);
        *last = Instant::now();
    }
    app.hub.flush();
    app.nodes.drop_silent(app);
}

/// Waits until `others` nodes have sent their whole state, or [`SETTLE`] passed.
fn settle(app: &App, others: usize) {
    let began = Instant::now();
    while app.nodes.complete_states() < others {
        if began.elapsed() >= SETTLE {
            log::warn!(
                "{} of {others} other nodes told their presence within {SETTLE:?}; the rest \
                 will show as they do",
                app.nodes.complete_states()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if others > 0 {
        log::info!(
            "presence of {others} other nodes heard in {:?}",
            began.elapsed()
        );
    }
}
