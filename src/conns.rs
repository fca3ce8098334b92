//! The plain-HTTP connections parley is answering, by peer address: whose turn it is,
//! what waits behind it, how much has been written to it, and by when its current
//! read or write must be done.
//!
//! tiny_http hands over requests, not connections, and writes the answers of one
//! connection strictly in order: the answer to a pipelined second request waits,
//! inside tiny_http, until the first one's is written — so a thread answering the
//! second would wait on whatever holds up the first (a client that does not read).
//! Here each connection has one turn at a time: a request is handled only once the
//! one before it on the same connection is done, and later ones wait in the
//! connection's queue, holding no thread. One connection therefore never ties up more
//! than one thread.
//!
//! No thread of its own: HTTP workers and IO threads take and end turns (see
//! [`crate::exchange`]); the `http-reaper` thread reads activity, cuts connections
//! whose deadline passed and forgets closed ones (see [`crate::reaper`]).

use crate::sync::lock;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;
use tiny_http::Request;

/// The registry.
#[derive(Default)]
pub struct Conns {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    conns: HashMap<SocketAddr, Conn>,
    /// Connections with a read or write under way, and when it must be done.
    deadlines: HashMap<SocketAddr, Instant>,
}

struct Conn {
    /// When a request last started or finished.
    last: Instant,
    /// A request of this connection is being handled.
    busy: bool,
    /// Pipelined requests waiting for their turn, in order.
    waiting: VecDeque<Request>,
    /// Bytes of answers written or being written (an estimate from above).
    sent: usize,
    /// The connection was shut down; what is left of it is only disposed of.
    cut: bool,
}

impl Conn {
    fn new(now: Instant) -> Conn {
        Conn {
            last: now,
            busy: false,
            waiting: VecDeque::new(),
            sent: 0,
            cut: false,
        }
    }
}

/// What to do with a request just taken from tiny_http.
pub enum Begin {
    /// Its turn: handle it.
    Go(Request),
    /// It waits behind the request in progress on its connection.
    Queued,
    /// Too many requests wait on its connection: cut it.
    Overflow,
}

/// The request whose turn comes next on a connection, if any.
pub struct Next {
    /// The request, now in progress.
    pub request: Option<Request>,
    /// Whether the connection was cut (the request is only to be disposed of).
    pub cut: bool,
}

/// What the reaper needs to know about one connection.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    /// When a request last started or finished on it.
    pub last: Instant,
    /// Whether a request is in progress (or waiting) on it.
    pub busy: bool,
}

impl Conns {
    /// Takes the turn for `rq` on `addr` if the connection has none in progress, else
    /// queues it (up to `max_waiting`).
    pub fn begin(&self, addr: SocketAddr, rq: Request, max_waiting: usize) -> Begin {
        let now = Instant::now();
        let mut t = lock(&self.table);
        let c = t.conns.entry(addr).or_insert_with(|| Conn::new(now));
        if c.busy {
            if c.waiting.len() >= max_waiting && !c.cut {
                c.waiting.push_back(rq);
                return Begin::Overflow;
            }
            c.waiting.push_back(rq);
            return Begin::Queued;
        }
        if c.cut {
            // Nothing of the cut connection is left (its entry would be gone but for a
            // race): this is a new connection from the same address.
            *c = Conn::new(now);
        }
        c.busy = true;
        c.last = now;
        Begin::Go(rq)
    }

    /// Ends the turn on `addr` (its request must be dropped already: its answer is
    /// written or abandoned) and starts the next waiting one, if any.
    pub fn finish(&self, addr: SocketAddr) -> Next {
        let now = Instant::now();
        let mut t = lock(&self.table);
        t.deadlines.remove(&addr);
        let Some(c) = t.conns.get_mut(&addr) else {
            return Next {
                request: None,
                cut: false,
            };
        };
        c.last = now;
        let request = c.waiting.pop_front();
        c.busy = request.is_some();
        let cut = c.cut;
        if cut && request.is_none() {
            // Dead: a later request from this address comes on a new connection.
            t.conns.remove(&addr);
        }
        Next { request, cut }
    }

