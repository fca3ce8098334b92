//! The SQLite engine: one database file, opened by [`Sqlite::open`].
//!
//! A small pool of connections serves reads (WAL lets them run beside the writer, on
//! the caller's thread); the `db-writer` thread batches every write into group commits
//! and the `db-done` thread runs their completions ([`super::writer`]); the
//! `db-checkpoint` thread checkpoints the WAL so no commit stalls on it. `open` starts
//! the three and [`Sqlite::close`] stops them. The layout comes from `schema.sql`,
//! embedded and applied on first open; older layouts are upgraded here. The queries
//! of each area live in [`super::users`], [`super::messages`] and [`super::audit`].

use super::writer::{self, Writer};
use super::{pool, space, users, ChangeWatcher, Result, StoreError, SCHEMA, SCHEMA_VERSION};
use crate::service::Periodic;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The open database: read pool, writer thread and checkpointer.
pub struct Sqlite {
    pub(super) path: PathBuf,
    pub(super) readers: pool::ReadPool,
    pub(super) writer: Writer,
    pub(super) checkpointer: Periodic,
    pub(super) space: Arc<space::Space>,
}

impl Sqlite {
    /// Opens (creating from `schema.sql` if missing) the database at `path`. An
    /// existing file (or its `-wal` / `-shm`) that other users may access is made
    /// private first, with a warning; one that cannot be is refused.
    pub fn open(path: &Path) -> Result<Sqlite> {
        // Checked even for a file just created: a stale -wal or -shm may sit beside it.
        match create_private_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Sqlite(format!(
                    "cannot create {}: {e}",
                    path.display()
                )))
            }
            _ => make_private(path)?,
        }
        let conn = open_connection(path)?;
        init_schema(&conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let space = Arc::new(space::Space::new(path));
        let measure = space.clone();
        let before_batch = Box::new(move |c: &Connection| measure.measure(c));
        let writer =
            Writer::start(conn, before_batch).map_err(|e| StoreError::Sqlite(e.to_string()))?;
        let checkpointer = start_checkpointer(path)?;
        Ok(Sqlite {
            path: path.to_path_buf(),
            readers: pool::ReadPool::new(path.to_path_buf()),
            writer,
            checkpointer,
            space,
        })
    }

    /// Caps the database at about `bytes` (`--max-db-mb`): it grows no further, and
    /// new messages are refused a little before the cap (see [`space`]).
    pub fn cap_size(&self, bytes: u64) -> Result<()> {
        self.write(move |c| {
            let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page.max(512);
            c.pragma_update(None, "max_page_count", pages.max(1))?;
            Ok(())
        })
    }

    /// Statistics of the group-commit writer.
    pub fn writer_stats(&self) -> &writer::WriterStats {
        &self.writer.stats
    }

    /// Runs `f` on a pooled read connection.
    pub(super) fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        self.readers.with(f)?.map_err(StoreError::from)
    }

    /// Queues a write; once it is durable, `done` runs on the completion thread, in
    /// commit order.
    pub(super) fn submit<T, W, D>(&self, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&Connection) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        self.writer.submit(work, done)
    }

    /// Runs a write and waits until it is durable.
    pub(super) fn write<T, W>(&self, work: W) -> Result<T>
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

    /// Writes a consistent copy of the live database to `dest` (`VACUUM INTO`), which
    /// must not exist. The copy holds the signing key and every password hash, so it
    /// is created empty with mode 0600 first, whatever the umask: SQLite accepts an
    /// empty file as the target and keeps its mode.
    pub fn backup(&self, dest: &Path) -> Result<()> {
        create_private_file(dest).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                StoreError::Conflict(format!("{} exists", dest.display()))
            }
            _ => StoreError::Sqlite(format!("cannot create {}: {e}", dest.display())),
        })?;
        let target = dest.to_string_lossy().into_owned();
        let result = self.read(move |c| c.execute("VACUUM INTO ?1", [target]).map(|_| ()));
        if result.is_err() {
            // Leave nothing half-written behind to be mistaken for a backup.
            let _ = std::fs::remove_file(dest);
        }
        result
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
        self.readers.close_idle();
        if let Ok(c) = open_connection(&self.path) {
            let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }
}

/// Creates an empty file with mode 0600 (fails if it exists): a database or a copy of
/// one holds the signing key, the password hashes and every private message.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(|_| ())
}

