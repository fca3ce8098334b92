//! Slow clients: a client that cannot keep up (its outgoing queue over
//! `--send-queue` messages) is closed with 1008 rather than slowing the room.
//!
//! - A client that stops reading is dropped with 1008, its socket slot is freed, and
//!   everyone else still gets every message. Nothing here depends on how fast the
//!   disk commits: the senders keep several messages in flight (so commits batch) and
//!   the flood goes on until the server has dropped the slow clients.
//! - A client that reads slowly but keeps up on average gets every frame, in order,
//!   and is never dropped: the server's backlog and its flusher thread carry it.

mod common;

use common::*;
use serde::Deserialize;
use serde_json::json;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message;

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

extern "C" {
    /// setsockopt(2), from the C library the standard library already links.
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const u8, len: u32) -> i32;
}

/// Asks for TCP segments of at most `mss` bytes on a socket not yet connected. The
/// server sizes its send buffer from the segment size its peer announces: on loopback
/// (64 KiB segments) that is about 2.5 MB, with 536-byte segments about 45 KB. So
/// a client that falls behind meets the server's own backlog (and its flusher) after
/// a few dozen kilobytes instead of megabytes.
fn set_tcp_maxseg(fd: &rustix::fd::OwnedFd, mss: i32) {
    use rustix::fd::AsRawFd;
    const IPPROTO_TCP: i32 = 6;
    const TCP_MAXSEG: i32 = 2;
    let value = mss.to_ne_bytes();
    // SAFETY: a valid socket descriptor and a pointer to a 4-byte int that outlives
    // the call, as setsockopt(2) requires for TCP_MAXSEG.
    let rc = unsafe {
        setsockopt(
            fd.as_raw_fd(),
            IPPROTO_TCP,
            TCP_MAXSEG,
            value.as_ptr(),
            value.len() as u32,
        )
    };
    assert_eq!(rc, 0, "setsockopt(TCP_MAXSEG) failed");
}

