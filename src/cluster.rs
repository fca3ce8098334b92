//! Changes made by other nodes, delivered to this node's sockets.
//!
//! Several parley nodes can share one PostgreSQL database behind a load balancer;
//! each holds its own sockets. What one node commits, the others hear as
//! [`Notice`]s from the store ([`crate::store::notice`]), and [`sink`] hands each to
//! the same delivery code the node's own actions use, so a message from a socket on
//! node A reaches the room's sockets on B exactly as if it were sent there. Bans,
//! revocations and role changes need no notice: permissions are read from the
//! database on every action, and `enforce`'s sweep sees the login changes of every
//! node. On SQLite there is one node and no notice ever comes.
//!
//! Presence is shared too, so a room looks the same from every node. [`Nodes`] keeps,
//! for each other node, who it has online in which room (from its `Presence` and
//! `PresenceState` notices) and when it was last heard from; the hub counts those
//! users beside its own ([`crate::hub::Hub::remote_changes`]) and says which changes
//! make a user online or offline cluster-wide, and only those are announced here. A
//! node that stops says goodbye; one that dies is dropped once silent for
//! [`SILENCE`], and a node whose heartbeat digest differs from what this node knows
//! of it is asked for its state again (a notice lost while a listener reconnected).
//!
//! Threads: the sink runs on the store's listening thread (started by
//! [`crate::server`] through [`crate::store::Store::listen`], stopped by
//! `Store::close`). It only queues deliveries (the fan-out thread writes them), closes
//! sockets or updates [`Nodes`], so it never waits on a client; what presence needs
//! sent (answers, questions) it leaves to the `heartbeat` thread ([`crate::heartbeat`]),
//! which also drops silent nodes.

use crate::actions::{
    broadcast_deleted, broadcast_dm, broadcast_message, close_kicked, deliver_announcement,
};
use crate::app::App;
use crate::hub::Transition;
use crate::service::Nudger;
use crate::store::notice::{presence_digest, Notice, PresenceChange, RoomPresence, Sink};
use crate::sync::lock;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How often each node sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node not heard from for this long (three heartbeats) is taken for dead.
pub const SILENCE: Duration = Duration::from_secs(6);
/// How long a node asked for its state has to answer before it is asked again.
const ASK_AGAIN: Duration = Duration::from_secs(4);

/// The sink for other nodes' notices. It holds the app weakly: the store, which the
/// app owns, holds the sink.
pub fn sink(app: Weak<App>) -> Sink {
    Box::new(move |node, notice| {
        if let Some(app) = app.upgrade() {
            apply(&app, node, notice);
        }
    })
}

/// Delivers one notice from `node` to this node's sockets.
fn apply(app: &App, node: &str, notice: Notice) {
    match notice {
        Notice::Message { message } => broadcast_message(app, &message),
        Notice::Dm { dm, users } => broadcast_dm(app, &dm, users),
        Notice::Deleted { deleted } => broadcast_deleted(app, deleted),
        Notice::Kick { user_id } => {
            close_kicked(app, user_id);
        }
        Notice::Missed => resume_everyone(app),
        Notice::Announce { frame, roles } => {
            if let Err(e) = deliver_announcement(app, &frame, roles.as_deref()) {
                log::warn!("an announcement from another node was not delivered: {e}");
            }
        }
        Notice::Presence { changes } => app.nodes.changes(app, node, changes),
        Notice::PresenceState { rooms, last } => app.nodes.state(app, node, rooms, last),
        Notice::Heartbeat { digest } => app.nodes.heartbeat(node, digest),
        Notice::Hello { to } => app.nodes.hello(to.as_deref()),
        Notice::Goodbye => app.nodes.forget(app, node, "said goodbye"),
    }
}

/// The other nodes' presence, as far as this node knows it.
#[derive(Default)]
pub struct Nodes {
    /// Each other node by id.
    views: Mutex<HashMap<String, View>>,
    /// What the `heartbeat` thread is to send.
    todo: Mutex<Todo>,
    /// This node's id and the way to wake the `heartbeat` thread, once it runs.
    me: OnceLock<(String, Nudger)>,
    /// When this node asked every other for its state (at start).
    hello: OnceLock<Instant>,
}

/// Presence notices the `heartbeat` thread is to send.
#[derive(Default)]
struct Todo {
    /// Someone asked for this node's state.
    answer: bool,
    /// Nodes to ask for their state.
    ask: BTreeSet<String>,
}

/// One other node.
struct View {
    /// Room → users online there on that node.
    rooms: HashMap<String, HashSet<String>>,
    /// [`presence_digest`] of `rooms`, to compare with the node's heartbeats.
    digest: u64,
    /// When any notice of it last arrived.
    heard: Instant,
    /// When it was last asked for its state, until the state arrived.
    asked: Option<Instant>,
    /// The rooms listed so far by the state now arriving (a state may take several
    /// notices).
    listed: HashSet<String>,
    /// Whether a whole state of it arrived.
    complete: bool,
}

