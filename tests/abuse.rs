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
