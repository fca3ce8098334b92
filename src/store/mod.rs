//! Every SQL statement parley runs, behind typed functions.
//!
//! One [`Store`] owns the database file: a small pool of connections for reads (WAL lets
//! them run beside the writer, on the caller's thread), the `db-writer` thread that
//! batches every write into group commits and the `db-done` thread that runs their
//! completions ([`writer`]), and the `db-checkpoint` thread so WAL checkpoints never
//! stall a commit. [`Store::open`] starts the three and [`Store::close`] stops them.
//! The layout comes from `schema.sql`, embedded and applied on first open.
//! Submodules add the queries for one area each: [`users`] (accounts, roles,
//! sessions, refresh tokens), [`messages`] (rooms, room and direct messages) and
//! [`audit`] (the hash-chained security log).

pub mod audit;
pub mod messages;
pub mod users;
pub mod writer;

use crate::service::Periodic;
use crate::sync::lock;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use writer::Writer;

/// The database layout; see `schema.sql` at the top of the repository.
pub const SCHEMA: &str = include_str!("../../schema.sql");
/// The `PRAGMA user_version` this build writes and understands.
pub const SCHEMA_VERSION: i64 = 1;
/// Read connections kept open for reuse.
const READ_POOL: usize = 8;

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
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Busy,
            _ => StoreError::Sqlite(e.to_string()),
        }
    }
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The open database: read pool, writer thread and checkpointer.
pub struct Store {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    writer: Writer,
    checkpointer: Periodic,
}

impl Store {
    /// Opens (creating from `schema.sql` if missing) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        create_private_file(path)?;
        let conn = open_connection(path)?;
        init_schema(&conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let writer = Writer::start(conn).map_err(|e| StoreError::Sqlite(e.to_string()))?;
        let checkpointer = start_checkpointer(path)?;
        Ok(Store {
            path: path.to_path_buf(),
            readers: Mutex::new(Vec::new()),
            writer,
            checkpointer,
        })
    }

    /// Statistics of the group-commit writer.
    pub fn writer_stats(&self) -> &writer::WriterStats {
        &self.writer.stats
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let pooled = lock(&self.readers).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let result = f(&conn).map_err(StoreError::from);
        let mut pool = lock(&self.readers);
        if pool.len() < READ_POOL {
            pool.push(conn);
        }
        result
    }

    /// Queues a write; once it is durable, `done` runs on the completion thread, in
    /// commit order.
    fn submit<T, W, D>(&self, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        self.writer.submit(work, done)
    }

    /// Runs a write and waits until it is durable.
    fn write<T, W>(&self, work: W) -> Result<T>
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.writer.write(work)
    }

    /// A server-wide setting.
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(|c| {
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// Stores `value` under `key` unless the key exists; returns the stored value
    /// (so two processes racing to create a key agree on one).
    pub fn setting_or_insert(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        let key = key.to_owned();
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO settings(key, value) VALUES (?1, ?2)",
                rusqlite::params![key, value],
            )?;
            Ok(
                c.query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| {
                    r.get(0)
                })?,
            )
        })
    }

    /// Writes a consistent copy of the live database to `dest` (`VACUUM INTO`).
    pub fn backup(&self, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(StoreError::Conflict(format!("{} exists", dest.display())));
        }
        let dest = dest.to_string_lossy().into_owned();
        self.read(move |c| c.execute("VACUUM INTO ?1", [dest]).map(|_| ()))
    }

    /// Waits until every write queued so far is committed and its completion has run.
    pub fn sync(&self) {
        self.writer.sync();
    }

    /// Commits what is queued, stops the writer and the checkpointer, and checkpoints
    /// the WAL into the file.
    pub fn close(&self) {
        self.writer.shutdown();
        self.checkpointer.stop();
        lock(&self.readers).clear();
        if let Ok(c) = open_connection(&self.path) {
            let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }
}

/// Creates the file with mode 0600 if it does not exist: it holds the signing key and
/// every private message.
fn create_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Sqlite(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;",
    )?;
    Ok(conn)
}

/// Applies `schema.sql` to an empty database, or checks the version of an existing one.
fn init_schema(conn: &Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    match version {
        0 => {
            let tables: i64 =
                conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
            if tables > 0 {
                return Err(StoreError::Conflict(
                    "the file is an SQLite database but not a parley one".into(),
                ));
            }
            let script =
                format!("BEGIN; {SCHEMA}\n; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;");
            conn.execute_batch(&script)?;
            log::info!("created a new database (schema version {SCHEMA_VERSION})");
            Ok(())
        }
        SCHEMA_VERSION => Ok(()),
        v => Err(StoreError::Conflict(format!(
            "database schema version {v} is newer than this build understands ({SCHEMA_VERSION})"
        ))),
    }
}

/// Checkpoints the WAL from its own thread, so no commit pays for a checkpoint.
fn start_checkpointer(path: &Path) -> Result<Periodic> {
    let conn = open_connection(path)?;
    Periodic::start("db-checkpoint", Duration::from_millis(500), move || {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            log::warn!("wal checkpoint: {e}");
        }
    })
    .map_err(|e| StoreError::Sqlite(e.to_string()))
}

/// Notices commits made by any other connection — the CLI, `sqlite3`, or this
/// process's own writer — through `PRAGMA data_version`, without reading any table.
pub struct ChangeWatcher {
    conn: Connection,
    last: i64,
}

impl ChangeWatcher {
    /// Whether the database changed since the last call.
    pub fn changed(&mut self) -> bool {
        let now: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .unwrap_or(self.last);
        std::mem::replace(&mut self.last, now) != now
    }
}

impl Store {
    /// A watcher on its own connection.
    pub fn watcher(&self) -> Result<ChangeWatcher> {
        let conn = open_connection(&self.path)?;
        let last = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        Ok(ChangeWatcher { conn, last })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn new_database_gets_schema_and_general() {
        let dir = tempdir();
        let path = dir.join("t.db");
        let store = Store::open(&path).unwrap();
        let rooms = store.rooms().unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms[0].name, "general");
        store.close();
        // Reopening neither re-seeds nor fails.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.rooms().unwrap().len(), 1);
        store.close();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_foreign_database() {
        let dir = tempdir();
        let path = dir.join("other.db");
        let c = Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t(x)").unwrap();
        drop(c);
        assert!(matches!(Store::open(&path), Err(StoreError::Conflict(_))));
    }

    /// "An ack means on disk" holds only with `synchronous=FULL` on the connection that
    /// commits (WAL with NORMAL can lose the last commits on power loss), and only with
    /// WAL does a reader never block the writer.
    #[test]
    fn the_committing_connection_is_wal_and_synchronous_full() {
        let dir = tempdir();
        let store = Store::open(&dir.join("s.db")).unwrap();
        let (journal, synchronous) = store
            .write(|c| {
                let j: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                let s: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                Ok((j, s))
            })
            .unwrap();
        assert_eq!(journal, "wal");
        assert_eq!(synchronous, 2, "2 is FULL");
        store.close();
    }

    pub(crate) fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "parley-unit-{}-{}",
            std::process::id(),
            crate::auth::random_token()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
