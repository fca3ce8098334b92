//! Roles and permissions: member vs moderator vs admin on every privileged action, over
//! REST and over the socket — delete, kick, ban / unban, role assignment (and the last
//! admin), announce (with the `roles` filter), audit read, room creation — and
//! permissions read from the database's `role_permissions` table.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

fn delete_msg(srv: &Server, token: &str, id: i64) -> Resp {
    srv.request("DELETE", &format!("/api/messages/{id}"), Some(token), None)
}

/// The cast of most tests: `alice` (admin, first user), `molly` (moderator), `bob`
/// (member). Tokens are from logins made after the roles were set.
struct Cast {
    admin: String,
    moder: String,
    member: String,
}

fn cast(srv: &Server) -> Cast {
    let admin = new_user(srv, "alice");
    register(srv, "molly");
    let r = put_roles(srv, &admin, "molly", &["moderator"]);
    assert_status(&r, 200);
    let moder = access(&login(srv, "molly"));
    let member = new_user(srv, "bob");
    Cast {
        admin,
        moder,
        member,
    }
}

/// Roles of the holder of `token`, from `GET /api/me`, sorted.
fn my_roles(srv: &Server, token: &str) -> Vec<String> {
    let r = srv.get("/api/me", Some(token));
    assert_status(&r, 200);
    roles_of(&r.json()["user"])
}

fn roles_of(user: &Value) -> Vec<String> {
    let mut v: Vec<String> = user["roles"]
        .as_array()
        .unwrap_or_else(|| panic!("roles in {user}"))
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Next frame other than presence and messages must be `deleted` for `id` by `by` in `room`.
#[track_caller]
fn expect_deleted(ws: &mut Ws, id: i64, room: &str, by: &str) {
    let v = ws.recv_skipping(&["presence", "message"]);
    assert_eq!(v["type"], "deleted", "expected deleted {id}, got {v}");
    assert_eq!(v["id"], id, "{v}");
    assert_eq!(v["room"], room, "{v}");
    assert_eq!(v["by"], by, "{v}");
}

#[track_caller]
fn expect_announcement(ws: &mut Ws, from: &str, body: &str) {
    let v = ws.recv();
    assert_eq!(v["type"], "announcement", "expected announcement, got {v}");
    assert_eq!(v["from"], from, "{v}");
    assert_eq!(v["body"], body, "{v}");
    let ts = v["ts"].as_str().unwrap_or_else(|| panic!("ts in {v}"));
    assert!(is_rfc3339(ts), "ts {ts:?} is not RFC 3339");
}

/// Polls `/metrics` until `parley_open_sockets` is `n`.
#[track_caller]
fn wait_open_sockets(srv: &Server, n: usize) {
    let want = format!("parley_open_sockets {n}\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = srv.get("/metrics", None).text();
        if text.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "parley_open_sockets never reached {n}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn history_ids(srv: &Server, token: &str, room: &str) -> Vec<i64> {
    let r = srv.get(
        &format!("/api/rooms/{room}/messages?limit=200"),
        Some(token),
    );
    assert_status(&r, 200);
    ids_of(&r.json()["messages"])
}

// ---------------------------------------------------------------------------------
// delete
// ---------------------------------------------------------------------------------

#[test]
fn delete_over_rest_needs_message_delete() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let mut poster = Ws::connect(&srv, &c.admin);
    poster.join("general");
    let (_, m1) = poster.send_msg("general", "first");
    let (_, m2) = poster.send_msg("general", "second");
    let (_, m3) = poster.send_msg("general", "third");
    let mut watcher = Ws::connect(&srv, &c.member);
    watcher.join("general");

    // member: 403, nothing deleted, nothing broadcast.
    let r = delete_msg(&srv, &c.member, m1);
    assert_error(&r, 403, "forbidden");
    assert_eq!(history_ids(&srv, &c.member, "general"), vec![m1, m2, m3]);

    // moderator: 204 and a `deleted` event to the room.
    let r = delete_msg(&srv, &c.moder, m1);
    assert_status(&r, 204);
    expect_deleted(&mut watcher, m1, "general", "molly");
    expect_deleted(&mut poster, m1, "general", "molly");

    // admin: the same.
    let r = delete_msg(&srv, &c.admin, m2);
    assert_status(&r, 204);
    expect_deleted(&mut watcher, m2, "general", "alice");
    expect_deleted(&mut poster, m2, "general", "alice");

    assert_eq!(history_ids(&srv, &c.member, "general"), vec![m3]);
    // An unknown message is 404 even for a moderator.
    let r = delete_msg(&srv, &c.moder, m3 + 1000);
    assert_error(&r, 404, "not_found");
    // No token at all: 401.
    let r = srv.request("DELETE", &format!("/api/messages/{m3}"), None, None);
    assert_error(&r, 401, "unauthorized");
    assert_eq!(history_ids(&srv, &c.member, "general"), vec![m3]);
    watcher.ping();
}

#[test]
fn delete_over_the_socket_needs_message_delete() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let mut a = Ws::connect(&srv, &c.admin);
    a.join("general");
    let mut m = Ws::connect(&srv, &c.moder);
    m.join("general");
    let mut b = Ws::connect(&srv, &c.member);
    b.join("general");
    let (_, m1) = b.send_msg("general", "one");
    let (_, m2) = b.send_msg("general", "two");
    let (_, m3) = b.send_msg("general", "three");

    // member, even deleting their own message: forbidden, the socket stays.
    b.send(&json!({"type": "delete", "id": m1, "ref": "d1"}));
    expect_ws_error(&mut b, "forbidden", "d1", &["presence"]);
    b.ping();

    // moderator: every socket in the room gets `deleted`.
    m.send(&json!({"type": "delete", "id": m1, "ref": "d2"}));
    for ws in [&mut a, &mut m, &mut b] {
        expect_deleted(ws, m1, "general", "molly");
    }
    // admin.
    a.send(&json!({"type": "delete", "id": m2, "ref": "d3"}));
    for ws in [&mut a, &mut m, &mut b] {
        expect_deleted(ws, m2, "general", "alice");
    }
    // unknown id: not_found.
    m.send(&json!({"type": "delete", "id": m3 + 1000, "ref": "d4"}));
    expect_ws_error(&mut m, "not_found", "d4", &["presence"]);
    assert_eq!(history_ids(&srv, &c.member, "general"), vec![m3]);
    for ws in [&mut a, &mut m, &mut b] {
        ws.ping();
    }
}

