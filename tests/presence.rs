//! Batched presence: a socket that joins with `"presence": "batch"` hears presence as
//! `presence_batch` frames coalesced per room, and no `presence` frames for that room.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn join_batch(ws: &mut Ws, room: &str) -> Value {
    ws.send(&json!({"type": "join", "room": room, "presence": "batch", "ref": "j"}));
    let v = ws.recv();
    assert_eq!(v["type"], "joined", "{v}");
    v
}

/// Reads batches until `online` and `offline` have been seen in full (or fails after
/// 5 s); returns how many batch frames it took. Any other frame fails the test.
fn collect_batches(ws: &mut Ws, online: &[&str], offline: &[&str]) -> usize {
    let want_on: BTreeSet<String> = online.iter().map(|s| s.to_string()).collect();
    let want_off: BTreeSet<String> = offline.iter().map(|s| s.to_string()).collect();
    let (mut on, mut off, mut frames) = (BTreeSet::new(), BTreeSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while on != want_on || off != want_off {
        assert!(
            Instant::now() < deadline,
            "saw online {on:?} offline {off:?}"
        );
        let v = ws.recv();
        assert_eq!(
            v["type"], "presence_batch",
            "only batches for this room: {v}"
        );
        assert_eq!(v["room"], "general");
        on.extend(strings(&v["online"]));
        off.extend(strings(&v["offline"]));
        frames += 1;
    }
    frames
}

#[test]
fn a_batch_socket_hears_changes_coalesced_and_others_hear_each() {
    let srv = start_unlimited(&["--register-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    let joined = join_batch(&mut a, "general");
    assert_eq!(strings(&joined["online"]), ["alice".to_string()].into());
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");

    // Twenty users come online at once, then five of them leave.
    let names: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
    let mut sockets: Vec<Ws> = names
        .iter()
        .map(|n| {
            let t = new_user(&srv, n);
            let mut ws = Ws::connect(&srv, &t);
            ws.join("general");
            ws
        })
        .collect();
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("bob");
    let frames = collect_batches(&mut a, &all, &[]);
    assert!(frames < 10, "20 joins coalesced into {frames} batch frames");
    // bob, who joined the plain way, heard each one.
    for n in &names {
        let v = b.recv();
        assert_eq!(v["type"], "presence", "{v}");
        assert_eq!(
            (v["user"].as_str(), v["status"].as_str()),
            (Some(n.as_str()), Some("online"))
        );
    }
    let leaving: Vec<&str> = all[..5].to_vec();
    for ws in sockets.drain(..5) {
        ws.close();
    }
    collect_batches(&mut a, &[], &leaving);
    // Nothing else is pending for alice, and she can still act.
    a.ping();
}

/// A batched change reaches the socket within the 250 ms window (plus delivery).
#[test]
fn a_batch_arrives_within_the_window() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    join_batch(&mut a, "general");
    let mut b = Ws::connect(&srv, &bob);
    let began = Instant::now();
    b.join("general");
    let v = a.recv();
    let took = began.elapsed();
    assert_eq!(v["type"], "presence_batch", "{v}");
    assert_eq!(strings(&v["online"]), ["bob".to_string()].into());
    assert!(took < Duration::from_millis(750), "batch after {took:?}");
}

#[test]
fn an_unknown_presence_mode_is_a_bad_request() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.send(&json!({"type": "join", "room": "general", "presence": "loud", "ref": "x"}));
    expect_ws_error(&mut a, "bad_request", "x", &[]);
    // null is the same as absent.
    a.send(&json!({"type": "join", "room": "general", "presence": null}));
    assert_eq!(a.recv()["type"], "joined");
}
