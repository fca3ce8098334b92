//! Limits on what strangers and members can make the server store: registrations per
//! address, rooms per user.

mod common;

use common::*;
use serde_json::json;

/// `--register-rate` is a budget of its own per address: past it, 429 with
/// Retry-After and nothing created; logins are not affected.
#[test]
fn registrations_per_address_are_limited() {
    let srv = Server::start(&["--register-rate", "3", "--login-rate", "0"]);
    for name in ["ann", "bob", "cat"] {
        register(&srv, name);
    }
    let r = register_resp(&srv, "dan", PW);
    assert_error(&r, 429, "rate_limited");
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(
        wait > 60,
        "the budget refills over an hour, not seconds: {wait}"
    );
    assert_error(&login_resp(&srv, "dan", PW), 401, "unauthorized");
    // Logins have their own budget.
    for _ in 0..5 {
        login(&srv, "ann");
    }
}

/// `--register-rate 0` turns the limit off.
#[test]
fn zero_register_rate_is_off() {
    let srv = Server::start(&["--register-rate", "0"]);
    for i in 0..40 {
        register(&srv, &format!("user{i:02}"));
    }
}

/// `--room-rate` counts per user: past it, 429 and no room; another user still may.
#[test]
fn rooms_per_user_are_limited() {
    let srv = start_unlimited(&["--room-rate", "2"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    for name in ["r1", "r2"] {
        assert_status(
            &srv.post("/api/rooms", Some(&alice), &json!({"name": name})),
            201,
        );
    }
    let r = srv.post("/api/rooms", Some(&alice), &json!({"name": "r3"}));
    assert_error(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some());
    let rooms = srv.get("/api/rooms", Some(&alice)).json();
    let names: Vec<&str> = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["general", "r1", "r2"]);
    assert_status(
        &srv.post("/api/rooms", Some(&bob), &json!({"name": "r3"})),
        201,
    );
}

fn audit_rows(db: &std::path::Path, action: &str) -> Vec<(Option<String>, serde_json::Value)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT ip, detail FROM audit_log WHERE action = ?1 ORDER BY id")
        .unwrap();
    let rows = st
        .query_map([action], |r| {
            let detail: String = r.get(1)?;
            Ok((r.get(0)?, serde_json::from_str(&detail).unwrap()))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// One client with no account sending tokenless upgrades over fresh connections (it
/// once wrote 47,054 audit rows in 5 s): the trail keeps one row for the first refusal
/// and one summary row counting the rest; past 60 a minute the answers are 429s, each
/// after the tarpit's pause.
#[test]
fn anonymous_refused_upgrades_are_cheap_and_folded() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &[]);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..30)
            .map(|_| {
                s.spawn(|| {
                    (0..4)
                        .map(|_| ws_handshake_raw(&srv, "/ws", &[]).status)
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(refused + limited, 120, "{statuses:?}");
    assert!(
        (60..=65).contains(&refused),
        "{refused} answered 401 at once"
    );
    let rows = audit_rows(&srv.db_path(), "ws_rejected");
    assert_eq!(rows.len(), 1, "one row while the window is open: {rows:?}");
    assert_eq!(rows[0].0.as_deref(), Some("127.0.0.1"));
    // The window's summary is written when it closes, at the latest at shutdown.
    srv.sigterm();
    assert!(srv.wait_exit(std::time::Duration::from_secs(15)).is_some());
    let rows = audit_rows(&dir.path().join("chat.db"), "ws_rejected");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1].1["repeated"], 119, "{rows:?}");
}