/// Sets the database file and its `-wal` and `-shm` (when present) to mode 0600 if
/// group or others may access them — say, after a restore with `cp` under a umask of
/// 022 — and says so in the log. Fixing beats refusing to start; a file we cannot
/// chmod (not ours) is refused, since serving it would keep the secrets readable.
/// SQLite creates a missing `-wal` or `-shm` with the database file's mode.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let base = path.as_os_str();
    for suffix in ["", "-wal", "-shm"] {
        let mut name = base.to_os_string();
        name.push(suffix);
        let file = Path::new(&name);
        let Ok(meta) = std::fs::metadata(file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 == 0 {
            continue;
        }
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StoreError::Sqlite(format!(
                "{} has mode {mode:04o} (other users may read it) and cannot be made 0600: {e}",
                file.display()
            ))
        })?;
        log::warn!(
            "{} had mode {mode:04o}, so other users could read the signing key and password \
             hashes in it; changed it to 0600",
            file.display()
        );
    }
    Ok(())
}

pub(super) fn open_connection(path: &Path) -> Result<Connection> {
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

/// Applies `schema.sql` to an empty database, upgrades an older parley layout, or
/// checks the version of a current one.
fn init_schema(conn: &Connection) -> Result<()> {
    match user_version(conn)? {
        SCHEMA_VERSION => return Ok(()),
        v if v > SCHEMA_VERSION => return Err(newer_version(v)),
        _ => {}
    }
    // Rebuilding `users` needs foreign-key enforcement off (dropping the old table
    // would otherwise cascade into every table that refers to it), and SQLite ignores
    // this pragma inside a transaction. `migrate_v1` checks the keys itself.
    conn.pragma_update(None, "foreign_keys", false)?;
    let result = create_or_upgrade(conn);
    conn.pragma_update(None, "foreign_keys", true)?;
    result
}

fn user_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

fn newer_version(v: i64) -> StoreError {
    StoreError::Conflict(format!(
        "database schema version {v} is newer than this build understands ({SCHEMA_VERSION})"
    ))
}

/// Creates or upgrades the layout in one transaction. IMMEDIATE takes the write lock
/// before the version is read again, so a second process opening the same file at
/// the same moment (a CLI command beside a starting server) waits and then finds the
/// work done instead of doing it twice.
fn create_or_upgrade(conn: &Connection) -> Result<()> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    match user_version(&tx)? {
        0 => {
            let tables: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
            if tables > 0 {
                return Err(StoreError::Conflict(
                    "the file is an SQLite database but not a parley one".into(),
                ));
            }
            tx.execute_batch(SCHEMA)?;
            log::info!("created a new database (schema version {SCHEMA_VERSION})");
        }
        v @ 1..=3 => {
            if v == 1 {
                migrate_v1(&tx)?;
            }
            if v <= 2 {
                migrate_v2(&tx)?;
            }
            migrate_v3(&tx)?;
            log::info!("upgraded the database from schema version {v} to {SCHEMA_VERSION}");
        }
        SCHEMA_VERSION => return Ok(()),
        v => return Err(newer_version(v)),
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(tx.commit()?)
}

/// Schema 3 to 4, inside the caller's transaction: the `login_epoch` count and its
/// triggers, taken from `schema.sql` itself so that an upgraded file and a new one
/// cannot differ.
fn migrate_v3(c: &Connection) -> Result<()> {
    Ok(c.execute_batch(schema_section("login_epoch")?)?)
}

/// The lines after the `-- begin: NAME` line of `schema.sql`, up to `-- end: NAME`.
fn schema_section(name: &str) -> Result<&'static str> {
    let begin = format!("-- begin: {name}");
    let end = format!("-- end: {name}");
    SCHEMA
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(section, _)| section)
        .ok_or_else(|| StoreError::Sqlite(format!("schema.sql has no section {name}")))
}

/// Schema 2 to 3, inside the caller's transaction: once-only sends (`client_id` on
/// messages and DMs, and the `client_ids` table that makes them unique per sender).
fn migrate_v2(c: &Connection) -> Result<()> {
    c.execute_batch(
        "ALTER TABLE messages ADD COLUMN client_id TEXT;
         ALTER TABLE direct_messages ADD COLUMN client_id TEXT;
         CREATE TABLE client_ids (
             user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
             client_id  TEXT NOT NULL,
             kind       TEXT NOT NULL,
             message_id INTEGER NOT NULL,
             PRIMARY KEY (user_id, client_id)
         ) WITHOUT ROWID;",
    )?;
    Ok(())
}