// ---------------------------------------------------------------------------------
// kick
// ---------------------------------------------------------------------------------

#[test]
fn kick_over_rest_needs_user_kick() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let mut molly = Ws::connect(&srv, &c.moder);
    let mut b1 = Ws::connect(&srv, &c.member);
    let mut b2 = Ws::connect(&srv, &c.member);
    // (A pong proves each socket is fully set up: see
    // a_kick_right_after_the_upgrade_still_closes_the_socket for the race.)
    b1.ping();
    b2.ping();

    // member cannot kick.
    let r = srv.post_empty("/api/admin/users/molly/kick", Some(&c.member));
    assert_error(&r, 403, "forbidden");
    molly.ping();

    // moderator kicks bob: both of his sockets close with 4003.
    let r = srv.post_empty("/api/admin/users/bob/kick", Some(&c.moder));
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 2, "{}", r.text());
    assert_eq!(b1.expect_close(), Some(4003));
    assert_eq!(b2.expect_close(), Some(4003));
    molly.ping();

    // A kick is not a ban: bob may come back with the same token.
    let mut b3 = Ws::connect(&srv, &c.member);
    b3.ping();
    let r = srv.post_empty("/api/admin/users/bob/kick", Some(&c.admin));
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 1, "{}", r.text());
    assert_eq!(b3.expect_close(), Some(4003));

    // Nobody connected (once the kicked socket is gone, leaving molly's): 0 sockets.
    // Unknown user: 404.
    drop(b3);
    wait_open_sockets(&srv, 1);
    let r = srv.post_empty("/api/admin/users/bob/kick", Some(&c.moder));
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 0, "{}", r.text());
    let r = srv.post_empty("/api/admin/users/nobody/kick", Some(&c.moder));
    assert_error(&r, 404, "not_found");
    let r = srv.post_empty("/api/admin/users/bob/kick", None);
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn kick_over_the_socket_needs_user_kick() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let mut a = Ws::connect(&srv, &c.admin);
    let mut m = Ws::connect(&srv, &c.moder);
    let mut b = Ws::connect(&srv, &c.member);

    // member tries to kick the moderator.
    b.send(&json!({"type": "kick", "user": "molly", "ref": "k1"}));
    expect_ws_error(&mut b, "forbidden", "k1", &["presence"]);
    m.ping();
    b.ping();

    // moderator kicks bob.
    m.send(&json!({"type": "kick", "user": "bob", "ref": "k2"}));
    assert_eq!(b.expect_close(), Some(4003));
    m.ping();

    // bob comes back; the admin kicks him.
    let mut b = Ws::connect(&srv, &c.member);
    b.ping();
    a.send(&json!({"type": "kick", "user": "bob", "ref": "k3"}));
    assert_eq!(b.expect_close(), Some(4003));
    a.ping();

    a.send(&json!({"type": "kick", "user": "nobody", "ref": "k4"}));
    expect_ws_error(&mut a, "not_found", "k4", &["presence"]);
    a.ping();
}

