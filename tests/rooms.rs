//! Rooms over HTTP: listing, creating (validation, 409), `online` counts, history
//! paging, and direct-message history.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn rooms(srv: &Server, token: &str) -> Vec<Value> {
    let r = srv.get("/api/rooms", Some(token));
    assert_status(&r, 200);
    assert!(r.is_json());
    r.json()["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("rooms should be an array: {}", r.text()))
        .clone()
}

fn room<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|r| r["name"] == name)
}

fn online(srv: &Server, token: &str, name: &str) -> i64 {
    let list = rooms(srv, token);
    room(&list, name).unwrap_or_else(|| panic!("room {name} not listed"))["online"]
        .as_i64()
        .expect("online should be an int")
}

/// Polls until `online(room) == want` (disconnects are noticed asynchronously).
fn wait_online(srv: &Server, token: &str, name: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = online(srv, token, name);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "room {name}: online stayed {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn general_exists_and_listing_needs_auth() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let list = rooms(&srv, &at);
    let g = room(&list, "general").expect("general exists in a new database");
    assert!(
        is_rfc3339(g["created_at"].as_str().expect("created_at string")),
        "{g}"
    );
    assert_eq!(g["online"], 0, "{g}");
    assert_error(&srv.get("/api/rooms", None), 401, "unauthorized");
    assert_error(&srv.get("/api/rooms", Some("nope")), 401, "unauthorized");
}

#[test]
fn create_room_and_conflict() {
    let srv = Server::start(&[]);
    let _admin = new_user(&srv, "alice");
    // A plain member holds room.create too.
    let member = new_user(&srv, "bob");
    let r = srv.post("/api/rooms", Some(&member), &json!({"name": "random"}));
    assert_status(&r, 201);
    assert!(r.is_json());
    let created = r.json()["room"].clone();
    assert_eq!(created["name"], "random", "{created}");
    assert!(
        is_rfc3339(created["created_at"].as_str().expect("created_at")),
        "{created}"
    );
    let list = rooms(&srv, &member);
    let listed = room(&list, "random").expect("new room is listed");
    assert_eq!(listed["online"], 0);
    assert!(room(&list, "general").is_some());

    let r = srv.post("/api/rooms", Some(&member), &json!({"name": "random"}));
    assert_error(&r, 409, "conflict");
    let r = srv.post("/api/rooms", Some(&member), &json!({"name": "general"}));
    assert_error(&r, 409, "conflict");

    // The new room works on the socket, and starts with no history.
    let mut ws = Ws::connect(&srv, &member);
    let j = ws.join("random");
    assert_eq!(j["online"], json!(["bob"]));
    let r = srv.get("/api/rooms/random/messages", Some(&member));
    assert_status(&r, 200);
    assert_eq!(r.json()["messages"], json!([]));
}

