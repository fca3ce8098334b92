//! Availability under connection floods, against the real binary over real sockets:
//! clients that send a body slowly, or never read their answers, must not stop HTTP
//! (health checks, logins, upgrades) for everyone else.
//!
//! Attackers connect from 127.0.0.2 (any 127/8 address works on Linux loopback), the
//! well-behaved client from 127.0.0.1.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How fast a request must be answered while an attack is under way.
const PROMPT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

fn attacker() -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2)
}

/// A TCP connection to `port` from the source address `src`, with a small receive
/// buffer when `rcvbuf` is given (a client that means not to read).
fn connect_from(src: Ipv4Addr, port: u16, rcvbuf: Option<usize>) -> std::io::Result<TcpStream> {
    use rustix::net::{bind, connect, socket, sockopt, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None)?;
    if let Some(n) = rcvbuf {
        sockopt::set_socket_recv_buffer_size(&fd, n)?;
    }
    bind(&fd, &SocketAddr::from((src, 0)))?;
    connect(&fd, &SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok(TcpStream::from(fd))
}

/// `GET /healthz` on a fresh connection; how long the answer took, or None when there
/// was no answer (or no connection) within `within`.
fn healthz_within(port: u16, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, within).ok()?;
    let left = within.checked_sub(t0.elapsed())?;
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .ok()?;
    let req =
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let r = read_response(&mut s, false).ok()?;
    assert_eq!(
        r.status,
        200,
        "/healthz answered {} {:?}",
        r.status,
        r.text()
    );
    Some(t0.elapsed())
}

/// Asserts `f` (one request) took less than `PROMPT`; returns how long it took.
#[track_caller]
fn prompt<T>(what: &str, f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let out = f();
    let took = t0.elapsed();
    assert!(took < PROMPT, "{what} took {took:?} during the attack");
    (out, took)
}

/// One round of a well-behaved client's requests, each of which must be prompt:
/// `/healthz`, a login and a WebSocket upgrade (then a ping on it). Returns the
/// slowest.
fn well_behaved_round(srv: &Server, name: &str) -> Duration {
    let port = srv.port;
    let (_, a) = prompt("/healthz", || {
        healthz_within(port, Duration::from_secs(5)).expect("/healthz answered")
    });
    let (pair, b) = prompt("a login", || login(srv, name));
    let (mut ws, c) = prompt("a WebSocket upgrade", || Ws::connect(srv, &access(&pair)));
    ws.ping();
    ws.close();
    a.max(b).max(c)
}

// ---------------------------------------------------------------------------------
// slow clients
// ---------------------------------------------------------------------------------

/// Waits up to 100 ms for the server to shut `s` down (without reading from it).
fn hung_up(s: &TcpStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(s, PollFlags::RDHUP)];
    let wait = Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    match poll(&mut fds, Some(&wait)) {
        Ok(0) => false,
        Ok(_) => {
            !(fds[0].revents() & (PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)).is_empty()
        }
        Err(_) => true,
    }
}

/// Attackers at work (see [`attackers`]).
struct Attack {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Attack {
    /// Ends the attack; how many connections the attackers made.
    fn end(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        self.made.load(Ordering::SeqCst)
    }
}

/// Runs `n` attackers from 127.0.0.2 until ended; each connects, calls `attack` on
/// its connection, waits until the server closes it, and reconnects.
fn attackers(
    port: u16,
    n: usize,
    rcvbuf: Option<usize>,
    attack: impl Fn(&mut TcpStream) + Send + Sync + 'static,
) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let attack = Arc::new(attack);
    let threads = (0..n)
        .map(|_| {
            let (stop, made, attack) = (stop.clone(), made.clone(), attack.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = connect_from(attacker(), port, rcvbuf) else {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    made.fetch_add(1, Ordering::SeqCst);
                    attack(&mut s);
                    // Until the server cuts us or the test ends; without reading.
                    while !stop.load(Ordering::SeqCst) && !hung_up(&s) {}
                }
            })
        })
        .collect();
    Attack {
        stop,
        made,
        threads,
    }
}

/// Probes as a well-behaved client for `for_how_long`; every request must be prompt.
fn probe_during(srv: &Server, name: &str, for_how_long: Duration) {
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    while t0.elapsed() < for_how_long {
        slowest = slowest.max(well_behaved_round(srv, name));
        rounds += 1;
        thread::sleep(Duration::from_millis(200));
    }
    println!("{rounds} rounds of /healthz, login and upgrade; slowest answer {slowest:?}");
}

#[test]
fn slow_request_bodies_do_not_stop_http() {
    let srv = start_unlimited(&[]);
    register(&srv, "alice");
    let port = srv.port;
    // Sixty-four anonymous clients, four times the HTTP workers: a login head that
    // announces 5000 bytes of body, one byte of it, and then nothing.
    let attack = attackers(port, 64, None, move |s| {
        let head = format!(
            "POST /api/login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{"
        );
        let _ = s.write_all(head.as_bytes());
    });
    thread::sleep(Duration::from_millis(500));
    // Long enough for the attackers to be cut and come back.
    probe_during(&srv, "alice", Duration::from_secs(8));
    let made = attack.end();
    println!("{made} attacking connections");
    assert!(made >= 64);
}

#[test]
fn clients_that_never_read_do_not_stop_http() {
    let srv = start_unlimited(&[]);
    register(&srv, "alice");
    let port = srv.port;
    // Thirty-two clients, twice the HTTP workers, that pipeline requests whose answers
    // overflow their receive buffers, and read nothing.
    let attack = attackers(port, 32, Some(4096), move |s| {
        let one = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(one.repeat(100).as_bytes());
    });
    thread::sleep(Duration::from_millis(500));
    probe_during(&srv, "alice", Duration::from_secs(8));
    println!("{} non-reading connections", attack.end());
}

/// The status of the next answer on a connection (its body skipped), leaving the
/// answers after it in the buffer.
fn next_status(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    let mut first = String::new();
    r.read_line(&mut first)?;
    let status = first.split(' ').nth(1).and_then(|s| s.parse().ok());
    let (mut line, mut length) = (String::new(), 0);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    std::io::copy(&mut r.by_ref().take(length), &mut std::io::sink())?;
    status.ok_or_else(|| std::io::Error::other(format!("no status line: {first:?}")))
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let srv = start_unlimited(&[]);
    let port = srv.port;
    // Eight connections from one address, each with 16 requests in flight at a time
    // (as many as may wait on a connection), and answers well past what a worker
    // writes itself: every request is answered, in order, and nothing is refused.
    let clients: Vec<_> = (0..8)
        .map(|c| {
            thread::spawn(move || {
                let mut s = connect_from(Ipv4Addr::LOCALHOST, port, None).expect("connect");
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut answers = BufReader::new(s.try_clone().unwrap());
                for round in 0..20 {
                    let batch: String = (0..16)
                        .map(|i| {
                            format!("GET /nowhere/{c}/{round}/{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
                        })
                        .collect();
                    s.write_all(batch.as_bytes()).unwrap();
                    for i in 0..16 {
                        let status = next_status(&mut answers).unwrap_or_else(|e| {
                            panic!("connection {c}, round {round}, answer {i}: {e}")
                        });
                        assert_eq!(status, 404);
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a pipelining client failed");
    }
    let m = http_request(port, "GET", "/metrics", &[], None).text();
    assert!(
        m.contains("parley_http_closed_total{reason=\"refused\"} 0")
            && m.contains("parley_http_closed_total{reason=\"pipeline\"} 0"),
        "{m}"
    );
}
