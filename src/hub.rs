//! Who is connected, who is in which room, and fan-out.
//!
//! Room member lists are copy-on-write (`Arc<[Arc<Peer>]>`): a broadcast clones the
//! list's pointer under a short lock and then writes to each peer without holding
//! anything, so a 1,000-way fan-out never blocks a join (NOTES.md). Presence is per
//! user: a user is online in a room while at least one of their sockets is in it.

use crate::peer::{Frame, Peer};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
struct RoomMembers {
    sockets: Arc<[Arc<Peer>]>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn presence(user: &str, room: &str, status: &str) -> Frame {
    let v = json!({"type": "presence", "user": user, "room": room, "status": status});
    crate::peer::text_frame(&v.to_string())
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

    /// Removes a socket from its rooms and the registry.
    pub fn unregister(&self, peer: &Arc<Peer>, rooms: &[String]) {
        for room in rooms {
            self.leave(peer, room);
        }
        let mut s = lock(&self.sockets);
        s.by_id.remove(&peer.id);
        if let Some(list) = s.by_user.get_mut(&peer.user_id) {
            list.retain(|p| p.id != peer.id);
            if list.is_empty() {
                s.by_user.remove(&peer.user_id);
            }
        }
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

    /// Adds `peer` to `room`; returns the online usernames (the joiner included).
    /// Others hear `presence online` if this is the user's first socket in the room.
    pub fn join(&self, peer: &Arc<Peer>, room: &str) -> Vec<String> {
        let (online, others) = {
            let mut rooms = lock(&self.rooms);
            let members = rooms.entry(room.to_owned()).or_default();
            let entry = members
                .users
                .entry(peer.user_id)
                .or_insert_with(|| (peer.username.clone(), 0));
            entry.1 += 1;
            let first = entry.1 == 1;
            let others = first.then(|| members.sockets.clone());
            let mut list: Vec<Arc<Peer>> = members.sockets.iter().cloned().collect();
            list.push(peer.clone());
            members.sockets = list.into();
            let mut online: Vec<String> = members.users.values().map(|u| u.0.clone()).collect();
            online.sort();
            (online, others)
        };
        if let Some(others) = others {
            let frame = presence(&peer.username, room, "online");
            for p in others.iter().filter(|p| p.id != peer.id) {
                p.send(&frame);
            }
        }
        online
    }

    /// Removes `peer` from `room`; returns whether it was there. Others hear
    /// `presence offline` when the user's last socket leaves.
    pub fn leave(&self, peer: &Arc<Peer>, room: &str) -> bool {
        let remaining = {
            let mut rooms = lock(&self.rooms);
            let Some(members) = rooms.get_mut(room) else {
                return false;
            };
            if !members.sockets.iter().any(|p| p.id == peer.id) {
                return false;
            }
            members.sockets = members
                .sockets
                .iter()
                .filter(|p| p.id != peer.id)
                .cloned()
                .collect::<Vec<_>>()
                .into();
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
            let remaining = last.then(|| members.sockets.clone());
            if members.sockets.is_empty() {
                rooms.remove(room);
            }
            remaining
        };
        if let Some(others) = remaining {
            let frame = presence(&peer.username, room, "offline");
            for p in others.iter() {
                p.send(&frame);
            }
        }
        true
    }

    /// Distinct users online in `room`.
    pub fn online_count(&self, room: &str) -> usize {
        lock(&self.rooms).get(room).map_or(0, |m| m.users.len())
    }

    /// The sockets in `room` now (a snapshot; the lock is held only to copy a pointer).
    pub fn room_sockets(&self, room: &str) -> Arc<[Arc<Peer>]> {
        lock(&self.rooms)
            .get(room)
            .map(|m| m.sockets.clone())
            .unwrap_or_else(|| Arc::from(Vec::new()))
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
