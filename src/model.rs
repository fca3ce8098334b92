//! The wire objects (docs/reference.md) as Rust types, serialized with exactly those
//! field names: clients rely on them.

use serde::{Deserialize, Serialize};

/// An account as clients see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct User {
    /// Row id.
    pub id: i64,
    /// Unique (case-insensitively) name.
    pub username: String,
    /// Role names, sorted.
    pub roles: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
}

/// A room message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    /// Row id; grows monotonically and is never reused.
    pub id: i64,
    /// Room name.
    pub room: String,
    /// Sender's username.
    pub from: String,
    /// Text, 1–4000 characters.
    pub body: String,
    /// RFC 3339 time it was stored.
    pub ts: String,
    /// The sender's once-only key, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// A direct message between two users.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirectMessage {
    /// Row id (its own sequence, separate from room messages).
    pub id: i64,
    /// Sender's username.
    pub from: String,
    /// Recipient's username.
    pub to: String,
    /// Text, 1–4000 characters.
    pub body: String,
    /// RFC 3339 time it was stored.
    pub ts: String,
    /// The sender's once-only key, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// A room message deleted by a moderator (the socket's `deleted` event).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deleted {
    /// The message's id.
    pub id: i64,
    /// Its room.
    pub room: String,
    /// Who deleted it.
    pub by: String,
}

/// A user came online in a room or went offline (the socket's `presence` event).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Presence {
    /// Username.
    pub user: String,
    /// Room name.
    pub room: String,
    /// `online` or `offline`.
    pub status: &'static str,
}

/// What storing a message with a once-only key led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored<T> {
    /// Stored now.
    New(T),
    /// The sender already sent this `client_id`: nothing stored, the first message's id.
    Repeat(i64),
}

impl<T> Stored<T> {
    /// The message's id, new or first.
    pub fn id(&self) -> i64
    where
        T: HasId,
    {
        match self {
            Stored::New(m) => m.id(),
            Stored::Repeat(id) => *id,
        }
    }
}

/// Messages and DMs have ids.
pub trait HasId {
    /// The row id.
    fn id(&self) -> i64;
}

impl HasId for Message {
    fn id(&self) -> i64 {
        self.id
    }
}

impl HasId for DirectMessage {
    fn id(&self) -> i64 {
        self.id
    }
}

/// A room as stored (the live `online` count comes from the hub).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// Row id.
    pub id: i64,
    /// Name, 1–64 chars of `[a-z0-9_-]`.
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

/// Which slice of a history to return; see "Paging" in docs/socket.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Only ids below this.
    pub before: Option<i64>,
    /// Only ids above this; when set, the oldest `limit` are returned.
    pub after: Option<i64>,
    /// How many at most, already clamped to 1–200.
    pub limit: u32,
}

impl Page {
    /// Default `limit` when the client gives none.
    pub const DEFAULT_LIMIT: i64 = 50;
    /// Largest `limit`.
    pub const MAX_LIMIT: i64 = 200;

    /// A page with `limit` clamped to 1–200 (50 when absent).
    pub fn new(before: Option<i64>, after: Option<i64>, limit: Option<i64>) -> Page {
        let limit = limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .clamp(1, Self::MAX_LIMIT);
        Page {
            before,
            after,
            limit: limit as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Page;

    #[test]
    fn limit_is_clamped() {
        assert_eq!(Page::new(None, None, None).limit, 50);
        assert_eq!(Page::new(None, None, Some(0)).limit, 1);
        assert_eq!(Page::new(None, None, Some(-5)).limit, 1);
        assert_eq!(Page::new(None, None, Some(10_000)).limit, 200);
    }
}
