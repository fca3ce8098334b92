//! Starting and stopping a server: open the database, bind, start every background
//! service, run the HTTP workers, and on SIGTERM or SIGINT shut down in order.
//!
//! This is the one place services start and stop. The main thread waits for a signal;
//! then it stops accepting (the accept watch, then the HTTP workers joined, listener
//! closed), lets the IO threads
//! finish what they write (for a bounded time), commits and delivers
//! what is pending, closes every socket with 1001 and waits for their threads to write
//! their disconnects, then stops the services in the reverse order of their
//! dependencies: the sweep, keepalive, presence batches, the cluster heartbeat (it says
//! goodbye to the other nodes) and the reaper (they look at sockets),
//! the expiry timer, the
//! tarpit (it answers what it held) and the password threads, fan-out, the flusher,
//! and last the store (writer, completions, checkpointer, a final checkpoint).

use crate::app::App;
use crate::auth::Auth;
use crate::config::Config;
use crate::enforce::{ExpiryTimer, Sweeper};
use crate::fanout::Fanout;
use crate::front::Front;
use crate::heartbeat::Heartbeat;
use crate::hub::Hub;
use crate::keepalive::Keepalive;
use crate::lane::Lane;
use crate::limits::{Folds, KeyedLimiter, LoginLimits, SlowLane, Tarpit};
use crate::peer::{close, Flusher};
use crate::presence::Batcher;
use crate::reaper::{Pressure, Reaper, Watched};
use crate::service::Periodic;
use crate::store::audit::AuditEntry;
use crate::store::Store;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);
/// Anonymous upgrade refusals an address gets answered at once per minute; past it,
/// 429 after the tarpit's pause.
const UPGRADE_REFUSALS_PER_MINUTE: u32 = 60;
/// Longest a shutdown waits for IO threads still writing to slow clients.
const IO_DRAIN: Duration = Duration::from_secs(2);

/// The services no request handler needs a handle to.
struct Background {
    flusher: Flusher,
    folds: Periodic,
    keepalive: Option<Keepalive>,
    presence: Batcher,
    heartbeat: Option<Heartbeat>,
    sweeper: Sweeper,
    reaper: Reaper,
    front: Front,
}

/// Runs the server until SIGTERM or SIGINT.
pub fn serve(cfg: Config) -> Result<(), String> {
    let mut cfg = cfg;
    let fd_limit = crate::sys::raise_fd_limit();
    cfg.max_sockets = fit_socket_limit(cfg.max_sockets, fd_limit);
    let store = Arc::new(Store::open_at(&cfg.db).map_err(|e| format!("opening {}: {e}", cfg.db))?);
    if let Some(bytes) = cfg.max_db_bytes {
        store
            .cap_size(bytes)
            .map_err(|e| format!("capping the database: {e}"))?;
    }
    let auth = Auth::new(&store, &cfg).map_err(|e| e.to_string())?;
    let listener =
        crate::sys::listen(&cfg.addr).map_err(|e| format!("binding {}: {e}", cfg.addr))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    let flusher = Flusher::start().map_err(|e| e.to_string())?;
    let app = Arc::new(start_app(cfg, store, auth, &flusher, local)?);
    let background = start_background(&app, listener, flusher)?;
    log::info!(
        "listening on http://{local} (database {}, open-file limit {fd_limit})",
        app.cfg.db
    );
    println!("parley listening on http://{local}");
    let _ = std::io::stdout().flush();

    let sig = signals.forever().next();
    log::info!("signal {sig:?}: shutting down");
    shutdown(&app, background);
    Ok(())
}

