//! The PostgreSQL engine (`--features postgres`): a database named by a
//! `postgres://` URL, which several parley nodes may share. Opened by
//! [`Postgres::open`]; its operations mean what the SQLite engine's do (same
//! arguments, results and errors), only the SQL differs.
//!
//! Threads and connections:
//! - Reads run on the caller's thread, on a client borrowed from a small pool
//!   ([`Readers`]: at most [`MAX_READERS`] kept; one that failed is closed, not
//!   returned).
//! - Writes go to the `pg-writer` thread, which owns one client and commits whatever
//!   is queued as one transaction, each job under its own savepoint; the `pg-done`
//!   thread runs their completions in commit order ([`writer`]). `open` starts both,
//!   [`Postgres::close`] commits what is queued, stops and joins them.
//! - The [`LoginWatcher`] owns a client of its own and runs on its caller's thread
//!   (the revocation sweep).
//! - [`Postgres::listen`] starts the `pg-listen` thread, which owns a client of its own
//!   and hands other nodes' notices to the sink; [`Postgres::close`] stops and joins it
//!   first ([`notices`]).
//!
//! The `postgres` crate is a blocking wrapper over `tokio-postgres`: every client
//! carries a small current-thread tokio runtime that runs only inside that client's
//! calls, on the calling thread (resolving a host name borrows a short-lived thread
//! from it). Only this feature pulls tokio in; the default build has no async runtime.
//!
//! Several nodes on one database:
//! - Room message and DM ids become visible in id order. Every write transaction that
//!   inserts one first takes the advisory lock [`writer::Locks::ORDER`]
//!   (`pg_advisory_xact_lock`), which it holds until its COMMIT; so whoever took id 10
//!   commits before anyone can take id 11, and a client that resumes with `since` (or
//!   pages with `after`) never skips a message that commits later.
//! - The audit chain stays one chain: appending takes [`writer::Locks::AUDIT`] before
//!   it reads the last hash, so no two nodes chain onto the same row.
//! - Checks that span rows — the last unbanned admin, the first account being the
//!   admin — take [`writer::Locks::ACCOUNTS`]; a refresh token is rotated under a row
//!   lock (`FOR UPDATE`), so two nodes cannot both rotate it.
//! - `schema.pg.sql`'s triggers count every change that can end a login in the
//!   `login_epoch` setting, whichever node (or psql) made it; each node's watcher
//!   reads it.
//! - What one node's sockets must hear from another (messages, DMs, deletions, kicks,
//!   announcements) goes over `LISTEN`/`NOTIFY`, sent inside the transaction that
//!   makes the change ([`notices`]). This node's own messages reach its own sockets in
//!   the same order: their completions wait for their notices to come back
//!   ([`turns`]).
//!
//! The layout comes from `schema.pg.sql`, embedded and applied (under an advisory lock,
//! so two nodes starting at once create it once) to a database without it. The queries
//! live by area in [`users`], [`messages`] and [`audit`], as for SQLite.

mod audit;
pub mod import;
mod messages;
mod notices;
#[cfg(test)]
mod tests;
mod turns;
mod users;
pub(super) mod writer;

use super::notice::{Notice, Sink};
use super::{ChangeWatcher, Result, StoreError, SCHEMA_VERSION};
use crate::sync::{lock, wait_timeout};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, GenericClient, NoTls, Row, Statement};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use writer::{Locks, Writer};

/// The PostgreSQL layout; see `schema.pg.sql` at the top of the repository.
pub const SCHEMA: &str = include_str!("../../../schema.pg.sql");