impl View {
    fn new(asked: Option<Instant>) -> View {
        View {
            rooms: HashMap::new(),
            digest: 0,
            heard: Instant::now(),
            asked,
            listed: HashSet::new(),
            complete: false,
        }
    }

    /// Applies one change; returns it if it changed the view.
    fn set(&mut self, c: PresenceChange) -> Option<PresenceChange> {
        let changed = if c.online {
            let users = self.rooms.entry(c.room.clone()).or_default();
            users.insert(c.user.clone())
        } else {
            let users = self.rooms.get_mut(&c.room)?;
            let removed = users.remove(&c.user);
            if users.is_empty() {
                self.rooms.remove(&c.room);
            }
            removed
        };
        if !changed {
            return None;
        }
        self.digest ^= presence_digest(&c.room, &c.user);
        Some(c)
    }

    /// Makes `users` the room's online users; pushes what changed to `out`.
    fn replace(&mut self, room: &str, users: Vec<String>, out: &mut Vec<PresenceChange>) {
        let new: HashSet<String> = users.into_iter().collect();
        let old = self.rooms.remove(room).unwrap_or_default();
        let change = |user: &String, online| PresenceChange::new(room, user, online);
        let gone = old.difference(&new).map(|u| change(u, false));
        let came = new.difference(&old).map(|u| change(u, true));
        for c in gone.chain(came).collect::<Vec<_>>() {
            self.digest ^= presence_digest(room, &c.user);
            out.push(c);
        }
        if !new.is_empty() {
            self.rooms.insert(room.to_owned(), new);
        }
    }

    /// Everyone the node had online, as offline changes.
    fn offline(self) -> Vec<PresenceChange> {
        let to_change = |(room, users): (String, HashSet<String>)| {
            users.into_iter().map(move |user| PresenceChange {
                room: room.clone(),
                user,
                online: false,
            })
        };
        self.rooms.into_iter().flat_map(to_change).collect()
    }
}

impl Nodes {
    /// Called by the `heartbeat` thread once it runs: this node's id, and how to make
    /// the thread send what the sink asks for at once.
    pub fn started(&self, me: String, nudger: Nudger) {
        let _ = self.me.set((me, nudger));
    }

    /// Notes that this node just asked every other for its state.
    pub fn hello_sent(&self) {
        let _ = self.hello.set(Instant::now());
    }

    /// What the `heartbeat` thread is to send: this node's state (if asked), and the
    /// nodes to ask for theirs.
    pub fn take_todo(&self) -> (bool, Vec<String>) {
        let mut todo = lock(&self.todo);
        let ask = std::mem::take(&mut todo.ask).into_iter().collect();
        (std::mem::take(&mut todo.answer), ask)
    }

    /// How many other nodes' whole state has arrived.
    pub fn complete_states(&self) -> usize {
        lock(&self.views).values().filter(|v| v.complete).count()
    }

    /// `node`'s changes, in the order it made them.
    fn changes(&self, app: &App, node: &str, changes: Vec<PresenceChange>) {
        self.update(app, node, |view| {
            changes.into_iter().filter_map(|c| view.set(c)).collect()
        });
    }

    /// (Part of) `node`'s whole state.
    fn state(&self, app: &App, node: &str, rooms: Vec<RoomPresence>, last: bool) {
        self.update(app, node, |view| {
            let mut out = Vec::new();
            for r in rooms {
                view.replace(&r.room, r.users, &mut out);
                view.listed.insert(r.room);
            }
            if last {
                let unlisted: Vec<String> = (view.rooms.keys())
                    .filter(|room| !view.listed.contains(*room))
                    .cloned()
                    .collect();
                for room in unlisted {
                    view.replace(&room, Vec::new(), &mut out);
                }
                view.listed.clear();
                view.complete = true;
                view.asked = None;
            }
            out
        });
    }

    /// `node` is alive; if what it has online is not what this node knows of it, it is
    /// asked for its state (unless it was asked a moment ago).
    fn heartbeat(&self, node: &str, digest: u64) {
        {
            let mut views = lock(&self.views);
            let view = self.view(&mut views, node);
            view.heard = Instant::now();
            // A node queues its state in one piece, so no state is under way at its
            // heartbeat: what one listed so far belongs to a state cut short.
            view.listed.clear();
            if view.digest == digest || view.asked.is_some_and(|t| t.elapsed() < ASK_AGAIN) {
                return;
            }
            view.asked = Some(Instant::now());
        }
        log::info!("node {node} has other users online than this node knew: asking again");
        lock(&self.todo).ask.insert(node.to_owned());
        self.nudge();
    }

