//! Availability under connection floods, against the real binary over real sockets:
//!
//! - a flood of idle TCP connections that exhausts the server's descriptors makes
//!   tiny_http's accept thread die; the server must serve again (on the same
//!   listening socket, keeping its WebSockets) as soon as the flood is gone, and must
//!   shed a flood that stays by closing the oldest idle connections;
//! - clients that send a body slowly, or never read their answers, must not stop
//!   HTTP (health checks, logins, upgrades) for everyone else.
//!
//! Attackers connect from 127.0.0.2 (any 127/8 address works on Linux loopback), the
//! well-behaved client from 127.0.0.1.

mod common;

use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The open-file limit the flooded server runs with.
const NOFILE: u64 = 256;
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
// a server with a low open-file limit
// ---------------------------------------------------------------------------------

/// `parley serve` started under an open-file limit of `NOFILE` (soft and hard), on a
/// fresh database. Killed on drop; prints its stderr if the test is failing.
struct Limited {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
    /// Its PostgreSQL database under PARLEY_TEST_POSTGRES (dropped after the kill).
    _pg: Option<PgDb>,
}

/// Whether this process holds CAP_SYS_RESOURCE, with which the server would lift its
/// hard limit again (root can).
fn holds_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The command that runs parley under the limit: `prlimit` (util-linux), preceded by
/// `setpriv` dropping CAP_SYS_RESOURCE when we hold it; without those tools, the limit
/// is set on the child between fork and exec.
fn limited_command() -> Command {
    let drop_cap = holds_sys_resource();
    if have("prlimit") && (!drop_cap || have("setpriv")) {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={NOFILE}:{NOFILE}"));
        if drop_cap {
            cmd.args(["setpriv", "--bounding-set=-sys_resource"]);
        }
        cmd.arg(bin());
        return cmd;
    }
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // system calls (no allocation, no locks), which is what pre_exec allows.
    unsafe {
        cmd.pre_exec(|| {
            use rustix::process::{setrlimit, Resource, Rlimit};
            let limit = Rlimit {
                current: Some(NOFILE),
                maximum: Some(NOFILE),
            };
            setrlimit(Resource::Nofile, limit)?;
            let cap = rustix::thread::CapabilitySet::SYS_RESOURCE;
            let _ = rustix::thread::remove_capability_from_bounding_set(cap);
            Ok(())
        });
    }
    cmd
}

