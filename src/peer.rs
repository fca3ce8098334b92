//! One WebSocket as every other thread sees it: who is on it, and a way to hand it
//! frames that never blocks.
//!
//! Fan-out writes each pre-encoded frame straight into the socket with a non-blocking
//! `send` under the peer's own lock. Whatever the kernel will not take goes to a short
//! per-peer backlog that one shared [`Flusher`] thread drains when the socket becomes
//! writable; a peer whose backlog passes `--send-queue` frames is closed with 1008. So
//! a client that stops reading costs the room nothing. (Measured against a thread per
//! socket writer and a single polling thread, this design delivered the most per CPU
//! second at the lowest latency, and needs no thread per write.)
//!
//! Threads: any thread may hand a peer frames (the fan-out thread, the socket's own
//! reader, request handlers); the `flusher` thread ([`Flusher`], started and stopped by
//! [`crate::server`]) finishes what the kernel did not take and cuts closing peers that
//! never take their close frame.

use crate::clock;
use crate::metrics::{inc, METRICS};
use crate::service::{Worker, SERVICE_STACK};
use crate::sync::{lock, wait, wait_timeout};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, OwnedFd};
use rustix::net::{sendmsg, shutdown, SendAncillaryBuffer, SendFlags, Shutdown};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An encoded server-to-client WebSocket frame, shared by every recipient.
pub type Frame = Arc<[u8]>;

/// Close codes parley uses.
pub mod close {
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Normal closure (echoing a client's close).
    pub const NORMAL: u16 = 1000;
    /// Protocol error on the wire.
    pub const PROTOCOL: u16 = 1002;
    /// The client could not keep up.
    pub const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Missed updates from other nodes: reconnect and resume with `since`.
    pub const RESUME: u16 = 1012;
    /// The access token expired.
    pub const EXPIRED: u16 = 4001;
    /// Kicked, banned or login revoked.
    pub const REVOKED: u16 = 4003;
}

/// Which protocol a socket speaks: it decides which frames the socket may be handed
/// and how parley's own close codes read on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `/ws`: parley's chat protocol; every broadcast frame is meant for it.
    Chat,
    /// `/graphql`: `graphql-transport-ws`; it gets only its own frames, and expiry
    /// and revocation close it with that protocol's 4401 and 4403.
    GraphQl,
}

impl SocketKind {
    /// Threads a socket of this kind holds while open: its reader, and for GraphQL
    /// the pump that runs its operations.
    pub fn threads(self) -> usize {
        match self {
            SocketKind::Chat => 1,
            SocketKind::GraphQl => 2,
        }
    }

    /// The close code this kind of socket sends for parley's `code`.
    pub fn close_code(self, code: u16) -> u16 {
        match (self, code) {
            (SocketKind::GraphQl, close::EXPIRED) => 4401,
            (SocketKind::GraphQl, close::REVOKED) => 4403,
            _ => code,
        }
    }
}

/// Encodes an unmasked (server) frame with the given opcode.
fn encode(opcode: u8, payload: &[u8]) -> Frame {
    let mut out = frame_head(opcode, payload.len());
    out.extend_from_slice(payload);
    out.into()
}

/// A buffer holding the head of an unmasked frame of `len` payload bytes, with room
/// for the payload.
fn frame_head(opcode: u8, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 10);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out
}

/// A text frame carrying `json`.
pub fn text_frame(json: &str) -> Frame {
    encode(0x1, json.as_bytes())
}

/// A text frame whose JSON is `parts` one after the other, written once into the
/// frame: a `joined` reply in a busy room is mostly its online list, tens of KiB that
/// a `format!` and then the frame would each have copied again.
pub fn text_frame_of(parts: &[&str]) -> Frame {
    let mut out = frame_head(0x1, parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend_from_slice(p.as_bytes());
    }
    out.into()
}

/// A ping frame (no payload); the client answers with a pong.
pub fn ping_frame() -> Frame {
    encode(0x9, &[])
}