// ---------------------------------------------------------------------------------
// ban / unban
// ---------------------------------------------------------------------------------

#[test]
fn ban_and_unban_need_user_ban() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let carol = new_user(&srv, "carol");

    for (who, tok) in [("member", &c.member), ("moderator", &c.moder)] {
        let r = srv.post_empty("/api/admin/users/carol/ban", Some(tok));
        assert_eq!(r.status, 403, "{who} ban: {}", r.text());
        assert_error(&r, 403, "forbidden");
    }
    assert_status(&srv.get("/api/me", Some(&carol)), 200);

    let r = srv.post_empty("/api/admin/users/carol/ban", Some(&c.admin));
    assert_status(&r, 204);
    assert_error(&srv.get("/api/me", Some(&carol)), 403, "forbidden");

    for (who, tok) in [("member", &c.member), ("moderator", &c.moder)] {
        let r = srv.post_empty("/api/admin/users/carol/unban", Some(tok));
        assert_eq!(r.status, 403, "{who} unban: {}", r.text());
        assert_error(&r, 403, "forbidden");
    }
    let r = login_resp(&srv, "carol", PW);
    assert_error(&r, 403, "forbidden");

    let r = srv.post_empty("/api/admin/users/carol/unban", Some(&c.admin));
    assert_status(&r, 204);
    login(&srv, "carol");

    let r = srv.post_empty("/api/admin/users/nobody/ban", Some(&c.admin));
    assert_error(&r, 404, "not_found");
    let r = srv.post_empty("/api/admin/users/nobody/unban", Some(&c.admin));
    assert_error(&r, 404, "not_found");
    let r = srv.post_empty("/api/admin/users/carol/ban", None);
    assert_error(&r, 401, "unauthorized");
}

// ---------------------------------------------------------------------------------
// role assignment
// ---------------------------------------------------------------------------------