/// Most read clients kept open (idle or lent out).
pub const MAX_READERS: usize = 8;
/// How long a reader waits for a pooled client, when all are lent out, before it
/// opens one of its own for that read (as the SQLite pool does).
const READER_WAIT: Duration = Duration::from_millis(500);
/// How long a connection attempt may take unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The client's default `keepalives_idle` (two hours), which parley shortens...
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// ... to this, unless the URL sets it.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// How long sent data (or a keepalive probe) may go unanswered before the connection
/// counts as lost, unless the URL sets `tcp_user_timeout`.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// The writer's `lock_timeout`: a write that waits longer for a lock (a row another
/// session holds, or another node's batch) fails with [`StoreError::Busy`], as SQLite's
/// busy timeout does, instead of stalling every write behind it.
const LOCK_TIMEOUT_MS: u32 = 5000;
/// The advisory lock that serializes creating the layout.
const SCHEMA_LOCK: i64 = 0x7061_726c_6579_0000; // "parley\0\0"

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        match e.code() {
            Some(c) if *c == SqlState::DISK_FULL => StoreError::Full,
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => StoreError::Busy,
            _ => StoreError::Postgres(describe(&e)),
        }
    }
}

/// An error as one line: the server's message and SQLSTATE, or the client's error
/// with its causes. Never the URL (the crate's errors do not repeat it).
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Whether `e` is a unique-constraint violation.
fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// The password in a `postgres://user:secret@host/db` URL, as written there.
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password).filter(|p| !p.is_empty())
}

/// `msg` with every occurrence of `secret` masked.
fn scrub(msg: String, secret: Option<&[u8]>) -> String {
    match secret.and_then(|s| std::str::from_utf8(s).ok()) {
        Some(s) if !s.is_empty() && msg.contains(s) => msg.replace(s, "***"),
        _ => msg,
    }
}

/// Statements prepared on one client, by their SQL.
type Statements = HashMap<String, Statement>;

/// A client and the statements prepared on it.
pub(super) struct Conn {
    client: Client,
    stmts: Statements,
}

impl Conn {
    /// Connects; an error names neither the URL nor the password.
    fn connect(config: &Config) -> Result<Conn> {
        let client = config.connect(NoTls).map_err(|e| {
            let msg = format!("cannot connect: {}", describe(&e));
            StoreError::Postgres(scrub(msg, config.get_password()))
        })?;
        Ok(Conn {
            client,
            stmts: Statements::new(),
        })
    }

    /// The client as a [`Db`].
    fn db(&mut self) -> Db<'_, Client> {
        Db::new(&mut self.client, &mut self.stmts)
    }
}

/// A client, or a transaction or savepoint on one, with the statements prepared on
/// it: each SQL text is prepared once per client and reused, which saves a round trip
/// per statement. Records whether any statement failed. A write job also leaves here
/// the notices its transaction sends ([`notices::Publisher::queue`]).
pub(super) struct Db<'a, C> {
    c: &'a mut C,
    stmts: &'a mut Statements,
    failed: bool,
    outbox: Vec<String>,
}

/// A write job's view: the savepoint it runs under.
pub(super) type Tx<'a, 'b> = Db<'a, postgres::Transaction<'b>>;

impl<'a, C: GenericClient> Db<'a, C> {
    fn new(c: &'a mut C, stmts: &'a mut Statements) -> Self {
        Db {
            c,
            stmts,
            failed: false,
            outbox: Vec::new(),
        }
    }

    /// Whether a statement failed on this client (it is then closed, not reused).
    pub(super) fn failed(&self) -> bool {
        self.failed
    }

    fn statement(&mut self, sql: &str) -> std::result::Result<Statement, postgres::Error> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let st = self.c.prepare(sql)?;
        self.stmts.insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    /// Runs `sql`, keeping the driver's error (for callers that look at its code).
    pub(super) fn try_query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, postgres::Error> {
        let result = match self.statement(sql) {
            Ok(st) => self.c.query(&st, params),
            Err(e) => Err(e),
        };
        self.failed |= result.is_err();
        result
    }