    /// A node asks for the state of every node (`to` is `None`) or of the one `to`
    /// names.
    fn hello(&self, to: Option<&str>) {
        let mine = match (to, self.me.get()) {
            (None, _) => true,
            (Some(to), Some((me, _))) => to == me,
            (Some(_), None) => false,
        };
        if mine {
            lock(&self.todo).answer = true;
            self.nudge();
        }
    }

    /// Forgets `node` (it stopped, or went silent): its users go offline here unless
    /// online elsewhere.
    pub fn forget(&self, app: &App, node: &str, why: &str) {
        self.forget_if(app, node, why, |_| true);
    }

    /// Forgets `node` if `still` holds for its view (checked under the lock).
    fn forget_if(&self, app: &App, node: &str, why: &str, still: impl Fn(&View) -> bool) {
        let mut views = lock(&self.views);
        if !views.get(node).is_some_and(still) {
            return;
        }
        let Some(view) = views.remove(node) else {
            return;
        };
        let changes = view.offline();
        log::info!(
            "node {node} {why}; {} of its users offline there",
            changes.len()
        );
        announce(app, app.hub.remote_changes(changes));
    }

    /// Forgets every node not heard from for [`SILENCE`].
    pub fn drop_silent(&self, app: &App) {
        let silent: Vec<String> = lock(&self.views)
            .iter()
            .filter(|(_, v)| v.heard.elapsed() > SILENCE)
            .map(|(node, _)| node.clone())
            .collect();
        let why = format!("silent for {} s", SILENCE.as_secs());
        for node in silent {
            // Heard from since it was listed: it stays.
            self.forget_if(app, &node, &why, |v| v.heard.elapsed() > SILENCE);
        }
    }

    /// Runs `f` on the view of `node` (made if new; heard from now), counts the changes
    /// it returns in the hub and announces those that change presence cluster-wide.
    /// The views stay locked throughout, so that transitions reach the fan-out in the
    /// order they were counted.
    fn update(&self, app: &App, node: &str, f: impl FnOnce(&mut View) -> Vec<PresenceChange>) {
        let mut views = lock(&self.views);
        let view = self.view(&mut views, node);
        view.heard = Instant::now();
        let changes = f(view);
        if !changes.is_empty() {
            announce(app, app.hub.remote_changes(changes));
        }
    }

    /// The view of `node`, made if new. A node first heard of since this node's start
    /// counts as asked then (its answer to that question may be on its way).
    fn view<'v>(&self, views: &'v mut HashMap<String, View>, node: &str) -> &'v mut View {
        views.entry(node.to_owned()).or_insert_with(|| {
            log::info!("hearing from node {node}");
            View::new(self.hello.get().copied())
        })
    }

    /// Wakes the `heartbeat` thread, if it runs (else its first tick sends what waits).
    fn nudge(&self) {
        if let Some((_, nudger)) = self.me.get() {
            nudger.nudge();
        }
    }
}

/// Other nodes' messages were lost on the way here: every socket is closed with 1012
/// after what it already has, so its client reconnects and resumes with `since`, which
/// reads the messages from the database. (Presence repairs itself: the next heartbeats'
/// digests differ and the state is asked for again.)
fn resume_everyone(app: &App) {
    let peers = app.hub.all_peers();
    log::warn!(
        "closing {} sockets so that they resume: notices from other nodes were missed",
        peers.len()
    );
    for p in peers {
        p.close_after_pending(
            crate::peer::close::RESUME,
            "missed updates; resume with since",
        );
    }
}

/// Sends `presence` frames for cluster-wide changes another node caused.
fn announce(app: &App, transitions: Vec<Transition>) {
    for t in transitions {
        let status = if t.online { "online" } else { "offline" };
        crate::presence::announce(app, &t.user, &t.room, status, t.tell);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(room: &str, user: &str, online: bool) -> PresenceChange {
        PresenceChange::new(room, user, online)
    }

    /// A view's digest follows its changes, a state replaces them room by room, and
    /// repeats change nothing.
    #[test]
    fn a_view_keeps_its_digest_and_reports_only_changes() {
        let mut v = View::new(None);
        assert!(v.set(change("r", "ann", true)).is_some());
        assert!(v.set(change("r", "ann", true)).is_none(), "a repeat");
        assert!(v.set(change("q", "bob", false)).is_none(), "not there");
        assert_eq!(v.digest, presence_digest("r", "ann"));
        let mut out = Vec::new();
        v.replace("r", vec!["bob".into(), "cat".into()], &mut out);
        let mut got: Vec<(String, bool)> = out.iter().map(|c| (c.user.clone(), c.online)).collect();
        got.sort();
        let want = [("ann", false), ("bob", true), ("cat", true)];
        assert_eq!(got, want.map(|(u, o)| (u.to_owned(), o)));
        let expect = presence_digest("r", "bob") ^ presence_digest("r", "cat");
        assert_eq!(v.digest, expect);
        let mut gone = v.offline();
        gone.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(gone, [change("r", "bob", false), change("r", "cat", false)]);
    }
}
