//! Keeps live sockets honest after the upgrade.
//!
//! Two threads serve every socket, so no socket polls anything itself:
//! - `expiry` ([`ExpiryTimer`]): one min-heap of token expiry times; a socket whose
//!   token expires without a `refresh` is closed with 4001;
//! - `revocation-sweep` ([`Sweeper`]): four times a second asks the store whether a login
//!   may have ended (a revoke, a ban or a deleted account, by the CLI, `sqlite3`, or
//!   this process: [`crate::store::ChangeWatcher`]), and if so checks each live login
//!   once against the current sessions and bans, closing dead ones with 4003. Messages
//!   and audit rows do not start a sweep, which would cost a query per live login.
//!   So a ban or password change made from the command line reaches live sockets
//!   within seconds.
//!
//! Both are started and stopped by [`crate::server`].

use crate::hub::Hub;
use crate::metrics::{self, METRICS};
use crate::peer::{close, Peer};
use crate::service::{Periodic, StopSignal, Worker, SERVICE_STACK};
use crate::store::Store;
use crate::sync::{lock, wait_timeout};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the sweep looks for database changes: a cheap read (SQLite's
/// `data_version`, one row on PostgreSQL), often enough that a ban made on another
/// node or from the CLI closes the user's sockets here within a second.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

struct Entry {
    expires_at: u64,
    peer: Weak<Peer>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.expires_at == other.expires_at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.expires_at.cmp(&other.expires_at)
    }
}

/// The heap the timer thread sleeps on; sockets add themselves with
/// [`ExpiryTimer::watch`].
#[derive(Default)]
struct Expiries {
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    wake: Condvar,
    stop: StopSignal,
}

/// The expiry timer shared by all sockets.
pub struct ExpiryTimer {
    shared: Arc<Expiries>,
    worker: Worker,
}

fn now_unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl ExpiryTimer {
    /// Starts the timer thread.
    pub fn start() -> std::io::Result<ExpiryTimer> {
        let shared = Arc::new(Expiries::default());
        let s = shared.clone();
        let worker = Worker::spawn("expiry", SERVICE_STACK, move || s.run())?;
        Ok(ExpiryTimer { shared, worker })
    }

    /// Watches `peer` until its token's expiry (re-checked then, since a `refresh` may
    /// have moved it).
    pub fn watch(&self, peer: &Arc<Peer>) {
        let expires_at = peer.expires_at();
        let mut heap = lock(&self.shared.heap);
        // The thread sleeps until the earliest expiry; only an earlier one needs it
        // awake. In a reconnect storm every socket expires after those before it, and
        // waking the thread for each cost a context switch per upgrade.
        let sooner = heap
            .peek()
            .is_none_or(|Reverse(e)| expires_at < e.expires_at);
        heap.push(Reverse(Entry {
            expires_at,
            peer: Arc::downgrade(peer),
        }));
        drop(heap);
        if sooner {
            self.shared.wake.notify_one();
        }
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.shared.stop.stop();
        // Take the heap lock so the thread is either before its stop check or asleep.
        drop(lock(&self.shared.heap));
        self.shared.wake.notify_all();
        self.worker.join();
    }
}

impl Expiries {
    fn run(&self) {
        let mut heap = lock(&self.heap);
        while !self.stop.is_stopped() {
            let now = now_unix_f64();
            let next = heap.peek().map(|Reverse(e)| e.expires_at as f64);
            match next {
                Some(at) if at <= now => {
                    let Some(Reverse(entry)) = heap.pop() else {
                        continue;
                    };
                    let Some(peer) = entry.peer.upgrade() else {
                        continue;
                    };
                    if (peer.expires_at() as f64) <= now {
                        drop(heap);
                        peer.close(close::EXPIRED, "access token expired");
                        heap = lock(&self.heap);
                    } else {
                        heap.push(Reverse(Entry {
                            expires_at: peer.expires_at(),
                            peer: entry.peer,
                        }));
                    }
                }
                other => {
                    let wait = other.map_or(60.0, |at| at - now).clamp(0.001, 60.0);
                    heap = wait_timeout(&self.wake, heap, Duration::from_secs_f64(wait));
                }
            }
        }
    }
}

/// The revocation sweep thread.
pub struct Sweeper {
    thread: Periodic,
}

impl Sweeper {
    /// Starts the sweep over `hub`'s sockets, checking logins in `store`.
    pub fn start(hub: Arc<Hub>, store: Arc<Store>) -> Result<Sweeper, String> {
        let mut watcher = store.watcher().map_err(|e| e.to_string())?;
        let thread = Periodic::start("revocation-sweep", SWEEP_EVERY, move || {
            if watcher.logins_changed() {
                metrics::inc(&METRICS.login_sweeps);
                sweep(&hub, &store);
            }
        })
        .map_err(|e| e.to_string())?;
        Ok(Sweeper { thread })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// Closes every socket whose login is revoked or whose user is banned.
fn sweep(hub: &Hub, store: &Store) {
    let mut verdicts: HashMap<(String, i64), bool> = HashMap::new();
    for peer in hub.all_peers() {
        let key = (peer.sid(), peer.user_id);
        let alive = match verdicts.get(&key) {
            Some(v) => *v,
            None => {
                // On a database error keep the socket: a transient fault must not
                // disconnect everyone.
                let v = store.session_alive(&key.0, key.1).unwrap_or(true);
                verdicts.insert(key, v);
                v
            }
        };
        if !alive {
            peer.close(close::REVOKED, "login revoked");
        }
    }
}
