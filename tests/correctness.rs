//! Correctness inside the server: what happens to a socket the server has closed but
//! whose client has not noticed.

mod common;

use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

fn messages_from(srv: &Server, user: &str) -> i64 {
    let c = rusqlite::Connection::open(srv.db_path()).unwrap();
    c.query_row(
        "SELECT count(*) FROM messages m JOIN users u ON u.id = m.user_id WHERE u.username = ?1",
        [user],
        |r| r.get(0),
    )
    .unwrap()
}

/// A banned socket whose client stops reading never gets its close frame, so the
/// server keeps the connection up to 2 s while it tries to deliver it. In that time the
/// socket must not act: nothing it sends after the ban is stored.
#[test]
fn a_banned_socket_that_does_not_read_stops_acting_at_once() {
    let srv = start_unlimited(&[]);
    let alice = access(&{
        register(&srv, "alice");
        login(&srv, "alice")
    });
    register(&srv, "bob");
    let bob = access(&login(&srv, "bob"));

    let mut bob_ws = tiny_window_socket(&srv, &bob);
    bob_ws
        .send(tungstenite::Message::text(
            json!({"type": "join", "room": "general"}).to_string(),
        ))
        .unwrap();
    // From here on bob never reads; he sends 20 messages a second.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let frame = json!({"type": "send", "room": "general", "body": format!("b{i}")});
                if bob_ws
                    .send(tungstenite::Message::text(frame.to_string()))
                    .is_err()
                {
                    break;
                }
                i += 1;
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Fill bob's connection (the kernel takes about 2.3 MB for a reader with a tiny
    // window): big messages he will never read.
    let big = "x".repeat(4000);
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    for _ in 0..700 {
        a.send_msg("general", &big);
    }
    assert!(
        messages_from(&srv, "bob") > 0,
        "bob's flood is being stored"
    );

    assert_status(
        &srv.post_empty("/api/admin/users/bob/ban", Some(&alice)),
        204,
    );
    let at_ban = messages_from(&srv, "bob");
    // Longer than the 2 s the server gives a close frame to get through.
    thread::sleep(Duration::from_millis(2500));
    let after = messages_from(&srv, "bob");
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    assert!(
        after - at_ban <= 1,
        "{} messages of bob's were stored after his ban",
        after - at_ban
    );
}
