//! Rooms, room messages and direct messages.

use super::{sqlite::Sqlite, Result, StoreError};
use crate::model::{DirectMessage, Message, Page, Room, Stored};
use rusqlite::{params, OptionalExtension};

/// The columns `d.id, f.username, t.username, d.body, d.ts, d.client_id` as a DM.
fn dm_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DirectMessage> {
    Ok(DirectMessage {
        id: r.get(0)?,
        from: r.get(1)?,
        to: r.get(2)?,
        body: r.get(3)?,
        ts: r.get(4)?,
        client_id: r.get(5)?,
    })
}

/// Who sends a message, and the once-only key they gave with it.
#[derive(Debug, Clone)]
pub struct Sender {
    /// User id.
    pub id: i64,
    /// Username.
    pub name: String,
    /// The client's key (validated by the caller), if any.
    pub client_id: Option<String>,
}

impl Sender {
    /// The id of the message this sender already stored with this `client_id`.
    fn repeat_of(&self, c: &rusqlite::Connection) -> Result<Option<i64>> {
        let Some(cid) = &self.client_id else {
            return Ok(None);
        };
        Ok(c.prepare_cached(
            "SELECT message_id FROM client_ids WHERE user_id = ?1 AND client_id = ?2",
        )?
        .query_row(params![self.id, cid], |r| r.get(0))
        .optional()?)
    }

    /// Records the `client_id` of a message just stored.
    fn remember(&self, c: &rusqlite::Connection, kind: &str, id: i64) -> Result<()> {
        if let Some(cid) = &self.client_id {
            c.prepare_cached(
                "INSERT INTO client_ids(user_id, client_id, kind, message_id)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![self.id, cid, kind, id])?;
        }
        Ok(())
    }
}

/// The newest-first or oldest-first scan a [`Page`] needs, and its id bounds.
pub(super) fn page_plan(page: Page) -> (&'static str, i64, i64) {
    let lo = page.after.unwrap_or(0);
    let hi = page.before.unwrap_or(i64::MAX);
    // With `after`, the oldest `limit` above it; otherwise the newest below `before`.
    let order = if page.after.is_some() { "ASC" } else { "DESC" };
    (order, lo, hi)
}

impl Sqlite {
    /// Rooms by name: at most `limit`, only names after `after` if given.
    pub fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<Room>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, name, created_at FROM rooms WHERE name > ?1 ORDER BY name LIMIT ?2",
            )?;
            let rows = st.query_map(params![after.unwrap_or(""), limit], |r| {
                Ok(Room {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    /// One room by name.
    pub fn room(&self, name: &str) -> Result<Option<Room>> {
        self.read(|c| {
            c.prepare_cached("SELECT id, name, created_at FROM rooms WHERE name = ?1")?
                .query_row([name], |r| {
                    Ok(Room {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })
                .optional()
        })
    }

    /// Creates a room; an existing name is a conflict.
    pub fn create_room(&self, name: &str, created_by: i64, now: String) -> Result<Room> {
        let name = name.to_owned();
        self.write(move |c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO rooms(name, created_at, created_by) VALUES (?1, ?2, ?3)",
                params![name, now, created_by],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("room {name:?} exists")));
            }
            Ok(Room {
                id: c.last_insert_rowid(),
                name,
                created_at: now,
            })
        })
    }

    /// A page of a room's history, oldest first, deleted messages left out.
    pub fn room_history(&self, room: &Room, page: Page) -> Result<Vec<Message>> {
        let (order, lo, hi) = page_plan(page);
        let sql = format!(
            "SELECT m.id, u.username, m.body, m.ts, m.client_id
               FROM messages m JOIN users u ON u.id = m.user_id
              WHERE m.room_id = ?1 AND m.deleted_at IS NULL AND m.id > ?2 AND m.id < ?3
              ORDER BY m.id {order} LIMIT ?4"
        );
        let mut out: Vec<Message> = self.read(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let rows = st.query_map(params![room.id, lo, hi, page.limit], |r| {
                Ok(Message {
                    id: r.get(0)?,
                    room: room.name.clone(),
                    from: r.get(1)?,
                    body: r.get(2)?,
                    ts: r.get(3)?,
                    client_id: r.get(4)?,
                })
            })?;
            rows.collect()
        })?;
        if page.after.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// Stores a room message; once it is durable, `done` runs on the completion thread
    /// in commit order, which is where it is broadcast and acknowledged. A repeat of
    /// the sender's `client_id` stores nothing.
    pub fn insert_message(
        &self,
        room: Room,
        from: Sender,
        body: String,
        done: impl FnOnce(Result<Stored<Message>>) + Send + 'static,
    ) {
        let space = self.space.clone();
        self.submit(
            move |c| {
                if let Some(first) = from.repeat_of(c)? {
                    return Ok(Stored::Repeat(first));
                }
                // Checked in the writer, after it measured the room for this batch.
                if space.low() {
                    return Err(StoreError::Full);
                }
                let ts = crate::clock::now_rfc3339();
                c.prepare_cached(
                    "INSERT INTO messages(room_id, user_id, body, ts, client_id)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![room.id, from.id, body, ts, from.client_id])?;
                let id = c.last_insert_rowid();
                from.remember(c, "room", id)?;
                Ok(Stored::New(Message {
                    id,
                    room: room.name,
                    from: from.name,
                    body,
                    ts,
                    client_id: from.client_id,
                }))
            },
            done,
        )
    }

    /// Stores a direct message; `done` runs once it is durable. A repeat of the
    /// sender's `client_id` stores nothing.
    pub fn insert_dm(
        &self,
        from: Sender,
        to: (i64, String),
        body: String,
        done: impl FnOnce(Result<Stored<DirectMessage>>) + Send + 'static,
    ) {
        let space = self.space.clone();
        self.submit(
            move |c| {
                if let Some(first) = from.repeat_of(c)? {
                    return Ok(Stored::Repeat(first));
                }
                // Checked in the writer, after it measured the room for this batch.
                if space.low() {
                    return Err(StoreError::Full);
                }
                let ts = crate::clock::now_rfc3339();
                c.prepare_cached(
                    "INSERT INTO direct_messages(from_id, to_id, body, ts, client_id)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![from.id, to.0, body, ts, from.client_id])?;
                let id = c.last_insert_rowid();
                from.remember(c, "dm", id)?;
                Ok(Stored::New(DirectMessage {
                    id,
                    from: from.name,
                    to: to.1,
                    body,
                    ts,
                    client_id: from.client_id,
                }))
            },
            done,
        )
    }

    /// A page of the conversation between users `a` and `b`, oldest first.
    pub fn dm_history(&self, a: i64, b: i64, page: Page) -> Result<Vec<DirectMessage>> {
        let (order, lo, hi) = page_plan(page);
        let sql = format!(
            "SELECT d.id, f.username, t.username, d.body, d.ts, d.client_id FROM direct_messages d
               JOIN users f ON f.id = d.from_id JOIN users t ON t.id = d.to_id
              WHERE ((d.from_id = ?1 AND d.to_id = ?2) OR (d.from_id = ?2 AND d.to_id = ?1))
                AND d.deleted_at IS NULL AND d.id > ?3 AND d.id < ?4
              ORDER BY d.id {order} LIMIT ?5"
        );
        let mut out: Vec<DirectMessage> = self.read(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let rows = st.query_map(params![a, b, lo, hi, page.limit], dm_row)?;
            rows.collect()
        })?;
        if page.after.is_none() {
            out.reverse();
        }
        Ok(out)
    }
}

impl Sqlite {
    /// Marks a room message deleted; `done` gets its room name once durable (the
    /// `deleted` event goes out from there, after every earlier message). Unknown or
    /// already deleted ids are not found.
    pub fn delete_message(
        &self,
        id: i64,
        by: i64,
        now: String,
        done: impl FnOnce(Result<String>) + Send + 'static,
    ) {
        self.submit(
            move |c| {
                let room: Option<String> = c
                    .query_row(
                        "SELECT r.name FROM messages m JOIN rooms r ON r.id = m.room_id
                          WHERE m.id = ?1 AND m.deleted_at IS NULL",
                        [id],
                        |r| r.get(0),
                    )
                    .optional()?;
                let room = room.ok_or_else(|| StoreError::NotFound(format!("message {id}")))?;
                c.execute(
                    "UPDATE messages SET deleted_at = ?2, deleted_by = ?3 WHERE id = ?1",
                    params![id, now, by],
                )?;
                Ok(room)
            },
            done,
        )
    }
}

impl Sqlite {
    /// The user's conversations: for each other user they exchanged DMs with, the
    /// latest one, most recent first (at most `limit`).
    pub fn conversations(&self, user_id: i64, limit: u32) -> Result<Vec<DirectMessage>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT d.id, f.username, t.username, d.body, d.ts, d.client_id
                   FROM direct_messages d
                   JOIN users f ON f.id = d.from_id JOIN users t ON t.id = d.to_id
                  WHERE d.id IN (SELECT max(id) FROM direct_messages
                                  WHERE (from_id = ?1 OR to_id = ?1) AND deleted_at IS NULL
                                  GROUP BY CASE WHEN from_id = ?1 THEN to_id ELSE from_id END)
                  ORDER BY d.id DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![user_id, limit], dm_row)?;
            rows.collect()
        })
    }
}