/// A TCP connection whose receive buffer and segment size are made small before
/// connecting, so that the kernels on both ends hold little for a client that does
/// not read.
fn tiny_rcvbuf_stream(srv: &Server) -> TcpStream {
    use rustix::net::{connect, socket, sockopt, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    sockopt::set_socket_recv_buffer_size(&fd, 2048).unwrap();
    set_tcp_maxseg(&fd, 536);
    connect(&fd, &srv.addr()).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A `/ws` socket for `token` over a tiny-receive-buffer connection.
fn ws_tiny_rcvbuf(srv: &Server, token: &str) -> Ws {
    let req = with_header(
        ws_request(srv, "/ws"),
        "Authorization",
        &format!("Bearer {token}"),
    );
    let (ws, response) =
        tungstenite::client::client(req, tiny_rcvbuf_stream(srv)).expect("upgrade");
    Ws { ws, response }
}

/// Connects a socket for `token`, retrying while the server answers 429 (a socket
/// slot not yet freed), for up to `within`.
#[track_caller]
fn connect_when_free(srv: &Server, token: &str, within: Duration) -> Ws {
    let deadline = Instant::now() + within;
    loop {
        let req = with_header(
            ws_request(srv, "/ws"),
            "Authorization",
            &format!("Bearer {token}"),
        );
        match Ws::try_connect(srv, req) {
            Ok(ws) => return ws,
            Err(tungstenite::Error::Http(r)) if r.status().as_u16() == 429 => {
                assert!(
                    Instant::now() < deadline,
                    "the socket slot was not freed within {within:?}"
                );
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connect failed: {e:?}"),
        }
    }
}

/// What a flood's senders share: how many have finished, and the highest id acked.
struct Flood {
    senders: usize,
    done: AtomicUsize,
    max_acked: AtomicI64,
}

impl Flood {
    fn new(senders: usize) -> Flood {
        Flood {
            senders,
            done: AtomicUsize::new(0),
            max_acked: AtomicI64::new(0),
        }
    }

    /// The id of the flood's last message, once every sender has finished.
    fn last_id(&self) -> Option<i64> {
        (self.done.load(Ordering::SeqCst) == self.senders)
            .then(|| self.max_acked.load(Ordering::SeqCst))
    }
}

/// The fields of a server frame that the floods look at (a message's 16 KB body is
/// skipped, not built).
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    id: Option<i64>,
    #[serde(rename = "ref")]
    reference: Option<serde_json::Value>,
    code: Option<String>,
}

/// One read from a flood's point of view.
enum Got {
    Message(i64),
    Ack(String, i64),
    /// Presence and other frames the floods do not count.
    Chatter(String),
    /// Nothing within the wait.
    Quiet,
    Closed(Option<u16>),
}

/// Reads one frame, waiting at most `wait`.
#[track_caller]
fn read_frame(ws: &mut Ws, wait: Duration) -> Got {
    ws.stream()
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .unwrap();
    match ws.ws.read() {
        Ok(Message::Text(t)) => {
            let h: Head = serde_json::from_str(t.as_str())
                .unwrap_or_else(|e| panic!("bad frame {:?}: {e}", &t.as_str()[..80]));
            match h.kind.as_str() {
                "message" => Got::Message(h.id.expect("message id")),
                "ack" => Got::Ack(
                    h.reference
                        .and_then(|r| r.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    h.id.expect("ack id"),
                ),
                "error" => panic!("error frame: code {:?}", h.code),
                other => Got::Chatter(other.to_string()),
            }
        }
        Ok(Message::Close(f)) => Got::Closed(f.map(|f| u16::from(f.code))),
        Ok(_) => Got::Quiet,
        Err(tungstenite::Error::Io(e))
            if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
        {
            Got::Quiet
        }
        Err(e) => panic!("the connection failed: {e:?}"),
    }
}

/// Sends `body` to `room` on `ws` (joined) with up to `window` sends awaiting their
/// ack, while `more(sent)` says so, waiting `gap(n)` after the n-th send (zero: as
/// fast as the window allows); reads everything meanwhile. Marks the sender finished
/// in `flood`. Returns the ids acked, and the ids of every message seen (own ones
/// included).
fn flood_send(
    ws: &mut Ws,
    room: &str,
    body: &str,
    window: usize,
    gap: impl Fn(usize) -> Duration,
    mut more: impl FnMut(usize) -> bool,
    flood: &Flood,
) -> (Vec<i64>, Vec<i64>) {
    let (mut acked, mut seen) = (Vec::new(), Vec::new());
    let mut sent = 0;
    let mut next = Instant::now();
    let mut progress = Instant::now();
    loop {
        let can_send = sent - acked.len() < window && more(sent);
        if !can_send && sent == acked.len() {
            break;
        }
        let now = Instant::now();
        if can_send && now >= next {
            let r = format!("f{sent}");
            ws.send(&json!({"type": "send", "room": room, "body": body, "ref": r}));
            sent += 1;
            // Paced on a schedule, so a late send is followed by quicker ones, but
            // never by more than a few in a row.
            next = (next + gap(sent)).max(now - Duration::from_millis(5));
            continue;
        }
        let wait = if can_send {
            next.saturating_duration_since(now)
        } else {
            Duration::from_millis(200)
        };
        match read_frame(ws, wait) {
            Got::Message(id) => seen.push(id),
            Got::Ack(r, id) => {
                assert_eq!(r, format!("f{}", acked.len()), "acks come in send order");
                acked.push(id);
                progress = Instant::now();
            }
            Got::Chatter(kind) => assert_eq!(kind, "presence", "unexpected frame"),
            Got::Quiet => {}
            Got::Closed(code) => panic!("a sender's socket was closed ({code:?})"),
        }
        assert!(
            progress.elapsed() < Duration::from_secs(20),
            "a sender waited 20 s for an ack"
        );
    }
    flood
        .max_acked
        .fetch_max(acked.last().copied().unwrap_or(0), Ordering::SeqCst);
    flood.done.fetch_add(1, Ordering::SeqCst);
    (acked, seen)
}

/// Reads `ws` until the flood is over and its last message has arrived (`seen`: what
/// was read before). With `bursts` = (reading, pausing), it reads for a while, then
/// stops reading for a while, over and over. Fails if the socket is closed, or if
/// nothing arrives for 10 s while messages are still due.
#[track_caller]
fn read_to_end(
    ws: &mut Ws,
    flood: &Flood,
    mut seen: Vec<i64>,
    bursts: Option<(Duration, Duration)>,
) -> Vec<i64> {
    let stall = Duration::from_secs(10);
    let mut progress = Instant::now();
    let complete = |seen: &[i64]| {
        flood
            .last_id()
            .is_some_and(|last| seen.last().copied().unwrap_or(0) >= last)
    };
    loop {
        if complete(&seen) {
            return seen;
        }
        let burst_end = bursts.map(|(reading, _)| Instant::now() + reading);
        loop {
            let wait = match burst_end {
                Some(end) => end.saturating_duration_since(Instant::now()),
                None => Duration::from_millis(100),
            };
            if wait.is_zero() {
                break;
            }
            match read_frame(ws, wait) {
                Got::Message(id) => {
                    seen.push(id);
                    progress = Instant::now();
                    if complete(&seen) {
                        return seen;
                    }
                }
                Got::Chatter(kind) => assert_eq!(kind, "presence", "unexpected frame"),
                Got::Ack(..) => panic!("a reader got an ack"),
                Got::Quiet => break,
                Got::Closed(code) => panic!(
                    "a reader that keeps up was closed ({code:?}) after {} messages",
                    seen.len()
                ),
            }
        }
        assert!(
            progress.elapsed() < stall,
            "nothing arrived for {stall:?}: {} messages read, the last {:?}, the flood's last {:?}",
            seen.len(),
            seen.last(),
            flood.last_id()
        );
        if let Some((_, pause)) = bursts {
            // The reading pattern under test: a pause, not a synchronisation.
            thread::sleep(pause);
        }
    }
}

// ---------------------------------------------------------------------------------
// a client that stops reading
// ---------------------------------------------------------------------------------

#[test]
fn a_client_that_stops_reading_is_dropped_with_1008_and_the_room_loses_nothing() {
    // Claims: a socket that stops reading is closed with 1008 (seen by a client that
    // reads again promptly), counted in parley_slow_clients_dropped_total, and its
    // socket slot is freed even if it never reads again; the clients that keep up get
    // every message, in order. Three senders keep 8 messages each in flight (commits
    // batch, so disk speed does not matter) and go on until both slow clients are
    // dropped, then send a few more.
    // SQLite even under PARLEY_TEST_POSTGRES: it counts the messages in the file.
    let srv = Server::start_sqlite(&[
        "--send-queue",
        "64",
        "--msg-rate",
        "0",
        "--login-rate",
        "0",
        "--max-sockets-per-user",
        "1",
    ]);
    let senders: Vec<String> = (0..3)
        .map(|i| new_user(&srv, &format!("sender{i}")))
        .collect();
    let carol = new_user(&srv, "carol");
    let bob = new_user(&srv, "bob");
    let dave = new_user(&srv, "dave");
    let dropped_metric = "parley_slow_clients_dropped_total";
    assert_eq!(metric_now(&srv, dropped_metric), 0.0);

    // bob and dave join and then stop reading; bob never reads again.
    let mut bob_ws = ws_tiny_rcvbuf(&srv, &bob);
    bob_ws.join("general");
    let mut dave_ws = ws_tiny_rcvbuf(&srv, &dave);
    dave_ws.join("general");
    let mut carol_ws = Ws::connect(&srv, &carol);
    carol_ws.join("general");
    let mut sender_ws: Vec<Ws> = senders
        .iter()
        .map(|t| {
            let mut ws = Ws::connect(&srv, t);
            ws.join("general");
            ws
        })
        .collect();

    let flood = Flood::new(senders.len());
    let both_dropped = AtomicBool::new(false);
    let body = "😀".repeat(4000); // 16 KB per message
    const EXTRA: usize = 10; // sent by each sender after both drops
    const CAP: usize = 600; // per sender, in case the drops never come
    let (carol_seen, sent, dave_close) = thread::scope(|s| {
        let (flood, both_dropped, body) = (&flood, &both_dropped, &body);
        let carol_t = s.spawn(|| read_to_end(&mut carol_ws, flood, Vec::new(), None));
        let dave_t = s.spawn(move || {
            // dave reads again once he has been dropped: the close frame is there.
            wait_until(Duration::from_secs(60), "both slow clients dropped", || {
                both_dropped.load(Ordering::SeqCst)
            });
            wait_close(&mut dave_ws, Duration::from_secs(10))
        });
        let sender_ts: Vec<_> = sender_ws
            .iter_mut()
            .map(|ws| {
                s.spawn(move || {
                    let mut mark: Option<usize> = None;
                    let more = move |sent: usize| {
                        if both_dropped.load(Ordering::SeqCst) {
                            sent < *mark.get_or_insert(sent) + EXTRA
                        } else {
                            sent < CAP
                        }
                    };
                    let (acked, seen) =
                        flood_send(ws, "general", body, 8, |_| Duration::ZERO, more, flood);
                    (acked, read_to_end(ws, flood, seen, None))
                })
            })
            .collect();
        wait_until(
            Duration::from_secs(60),
            "both drops or the flood's end",
            || metric_now(&srv, dropped_metric) >= 2.0 || flood.last_id().is_some(),
        );
        both_dropped.store(true, Ordering::SeqCst);
        assert_eq!(
            metric_now(&srv, dropped_metric),
            2.0,
            "{CAP} messages per sender and the two clients that stopped reading were not both dropped"
        );
        let sent: Vec<(Vec<i64>, Vec<i64>)> =
            sender_ts.into_iter().map(|t| t.join().unwrap()).collect();
        (carol_t.join().unwrap(), sent, dave_t.join().unwrap())
    });

    assert_eq!(dave_close, Some(1008), "dave's socket closes with 1008");
    assert_eq!(
        metric_now(&srv, dropped_metric),
        2.0,
        "exactly the two slow clients were dropped"
    );
    // Every acked message reached every client that kept up, once, in id order.
    let mut all: Vec<i64> = sent.iter().flat_map(|(acked, _)| acked.clone()).collect();
    all.sort();
    eprintln!("{} messages of 16 KB sent", all.len());
    assert_eq!(stored_message_count(&srv.db_path()), all.len() as i64);
    assert_eq!(carol_seen, all, "carol got every message, in order");
    for (k, (_, seen)) in sent.iter().enumerate() {
        assert_eq!(seen, &all, "sender {k} got every message, in order");
    }

    // Both slots are free again (one socket per user): bob's although he never read.
    let mut bob2 = connect_when_free(&srv, &bob, Duration::from_secs(10));
    let mut dave2 = connect_when_free(&srv, &dave, Duration::from_secs(10));
    bob2.ping();
    dave2.ping();
    // Open: three senders, carol, and the new bob and dave.
    wait_until(Duration::from_secs(5), "parley_open_sockets == 6", || {
        metric_now(&srv, "parley_open_sockets") == 6.0
    });
    // bob's old connection was ended by the server: reading it now reaches its end
    // (a close frame, or end-of-stream when the frame could not be delivered).
    bob_ws
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        match bob_ws.ws.read() {
            Ok(Message::Close(f)) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1008));
                break;
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                panic!("bob's old connection is still open")
            }
            Err(_) => break,
        }
    }
}

