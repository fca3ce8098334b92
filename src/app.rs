//! The running server's shared state, handed to every thread as `Arc<App>`.

use crate::auth::Auth;
use crate::config::Config;
use crate::enforce::ExpiryTimer;
use crate::hub::Hub;
use crate::limits::{KeyedLimiter, SlowLane, Tarpit};
use crate::peer::Flusher;
use crate::store::Store;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Everything a request or socket handler needs.
pub struct App {
    /// Settings and limits.
    pub cfg: Config,
    /// The database.
    pub store: Store,
    /// Passwords and tokens.
    pub auth: Auth,
    /// Rooms found so far, by name (rooms are never renamed or removed).
    pub rooms: std::sync::Mutex<std::collections::HashMap<String, crate::model::Room>>,
    /// Live sockets and rooms.
    pub hub: Arc<Hub>,
    /// Delivers committed events in commit order.
    pub fanout: crate::fanout::Fanout,
    /// Finishes socket writes that could not complete at once.
    pub flusher: Arc<Flusher>,
    /// Login attempts per IP and per username.
    pub login_limiter: KeyedLimiter,
    /// Runs bcrypt on a bounded number of threads.
    pub slow_lane: SlowLane,
    /// Answers refused password requests after a pause.
    pub tarpit: Arc<Tarpit>,
    /// Closes sockets whose token expires.
    pub expiry: Arc<ExpiryTimer>,
    /// Descriptor numbers of live WebSockets (skipped when looking for new ones).
    pub known_sockets: crate::sys::KnownSockets,
    /// Last request time per HTTP connection, for the idle reaper.
    pub activity: crate::reaper::Activity,
    /// The address we listen on (its port finds upgraded sockets' descriptors).
    pub local_addr: std::net::SocketAddr,
    /// Set once shutdown begins; new work is refused.
    pub shutting_down: AtomicBool,
}