    /// The rows of `sql`.
    pub(super) fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        Ok(self.try_query(sql, params)?)
    }

    /// The first row of `sql`, if any.
    pub(super) fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of `sql`; none is an error (the SQL always returns one).
    pub(super) fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Postgres("a query returned no row".into()))
    }

    /// Runs `sql`; the number of rows it changed.
    pub(super) fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let result = match self.statement(sql) {
            Ok(st) => self.c.execute(&st, params),
            Err(e) => Err(e),
        };
        self.failed |= result.is_err();
        Ok(result?)
    }

    /// The rows of `sql` one by one, without holding them all in memory.
    pub(super) fn for_each(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        mut f: impl FnMut(&Row) -> Result<bool>,
    ) -> Result<()> {
        use postgres::fallible_iterator::FallibleIterator;
        let st = match self.statement(sql) {
            Ok(st) => st,
            Err(e) => {
                self.failed = true;
                return Err(e.into());
            }
        };
        let mut rows = match self.c.query_raw(&st, params.iter().copied()) {
            Ok(rows) => rows,
            Err(e) => {
                self.failed = true;
                return Err(e.into());
            }
        };
        loop {
            match rows.next() {
                // Stopping early is fine: the client drops the rest of the rows.
                Ok(Some(row)) if !f(&row)? => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => {
                    drop(rows);
                    self.failed = true;
                    return Err(e.into());
                }
            }
        }
    }
}

/// Column `i` of `row` as `T`; a column of an unexpected type is an error, not a panic.
pub(super) fn col<'r, T: postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T> {
    Ok(row.try_get(i)?)
}

/// A `limit` or similar count as PostgreSQL's BIGINT.
pub(super) fn big(n: u32) -> i64 {
    i64::from(n)
}

/// The read clients: at most [`MAX_READERS`] open at once, each reused. No thread of
/// its own: callers' threads take a client and give it back.
struct Readers {
    config: Arc<Config>,
    state: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Conn>,
    /// Pooled clients in existence, idle or lent out (or being opened).
    open: usize,
}

/// A client lent by the pool; it goes back when dropped, unless it failed (or a panic
/// interrupted its work), in which case it is closed and its slot freed.
struct Lease<'a> {
    conn: Option<Conn>,
    /// `None` for a client opened past the cap, which is closed instead.
    pool: Option<&'a Readers>,
    broken: bool,
    /// Whether the client served earlier reads (it may have died while idle).
    reused: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(pool) = self.pool else { return };
        let conn = self.conn.take();
        let mut st = lock(&pool.state);
        match conn {
            Some(c) if !self.broken && !std::thread::panicking() && !c.client.is_closed() => {
                st.idle.push(c)
            }
            _ => st.open = st.open.saturating_sub(1),
        }
        drop(st);
        pool.returned.notify_one();
    }
}

impl Readers {
    fn new(config: Arc<Config>) -> Readers {
        Readers {
            config,
            state: Mutex::new(Pool::default()),
            returned: Condvar::new(),
        }
    }

