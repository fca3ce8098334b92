//! `--trusted-proxy`: only a peer inside a trusted network may say who the client is
//! (`X-Forwarded-For`, `Forwarded`) and which scheme and host it used; that client
//! address is what the audit trail and the rate limits see, and that scheme and host
//! are what the Origin rule and the cookie's `Secure` flag see. Peers are real
//! connections from distinct loopback addresses.

mod common;

use common::*;
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

/// One request over a fresh connection from the loopback address `src`.
fn request_from(
    srv: &Server,
    src: u8,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &SocketAddr::from((Ipv4Addr::new(127, 0, 0, src), 0))).unwrap();
    connect(&fd, &srv.addr()).unwrap();
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
        srv.port
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    s.write_all(head.as_bytes()).unwrap();
    read_response(&mut s, method == "HEAD").unwrap()
}

/// A failed login from `src` with `headers`; returns the IP its audit row recorded.
fn failed_login_ip(srv: &Server, src: u8, headers: &[(&str, &str)]) -> String {
    let body = json!({"username": "alice", "password": "wrong password!"}).to_string();
    let r = request_from(srv, src, "POST", "/api/login", headers, Some(&body));
    assert_error(&r, 401, "unauthorized");
    let c = rusqlite::Connection::open(srv.db_path()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let ip: Option<String> = c
            .query_row(
                "SELECT ip FROM audit_log WHERE action = 'login_failed' ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .ok();
        if let Some(ip) = ip {
            // Forget it, so the next call sees only its own row.
            c.execute("DELETE FROM audit_log WHERE action = 'login_failed'", [])
                .unwrap();
            return ip;
        }
        assert!(std::time::Instant::now() < deadline, "no login_failed row");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn only_a_trusted_peer_may_name_the_client() {
    let srv = Server::start(&[
        "--login-rate",
        "0",
        "--trusted-proxy",
        "127.0.0.2",
        "--trusted-proxy",
        "127.0.0.4/32",
    ]);
    register(&srv, "alice");
    // An untrusted peer's headers are ignored: no spoofing.
    let xff = [("X-Forwarded-For", "10.9.9.9")];
    assert_eq!(failed_login_ip(&srv, 3, &xff), "127.0.0.3");
    // The trusted proxy names its client.
    assert_eq!(failed_login_ip(&srv, 2, &xff), "10.9.9.9");
    // A chain: the right-most entry that is not a trusted proxy; what the client put
    // in front (1.1.1.1) is not believed.
    let chain = [("X-Forwarded-For", "1.1.1.1, 10.1.1.1, 127.0.0.4")];
    assert_eq!(failed_login_ip(&srv, 2, &chain), "10.1.1.1");
    // Several headers are one list, in order.
    let two = [
        ("X-Forwarded-For", "1.1.1.1"),
        ("X-Forwarded-For", "10.2.2.2"),
    ];
    assert_eq!(failed_login_ip(&srv, 2, &two), "10.2.2.2");
    // IPv6 forms, with a port, and RFC 7239 Forwarded.
    let v6 = [("X-Forwarded-For", "[2001:db8::1]:4711")];
    assert_eq!(failed_login_ip(&srv, 2, &v6), "2001:db8::1");
    let fwd = [(
        "Forwarded",
        r#"for="[2001:db8::7]:80";proto=https, for=127.0.0.4"#,
    )];
    assert_eq!(failed_login_ip(&srv, 2, &fwd), "2001:db8::7");
    // Garbage is passed over, never a 500: with nothing usable, the peer itself.
    let junk = [("X-Forwarded-For", "not-an-ip, %%%, unknown")];
    assert_eq!(failed_login_ip(&srv, 2, &junk), "127.0.0.2");
    let junk = [("Forwarded", "for=;;;==,proto")];
    assert_eq!(failed_login_ip(&srv, 2, &junk), "127.0.0.2");
}

#[test]
fn rate_limits_count_the_forwarded_client() {
    let srv = Server::start(&["--login-rate", "2", "--trusted-proxy", "127.0.0.2"]);
    register(&srv, "alice");
    let body = json!({"username": "alice", "password": PW}).to_string();
    let login_as = |client: &str| {
        request_from(
            &srv,
            2,
            "POST",
            "/api/login",
            &[("X-Forwarded-For", client)],
            Some(&body),
        )
    };
    assert_status(&login_as("10.0.0.1"), 200);
    assert_status(&login_as("10.0.0.1"), 200);
    assert_error(&login_as("10.0.0.1"), 429, "rate_limited");
    // Another client behind the same proxy has its own budget.
    assert_status(&login_as("10.0.0.2"), 200);
}

#[test]
fn the_forwarded_scheme_and_host_are_the_origin_and_make_the_cookie_secure() {
    let srv = Server::start(&["--trusted-proxy", "127.0.0.2"]);
    register(&srv, "alice");
    let token = access(&login(&srv, "alice"));
    let auth = format!("Bearer {token}");
    let upgrade = |src: u8, extra: &[(&str, &str)]| {
        let mut h = vec![
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Origin", "https://chat.example.org"),
            ("Authorization", auth.as_str()),
        ];
        h.extend_from_slice(extra);
        request_from(&srv, src, "GET", "/ws", &h, None).status
    };
    let forwarded = [
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "chat.example.org"),
        ("X-Forwarded-For", "10.0.0.5"),
    ];
    assert_eq!(upgrade(2, &forwarded), 101, "the proxy's client origin");
    assert_eq!(upgrade(3, &forwarded), 403, "an untrusted peer's claim");
    // The cookie is Secure when the client used https.
    let body = json!({"username": "alice", "password": PW, "cookie": true}).to_string();
    let r = request_from(&srv, 2, "POST", "/api/login", &forwarded, Some(&body));
    assert_status(&r, 200);
    assert!(r.header("set-cookie").unwrap().contains("; Secure"));
    let r = request_from(&srv, 3, "POST", "/api/login", &forwarded, Some(&body));
    assert!(!r.header("set-cookie").unwrap().contains("Secure"));
    // The web client's CSP lets its socket reach the host the browser sees.
    let csp = |src: u8| {
        let r = request_from(&srv, src, "GET", "/", &forwarded, None);
        assert_status(&r, 200);
        r.header("content-security-policy").unwrap().to_owned()
    };
    assert!(csp(2).contains("wss://chat.example.org;"), "{}", csp(2));
    let direct = csp(3);
    assert!(!direct.contains("chat.example.org"), "{direct}");
    assert!(
        direct.contains(&format!("ws://127.0.0.1:{} ", srv.port)),
        "{direct}"
    );
}

#[test]
fn a_bad_trusted_proxy_is_a_usage_error() {
    let out = run_cli(&["serve", "--trusted-proxy", "10.0.0.0/40"], "");
    assert_exit(&out, 2, "a bad network");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--trusted-proxy"), "{err}");
}
