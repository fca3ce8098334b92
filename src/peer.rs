//! One WebSocket as every other thread sees it: who is on it, and a way to hand it
//! frames that never blocks.
//!
//! Fan-out writes each pre-encoded frame straight into the socket with a non-blocking
//! `send` under the peer's own lock. Whatever the kernel will not take goes to a short
//! per-peer backlog that one shared [`Flusher`] thread drains when the socket becomes
//! writable; a peer whose backlog passes `--send-queue` frames is closed with 1008. So
//! a client that stops reading costs the room nothing (NOTES.md, design C).

use crate::metrics::{inc, METRICS};
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
    /// The access token expired.
    pub const EXPIRED: u16 = 4001;
    /// Kicked, banned or login revoked.
    pub const REVOKED: u16 = 4003;
}

/// Encodes an unmasked (server) frame with the given opcode.
fn encode(opcode: u8, payload: &[u8]) -> Frame {
    let len = payload.len();
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
    out.extend_from_slice(payload);
    out.into()
}

/// A text frame carrying `json`.
pub fn text_frame(json: &str) -> Frame {
    encode(0x1, json.as_bytes())
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

/// One non-blocking `sendmsg` of the queued frames (the first from `head_sent`);
/// returns the bytes written and the bytes offered.
fn send_frames(
    sock: &OwnedFd,
    frames: &VecDeque<Frame>,
    head_sent: usize,
) -> rustix::io::Result<(usize, usize)> {
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

/// Drops `n` written bytes from the front of the backlog.
fn advance(q: &mut Outq, mut n: usize) {
    while n > 0 {
        let Some(head) = q.frames.front() else { return };
        let left = head.len() - q.head_sent;
        if n >= left {
            n -= left;
            q.frames.pop_front();
            q.head_sent = 0;
        } else {
            q.head_sent += n;
            n = 0;
        }
    }
}

/// A live message held back while the peer replays history (see [`Peer::hold`]).
struct Held {
    room_msg: Option<(String, i64)>,
    frame: Frame,
}

struct Outq {
    /// False until the 101 response is out: frames queue but are not written.
    writable: bool,
    frames: VecDeque<Frame>,
    /// Bytes of `frames[0]` already written.
    head_sent: usize,
    state: State,
    /// Whether the flusher is watching this peer.
    watched: bool,
    hold: Option<Vec<Held>>,
    /// When a closing peer that still cannot take its close frame is cut off.
    close_deadline: Option<Instant>,
}

/// Who is on a socket, and its outgoing side.
pub struct Peer {
    /// Unique per process.
    pub id: u64,
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
    sock: OwnedFd,
    out: Mutex<Outq>,
    changed: Condvar,
    flusher: Arc<Flusher>,
    queue_limit: usize,
}

impl Peer {
    /// Wraps a socket (a duplicate of the upgraded connection's fd).
    pub fn new(
        id: u64,
        identity: &crate::auth::Identity,
        remote: std::net::SocketAddr,
        socket: crate::sys::Claimed,
        flusher: Arc<Flusher>,
        queue_limit: usize,
    ) -> Peer {
        Peer {
            id,
            user_id: identity.user_id,
            username: identity.username.clone(),
            ip: remote.ip().to_string(),
            remote,
            fd_numbers: socket.numbers,
            sid: Mutex::new(identity.sid.clone()),
            expires_at: AtomicU64::new(identity.expires_at),
            sock: socket.fd,
            out: Mutex::new(Outq {
                writable: false,
                frames: VecDeque::new(),
                head_sent: 0,
                state: State::Open,
                watched: false,
                hold: None,
                close_deadline: None,
            }),
            changed: Condvar::new(),
            flusher,
            queue_limit,
        }
    }

    /// The login this socket belongs to.
    pub fn sid(&self) -> String {
        self.sid.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Expiry of the socket's access token, unix seconds.
    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    /// Moves the socket to a newer token's login and expiry.
    pub fn reauthenticate(&self, sid: String, expires_at: u64) {
        if let Ok(mut s) = self.sid.lock() {
            *s = sid;
        }
        self.expires_at.store(expires_at, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Outq> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the socket still takes frames.
    pub fn is_open(&self) -> bool {
        self.lock().state == State::Open
    }

    /// Hands the socket a frame and writes it at once. Never blocks; returns false if
    /// the peer is closed or was just dropped for being too slow.
    pub fn send(self: &Arc<Self>, frame: &Frame) -> bool {
        self.deliver(frame, None, Mode::Now)
    }

    /// Sends past a [`hold`](Self::hold): the `joined` reply and replayed history.
    pub fn send_direct(self: &Arc<Self>, frame: &Frame) -> bool {
        self.deliver(frame, None, Mode::Direct)
    }

    /// Queues a frame without writing it; the caller calls [`flush`](Self::flush) once
    /// it has queued everything it has for this socket, so several frames leave in one
    /// system call. `room_msg` marks a room message, so a replaying peer can skip live
    /// copies of messages its replay already carried.
    pub fn queue(self: &Arc<Self>, frame: &Frame, room_msg: Option<(&str, i64)>) -> bool {
        self.deliver(frame, room_msg, Mode::Later)
    }

    /// Writes whatever is queued (see [`queue`](Self::queue)).
    pub fn flush(self: &Arc<Self>) {
        let q = self.lock();
        self.pump(q);
    }

    fn deliver(self: &Arc<Self>, frame: &Frame, room_msg: Option<(&str, i64)>, mode: Mode) -> bool {
        let mut q = self.lock();
        if q.state != State::Open {
            return false;
        }
        if let Some(held) = q.hold.as_mut().filter(|_| mode != Mode::Direct) {
            if held.len() < self.queue_limit {
                held.push(Held {
                    room_msg: room_msg.map(|(r, id)| (r.to_owned(), id)),
                    frame: frame.clone(),
                });
                return true;
            }
            drop(q);
            self.drop_slow();
            return false;
        }
        if q.frames.len() >= self.queue_limit {
            drop(q);
            self.drop_slow();
            return false;
        }
        q.frames.push_back(frame.clone());
        inc(&METRICS.frames_delivered);
        if mode != Mode::Later {
            self.pump(q);
        }
        true
    }

    fn drop_slow(self: &Arc<Self>) {
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
            match send_frames(&self.sock, &q.frames, q.head_sent) {
                Ok((written, total)) => {
                    advance(q, written);
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
            self.changed.notify_all();
        }
    }

    /// Starts a server-side close: drops queued data (finishing a half-written frame so
    /// the stream stays well-formed), sends a close frame, then ends the connection.
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
        q.close_deadline = Some(Instant::now() + CLOSE_GRACE);
        if !keep_pending {
            let keep = usize::from(q.head_sent > 0);
            q.frames.truncate(keep);
        }
        q.frames.push_back(close_frame(code, reason));
        self.pump(q);
    }

    /// Marks the peer closed after the client closed the connection.
    pub fn mark_closed(&self) {
        let mut q = self.lock();
        q.state = State::Dead;
        q.frames.clear();
        self.changed.notify_all();
    }

    /// Blocks until the backlog drops below half the queue limit (used by history
    /// replay, which may send more than a queue holds) or `timeout` passes.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        while q.state == State::Open && q.frames.len() > self.queue_limit / 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = match self.changed.wait_timeout(q, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
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
            q = match self.changed.wait_timeout(q, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
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
        for h in held {
            let dup = matches!(&h.room_msg, Some((r, id)) if r == room && *id <= replayed_up_to);
            if !dup {
                q.frames.push_back(h.frame);
            }
        }
        if q.frames.len() > self.queue_limit {
            drop(q);
            self.drop_slow();
            return;
        }
        self.pump(q);
    }

    /// Closes the socket outright (no close frame).
    pub fn kill(&self) {
        self.mark_closed();
        let _ = shutdown(&self.sock, Shutdown::Both);
    }
}

/// The one thread that finishes writes the kernel could not take at once.
pub struct Flusher {
    pending: Mutex<Vec<Arc<Peer>>>,
    wake: Condvar,
}

impl Flusher {
    /// Starts the flusher thread.
    pub fn start() -> std::io::Result<Arc<Flusher>> {
        let f = Arc::new(Flusher {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        });
        let me = f.clone();
        std::thread::Builder::new()
            .name("flusher".into())
            .stack_size(256 * 1024)
            .spawn(move || me.run())?;
        Ok(f)
    }

    fn watch(&self, peer: Arc<Peer>) {
        if let Ok(mut p) = self.pending.lock() {
            p.push(peer);
            self.wake.notify_one();
        }
    }

    fn run(&self) {
        loop {
            let peers: Vec<Arc<Peer>> = {
                let Ok(mut p) = self.pending.lock() else {
                    return;
                };
                while p.is_empty() {
                    p = match self.wake.wait(p) {
                        Ok(g) => g,
                        Err(_) => return,
                    };
                }
                p.clone()
            };
            let ready = Self::poll_writable(&peers);
            let mut finished = Vec::new();
            for (peer, writable) in peers.iter().zip(ready) {
                let mut q = peer.lock();
                if writable {
                    peer.write_some(&mut q);
                }
                if q.state == State::Closing
                    && q.close_deadline.is_some_and(|d| Instant::now() >= d)
                {
                    q.frames.clear();
                    q.state = State::Dead;
                    let _ = shutdown(&peer.sock, Shutdown::Both);
                    peer.changed.notify_all();
                }
                if q.frames.is_empty() || q.state == State::Dead {
                    q.watched = false;
                    finished.push(peer.id);
                }
            }
            if let Ok(mut p) = self.pending.lock() {
                p.retain(|peer| !finished.contains(&peer.id));
            }
        }
    }

    /// Which peers' sockets can take more data (or have failed), waiting up to 10 ms
    /// so newly watched peers are picked up promptly.
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
}

impl AsFd for Peer {
    fn as_fd(&self) -> rustix::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
