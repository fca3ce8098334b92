//! Batched presence: a socket that joins with `"presence": "batch"` hears presence as
//! `presence_batch` frames coalesced per room, and no `presence` frames for that room;
//! one that joins with `"presence": "count"` hears only the room's online count, and
//! every door pages the names.

mod common;
#[path = "common/graphql.rs"]
mod gql;

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

fn join_count(ws: &mut Ws, room: &str) -> Value {
    ws.send(&json!({"type": "join", "room": room, "presence": "count", "ref": "j"}));
    let v = ws.recv();
    assert_eq!(v["type"], "joined", "{v}");
    assert!(v.get("online").is_none(), "no names: {v}");
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

    // Twenty users come online at once, then five of them leave. Accounts and sockets
    // first, then the twenty joins back to back: on a busy machine an account and an
    // upgrade can take longer than the window, and they are not what is tested.
    let names: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
    let mut sockets: Vec<Ws> = names
        .iter()
        .map(|n| Ws::connect(&srv, &new_user(&srv, n)))
        .collect();
    for ws in &mut sockets {
        ws.send(&json!({"type": "join", "room": "general"}));
    }
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    all.push("bob");
    let frames = collect_batches(&mut a, &all, &[]);
    assert!(frames < 10, "20 joins coalesced into {frames} batch frames");
    // bob, who joined the plain way, heard each one, one frame each (in the order the
    // joins were handled, which is not the order they were sent).
    let mut heard = BTreeSet::new();
    for _ in &names {
        let v = b.recv();
        assert_eq!(v["type"], "presence", "{v}");
        assert_eq!(v["status"], "online", "{v}");
        assert!(
            heard.insert(v["user"].as_str().unwrap_or("").to_string()),
            "{v}"
        );
    }
    assert_eq!(heard, names.iter().cloned().collect::<BTreeSet<_>>());
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

/// Reads `presence_count` frames until one says `want` (or fails after 5 s); returns
/// how many it took. Any other frame fails the test.
fn collect_counts(ws: &mut Ws, want: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut frames = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "no count of {want} after {frames} frames"
        );
        let v = ws.recv();
        assert_eq!(
            v["type"], "presence_count",
            "only counts for this room: {v}"
        );
        assert_eq!(v["room"], "general");
        frames += 1;
        if v["online_count"] == want {
            return frames;
        }
    }
}

/// Users `user00`… online in `general`, one socket each.
fn crowd(srv: &Server, n: usize) -> Vec<Ws> {
    (0..n)
        .map(|i| {
            let t = new_user(srv, &format!("user{i:02}"));
            let mut ws = Ws::connect(srv, &t);
            ws.join("general");
            ws
        })
        .collect()
}