#[test]
fn role_assignment_needs_role_assign() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let carol = new_user(&srv, "carol");

    for (who, tok) in [("member", &c.member), ("moderator", &c.moder)] {
        let r = put_roles(&srv, tok, "carol", &["moderator"]);
        assert_eq!(r.status, 403, "{who}: {}", r.text());
        assert_error(&r, 403, "forbidden");
        // Nor may they promote themselves.
        let me = if who == "member" { "bob" } else { "molly" };
        let r = put_roles(&srv, tok, me, &["admin"]);
        assert_error(&r, 403, "forbidden");
    }
    assert_eq!(my_roles(&srv, &carol), vec!["member"]);
    assert_eq!(my_roles(&srv, &c.member), vec!["member"]);
    assert_eq!(my_roles(&srv, &c.moder), vec!["moderator"]);

    let r = put_roles(&srv, &c.admin, "carol", &["moderator"]);
    assert_status(&r, 200);
    assert_user_shape(&r.json()["user"], "carol", &["moderator"]);
    assert_eq!(my_roles(&srv, &carol), vec!["moderator"]);

    // A user may hold several roles; the list replaces the old one.
    let r = put_roles(&srv, &c.admin, "carol", &["member", "moderator"]);
    assert_status(&r, 200);
    assert_user_shape(&r.json()["user"], "carol", &["member", "moderator"]);
    assert_eq!(my_roles(&srv, &carol), vec!["member", "moderator"]);
    let r = put_roles(&srv, &c.admin, "carol", &["member"]);
    assert_status(&r, 200);
    assert_eq!(my_roles(&srv, &carol), vec!["member"]);

    let r = put_roles(&srv, &c.admin, "nobody", &["member"]);
    assert_error(&r, 404, "not_found");
    let b = serde_json::to_vec(&json!({"roles": ["member"]})).unwrap();
    let r = srv.request(
        "PUT",
        "/api/admin/users/carol/roles",
        None,
        Some(("application/json", &b)),
    );
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn the_last_admin_cannot_be_removed() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);

    // alice is the only admin.
    let r = put_roles(&srv, &c.admin, "alice", &["member"]);
    assert_error(&r, 409, "conflict");
    let r = put_roles(&srv, &c.admin, "alice", &[]);
    assert_error(&r, 409, "conflict");
    assert_eq!(my_roles(&srv, &c.admin), vec!["admin"]);
    // Keeping admin among other roles is fine.
    let r = put_roles(&srv, &c.admin, "alice", &["admin", "member"]);
    assert_status(&r, 200);
    assert_eq!(my_roles(&srv, &c.admin), vec!["admin", "member"]);

    // With a second admin, alice may step down...
    let r = put_roles(&srv, &c.admin, "bob", &["admin"]);
    assert_status(&r, 200);
    let r = put_roles(&srv, &c.admin, "alice", &["member"]);
    assert_status(&r, 200);
    assert_eq!(my_roles(&srv, &c.admin), vec!["member"]);
    // ...but now bob is the last one.
    let r = put_roles(&srv, &c.member, "bob", &["moderator"]);
    assert_error(&r, 409, "conflict");
    assert_eq!(my_roles(&srv, &c.member), vec!["admin"]);
    // alice, a member now, may not assign roles at all.
    let r = put_roles(&srv, &c.admin, "alice", &["admin"]);
    assert_error(&r, 403, "forbidden");
    assert_eq!(my_roles(&srv, &c.admin), vec!["member"]);
}

// ---------------------------------------------------------------------------------
// announce
// ---------------------------------------------------------------------------------