/// A close frame with `code` and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Frame {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
    encode(0x8, &payload)
}

/// How long a closing socket may take to accept its close frame before it is cut off
/// (a client that stopped reading never will).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// A close frame is queued; nothing else will be.
    Closing,
    /// Closed, or the socket failed.
    Dead,
}

/// How a frame is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Queue and write now.
    Now,
    /// Queue and write now, even while live frames are held back.
    Direct,
    /// Queue only; the caller flushes.
    Later,
}

/// Most frames written by one `sendmsg`.
const IOV_MAX_FRAMES: usize = 64;
/// Backlogs up to this many frames are gathered on the stack; longer ones (the
/// fan-out thread under load) in a heap buffer, so socket threads, whose stacks stay
/// resident for the socket's life, do not touch a deep frame for a rare case.
const IOV_ON_STACK: usize = 4;

/// Frames waiting for the kernel, with their size in bytes.
#[derive(Default)]
struct Backlog {
    frames: VecDeque<Frame>,
    /// Bytes of `frames[0]` already written.
    head_sent: usize,
    /// Bytes of every queued frame (the head's written part included).
    bytes: usize,
}

impl Backlog {
    fn len(&self) -> usize {
        self.frames.len()
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, frame: Frame) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.head_sent = 0;
        self.bytes = 0;
    }

    /// Drops everything but a half-written head, so the stream stays well-formed.
    fn keep_partial_head(&mut self) {
        if self.head_sent == 0 {
            return self.clear();
        }
        self.frames.truncate(1);
        self.bytes = self.frames.front().map_or(0, |f| f.len());
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(head) = self.frames.front() else {
                return;
            };
            let left = head.len() - self.head_sent;
            if n >= left {
                n -= left;
                self.bytes -= head.len();
                self.frames.pop_front();
                self.head_sent = 0;
            } else {
                self.head_sent += n;
                n = 0;
            }
        }
    }

    /// Whether `extra` more bytes in one more frame would pass the limits. A lone
    /// frame always fits, however big: a history page may be bigger than the cap.
    fn would_overflow(&self, extra: usize, limits: QueueLimits) -> bool {
        self.frames.len() >= limits.frames
            || (!self.frames.is_empty() && self.bytes + extra > limits.bytes)
    }
}

/// How much may wait for one slow socket before it is dropped with 1008.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Frames (`--send-queue`).
    pub frames: usize,
    /// Bytes (`--send-queue-bytes`).
    pub bytes: usize,
}

/// One non-blocking `sendmsg` of the queued frames (the first from `head_sent`);
/// returns the bytes written and the bytes offered.
fn send_frames(sock: &OwnedFd, backlog: &Backlog) -> rustix::io::Result<(usize, usize)> {
    let (frames, head_sent) = (&backlog.frames, backlog.head_sent);
    let parts = frames
        .iter()
        .take(IOV_MAX_FRAMES)
        .enumerate()
        .map(|(i, f)| {
            let part = if i == 0 {
                f.get(head_sent..).unwrap_or_default()
            } else {
                &f[..]
            };
            IoSlice::new(part)
        });
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    let send = |iov: &[IoSlice<'_>]| {
        let total = iov.iter().map(|s| s.len()).sum();
        sendmsg(sock, iov, &mut SendAncillaryBuffer::default(), flags).map(|n| (n, total))
    };
    if frames.len() <= IOV_ON_STACK {
        let mut iov = [IoSlice::new(&[]); IOV_ON_STACK];
        let mut n = 0;
        for (slot, part) in iov.iter_mut().zip(parts) {
            *slot = part;
            n += 1;
        }
        send(&iov[..n])
    } else {
        send(&parts.collect::<Vec<_>>())
    }
}

/// A request of a socket in flight; dropping it ends the request.
pub struct InFlight(Arc<Peer>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.in_flight = q.in_flight.saturating_sub(1);
        self.0.wake_waiters(&q);
    }
}