/// Schema 1 to 2, inside the caller's transaction with foreign keys off: `users` gets
/// AUTOINCREMENT (so an id is never given to a second account) and a random `stamp`
/// per account, and `sessions` records the stamp of the account each login was made
/// for. This is SQLite's documented way to change a table's definition: create the
/// new table, copy, drop, rename, then check the foreign keys.
fn migrate_v1(c: &Connection) -> Result<()> {
    // Rows left behind by a user deleted in the sqlite3 shell already break foreign
    // keys; the upgrade must not add to them, and it keeps them (they are data).
    let broken_before = foreign_key_violations(c)?;
    c.execute_batch(
        "CREATE TABLE users_v2 (
             id            INTEGER PRIMARY KEY AUTOINCREMENT,
             username      TEXT NOT NULL UNIQUE COLLATE NOCASE,
             password_hash TEXT NOT NULL,
             created_at    TEXT NOT NULL,
             banned_at     TEXT,
             stamp         TEXT NOT NULL
         );
         INSERT INTO users_v2(id, username, password_hash, created_at, banned_at, stamp)
             SELECT id, username, password_hash, created_at, banned_at, '' FROM users;
         DROP TABLE users;
         ALTER TABLE users_v2 RENAME TO users;
         ALTER TABLE sessions ADD COLUMN user_stamp TEXT;",
    )?;
    let ids = c
        .prepare("SELECT id FROM users")?
        .query_map([], |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut set_stamp = c.prepare("UPDATE users SET stamp = ?2 WHERE id = ?1")?;
    for id in ids {
        set_stamp.execute(rusqlite::params![id, users::new_stamp()])?;
    }
    // Logins of existing accounts survive the upgrade; those of deleted ones get NULL,
    // which never matches a stamp.
    c.execute(
        "UPDATE sessions SET user_stamp = (SELECT stamp FROM users WHERE id = sessions.user_id)",
        [],
    )?;
    // The next id must be above every user id any row still mentions, not only the
    // rows of `users`: the orphans of a deleted account must never find a new owner.
    let highest: i64 = c.query_row(
        "SELECT coalesce(max(id), 0) FROM (
             SELECT max(id) AS id FROM users
             UNION ALL SELECT max(user_id) FROM user_roles
             UNION ALL SELECT max(user_id) FROM sessions
             UNION ALL SELECT max(user_id) FROM messages
             UNION ALL SELECT max(deleted_by) FROM messages
             UNION ALL SELECT max(from_id) FROM direct_messages
             UNION ALL SELECT max(to_id) FROM direct_messages
             UNION ALL SELECT max(created_by) FROM rooms)",
        [],
        |r| r.get(0),
    )?;
    let seeded = c.execute(
        "UPDATE sqlite_sequence SET seq = max(seq, ?1) WHERE name = 'users'",
        [highest],
    )?;
    if seeded == 0 {
        c.execute(
            "INSERT INTO sqlite_sequence(name, seq) VALUES ('users', ?1)",
            [highest],
        )?;
    }
    let broken_after = foreign_key_violations(c)?;
    if let Some(v) = broken_after.iter().find(|v| !broken_before.contains(v)) {
        return Err(StoreError::Sqlite(format!(
            "upgrade aborted: it would break a foreign key ({v:?})"
        )));
    }
    if !broken_before.is_empty() {
        log::warn!(
            "{} rows refer to users deleted outside parley; they are kept, and their ids \
             will never be given to a new account",
            broken_before.len()
        );
    }
    Ok(())
}

/// `PRAGMA foreign_key_check`: (table, rowid, parent table, key index) per broken row.
type Violation = (String, Option<i64>, String, i64);