#[test]
fn room_create_follows_the_role_permissions_table() {
    // Claim: `POST /api/rooms` is decided by the database's role_permissions, not by
    // a fixed rule. With room.create taken from `member` (by hand, in the live file),
    // a member is refused 403, no room is made, and the refusal is audited with the
    // permission; an admin still creates rooms.
    // SQLite even under PARLEY_TEST_POSTGRES: it edits role_permissions in the file.
    let srv = start_unlimited_sqlite(&[]);
    let admin = new_user(&srv, "alice");
    let member = new_user(&srv, "bob");
    let removed = open_db(&srv.db_path())
        .execute(
            "DELETE FROM role_permissions WHERE role = 'member' AND permission = 'room.create'",
            [],
        )
        .unwrap();
    assert_eq!(removed, 1, "member held room.create in a new database");

    // Such a change may take up to 5 s to reach the server; a room made
    // in that window gets its own name, and only the refused one is checked.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let name = format!("bobs-room-{}", unique());
        let r = srv.post("/api/rooms", Some(&member), &json!({ "name": name }));
        if r.status == 403 {
            assert_error(&r, 403, "forbidden");
            break name;
        }
        assert_status(&r, 201);
        assert!(
            Instant::now() < deadline,
            "members still create rooms 5 s after room.create was taken away"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        room(&rooms(&srv, &member), &refused).is_none(),
        "a refused room is not listed"
    );
    let in_file: i64 = open_db(&srv.db_path())
        .query_row(
            "SELECT count(*) FROM rooms WHERE name = ?1",
            [&refused],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(in_file, 0, "a refused room is not in the database");
    // The socket cannot join it either.
    let mut ws = Ws::connect(&srv, &member);
    ws.send(&json!({"type": "join", "room": refused, "ref": "j"}));
    expect_ws_error(&mut ws, "not_found", "j", &[]);

    // The refusal is audited: actor bob, action forbidden, the permission named.
    wait_until(Duration::from_secs(10), "the forbidden audit row", || {
        let r = srv.get("/api/admin/audit?limit=1000", Some(&admin));
        assert_status(&r, 200);
        r.json()["events"].as_array().unwrap().iter().any(|e| {
            e["action"] == "forbidden"
                && e["actor"] == "bob"
                && e["target"] == refused.as_str()
                && e["detail"]["permission"] == "room.create"
        })
    });

    // The admin role keeps room.create.
    let r = srv.post("/api/rooms", Some(&admin), &json!({"name": "admins-room"}));
    assert_status(&r, 201);
    assert!(room(&rooms(&srv, &admin), "admins-room").is_some());
}

#[test]
fn create_room_validation_and_auth() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let bad = [
        String::new(),
        "Upper".into(),
        "has space".into(),
        "dot.name".into(),
        "slash/x".into(),
        "é".into(),
        "a".repeat(65),
        "tab\t".into(),
    ];
    for name in &bad {
        let r = srv.post("/api/rooms", Some(&at), &json!({"name": name}));
        assert_eq!(
            r.status,
            400,
            "room name {name:?}: {} {:?}",
            r.status,
            r.text()
        );
        assert_error(&r, 400, "bad_request");
    }
    for body in [
        json!({}),
        json!({"name": 5}),
        json!({"name": null}),
        json!([]),
    ] {
        let r = srv.post("/api/rooms", Some(&at), &body);
        assert_error(&r, 400, "bad_request");
    }
    let r = srv.request(
        "POST",
        "/api/rooms",
        Some(&at),
        Some(("application/json", b"{\"name\":")),
    );
    assert_error(&r, 400, "bad_request");
    let r = srv.request(
        "POST",
        "/api/rooms",
        Some(&at),
        Some(("text/plain", b"{\"name\":\"plain\"}")),
    );
    assert_error(&r, 415, "bad_request");

    let good = [
        "a".to_string(),
        "x".repeat(64),
        "a_b-1".into(),
        "123".into(),
    ];
    for name in &good {
        let r = srv.post("/api/rooms", Some(&at), &json!({"name": name}));
        assert_status(&r, 201);
        assert_eq!(r.json()["room"]["name"], name.as_str());
    }
    let list = rooms(&srv, &at);
    for name in &good {
        assert!(room(&list, name).is_some(), "{name} listed");
    }
    for name in &bad {
        assert!(room(&list, name).is_none(), "{name:?} must not exist");
    }

    let r = srv.post("/api/rooms", None, &json!({"name": "anon"}));
    assert_error(&r, 401, "unauthorized");
    let r = srv.post("/api/rooms", Some("garbage"), &json!({"name": "anon"}));
    assert_error(&r, 401, "unauthorized");
    assert!(room(&rooms(&srv, &at), "anon").is_none());
}

#[test]
fn online_counts_distinct_users() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a1 = Ws::connect(&srv, &alice);
    let mut a2 = Ws::connect(&srv, &alice);
    assert_eq!(
        online(&srv, &alice, "general"),
        0,
        "connecting is not joining"
    );
    a1.join("general");
    assert_eq!(online(&srv, &alice, "general"), 1);
    a2.join("general");
    assert_eq!(
        online(&srv, &alice, "general"),
        1,
        "same user twice counts once"
    );
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    assert_eq!(online(&srv, &alice, "general"), 2);
    b.send(&json!({"type": "leave", "room": "general"}));
    let v = b.recv_skipping(&["presence"]);
    assert_eq!(v["type"], "left", "{v}");
    assert_eq!(online(&srv, &alice, "general"), 1);
    a1.close();
    // alice still has a2 in the room; it saw bob come and go.
    for status in ["online", "offline"] {
        let v = a2.recv();
        assert_eq!(v["type"], "presence", "{v}");
        assert_eq!(v["user"], "bob", "{v}");
        assert_eq!(v["room"], "general", "{v}");
        assert_eq!(v["status"], status, "{v}");
    }
    a2.ping();
    assert_eq!(online(&srv, &alice, "general"), 1);
    drop(a2);
    wait_online(&srv, &alice, "general", 0);
}