impl Limited {
    fn start() -> Limited {
        let dir = TempDir::new();
        // A fresh PostgreSQL database under PARLEY_TEST_POSTGRES, as Server::start does.
        let pg = PgDb::create_if_enabled();
        let db = match &pg {
            Some(pg) => pg.url.clone().into(),
            None => dir.path().join("chat.db"),
        };
        let mut cmd = limited_command();
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--db"])
            .arg(&db)
            .args(["--bcrypt-cost", "4", "--login-rate", "0", "--msg-rate", "0"])
            .env_remove("PARLEY_ADDR")
            .env_remove("PARLEY_DB")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the limited server");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, log) = (child.stderr.take().unwrap(), stderr.clone());
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let mut srv = Limited {
            child,
            port: 0,
            stderr,
            _dir: dir,
            _pg: pg,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no listening line ({e:?}):\n{}", srv.log()));
        let prefix = "parley listening on http://127.0.0.1:";
        srv.port = line
            .strip_prefix(prefix)
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("bad listening line {line:?}"));
        // The log line comes on stderr, just before the listening line on stdout.
        let expected = format!("open-file limit {NOFILE})");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !srv.log().contains(&expected) {
            assert!(
                Instant::now() < deadline,
                "the server should run with an open-file limit of {NOFILE}:\n{}",
                srv.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        srv
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// How many descriptors the server has open.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> Resp {
        let b = body.to_string();
        http_request(
            self.port,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(b.as_bytes()),
        )
    }

    /// Registers `name` and logs in; the access token.
    fn new_user(&self, name: &str) -> String {
        let creds = json!({"username": name, "password": PW});
        assert_status(&self.post("/api/register", &creds), 201);
        let r = self.post("/api/login", &creds);
        assert_status(&r, 200);
        access(&r.json())
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- parley stderr ---\n{}--- end ---", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens idle connections (no HTTP at all) until the server has used up its
/// descriptors, plus `extra` that wait in the listen backlog.
fn flood(srv: &Limited, extra: usize) -> Vec<TcpStream> {
    let room = (NOFILE as usize).saturating_sub(srv.open_fds()) / 2;
    let addr = SocketAddr::from(([127, 0, 0, 1], srv.port));
    let conns: Vec<TcpStream> = (0..room + extra)
        .map_while(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok())
        .collect();
    // Let the server take what it can.
    thread::sleep(Duration::from_millis(100));
    conns
}

/// A socket's round trip: a message sent, then seen (the message, then its ack).
#[track_caller]
fn chat(ws: &mut Ws, body: &str) {
    let (m, _) = ws.send_msg("general", body);
    assert_eq!(m["body"], body);
}

// ---------------------------------------------------------------------------------
// 1. a flood of idle TCP connections
// ---------------------------------------------------------------------------------

/// A socket chatting, then the flood: every descriptor taken, a few more connections
/// waiting in the backlog, and the server verified deaf. Returns the socket and the
/// flood's connections, oldest first.
fn flooded(srv: &Limited) -> (Ws, Vec<TcpStream>) {
    let token = srv.new_user("alice");
    let mut ws = Ws::connect_port(srv.port, &token).expect("upgrade");
    ws.join("general");
    chat(&mut ws, "before the flood");
    let conns = flood(srv, 12);
    assert!(
        healthz_within(srv.port, Duration::from_millis(400)).is_none(),
        "the flood of {} connections did not exhaust the server's descriptors ({} open)",
        conns.len(),
        srv.open_fds()
    );
    // Sockets opened before the flood keep working through it.
    chat(&mut ws, "during the flood");
    (ws, conns)
}

#[test]
fn a_descriptor_flood_leaves_the_server_deaf_only_while_it_lasts() {
    let srv = Limited::start();
    let (mut ws, conns) = flooded(&srv);

    drop(conns);
    let t0 = Instant::now();
    let answered = healthz_within(srv.port, Duration::from_secs(5));
    let took = t0.elapsed();
    println!("/healthz answered {took:?} after the flood closed");
    assert!(
        answered.is_some() && took < Duration::from_secs(1),
        "the server did not answer within 1 s of the flood closing (took {took:?}, answered: {answered:?})"
    );
    chat(&mut ws, "after the flood");
    let r = http_request(srv.port, "GET", "/metrics", &[], None);
    assert!(
        r.text().contains("parley_http_accept_restarts_total 1"),
        "one restart of the accept loop should be counted:\n{}",
        r.text()
    );
    ws.ping();
}

#[test]
fn a_flood_that_stays_is_shed_oldest_first() {
    let srv = Limited::start();
    let (mut ws, mut conns) = flooded(&srv);
    // While the flood stays open, the server closes the oldest idle connections and
    // serves again.
    let t0 = Instant::now();
    let answered = healthz_within(srv.port, Duration::from_secs(10));
    println!(
        "/healthz answered {:?} into a flood that stays",
        t0.elapsed()
    );
    assert!(
        answered.is_some(),
        "a flood that stays left the server deaf"
    );
    chat(&mut ws, "through a flood that stays");
    // The first connections of the flood are the ones that were closed.
    let closed = |s: &mut TcpStream| {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        let gone = match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        s.set_nonblocking(false).unwrap();
        gone
    };
    assert!(closed(&mut conns[0]), "the oldest flood connection is open");
    let last = conns.len() - 1;
    assert!(
        !closed(&mut conns[last]),
        "the newest flood connection was closed"
    );
}

// ---------------------------------------------------------------------------------
// 2. slow clients
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

/// A request head that promises a body of 1 TiB, on a route that refuses it without
/// reading: tiny_http 0.12 allocated the whole unread length when it drained the
/// body, and the allocation failure aborted the process. The vendored fix drains in
/// small chunks; the server stays up.
#[test]
fn a_huge_content_length_does_not_take_the_server_down() {
    let srv = start_unlimited(&[]);
    for path in ["/api/login", "/api/rooms", "/nowhere"] {
        let mut s = std::net::TcpStream::connect(srv.addr()).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1099511627776\r\n\r\n{{"
        );
        std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 512];
        let _ = std::io::Read::read(&mut s, &mut buf);
        drop(s);
    }
    assert_status(&srv.get("/healthz", None), 200);
    let mut srv = srv;
    assert!(
        srv.wait_exit(std::time::Duration::from_millis(100))
            .is_none(),
        "still running"
    );
}

/// A browser opens several keep-alive connections at once (the web client's page and
/// modules); each holds an HTTP thread while idle. On a fresh server every one of them
/// must be answered at once, not after a busy thread is freed (tiny_http's pool once
/// queued a burst behind its single idle thread: the last answer took about 2 s).
#[test]
fn a_burst_of_keep_alive_connections_is_answered_at_once() {
    // The race it guards against hit about one fresh server in two.
    for _ in 0..5 {
        burst_on_a_fresh_server(24, "/healthz");
    }
}

/// Answers too big for a worker to write itself go to IO threads, of which one address
/// gets 8 at once: the rest of a burst (a browser loading the web client, an office
/// behind one address) must wait its turn, not be refused.
#[test]
fn a_burst_of_big_answers_to_one_address_is_served_not_refused() {
    burst_on_a_fresh_server(24, "/static/js/app.js");
}

fn burst_on_a_fresh_server(burst: usize, path: &'static str) {
    let srv = Server::start(&[]);
    let port = srv.port;
    let (tx, rx) = mpsc::channel();
    let ready = Arc::new(std::sync::Barrier::new(burst));
    for _ in 0..burst {
        let (tx, ready) = (tx.clone(), ready.clone());
        thread::spawn(move || {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            ready.wait();
            let t = Instant::now();
            let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let status = (&s)
                .write_all(head.as_bytes())
                .and_then(|()| next_status(&mut BufReader::new(s.try_clone()?)))
                .map_err(|e| e.kind());
            // The connection goes back open, as a browser's stays, holding its thread.
            let _ = tx.send((status, t.elapsed(), s));
        });
    }
    drop(tx);
    let answers: Vec<_> = rx.iter().collect();
    let slowest = answers.iter().map(|a| a.1).max().unwrap();
    let statuses: Vec<_> = answers.iter().map(|a| a.0).collect();
    assert_eq!(answers.len(), burst);
    assert!(statuses.iter().all(|s| *s == Ok(200)), "{statuses:?}");
    assert!(
        slowest < PROMPT,
        "the slowest of {burst} answers took {slowest:?}"
    );
}