    /// Counts an answer of `bytes` about to be written on `addr` and says whether the
    /// connection's total stays within `limit` — then a blocking write of it cannot
    /// wait on the client (see [`crate::exchange`]), and `deadline` is armed for it.
    pub fn may_write_here(
        &self,
        addr: SocketAddr,
        bytes: usize,
        limit: usize,
        deadline: Instant,
    ) -> bool {
        let mut t = lock(&self.table);
        let Some(c) = t.conns.get_mut(&addr) else {
            return false;
        };
        c.sent = c.sent.saturating_add(bytes);
        let fits = c.sent <= limit;
        if fits {
            t.deadlines.insert(addr, deadline);
        }
        fits
    }

    /// Arms (or moves) the deadline of the read or write under way on `addr`; the
    /// turn's end disarms it. `bytes` about to be written are counted.
    pub fn arm(&self, addr: SocketAddr, deadline: Instant, bytes: usize) {
        let mut t = lock(&self.table);
        if let Some(c) = t.conns.get_mut(&addr) {
            c.sent = c.sent.saturating_add(bytes);
        }
        t.deadlines.insert(addr, deadline);
    }

    /// Removes and returns the connections whose deadline has passed, marking them cut.
    pub fn take_expired(&self, now: Instant) -> Vec<SocketAddr> {
        let mut t = lock(&self.table);
        if t.deadlines.is_empty() {
            return Vec::new();
        }
        let due: Vec<SocketAddr> = t
            .deadlines
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(a, _)| *a)
            .collect();
        for a in &due {
            t.deadlines.remove(a);
            if let Some(c) = t.conns.get_mut(a) {
                c.cut = true;
            }
        }
        due
    }

    /// Marks `addr` cut; true the first time (the caller then shuts it down), or if
    /// the connection is not known (then there is nothing to mark).
    pub fn mark_cut(&self, addr: SocketAddr) -> bool {
        let mut t = lock(&self.table);
        t.conns
            .get_mut(&addr)
            .is_none_or(|c| !std::mem::replace(&mut c.cut, true))
    }

    /// Every known connection's activity, for one reaper pass.
    pub fn activity(&self) -> HashMap<SocketAddr, Activity> {
        let t = lock(&self.table);
        t.conns
            .iter()
            .map(|(a, c)| {
                let busy = c.busy || !c.waiting.is_empty();
                (*a, Activity { last: c.last, busy })
            })
            .collect()
    }

    /// Forgets connections that were closed when `open` was listed at `listed_at`, or
    /// idle since before `cutoff`, unless a request is in progress on them or started
    /// after the listing. (What a connection was sent must not be forgotten while it
    /// is open: see [`Conns::may_write_here`].)
    pub fn forget(&self, open: &HashSet<SocketAddr>, listed_at: Instant, cutoff: Option<Instant>) {
        let mut t = lock(&self.table);
        t.conns.retain(|a, c| {
            let recent = cutoff.is_none_or(|cut| c.last >= cut);
            c.busy || !c.waiting.is_empty() || c.last >= listed_at || (open.contains(a) && recent)
        });
    }

    /// How many connections are known.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rq(n: u8) -> Request {
        tiny_http::TestRequest::new()
            .with_path(&format!("/{n}"))
            .into()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_turn_per_connection_in_order() {
        let c = Conns::default();
        let (a, b) = (addr(1), addr(2));
        assert!(matches!(c.begin(a, rq(1), 4), Begin::Go(r) if r.url() == "/1"));
        assert!(matches!(c.begin(a, rq(2), 4), Begin::Queued));
        assert!(matches!(c.begin(a, rq(3), 4), Begin::Queued));
        // Another connection is not held up.
        assert!(matches!(c.begin(b, rq(9), 4), Begin::Go(_)));
        let next = c.finish(a);
        assert_eq!(
            next.request.map(|r| r.url().to_owned()).as_deref(),
            Some("/2")
        );
        assert!(c.activity()[&a].busy);
        let next = c.finish(a);
        assert_eq!(
            next.request.map(|r| r.url().to_owned()).as_deref(),
            Some("/3")
        );
        assert!(c.finish(a).request.is_none());
        assert!(!c.activity()[&a].busy);
        assert!(matches!(c.begin(a, rq(4), 4), Begin::Go(_)));
    }

    #[test]
    fn too_many_waiting_asks_for_a_cut_and_a_cut_connection_is_disposed_of() {
        let c = Conns::default();
        let a = addr(1);
        assert!(matches!(c.begin(a, rq(1), 1), Begin::Go(_)));
        assert!(matches!(c.begin(a, rq(2), 1), Begin::Queued));
        assert!(matches!(c.begin(a, rq(3), 1), Begin::Overflow));
        assert!(c.mark_cut(a));
        assert!(!c.mark_cut(a), "cut once");
        // After the cut, what waits is handed out in order, flagged for disposal.
        assert!(matches!(c.begin(a, rq(4), 1), Begin::Queued));
        let urls: Vec<String> = std::iter::from_fn(|| {
            let n = c.finish(a);
            assert!(n.request.is_none() || n.cut);
            n.request.map(|r| r.url().to_owned())
        })
        .collect();
        assert_eq!(urls, ["/2", "/3", "/4"]);
        // Then it is forgotten: the address's next connection starts afresh.
        assert!(matches!(c.begin(a, rq(5), 1), Begin::Go(_)));
        assert!(
            c.may_write_here(a, 10, 10, Instant::now()),
            "sent starts at 0"
        );
    }

    #[test]
    fn inline_writes_are_bounded_per_connection_and_arm_a_deadline() {
        let c = Conns::default();
        let a = addr(1);
        let soon = Instant::now() + Duration::from_millis(1);
        assert!(!c.may_write_here(a, 10, 100, soon), "unknown connection");
        assert!(matches!(c.begin(a, rq(1), 4), Begin::Go(_)));
        assert!(c.may_write_here(a, 60, 100, soon));
        assert!(!c.may_write_here(a, 60, 100, soon), "120 bytes in total");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.take_expired(Instant::now()), vec![a]);
        assert!(c.take_expired(Instant::now()).is_empty(), "taken once");
        assert!(!c.mark_cut(a), "expiry marks it cut");
        // The turn's end disarms.
        c.arm(a, soon, 0);
        c.finish(a);
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.take_expired(Instant::now()).is_empty());
    }

    #[test]
    fn forgets_closed_and_long_idle_connections_but_not_busy_ones() {
        let c = Conns::default();
        let (a, b, d) = (addr(1), addr(2), addr(3));
        for x in [a, b, d] {
            assert!(matches!(c.begin(x, rq(1), 4), Begin::Go(_)));
        }
        c.finish(a);
        c.finish(b);
        let open: HashSet<SocketAddr> = [a].into();
        let listed_at = Instant::now();
        c.forget(&open, listed_at, None);
        let left = c.activity();
        assert!(left.contains_key(&a), "open");
        assert!(!left.contains_key(&b), "closed");
        assert!(left.contains_key(&d), "busy");
        // One that began after the listing is not taken for closed.
        let e = addr(4);
        assert!(matches!(c.begin(e, rq(1), 4), Begin::Go(_)));
        c.finish(e);
        c.forget(&open, listed_at, None);
        assert!(c.activity().contains_key(&e), "newer than the listing");
        let later = Instant::now() + Duration::from_secs(1);
        c.forget(&open, later, Some(later));
        assert!(
            !c.activity().contains_key(&a),
            "idle since before the cutoff"
        );
        assert_eq!(c.len(), 1);
    }
}
