//! The read connections: at most [`MAX_OPEN`] open at once, each reused.
//!
//! Opening a connection costs far more than most reads do: the pragmas, then parsing
//! the whole schema on its first statement. In a reconnect storm hundreds of socket
//! threads read at once (each upgrade checks its login), and a pool that opened a fresh
//! connection whenever its idle ones were all taken, and closed it again afterwards,
//! spent about a third of the server's CPU doing that. So a reader that finds every
//! connection busy waits for one to come back (reads take microseconds); only after
//! [`WAIT`] does it open one of its own for that read. A long read (a big audit page)
//! can delay the others, but never stall them, and a read nested inside another cannot
//! deadlock.
//!
//! No thread of its own: callers' threads take a connection and give it back.

use super::{sqlite::open_connection, Result};
use crate::sync::{lock, wait_timeout};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most pooled connections open at once.
pub const MAX_OPEN: usize = 8;
/// How long a reader waits for a pooled connection before it opens its own.
pub const WAIT: Duration = Duration::from_millis(500);

/// A bounded pool of read connections to one database file.
pub struct ReadPool {
    path: PathBuf,
    state: Mutex<State>,
    returned: Condvar,
}

#[derive(Default)]
struct State {
    idle: Vec<Connection>,
    /// Pooled connections in existence, idle or lent out (or being opened).
    open: usize,
    /// Readers waiting for a connection to come back. A wake-up is a system call even
    /// when nobody waits, and every authenticated request and upgrade gives one back.
    waiting: usize,
}

/// A connection lent by the pool; it goes back when dropped (also on a panic: the
/// statements borrowed from it are dropped first, so it is clean).
struct Lease<'a> {
    conn: Option<Connection>,
    /// `None` for a connection opened past the cap, which is closed instead.
    pool: Option<&'a ReadPool>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(pool), Some(conn)) = (self.pool, self.conn.take()) {
            let mut st = lock(&pool.state);
            st.idle.push(conn);
            pool.wake_a_waiter(st);
        }
    }
}

impl ReadPool {
    /// An empty pool for the database at `path`; connections are opened on demand.
    pub fn new(path: PathBuf) -> ReadPool {
        ReadPool {
            path,
            state: Mutex::new(State::default()),
            returned: Condvar::new(),
        }
    }

    /// Runs `f` on a read connection.
    pub fn with<T>(&self, f: impl FnOnce(&Connection) -> T) -> Result<T> {
        let lease = self.lease()?;
        match lease.conn.as_ref() {
            Some(conn) => Ok(f(conn)),
            None => Err(super::StoreError::Sqlite("no read connection".into())),
        }
    }

    /// Closes the idle connections (before the final checkpoint at shutdown, which
    /// wants no other connection open); any lent out are kept when given back.
    pub fn close_idle(&self) {
        let mut st = lock(&self.state);
        let n = st.idle.len();
        st.idle.clear();
        st.open = st.open.saturating_sub(n);
    }

    /// How many pooled connections exist (for tests).
    #[cfg(test)]
    fn open_count(&self) -> usize {
        lock(&self.state).open
    }

    fn lease(&self) -> Result<Lease<'_>> {
        let deadline = Instant::now() + WAIT;
        let mut st = lock(&self.state);
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(self.lent(conn));
            }
            if st.open < MAX_OPEN {
                st.open += 1;
                drop(st);
                return match open_connection(&self.path) {
                    Ok(conn) => Ok(self.lent(conn)),
                    Err(e) => {
                        let mut st = lock(&self.state);
                        st.open -= 1;
                        self.wake_a_waiter(st);
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                let conn = open_connection(&self.path)?;
                return Ok(Lease {
                    conn: Some(conn),
                    pool: None,
                });
            }
            st.waiting += 1;
            st = wait_timeout(&self.returned, st, deadline - now);
            st.waiting -= 1;
        }
    }

    /// Wakes one waiting reader, if any, after the caller changed `st`. The count is
    /// read under the lock a waiter holds until it sleeps, so no wake-up is lost.
    fn wake_a_waiter(&self, st: MutexGuard<'_, State>) {
        let anyone = st.waiting > 0;
        drop(st);
        if anyone {
            self.returned.notify_one();
        }
    }

    fn lent(&self, conn: Connection) -> Lease<'_> {
        Lease {
            conn: Some(conn),
            pool: Some(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pool() -> Arc<ReadPool> {
        let path = crate::store::tests::tempdir().join("t.db");
        // Already in WAL, as the store leaves it before the pool opens anything:
        // readers racing to switch a fresh file's journal mode get `Busy`.
        let first = Connection::open(&path).unwrap();
        first
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .unwrap();
        drop(first);
        Arc::new(ReadPool::new(path))
    }

    #[test]
    fn many_readers_share_at_most_max_open_connections() {
        let pool = pool();
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let one: i64 = pool
                            .with(|c| c.query_row("SELECT 1", [], |r| r.get(0)))
                            .unwrap()
                            .unwrap();
                        assert_eq!(one, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let open = pool.open_count();
        assert!((1..=MAX_OPEN).contains(&open), "{open} connections");
        assert_eq!(lock(&pool.state).idle.len(), open, "every one given back");
    }

    #[test]
    fn a_reader_past_the_cap_waits_then_opens_its_own() {
        let pool = pool();
        // Hold every pooled connection from a nested read: the innermost one cannot be
        // given one, and must not hang.
        fn nest(pool: &ReadPool, depth: usize) -> usize {
            pool.with(|_| {
                if depth == 0 {
                    0
                } else {
                    1 + nest(pool, depth - 1)
                }
            })
            .unwrap()
        }
        let started = Instant::now();
        assert_eq!(nest(&pool, MAX_OPEN), MAX_OPEN);
        let waited = started.elapsed();
        assert!(waited >= WAIT, "did not wait: {waited:?}");
        assert!(waited < WAIT * 4, "waited {waited:?}");
        assert_eq!(pool.open_count(), MAX_OPEN);
    }

    #[test]
    fn a_waiting_reader_gets_a_connection_as_soon_as_one_comes_back() {
        let pool = pool();
        let hold = Duration::from_millis(100);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let p2 = pool.clone();
        let holder = std::thread::spawn(move || {
            fn nest(pool: &ReadPool, depth: usize, at_bottom: &dyn Fn()) {
                pool.with(|_| {
                    if depth == 0 {
                        at_bottom();
                    } else {
                        nest(pool, depth - 1, at_bottom);
                    }
                })
                .unwrap();
            }
            // Every pooled connection taken, then given back after `hold`.
            nest(&p2, MAX_OPEN - 1, &|| {
                started_tx.send(()).unwrap();
                std::thread::sleep(hold);
            });
        });
        started_rx.recv().unwrap();
        let asked = Instant::now();
        pool.with(|_| ()).unwrap();
        let waited = asked.elapsed();
        holder.join().unwrap();
        // Woken by the return, not by its own timeout (after which it would open a
        // connection of its own).
        assert!(waited < WAIT, "waited {waited:?}");
        assert_eq!(pool.open_count(), MAX_OPEN);
        assert_eq!(lock(&pool.state).idle.len(), MAX_OPEN);
        assert_eq!(lock(&pool.state).waiting, 0);
    }

    #[test]
    fn a_panicking_reader_gives_its_connection_back() {
        let pool = pool();
        let p2 = pool.clone();
        let r = std::thread::spawn(move || p2.with(|_| panic!("reader bug"))).join();
        assert!(r.is_err());
        assert_eq!(pool.open_count(), 1);
        assert_eq!(lock(&pool.state).idle.len(), 1);
    }
}
