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

use crate::model::{Deleted, DirectMessage, Message};
use serde::{Deserialize, Serialize};

/// A change another node made that sockets here must hear about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
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
}

/// Where an engine hands the notices of other nodes; runs on the engine's listening
/// thread, so it must not block for long.
pub type Sink = Box<dyn Fn(Notice) + Send + Sync>;

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
}