/// What became of a frame handed to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Queued (or held back during a replay).
    Queued,
    /// The peer is closed; the frame was dropped.
    Closed,
    /// The peer's queue is full: it must be dropped as too slow.
    Overflow,
}

/// A live message held back while the peer replays history (see [`Peer::hold`]).
struct Held {
    room_msg: Option<(String, i64)>,
    frame: Frame,
}

impl Outq {
    /// Whether a live room message was already sent by a replay. Live messages come
    /// in id order, so the first one past a seam ends it.
    fn already_replayed(&mut self, room: &str, id: i64) -> bool {
        let Some(at) = self.seams.iter().position(|(r, _)| r == room) else {
            return false;
        };
        if id <= self.seams[at].1 {
            return true;
        }
        self.seams.swap_remove(at);
        false
    }
}

struct Outq {
    /// False until the 101 response is out: frames queue but are not written.
    writable: bool,
    frames: Backlog,
    state: State,
    /// Whether the flusher is watching this peer.
    watched: bool,
    hold: Option<Vec<Held>>,
    /// Bytes of the held frames.
    held_bytes: usize,
    /// Requests of this socket still in the writer's queue (see [`Peer::begin_request`]).
    in_flight: usize,
    /// Threads waiting on `changed`: without any, a notify would be a wasted system
    /// call on every write that empties the backlog.
    waiters: usize,
    /// Rooms whose replay ended at a message id, until a live message above it comes:
    /// a message the replay read may still be on its way to the fan-out (stored and
    /// visible, its broadcast not yet queued), and its live copy must not double it.
    seams: Vec<(String, i64)>,
    /// When a closing peer that still cannot take its close frame is cut off.
    close_deadline: Option<Instant>,
}

/// Who is on a socket, and its outgoing side.
pub struct Peer {
    /// Unique per process.
    pub id: u64,
    /// The protocol it speaks.
    pub kind: SocketKind,
    /// The authenticated user.
    pub user_id: i64,
    /// Their username.
    pub username: String,
    /// Peer IP, for the audit trail.
    pub ip: String,
    /// The client's address (the TCP connection's far end).
    pub remote: std::net::SocketAddr,
    /// The connection's descriptor numbers, released before it closes.
    pub fd_numbers: Vec<i32>,
    sid: Mutex<String>,
    expires_at: AtomicU64,
    /// When the client last sent anything, in ms on [`clock::mono_ms`].
    heard_at: AtomicU64,
    /// When the server last pinged it, same clock (0: not since it was last heard).
    pinged_at: AtomicU64,
    sock: OwnedFd,
    out: Mutex<Outq>,
    changed: Condvar,
    flusher: Arc<FlushQueue>,
    limits: QueueLimits,
}

impl Peer {
    /// Wraps a socket (a duplicate of the upgraded connection's fd).
    pub fn new(
        id: u64,
        kind: SocketKind,
        identity: &crate::auth::Identity,
        remote: std::net::SocketAddr,
        socket: crate::sys::Adopted,
        flusher: Arc<FlushQueue>,
        limits: QueueLimits,
    ) -> Peer {
        Peer {
            id,
            kind,
            user_id: identity.user_id,
            username: identity.username.clone(),
            ip: remote.ip().to_string(),
            remote,
            fd_numbers: socket.numbers,
            sid: Mutex::new(identity.sid.clone()),
            expires_at: AtomicU64::new(identity.expires_at),
            heard_at: AtomicU64::new(clock::mono_ms()),
            pinged_at: AtomicU64::new(0),
            sock: socket.fd,
            out: Mutex::new(Outq {
                writable: false,
                frames: Backlog::default(),
                state: State::Open,
                watched: false,
                hold: None,
                held_bytes: 0,
                in_flight: 0,
                waiters: 0,
                seams: Vec::new(),
                close_deadline: None,
            }),
            changed: Condvar::new(),
            flusher,
            limits,
        }
    }

