//! Who is connected and who is in which room.
//!
//! Delivery is elsewhere ([`crate::fanout`]): the hub only answers "which sockets?".
//! Walking a room's members happens under its lock but costs only a queue push per
//! socket (no system call), so a 1,000-way walk holds a join up for tens of
//! microseconds. Presence is per user: a user is online in a room while at least one of
//! their sockets is in it.
//!
//! A socket hears presence one of three ways, chosen when it joins ([`PresenceMode`]):
//! one `presence` frame per change, sent to the sockets in the room at that moment;
//! batched — the hub keeps each room's changes since the last batch, and
//! [`crate::presence`] sends them as one frame every 250 ms at most; or counted — the
//! socket hears only how many are online, at most once a second ([`COUNT_EVERY`]),
//! and pages the names when it wants them ([`Hub::online_page`]). In a reconnect
//! storm of n users the first way costs n²/2 frames; the second about
//! n × (storm length / 250 ms) frames, but they and the `joined` replies still carry
//! n²/2 names; the third carries no names at all, so a storm costs the same per
//! client however big the room.
//!
//! Nodes sharing a database ([`crate::cluster`]) share presence: a user is online in a
//! room while they have a socket in it on any node. Each room counts, beside its own
//! sockets' users, how many other nodes have each user online there (fed by
//! [`Hub::remote_changes`]), and its online list holds the users online anywhere; a
//! `presence` frame or batch entry is made only when a user's presence changes
//! cluster-wide. Once [`Hub::share`] was called, every change of a user's presence
//! *on this node* is queued, under the room lock and so in the order it happened, as a
//! notice for the other nodes; the socket thread that made it only wakes the
//! `heartbeat` thread, which sends what is queued ([`Hub::flush`]) — a storm's changes
//! leave in a few notices, and no socket thread waits on the store's queue for them.
//! On a lone node nothing is shared or counted: the join and leave paths cost what
//! they did.
//!
//! Threads: socket threads join and leave; the `fanout` and `presence` threads walk
//! rooms; the `pg-listen` and `heartbeat` threads count other nodes' users.

use crate::online::OnlineList;
use crate::peer::{Peer, SocketKind};
use crate::store::notice::{presence_digest, Notice, PresenceChange, RoomPresence};
use crate::sync::lock;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Most changes, or names, in one presence notice: a storm's changes leave in a few
/// notices of a size the transport carries easily (it splits what is long).
const NOTICE_NAMES: usize = 2000;

/// Where this node's presence notices go.
pub struct Outlet {
    /// Sends notices, in the order given (the store's `notify`).
    pub send: Box<dyn Fn(Vec<Notice>) + Send + Sync>,
    /// Called, with no lock held, when notices wait: whoever it wakes calls
    /// [`Hub::flush`].
    pub wake: Box<dyn Fn() + Send + Sync>,
}

/// How a socket in a room hears about presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMode {
    /// One `presence` frame per change.
    Each,
    /// `presence_batch` frames, coalesced per room.
    Batch,
    /// `presence_count` frames, coalesced per room; `joined` carries no names.
    Count,
}

#[derive(Default)]
struct RoomMembers {
    /// Every socket in the room (messages go to all).
    sockets: PeerSet,
    /// The sockets that want one frame per presence change.
    each: PeerSet,
    /// The sockets that take batches.
    batch: PeerSet,
    /// The sockets that take counts.
    count: PeerSet,
    /// Per socket that takes counts: the count it last heard, and when.
    counted: HashMap<u64, Counted>,
    /// Whether some socket that takes counts may not have heard the latest one
    /// (kept only while some socket takes counts).
    recount: bool,
    /// username → how many of the user's sockets are in the room.
    users: HashMap<String, usize>,
    /// username → how many other nodes have the user online in the room (empty on a
    /// lone node).
    remote: HashMap<String, usize>,
    /// The users online anywhere (in `users` or `remote`), sorted and rendered for
    /// `joined` replies.
    online: OnlineList,
    /// Changes not yet batched: username → online now (kept only while some socket
    /// takes batches).
    pending: BTreeMap<String, bool>,
}

impl RoomMembers {
    /// A user came online or went offline: tells the batch, returns who hears it now.
    fn changed(&mut self, user: &str, online: bool) -> Vec<Arc<Peer>> {
        if !self.batch.is_empty() {
            self.pending.insert(user.to_owned(), online);
        }
        self.recount |= !self.count.is_empty();
        self.each.to_vec()
    }

