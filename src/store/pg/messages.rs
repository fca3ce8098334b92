//! Rooms, room messages and direct messages on PostgreSQL: the SQL of
//! [`crate::store::messages`], with the same meaning.
//!
//! Reads run on the caller's thread (a pooled client). Inserts and deletions are jobs
//! on the `pg-writer` thread whose completions run on `pg-done` after the COMMIT
//! returned ([`super::writer`]); each also queues its notice to the other nodes in
//! the same transaction ([`super::notices`]). Inserting a message or DM holds the
//! `ORDER` advisory lock until COMMIT, so ids (and their notices) become visible in
//! id order on every node (see the module doc of [`super`]); it also makes the
//! once-only `client_id` check and its record one step for all nodes.

use super::writer::Locks;
use super::{big, col, Postgres, Tx};
use crate::model::{Deleted, DirectMessage, Message, Page, Room, Stored};
use crate::store::messages::{page_plan, Sender, Sent};
use crate::store::notice::Notice;
use crate::store::{Result, StoreError};
use postgres::Row;

/// The columns `d.id, f.username, t.username, d.body, d.ts, d.client_id` as a DM.
fn dm_row(r: &Row) -> Result<DirectMessage> {
    Ok(DirectMessage {
        id: col(r, 0)?,
        from: col(r, 1)?,
        to: col(r, 2)?,
        body: col(r, 3)?,
        ts: col(r, 4)?,
        client_id: col(r, 5)?,
    })
}

/// The columns `id, name, created_at` as a room.
fn room_row(r: &Row) -> Result<Room> {
    Ok(Room {
        id: col(r, 0)?,
        name: col(r, 1)?,
        created_at: col(r, 2)?,
    })
}