#[test]
fn a_count_socket_hears_counts_coalesced_and_never_names() {
    let srv = start_unlimited(&["--register-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    let joined = join_count(&mut a, "general");
    assert_eq!(joined["online_count"], 1, "{joined}");
    let mut b = Ws::connect(&srv, &bob);
    b.send(&json!({"type": "join", "room": "general", "ref": "j"}));
    let joined = b.recv();
    assert_eq!(
        strings(&joined["online"]),
        ["alice".into(), "bob".into()].into()
    );
    assert_eq!(joined["online_count"], 2, "plain joins get the count too");

    let mut sockets = crowd(&srv, 20);
    let frames = collect_counts(&mut a, 22);
    assert!(frames < 10, "21 joins coalesced into {frames} count frames");
    for ws in sockets.drain(..5) {
        ws.close();
    }
    collect_counts(&mut a, 17);
    // Nothing else is pending for alice, and she can still act.
    a.ping();
}

#[test]
fn the_online_list_pages_on_the_socket_rest_and_graphql() {
    let srv = start_unlimited(&["--register-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let _others = crowd(&srv, 4);
    a.send(&json!({"type": "online", "room": "general", "limit": 2, "ref": "p1"}));
    let v = a.recv_skipping(&["presence"]);
    assert_eq!(
        (v["type"].as_str(), v["ref"].as_str()),
        (Some("online"), Some("p1")),
        "{v}"
    );
    assert_eq!(v["online"], json!(["alice", "user00"]));
    a.send(&json!({"type": "online", "room": "general", "after": "user00", "limit": 2}));
    assert_eq!(
        a.recv_skipping(&["presence"])["online"],
        json!(["user01", "user02"])
    );
    a.send(&json!({"type": "online", "room": "general", "after": "user03"}));
    assert_eq!(a.recv_skipping(&["presence"])["online"], json!([]));
    a.send(&json!({"type": "online", "room": "nowhere", "ref": "x"}));
    expect_ws_error(&mut a, "not_found", "x", &["presence"]);
    a.send(&json!({"type": "online", "room": "general", "limit": "two", "ref": "y"}));
    expect_ws_error(&mut a, "bad_request", "y", &["presence"]);

    let r = srv.get(
        "/api/rooms/general/online?after=user01&limit=0",
        Some(&alice),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["online"], json!(["user02"]), "limit clamps to 1");
    let r = srv.get("/api/rooms/general/online", Some(&alice));
    assert_eq!(r.json()["online"].as_array().map(Vec::len), Some(5));
    assert_eq!(
        srv.get("/api/rooms/nowhere/online", Some(&alice)).status,
        404
    );
    let r = srv.get("/api/rooms/general/online?limit=x", Some(&alice));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(srv.get("/api/rooms/general/online", None).status, 401);

    let q = "query($a: String) { roomOnline(room: \"general\", after: $a, limit: 3) }";
    let d = gql::data(&srv, &alice, q, json!({"a": "alice"}));
    assert_eq!(d["roomOnline"], json!(["user00", "user01", "user02"]));
}

#[test]
fn a_socket_can_switch_from_names_to_counts_by_joining_again() {
    let srv = start_unlimited(&["--register-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    join_batch(&mut a, "general");
    assert_eq!(join_count(&mut a, "general")["online_count"], 1);
    let _others = crowd(&srv, 3);
    collect_counts(&mut a, 4);
}

/// A count goes out at most once a second, so a change reaches a count socket within
/// that second (plus a tick and delivery).
#[test]
fn a_count_arrives_within_a_second() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    assert_eq!(join_count(&mut a, "general")["online_count"], 1);
    let mut b = Ws::connect(&srv, &bob);
    let began = Instant::now();
    b.join("general");
    let v = a.recv();
    let took = began.elapsed();
    assert_eq!(
        (v["type"].as_str(), v["online_count"].as_u64()),
        (Some("presence_count"), Some(2)),
        "{v}"
    );
    assert!(took < Duration::from_millis(1_600), "count after {took:?}");
}

/// A count socket hears no count within a second of its `joined` (which carried the
/// count), nor two within a second, however often the room changes meanwhile.
#[test]
fn each_socket_hears_its_first_count_a_second_after_its_joined() {
    let srv = start_unlimited(&["--register-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let carol = new_user(&srv, "carol");
    let tokens: Vec<String> = (0..7)
        .map(|i| new_user(&srv, &format!("user{i:02}")))
        .collect();
    let mut a = Ws::connect(&srv, &alice);
    let mut c = Ws::connect(&srv, &carol);
    let a_joined = Instant::now();
    assert_eq!(join_count(&mut a, "general")["online_count"], 1);
    let mut others = Vec::new();
    let mut c_joined = None;
    // A change every 150 ms for most of a second; carol joins half way.
    for (i, t) in tokens.iter().take(6).enumerate() {
        let mut w = Ws::connect(&srv, t);
        w.join("general");
        others.push(w);
        if i == 2 {
            c_joined = Some(Instant::now());
            join_count(&mut c, "general");
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let first = |ws: &mut Ws, since: Instant, who: &str| {
        let v = ws.recv();
        let after = since.elapsed();
        assert_eq!(v["type"], "presence_count", "{who}: {v}");
        assert!(
            after >= Duration::from_secs(1),
            "{who}: a count {after:?} after joining"
        );
        assert!(
            after < Duration::from_millis(1_600),
            "{who}: none until {after:?}"
        );
        Instant::now()
    };
    let a_first = first(&mut a, a_joined, "alice");
    let c_joined = c_joined.unwrap_or(a_joined);
    first(&mut c, c_joined, "carol");
    // Another change right after alice's count: she hears it a second later.
    let mut w = Ws::connect(&srv, &tokens[6]);
    w.join("general");
    let v = a.recv();
    assert_eq!(
        (v["type"].as_str(), v["online_count"].as_u64()),
        (Some("presence_count"), Some(9)),
        "{v}"
    );
    let gap = a_first.elapsed();
    assert!(
        gap >= Duration::from_millis(900),
        "two counts {gap:?} apart"
    );
}