fn history(srv: &Server, token: &str, room: &str, query: &str) -> Vec<i64> {
    let r = srv.get(&format!("/api/rooms/{room}/messages{query}"), Some(token));
    assert_status(&r, 200);
    assert!(r.is_json());
    ids_of(&r.json()["messages"])
}

#[test]
fn history_paging() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let r = srv.post("/api/rooms", Some(&at), &json!({"name": "other"}));
    assert_status(&r, 201);
    let ids = post_messages(&srv, &at, "general", 12, "g");
    let other = post_messages(&srv, &at, "other", 3, "o");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");

    // Full shape of a message.
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    assert_status(&r, 200);
    let msgs = r.json()["messages"].clone();
    let arr = msgs.as_array().unwrap();
    assert_eq!(arr.len(), 12);
    for (i, m) in arr.iter().enumerate() {
        assert_eq!(m["id"], ids[i], "{m}");
        assert_eq!(m["room"], "general", "{m}");
        assert_eq!(m["from"], "alice", "{m}");
        assert_eq!(m["body"], format!("g{i}"), "{m}");
        assert!(is_rfc3339(m["ts"].as_str().expect("ts")), "{m}");
    }

    let h = |q: &str| history(&srv, &at, "general", q);
    assert_eq!(
        h(""),
        ids,
        "no cursor: all (under the default limit), oldest first"
    );
    assert_eq!(h("?limit=3"), ids[9..12], "newest 3, oldest first");
    assert_eq!(h(&format!("?before={}&limit=2", ids[5])), ids[3..5]);
    assert_eq!(h(&format!("?before={}", ids[5])), ids[0..5]);
    assert_eq!(h(&format!("?after={}&limit=2", ids[5])), ids[6..8]);
    assert_eq!(h(&format!("?after={}", ids[5])), ids[6..12]);
    assert_eq!(
        h(&format!("?after={}&before={}&limit=3", ids[2], ids[9])),
        ids[3..6],
        "both cursors: the oldest `limit` in between"
    );
    assert_eq!(
        h(&format!("?after={}&before={}", ids[2], ids[9])),
        ids[3..9]
    );
    assert_eq!(h(&format!("?before={}", ids[0])), Vec::<i64>::new());
    assert_eq!(h(&format!("?after={}", ids[11])), Vec::<i64>::new());
    assert_eq!(h("?limit=0"), ids[11..12], "limit clamps up to 1");
    assert_eq!(h("?after=0&limit=1"), ids[0..1]);
    // The other room's messages never leak into general's history.
    assert_eq!(history(&srv, &at, "other", ""), other);
}

#[test]
fn history_limit_defaults_to_50_and_clamps_to_200() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let ids = post_messages(&srv, &at, "general", 205, "m");
    assert_eq!(ids.len(), 205);
    let h = |q: &str| history(&srv, &at, "general", q);
    assert_eq!(h(""), ids[155..205], "default limit 50, newest");
    assert_eq!(h("?limit=1000"), ids[5..205], "limit clamps to 200");
    assert_eq!(h("?limit=200"), ids[5..205]);
    assert_eq!(h("?after=0&limit=500"), ids[0..200], "oldest 200 after 0");
    assert_eq!(h(&format!("?before={}&limit=999", ids[204])), ids[4..204]);
}

#[test]
fn history_errors() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let r = srv.get("/api/rooms/nosuchroom/messages", Some(&at));
    assert_error(&r, 404, "not_found");
    let r = srv.get("/api/rooms/general/messages", None);
    assert_error(&r, 401, "unauthorized");
    let r = srv.get("/api/rooms/general/messages", Some("x.y.z"));
    assert_error(&r, 401, "unauthorized");
    for q in ["?before=abc", "?after=1.5", "?limit=ten"] {
        let r = srv.get(&format!("/api/rooms/general/messages{q}"), Some(&at));
        assert_error(&r, 400, "bad_request");
    }
    let r = srv.request("POST", "/api/rooms/general/messages", Some(&at), None);
    assert_error(&r, 405, "bad_request");
}

/// Sends a DM and waits for the sender's own copy and then the ack; returns the id.
fn send_dm(ws: &mut Ws, to: &str, body: &str) -> i64 {
    let r = format!("d{}", unique());
    ws.send(&json!({"type": "dm", "to": to, "body": body, "ref": r}));
    let v = ws.recv();
    assert_eq!(v["type"], "dm", "sender gets its own dm first: {v}");
    assert_eq!(v["body"], body);
    let a = ws.recv();
    assert_eq!(a["type"], "ack", "{a}");
    assert_eq!(a["ref"], r.as_str());
    assert_eq!(a["id"], v["id"]);
    v["id"].as_i64().unwrap()
}