    /// The login this socket belongs to.
    pub fn sid(&self) -> String {
        lock(&self.sid).clone()
    }

    /// Expiry of the socket's access token, unix seconds.
    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    /// Notes that the client sent something (any frame, a pong included).
    pub fn heard(&self) {
        self.heard_at.store(clock::mono_ms(), Ordering::Relaxed);
        self.pinged_at.store(0, Ordering::Relaxed);
    }

    /// How long the client has been silent, at `now` (ms on [`clock::mono_ms`]).
    pub fn silent_for(&self, now: u64) -> Duration {
        Duration::from_millis(now.saturating_sub(self.heard_at.load(Ordering::Relaxed)))
    }

    /// Pings the client unless it was pinged since it was last heard.
    pub fn ping_once(self: &Arc<Self>, now: u64) {
        if self.pinged_at.swap(now.max(1), Ordering::Relaxed) == 0 {
            self.send(&ping_frame());
        }
    }

    /// Moves the socket to a newer token's login and expiry.
    pub fn reauthenticate(&self, sid: String, expires_at: u64) {
        *lock(&self.sid) = sid;
        self.expires_at.store(expires_at, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Outq> {
        lock(&self.out)
    }

    /// Waits (at most `timeout`) for the queue to change.
    fn wait_changed<'a>(
        &self,
        mut q: MutexGuard<'a, Outq>,
        timeout: Duration,
    ) -> MutexGuard<'a, Outq> {
        q.waiters += 1;
        let mut q = wait_timeout(&self.changed, q, timeout);
        q.waiters -= 1;
        q
    }