    /// Whether a batch or a count waits to be sent.
    fn waiting(&self) -> bool {
        !self.pending.is_empty() || self.recount
    }

    /// Takes `peer` out of the presence lists (not out of the room).
    fn unlist(&mut self, id: u64) {
        self.each.remove(id);
        self.batch.remove(id);
        self.count.remove(id);
        self.counted.remove(&id);
    }

    /// The sockets whose turn for a count has come (they last heard one at least
    /// [`COUNT_EVERY`] ago) and whose count is out of date; marks them as told now.
    /// Keeps `recount` while some socket waits for its turn.
    fn take_count(&mut self, now: Instant) -> Option<(usize, Vec<Arc<Peer>>)> {
        let n = self.online.len();
        let (mut due, mut waiting) = (Vec::new(), false);
        for peer in self.count.iter() {
            let Some(c) = self.counted.get_mut(&peer.id) else {
                continue;
            };
            if c.heard == n {
                continue;
            }
            if now.duration_since(c.at) < COUNT_EVERY {
                waiting = true;
                continue;
            }
            *c = Counted { heard: n, at: now };
            due.push(peer.clone());
        }
        self.recount = waiting;
        (!due.is_empty()).then_some((n, due))
    }

    /// Whether nothing keeps the room: no socket here, nobody online elsewhere.
    fn unused(&self) -> bool {
        self.sockets.is_empty() && self.remote.is_empty()
    }
}

/// Rooms by name, and those with presence changes waiting for a batch.
#[derive(Default)]
struct Rooms {
    by_name: HashMap<String, RoomMembers>,
    dirty: HashSet<String>,
    /// What the other nodes are to hear; `None` until [`Hub::share`] (and on a lone
    /// node, for good).
    shared: Option<Shared>,
}

/// This node's presence as the other nodes are told it.
#[derive(Default)]
struct Shared {
    /// Notices not yet handed to the outlet, oldest first.
    outbox: Vec<Notice>,
    /// [`presence_digest`] of every (room, user) online on this node.
    digest: u64,
}

impl Shared {
    /// A user's presence on this node changed in `room`.
    fn changed(&mut self, room: &str, user: &str, online: bool) {
        self.digest ^= presence_digest(room, user);
        let change = PresenceChange::new(room, user, online);
        if let Some(Notice::Presence { changes }) = self.outbox.last_mut() {
            if changes.len() < NOTICE_NAMES {
                changes.push(change);
                return;
            }
        }
        self.outbox.push(Notice::Presence {
            changes: vec![change],
        });
    }
}

/// A user came online or went offline cluster-wide because of another node.
pub struct Transition {
    /// The room.
    pub room: String,
    /// The username.
    pub user: String,
    /// Online now (else offline).
    pub online: bool,
    /// The sockets here that hear one `presence` frame about it.
    pub tell: Vec<Arc<Peer>>,
}

/// The shortest time between two `presence_count` frames to one socket in one room,
/// and from its `joined` (which carries the count) to its first. A count is a figure
/// on a screen; in a storm each one sent is a frame to a socket that has just been
/// told.
pub const COUNT_EVERY: Duration = Duration::from_secs(1);

/// What a socket that takes counts last heard of a room's count, and when.
struct Counted {
    heard: usize,
    at: Instant,
}

/// One room's presence changes since its last batch.
pub struct PresenceBatch {
    /// The room.
    pub room: String,
    /// Users who came online, sorted (empty when nobody takes batches).
    pub online: Vec<String>,
    /// Users who went offline, sorted.
    pub offline: Vec<String>,
    /// The room's online count, and the sockets whose turn it is to hear it.
    pub count: Option<(usize, Vec<Arc<Peer>>)>,
}

/// Sockets in the order fan-out walks them, with each one's place by id, so that
/// joining, leaving and "already here?" cost the same in a room of 5 or of 5,000 (a
/// scan of the list made every join of a storm look at half the room).
#[derive(Default)]
struct PeerSet {
    peers: Vec<Arc<Peer>>,
    /// peer id → its index in `peers`.
    at: HashMap<u64, usize>,
}

impl PeerSet {
    fn contains(&self, id: u64) -> bool {
        self.at.contains_key(&id)
    }