#[test]
fn announce_needs_announce_and_reaches_every_socket() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    let mut a = Ws::connect(&srv, &c.admin);
    let mut m = Ws::connect(&srv, &c.moder);
    let mut b1 = Ws::connect(&srv, &c.member);
    let mut b2 = Ws::connect(&srv, &c.member);

    for (who, tok) in [("member", &c.member), ("moderator", &c.moder)] {
        let r = srv.post("/api/admin/announce", Some(tok), &json!({"body": "nope"}));
        assert_eq!(r.status, 403, "{who}: {}", r.text());
        assert_error(&r, 403, "forbidden");
    }
    b1.send(&json!({"type": "announce", "body": "nope", "ref": "n1"}));
    expect_ws_error(&mut b1, "forbidden", "n1", &["presence"]);
    m.send(&json!({"type": "announce", "body": "nope", "ref": "n2"}));
    expect_ws_error(&mut m, "forbidden", "n2", &["presence"]);
    // Nothing was announced: each socket's next frame is its pong.
    for ws in [&mut a, &mut m, &mut b1, &mut b2] {
        ws.ping();
    }

    let r = srv.post(
        "/api/admin/announce",
        Some(&c.admin),
        &json!({"body": "maintenance at noon"}),
    );
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 4, "{}", r.text());
    for ws in [&mut a, &mut m, &mut b1, &mut b2] {
        expect_announcement(ws, "alice", "maintenance at noon");
    }

    // Over the socket, the sender's own socket included.
    a.send(&json!({"type": "announce", "body": "back soon", "ref": "n3"}));
    for ws in [&mut a, &mut m, &mut b1, &mut b2] {
        expect_announcement(ws, "alice", "back soon");
    }
    for ws in [&mut a, &mut m, &mut b1, &mut b2] {
        ws.ping();
    }
    let r = srv.post("/api/admin/announce", None, &json!({"body": "x"}));
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn announce_to_roles_reaches_only_their_holders() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    register(&srv, "carol");
    assert_status(
        &put_roles(&srv, &c.admin, "carol", &["member", "moderator"]),
        200,
    );
    let carol = access(&login(&srv, "carol"));
    let mut a = Ws::connect(&srv, &c.admin);
    let mut m = Ws::connect(&srv, &c.moder);
    let mut b1 = Ws::connect(&srv, &c.member);
    let mut b2 = Ws::connect(&srv, &c.member);
    let mut k = Ws::connect(&srv, &carol);
    for ws in [&mut a, &mut m, &mut b1, &mut b2, &mut k] {
        ws.ping();
    }

    // To moderators: molly and carol.
    let r = srv.post(
        "/api/admin/announce",
        Some(&c.admin),
        &json!({"body": "mods only", "roles": ["moderator"]}),
    );
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 2, "{}", r.text());
    expect_announcement(&mut m, "alice", "mods only");
    expect_announcement(&mut k, "alice", "mods only");
    for ws in [&mut a, &mut b1, &mut b2, &mut m, &mut k] {
        ws.ping();
    }

    // To members: both of bob's sockets and carol.
    let r = srv.post(
        "/api/admin/announce",
        Some(&c.admin),
        &json!({"body": "members", "roles": ["member"]}),
    );
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 3, "{}", r.text());
    for ws in [&mut b1, &mut b2, &mut k] {
        expect_announcement(ws, "alice", "members");
    }
    for ws in [&mut a, &mut m, &mut b1, &mut b2, &mut k] {
        ws.ping();
    }

    // Over the socket, to admins only: alice herself.
    a.send(&json!({"type": "announce", "body": "admins", "roles": ["admin"], "ref": "x"}));
    expect_announcement(&mut a, "alice", "admins");
    for ws in [&mut a, &mut m, &mut b1, &mut b2, &mut k] {
        ws.ping();
    }

    // The filter uses current roles: promote bob, and he is a moderator at once.
    assert_status(&put_roles(&srv, &c.admin, "bob", &["moderator"]), 200);
    let r = srv.post(
        "/api/admin/announce",
        Some(&c.admin),
        &json!({"body": "mods again", "roles": ["moderator"]}),
    );
    assert_status(&r, 200);
    assert_eq!(r.json()["sockets"], 4, "{}", r.text());
    for ws in [&mut m, &mut b1, &mut b2, &mut k] {
        expect_announcement(ws, "alice", "mods again");
    }
    for ws in [&mut a, &mut m, &mut b1, &mut b2, &mut k] {
        ws.ping();
    }
}

// ---------------------------------------------------------------------------------
// audit read, room creation
// ---------------------------------------------------------------------------------

#[test]
fn audit_read_needs_audit_read() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    for (who, tok) in [("member", &c.member), ("moderator", &c.moder)] {
        let r = srv.get("/api/admin/audit", Some(tok));
        assert_eq!(r.status, 403, "{who}: {}", r.text());
        assert_error(&r, 403, "forbidden");
    }
    assert_error(&srv.get("/api/admin/audit", None), 401, "unauthorized");
    let r = srv.get("/api/admin/audit", Some(&c.admin));
    assert_status(&r, 200);
    assert!(r.is_json());
    assert!(r.json()["events"].is_array(), "{}", r.text());

    // A member promoted to admin reads it with the token they already hold.
    assert_status(&put_roles(&srv, &c.admin, "bob", &["admin"]), 200);
    assert_status(&srv.get("/api/admin/audit", Some(&c.member)), 200);
}

#[test]
fn every_role_may_create_rooms() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    for (room, tok) in [
        ("by-admin", &c.admin),
        ("by-mod", &c.moder),
        ("by-member", &c.member),
    ] {
        let r = srv.post("/api/rooms", Some(tok), &json!({ "name": room }));
        assert_status(&r, 201);
        assert_eq!(r.json()["room"]["name"], room, "{}", r.text());
    }
}

// ---------------------------------------------------------------------------------
// permissions are data
// ---------------------------------------------------------------------------------