    /// Wakes the threads waiting for the queue to change, if there are any.
    fn wake_waiters(&self, q: &Outq) {
        if q.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// Whether the socket still takes frames.
    pub fn is_open(&self) -> bool {
        self.lock().state == State::Open
    }

    /// Hands the socket a frame and writes it at once. Never blocks; returns false if
    /// the peer is closed or was just dropped for being too slow.
    pub fn send(self: &Arc<Self>, frame: &Frame) -> bool {
        let handed = self.deliver(frame, None, Mode::Now);
        self.settle(handed)
    }

    /// Sends past a [`hold`](Self::hold): the `joined` reply and replayed history.
    pub fn send_direct(self: &Arc<Self>, frame: &Frame) -> bool {
        let handed = self.deliver(frame, None, Mode::Direct);
        self.settle(handed)
    }

    /// Queues a frame without writing it; the caller calls [`flush`](Self::flush) once
    /// it has queued everything it has for this socket, so several frames leave in one
    /// system call. `room_msg` marks a room message, so a replaying peer can skip live
    /// copies of messages its replay already carried. Makes no system call and logs
    /// nothing, so it may run under the hub's locks: on [`Handed::Overflow`] the caller
    /// drops the peer with [`drop_slow`](Self::drop_slow) once it holds no lock.
    pub fn queue(self: &Arc<Self>, frame: &Frame, room_msg: Option<(&str, i64)>) -> Handed {
        self.deliver(frame, room_msg, Mode::Later)
    }

    /// Writes whatever is queued (see [`queue`](Self::queue)).
    pub fn flush(self: &Arc<Self>) {
        let q = self.lock();
        self.pump(q);
    }

    fn settle(self: &Arc<Self>, handed: Handed) -> bool {
        match handed {
            Handed::Queued => true,
            Handed::Closed => false,
            Handed::Overflow => {
                self.drop_slow();
                false
            }
        }
    }

    fn deliver(
        self: &Arc<Self>,
        frame: &Frame,
        room_msg: Option<(&str, i64)>,
        mode: Mode,
    ) -> Handed {
        let mut q = self.lock();
        let out: &mut Outq = &mut q;
        if out.state != State::Open {
            return Handed::Closed;
        }
        if let Some((room, id)) = room_msg {
            if out.already_replayed(room, id) {
                return Handed::Queued;
            }
        }
        let limits = self.limits;
        match out.hold.as_mut().filter(|_| mode != Mode::Direct) {
            Some(held) => {
                let full = held.len() >= limits.frames
                    || (!held.is_empty() && out.held_bytes + frame.len() > limits.bytes);
                if full {
                    return Handed::Overflow;
                }
                out.held_bytes += frame.len();
                held.push(Held {
                    room_msg: room_msg.map(|(r, id)| (r.to_owned(), id)),
                    frame: frame.clone(),
                });
                return Handed::Queued;
            }
            None if out.frames.would_overflow(frame.len(), limits) => return Handed::Overflow,
            None => {}
        }
        out.frames.push(frame.clone());
        inc(&METRICS.frames_delivered);
        if mode != Mode::Later {
            self.pump(q);
        }
        Handed::Queued
    }

    /// Closes a peer that could not keep up with 1008.
    pub fn drop_slow(self: &Arc<Self>) {
        inc(&METRICS.slow_clients_dropped);
        log::info!(
            "dropping slow client {} (socket {})",
            self.username,
            self.id
        );
        self.close(close::POLICY, "send queue overflow");
    }

    /// Lets queued and future frames go out, once the handshake response is sent.
    pub fn start_writing(self: &Arc<Self>) {
        let mut q = self.lock();
        q.writable = true;
        self.pump(q);
    }

    /// Writes as much as the socket takes now; registers with the flusher if anything
    /// is left.
    fn pump(self: &Arc<Self>, mut q: MutexGuard<'_, Outq>) {
        if !q.writable {
            return;
        }
        self.write_some(&mut q);
        if !q.frames.is_empty() && q.state != State::Dead && !q.watched {
            q.watched = true;
            drop(q);
            self.flusher.watch(self.clone());
        }
    }

    /// Non-blocking writes until the backlog is empty or the socket is full; queued
    /// frames go out together, up to [`IOV_MAX_FRAMES`] per system call.
    fn write_some(&self, q: &mut Outq) {
        while !q.frames.is_empty() {
            match send_frames(&self.sock, &q.frames) {
                Ok((written, total)) => {
                    q.frames.advance(written);
                    if written < total {
                        break;
                    }
                }
                Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => break,
                Err(_) => {
                    q.frames.clear();
                    q.state = State::Dead;
                    let _ = shutdown(&self.sock, Shutdown::Both);
                }
            }
        }
        if q.frames.is_empty() {
            if q.state == State::Closing {
                q.state = State::Dead;
                // Wake our reader thread: its blocking read returns end-of-stream.
                let _ = shutdown(&self.sock, Shutdown::Read);
            }
            self.wake_waiters(q);
        }
    }

    /// Whether broadcast frames of the chat protocol (room messages, DMs,
    /// announcements) are meant for this socket.
    pub fn speaks_chat(&self) -> bool {
        self.kind == SocketKind::Chat
    }

    /// Starts a server-side close: drops queued data (finishing a half-written frame so
    /// the stream stays well-formed), sends a close frame, then ends the connection.
    /// `code` is parley's; the socket's kind may spell it its own way
    /// ([`SocketKind::close_code`]).
    pub fn close(self: &Arc<Self>, code: u16, reason: &str) {
        self.close_with(code, reason, false)
    }

    /// Like [`close`](Self::close), but the close frame goes after everything already
    /// queued (shutdown: "after pending writes are done").
    pub fn close_after_pending(self: &Arc<Self>, code: u16, reason: &str) {
        self.close_with(code, reason, true)
    }

    fn close_with(self: &Arc<Self>, code: u16, reason: &str, keep_pending: bool) {
        let mut q = self.lock();
        if q.state != State::Open {
            return;
        }
        q.state = State::Closing;
        q.hold = None;
        q.held_bytes = 0;
        q.close_deadline = Some(Instant::now() + CLOSE_GRACE);
        if !keep_pending {
            q.frames.keep_partial_head();
        }
        q.frames
            .push(close_frame(self.kind.close_code(code), reason));
        self.pump(q);
    }

    /// Marks the peer closed after the client closed the connection.
    pub fn mark_closed(&self) {
        let mut q = self.lock();
        q.state = State::Dead;
        q.frames.clear();
        self.wake_waiters(&q);
    }

    /// Counts a request that completes later (a write) against this socket; while
    /// `max` are in flight, waits for one to finish, so one socket cannot fill the
    /// writer's queue. `None` once the socket is closed. The request ends when the
    /// returned guard is dropped (by its completion, or on any early return).
    pub fn begin_request(self: &Arc<Self>, max: usize) -> Option<InFlight> {
        let mut q = self.lock();
        while q.state == State::Open && q.in_flight >= max {
            q = self.wait_changed(q, Duration::from_secs(1));
        }
        if q.state != State::Open {
            return None;
        }
        q.in_flight += 1;
        Some(InFlight(self.clone()))
    }

    /// Blocks until the backlog drops below half the queue limit (used by history
    /// replay, which may send more than a queue holds) or `timeout` passes.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        let (frames, bytes) = (self.limits.frames / 2, self.limits.bytes / 2);
        while q.state == State::Open && (q.frames.len() > frames || q.frames.bytes > bytes) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self.wait_changed(q, left);
        }
        q.state == State::Open
    }

    /// Waits (bounded) until everything queued, a close frame included, is written.
    pub fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        while !q.frames.is_empty() && q.state != State::Dead {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            q = self.wait_changed(q, left);
        }
    }

    /// From now on live frames are held back instead of sent (history replay).
    pub fn hold(&self) {
        self.lock().hold = Some(Vec::new());
    }

    /// Sends what was held, skipping room messages of `room` with ids up to
    /// `replayed_up_to` (the replay already carried them), and resumes live delivery.
    pub fn release(self: &Arc<Self>, room: &str, replayed_up_to: i64) {
        let mut q = self.lock();
        let Some(held) = q.hold.take() else { return };
        let mut seam = true;
        for h in held {
            match &h.room_msg {
                Some((r, id)) if r == room && *id <= replayed_up_to => continue,
                Some((r, _)) if r == room => seam = false,
                _ => {}
            }
            q.frames.push(h.frame);
        }
        q.held_bytes = 0;
        if seam && replayed_up_to > i64::MIN {
            q.seams.push((room.to_owned(), replayed_up_to));
        }
        if q.frames.len() > self.limits.frames || q.frames.bytes > self.limits.bytes {
            drop(q);
            self.drop_slow();
            return;
        }
        self.pump(q);
    }

    /// One flusher pass over this peer: writes what the socket takes, cuts a closing
    /// peer past its deadline, and says whether the flusher should keep watching it.
    /// Letting go clears `watched` under the same lock, so a later backlog registers
    /// the peer afresh.
    fn flush_step(&self, writable: bool) -> bool {
        let mut q = self.lock();
        if writable {
            self.write_some(&mut q);
        }
        if q.state == State::Closing && q.close_deadline.is_some_and(|d| Instant::now() >= d) {
            q.frames.clear();
            q.state = State::Dead;
            let _ = shutdown(&self.sock, Shutdown::Both);
            self.wake_waiters(&q);
        }
        if q.frames.is_empty() || q.state == State::Dead {
            q.watched = false;
            return false;
        }
        true
    }

    /// Closes the socket outright (no close frame).
    pub fn kill(&self) {
        self.mark_closed();
        let _ = shutdown(&self.sock, Shutdown::Both);
    }
}

