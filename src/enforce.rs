//! Keeps live sockets honest after the upgrade.
//!
//! Two threads serve every socket, so no socket polls anything itself:
//! - the expiry timer: one min-heap of token expiry times; a socket whose token
//!   expires without a `refresh` is closed with 4001;
//! - the revocation sweep: watches `PRAGMA data_version` and, when anything changed
//!   the database (the CLI, `sqlite3`, or this process), checks each live login once
//!   against the current sessions and bans, closing dead ones with 4003. So a ban or
//!   password change made from the command line reaches live sockets within seconds.

use crate::app::App;
use crate::peer::{close, Peer};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the sweep looks for database changes.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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

/// The expiry timer shared by all sockets.
#[derive(Default)]
pub struct ExpiryTimer {
    heap: Mutex<BinaryHeap<Reverse<Entry>>>,
    wake: Condvar,
}

fn now_unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl ExpiryTimer {
    /// Starts the timer thread.
    pub fn start() -> std::io::Result<Arc<ExpiryTimer>> {
        let t = Arc::new(ExpiryTimer::default());
        let me = t.clone();
        std::thread::Builder::new()
            .name("expiry".into())
            .stack_size(256 * 1024)
            .spawn(move || me.run())?;
        Ok(t)
    }

    /// Watches `peer` until its token's expiry (re-checked then, since a `refresh` may
    /// have moved it).
    pub fn watch(&self, peer: &Arc<Peer>) {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        heap.push(Reverse(Entry {
            expires_at: peer.expires_at(),
            peer: Arc::downgrade(peer),
        }));
        self.wake.notify_one();
    }

    fn run(&self) {
        let mut heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
        loop {
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
                        heap = self.heap.lock().unwrap_or_else(|e| e.into_inner());
                    } else {
                        heap.push(Reverse(Entry {
                            expires_at: peer.expires_at(),
                            peer: entry.peer,
                        }));
                    }
                }
                other => {
                    let wait = other.map_or(60.0, |at| at - now).clamp(0.001, 60.0);
                    heap = match self.wake.wait_timeout(heap, Duration::from_secs_f64(wait)) {
                        Ok((g, _)) => g,
                        Err(e) => e.into_inner().0,
                    };
                }
            }
        }
    }
}

/// Starts the revocation sweep thread.
pub fn start_sweeper(app: &Arc<App>) -> Result<(), String> {
    let mut watcher = app.store.watcher().map_err(|e| e.to_string())?;
    let app = Arc::downgrade(app);
    std::thread::Builder::new()
        .name("revocation-sweep".into())
        .stack_size(256 * 1024)
        .spawn(move || loop {
            std::thread::sleep(SWEEP_EVERY);
            let Some(app) = app.upgrade() else { return };
            if watcher.changed() {
                sweep(&app);
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Closes every socket whose login is revoked or whose user is banned.
pub fn sweep(app: &App) {
    let mut verdicts: HashMap<(String, i64), bool> = HashMap::new();
    for peer in app.hub.all_peers() {
        let key = (peer.sid(), peer.user_id);
        let alive = match verdicts.get(&key) {
            Some(v) => *v,
            None => {
                // On a database error keep the socket: a transient fault must not
                // disconnect everyone.
                let v = app.store.session_alive(&key.0, key.1).unwrap_or(true);
                verdicts.insert(key, v);
                v
            }
        };
        if !alive {
            peer.close(close::REVOKED, "login revoked");
        }
    }
}
