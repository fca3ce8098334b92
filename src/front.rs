//! The front door: tiny_http's accept loop, watched, and the HTTP workers behind it.
//!
//! tiny_http accepts connections on one thread of its own that nobody can join or
//! restart. When the process runs out of descriptors, either `accept` fails (the loop
//! hands the error to `recv` and ends) or the descriptor for its second handle on a
//! connection cannot be made (the thread panics). Either way the thread drops the
//! listening socket, and the server would stay up but deaf for good. So parley keeps a
//! duplicate of the listening socket and the `http-accept` thread watches: when
//! tiny_http's own handle on the socket is gone — checked every second, and at once
//! when a worker gets the loop's error from `recv` or a thread parley did not start
//! panics — it waits until `Config::accept_headroom` descriptors are free and starts a
//! new tiny_http server on a fresh duplicate of the same socket. Connections that
//! arrived meanwhile wait in its listen backlog; the reaper is asked to shed idle
//! connections (see [`crate::reaper`]) so that descriptors do free up.
//!
//! Nothing the old server accepted is dropped: WebSockets live on their own threads,
//! and the old server's workers keep answering its keep-alive connections until none
//! of them is left open; then they end and the old server is dropped.
//!
//! Threads: `http-accept` (the watch) and the HTTP workers (`http-N`, `http-G.N` after
//! the G-th restart), which take requests from tiny_http and hand them to
//! [`crate::exchange::take`]. All are started by [`Front::start`] and ended by
//! [`Front::stop`], both called by [`crate::server`].

use crate::app::App;
use crate::metrics::{inc, METRICS};
use crate::reaper::Alarm;
use crate::service::{StopSignal, Woke, Worker, SERVICE_STACK};
use crate::sync::lock;
use crate::sys::{fds_free, is_same_socket};
use rustix::fd::AsRawFd;
use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a live accept loop is checked.
const CHECK: Duration = Duration::from_secs(1);
/// How often a dead one is checked, and descriptors counted, until it is replaced.
const RETRY: Duration = Duration::from_millis(10);
/// How long to check at `RETRY` after a sign of trouble (an error, a panic).
const ALERT: Duration = Duration::from_secs(1);
/// How often old servers are checked for connections left.
const DRAIN_CHECK: Duration = Duration::from_secs(1);
/// Old servers kept draining at most; past it the oldest one's connections are cut.
const MAX_DRAINING: usize = 4;

/// The accept loop's watch, and the servers and workers it runs.
pub struct Front {
    shared: Arc<Shared>,
    watch: Worker,
}

struct Shared {
    app: Arc<App>,
    /// Our duplicate of the listening socket (taken out at shutdown).
    listener: Mutex<Option<TcpListener>>,
    signal: Arc<StopSignal>,
    /// Asks the reaper to shed connections (to free descriptors).
    reaper: Alarm,
    doors: Mutex<Doors>,
}

struct Doors {
    /// The server accepting now (None once stopped).
    current: Option<Door>,
    /// Old servers whose accept loop died, with their connections still open.
    draining: Vec<(Door, HashSet<SocketAddr>)>,
    restarts: u64,
}

/// One tiny_http server and the workers taking its requests.
struct Door {
    server: Arc<tiny_http::Server>,
    /// The number under which tiny_http's accept thread holds the listening socket.
    listening_fd: i32,
    workers: Vec<JoinHandle<()>>,
    closing: Arc<AtomicBool>,
}

/// What a server's workers share.
struct Line {
    server: Arc<tiny_http::Server>,
    /// Held to take a request and its turn together (see [`crate::exchange::take`]).
    taking: Mutex<()>,
    closing: Arc<AtomicBool>,
    /// Wakes the watch.
    signal: Arc<StopSignal>,
}

impl Door {
    /// A tiny_http server on `listener` (a duplicate of ours) and its workers.
    fn open(
        app: &Arc<App>,
        signal: &Arc<StopSignal>,
        listener: TcpListener,
        restarts: u64,
    ) -> Result<Door, String> {
        let listening_fd = listener.as_raw_fd();
        let server = tiny_http::Server::from_listener(listener, None).map_err(|e| e.to_string())?;
        let server = Arc::new(server);
        let closing = Arc::new(AtomicBool::new(false));
        let line = Arc::new(Line {
            server: server.clone(),
            taking: Mutex::new(()),
            closing: closing.clone(),
            signal: signal.clone(),
        });
        let workers = (0..app.cfg.http_workers)
            .filter_map(|i| {
                let name = match restarts {
                    0 => format!("http-{i}"),
                    g => format!("http-{g}.{i}"),
                };
                let (app, line) = (app.clone(), line.clone());
                std::thread::Builder::new()
                    .name(name)
                    .stack_size(crate::http::HANDLER_STACK)
                    .spawn(move || work(&app, &line))
                    .map_err(|e| log::error!("could not start an HTTP worker: {e}"))
                    .ok()
            })
            .collect();
        Ok(Door {
            server,
            listening_fd,
            workers,
            closing,
        })
    }