fn foreign_key_violations(c: &Connection) -> Result<Vec<Violation>> {
    let mut st = c.prepare("PRAGMA foreign_key_check")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
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

/// Notices changes that can end a login — a revoke, a ban, a deleted account — made
/// by any connection: the CLI, `sqlite3`, or this process's own writer.
///
/// `PRAGMA data_version` says, without reading a table, that another connection
/// committed; most commits are messages and audit rows, so the watcher then reads the
/// `login_epoch` count that `schema.sql`'s triggers keep, and reports a change only
/// when that moved. With the row gone (deleted by hand) every commit counts.
pub struct LoginWatcher {
    conn: Connection,
    data_version: i64,
    epoch: Option<i64>,
}

impl LoginWatcher {
    /// Whether a login may have ended since the last call.
    pub fn logins_changed(&mut self) -> bool {
        let Ok(now) = data_version(&self.conn) else {
            return false;
        };
        if std::mem::replace(&mut self.data_version, now) == now {
            return false;
        }
        let epoch = login_epoch(&self.conn);
        std::mem::replace(&mut self.epoch, epoch) != epoch || epoch.is_none()
    }
}

fn data_version(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row("PRAGMA data_version", [], |r| r.get(0))
}

/// `None` when the row is missing or unreadable: the caller then assumes a change.
fn login_epoch(c: &Connection) -> Option<i64> {
    c.prepare_cached("SELECT value FROM settings WHERE key = 'login_epoch'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .ok()
}

impl Sqlite {
    /// Nobody else shares an SQLite file's sockets: nothing to tell.
    pub fn notify(&self, _notice: super::notice::Notice) {}

    /// One node, so no notices will come.
    pub fn listen(&self, _sink: super::notice::Sink) -> Result<()> {
        Ok(())
    }

    /// A lone node has no id among others.
    pub fn node_id(&self) -> Option<String> {
        None
    }

    /// Nobody else shares an SQLite file.
    pub fn other_nodes(&self) -> Result<usize> {
        Ok(0)
    }

    /// A watcher on its own connection.
    pub fn watcher(&self) -> Result<ChangeWatcher> {
        let conn = open_connection(&self.path)?;
        let data_version = data_version(&conn)?;
        let epoch = login_epoch(&conn);
        Ok(ChangeWatcher::Sqlite(LoginWatcher {
            conn,
            data_version,
            epoch,
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::tests::tempdir;
    use crate::store::Store;

    #[test]
    fn new_database_gets_schema_and_general() {
        let dir = tempdir();
        let path = dir.join("t.db");
        let store = Store::open(&path).unwrap();
        let rooms = store.rooms(None, 10).unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms[0].name, "general");
        store.close();
        // Reopening neither re-seeds nor fails.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.rooms(None, 10).unwrap().len(), 1);
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

    /// The watcher reports commits that can end a login, from any connection (here
    /// one like the sqlite3 shell's), and not the ones that cannot.
    #[test]
    fn watcher_sees_login_changes_only() {
        let dir = tempdir();
        let path = dir.join("w.db");
        let store = Store::open(&path).unwrap();
        let mut w = store.watcher().unwrap();
        let shell = Connection::open(&path).unwrap();
        let run = |sql: &str| shell.execute_batch(sql).unwrap();
        run("INSERT INTO users(username, password_hash, created_at, stamp) VALUES ('a', 'x', 't', 's');
             INSERT INTO sessions(id, user_id, created_at, user_stamp) VALUES ('s1', 1, 't', 's')");
        assert!(!w.logins_changed(), "a new account and login end nothing");
        assert!(!w.logins_changed(), "nothing committed since");
        run("INSERT INTO messages(room_id, user_id, body, ts) VALUES (1, 1, 'hi', 't')");
        assert!(!w.logins_changed(), "a message ends no login");
        let ends = [
            "UPDATE users SET banned_at = 't' WHERE id = 1",
            "UPDATE users SET stamp = 's2' WHERE id = 1",
            "UPDATE sessions SET revoked_at = 't' WHERE id = 's1'",
            "DELETE FROM sessions",
            "DELETE FROM users",
        ];
        for sql in ends {
            run(sql);
            assert!(w.logins_changed(), "{sql}");
        }
        run("DELETE FROM settings WHERE key = 'login_epoch'");
        w.logins_changed();
        run("INSERT INTO rooms(name, created_at) VALUES ('r', 't')");
        assert!(w.logins_changed(), "without the count every commit counts");
        store.close();
    }

    /// "An ack means on disk" holds only with `synchronous=FULL` on the connection that
    /// commits (WAL with NORMAL can lose the last commits on power loss), and only with
    /// WAL does a reader never block the writer.
    #[test]
    fn the_committing_connection_is_wal_and_synchronous_full() {
        let dir = tempdir();
        let store = Sqlite::open(&dir.join("s.db")).unwrap();
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
}