/// Runs [`INSERT_MESSAGE`] or [`INSERT_DM`]: one statement (one round trip) that
/// looks up the sender's once-only key and, unless it was used, stores the message and
/// the key. A repeat names the first message's id; nothing is stored then.
fn store_once(
    c: &mut Tx<'_, '_>,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Stored<i64>> {
    let row = c.query_one(sql, params)?;
    let prior: Option<i64> = col(&row, 0)?;
    let new: Option<i64> = col(&row, 1)?;
    match (prior, new) {
        (Some(first), _) => Ok(Stored::Repeat(first)),
        (None, Some(id)) => Ok(Stored::New(id)),
        (None, None) => Err(StoreError::Postgres("INSERT returned no id".into())),
    }
}

/// [`store_once`] for a room message: $1 room, $2 sender, $3 body, $4 ts, $5 key.
const INSERT_MESSAGE: &str = "
    WITH prior AS (
             SELECT message_id FROM client_ids WHERE user_id = $2 AND client_id = $5),
         m AS (
             INSERT INTO messages(room_id, user_id, body, ts, client_id)
             SELECT $1::bigint, $2::bigint, $3::text, $4::text, $5::text
              WHERE NOT EXISTS (SELECT 1 FROM prior)
             RETURNING id),
         k AS (
             INSERT INTO client_ids(user_id, client_id, kind, message_id)
             SELECT $2, $5, 'room', id FROM m WHERE $5 IS NOT NULL)
    SELECT (SELECT message_id FROM prior), (SELECT id FROM m)";

/// [`store_once`] for a DM: $1 sender, $2 recipient, $3 body, $4 ts, $5 key.
const INSERT_DM: &str = "
    WITH prior AS (
             SELECT message_id FROM client_ids WHERE user_id = $1 AND client_id = $5),
         m AS (
             INSERT INTO direct_messages(from_id, to_id, body, ts, client_id)
             SELECT $1::bigint, $2::bigint, $3::text, $4::text, $5::text
              WHERE NOT EXISTS (SELECT 1 FROM prior)
             RETURNING id),
         k AS (
             INSERT INTO client_ids(user_id, client_id, kind, message_id)
             SELECT $1, $5, 'dm', id FROM m WHERE $5 IS NOT NULL)
    SELECT (SELECT message_id FROM prior), (SELECT id FROM m)";

/// The id an `INSERT ... RETURNING id` gave.
fn returned_id(rows: &[Row]) -> Result<i64> {
    match rows.first() {
        Some(r) => col(r, 0),
        None => Err(StoreError::Postgres("INSERT returned no id".into())),
    }
}

impl Postgres {
    /// Rooms by name: at most `limit`, only names after `after` if given.
    pub fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<Room>> {
        self.read(|c| {
            c.query(
                "SELECT id, name, created_at FROM rooms WHERE name > $1 ORDER BY name LIMIT $2",
                &[&after.unwrap_or(""), &big(limit)],
            )?
            .iter()
            .map(room_row)
            .collect()
        })
    }

    /// One room by name.
    pub fn room(&self, name: &str) -> Result<Option<Room>> {
        self.read(|c| {
            c.query_opt(
                "SELECT id, name, created_at FROM rooms WHERE name = $1",
                &[&name],
            )?
            .map(|r| room_row(&r))
            .transpose()
        })
    }

    /// Creates a room; an existing name is a conflict.
    pub fn create_room(&self, name: &str, created_by: i64, now: String) -> Result<Room> {
        let name = name.to_owned();
        self.write(Locks::NONE, move |c| {
            let rows = c.query(
                "INSERT INTO rooms(name, created_at, created_by) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&name, &now, &created_by],
            )?;
            if rows.is_empty() {
                return Err(StoreError::Conflict(format!("room {name:?} exists")));
            }
            Ok(Room {
                id: returned_id(&rows)?,
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
              WHERE m.room_id = $1 AND m.deleted_at IS NULL AND m.id > $2 AND m.id < $3
              ORDER BY m.id {order} LIMIT $4"
        );
        let mut out: Vec<Message> = self.read(|c| {
            c.query(&sql, &[&room.id, &lo, &hi, &big(page.limit)])?
                .iter()
                .map(|r| {
                    Ok(Message {
                        id: col(r, 0)?,
                        room: room.name.clone(),
                        from: col(r, 1)?,
                        body: col(r, 2)?,
                        ts: col(r, 3)?,
                        client_id: col(r, 4)?,
                    })
                })
                .collect()
        })?;
        if page.after.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// Stores a room message; once its transaction has committed, `done` runs on the
    /// completion thread in commit order, which is where it is broadcast and
    /// acknowledged. A repeat of the sender's `client_id` stores nothing.
    pub fn insert_message(
        &self,
        room: Room,
        from: Sender,
        body: String,
        done: impl FnOnce(Result<Stored<Message>>) + Send + 'static,
    ) {
        let publisher = self.publisher.clone();
        self.submit_in_turn(
            Locks::ORDER,
            move |c| {
                let ts = crate::clock::now_rfc3339();
                let stored = store_once(
                    c,
                    INSERT_MESSAGE,
                    &[&room.id, &from.id, &body, &ts, &from.client_id],
                )?;
                let id = match stored {
                    Stored::Repeat(first) => return Ok((Stored::Repeat(first), None)),
                    Stored::New(id) => id,
                };
                let message = Message {
                    id,
                    room: room.name,
                    from: from.name,
                    body,
                    ts,
                    client_id: from.client_id,
                };
                let ticket = publisher.queue(
                    c,
                    &Notice::Message {
                        message: message.clone(),
                    },
                )?;
                Ok((Stored::New(message), Some(ticket)))
            },
            done,
        )
    }

    /// Stores a direct message; `done` runs once its transaction has committed. A
    /// repeat of the sender's `client_id` stores nothing.
    pub fn insert_dm(
        &self,
        from: Sender,
        to: (i64, String),
        body: String,
        done: impl FnOnce(Result<Stored<DirectMessage>>) + Send + 'static,
    ) {
        let publisher = self.publisher.clone();
        self.submit_in_turn(
            Locks::ORDER,
            move |c| {
                let ts = crate::clock::now_rfc3339();
                let stored = store_once(
                    c,
                    INSERT_DM,
                    &[&from.id, &to.0, &body, &ts, &from.client_id],
                )?;
                let id = match stored {
                    Stored::Repeat(first) => return Ok((Stored::Repeat(first), None)),
                    Stored::New(id) => id,
                };
                let users = [from.id, to.0];
                let dm = DirectMessage {
                    id,
                    from: from.name,
                    to: to.1,
                    body,
                    ts,
                    client_id: from.client_id,
                };
                let ticket = publisher.queue(
                    c,
                    &Notice::Dm {
                        dm: dm.clone(),
                        users,
                    },
                )?;
                Ok((Stored::New(dm), Some(ticket)))
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
              WHERE ((d.from_id = $1 AND d.to_id = $2) OR (d.from_id = $2 AND d.to_id = $1))
                AND d.deleted_at IS NULL AND d.id > $3 AND d.id < $4
              ORDER BY d.id {order} LIMIT $5"
        );
        let mut out: Vec<DirectMessage> = self.read(|c| {
            c.query(&sql, &[&a, &b, &lo, &hi, &big(page.limit)])?
                .iter()
                .map(dm_row)
                .collect()
        })?;
        if page.after.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// Marks a room message deleted; `done` gets its room name once committed (the
    /// `deleted` event goes out from there, after every earlier message). Unknown or
    /// already deleted ids are not found.
    pub fn delete_message(
        &self,
        id: i64,
        by: i64,
        now: String,
        done: impl FnOnce(Result<String>) + Send + 'static,
    ) {
        let publisher = self.publisher.clone();
        self.submit_in_turn(
            Locks::NONE,
            move |c| {
                // A second deletion (on any node) waits for the first one's row lock,
                // then finds the message deleted: not found, as on SQLite.
                let found = c.query_opt(
                    "UPDATE messages m SET deleted_at = $2, deleted_by = $3
                       FROM rooms r
                      WHERE m.id = $1 AND m.deleted_at IS NULL AND r.id = m.room_id
                  RETURNING r.name, (SELECT username FROM users WHERE id = $3)",
                    &[&id, &now, &by],
                )?;
                let Some(found) = found else {
                    return Err(StoreError::NotFound(format!("message {id}")));
                };
                let room: String = col(&found, 0)?;
                let by_name: Option<String> = col(&found, 1)?;
                let deleted = Deleted {
                    id,
                    room: room.clone(),
                    by: by_name.unwrap_or_default(),
                };
                let ticket = publisher.queue(c, &Notice::Deleted { deleted })?;
                Ok((room, Some(ticket)))
            },
            done,
        )
    }

    /// The user's conversations: for each other user they exchanged DMs with, the
    /// latest one, most recent first (at most `limit`).
    pub fn conversations(&self, user_id: i64, limit: u32) -> Result<Vec<DirectMessage>> {
        self.read(|c| {
            c.query(
                "SELECT d.id, f.username, t.username, d.body, d.ts, d.client_id
                   FROM direct_messages d
                   JOIN users f ON f.id = d.from_id JOIN users t ON t.id = d.to_id
                  WHERE d.id IN (SELECT max(id) FROM direct_messages
                                  WHERE (from_id = $1 OR to_id = $1) AND deleted_at IS NULL
                                  GROUP BY CASE WHEN from_id = $1 THEN to_id ELSE from_id END)
                  ORDER BY d.id DESC LIMIT $2",
                &[&user_id, &big(limit)],
            )?
            .iter()
            .map(dm_row)
            .collect()
        })
    }

    /// What `user_id` first stored with `client_id`, if anything.
    pub fn sent_with(&self, user_id: i64, client_id: &str) -> Result<Option<Sent>> {
        self.read(|c| {
            let first = c.query_opt(
                "SELECT kind, message_id FROM client_ids WHERE user_id = $1 AND client_id = $2",
                &[&user_id, &client_id],
            )?;
            let Some(first) = first else {
                return Ok(None);
            };
            let kind: String = col(&first, 0)?;
            let id: i64 = col(&first, 1)?;
            if kind == "dm" {
                let dm = c
                    .query_opt(
                        "SELECT d.id, f.username, t.username, d.body, d.ts, d.client_id
                           FROM direct_messages d
                           JOIN users f ON f.id = d.from_id JOIN users t ON t.id = d.to_id
                          WHERE d.id = $1 AND d.deleted_at IS NULL",
                        &[&id],
                    )?
                    .map(|r| dm_row(&r))
                    .transpose()?;
                return Ok(Some(Sent::Dm(dm)));
            }
            let msg = c
                .query_opt(
                    "SELECT m.id, r.name, u.username, m.body, m.ts, m.client_id
                       FROM messages m JOIN rooms r ON r.id = m.room_id
                       JOIN users u ON u.id = m.user_id
                      WHERE m.id = $1 AND m.deleted_at IS NULL",
                    &[&id],
                )?
                .map(|r| -> Result<Message> {
                    Ok(Message {
                        id: col(&r, 0)?,
                        room: col(&r, 1)?,
                        from: col(&r, 2)?,
                        body: col(&r, 3)?,
                        ts: col(&r, 4)?,
                        client_id: col(&r, 5)?,
                    })
                })
                .transpose()?;
            Ok(Some(Sent::Room(msg)))
        })
    }
}