    /// Ends the workers once they have taken what is queued, and joins them.
    fn close_workers(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Lets go of a server whose accept loop is dead. Dropping a tiny_http server
    /// stops its accept thread by connecting to the listening address — a connection
    /// that would wait in the backlog, or block us if the backlog is full — and that
    /// thread is gone already; so the few hundred bytes are left behind instead.
    fn abandon(mut self) {
        self.close_workers();
        std::mem::forget(self.server);
    }
}

/// A worker's life: requests from its server until it is closing. One worker at a
/// time takes a request and its turn; then runs it while the next one takes.
fn work(app: &Arc<App>, line: &Line) {
    loop {
        let taken = {
            let _one_at_a_time = lock(&line.taking);
            line.server
                .recv()
                .map(|rq| crate::exchange::take(app, rq, crate::http::dispatch))
        };
        match taken {
            Ok(taken) => taken.finish(app),
            Err(_) if line.closing.load(Ordering::SeqCst) => return,
            // The accept loop's last word; keep answering what it accepted.
            Err(e) => {
                log::error!("the HTTP accept loop failed: {e}");
                line.signal.nudge();
            }
        }
    }
}

/// [`Door::open`] on a helper thread named like the main thread: tiny_http's threads
/// take the system name of the thread that creates them, and would otherwise all be
/// called `http-accept` after a restart.
fn open_elsewhere(
    app: &Arc<App>,
    signal: &Arc<StopSignal>,
    listener: TcpListener,
    restarts: u64,
) -> Result<Door, String> {
    let (app, signal) = (app.clone(), signal.clone());
    std::thread::Builder::new()
        .name("parley".into())
        .stack_size(SERVICE_STACK)
        .spawn(move || Door::open(&app, &signal, listener, restarts))
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "starting a server panicked".to_string())?
}

/// Makes a panic in a thread parley did not start (tiny_http's accept and connection
/// threads are the only ones) wake the watch at once; then the default report.
fn watch_panics(signal: &Arc<StopSignal>) {
    let signal = signal.clone();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_none() {
            signal.nudge();
        }
        report(info);
    }));
}

impl Front {
    /// Serves `listener` with tiny_http and `Config::http_workers` workers, and starts
    /// the watch. `reaper` is rung when the accept loop dies.
    pub fn start(app: &Arc<App>, listener: TcpListener, reaper: Alarm) -> Result<Front, String> {
        let signal = Arc::new(StopSignal::default());
        let theirs = listener.try_clone().map_err(|e| e.to_string())?;
        let first = Door::open(app, &signal, theirs, 0)?;
        let shared = Arc::new(Shared {
            app: app.clone(),
            listener: Mutex::new(Some(listener)),
            signal: signal.clone(),
            reaper,
            doors: Mutex::new(Doors {
                current: Some(first),
                draining: Vec::new(),
                restarts: 0,
            }),
        });
        watch_panics(&signal);
        let s = shared.clone();
        let watch = Worker::spawn("http-accept", SERVICE_STACK, move || s.watch())
            .map_err(|e| e.to_string())?;
        Ok(Front { shared, watch })
    }

    /// Ends the watch, then every server: its workers take what is queued and end,
    /// our listening socket is closed, and the servers are dropped.
    pub fn stop(&self) {
        self.shared.signal.stop();
        self.watch.join();
        let mut doors = lock(&self.shared.doors);
        let alive = self.shared.accepting(&doors);
        let old: Vec<Door> = doors.draining.drain(..).map(|(d, _)| d).collect();
        let current = doors.current.take();
        drop(doors);
        for d in old {
            d.abandon();
        }
        let Some(mut current) = current else {
            return;
        };
        current.close_workers();
        drop(lock(&self.shared.listener).take());
        if alive {
            // Dropping it wakes its accept thread, which then ends.
            drop(current);
        } else {
            current.abandon();
        }
    }
}

