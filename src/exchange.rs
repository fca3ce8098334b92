//! One request's turn on its connection, from the moment an HTTP worker takes it from
//! tiny_http until its answer is written — and which thread does each part.
//!
//! The rule: an HTTP worker never waits on a client. Two things can make a thread
//! wait on one: reading a body that tiny_http did not read ahead (over 1 KiB, chunked,
//! or announced with `Expect: 100-continue` — even dropping such a request reads the
//! rest of its body), and writing an answer that the client does not take. So:
//!
//! - A request whose body is read on demand runs on an IO thread ([`crate::lane`]);
//!   any other runs on the worker that took it.
//! - An answer is written where it was produced only if that cannot block: while the
//!   connection has been sent at most `Config::http_inline_bytes` in all (8 KiB by
//!   default, half of Linux's smallest TCP send buffer, so the write completes even
//!   if the client reads nothing). Anything more is written on an IO thread.
//! - Every read or write that may wait has a deadline — `Config::http_io_timeout`
//!   plus the time to move its bytes at `Config::http_min_rate` — and the reaper
//!   shuts down a connection whose deadline passes, which ends the wait.
//! - When the IO threads are all busy, or the client's address holds its share of
//!   them, a request that needs one is refused: held a second in the tarpit (so the
//!   client does not come straight back), then its connection is shut down.
//! - The requests of one connection take turns ([`crate::conns`]); when a waiting one's
//!   turn comes, it runs on an IO thread.
//!
//! Threads: HTTP workers ([`crate::front`]) call [`take`] and [`Taken::finish`]; handlers run
//! on a worker or an IO thread; answers are also written from the password threads
//! and the tarpit, under the same rule. Nothing here has a thread of its own.

use crate::app::App;
use crate::conns::Begin;
use crate::lane::{on_io_thread, Permit};
use crate::metrics::{inc, METRICS};
use crate::request::{reads_body_on_demand, Reply};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiny_http::Request;

/// Added to a body's length to estimate an answer's size (our heads are ~250 bytes).
pub const HEAD_BYTES: usize = 512;

thread_local! {
    /// On an IO thread: the next request of the connection whose turn just ended
    /// there, to run before the thread gives its place back.
    static FOLLOW_UP: RefCell<Option<Exchange>> = const { RefCell::new(None) };
}

/// A request whose turn it is, with the turn: dropping the exchange drops the request
/// (tiny_http answers an unanswered one with a 500), then ends the turn and starts the
/// connection's next request.
pub struct Exchange {
    /// The request. Declared before `turn`, so it is dropped first.
    pub rq: Request,
    turn: Turn,
}

/// What answers a request whose turn it is (the routes, [`crate::http::dispatch`]):
/// given by the front door, so this module needs nothing from the routes.
pub type Handler = fn(&Arc<App>, Exchange);

/// Ends the turn when dropped.
struct Turn {
    app: Arc<App>,
    addr: SocketAddr,
    handler: Handler,
}

impl Drop for Turn {
    fn drop(&mut self) {
        next_in_line(&self.app, self.addr, self.handler);
    }
}

/// Why a connection was shut down.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// It needed an IO thread and none was free for it.
    Refused,
    /// Too many pipelined requests waited on it.
    Pipeline,
}

