//! Closes plain HTTP connections that must go.
//!
//! tiny_http has no timeouts: an idle keep-alive connection, a client that opens a
//! connection and sends nothing or half a request head (slowloris), or one that sends
//! a body or reads an answer at a trickle would each pin a thread forever. The
//! `http-reaper` thread wakes every quarter second and
//!
//! - shuts down connections whose body read or answer write is past its deadline
//!   (armed by [`crate::exchange`], kept in [`crate::conns`]);
//! - every few seconds, lists our accepted TCP connections (see [`crate::sys`]),
//!   skips WebSockets and connections with a request in progress, and shuts down
//!   those with no request started or finished for `--http-idle-timeout` seconds — or,
//!   if they never sent a whole request head, for `Config::http_head_timeout`;
//! - when a request waits unread on a connection listed before (tiny_http's pool
//!   queued the connection behind busy threads), makes empty connections that get
//!   queued ones a thread (see [`crate::sys::nudge_pool`]);
//! - when descriptors run short — more than `Config::fd_pressure_percent` of the
//!   open-file limit open (a cheap check each tick, an exact count in each listing) —
//!   lists at once and also shuts down idle connections regardless of the timeout,
//!   least recently active first, until `Config::fd_relief_percent` would be open.
//!   Connections younger than `Config::fd_pressure_grace` are spared. A flood of
//!   connections that takes every descriptor kills tiny_http's accept loop (see
//!   [`crate::front`], which then nudges this thread); this is what frees them.
//!
//! A shut-down connection's tiny_http thread then ends. [`crate::server`] starts and
//! stops the thread.

use crate::conns::Conns;
use crate::hub::Hub;
use crate::metrics::{add, METRICS};
use crate::service::{Nudger, Periodic};
use crate::sys::{fd_limit, lowest_free_fd, KnownSockets};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(250);
/// When new connections were seen with a request unread, how soon the next listing
/// checks whether they got a thread.
const RECHECK: Duration = Duration::from_secs(1);
/// Most empty connections made per listing to get queued connections a thread.
const MAX_NUDGES: usize = 64;

/// What the reaper looks at.
pub struct Watched {
    /// Live WebSockets (never reaped).
    pub hub: Arc<Hub>,
    /// Descriptor numbers of WebSockets, and the way to find connections.
    pub sockets: Arc<KnownSockets>,
    /// Turns, activity and deadlines per connection.
    pub conns: Arc<Conns>,
    /// Our listening port.
    pub port: u16,
    /// Our listening address (to nudge tiny_http's connection pool).
    pub listening: SocketAddr,
    /// `--http-idle-timeout`.
    pub idle_timeout: Duration,
    /// `Config::http_head_timeout`.
    pub head_timeout: Duration,
    /// When descriptors count as short.
    pub pressure: Pressure,
}

/// `Config::fd_pressure_percent`, `fd_relief_percent` and `fd_pressure_grace`.
#[derive(Debug, Clone, Copy)]
pub struct Pressure {
    /// Percent of the open-file limit open past which idle connections are shed.
    pub high: u8,
    /// Percent to shed down to.
    pub low: u8,
    /// Age below which a connection is spared.
    pub grace: Duration,
}

impl Pressure {
    /// How many descriptors `percent` of the limit is.
    fn of(percent: u8, limit: u64) -> usize {
        (limit.min(1 << 30) * u64::from(percent) / 100) as usize
    }
}

/// The reaper thread.
pub struct Reaper {
    thread: Periodic,
    urgent: Arc<AtomicBool>,
}

/// Makes the reaper list connections at once, as descriptors may be short.
#[derive(Clone)]
pub struct Alarm {
    urgent: Arc<AtomicBool>,
    nudger: Nudger,
}

impl Alarm {
    /// Rings it.
    pub fn ring(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        self.nudger.nudge();
    }
}

impl Reaper {
    /// Starts the thread.
    pub fn start(w: Watched) -> std::io::Result<Reaper> {
        let head = w.head_timeout.min(w.idle_timeout);
        let period = (head / 4).clamp(TICK, Duration::from_secs(5));
        let urgent = Arc::new(AtomicBool::new(false));
        let mut state = State::new(Instant::now(), period, urgent.clone());
        let thread = Periodic::start("http-reaper", TICK, move || state.tick(&w))?;
        Ok(Reaper { thread, urgent })
    }

    /// Stops the thread and joins it.
    pub fn stop(&self) {
        self.thread.stop();
    }