/// Starts the services requests use and gathers them into the shared state.
fn start_app(
    cfg: Config,
    store: Arc<Store>,
    auth: Auth,
    flusher: &Flusher,
    local: std::net::SocketAddr,
) -> Result<App, String> {
    let io = |e: std::io::Error| e.to_string();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hub = Arc::new(Hub::new(cfg.max_sockets, cfg.max_sockets_per_user));
    Ok(App {
        fanout: Arc::new(Fanout::start(hub.clone()).map_err(io)?),
        hub,
        nodes: Default::default(),
        flush_queue: flusher.queue(),
        login_limits: LoginLimits::new(cfg.login_rate),
        register_limiter: KeyedLimiter::new(cfg.register_rate, HOUR),
        room_limiter: KeyedLimiter::new(cfg.room_rate, HOUR),
        write_limiter: KeyedLimiter::new(cfg.msg_rate, Duration::from_secs(1)),
        upgrade_refusals: KeyedLimiter::new(UPGRADE_REFUSALS_PER_MINUTE, MINUTE),
        folds: Default::default(),
        slow_lane: SlowLane::start(cores, 64).map_err(io)?,
        tarpit: Tarpit::start(Duration::from_secs(1), 4096).map_err(io)?,
        expiry: ExpiryTimer::start().map_err(io)?,
        conns: Default::default(),
        lane: Lane::new(
            cfg.http_io_threads,
            cfg.http_per_address,
            crate::http::HANDLER_STACK,
        ),
        known_sockets: reserved_sockets(),
        rooms: Default::default(),
        local_addr: local,
        cfg,
        store,
        auth,
    })
}

/// The registry of upgraded sockets' descriptors, with its reserve: descriptors kept
/// so that connections can still be listed and shut down when none is free.
fn reserved_sockets() -> Arc<crate::sys::KnownSockets> {
    let known = crate::sys::KnownSockets::default();
    if let Err(e) = known.reserve_descriptors() {
        log::warn!("no reserved descriptors for the reaper: {e}");
    }
    Arc::new(known)
}

/// Starts the services no request calls: the revocation sweep, presence batches, the
/// cluster heartbeat (on a shared database), the HTTP reaper, and the front door
/// (tiny_http on `listener`, its watch, the workers).
fn start_background(
    app: &Arc<App>,
    listener: TcpListener,
    flusher: Flusher,
) -> Result<Background, String> {
    let sweeper = Sweeper::start(app.hub.clone(), app.store.clone())?;
    app.store
        .listen(crate::cluster::sink(Arc::downgrade(app)))
        .map_err(|e| format!("listening for other nodes: {e}"))?;
    let (folds, store) = (app.folds.clone(), app.store.clone());
    let folds = Periodic::start("audit-folds", MINUTE, move || write_folds(&folds, &store))
        .map_err(|e| e.to_string())?;
    let keepalive =
        Keepalive::start(app.hub.clone(), app.cfg.ws_ping).map_err(|e| e.to_string())?;
    let presence =
        Batcher::start(app.hub.clone(), app.fanout.clone()).map_err(|e| e.to_string())?;
    // After `listen` (the other nodes' answers must be heard), before the front door.
    let heartbeat = Heartbeat::start(app)?;
    let reaper = Reaper::start(Watched {
        hub: app.hub.clone(),
        sockets: app.known_sockets.clone(),
        conns: app.conns.clone(),
        port: app.local_addr.port(),
        listening: app.local_addr,
        idle_timeout: app.cfg.http_idle_timeout,
        head_timeout: app.cfg.http_head_timeout,
        pressure: Pressure {
            high: app.cfg.fd_pressure_percent,
            low: app.cfg.fd_relief_percent,
            grace: app.cfg.fd_pressure_grace,
        },
    })
    .map_err(|e| e.to_string())?;
    let front = Front::start(app, listener, reaper.alarm())?;
    Ok(Background {
        flusher,
        folds,
        keepalive,
        presence,
        heartbeat,
        sweeper,
        reaper,
        front,
    })
}

/// Lowers `--max-sockets` to what the process can hold, so a flood of sockets meets
/// 429 rather than a failed thread or descriptor — tiny_http's accept thread dies on
/// either (see [`crate::front`] for how it comes back). What a socket costs is in
/// [`crate::sys::socket_ceiling`]; a GraphQL socket holds a second thread, and
/// [`crate::hub::Hub::reserve`] counts it as two sockets.
fn fit_socket_limit(wanted: usize, fd_limit: u64) -> usize {
    let max_maps = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    sockets_that_fit(wanted, fd_limit, max_maps)
}

fn sockets_that_fit(wanted: usize, fd_limit: u64, max_maps: Option<u64>) -> usize {
    let fits =
        usize::try_from(crate::sys::socket_ceiling(fd_limit, max_maps)).unwrap_or(usize::MAX);
    if wanted > fits {
        log::warn!(
            "--max-sockets {wanted} lowered to {fits}: open-file limit {fd_limit}, vm.max_map_count {max_maps:?}"
        );
    }
    wanted.min(fits)
}

