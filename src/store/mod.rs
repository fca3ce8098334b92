//! Every SQL statement parley runs, behind typed functions, and the one interface over
//! the engines that run them.
//!
//! [`Store`] is what the rest of parley holds. It forwards each operation to the engine
//! the `--db` value picked ([`Location`]): [`sqlite`] (a file; the default build's only
//! engine) or, in a build with `--features postgres`, `pg` (a PostgreSQL database,
//! shared by several nodes). `actions` and everything above it never learn which one
//! runs; the list of operations in this file is the contract both engines keep, and a
//! build with the feature fails if either one lacks an operation.
//!
//! The SQLite engine's queries live by area: [`users`] (accounts, roles, sessions,
//! refresh tokens), [`messages`] (rooms, room and direct messages) and [`audit`] (the
//! hash-chained security log), with [`writer`] (group commits), [`space`] (the size cap)
//! and [`health`] (`parley check`) beside them.

pub mod audit;
pub mod health;
pub mod messages;
pub mod notice;
#[cfg(feature = "postgres")]
pub mod pg;
mod pool;
pub mod space;
pub mod sqlite;
pub mod users;
pub mod writer;

use crate::model::{DirectMessage, Message, Page, Room, Stored, User};
use audit::{AuditEntry, AuditEvent};
use messages::{Sender, Sent};
use sqlite::Sqlite;
use std::path::{Path, PathBuf};
use users::{Listed, RefreshOutcome, RoleChange, Rotation, TokenLogin, UserRecord};

/// The database layout; see `schema.sql` at the top of the repository.
pub const SCHEMA: &str = include_str!("../../schema.sql");
/// The `PRAGMA user_version` this build writes and understands (older parley versions
/// are upgraded on open).
pub const SCHEMA_VERSION: i64 = 4;

/// What can go wrong in the store.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The named object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A uniqueness rule or invariant would be broken.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The writer has stopped (the server is shutting down).
    #[error("the database writer has stopped")]
    Closed,
    /// The disk is full, or the database is at its size cap (new messages are refused
    /// a little before, so that logins still fit).
    #[error("the database is full")]
    Full,
    /// Another process held the database's write lock past the busy timeout.
    #[error("the database is busy (locked by another process)")]
    Busy,
    /// The write's code panicked (a bug); its changes were rolled back.
    #[error("the write failed and was rolled back")]
    Panicked,
    /// A write waited on the writer thread itself, which could only wait forever.
    #[error("a write was issued from inside another write")]
    Reentrant,
    /// Any other SQLite error.
    #[error("sqlite: {0}")]
    Sqlite(String),
    /// Any other PostgreSQL error (or the server cannot be reached).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    #[error("postgres: {0}")]
    Postgres(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked, DiskFull};
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Busy,
            Some(DiskFull) => StoreError::Full,
            _ => StoreError::Sqlite(e.to_string()),
        }
    }
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Where the data lives, as `--db` names it: a file path, or a `postgres://` URL.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite database file.
    File(PathBuf),
    /// A PostgreSQL connection URL (it may hold a password: never log it whole; the
    /// `Debug` and `Display` forms hide it).
    Postgres(String),
}

impl Location {
    /// Reads a `--db` value: a `postgres://` or `postgresql://` URL picks PostgreSQL,
    /// anything else is a file path.
    pub fn parse(value: &str) -> Location {
        let lower = value.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Location::Postgres(value.to_owned())
        } else {
            Location::File(PathBuf::from(value))
        }
    }

    /// The file, for the commands that work on an SQLite file only.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Location::File(p) => Some(p),
            Location::Postgres(_) => None,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// The engine behind a [`Store`].
enum Engine {
    Sqlite(Sqlite),
    #[cfg(feature = "postgres")]
    Postgres(pg::Postgres),
}

/// The open database, whichever engine holds it. Cheap to share behind an `Arc`.
pub struct Store {
    engine: Engine,
}