    /// Runs `f` on a read client. A pooled client whose connection died while it was
    /// idle (the server restarted, or closed idle sessions) is dropped and `f` runs
    /// again on the next one: reads can be repeated.
    fn with<T>(&self, mut f: impl FnMut(&mut Db<'_, Client>) -> Result<T>) -> Result<T> {
        loop {
            let mut lease = self.lease()?;
            let Some(conn) = lease.conn.as_mut() else {
                return Err(StoreError::Postgres("no read client".into()));
            };
            let mut db = conn.db();
            let result = f(&mut db);
            lease.broken = db.failed();
            if result.is_err() && lease.reused && conn.client.is_closed() {
                continue;
            }
            return result;
        }
    }

    fn lease(&self) -> Result<Lease<'_>> {
        let deadline = Instant::now() + READER_WAIT;
        let mut st = lock(&self.state);
        loop {
            if let Some(conn) = st.idle.pop() {
                let mut lease = self.lent(conn);
                lease.reused = true;
                return Ok(lease);
            }
            if st.open < MAX_READERS {
                st.open += 1;
                drop(st);
                return match Conn::connect(&self.config) {
                    Ok(conn) => Ok(self.lent(conn)),
                    Err(e) => {
                        lock(&self.state).open -= 1;
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return Ok(Lease {
                    conn: Some(Conn::connect(&self.config)?),
                    pool: None,
                    broken: false,
                    reused: false,
                });
            }
            st = wait_timeout(&self.returned, st, deadline - now);
        }
    }

    fn lent(&self, conn: Conn) -> Lease<'_> {
        Lease {
            conn: Some(conn),
            pool: Some(self),
            broken: false,
            reused: false,
        }
    }

    /// Closes the idle clients; any lent out are kept when given back.
    fn close_idle(&self) {
        let mut st = lock(&self.state);
        let n = st.idle.len();
        st.idle.clear();
        st.open = st.open.saturating_sub(n);
    }
}

/// The open database: read clients and the writer threads.
pub struct Postgres {
    config: Arc<Config>,
    readers: Readers,
    writer: Writer,
    publisher: Arc<notices::Publisher>,
    listener: Mutex<Option<notices::Listener>>,
    turns: Arc<turns::Turns>,
}

impl Postgres {
    /// Connects to the database `url` names, creates parley's layout from
    /// `schema.pg.sql` if it has none (refusing a database with other tables, or a
    /// newer layout), and starts the writer threads. Errors never show the URL or its
    /// password.
    pub fn open(url: &str) -> Result<Postgres> {
        let mut config: Config = url.parse().map_err(|e: postgres::Error| {
            let msg = format!("bad PostgreSQL URL: {}", describe(&e));
            StoreError::Postgres(scrub(msg, url_password(url).map(str::as_bytes)))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("parley");
        }
        // A server that vanished without closing the connection (its host gone) must
        // not hang a read, the writer or the listener for the kernel's default
        // quarter of an hour: probe idle connections, and give up on unanswered data.
        if config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        let mut write_config = config.clone();
        let options = match write_config.get_options() {
            Some(o) => format!("{o} -c lock_timeout={LOCK_TIMEOUT_MS}"),
            None => format!("-c lock_timeout={LOCK_TIMEOUT_MS}"),
        };
        write_config.options(&options);
        let mut conn = Conn::connect(&write_config)?;
        init_schema(&mut conn.client)?;
        let writer = Writer::start(conn, write_config)
            .map_err(|e| StoreError::Postgres(format!("cannot start the writer: {e}")))?;
        let config = Arc::new(config);
        Ok(Postgres {
            readers: Readers::new(config.clone()),
            config,
            writer,
            publisher: Arc::new(notices::Publisher::new()),
            listener: Mutex::new(None),
            turns: Arc::default(),
        })
    }

    /// `--max-db-mb` is SQLite's: a PostgreSQL database is capped by its server.
    pub fn cap_size(&self, _bytes: u64) -> Result<()> {
        Err(StoreError::Conflict(
            "--max-db-mb applies to SQLite only; cap a PostgreSQL database with its own quotas"
                .into(),
        ))
    }

    /// Statistics of the group-commit writer.
    pub fn writer_stats(&self) -> &super::writer::WriterStats {
        &self.writer.stats
    }

    /// Runs `f` on a pooled read client.
    pub(super) fn read<T>(&self, f: impl FnMut(&mut Db<'_, Client>) -> Result<T>) -> Result<T> {
        self.readers.with(f)
    }

    /// Queues a write that takes `locks` first; once it is committed, `done` runs on the
    /// completion thread, in commit order.
    pub(super) fn submit<T, W, D>(&self, locks: Locks, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        self.writer.submit(locks, work, done)
    }

    /// Queues a write whose job sends a notice and returns its ticket with its value
    /// ([`notices::Publisher::queue`]). Its completion (a broadcast and an ack) then
    /// waits for that notice to come back, so this node's sockets get this node's
    /// changes in commit order with every other node's ([`turns`]).
    pub(super) fn submit_in_turn<T, W, D>(&self, locks: Locks, work: W, done: D)
    where
        T: Send + 'static,
        W: FnOnce(&mut Tx<'_, '_>) -> Result<(T, Option<u64>)> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        let turns = self.turns.clone();
        self.writer.submit(locks, work, move |res| match res {
            Ok((value, Some(ticket))) => turns.park(ticket, Box::new(move || done(Ok(value)))),
            Ok((value, None)) => done(Ok(value)),
            Err(e) => done(Err(e)),
        })
    }

    /// Runs a write that takes `locks` first, and waits until it is committed.
    pub(super) fn write<T, W>(&self, locks: Locks, work: W) -> Result<T>
    where
        T: Send + 'static,
        W: FnOnce(&mut Tx<'_, '_>) -> Result<T> + Send + 'static,
    {
        self.writer.write(locks, work)
    }

    /// A server-wide setting.
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(
            |c| match c.query_opt("SELECT value FROM settings WHERE key = $1", &[&key])? {
                Some(row) => Ok(Some(col(&row, 0)?)),
                None => Ok(None),
            },
        )
    }