impl Exchange {
    fn new(app: &Arc<App>, addr: SocketAddr, rq: Request, handler: Handler) -> Exchange {
        Exchange {
            rq,
            turn: Turn {
                app: app.clone(),
                addr,
                handler,
            },
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.turn.addr
    }

    /// Writes `reply` — here, or on an IO thread (see the module doc) — and ends the
    /// turn.
    pub fn respond(self, reply: Reply) {
        let response = reply.into_response();
        let bytes = response.data_length().unwrap_or(0) + HEAD_BYTES;
        self.write(bytes, move |_, rq| {
            if let Err(e) = rq.respond(response) {
                log::debug!("could not write response: {e}");
            }
        });
    }

    /// Calls `write` with the request, which writes at most `bytes` to the client:
    /// here if that cannot block, else on an IO thread; then ends the turn. If no IO
    /// thread is free for it, the connection is shut down instead.
    pub fn write(self, bytes: usize, write: impl FnOnce(&Arc<App>, Request) + Send + 'static) {
        let Exchange { rq, turn } = self;
        let (app, addr) = (turn.app.clone(), turn.addr);
        let deadline = Instant::now() + io_time(&app, bytes);
        if on_io_thread() {
            app.conns.arm(addr, deadline, bytes);
            write(&app, rq);
        } else if app
            .conns
            .may_write_here(addr, bytes, app.cfg.http_inline_bytes, deadline)
        {
            write(&app, rq);
        } else if let Some(permit) = app.lane.reserve(client_of(&app, &rq, addr)) {
            let app2 = app.clone();
            io_job(&app, permit, move || {
                let deadline = Instant::now() + io_time(&app2, bytes);
                app2.conns.arm(addr, deadline, 0);
                write(&app2, rq);
                drop(turn);
            });
            return;
        } else {
            return refuse(&app, Exchange { rq, turn });
        }
        drop(turn);
    }
}

/// How long a read or write of `bytes` may take.
fn io_time(app: &App, bytes: usize) -> Duration {
    let rate = app.cfg.http_min_rate.max(1) as f64;
    app.cfg.http_io_timeout + Duration::from_secs_f64(bytes as f64 / rate)
}

/// Takes a request an HTTP worker got from tiny_http: its turn, if its connection has
/// nothing in progress, else a place in line.
///
/// Must be called in the order tiny_http hands requests out (the workers take
/// requests and call this under one lock): tiny_http writes the answers of a
/// connection in the order it read the requests, so a request that took its turn
/// before an earlier one of its connection would wait for that one's answer, which
/// would wait in line behind it.
pub fn take(app: &Arc<App>, rq: Request, handler: Handler) -> Taken {
    let Some(addr) = rq.remote_addr().copied() else {
        // Not over TCP (tiny_http gives every TCP request its peer); we listen on TCP only.
        log::warn!("a request without a peer address");
        return Taken::Nothing;
    };
    match app.conns.begin(addr, rq, app.cfg.http_pipeline) {
        Begin::Go(rq) => Taken::Turn(Box::new(Exchange::new(app, addr, rq, handler))),
        Begin::Queued => Taken::Nothing,
        Begin::Overflow => Taken::Overflow(addr),
    }
}

/// What [`take`] made of a request.
pub enum Taken {
    /// Its turn: run it with [`start`].
    Turn(Box<Exchange>),
    /// Nothing to do now: it waits in line.
    Nothing,
    /// Too many requests wait on this connection: [`Taken::finish`] cuts it.
    Overflow(SocketAddr),
}

impl Taken {
    /// Does what is left to do, out of the workers' lock.
    pub fn finish(self, app: &Arc<App>) {
        match self {
            Taken::Turn(ex) => start(app, *ex),
            Taken::Nothing => {}
            Taken::Overflow(addr) => cut(app, addr, Cut::Pipeline),
        }
    }
}

/// Drops a request of a cut connection without writing it an answer (the connection
/// is shut down: reading what is left of a body ends at once).
fn dispose(rq: Request) {
    drop(rq.into_writer());
}

/// The client address IO threads are counted against: behind a trusted proxy, the
/// client it speaks for, so one busy user of the proxy does not hold back the rest.
fn client_of(app: &App, rq: &Request, peer: SocketAddr) -> std::net::IpAddr {
    crate::request::client(rq, &app.cfg.trusted_proxies)
        .ip
        .unwrap_or(peer.ip())
}

/// Runs a request whose turn it is: here, or on an IO thread if it has a body to read.
fn start(app: &Arc<App>, ex: Exchange) {
    if on_io_thread() || !reads_body_on_demand(&ex.rq) {
        return serve(app, ex);
    }
    match app.lane.reserve(client_of(app, &ex.rq, ex.addr())) {
        Some(permit) => io_job(app, permit, move || serve_on_io_thread(ex)),
        None => refuse(app, ex),
    }
}

/// Runs `job` on an IO thread, then the follow-ups it leaves: the connection's next
/// requests, which keep its place in the pool.
fn io_job(app: &App, permit: Permit, job: impl FnOnce() + Send + 'static) {
    app.lane.run(permit, move || {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        if done.is_err() {
            log::error!("an IO job panicked");
        }
        while let Some(ex) = FOLLOW_UP.with(|f| f.borrow_mut().take()) {
            serve_on_io_thread(ex);
        }
    });
}

/// On an IO thread: the body's read (and the handler) get a deadline; the answer gets
/// its own when it is written.
fn serve_on_io_thread(ex: Exchange) {
    let app = ex.turn.app.clone();
    let max = app.cfg.max_body_bytes;
    let body = ex.rq.body_length().unwrap_or(max).min(max);
    let deadline = Instant::now() + io_time(&app, body);
    app.conns.arm(ex.addr(), deadline, 0);
    serve(&app, ex);
}

/// Runs the handler; a panic costs this request only.
fn serve(app: &Arc<App>, ex: Exchange) {
    let handler = ex.turn.handler;
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(app, ex)));
    if done.is_err() {
        // The request was dropped while unwinding: tiny_http answered it with a 500.
        log::error!("a request handler panicked");
    }
}

/// No IO thread for this request: after the tarpit's pause (so its client does not
/// come straight back), shut its connection down and drop it.
fn refuse(app: &Arc<App>, ex: Exchange) {
    let app2 = app.clone();
    app.tarpit.hold(move || {
        cut(&app2, ex.addr(), Cut::Refused);
        let Exchange { rq, turn } = ex;
        dispose(rq);
        drop(turn);
    });
}

/// Ends a turn: starts the connection's next request on an IO thread — the same one,
/// if an IO thread ended the turn; this may also run on the password threads or the
/// tarpit, which must not run handlers. Requests of a cut connection are only
/// dropped, in order.
fn next_in_line(app: &Arc<App>, addr: SocketAddr, handler: Handler) {
    loop {
        let next = app.conns.finish(addr);
        let Some(rq) = next.request else {
            return;
        };
        if next.cut {
            dispose(rq);
            continue;
        }
        let ex = Exchange::new(app, addr, rq, handler);
        if on_io_thread() {
            // Ended by an IO job (see `io_job`): it runs this one next, in its place.
            return FOLLOW_UP.with(|f| *f.borrow_mut() = Some(ex));
        }
        return match app.lane.reserve(client_of(app, &ex.rq, addr)) {
            Some(permit) => io_job(app, permit, move || serve_on_io_thread(ex)),
            None => refuse(app, ex),
        };
    }
}

/// Shuts the connection from `addr` down (once): what is under way on it fails at
/// once, and what waits behind it is dropped.
pub fn cut(app: &App, addr: SocketAddr, why: Cut) {
    if !app.conns.mark_cut(addr) {
        return;
    }
    inc(match why {
        Cut::Refused => &METRICS.http_refused,
        Cut::Pipeline => &METRICS.http_cut_pipeline,
    });
    log::debug!("shutting down the connection from {addr} ({why:?})");
    if let Err(e) = app.known_sockets.shut_down(app.local_addr.port(), addr) {
        log::warn!("shutting down the connection from {addr}: {e}");
    }
}