    /// Adds `peer` unless a peer with its id is there.
    fn insert(&mut self, peer: &Arc<Peer>) {
        if let Entry::Vacant(slot) = self.at.entry(peer.id) {
            slot.insert(self.peers.len());
            self.peers.push(peer.clone());
        }
    }

    /// Removes the peer with `id`; false if it was not there.
    fn remove(&mut self, id: u64) -> bool {
        let Some(index) = self.at.remove(&id) else {
            return false;
        };
        self.peers.swap_remove(index);
        // The last peer took the removed one's place.
        if let Some(moved) = self.peers.get(index) {
            self.at.insert(moved.id, index);
        }
        true
    }

    fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, Arc<Peer>> {
        self.peers.iter()
    }

    fn to_vec(&self) -> Vec<Arc<Peer>> {
        self.peers.clone()
    }
}

#[derive(Default)]
struct Sockets {
    by_id: HashMap<u64, Arc<Peer>>,
    by_user: HashMap<i64, Vec<Arc<Peer>>>,
    /// Upgrades admitted but not yet registered, per user, so limits hold under races.
    reserved: HashMap<i64, usize>,
    /// Threads of the sockets open and reserved ([`SocketKind::threads`]).
    threads: usize,
}

/// Why an upgrade was refused a socket slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// `--max-sockets` reached.
    Total,
    /// `--max-sockets-per-user` reached.
    PerUser,
}

/// Rooms, sessions and fan-out.
pub struct Hub {
    sockets: Mutex<Sockets>,
    rooms: Mutex<Rooms>,
    next_id: AtomicU64,
    /// `--max-sockets` in threads: a chat socket's one each.
    max_threads: usize,
    max_per_user: usize,
    /// Where presence notices go, once [`share`](Self::share) was called.
    outlet: OnceLock<Outlet>,
    /// Held while notices are taken from the outbox and handed to the outlet, so they
    /// leave in the order they were queued.
    sending: Mutex<()>,
}

/// What joining a room changed.
pub struct Joined {
    /// Distinct usernames online in the room (on any node), the joiner included,
    /// sorted, as a JSON array; `None` for a socket that takes counts.
    pub online_json: Option<String>,
    /// How many those are.
    pub online_count: usize,
    /// If the user was online nowhere before (this is their first socket in the room,
    /// and no other node has them there): the sockets (there at that moment) that hear
    /// one `presence` frame about it.
    pub tell: Option<Vec<Arc<Peer>>>,
}

impl Hub {
    /// An empty hub with the socket limits.
    pub fn new(max_sockets: usize, max_per_user: usize) -> Hub {
        Hub {
            sockets: Mutex::new(Sockets::default()),
            rooms: Mutex::new(Rooms::default()),
            next_id: AtomicU64::new(1),
            max_threads: max_sockets.saturating_mul(SocketKind::Chat.threads()),
            max_per_user,
            outlet: OnceLock::new(),
            sending: Mutex::new(()),
        }
    }

    /// A fresh socket id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a socket slot for `user_id` before the upgrade; undo with
    /// [`unreserve`](Self::unreserve) or turn into a socket with [`register`](Self::register).
    ///
    /// `--max-sockets` is counted in threads, the resource it protects: a GraphQL
    /// socket (2 threads) takes two chat sockets' (1 thread) share.
    pub fn reserve(&self, user_id: i64, kind: SocketKind) -> Result<(), LimitHit> {
        let mut s = lock(&self.sockets);
        // The first socket always fits, so a tiny cap still admits a GraphQL socket.
        if s.threads > 0 && s.threads + kind.threads() > self.max_threads {
            return Err(LimitHit::Total);
        }
        let mine = s.by_user.get(&user_id).map_or(0, Vec::len)
            + s.reserved.get(&user_id).copied().unwrap_or(0);
        if mine >= self.max_per_user {
            return Err(LimitHit::PerUser);
        }
        *s.reserved.entry(user_id).or_default() += 1;
        s.threads += kind.threads();
        Ok(())
    }

    /// Gives back a reserved slot whose upgrade failed.
    pub fn unreserve(&self, user_id: i64, kind: SocketKind) {
        let mut s = lock(&self.sockets);
        if Self::take_reservation(&mut s, user_id) {
            s.threads = s.threads.saturating_sub(kind.threads());
        }
    }