    /// Stores `value` under `key` unless the key exists; returns the stored value (so
    /// two nodes racing to create a key agree on one).
    pub fn setting_or_insert(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        let key = key.to_owned();
        self.write(Locks::NONE, move |c| {
            c.execute(
                "INSERT INTO settings(key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )?;
            let row = c.query_one("SELECT value FROM settings WHERE key = $1", &[&key])?;
            col(&row, 0)
        })
    }

    /// Backups of a PostgreSQL database are its server's business (`pg_dump`).
    pub fn backup(&self, _dest: &Path) -> Result<()> {
        Err(StoreError::Conflict(
            "back up a PostgreSQL database with pg_dump".into(),
        ))
    }

    /// Waits until every write queued so far is committed and its completion has run.
    pub fn sync(&self) {
        self.writer.sync();
    }

    /// Stops and joins the listener (if any), commits what is queued, stops and joins
    /// the writer and completion threads, and closes the idle read clients.
    pub fn close(&self) {
        if let Some(listener) = lock(&self.listener).take() {
            listener.stop();
        }
        self.writer.shutdown();
        self.readers.close_idle();
    }

    /// Tells the other nodes: the notice is queued as a write, and they get it when
    /// that commits, in commit order with the messages around it. (Messages, DMs and
    /// deletions carry their own notices; see [`notices`].)
    pub fn notify(&self, notice: Notice) {
        let publisher = self.publisher.clone();
        self.submit(
            Locks::NONE,
            move |c| publisher.queue_untracked(c, &notice),
            |r: Result<()>| {
                if let Err(e) = r {
                    log::warn!("a notice to the other nodes was not sent: {e}");
                }
            },
        );
    }

    /// Hands every notice another node sends to `sink`, on the `pg-listen` thread
    /// (stopped by [`Postgres::close`]). Listening has begun when this returns. Once
    /// per store: a second call is a conflict.
    pub fn listen(&self, sink: Sink) -> Result<()> {
        let mut slot = lock(&self.listener);
        if slot.is_some() {
            return Err(StoreError::Conflict("already listening".into()));
        }
        let node = self.publisher.node().to_owned();
        let turns = self.turns.clone();
        *slot = Some(notices::Listener::start(
            self.config.clone(),
            node,
            sink,
            turns,
        )?);
        Ok(())
    }

    /// This node's id, as other nodes' sinks are told it.
    pub fn node_id(&self) -> Option<String> {
        Some(self.publisher.node().to_owned())
    }

    /// How many other nodes listen on the database now: sessions named
    /// [`notices::LISTENER_NAME`], less this node's own once it listens.
    pub fn other_nodes(&self) -> Result<usize> {
        let listening = lock(&self.listener).is_some();
        let sessions: i64 = self.read(|c| {
            let row = c.query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name = $1",
                &[&notices::LISTENER_NAME],
            )?;
            col(&row, 0)
        })?;
        let sessions = usize::try_from(sessions).unwrap_or(0);
        Ok(sessions.saturating_sub(usize::from(listening)))
    }