impl Shared {
    /// The watch thread's life.
    fn watch(&self) {
        let mut dead_since: Option<Instant> = None;
        let mut alert_until = Instant::now();
        let mut next_drain_check = Instant::now() + DRAIN_CHECK;
        loop {
            let hurry = dead_since.is_some() || Instant::now() < alert_until;
            match self.signal.nap(if hurry { RETRY } else { CHECK }) {
                Woke::Stopped => return,
                Woke::Nudged => alert_until = Instant::now() + ALERT,
                Woke::TimeUp => {}
            }
            let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.check(&mut dead_since)
            }));
            if checked.is_err() {
                log::error!("checking the accept loop panicked");
            }
            if Instant::now() >= next_drain_check {
                self.retire_drained();
                next_drain_check = Instant::now() + DRAIN_CHECK;
            }
        }
    }

    /// Whether the current server's accept loop still holds the listening socket.
    fn accepting(&self, doors: &Doors) -> bool {
        let listener = lock(&self.listener);
        match (&doors.current, listener.as_ref()) {
            (Some(door), Some(l)) => is_same_socket(door.listening_fd, l),
            _ => true,
        }
    }

    /// Notices a dead accept loop and replaces it once descriptors are free.
    fn check(&self, dead_since: &mut Option<Instant>) {
        let mut doors = lock(&self.doors);
        if self.accepting(&doors) {
            return;
        }
        let since = *dead_since.get_or_insert_with(|| {
            log::error!(
                "the HTTP accept loop died (out of descriptors?); serving again once some are free"
            );
            self.reaper.ring();
            Instant::now()
        });
        let Some(dup) = self.free_duplicate() else {
            return;
        };
        let restarts = doors.restarts + 1;
        // The connections open now were all accepted by the servers so far.
        let port = self.app.local_addr.port();
        let theirs: HashSet<SocketAddr> = match self.app.known_sockets.survey(port) {
            Ok(s) => s.peers.into_iter().collect(),
            Err(e) => {
                log::warn!("listing connections: {e}");
                HashSet::new()
            }
        };
        match open_elsewhere(&self.app, &self.signal, dup, restarts) {
            Ok(door) => {
                doors.restarts = restarts;
                if let Some(old) = doors.current.replace(door) {
                    doors.draining.push((old, theirs));
                }
                inc(&METRICS.http_accept_restarts);
                // The backlog comes in a burst; the reaper sees that it is taken up.
                self.reaper.ring();
                log::warn!(
                    "accepting connections again, {:?} after the accept loop died",
                    since.elapsed()
                );
                *dead_since = None;
            }
            Err(e) => log::warn!("restarting the accept loop: {e}"),
        }
    }

    /// A new duplicate of the listening socket, if `Config::accept_headroom`
    /// descriptors are free besides.
    fn free_duplicate(&self) -> Option<TcpListener> {
        let listener = lock(&self.listener);
        let l = listener.as_ref()?;
        if !fds_free(l, self.app.cfg.accept_headroom) {
            return None;
        }
        l.try_clone().ok()
    }

    /// Ends the old servers none of whose connections is open any more (keeping at
    /// most `MAX_DRAINING`: past that, the oldest one's connections are cut).
    fn retire_drained(&self) {
        let mut doors = lock(&self.doors);
        if doors.draining.is_empty() || !self.accepting(&doors) {
            return;
        }
        let port = self.app.local_addr.port();
        let open: HashSet<SocketAddr> = match self.app.known_sockets.survey(port) {
            Ok(s) => s.peers.into_iter().collect(),
            Err(e) => return log::warn!("listing connections: {e}"),
        };
        for (_, conns) in doors.draining.iter_mut() {
            conns.retain(|a| open.contains(a));
        }
        if doors.draining.len() > MAX_DRAINING {
            let (_, oldest) = &doors.draining[0];
            log::warn!("cutting {} connections of an old HTTP server", oldest.len());
            let _ = self.app.known_sockets.shut_down_all(port, oldest);
        }
        let (done, keep): (Vec<_>, Vec<_>) = doors
            .draining
            .drain(..)
            .partition(|(_, conns)| conns.is_empty());
        doors.draining = keep;
        drop(doors);
        for (door, _) in done {
            door.abandon();
            log::info!("an old HTTP server has no connections left; its workers ended");
        }
    }
}