    /// Drops one of the user's reservations; false if there was none.
    fn take_reservation(s: &mut Sockets, user_id: i64) -> bool {
        let Some(n) = s.reserved.get_mut(&user_id) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            s.reserved.remove(&user_id);
        }
        true
    }

    /// Turns a reservation into a live socket.
    pub fn register(&self, peer: Arc<Peer>) {
        let mut s = lock(&self.sockets);
        if !Self::take_reservation(&mut s, peer.user_id) {
            s.threads += peer.kind.threads();
        }
        s.by_user
            .entry(peer.user_id)
            .or_default()
            .push(peer.clone());
        s.by_id.insert(peer.id, peer);
    }

    /// Removes a socket from its rooms and the registry; returns, for each room it was
    /// the user's last socket in (and no other node has them there), who is left to
    /// hear `offline`.
    pub fn unregister(&self, peer: &Arc<Peer>, rooms: &[String]) -> Vec<(String, Vec<Arc<Peer>>)> {
        let gone = rooms
            .iter()
            .filter_map(|room| Some((room.clone(), self.leave(peer, room)??)))
            .collect();
        let mut s = lock(&self.sockets);
        if s.by_id.remove(&peer.id).is_some() {
            s.threads = s.threads.saturating_sub(peer.kind.threads());
        }
        if let Some(list) = s.by_user.get_mut(&peer.user_id) {
            list.retain(|p| p.id != peer.id);
            if list.is_empty() {
                s.by_user.remove(&peer.user_id);
            }
        }
        gone
    }

    /// Open sockets.
    pub fn socket_count(&self) -> usize {
        lock(&self.sockets).by_id.len()
    }

    /// Every open socket.
    pub fn all_peers(&self) -> Vec<Arc<Peer>> {
        lock(&self.sockets).by_id.values().cloned().collect()
    }

    /// The sockets of one user.
    pub fn user_peers(&self, user_id: i64) -> Vec<Arc<Peer>> {
        lock(&self.sockets)
            .by_user
            .get(&user_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Adds `peer` to `room`, hearing presence as `mode` says. Joining again is
    /// harmless (and may change the mode).
    pub fn join(&self, peer: &Arc<Peer>, room: &str, mode: PresenceMode) -> Joined {
        let (joined, queued) = self.join_locked(peer, room, mode);
        if queued {
            self.wake();
        }
        joined
    }

    /// [`join`](Self::join) under the room lock; also says whether a notice was queued.
    fn join_locked(&self, peer: &Arc<Peer>, room: &str, mode: PresenceMode) -> (Joined, bool) {
        let mut guard = lock(&self.rooms);
        let Rooms {
            by_name,
            dirty,
            shared,
        } = &mut *guard;
        let members = by_name.entry(room.to_owned()).or_default();
        let (mut tell, mut queued) = (None, false);
        if members.sockets.contains(peer.id) {
            members.unlist(peer.id);
        } else {
            let count = members.users.entry(peer.username.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                if let Some(shared) = shared.as_mut() {
                    shared.changed(room, &peer.username, true);
                    queued = true;
                }
                // Online elsewhere already: nothing changes for anyone in the room.
                if !members.remote.contains_key(&peer.username) {
                    members.online.insert(&peer.username);
                    tell = Some(members.changed(&peer.username, true));
                }
            }
            members.sockets.insert(peer);
        }
        match mode {
            PresenceMode::Each => members.each.insert(peer),
            PresenceMode::Batch => members.batch.insert(peer),
            PresenceMode::Count => {
                members.count.insert(peer);
                // Its `joined` carries the count: that is the count it heard now.
                let heard = members.online.len();
                let at = Instant::now();
                members.counted.insert(peer.id, Counted { heard, at });
            }
        }
        // A big room's list is most of the join's cost: copied only for those who
        // want it.
        let online_json = (mode != PresenceMode::Count).then(|| members.online.json().to_owned());
        let online_count = members.online.len();
        if members.waiting() {
            dirty.insert(room.to_owned());
        }
        let joined = Joined {
            online_json,
            online_count,
            tell,
        };
        (joined, queued)
    }

    /// Removes `peer` from `room`. Returns `None` if it was not there; else, if it was
    /// the user's last socket in the room and no other node has them there, who is
    /// left to hear `offline` now.
    pub fn leave(&self, peer: &Arc<Peer>, room: &str) -> Option<Option<Vec<Arc<Peer>>>> {
        let (tell, queued) = self.leave_locked(peer, room)?;
        if queued {
            self.wake();
        }
        Some(tell)
    }

    /// [`leave`](Self::leave) under the room lock; also says whether a notice was
    /// queued.
    fn leave_locked(&self, peer: &Arc<Peer>, room: &str) -> Option<(Option<Vec<Arc<Peer>>>, bool)> {
        let mut guard = lock(&self.rooms);
        let Rooms {
            by_name,
            dirty,
            shared,
        } = &mut *guard;
        let members = by_name.get_mut(room)?;
        if !members.sockets.remove(peer.id) {
            return None;
        }
        members.unlist(peer.id);
        let last = match members.users.get_mut(&peer.username) {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        let (mut tell, mut queued) = (None, false);
        if last {
            members.users.remove(&peer.username);
            if let Some(shared) = shared.as_mut() {
                shared.changed(room, &peer.username, false);
                queued = true;
            }
            if !members.remote.contains_key(&peer.username) {
                members.online.remove(&peer.username);
                tell = Some(members.changed(&peer.username, false));
            }
        }
        let pending = members.waiting();
        if members.unused() {
            by_name.remove(room);
            dirty.remove(room);
        } else if pending {
            dirty.insert(room.to_owned());
        }
        Some((tell, queued))
    }

    /// Starts telling the other nodes about presence on this node: from now on every
    /// change is queued for `outlet`, as are [`share_presence`](Self::share_presence)'s
    /// state and heartbeats. Called once, before sockets come (a second call changes
    /// nothing).
    pub fn share(&self, outlet: Outlet) {
        if self.outlet.set(outlet).is_err() {
            return;
        }
        let mut rooms = lock(&self.rooms);
        let digest = rooms
            .by_name
            .iter()
            .flat_map(|(room, m)| m.users.keys().map(move |u| presence_digest(room, u)))
            .fold(0, |all, d| all ^ d);
        rooms.shared = Some(Shared {
            outbox: Vec::new(),
            digest,
        });
    }

    /// Queues for the other nodes everything online here (if `state`), then a
    /// heartbeat with its digest; both in order with the changes around them, and sent
    /// by the next [`flush`](Self::flush). Nothing before [`share`](Self::share).
    pub fn share_presence(&self, state: bool) {
        let mut guard = lock(&self.rooms);
        let Rooms {
            by_name, shared, ..
        } = &mut *guard;
        let Some(shared) = shared.as_mut() else {
            return;
        };
        if state {
            shared.outbox.extend(state_notices(by_name));
        }
        shared.outbox.push(Notice::Heartbeat {
            digest: shared.digest,
        });
    }

    /// Hands what the outbox holds to the outlet, with no room lock held (the outlet
    /// may wait for room in the store's queue).
    pub fn flush(&self) {
        let Some(outlet) = self.outlet.get() else {
            return;
        };
        let _turn = lock(&self.sending);
        let notices = lock(&self.rooms)
            .shared
            .as_mut()
            .map(|s| std::mem::take(&mut s.outbox))
            .unwrap_or_default();
        if !notices.is_empty() {
            (outlet.send)(notices);
        }
    }

    /// Tells the outlet that notices wait.
    fn wake(&self) {
        if let Some(outlet) = self.outlet.get() {
            (outlet.wake)();
        }
    }

    /// Counts other nodes' presence: each change is one node more (`online`) or fewer
    /// where the user is online in the room. Returns the changes that made a user
    /// online or offline cluster-wide, in order, with who hears each (batches are
    /// kept as for local changes).
    pub fn remote_changes(&self, changes: Vec<PresenceChange>) -> Vec<Transition> {
        let mut guard = lock(&self.rooms);
        changes
            .into_iter()
            .filter_map(|c| count_remote(&mut guard, c))
            .collect()
    }

    /// Takes every room's presence changes since the last call, and each room's
    /// online count with the sockets due to hear it (see [`COUNT_EVERY`]; rooms where
    /// nobody takes batches or counts keep none).
    pub fn take_presence_batches(&self) -> Vec<PresenceBatch> {
        let now = Instant::now();
        let mut guard = lock(&self.rooms);
        let Rooms { by_name, dirty, .. } = &mut *guard;
        let mut batches = Vec::new();
        dirty.retain(|room| {
            let Some(members) = by_name.get_mut(room) else {
                return false;
            };
            let pending = std::mem::take(&mut members.pending);
            let count = if members.recount {
                members.take_count(now)
            } else {
                None
            };
            if !pending.is_empty() || count.is_some() {
                let (online, offline): (Vec<_>, Vec<_>) = pending.into_iter().partition(|c| c.1);
                batches.push(PresenceBatch {
                    room: room.clone(),
                    online: online.into_iter().map(|c| c.0).collect(),
                    offline: offline.into_iter().map(|c| c.0).collect(),
                    count,
                });
            }
            members.recount
        });
        batches
    }

    /// Distinct users online in `room`, on any node.
    pub fn online_count(&self, room: &str) -> usize {
        lock(&self.rooms)
            .by_name
            .get(room)
            .map_or(0, |m| m.online.len())
    }

    /// Up to `limit` of the users online in `room` (on any node), in name order,
    /// starting after `after`.
    pub fn online_page(&self, room: &str, after: Option<&str>, limit: usize) -> Vec<String> {
        lock(&self.rooms)
            .by_name
            .get(room)
            .map_or_else(Vec::new, |m| m.online.page(after, limit))
    }

    /// Calls `f` on every socket in `room`, under the room lock: `f` must be quick
    /// and must not close or write a socket ([`Peer::queue`] is what it is for).
    pub fn for_each_in_room(&self, room: &str, f: impl FnMut(&Arc<Peer>)) {
        if let Some(members) = lock(&self.rooms).by_name.get(room) {
            members.sockets.iter().for_each(f);
        }
    }

    /// Like [`for_each_in_room`](Self::for_each_in_room), for the sockets of `room`
    /// that hear presence as `mode` says.
    pub fn for_each_taker(&self, room: &str, mode: PresenceMode, f: impl FnMut(&Arc<Peer>)) {
        if let Some(members) = lock(&self.rooms).by_name.get(room) {
            let takers = match mode {
                PresenceMode::Each => &members.each,
                PresenceMode::Batch => &members.batch,
                PresenceMode::Count => &members.count,
            };
            takers.iter().for_each(f);
        }
    }

    /// Closes every socket of `user_id` with `code`.
    pub fn close_user(&self, user_id: i64, code: u16, reason: &str) {
        for p in self.user_peers(user_id) {
            p.close(code, reason);
        }
    }

    /// Closes every socket of login `sid` with `code`.
    pub fn close_session(&self, sid: &str, code: u16, reason: &str) {
        for p in self.all_peers().into_iter().filter(|p| p.sid() == sid) {
            p.close(code, reason);
        }
    }
}

/// One remote change counted in `rooms` (see [`Hub::remote_changes`]).
fn count_remote(rooms: &mut Rooms, c: PresenceChange) -> Option<Transition> {
    let members = if c.online {
        rooms.by_name.entry(c.room.clone()).or_default()
    } else {
        rooms.by_name.get_mut(&c.room)?
    };
    let transition = if c.online {
        let n = members.remote.entry(c.user.clone()).or_insert(0);
        *n += 1;
        *n == 1 && !members.users.contains_key(&c.user)
    } else {
        let n = members.remote.get_mut(&c.user)?;
        *n -= 1;
        if *n == 0 {
            members.remote.remove(&c.user);
        }
        !members.remote.contains_key(&c.user) && !members.users.contains_key(&c.user)
    };
    let tell = transition.then(|| {
        if c.online {
            members.online.insert(&c.user);
        } else {
            members.online.remove(&c.user);
        }
        members.changed(&c.user, c.online)
    });
    let pending = members.waiting();
    if members.unused() {
        rooms.by_name.remove(&c.room);
        rooms.dirty.remove(&c.room);
    } else if pending {
        rooms.dirty.insert(c.room.clone());
    }
    tell.map(|tell| Transition {
        room: c.room,
        user: c.user,
        online: c.online,
        tell,
    })
}

/// Everything online on this node, as [`Notice::PresenceState`]s of about
/// [`NOTICE_NAMES`] names each (a room is never split); the last says so.
fn state_notices(by_name: &HashMap<String, RoomMembers>) -> Vec<Notice> {
    let (mut notices, mut rooms, mut names) = (Vec::new(), Vec::new(), 0);
    for (room, members) in by_name.iter().filter(|(_, m)| !m.users.is_empty()) {
        names += members.users.len();
        rooms.push(RoomPresence {
            room: room.clone(),
            users: members.users.keys().cloned().collect(),
        });
        if names >= NOTICE_NAMES {
            let rooms = std::mem::take(&mut rooms);
            notices.push(Notice::PresenceState { rooms, last: false });
            names = 0;
        }
    }
    notices.push(Notice::PresenceState { rooms, last: true });
    notices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(room: &str, user: &str, online: bool) -> PresenceChange {
        PresenceChange::new(room, user, online)
    }

    /// A user online on two other nodes goes offline cluster-wide only when both let
    /// go, and a room nobody is in is forgotten.
    #[test]
    fn remote_users_count_per_node_and_transitions_are_cluster_wide() {
        let hub = Hub::new(10, 10);
        let t = hub.remote_changes(vec![change("r", "ann", true), change("r", "ann", true)]);
        assert_eq!(t.len(), 1);
        assert!(t[0].online && t[0].user == "ann" && t[0].tell.is_empty());
        assert_eq!(hub.online_count("r"), 1);
        assert!(hub
            .remote_changes(vec![change("r", "ann", false)])
            .is_empty());
        let t = hub.remote_changes(vec![change("r", "ann", false)]);
        assert_eq!((t.len(), t[0].online), (1, false));
        assert_eq!(hub.online_count("r"), 0);
        assert!(
            lock(&hub.rooms).by_name.is_empty(),
            "an unused room is dropped"
        );
        // An offline for someone never counted changes nothing.
        assert!(hub
            .remote_changes(vec![change("q", "bob", false)])
            .is_empty());
        assert!(lock(&hub.rooms).by_name.is_empty());
    }

    /// Removing a peer moves the last one into its place; every peer is still found,
    /// and removed, by its id afterwards.
    #[test]
    fn a_peer_set_keeps_each_peer_findable_after_removals() {
        let flusher = crate::peer::Flusher::start().unwrap();
        let peers: Vec<_> = (1..=4)
            .map(|id| crate::peer::tests::peer_pair(id, &flusher, 8))
            .collect();
        let mut set = PeerSet::default();
        for (p, _) in &peers {
            set.insert(p);
        }
        set.insert(&peers[0].0);
        assert_eq!(set.iter().count(), 4, "a second insert adds nothing");
        assert!(set.remove(1));
        assert!(!set.remove(1) && !set.contains(1));
        assert!(set.remove(4), "the peer moved into the freed place");
        assert!(set.contains(2) && set.contains(3));
        let ids: Vec<u64> = set.iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(set.remove(2) && set.remove(3) && set.is_empty());
        flusher.stop();
    }

    /// Before `share` nothing is sent; after it, a state request yields the (empty)
    /// state and a heartbeat with the digest of nothing.
    #[test]
    fn shared_presence_goes_out_in_order() {
        let hub = Hub::new(10, 10);
        hub.share_presence(true);
        hub.flush();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s = sent.clone();
        hub.share(Outlet {
            send: Box::new(move |n| lock(&s).extend(n)),
            wake: Box::new(|| {}),
        });
        hub.share_presence(true);
        assert!(lock(&sent).is_empty(), "sent at the next flush");
        hub.flush();
        assert_eq!(
            *lock(&sent),
            vec![
                Notice::PresenceState {
                    rooms: Vec::new(),
                    last: true
                },
                Notice::Heartbeat { digest: 0 }
            ]
        );
    }

    /// A state longer than one notice's worth of names is split, between rooms.
    #[test]
    fn a_big_state_is_split_between_rooms() {
        let mut by_name = HashMap::new();
        for r in 0..3 {
            let mut m = RoomMembers::default();
            for u in 0..NOTICE_NAMES {
                m.users.insert(format!("u{u}"), 1);
            }
            by_name.insert(format!("r{r}"), m);
        }
        let notices = state_notices(&by_name);
        let lasts: Vec<bool> = notices
            .iter()
            .map(|n| match n {
                Notice::PresenceState { last, .. } => *last,
                _ => panic!("{n:?}"),
            })
            .collect();
        assert_eq!(lasts, [false, false, false, true]);
    }
}
