//! What one node tells the others, through the database they share.
//!
//! With one SQLite file there is one node and nothing to tell. On PostgreSQL several
//! nodes share the database, and each socket is held by one of them: a message
//! committed on node A must still reach the room's sockets on B and C. The engine
//! sends a [`Notice`] with the change itself — inside the transaction that stores a
//! message, a direct message or a deletion, so notices arrive in commit order, which
//! is id order — and hands the notices of other nodes to the sink given to
//! [`super::Store::listen`] ([`crate::cluster`] delivers them to the local sockets).
//! The JSON form here is the payload on the wire (PostgreSQL's `NOTIFY`).
//!
//! Presence is shared the same way, but not with a commit: each node tells the others
//! who is online in which room *on that node* ([`Notice::Presence`], sent when a
//! user's first socket here joins a room or their last one leaves it), answers a new
//! node's [`Notice::Hello`] with all of it ([`Notice::PresenceState`]), and says every
//! few seconds that it is alive, with a digest of what it has online
//! ([`Notice::Heartbeat`], [`presence_digest`]) so that a node whose view went stale (a
//! notice lost while its listener reconnected) notices and asks again. The transport
//! tells the sink which node sent a notice, so no notice carries its sender.

use crate::model::{Deleted, DirectMessage, Message};
use serde::{Deserialize, Serialize};

/// A change another node made that sockets here must hear about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// This node's listener was cut off from the database for a while, and notices
    /// other nodes sent meanwhile are gone (PostgreSQL keeps none for a session that
    /// is not listening). Never sent between nodes: the engine hands it to the sink
    /// when it listens again.
    #[serde(skip)]
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Missed,
    /// A room message was stored.
    Message {
        /// The message, as the room's sockets get it.
        message: Message,
    },
    /// A direct message was stored; it goes to every socket of both users (ids).
    Dm {
        /// The message.
        dm: DirectMessage,
        /// Sender's and recipient's ids.
        users: [i64; 2],
    },
    /// A room message was deleted.
    Deleted {
        /// What was deleted, by whom.
        deleted: Deleted,
    },
    /// A moderator kicked the user: close their sockets (4003).
    Kick {
        /// The user's id.
        user_id: i64,
    },
    /// An announcement, to every socket or to the holders of `roles`.
    Announce {
        /// The `announcement` frame's JSON text.
        frame: String,
        /// Only users holding one of these roles, if given.
        roles: Option<Vec<String>>,
    },
    /// Users came online or went offline in rooms on the sending node, in the order
    /// that node saw it happen.
    Presence {
        /// The changes, oldest first.
        changes: Vec<PresenceChange>,
    },
    /// Everyone the sending node has online, room by room: each listed room's users
    /// replace what the receiver knew of that room on that node. A state may take
    /// several notices (sent back to back); the one with `last` also clears the rooms
    /// none of them listed.
    PresenceState {
        /// Rooms and their online users on the sender.
        rooms: Vec<RoomPresence>,
        /// Whether this notice ends the state.
        last: bool,
    },
    /// The sending node is alive; `digest` is [`presence_digest`] over everything it
    /// has online (a receiver whose view of it differs asks for its state).
    Heartbeat {
        /// XOR of the digest of every (room, user) online on the sender.
        digest: u64,
    },
    /// Asks for [`Notice::PresenceState`]: from every node (a node that just started),
    /// or from the node `to` names (one whose view went stale).
    Hello {
        /// The node that should answer; every node if `None`.
        to: Option<String>,
    },
    /// The sending node is stopping: its users are no longer online there.
    Goodbye,
}

/// One user's presence change in one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceChange {
    /// The room.
    pub room: String,
    /// The username.
    pub user: String,
    /// Online now (else offline).
    pub online: bool,
}

impl PresenceChange {
    /// `user` went online (or offline) in `room`.
    pub fn new(room: &str, user: &str, online: bool) -> PresenceChange {
        PresenceChange {
            room: room.into(),
            user: user.into(),
            online,
        }
    }
}

/// One room's users online on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomPresence {
    /// The room.
    pub room: String,
    /// The usernames, in no particular order.
    pub users: Vec<String>,
}

/// The digest of one (room, user) pair: FNV-1a over the room, a 0xff byte (never in
/// UTF-8, so no two pairs run together alike) and the user. A set's digest is the XOR
/// of its pairs', so it is kept up to date by one XOR per change, on both sides. Fixed
/// here rather than taken from `std`, whose hasher may differ between builds: nodes of
/// two versions must agree.
pub fn presence_digest(room: &str, user: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = room.bytes().chain([0xff]).chain(user.bytes());
    bytes.fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Where an engine hands the notices of other nodes, with the id of the node that sent
/// each; runs on the engine's listening thread, so it must not block for long.
pub type Sink = Box<dyn Fn(&str, Notice) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form is tagged by `kind` and reads back as it was written.
    #[test]
    fn notices_round_trip_through_json() {
        let n = Notice::Deleted {
            deleted: Deleted {
                id: 7,
                room: "general".into(),
                by: "mod".into(),
            },
        };
        let text = serde_json::to_string(&n).unwrap();
        assert!(text.starts_with(r#"{"kind":"deleted""#), "{text}");
        assert_eq!(serde_json::from_str::<Notice>(&text).unwrap(), n);
    }

    /// The presence notices, `Goodbye` (no fields) included, read back as written.
    #[test]
    fn presence_notices_round_trip_through_json() {
        let notices = [
            Notice::Presence {
                changes: vec![PresenceChange {
                    room: "general".into(),
                    user: "ann".into(),
                    online: true,
                }],
            },
            Notice::PresenceState {
                rooms: vec![RoomPresence {
                    room: "general".into(),
                    users: vec!["ann".into()],
                }],
                last: true,
            },
            Notice::Heartbeat { digest: u64::MAX },
            Notice::Hello { to: None },
            Notice::Goodbye,
        ];
        for n in notices {
            let text = serde_json::to_string(&n).unwrap();
            assert_eq!(serde_json::from_str::<Notice>(&text).unwrap(), n, "{text}");
        }
    }

    /// Pairs differ in their digests, and the separator keeps `ab`+`c` apart from
    /// `a`+`bc`.
    #[test]
    fn digests_tell_pairs_apart() {
        assert_ne!(presence_digest("ab", "c"), presence_digest("a", "bc"));
        assert_ne!(
            presence_digest("general", "ann"),
            presence_digest("general", "bob")
        );
        assert_eq!(presence_digest("r", "u"), presence_digest("r", "u"));
    }
}
