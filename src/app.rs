//! The running server's shared state, handed to every request and socket thread as
//! `Arc<App>`.
//!
//! It holds handles, not threads' bodies: every background service here is started and
//! stopped by [`crate::server`], which also owns the services no request needs.

use crate::auth::Auth;
use crate::cluster::Nodes;
use crate::config::Config;
use crate::conns::Conns;
use crate::enforce::ExpiryTimer;
use crate::fanout::Fanout;
use crate::hub::Hub;
use crate::lane::Lane;
use crate::limits::{Folds, KeyedLimiter, LoginLimits, SlowLane, Tarpit};
use crate::model::Room;
use crate::peer::FlushQueue;
use crate::store::Store;
use crate::sys::KnownSockets;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Everything a request or socket handler needs.
pub struct App {
    /// Settings and limits.
    pub cfg: Config,
    /// The database.
    pub store: Arc<Store>,
    /// Passwords and tokens.
    pub auth: Auth,
    /// Rooms found so far, by name (rooms are never renamed or removed).
    pub rooms: Mutex<HashMap<String, Room>>,
    /// Live sockets and rooms.
    pub hub: Arc<Hub>,
    /// Delivers committed events in commit order.
    pub fanout: Arc<Fanout>,
    /// Other nodes' presence (empty on a lone node).
    pub nodes: Nodes,
    /// Where sockets with a backlog register with the flusher.
    pub flush_queue: Arc<FlushQueue>,
    /// Login attempts per address, failures per name (`--login-rate`).
    pub login_limits: LoginLimits,
    /// Registrations per IP (`--register-rate`).
    pub register_limiter: KeyedLimiter,
    /// Writes through REST per user (`--msg-rate` per second).
    pub write_limiter: KeyedLimiter,
    /// Rooms created per user (`--room-rate`).
    pub room_limiter: KeyedLimiter,
    /// Refused anonymous upgrades per address.
    pub upgrade_refusals: KeyedLimiter,
    /// Anonymous refusals folded into one audit row per address and minute.
    pub folds: Arc<Folds>,
    /// Runs bcrypt on a bounded number of threads.
    pub slow_lane: SlowLane,
    /// Answers refused password requests after a pause.
    pub tarpit: Tarpit,
    /// Closes sockets whose token expires.
    pub expiry: ExpiryTimer,
    /// Descriptor numbers of live WebSockets (skipped when looking for new ones).
    pub known_sockets: Arc<KnownSockets>,
    /// Plain HTTP connections: turns, activity, deadlines (read by the reaper).
    pub conns: Arc<Conns>,
    /// IO threads for bodies and answers that may wait on a client.
    pub lane: Lane,
    /// The address we listen on (its port finds upgraded sockets' descriptors).
    pub local_addr: std::net::SocketAddr,
}
