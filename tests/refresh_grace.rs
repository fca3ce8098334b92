//! `--refresh-grace`: a retired refresh token presented again within the grace (a
//! retry whose answer was lost, two tabs refreshing at once) gets a new pair for the
//! same login, audited `refresh_retry`; after the grace it is reuse and revokes the
//! login.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn refresh(srv: &Server, token: &str) -> Resp {
    srv.post("/api/refresh", None, &json!({ "refresh_token": token }))
}

fn audit_actions(srv: &Server, admin: &str) -> Vec<String> {
    let r = srv.get("/api/admin/audit?limit=1000", Some(admin));
    r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn two_refreshes_at_once_both_succeed_and_every_successor_works() {
    let srv = Server::start(&["--refresh-grace", "10"]);
    register(&srv, "alice");
    let pair = login(&srv, "alice");
    let rt = refresh_tok(&pair);
    let answers: Vec<Resp> = std::thread::scope(|s| {
        let a = s.spawn(|| refresh(&srv, &rt));
        let b = s.spawn(|| refresh(&srv, &rt));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let pairs: Vec<Value> = answers
        .iter()
        .map(|r| {
            assert_status(r, 200);
            r.json()
        })
        .collect();
    // Both new pairs work, and both successors are single use.
    for p in &pairs {
        assert_status(&srv.get("/api/me", Some(&access(p))), 200);
        assert_status(&refresh(&srv, &refresh_tok(p)), 200);
    }
    let actions = audit_actions(&srv, &access(&pairs[0]));
    assert_eq!(actions.iter().filter(|a| *a == "refresh_retry").count(), 1);
    assert!(!actions.contains(&"refresh_reuse".to_string()));
}

#[test]
fn after_the_grace_a_retired_token_is_reuse() {
    let srv = Server::start(&["--refresh-grace", "1"]);
    register(&srv, "alice");
    let pair = login(&srv, "alice");
    let rt = refresh_tok(&pair);
    let fresh = refresh(&srv, &rt).json();
    // The grace is measured in whole seconds from the rotation: past 2 s it is over.
    std::thread::sleep(Duration::from_millis(2100));
    assert_error(&refresh(&srv, &rt), 401, "unauthorized");
    // The login is revoked: the successor is dead too.
    assert_error(
        &srv.get("/api/me", Some(&access(&fresh))),
        401,
        "unauthorized",
    );
    assert_error(&refresh(&srv, &refresh_tok(&fresh)), 401, "unauthorized");
}
