//! Who is connected and who is in which room.
//!
//! Delivery is elsewhere ([`crate::fanout`]): the hub only answers "which sockets?".
//! Walking a room's members happens under its lock but costs only a queue push per
//! socket (no system call), so a 1,000-way walk holds a join up for tens of
//! microseconds, and joins never copy the member list. Presence is per user: a user
//! is online in a room while at least one of their sockets is in it.

use crate::peer::Peer;
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct RoomMembers {
    sockets: Vec<Arc<Peer>>,
    /// user id → (username, how many of their sockets are in the room)
    users: HashMap<i64, (String, usize)>,
}

#[derive(Default)]
struct Sockets {
    by_id: HashMap<u64, Arc<Peer>>,
    by_user: HashMap<i64, Vec<Arc<Peer>>>,
    /// Upgrades admitted but not yet registered, per user, so limits hold under races.
    reserved: HashMap<i64, usize>,
    reserved_total: usize,
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
    rooms: Mutex<HashMap<String, RoomMembers>>,
    next_id: AtomicU64,
    max_sockets: usize,
    max_per_user: usize,
}

/// What joining a room changed.
pub struct Joined {
    /// Distinct usernames online in the room, the joiner included, sorted.
    pub online: Vec<String>,
    /// If this was the user's first socket in the room: who was there to hear it.
    pub tell: Option<Vec<Arc<Peer>>>,
}

impl Hub {
    /// An empty hub with the socket limits.
    pub fn new(max_sockets: usize, max_per_user: usize) -> Hub {
        Hub {
            sockets: Mutex::new(Sockets::default()),
            rooms: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            max_sockets,
            max_per_user,
        }
    }

    /// A fresh socket id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a socket slot for `user_id` before the upgrade; undo with
    /// [`unreserve`](Self::unreserve) or turn into a socket with [`register`](Self::register).
    pub fn reserve(&self, user_id: i64) -> Result<(), LimitHit> {
        let mut s = lock(&self.sockets);
        if s.by_id.len() + s.reserved_total >= self.max_sockets {
            return Err(LimitHit::Total);
        }
        let mine = s.by_user.get(&user_id).map_or(0, Vec::len)
            + s.reserved.get(&user_id).copied().unwrap_or(0);
        if mine >= self.max_per_user {
            return Err(LimitHit::PerUser);
        }
        *s.reserved.entry(user_id).or_default() += 1;
        s.reserved_total += 1;
        Ok(())
    }

    /// Gives back a reserved slot whose upgrade failed.
    pub fn unreserve(&self, user_id: i64) {
        let mut s = lock(&self.sockets);
        Self::take_reservation(&mut s, user_id);
    }

    fn take_reservation(s: &mut Sockets, user_id: i64) {
        if let Some(n) = s.reserved.get_mut(&user_id) {
            *n -= 1;
            if *n == 0 {
                s.reserved.remove(&user_id);
            }
            s.reserved_total -= 1;
        }
    }

    /// Turns a reservation into a live socket.
    pub fn register(&self, peer: Arc<Peer>) {
        let mut s = lock(&self.sockets);
        Self::take_reservation(&mut s, peer.user_id);
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
        s.by_id.remove(&peer.id);
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

    /// Adds `peer` to `room` (joining twice is harmless).
    pub fn join(&self, peer: &Arc<Peer>, room: &str) -> Joined {
        let mut rooms = lock(&self.rooms);
        let members = rooms.entry(room.to_owned()).or_default();
        let mut tell = None;
        if !members.sockets.iter().any(|p| p.id == peer.id) {
            let entry = members
                .users
                .entry(peer.user_id)
                .or_insert_with(|| (peer.username.clone(), 0));
            entry.1 += 1;
            // Presence is about who was there when it happened, so copy the list now
            // (only on a user's first socket, not on every join).
            if entry.1 == 1 {
                tell = Some(members.sockets.clone());
            }
            members.sockets.push(peer.clone());
        }
        let names: Vec<String> = members.users.values().map(|u| u.0.clone()).collect();
        // Heapsort, in place and without recursion: the slice sorts keep scratch space
        // on the stack, and a socket thread's deepest stack page stays resident for
        // the socket's whole life.
        let online = std::collections::BinaryHeap::from(names).into_sorted_vec();
        Joined { online, tell }
    }

    /// Removes `peer` from `room`. Returns `None` if it was not there; else, if it was
    /// the user's last socket in the room, who is left to hear `offline`.
    pub fn leave(&self, peer: &Arc<Peer>, room: &str) -> Option<Option<Vec<Arc<Peer>>>> {
        let mut rooms = lock(&self.rooms);
        let members = rooms.get_mut(room)?;
        let at = members.sockets.iter().position(|p| p.id == peer.id)?;
        members.sockets.swap_remove(at);
        let last = match members.users.get_mut(&peer.user_id) {
            Some(u) => {
                u.1 -= 1;
                u.1 == 0
            }
            None => false,
        };
        if last {
            members.users.remove(&peer.user_id);
        }
        let tell = last.then(|| members.sockets.clone());
        if members.sockets.is_empty() {
            rooms.remove(room);
        }
        Some(tell)
    }

    /// Distinct users online in `room`.
    pub fn online_count(&self, room: &str) -> usize {
        lock(&self.rooms).get(room).map_or(0, |m| m.users.len())
    }

    /// Calls `f` on every socket in `room`, under the room lock: `f` must be quick
    /// and must not close or write a socket ([`Peer::queue`] is what it is for).
    pub fn for_each_in_room(&self, room: &str, mut f: impl FnMut(&Arc<Peer>)) {
        if let Some(members) = lock(&self.rooms).get(room) {
            members.sockets.iter().for_each(&mut f);
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