#[test]
fn permissions_come_from_the_role_permissions_table() {
    let dir = TempDir::new();
    let flags = ["--login-rate", "0", "--msg-rate", "0"];
    let mut srv = Server::start_in(dir.path(), &flags);
    let c = cast(&srv);
    let mut poster = Ws::connect(&srv, &c.admin);
    poster.join("general");
    let (_, m1) = poster.send_msg("general", "keep me");
    poster.close();
    // Before: member may not announce; moderator may delete (checked on a message
    // that is then left alone: an unknown id says 404, not 403).
    let r = srv.post(
        "/api/admin/announce",
        Some(&c.member),
        &json!({"body": "x"}),
    );
    assert_error(&r, 403, "forbidden");
    assert_error(&delete_msg(&srv, &c.moder, m1 + 1000), 404, "not_found");
    srv.sigterm();
    assert!(
        srv.wait_exit(Duration::from_secs(30)).is_some(),
        "server did not stop on SIGTERM"
    );
    drop(srv);

    {
        let db = rusqlite::Connection::open(dir.path().join("chat.db")).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.execute(
            "INSERT INTO role_permissions(role, permission) VALUES ('member', 'announce')",
            [],
        )
        .unwrap();
        let n = db
            .execute(
                "DELETE FROM role_permissions WHERE role = 'moderator' AND permission = 'message.delete'",
                [],
            )
            .unwrap();
        assert_eq!(n, 1, "the seed should grant moderators message.delete");
    }

    let srv = Server::start_in(dir.path(), &flags);
    // The tokens issued before the restart still work.
    let r = srv.post(
        "/api/admin/announce",
        Some(&c.member),
        &json!({"body": "members may announce now"}),
    );
    assert_status(&r, 200);
    let r = delete_msg(&srv, &c.moder, m1);
    assert_error(&r, 403, "forbidden");
    assert_eq!(history_ids(&srv, &c.member, "general"), vec![m1]);
    // The moderator's socket is refused too.
    let mut m = Ws::connect(&srv, &c.moder);
    m.send(&json!({"type": "delete", "id": m1, "ref": "d"}));
    expect_ws_error(&mut m, "forbidden", "d", &["presence"]);
    // The admin still may.
    assert_status(&delete_msg(&srv, &c.admin, m1), 204);
    // And kicking (untouched) still works for the moderator.
    let mut b = Ws::connect(&srv, &c.member);
    b.ping();
    let r = srv.post_empty("/api/admin/users/bob/kick", Some(&c.moder));
    assert_status(&r, 200);
    assert_eq!(wait_close(&mut b, Duration::from_secs(10)), Some(4003));
}

#[test]
fn a_kick_right_after_the_upgrade_still_closes_the_socket() {
    // Once the client holds an upgraded socket, that socket is subject to kick: the
    // server must not answer 101 before the socket can be found.
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    for i in 0..100 {
        let mut b = Ws::connect(&srv, &c.member);
        let r = srv.post_empty("/api/admin/users/bob/kick", Some(&c.moder));
        assert_status(&r, 200);
        assert_eq!(
            r.json()["sockets"],
            1,
            "round {i}: the kick did not see bob's just-upgraded socket"
        );
        assert_eq!(
            wait_close(&mut b, Duration::from_secs(5)),
            Some(4003),
            "round {i}"
        );
        // Wait until the kicked socket is gone, so the next round counts one.
        drop(b);
        wait_open_sockets(&srv, 0);
    }
}

#[test]
fn an_announcement_right_after_the_upgrade_reaches_the_socket() {
    let srv = start_unlimited(&[]);
    let c = cast(&srv);
    for i in 0..100 {
        let mut b = Ws::connect(&srv, &c.member);
        let body = format!("round {i}");
        let r = srv.post(
            "/api/admin/announce",
            Some(&c.admin),
            &json!({ "body": body }),
        );
        assert_status(&r, 200);
        assert_eq!(r.json()["sockets"], 1, "round {i}: {}", r.text());
        expect_announcement(&mut b, "alice", &body);
        b.close();
        // Wait until the closed socket is gone, so the next round counts one.
        wait_open_sockets(&srv, 0);
    }
}