    /// A watcher on its own client.
    pub fn watcher(&self) -> Result<ChangeWatcher> {
        let mut conn = Conn::connect(&self.config)?;
        let epoch = login_epoch(&mut conn)?;
        Ok(ChangeWatcher::Postgres(LoginWatcher {
            config: self.config.clone(),
            conn: Some(Box::new(conn)),
            epoch,
        }))
    }
}

/// The layout's version, or `None` when the database has no `schema_version` table.
/// Looked up in `pg_class` with the statement's snapshot: `to_regclass` could answer
/// from a stale cache after waiting for another node that just created the layout.
fn schema_version(c: &mut impl GenericClient) -> Result<Option<i64>> {
    let exists: bool = c
        .query_one(
            "SELECT EXISTS(SELECT 1 FROM pg_catalog.pg_class c
                             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                            WHERE c.relname = 'schema_version' AND n.nspname = current_schema())",
            &[],
        )?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let rows = c.query("SELECT version FROM schema_version", &[])?;
    match rows.as_slice() {
        [row] => Ok(Some(i64::from(row.try_get::<_, i32>(0)?))),
        _ => Err(StoreError::Conflict(format!(
            "schema_version holds {} rows; it must hold one",
            rows.len()
        ))),
    }
}

fn check_version(v: i64) -> Result<()> {
    match v {
        SCHEMA_VERSION => Ok(()),
        v if v > SCHEMA_VERSION => Err(StoreError::Conflict(format!(
            "database schema version {v} is newer than this build understands ({SCHEMA_VERSION})"
        ))),
        v => Err(StoreError::Conflict(format!(
            "database schema version {v} is not a PostgreSQL layout this build knows \
             ({SCHEMA_VERSION})"
        ))),
    }
}

/// Checks the version of the layout, or creates it in one transaction. The advisory
/// lock makes a second node that opens the database at the same moment wait, then
/// find the work done instead of doing it twice.
fn init_schema(client: &mut Client) -> Result<()> {
    if let Some(v) = schema_version(client)? {
        return check_version(v);
    }
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    if let Some(v) = schema_version(&mut tx)? {
        return check_version(v);
    }
    let tables: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
            &[],
        )?
        .try_get(0)?;
    if tables > 0 {
        return Err(StoreError::Conflict(
            "the database has tables but not parley's (no schema_version); use an empty one".into(),
        ));
    }
    tx.batch_execute(SCHEMA)?;
    tx.commit()?;
    log::info!("created a new database (schema version {SCHEMA_VERSION})");
    Ok(())
}

/// The `login_epoch` setting's bytes; `None` when the row is missing.
fn login_epoch(conn: &mut Conn) -> Result<Option<Vec<u8>>> {
    let row = conn
        .db()
        .query_opt("SELECT value FROM settings WHERE key = 'login_epoch'", &[])?;
    row.map(|r| col(&r, 0)).transpose()
}

/// Notices changes that can end a login — a revoke, a ban, a new stamp, a deleted
/// account or login — made by anyone: any node, the CLI, psql.
///
/// PostgreSQL has no cheap "did anyone commit" counter like SQLite's `data_version`, so
/// each call reads the `login_epoch` setting that `schema.pg.sql`'s triggers bump (one
/// indexed row) and reports whether it moved since the last call. With the row gone
/// (deleted by hand) every call reports a change. When the database cannot be reached
/// the call reports no change and keeps the last value it read, so the first call that
/// reads again reports whatever happened meanwhile; the client is reopened then.
pub struct LoginWatcher {
    config: Arc<Config>,
    conn: Option<Box<Conn>>,
    epoch: Option<Vec<u8>>,
}

impl LoginWatcher {
    /// Whether a login may have ended since the last call.
    pub fn logins_changed(&mut self) -> bool {
        let conn = match self.conn.as_mut() {
            Some(c) if !c.client.is_closed() => c,
            _ => {
                self.conn = None;
                match Conn::connect(&self.config) {
                    Ok(c) => self.conn.insert(Box::new(c)),
                    Err(e) => {
                        log::warn!("login watcher: {e}");
                        return false;
                    }
                }
            }
        };
        match login_epoch(conn) {
            Ok(epoch) => {
                std::mem::replace(&mut self.epoch, epoch.clone()) != epoch || epoch.is_none()
            }
            Err(e) => {
                log::warn!("login watcher: {e}");
                self.conn = None;
                false
            }
        }
    }
}