/// Writes the summary row of every fold with repeats: how many refusals of that kind
/// came from that address in the window that just ended.
fn write_folds(folds: &Folds, store: &Store) {
    for f in folds.drain() {
        store.audit(AuditEntry {
            actor: None,
            action: f.action,
            target: None,
            ip: Some(f.ip),
            detail: serde_json::json!({"repeated": f.repeated, "window_secs": MINUTE.as_secs()}),
        });
    }
}

fn shutdown(app: &Arc<App>, background: Background) {
    background.front.stop();
    // The reaper still runs: it cuts an IO thread's client past its deadline.
    app.lane.stop(IO_DRAIN);
    // Commit what is queued and hand its acks and broadcasts to the sockets; the close
    // frames go after them.
    app.store.sync();
    app.fanout.sync();
    for p in app.hub.all_peers() {
        p.close_after_pending(close::GOING_AWAY, "server shutting down");
    }
    // Each socket's thread ends by writing its disconnect to the audit trail.
    let deadline = Instant::now() + Duration::from_secs(3);
    while app.hub.socket_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    background.sweeper.stop();
    if let Some(k) = &background.keepalive {
        k.stop();
    }
    background.presence.stop();
    if let Some(h) = &background.heartbeat {
        h.stop(&app.hub);
    }
    background.reaper.stop();
    app.expiry.stop();
    app.tarpit.stop();
    app.slow_lane.stop();
    background.folds.stop();
    write_folds(&app.folds, &app.store);
    app.fanout.stop();
    background.flusher.stop();
    app.store.close();
    log::info!("stopped");
}

/// Creates a small demo database at `file`: the schema, an admin, a member and a few
/// messages in `general`. This is how `chat.db.example` is made.
pub fn example_db(file: &Path, cfg: &Config) -> Result<(), String> {
    if file.exists() {
        return Err(format!("{} exists", file.display()));
    }
    let store = Store::open(file).map_err(|e| e.to_string())?;
    let hash =
        |pw: &str| crate::auth::hash_password(pw, cfg.bcrypt_cost).map_err(|e| e.to_string());
    let now = crate::clock::now_rfc3339;
    let admin = store
        .create_user(
            "admin",
            hash("admin-password")?,
            Some("admin".into()),
            now(),
        )
        .map_err(|e| e.to_string())?;
    let member = store
        .create_user(
            "alice",
            hash("alice-password")?,
            Some("member".into()),
            now(),
        )
        .map_err(|e| e.to_string())?;
    let general = store
        .room("general")
        .map_err(|e| e.to_string())?
        .ok_or("no general room")?;
    let lines = [
        (&admin, "Welcome to parley! This is a demo database."),
        (&member, "Hi! Open me with: sqlite3 chat.db.example"),
        (
            &admin,
            "Every message here was acknowledged only after it reached the disk.",
        ),
    ];
    for (user, body) in lines {
        let (tx, rx) = std::sync::mpsc::channel();
        let from = crate::store::messages::Sender {
            id: user.id,
            name: user.username.clone(),
            client_id: None,
        };
        store.insert_message(general.clone(), from, body.into(), move |r| {
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    store.close();
    // One self-contained file: no -wal or -shm beside it.
    let c = rusqlite::Connection::open(file).map_err(|e| e.to_string())?;
    c.pragma_update(None, "journal_mode", "DELETE")
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sockets_that_fit;

    #[test]
    fn socket_limit_fits_descriptors_and_mappings() {
        let maps = Some(65_530);
        assert_eq!(sockets_that_fit(10_000, 20_000, maps), 6_496, "fd-bound");
        // Two mappings a thread where `sys::main` starts the process, four elsewhere
        // (tests/socket.rs measures it).
        let map_bound = if cfg!(all(target_os = "linux", target_env = "gnu")) {
            31_765
        } else {
            15_882
        };
        assert_eq!(sockets_that_fit(40_000, 1 << 20, maps), map_bound);
        assert_eq!(
            sockets_that_fit(100, 20_000, maps),
            100,
            "a lower wish stands"
        );
        assert_eq!(sockets_that_fit(100, 10, Some(10)), 1, "never zero");
        assert_eq!(sockets_that_fit(10_000, 1 << 20, None), 10_000);
    }
}