// ---------------------------------------------------------------------------------
// a client that reads slowly but keeps up
// ---------------------------------------------------------------------------------

#[test]
fn clients_that_read_in_bursts_get_every_frame_in_order() {
    // Claim: a client that reads slowly but keeps up on average is never dropped and
    // gets every message, in order, however often what the kernel would not take had
    // to wait in the server's backlog for the flusher thread. Four such readers (small
    // segments and receive buffers; each reads for 30 ms, then pauses for 30 ms) and
    // one sender at ~8 MB/s per reader for about 3 s, ending in an unpaced burst that
    // leaves the readers with backlogs only the flusher can deliver. With
    // --send-queue(-bytes) far above anything the readers lag by, a 1008 or a missing frame
    // is a bug. A stress test: a socket the flusher stops watching while it still
    // has a backlog (a lost wake-up) shows up as a reader that stalls short of the
    // last message.
    let srv = Server::start(&[
        "--send-queue",
        "100000",
        "--send-queue-bytes",
        "1000000000",
        "--msg-rate",
        "0",
        "--login-rate",
        "0",
    ]);
    let sender = new_user(&srv, "sender");
    let tokens: Vec<String> = (0..4)
        .map(|i| new_user(&srv, &format!("reader{i}")))
        .collect();
    let mut readers: Vec<Ws> = tokens
        .iter()
        .map(|t| {
            let mut ws = ws_tiny_rcvbuf(&srv, t);
            ws.join("general");
            ws
        })
        .collect();
    let mut sender_ws = Ws::connect(&srv, &sender);
    sender_ws.join("general");

    const PACED: usize = 3000; // one a millisecond
    const BURST: usize = 100; // then back to back
    let body = "😀".repeat(2000); // 8 KB per message
    let flood = Flood::new(1);
    let started = Instant::now();
    let (sent, got) = thread::scope(|s| {
        let flood = &flood;
        let reader_ts: Vec<_> = readers
            .iter_mut()
            .enumerate()
            .map(|(k, ws)| {
                s.spawn(move || {
                    // Readers out of step with each other: each starts with its own pause.
                    thread::sleep(Duration::from_millis(7 * k as u64));
                    let bursts = (Duration::from_millis(30), Duration::from_millis(30));
                    read_to_end(ws, flood, Vec::new(), Some(bursts))
                })
            })
            .collect();
        let gap = |n: usize| {
            if n < PACED {
                Duration::from_millis(1)
            } else {
                Duration::ZERO
            }
        };
        let (acked, seen) = flood_send(
            &mut sender_ws,
            "general",
            &body,
            32,
            gap,
            |n| n < PACED + BURST,
            flood,
        );
        let sent = (acked, read_to_end(&mut sender_ws, flood, seen, None));
        let got: Vec<Vec<i64>> = reader_ts.into_iter().map(|t| t.join().unwrap()).collect();
        (sent, got)
    });
    eprintln!(
        "{} messages to 4 bursty readers in {:?}",
        sent.0.len(),
        started.elapsed()
    );
    let (acked, seen) = sent;
    assert_eq!(acked.len(), PACED + BURST);
    assert_eq!(seen, acked, "the sender got its own messages, in order");
    for (k, ids) in got.iter().enumerate() {
        assert_eq!(ids.len(), acked.len(), "reader {k}: every frame");
        assert_eq!(ids, &acked, "reader {k}: every frame, in order");
    }
    assert_eq!(metric_now(&srv, "parley_slow_clients_dropped_total"), 0.0);
    for ws in readers.iter_mut() {
        ws.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        ws.ping();
    }
}