fn dms(srv: &Server, token: &str, other: &str, query: &str) -> Value {
    let r = srv.get(&format!("/api/dms/{other}{query}"), Some(token));
    assert_status(&r, 200);
    assert!(r.is_json());
    r.json()["messages"].clone()
}

#[test]
fn dm_history() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let carol = new_user(&srv, "carol");
    let mut wa = Ws::connect(&srv, &alice);
    let mut wb = Ws::connect(&srv, &bob);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(send_dm(&mut wa, "bob", &format!("a2b {i}")));
        // bob receives it (and so we keep his socket drained).
        let v = wb.recv();
        assert_eq!(v["type"], "dm");
    }
    for i in 0..2 {
        ids.push(send_dm(&mut wb, "alice", &format!("b2a {i}")));
        let v = wa.recv();
        assert_eq!(v["type"], "dm");
    }
    let ac = send_dm(&mut wa, "carol", "a2c");

    let as_alice = dms(&srv, &alice, "bob", "");
    assert_eq!(ids_of(&as_alice), ids, "oldest first");
    let arr = as_alice.as_array().unwrap();
    for (i, m) in arr.iter().enumerate() {
        let (from, to, body) = if i < 3 {
            ("alice", "bob", format!("a2b {i}"))
        } else {
            ("bob", "alice", format!("b2a {}", i - 3))
        };
        assert_eq!(m["from"], from, "{m}");
        assert_eq!(m["to"], to, "{m}");
        assert_eq!(m["body"], body, "{m}");
        assert!(is_rfc3339(m["ts"].as_str().expect("ts")), "{m}");
    }
    // bob sees the same conversation.
    assert_eq!(dms(&srv, &bob, "alice", ""), as_alice);
    // carol sees only her own.
    assert_eq!(ids_of(&dms(&srv, &carol, "alice", "")), vec![ac]);
    assert_eq!(dms(&srv, &carol, "bob", ""), json!([]));
    assert_eq!(ids_of(&dms(&srv, &alice, "carol", "")), vec![ac]);

    // Paging.
    assert_eq!(ids_of(&dms(&srv, &alice, "bob", "?limit=2")), ids[3..5]);
    assert_eq!(
        ids_of(&dms(
            &srv,
            &alice,
            "bob",
            &format!("?before={}&limit=2", ids[3])
        )),
        ids[1..3]
    );
    assert_eq!(
        ids_of(&dms(&srv, &alice, "bob", &format!("?after={}", ids[1]))),
        ids[2..5]
    );
    assert_eq!(
        ids_of(&dms(
            &srv,
            &alice,
            "bob",
            &format!("?after={}&before={}&limit=1", ids[0], ids[4])
        )),
        ids[1..2]
    );

    // Unknown user, no auth.
    let r = srv.get("/api/dms/nosuchuser", Some(&alice));
    assert_error(&r, 404, "not_found");
    let r = srv.get("/api/dms/bob", None);
    assert_error(&r, 401, "unauthorized");
}

/// `GET /api/rooms` pages by name: `limit` (default 200, clamped to 1–1000) and `after`.
#[test]
fn room_list_pages_by_name() {
    let srv = start_unlimited(&["--room-rate", "0"]);
    let alice = new_user(&srv, "alice");
    for i in 0..12 {
        let r = srv.post(
            "/api/rooms",
            Some(&alice),
            &json!({"name": format!("r{i:02}")}),
        );
        assert_status(&r, 201);
    }
    let names = |q: &str| -> Vec<String> {
        let r = srv.get(&format!("/api/rooms{q}"), Some(&alice));
        assert_status(&r, 200);
        r.json()["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = names("");
    assert_eq!(all.len(), 13, "general and twelve more: {all:?}");
    let first = names("?limit=5");
    assert_eq!(first, all[..5]);
    let next = names(&format!("?limit=5&after={}", first[4]));
    assert_eq!(next, all[5..10]);
    assert_eq!(names("?after=r11"), Vec::<String>::new());
    assert_eq!(names("?limit=0").len(), 1, "limit is clamped to at least 1");
    assert_error(
        &srv.get("/api/rooms?limit=x", Some(&alice)),
        400,
        "bad_request",
    );
}