impl Store {
    /// Opens (creating from `schema.sql` if missing) the SQLite database at `path`. An
    /// existing file (or its `-wal` / `-shm`) that other users may access is made
    /// private first, with a warning; one that cannot be is refused.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store {
            engine: Engine::Sqlite(Sqlite::open(path)?),
        })
    }

    /// Opens the database `--db` named, with the engine its form picks.
    pub fn open_at(location: &Location) -> Result<Store> {
        match location {
            Location::File(path) => Store::open(path),
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => Ok(Store {
                engine: Engine::Postgres(pg::Postgres::open(url)?),
            }),
            #[cfg(not(feature = "postgres"))]
            Location::Postgres(_) => Err(StoreError::Conflict(
                "this build has no PostgreSQL engine; build parley with --features postgres".into(),
            )),
        }
    }
}

/// Declares the operations every engine provides: each becomes a [`Store`] method
/// that forwards to the open engine's method of the same name and signature.
macro_rules! operations {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) $(-> $ret:ty)?; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub fn $name(&self $(, $arg: $ty)*) $(-> $ret)? {
                    match &self.engine {
                        Engine::Sqlite(e) => e.$name($($arg),*),
                        #[cfg(feature = "postgres")]
                        Engine::Postgres(e) => e.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

operations! {
    /// Caps the database at about `bytes` (`--max-db-mb`); new messages are refused a
    /// little before the cap (see [`space`]).
    fn cap_size(&self, bytes: u64) -> Result<()>;
    /// Statistics of the group-commit writer.
    fn writer_stats(&self) -> &writer::WriterStats;
    /// A server-wide setting.
    fn setting(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Stores `value` under `key` unless the key exists; returns the stored value (so
    /// two processes racing to create a key agree on one).
    fn setting_or_insert(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>>;
    /// Writes a consistent copy of the live database to `dest`, created 0600.
    fn backup(&self, dest: &Path) -> Result<()>;
    /// Waits until every write queued so far is committed and its completion has run.
    fn sync(&self);
    /// Commits what is queued and stops the engine's threads.
    fn close(&self);
    /// A watcher on changes that can end a login, made by anyone.
    fn watcher(&self) -> Result<ChangeWatcher>;

    /// The account named `username` (case-insensitive), with its login secrets.
    fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>>;
    /// The account with this id, with its login secrets.
    fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>>;
    /// The public view of an account and its roles.
    fn user(&self, id: i64) -> Result<User>;
    /// Creates an account, with `role` or `member`.
    fn create_user(&self, username: &str, password_hash: String, role: Option<String>, created_at: String) -> Result<User>;
    /// Whether any of the user's roles grants `permission` (read from the database).
    fn has_permission(&self, user_id: i64, permission: &str) -> Result<bool>;
    /// Records a login and its first refresh token.
    fn start_session(&self, user: &UserRecord, sid: String, ip: Option<String>, refresh_hash: String, refresh_expires_at: u64, now: String) -> Result<()>;
    /// The login an access token names, if it still counts.
    fn token_login(&self, user_id: i64, sid: &str) -> Result<Option<TokenLogin>>;
    /// The login and user a refresh token belongs to.
    fn refresh_token_session(&self, token_hash: &str) -> Result<Option<(String, i64)>>;
    /// Retires a refresh token and issues its successor (or detects reuse).
    fn rotate_refresh(&self, r: Rotation) -> Result<RefreshOutcome>;
    /// Revokes a login; false if it was already revoked or unknown.
    fn revoke_session(&self, sid: &str, reason: &'static str, now: String) -> Result<bool>;
    /// Bans or unbans a user, never the last unbanned holder of `guard_permission`.
    fn set_banned(&self, user_id: i64, banned: bool, guard_permission: &'static str, now: String) -> Result<bool>;
    /// Replaces a user's roles, never leaving nobody with `guard_permission`.
    fn set_roles(&self, user_id: i64, roles: Vec<String>, guard_permission: &'static str) -> Result<RoleChange>;
    /// Replaces a password hash with a stronger one, if it is still `old_hash`.
    fn rehash_password(&self, user_id: i64, old_hash: String, new_hash: String) -> Result<()>;
    /// The distinct bcrypt prefixes (version and cost) of the stored hashes.
    fn password_hash_prefixes(&self) -> Result<Vec<String>>;
    /// Sets a new password and ends every login of the account.
    fn set_password(&self, user_id: i64, password_hash: String, now: String) -> Result<()>;
    /// The ids of the users holding any of `roles`.
    fn users_with_roles(&self, roles: &[String]) -> Result<Vec<i64>>;
    /// Whether the login still counts (not revoked, the user not banned or changed).
    fn session_alive(&self, sid: &str, user_id: i64) -> Result<bool>;
    /// One page of the user directory, by name.
    fn list_users(&self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Vec<Listed>>;

    /// One page of rooms, by name.
    fn rooms(&self, after: Option<&str>, limit: u32) -> Result<Vec<Room>>;
    /// The room with this name.
    fn room(&self, name: &str) -> Result<Option<Room>>;
    /// Creates a room.
    fn create_room(&self, name: &str, created_by: i64, now: String) -> Result<Room>;
    /// One page of a room's history.
    fn room_history(&self, room: &Room, page: Page) -> Result<Vec<Message>>;
    /// Stores a room message; once it is durable, `done` runs on the completion thread.
    fn insert_message(&self, room: Room, from: Sender, body: String, done: impl FnOnce(Result<Stored<Message>>) + Send + 'static);
    /// Stores a direct message; once it is durable, `done` runs on the completion thread.
    fn insert_dm(&self, from: Sender, to: (i64, String), body: String, done: impl FnOnce(Result<Stored<DirectMessage>>) + Send + 'static);
    /// One page of the direct messages between `a` and `b`.
    fn dm_history(&self, a: i64, b: i64, page: Page) -> Result<Vec<DirectMessage>>;
    /// Marks a room message deleted; `done` gets its room's name once durable.
    fn delete_message(&self, id: i64, by: i64, now: String, done: impl FnOnce(Result<String>) + Send + 'static);
    /// The newest direct message of each of the user's conversations.
    fn conversations(&self, user_id: i64, limit: u32) -> Result<Vec<DirectMessage>>;
    /// What the user already sent with this once-only key, if anything.
    fn sent_with(&self, user_id: i64, client_id: &str) -> Result<Option<Sent>>;

    /// Appends a security event to the chain (queued; never waits for the disk).
    fn audit(&self, entry: AuditEntry);
    /// The newest audit events, before `before` if given.
    fn audit_events(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEvent>>;
    /// Checks the whole chain: the first broken row's id and why, or `None`.
    fn verify_audit_chain(&self) -> Result<Option<(i64, String)>>;

    /// Tells the other nodes sharing the database (none on SQLite). Messages, direct
    /// messages and deletions need no call: the engine sends those with the commit.
    fn notify(&self, notice: notice::Notice);
    /// Hands every notice another node sends to `sink`, from a thread of the engine's
    /// that [`Store::close`] stops (on SQLite there is no other node: nothing runs).
    fn listen(&self, sink: notice::Sink) -> Result<()>;
    /// This node's id among the nodes sharing the database (`None` on SQLite: a lone
    /// node, which shares nothing).
    fn node_id(&self) -> Option<String>;
    /// How many other nodes listen on the database now (0 on SQLite).
    fn other_nodes(&self) -> Result<usize>;
}

/// Notices changes that can end a login — a revoke, a ban, a deleted account — made by
/// anyone (the CLI, a database shell, another node, this process's own writer).
pub enum ChangeWatcher {
    /// The SQLite engine's watcher.
    Sqlite(sqlite::LoginWatcher),
    /// The PostgreSQL engine's watcher.
    #[cfg(feature = "postgres")]
    Postgres(pg::LoginWatcher),
}

impl ChangeWatcher {
    /// Whether a login may have ended since the last call.
    pub fn logins_changed(&mut self) -> bool {
        match self {
            ChangeWatcher::Sqlite(w) => w.logins_changed(),
            #[cfg(feature = "postgres")]
            ChangeWatcher::Postgres(w) => w.logins_changed(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "parley-unit-{}-{}",
            std::process::id(),
            crate::random::random_token()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_postgres_url_picks_postgres_and_its_password_is_hidden() {
        let l = Location::parse("postgresql://chat:s3cret@db.lan:5432/chat");
        assert!(matches!(l, Location::Postgres(_)));
        assert_eq!(l.to_string(), "postgresql://chat:***@db.lan:5432/chat");
        assert_eq!(format!("{l:?}"), "postgresql://chat:***@db.lan:5432/chat");
        let f = Location::parse("./chat.db");
        assert_eq!(f.file(), Some(Path::new("./chat.db")));
        assert!(Location::parse("POSTGRES://u@h/d").file().is_none());
    }
}
