//! Who is connected and who is in which room.
//!
//! Delivery is elsewhere ([`crate::fanout`]): the hub only answers "which sockets?".
//! Walking a room's members happens under its lock but costs only a queue push per
//! socket (no system call), so a 1,000-way walk holds a join up for tens of
//! microseconds. Presence is per user: a user is online in a room while at least one of
//! their sockets is in it.
//!
//! A socket hears presence one of two ways, chosen when it joins ([`PresenceMode`]):
//! one `presence` frame per change, sent to the sockets in the room at that moment; or
//! batched — the hub keeps each room's changes since the last batch, and
//! [`crate::presence`] sends them as one frame every 250 ms at most. In a reconnect
//! storm of n users the first way costs n²/2 frames, the second about n × (storm
//! length / 250 ms).

use crate::online::OnlineList;
use crate::peer::{Peer, SocketKind};
use crate::sync::lock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How a socket in a room hears about presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMode {
    /// One `presence` frame per change.
    Each,
    /// `presence_batch` frames, coalesced per room.
    Batch,
}

#[derive(Default)]
struct RoomMembers {
    /// Every socket in the room (messages go to all).
    sockets: Vec<Arc<Peer>>,
    /// The sockets that want one frame per presence change.
    each: Vec<Arc<Peer>>,
    /// The sockets that take batches.
    batch: Vec<Arc<Peer>>,
    /// username → how many of the user's sockets are in the room.
    users: HashMap<String, usize>,
    /// The users in `users`, sorted and rendered for `joined` replies.
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
        self.each.clone()
    }
}

/// Rooms by name, and those with presence changes waiting for a batch.
#[derive(Default)]
struct Rooms {
    by_name: HashMap<String, RoomMembers>,
    dirty: HashSet<String>,
}

/// One room's presence changes since its last batch.
#[derive(Debug, PartialEq, Eq)]
pub struct PresenceBatch {
    /// The room.
    pub room: String,
    /// Users who came online, sorted.
    pub online: Vec<String>,
    /// Users who went offline, sorted.
    pub offline: Vec<String>,
}

/// Removes the socket with `id` from `list`; whether it was there.
fn remove_peer(list: &mut Vec<Arc<Peer>>, id: u64) -> bool {
    match list.iter().position(|p| p.id == id) {
        Some(at) => {
            list.swap_remove(at);
            true
        }
        None => false,
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
}

/// What joining a room changed.
pub struct Joined {
    /// Distinct usernames online in the room, the joiner included, sorted, as a JSON
    /// array.
    pub online_json: String,
    /// If this was the user's first socket in the room: the sockets (there at that
    /// moment) that hear one `presence` frame about it.
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
    /// the user's last socket in, who is left to hear `offline`.
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
        let mut rooms = lock(&self.rooms);
        let members = rooms.by_name.entry(room.to_owned()).or_default();
        let mut tell = None;
        if members.sockets.iter().any(|p| p.id == peer.id) {
            remove_peer(&mut members.each, peer.id);
            remove_peer(&mut members.batch, peer.id);
        } else {
            let count = members.users.entry(peer.username.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                members.online.insert(&peer.username);
                tell = Some(members.changed(&peer.username, true));
            }
            members.sockets.push(peer.clone());
        }
        match mode {
            PresenceMode::Each => members.each.push(peer.clone()),
            PresenceMode::Batch => members.batch.push(peer.clone()),
        }
        let online_json = members.online.json().to_owned();
        if !members.pending.is_empty() {
            rooms.dirty.insert(room.to_owned());
        }
        Joined { online_json, tell }
    }

    /// Removes `peer` from `room`. Returns `None` if it was not there; else, if it was
    /// the user's last socket in the room, who is left to hear `offline` now.
    pub fn leave(&self, peer: &Arc<Peer>, room: &str) -> Option<Option<Vec<Arc<Peer>>>> {
        let mut rooms = lock(&self.rooms);
        let members = rooms.by_name.get_mut(room)?;
        if !remove_peer(&mut members.sockets, peer.id) {
            return None;
        }
        remove_peer(&mut members.each, peer.id);
        remove_peer(&mut members.batch, peer.id);
        let last = match members.users.get_mut(&peer.username) {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        let mut tell = None;
        if last {
            members.users.remove(&peer.username);
            members.online.remove(&peer.username);
            tell = Some(members.changed(&peer.username, false));
        }
        let (empty, pending) = (members.sockets.is_empty(), !members.pending.is_empty());
        if empty {
            rooms.by_name.remove(room);
            rooms.dirty.remove(room);
        } else if pending {
            rooms.dirty.insert(room.to_owned());
        }
        Some(tell)
    }

    /// Takes every room's presence changes since the last call (rooms where nobody
    /// takes batches keep none).
    pub fn take_presence_batches(&self) -> Vec<PresenceBatch> {
        let mut rooms = lock(&self.rooms);
        let dirty = std::mem::take(&mut rooms.dirty);
        dirty
            .into_iter()
            .filter_map(|room| {
                let members = rooms.by_name.get_mut(&room)?;
                let pending = std::mem::take(&mut members.pending);
                let (online, offline): (Vec<_>, Vec<_>) = pending.into_iter().partition(|c| c.1);
                Some(PresenceBatch {
                    room,
                    online: online.into_iter().map(|c| c.0).collect(),
                    offline: offline.into_iter().map(|c| c.0).collect(),
                })
            })
            .collect()
    }

    /// Distinct users online in `room`.
    pub fn online_count(&self, room: &str) -> usize {
        lock(&self.rooms)
            .by_name
            .get(room)
            .map_or(0, |m| m.users.len())
    }

    /// Calls `f` on every socket in `room`, under the room lock: `f` must be quick
    /// and must not close or write a socket ([`Peer::queue`] is what it is for).
    pub fn for_each_in_room(&self, room: &str, f: impl FnMut(&Arc<Peer>)) {
        if let Some(members) = lock(&self.rooms).by_name.get(room) {
            members.sockets.iter().for_each(f);
        }
    }

    /// Like [`for_each_in_room`](Self::for_each_in_room), for the sockets of `room`
    /// that take presence batches.
    pub fn for_each_batch_taker(&self, room: &str, f: impl FnMut(&Arc<Peer>)) {
        if let Some(members) = lock(&self.rooms).by_name.get(room) {
            members.batch.iter().for_each(f);
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