    /// A handle that makes the thread list connections at once (as when the accept
    /// loop died).
    pub fn alarm(&self) -> Alarm {
        Alarm {
            urgent: self.urgent.clone(),
            nudger: self.thread.nudger(),
        }
    }
}

struct State {
    /// When each open connection was first listed.
    first_seen: HashMap<SocketAddr, Instant>,
    next_pass: Instant,
    period: Duration,
    /// The last listing found descriptors short, or connections left unread: list
    /// again at the next tick.
    pressed: bool,
    urgent: Arc<AtomicBool>,
}

impl State {
    /// Nothing listed yet; the first regular pass comes `period` after `now`.
    fn new(now: Instant, period: Duration, urgent: Arc<AtomicBool>) -> State {
        State {
            first_seen: HashMap::new(),
            next_pass: now + period,
            period,
            pressed: false,
            urgent,
        }
    }

    fn tick(&mut self, w: &Watched) {
        let now = Instant::now();
        let late: HashSet<SocketAddr> = w.conns.take_expired(now).into_iter().collect();
        if !late.is_empty() {
            log::debug!("{} HTTP connections past their deadline", late.len());
            match w.sockets.shut_down_all(w.port, &late) {
                Ok(n) => add(&METRICS.http_cut_deadline, n),
                Err(e) => log::warn!("shutting down late connections: {e}"),
            }
        }
        let urgent = self.urgent.swap(false, Ordering::SeqCst);
        if urgent || self.pressed || now >= self.next_pass || short_of_descriptors(w) {
            self.next_pass = now + self.period;
            self.pass(w, now);
        }
    }

    /// Lists the connections and closes the idle ones.
    fn pass(&mut self, w: &Watched, now: Instant) {
        let sockets: HashSet<SocketAddr> = w.hub.all_peers().iter().map(|p| p.remote).collect();
        let listed_at = Instant::now();
        let survey = match w.sockets.survey(w.port) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("listing connections: {e}");
                return;
            }
        };
        let activity = w.conns.activity();
        let head_timeout = w.head_timeout.min(w.idle_timeout);
        let mut seen = HashMap::new();
        let mut idle = HashSet::new();
        // Connections listed before that never started a request, and those of them
        // with bytes waiting unread; and whether new ones have bytes unread.
        let (mut unstarted, mut starving, mut unread_new) = (0, 0, false);
        // Idle connections not (yet) past their timeout, least recently active first.
        let mut spare = Vec::new();
        for addr in survey.peers.into_iter().filter(|a| !sockets.contains(a)) {
            let first = self.first_seen.get(&addr).copied().unwrap_or(now);
            seen.insert(addr, first);
            let (timeout, since) = match activity.get(&addr) {
                // A request in progress: its deadlines govern.
                Some(a) if a.busy => continue,
                Some(a) => (w.idle_timeout, a.last.max(first)),
                None => {
                    let unread = survey.unread.contains(&addr);
                    if self.first_seen.contains_key(&addr) {
                        unstarted += 1;
                        starving += usize::from(unread);
                    } else {
                        unread_new |= unread;
                    }
                    (head_timeout, first)
                }
            };
            let quiet = now.saturating_duration_since(since);
            if quiet >= timeout {
                idle.insert(addr);
            } else if now.saturating_duration_since(first) >= w.pressure.grace {
                spare.push((since, addr));
            }
        }
        if !idle.is_empty() {
            log::debug!("closing {} idle HTTP connections", idle.len());
            match w.sockets.shut_down_all(w.port, &idle) {
                Ok(n) => add(&METRICS.http_reaped_idle, n),
                Err(e) => log::warn!("closing idle connections: {e}"),
            }
        }
        // Each connection holds two descriptors (tiny_http clones it).
        let open = survey.open.saturating_sub(2 * idle.len());
        let limit = fd_limit();
        self.pressed = open > Pressure::of(w.pressure.high, limit);
        if self.pressed {
            let excess = open - Pressure::of(w.pressure.low, limit);
            // Stable: equally quiet ones go in the order they were accepted.
            spare.sort_by_key(|(since, _)| *since);
            let shed: HashSet<SocketAddr> = spare
                .iter()
                .take(excess.div_ceil(2))
                .map(|(_, a)| *a)
                .collect();
            if !shed.is_empty() {
                log::warn!(
                    "{open} of {limit} descriptors open: closing the {} least active idle HTTP connections",
                    shed.len()
                );
            }
            match w.sockets.shut_down_all(w.port, &shed) {
                Ok(n) => add(&METRICS.http_reaped_pressure, n),
                Err(e) => log::warn!("closing idle connections: {e}"),
            }
        }
        let open: HashSet<SocketAddr> = seen.keys().copied().collect();
        if starving > 0 {
            // Requests waiting unread: tiny_http's pool queued their connections
            // behind busy threads (see `sys::nudge_pool`).
            log::debug!("{starving} connections waiting for a thread; nudging the pool");
            crate::sys::nudge_pool(w.listening, unstarted.min(MAX_NUDGES));
        }
        // Look again at the next tick rather than at the next pass: whether the pool
        // took them up. New connections with a request unread are normally just
        // arriving (a reconnect storm has hundreds at any moment), so for them a
        // second look comes after `RECHECK`: listing every descriptor every tick cost
        // a storm about 5 % of the server's CPU.
        self.pressed |= starving > 0;
        if unread_new {
            self.next_pass = self.next_pass.min(now + RECHECK);
        }
        w.conns
            .forget(&open, listed_at, now.checked_sub(w.idle_timeout * 2));
        self.first_seen = seen;
    }
}