/// Peers with frames the kernel did not take yet, handed to the flusher thread.
#[derive(Default)]
struct Pending {
    new: Vec<Arc<Peer>>,
    stopped: bool,
}

/// Where a peer registers when it has a backlog; the flusher thread takes it from here.
///
/// A peer is registered when its `watched` flag goes from false to true (under the
/// peer's lock), and the flusher sets it back to false in the same locked step in which
/// it lets go of the peer. So a peer with a backlog is always either being flushed or
/// about to be, and never twice.
#[derive(Default)]
pub struct FlushQueue {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl FlushQueue {
    fn watch(&self, peer: Arc<Peer>) {
        lock(&self.pending).new.push(peer);
        self.wake.notify_one();
    }
}

/// The one thread that finishes writes the kernel could not take at once.
pub struct Flusher {
    queue: Arc<FlushQueue>,
    worker: Worker,
}

impl Flusher {
    /// Starts the flusher thread.
    pub fn start() -> std::io::Result<Flusher> {
        let queue = Arc::new(FlushQueue::default());
        let q = queue.clone();
        let worker = Worker::spawn("flusher", SERVICE_STACK, move || run_flusher(&q))?;
        Ok(Flusher { queue, worker })
    }

    /// The queue peers register with.
    pub fn queue(&self) -> Arc<FlushQueue> {
        self.queue.clone()
    }