/// The message a sender first stored with a once-only key: a room message or a DM
/// (`None` inside when it has been deleted since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A room message.
    Room(Option<Message>),
    /// A direct message.
    Dm(Option<DirectMessage>),
}

impl Sqlite {
    /// What `user_id` first stored with `client_id`, if anything.
    pub fn sent_with(&self, user_id: i64, client_id: &str) -> Result<Option<Sent>> {
        self.read(|c| {
            let first: Option<(String, i64)> = c
                .prepare_cached(
                    "SELECT kind, message_id FROM client_ids WHERE user_id = ?1 AND client_id = ?2",
                )?
                .query_row(params![user_id, client_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((kind, id)) = first else {
                return Ok(None);
            };
            if kind == "dm" {
                let dm = c
                    .prepare_cached(
                        "SELECT d.id, f.username, t.username, d.body, d.ts, d.client_id
                           FROM direct_messages d
                           JOIN users f ON f.id = d.from_id JOIN users t ON t.id = d.to_id
                          WHERE d.id = ?1 AND d.deleted_at IS NULL",
                    )?
                    .query_row([id], dm_row)
                    .optional()?;
                return Ok(Some(Sent::Dm(dm)));
            }
            let msg = c
                .prepare_cached(
                    "SELECT m.id, r.name, u.username, m.body, m.ts, m.client_id
                       FROM messages m JOIN rooms r ON r.id = m.room_id
                       JOIN users u ON u.id = m.user_id
                      WHERE m.id = ?1 AND m.deleted_at IS NULL",
                )?
                .query_row([id], |r| {
                    Ok(Message {
                        id: r.get(0)?,
                        room: r.get(1)?,
                        from: r.get(2)?,
                        body: r.get(3)?,
                        ts: r.get(4)?,
                        client_id: r.get(5)?,
                    })
                })
                .optional()?;
            Ok(Some(Sent::Room(msg)))
        })
    }
}