/// The cheap check: whether the lowest free descriptor number is past the pressure
/// mark (a flood fills numbers from the bottom), or none is free.
fn short_of_descriptors(w: &Watched) -> bool {
    let high = Pressure::of(w.pressure.high, fd_limit());
    lowest_free_fd().is_none_or(|n| usize::try_from(n).unwrap_or(0) >= high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    /// A reaper's view of `listener`, with timeouts long enough that nothing is idle
    /// and a pressure mark no test process reaches.
    fn watched(listener: &TcpListener) -> Watched {
        let listening = listener.local_addr().unwrap();
        Watched {
            hub: Arc::new(Hub::new(16, 16)),
            sockets: Arc::new(KnownSockets::default()),
            conns: Arc::new(Conns::default()),
            port: listening.port(),
            listening,
            idle_timeout: Duration::from_secs(60),
            head_timeout: Duration::from_secs(20),
            pressure: Pressure {
                high: 100,
                low: 90,
                grace: Duration::from_secs(5),
            },
        }
    }

    /// A reaper state whose next regular pass is `period` away.
    fn state(now: Instant, period: Duration) -> State {
        State::new(now, period, Arc::new(AtomicBool::new(false)))
    }

    /// A client connection accepted on `listener`, which sent `sent` that nobody reads.
    fn accepted(listener: &TcpListener, sent: &[u8]) -> (TcpStream, TcpStream) {
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        client.write_all(sent).unwrap();
        (client, ours)
    }

    /// Waits until a listing sees `client`'s bytes waiting unread on our side.
    fn until_unread(w: &Watched, client: &TcpStream) {
        let addr = client.local_addr().unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        while !w.sockets.survey(w.port).unwrap().unread.contains(&addr) {
            assert!(Instant::now() < until, "the request never showed as unread");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether a connection (a nudge) arrives on `listener` within half a second.
    fn nudged(listener: &TcpListener) -> bool {
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            if listener.accept().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_new_connection_with_a_request_unread_is_looked_at_again_within_recheck() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = watched(&listener);
        let (client, _ours) = accepted(&listener, b"GET /healthz HTTP/1.1\r\n");
        until_unread(&w, &client);
        let now = Instant::now();
        let mut s = state(now, Duration::from_secs(5));
        s.pass(&w, now);
        // New and unread is normally a request just arriving: no nudge yet, but a
        // second look after RECHECK rather than at the regular pass 5 s away.
        assert_eq!(s.next_pass, now + RECHECK);
        assert!(!s.pressed);
        assert!(
            !nudged(&listener),
            "a connection seen once must not be nudged"
        );
        // Still unread at the second look: it waits behind busy threads, so the pool is
        // nudged and the next tick looks again.
        let later = now + RECHECK;
        s.pass(&w, later);
        assert!(s.pressed, "a starving connection keeps the reaper listing");
        assert!(nudged(&listener), "a starving connection nudges the pool");
    }

    #[test]
    fn a_new_connection_with_nothing_unread_waits_for_the_regular_pass() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = watched(&listener);
        let (client, _ours) = accepted(&listener, b"");
        let now = Instant::now();
        let mut s = state(now, Duration::from_secs(5));
        s.pass(&w, now);
        assert!(s.first_seen.contains_key(&client.local_addr().unwrap()));
        assert_eq!(s.next_pass, now + Duration::from_secs(5));
        s.pass(&w, now + RECHECK);
        assert!(!s.pressed);
        assert!(!nudged(&listener), "an empty connection is not starving");
    }
}