    /// Stops the thread (after the sockets are closed) and joins it.
    pub fn stop(&self) {
        lock(&self.queue.pending).stopped = true;
        self.queue.wake.notify_all();
        self.worker.join();
    }
}

fn run_flusher(queue: &FlushQueue) {
    let mut active: Vec<Arc<Peer>> = Vec::new();
    loop {
        {
            let mut p = lock(&queue.pending);
            while p.new.is_empty() && active.is_empty() && !p.stopped {
                p = wait(&queue.wake, p);
            }
            if p.stopped {
                return;
            }
            active.append(&mut p.new);
        }
        let ready = poll_writable(&active);
        active = active
            .into_iter()
            .zip(ready)
            .filter_map(|(peer, writable)| peer.flush_step(writable).then_some(peer))
            .collect();
    }
}

/// Which peers' sockets can take more data (or have failed), waiting up to 10 ms so
/// newly registered peers are picked up promptly.
fn poll_writable(peers: &[Arc<Peer>]) -> Vec<bool> {
    let mut fds: Vec<PollFd<'_>> = peers
        .iter()
        .map(|p| PollFd::new(&p.sock, PollFlags::OUT))
        .collect();
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    if poll(&mut fds, Some(&timeout)).is_err() {
        return vec![true; peers.len()];
    }
    fds.iter().map(|f| !f.revents().is_empty()).collect()
}

impl AsFd for Peer {
    fn as_fd(&self) -> rustix::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_frame_of_parts_is_the_frame_of_their_concatenation() {
        // Each length form of the head: 7 bits, 16 bits, 64 bits.
        for len in [0, 1, 125, 126, 65_535, 65_536, 200_000] {
            let body = "x".repeat(len);
            let (a, b) = body.split_at(len / 3);
            let parts = text_frame_of(&["{", a, "", b, "}"]);
            assert_eq!(
                parts,
                text_frame(&format!("{{{body}}}")),
                "payload of {}",
                len + 2
            );
        }
    }

