//! `--ws-ping`: silent sockets are pinged, and closed when they stay silent.

mod common;

use common::*;
use std::io::Read;
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// A client that vanished: the upgrade is done by hand on a raw socket, which then
/// never reads and never answers a ping. It has joined `general` (the join frame is
/// written raw, masked as a client must).
fn vanishing_client(srv: &Server, token: &str) -> TcpStream {
    let req = with_header(
        ws_request(srv, "/ws"),
        "Authorization",
        &format!("Bearer {token}"),
    );
    let stream = TcpStream::connect(srv.addr()).unwrap();
    let (mut ws, _) = tungstenite::client::client(req, stream).expect("upgrade");
    ws.send(Message::text(r#"{"type":"join","room":"general"}"#))
        .unwrap();
    // Dropping the WebSocket would not close the TCP socket we keep.
    ws.get_ref().try_clone().unwrap()
}

#[test]
fn a_silent_socket_is_closed_within_two_intervals_and_goes_offline() {
    let srv = start_unlimited(&["--ws-ping", "1", "--max-sockets-per-user", "1"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let mut gone = vanishing_client(&srv, &bob);
    let v = a.recv();
    assert_eq!(
        (v["type"].as_str(), v["status"].as_str()),
        (Some("presence"), Some("online"))
    );
    let began = Instant::now();

    // alice reads (and so answers pings); bob's socket never does.
    let v = a.recv_skipping(&[]);
    let took = began.elapsed();
    assert_eq!(v["type"], "presence", "{v}");
    assert_eq!(
        (v["user"].as_str(), v["status"].as_str()),
        (Some("bob"), Some("offline"))
    );
    assert!(
        took <= Duration::from_secs(3),
        "closed after {took:?}, over two intervals + 1 s"
    );
    // The server sent bob a ping and then a close (1001) before cutting him off.
    let mut raw = Vec::new();
    gone.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = gone.read_to_end(&mut raw);
    assert!(
        raw.windows(2).any(|w| w == [0x89, 0x00]),
        "a ping frame was sent"
    );
    assert!(
        raw.windows(4).any(|w| w == [0x88, w[1], 0x03, 0xE9]),
        "a close frame with 1001 was sent"
    );
    // His slot is free: with one socket allowed, he can connect again.
    let mut b = Ws::connect(&srv, &bob);
    b.ping();
    a.ping();
}

#[test]
fn a_socket_that_answers_pings_stays_open() {
    let srv = start_unlimited(&["--ws-ping", "1"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    // Three seconds of reading only: tungstenite answers each ping with a pong.
    let until = Instant::now() + Duration::from_millis(3500);
    a.stream()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pings = 0;
    while Instant::now() < until {
        match a.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("socket closed: {e:?}"),
        }
    }
    assert!(pings >= 2, "pinged {pings} times in 3.5 s");
    a.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    a.ping();
}

#[test]
fn zero_turns_keepalive_off() {
    let srv = start_unlimited(&["--ws-ping", "0"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    sleep(Duration::from_millis(2500));
    a.stream()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        matches!(a.ws.read(), Err(tungstenite::Error::Io(_))),
        "nothing was sent to a silent socket"
    );
    a.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    a.ping();
}
