//! Abuse limits and operations: `--login-rate` (per IP and per username, 429 with
//! Retry-After), `--msg-rate` (socket `rate_limited`, the socket stays),
//! `--max-sockets-per-user`, each also from its environment variable; the Origin rule
//! and `--allow-origin`; idle plain-HTTP connections closed after
//! `--http-idle-timeout`; and the `/metrics` counters.

mod common;

use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

/// A TCP connection to the server from the loopback address `src` (any 127.x.y.z is
/// local on Linux), so that a test can be several clients with different IPs.
fn connect_from(src: Ipv4Addr, port: u16) -> TcpStream {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &SocketAddr::from((src, 0))).expect("bind to a loopback source address");
    connect(&fd, &SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// `POST /api/login` from the source address `src`.
fn login_from(srv: &Server, src: Ipv4Addr, name: &str, pw: &str) -> Resp {
    let mut s = connect_from(src, srv.port);
    let body = json!({"username": name, "password": pw}).to_string();
    let req = format!(
        "POST /api/login HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        srv.port,
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s, false).unwrap_or_else(|e| panic!("reading a response: {e}"))
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Asserts a 429 `rate_limited` with a positive integer Retry-After; returns it.
#[track_caller]
fn assert_429(r: &Resp) -> u64 {
    assert_error(r, 429, "rate_limited");
    let ra = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", r.headers));
    let secs: u64 = ra
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After should be whole seconds, got {ra:?}"));
    assert!(secs >= 1, "Retry-After {secs} should be at least 1");
    secs
}

// ---------------------------------------------------------------------------------
// --login-rate
// ---------------------------------------------------------------------------------

#[test]
fn login_rate_limits_each_ip() {
    let srv = Server::start(&["--login-rate", "3", "--msg-rate", "0"]);
    for n in ["alice", "bob", "carol", "dave"] {
        register(&srv, n);
    }
    // Three attempts from 127.0.0.1 for three different users, failed or not.
    assert_status(&login_from(&srv, ip(1), "alice", PW), 200);
    assert_error(
        &login_from(&srv, ip(1), "bob", "wrong password!"),
        401,
        "unauthorized",
    );
    assert_status(&login_from(&srv, ip(1), "carol", PW), 200);
    // The fourth, for yet another user and with the right password: 429.
    assert_429(&login_from(&srv, ip(1), "dave", PW));
    // Through the ordinary client (also 127.0.0.1): still limited.
    assert_429(&login_resp(&srv, "alice", PW));
    // Another IP is not affected.
    assert_status(&login_from(&srv, ip(2), "dave", PW), 200);
}

/// Failures count per (name, address) and, with a looser ceiling (5 x the rate), per
/// name; a stranger can never lock the owner out.
#[test]
fn login_failures_are_limited_without_locking_the_owner_out() {
    let srv = Server::start(&["--login-rate", "3", "--msg-rate", "0"]);
    register(&srv, "victim");
    register(&srv, "other");
    // The owner has logged in from 127.0.0.1 before.
    assert_status(&login_from(&srv, ip(1), "victim", PW), 200);
    // One guessing address stops itself after 3 failures, right password or not.
    for _ in 0..3 {
        let r = login_from(&srv, ip(2), "victim", "wrong password!");
        assert_error(&r, 401, "unauthorized");
    }
    assert_429(&login_from(&srv, ip(2), "victim", "wrong password!"));
    assert_429(&login_from(&srv, ip(2), "victim", PW));
    // Neither the owner nor a fresh address of theirs is held back by it.
    assert_status(&login_from(&srv, ip(1), "victim", PW), 200);
    assert_status(&login_from(&srv, ip(9), "victim", PW), 200);
    // A guesser spread over four more addresses reaches the name's ceiling (15).
    for last in 3..=6 {
        for _ in 0..3 {
            let r = login_from(&srv, ip(last), "victim", "wrong password!");
            assert_error(&r, 401, "unauthorized");
        }
    }
    // Now a fresh address is refused, the name compared case-insensitively...
    assert_429(&login_from(&srv, ip(10), "victim", PW));
    assert_429(&login_from(&srv, ip(11), "VICTIM", PW));
    // ...but the addresses that logged in as the owner still get in.
    assert_status(&login_from(&srv, ip(1), "victim", PW), 200);
    assert_status(&login_from(&srv, ip(9), "victim", PW), 200);
    // Another name is not affected.
    assert_status(&login_from(&srv, ip(7), "other", PW), 200);
}

#[test]
fn login_rate_retry_after_is_honoured() {
    // 60 per minute: the 61st quick attempt is refused; after Retry-After it passes.
    let srv = Server::start(&["--login-rate", "60", "--msg-rate", "0"]);
    register(&srv, "alice");
    let mut passed = 0;
    let retry = loop {
        let r = login_resp(&srv, "alice", PW);
        if r.status == 429 {
            break assert_429(&r);
        }
        assert_status(&r, 200);
        passed += 1;
        assert!(passed < 200, "never rate limited after {passed} logins");
    };
    assert!(
        passed >= 60,
        "only {passed} logins passed before the first 429 (limit 60 per minute)"
    );
    sleep(Duration::from_secs(retry) + Duration::from_millis(300));
    assert_status(&login_resp(&srv, "alice", PW), 200);
}

#[test]
fn login_rate_from_the_environment_and_zero_is_off() {
    let srv = Server::start_env(&["--msg-rate", "0"], &[("PARLEY_LOGIN_RATE", "2")]);
    register(&srv, "alice");
    assert_status(&login_resp(&srv, "alice", PW), 200);
    assert_status(&login_resp(&srv, "alice", PW), 200);
    assert_429(&login_resp(&srv, "alice", PW));
    drop(srv);

    let srv = Server::start(&["--login-rate", "0", "--msg-rate", "0"]);
    register(&srv, "alice");
    // Off means off: 30 quick attempts (far past any default budget), each answered on
    // its merits: the right password 200, the wrong one 401, never 429.
    for i in 0..30 {
        if i % 2 == 0 {
            let r = login_resp(&srv, "alice", PW);
            assert_status(&r, 200);
            assert_eq!(r.json()["user"]["username"], "alice", "attempt {i}");
        } else {
            assert_error(
                &login_resp(&srv, "alice", "wrong one!"),
                401,
                "unauthorized",
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// --msg-rate
// ---------------------------------------------------------------------------------

/// Writes `n` pings with refs `{tag}{i}` back to back, then reads the `n` replies in
/// order; returns for each whether it was a pong (false: a rate_limited error).
fn ping_burst(ws: &mut Ws, n: usize, tag: &str) -> Vec<bool> {
    for i in 0..n {
        ws.send(&json!({"type": "ping", "ref": format!("{tag}{i}")}));
    }
    (0..n)
        .map(|i| {
            let v = ws.recv_skipping(&["presence"]);
            assert_eq!(v["ref"], format!("{tag}{i}"), "replies come in order: {v}");
            match v["type"].as_str() {
                Some("pong") => true,
                Some("error") => {
                    assert_eq!(v["code"], "rate_limited", "{v}");
                    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
                    false
                }
                _ => panic!("expected pong or rate_limited, got {v}"),
            }
        })
        .collect()
}

#[test]
fn msg_rate_limits_a_socket_which_stays_open() {
    let srv = Server::start(&["--msg-rate", "5", "--login-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    let mut b = Ws::connect(&srv, &alice);

    let got = ping_burst(&mut a, 40, "p");
    assert!(
        got[..5].iter().all(|ok| *ok),
        "the first 5 messages are within the rate: {got:?}"
    );
    assert!(
        got.iter().any(|ok| !ok),
        "40 messages at once with --msg-rate 5 must hit the limit: {got:?}"
    );
    // The limit is per socket: alice's other socket is not limited.
    b.ping();
    // The limited socket is still open and recovers.
    sleep(Duration::from_millis(1500));
    a.ping();

    // Rate-limited sends are not stored; the others are acked and stored.
    a.join("general");
    sleep(Duration::from_millis(1500));
    let n = 20;
    for i in 0..n {
        a.send(&json!({"type": "send", "room": "general", "body": format!("burst {i}"), "ref": format!("s{i}")}));
    }
    let mut acked = Vec::new();
    let mut limited = 0;
    let mut replies = 0;
    while replies < n {
        let v = a.recv_skipping(&["presence", "message"]);
        match v["type"].as_str() {
            Some("ack") => {
                let i: usize = v["ref"].as_str().unwrap()[1..].parse().unwrap();
                acked.push(format!("burst {i}"));
            }
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            _ => panic!("unexpected {v}"),
        }
        replies += 1;
    }
    assert!(
        limited > 0,
        "20 sends at once with --msg-rate 5 must hit the limit"
    );
    assert!(acked.len() >= 5, "the first 5 sends pass: {acked:?}");
    let r = srv.get("/api/rooms/general/messages?limit=200", Some(&alice));
    assert_status(&r, 200);
    let mut stored: Vec<String> = r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked, "exactly the acked messages are stored");
    sleep(Duration::from_millis(1500));
    a.ping();
}

#[test]
fn msg_rate_from_the_environment_and_zero_is_off() {
    let srv = Server::start_env(&["--login-rate", "0"], &[("PARLEY_MSG_RATE", "3")]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    let got = ping_burst(&mut a, 20, "e");
    assert!(got[..3].iter().all(|ok| *ok), "{got:?}");
    assert!(
        got.iter().any(|ok| !ok),
        "PARLEY_MSG_RATE=3 not applied: {got:?}"
    );
    drop(a);
    drop(srv);

    let srv = Server::start(&["--login-rate", "0", "--msg-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    let got = ping_burst(&mut a, 300, "z");
    assert!(got.iter().all(|ok| *ok), "--msg-rate 0 is off: {got:?}");
}

// ---------------------------------------------------------------------------------
// --max-sockets-per-user
// ---------------------------------------------------------------------------------

#[test]
fn max_sockets_per_user_from_the_environment() {
    let srv = Server::start_env(
        &["--login-rate", "0", "--msg-rate", "0"],
        &[("PARLEY_MAX_SOCKETS_PER_USER", "2")],
    );
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a1 = Ws::connect(&srv, &alice);
    let mut a2 = Ws::connect(&srv, &alice);
    let auth = format!("Bearer {alice}");
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some(), "429 carries Retry-After");
    // Per user: bob is not affected, nor are alice's open sockets.
    let mut b = Ws::connect(&srv, &bob);
    b.ping();
    a1.ping();
    a2.ping();
    // Closing one frees a slot.
    a1.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut a3 = loop {
        let req = with_header(ws_request(&srv, "/ws"), "Authorization", &auth);
        match Ws::try_connect(&srv, req) {
            Ok(ws) => break ws,
            Err(e) => {
                assert!(Instant::now() < deadline, "slot never freed: {e:?}");
                sleep(Duration::from_millis(100));
            }
        }
    };
    a3.ping();
    a2.ping();
}

// ---------------------------------------------------------------------------------
// Origin
// ---------------------------------------------------------------------------------

fn upgrade_with_origin(srv: &Server, token: &str, origin: Option<&str>) -> Resp {
    let auth = format!("Bearer {token}");
    let mut h: Vec<(&str, &str)> = vec![("Authorization", &auth)];
    if let Some(o) = origin {
        h.push(("Origin", o));
    }
    ws_handshake_raw(srv, "/ws", &h)
}

#[track_caller]
fn assert_upgraded(r: &Resp, what: &str) {
    assert_eq!(
        r.status,
        101,
        "{what}: expected 101, got {} {:?}",
        r.status,
        r.text()
    );
    assert!(r.header("sec-websocket-accept").is_some(), "{what}");
}

#[test]
fn origin_must_be_our_own_unless_allowed() {
    let srv = Server::start(&["--login-rate", "0", "--msg-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let own = format!("http://127.0.0.1:{}", srv.port);

    assert_upgraded(&upgrade_with_origin(&srv, &alice, None), "no Origin");
    assert_upgraded(&upgrade_with_origin(&srv, &alice, Some(&own)), "own origin");
    let port_plus = format!("http://127.0.0.1:{}", srv.port + 1);
    let suffix = format!("http://127.0.0.1:{}.evil.example", srv.port);
    let localhost = format!("http://localhost:{}", srv.port);
    for bad in [
        "http://evil.example",
        "https://evil.example",
        port_plus.as_str(),
        suffix.as_str(),
        localhost.as_str(),
        "null",
    ] {
        let r = upgrade_with_origin(&srv, &alice, Some(bad));
        assert_eq!(r.status, 403, "Origin {bad}: {} {:?}", r.status, r.text());
        assert_ws_rejected(&r, 403, "forbidden");
    }
    // Origin is checked before the token: a bad origin with a bad token is 403.
    let r = upgrade_with_origin(&srv, "garbage", Some("http://evil.example"));
    assert_ws_rejected(&r, 403, "forbidden");
    // And with a good origin, a bad token is 401.
    let r = upgrade_with_origin(&srv, "garbage", Some(&own));
    assert_ws_rejected(&r, 401, "unauthorized");

    // A real client sending its own origin gets a working socket.
    let req = with_header(
        with_header(
            ws_request(&srv, "/ws"),
            "Authorization",
            &format!("Bearer {alice}"),
        ),
        "Origin",
        &own,
    );
    let mut ws = Ws::try_connect(&srv, req).expect("own origin upgrade");
    ws.ping();
    // And a browser-like one from elsewhere is refused by the real client too.
    let req = with_header(
        with_header(
            ws_request(&srv, "/ws"),
            "Authorization",
            &format!("Bearer {alice}"),
        ),
        "Origin",
        "http://evil.example",
    );
    match Ws::try_connect(&srv, req) {
        Ok(_) => panic!("a foreign origin was upgraded"),
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        Err(e) => panic!("expected HTTP 403, got {e:?}"),
    }
}

#[test]
fn allow_origin_flag_adds_origins() {
    let srv = Server::start(&[
        "--login-rate",
        "0",
        "--msg-rate",
        "0",
        "--allow-origin",
        "https://chat.example.com",
        "--allow-origin",
        "http://other.example:8080",
    ]);
    let alice = new_user(&srv, "alice");
    let own = format!("http://127.0.0.1:{}", srv.port);
    for ok in [
        "https://chat.example.com",
        "http://other.example:8080",
        own.as_str(),
    ] {
        assert_upgraded(&upgrade_with_origin(&srv, &alice, Some(ok)), ok);
    }
    for bad in [
        "http://evil.example",
        "http://chat.example.com",
        "https://chat.example.com.evil.example",
        "http://other.example:8081",
    ] {
        let r = upgrade_with_origin(&srv, &alice, Some(bad));
        assert_eq!(r.status, 403, "Origin {bad}: {} {:?}", r.status, r.text());
        assert_ws_rejected(&r, 403, "forbidden");
    }
}

#[test]
fn allow_origin_star_and_environment() {
    let srv = Server::start(&[
        "--login-rate",
        "0",
        "--msg-rate",
        "0",
        "--allow-origin",
        "*",
    ]);
    let alice = new_user(&srv, "alice");
    for o in ["http://evil.example", "https://anything.example:9999"] {
        assert_upgraded(&upgrade_with_origin(&srv, &alice, Some(o)), o);
    }
    drop(srv);

    let srv = Server::start_env(
        &["--login-rate", "0", "--msg-rate", "0"],
        &[("PARLEY_ALLOW_ORIGIN", "https://a.example,https://b.example")],
    );
    let alice = new_user(&srv, "alice");
    for o in ["https://a.example", "https://b.example"] {
        assert_upgraded(&upgrade_with_origin(&srv, &alice, Some(o)), o);
    }
    let r = upgrade_with_origin(&srv, &alice, Some("https://c.example"));
    assert_ws_rejected(&r, 403, "forbidden");
}

// ---------------------------------------------------------------------------------
// --http-idle-timeout
// ---------------------------------------------------------------------------------

/// Waits (up to `within`) for the server to close `s`; returns how long it took.
/// Bytes the server sends first (e.g. a 408) are read and ignored.
#[track_caller]
fn wait_closed(s: &mut TcpStream, within: Duration) -> Duration {
    let t0 = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("the server did not close the idle connection within {within:?}")
            }
            Err(e)
                if e.kind() == ErrorKind::ConnectionReset
                    || e.kind() == ErrorKind::ConnectionAborted =>
            {
                return t0.elapsed()
            }
            Err(e) => panic!("unexpected read error {e:?}"),
        }
    }
}

fn raw_connect(srv: &Server) -> TcpStream {
    connect_from(ip(1), srv.port)
}

#[test]
fn idle_http_connection_without_a_request_is_closed() {
    let srv = Server::start(&["--http-idle-timeout", "2"]);
    let mut s = raw_connect(&srv);
    let took = wait_closed(&mut s, Duration::from_secs(20));
    assert!(
        took >= Duration::from_millis(1500),
        "closed after {took:?}, before the 2 s idle timeout"
    );
    // The server still serves.
    assert_status(&srv.get("/healthz", None), 200);
}

#[test]
fn idle_http_connection_with_a_partial_request_is_closed() {
    let srv = Server::start(&["--http-idle-timeout", "2"]);
    let mut s = raw_connect(&srv);
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n", srv.port).as_bytes())
        .unwrap();
    wait_closed(&mut s, Duration::from_secs(20));
    assert_status(&srv.get("/healthz", None), 200);
}

#[test]
fn idle_keep_alive_connection_is_closed_after_its_last_response() {
    let srv = Server::start(&["--http-idle-timeout", "2"]);
    let mut s = raw_connect(&srv);
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: keep-alive\r\n\r\n",
        srv.port
    );
    // Requests spaced well inside the timeout keep it open, past the timeout in total.
    for i in 0..6 {
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s, false).unwrap_or_else(|e| panic!("reading a response: {e}"));
        assert_eq!(r.status, 200, "request {i} on the kept-alive connection");
        assert_eq!(r.json()["status"], "ok");
        sleep(Duration::from_millis(800));
    }
    let took = wait_closed(&mut s, Duration::from_secs(20));
    assert!(
        took >= Duration::from_millis(700),
        "closed {took:?} after the last response, before the 2 s idle timeout"
    );
}

#[test]
fn websockets_are_not_http_idle_connections() {
    let srv = Server::start(&["--http-idle-timeout", "1", "--login-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &alice);
    ws.ping();
    sleep(Duration::from_secs(4));
    ws.ping();
    // Fully usable, not just answering pings.
    ws.join("general");
    ws.send_msg("general", "still here");
}

// ---------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------

fn metrics(srv: &Server) -> BTreeMap<String, f64> {
    let r = srv.get("/metrics", None);
    assert_status(&r, 200);
    let ct = r.header("content-type").unwrap_or("").to_ascii_lowercase();
    assert!(ct.starts_with("text/plain"), "content type {ct:?}");
    parse_metrics(&r.text())
}

fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad metric value in {line:?}"));
        m.insert(name.to_string(), v);
    }
    m
}

#[track_caller]
fn metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("metric {name} missing; have {:?}", m.keys()))
}

/// Polls /metrics until `name` equals `want`.
#[track_caller]
fn wait_metric(srv: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(&metrics(srv), name);
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {v}, expected {want}");
        sleep(Duration::from_millis(50));
    }
}

fn rejected_total(m: &BTreeMap<String, f64>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("parley_upgrades_rejected_total"))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_count_what_happens() {
    let srv = Server::start(&["--login-rate", "0", "--msg-rate", "0"]);
    let r = srv.get("/metrics", None);
    let text = r.text();
    for (name, kind) in [
        ("parley_open_sockets", "gauge"),
        ("parley_logins_ok_total", "counter"),
        ("parley_logins_failed_total", "counter"),
        ("parley_slow_clients_dropped_total", "counter"),
        ("parley_db_batches_total", "counter"),
        ("parley_upgrades_rejected_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}` in:\n{text}"
        );
    }
    let m0 = metrics(&srv);
    assert_eq!(metric(&m0, "parley_open_sockets"), 0.0);
    let unauth = "parley_upgrades_rejected_total{reason=\"unauthorized\"}";

    register(&srv, "alice");
    let t = access(&login(&srv, "alice"));
    login(&srv, "alice");
    for _ in 0..3 {
        assert_error(
            &login_resp(&srv, "alice", "wrong password!"),
            401,
            "unauthorized",
        );
    }
    assert_error(
        &login_resp(&srv, "nobody", "wrong password!"),
        401,
        "unauthorized",
    );
    let m1 = metrics(&srv);
    assert_eq!(
        metric(&m1, "parley_logins_ok_total") - metric(&m0, "parley_logins_ok_total"),
        2.0
    );
    assert_eq!(
        metric(&m1, "parley_logins_failed_total") - metric(&m0, "parley_logins_failed_total"),
        4.0
    );

    let mut s1 = Ws::connect(&srv, &t);
    let mut s2 = Ws::connect(&srv, &t);
    let s3 = Ws::connect(&srv, &t);
    wait_metric(&srv, "parley_open_sockets", 3.0);
    s3.close();
    wait_metric(&srv, "parley_open_sockets", 2.0);

    let before = metrics(&srv);
    let r = ws_handshake_raw(&srv, "/ws?access_token=garbage", &[]);
    assert_ws_rejected(&r, 401, "unauthorized");
    let auth = format!("Bearer {t}");
    let r = ws_handshake_raw(
        &srv,
        "/ws",
        &[("Authorization", &auth), ("Origin", "http://evil.example")],
    );
    assert_ws_rejected(&r, 403, "forbidden");
    // Not a handshake at all: counted apart from the limits.
    let r = srv.request("POST", "/ws", Some(&t), None);
    assert_error(&r, 405, "bad_request");
    let r = srv.get("/ws", Some(&t));
    assert_error(&r, 400, "bad_request");
    let after = metrics(&srv);
    assert_eq!(metric(&after, unauth) - metric(&before, unauth), 1.0);
    let invalid = "parley_upgrades_rejected_total{reason=\"invalid\"}";
    assert_eq!(metric(&after, invalid) - metric(&before, invalid), 2.0);
    let limit = "parley_upgrades_rejected_total{reason=\"limit\"}";
    assert_eq!(metric(&after, limit), metric(&before, limit));
    assert_eq!(rejected_total(&after) - rejected_total(&before), 4.0);

    // Writes go through the batched writer.
    let b0 = metric(&after, "parley_db_batches_total");
    s1.join("general");
    s1.send_msg("general", "counted");
    let b1 = metric(&metrics(&srv), "parley_db_batches_total");
    assert!(
        b1 > b0,
        "a stored message is a committed batch ({b0} -> {b1})"
    );
    assert_eq!(metric(&after, "parley_slow_clients_dropped_total"), 0.0);
    s2.ping();
}

#[test]
fn socket_slots_are_freed_however_a_socket_ends() {
    let srv = Server::start(&[
        "--max-sockets-per-user",
        "1",
        "--login-rate",
        "0",
        "--msg-rate",
        "0",
    ]);
    let admin = new_user(&srv, "admin");
    let alice = new_user(&srv, "alice");
    let auth = format!("Bearer {alice}");
    let connect = || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let req = with_header(ws_request(&srv, "/ws"), "Authorization", &auth);
            match Ws::try_connect(&srv, req) {
                Ok(ws) => return ws,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "alice's only socket slot was not freed within 5 s: {e:?}"
                    );
                    sleep(Duration::from_millis(100));
                }
            }
        }
    };
    let mut s = connect();
    s.ping();
    // Refused upgrades do not take the slot away.
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    s.ping();
    // Kicked.
    let r = srv.post_empty("/api/admin/users/alice/kick", Some(&admin));
    assert_status(&r, 200);
    assert_eq!(s.expect_close(), Some(4003));
    drop(s);
    let s = connect();
    // Dropped without a close frame.
    drop(s);
    let mut s = connect();
    // Closed politely.
    s.ping();
    s.close();
    let mut s = connect();
    s.ping();
    wait_metric(&srv, "parley_open_sockets", 1.0);
}