    /// A peer on one end of a real loopback TCP connection with small kernel buffers,
    /// so most frames go through the backlog and the flusher; the other end is returned
    /// for reading.
    pub(crate) fn peer_pair(id: u64, flusher: &Flusher, frames: usize) -> (Arc<Peer>, TcpStream) {
        use rustix::net::{sockopt, AddressFamily, SocketType};
        // Buffer sizes are set before the connection exists, or TCP has already
        // advertised a large window. The receive buffer was once 4 KiB, far below
        // loopback's 64 KiB segment: the window kept shutting between reads, and one
        // run in five of `slow_readers_get_every_frame` waited out a doubling timer
        // (0.2 + 0.4 + ... + 25.6 s) and took 51 s instead of 2.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        sockopt::set_socket_send_buffer_size(&listener, 4096).unwrap();
        let client = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        sockopt::set_socket_recv_buffer_size(&client, 32 * 1024).unwrap();
        rustix::net::connect(&client, &listener.local_addr().unwrap()).unwrap();
        let client = TcpStream::from(client);
        let (server_side, remote) = listener.accept().unwrap();
        let identity = crate::auth::Identity {
            user_id: id as i64,
            username: format!("u{id}"),
            sid: "s".into(),
            expires_at: u64::MAX,
        };
        let adopted = crate::sys::Adopted {
            fd: OwnedFd::from(server_side),
            numbers: Vec::new(),
        };
        let limits = QueueLimits {
            frames,
            bytes: usize::MAX,
        };
        let kind = SocketKind::Chat;
        let peer = Peer::new(
            id,
            kind,
            &identity,
            remote,
            adopted,
            flusher.queue(),
            limits,
        );
        let peer = Arc::new(peer);
        peer.start_writing();
        (peer, client)
    }

    /// Two senders pump frames round-robin into many sockets whose readers read in
    /// bursts with pauses, so the flusher keeps many peers at once and lets go of each
    /// and takes it back over and over. Every reader must get every frame, in order: a
    /// lost registration leaves a backlog nobody flushes, and the tail never arrives.
    #[test]
    fn slow_readers_get_every_frame() {
        const PEERS: u64 = 48;
        const FRAMES: u32 = 4_000;
        let flusher = Flusher::start().unwrap();
        let mut readers = Vec::new();
        let mut peers = Vec::new();
        for id in 0..PEERS {
            let (peer, client) = peer_pair(id, &flusher, usize::MAX);
            peers.push(peer);
            readers.push(std::thread::spawn(move || read_all(id, client, FRAMES)));
        }
        let halves: Vec<Vec<Arc<Peer>>> = peers
            .chunks(PEERS as usize / 2)
            .map(<[_]>::to_vec)
            .collect();
        let senders: Vec<_> = halves
            .into_iter()
            .map(|mine| {
                std::thread::spawn(move || {
                    for i in 0..FRAMES {
                        let frame = text_frame(&format!("{i:0120}"));
                        for p in &mine {
                            assert!(p.send(&frame));
                        }
                        // Paced, but the last 1,000 frames (122 KB) in one burst: more
                        // than a socket holds, so the tail needs the flusher.
                        if i % 16 == 0 && i < FRAMES - 1_000 {
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    }
                })
            })
            .collect();
        for t in senders.into_iter().chain(readers) {
            t.join().unwrap();
        }
        flusher.stop();
    }

    /// Reads `frames` frames of 122 bytes and checks their order. The reader is in
    /// turn faster and slower than the senders, so its backlog keeps emptying and
    /// filling again.
    fn read_all(id: u64, mut client: TcpStream, frames: u32) {
        let want = frames as usize * 122;
        let mut got = Vec::with_capacity(want);
        let mut buf = [0u8; 512];
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let began = Instant::now();
        while got.len() < want {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let slow_phase = began.elapsed().as_millis() / 50 % 2 == 1;
            std::thread::sleep(Duration::from_micros(if slow_phase { 4000 } else { 1000 }));
        }
        assert_eq!(got.len(), want, "peer {id}: the tail never arrived");
        for (i, frame) in got.chunks(122).enumerate() {
            assert_eq!(&frame[2..], format!("{i:0120}").as_bytes(), "peer {id}");
        }
    }

    #[test]
    fn frame_lengths_use_the_right_header() {
        assert_eq!(&text_frame("hi")[..], &[0x81, 2, b'h', b'i']);
        let mid = text_frame(&"x".repeat(300));
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
        let big = text_frame(&"x".repeat(70_000));
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_000 + 10);
        assert_eq!(&close_frame(1009, "")[..], &[0x88, 2, 0x03, 0xF1]);
    }
}
