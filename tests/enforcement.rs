//! Live enforcement: a role change or a ban acts at once on live sockets and on tokens
//! already issued; the ban flow end to end; access-token expiry closes a socket with
//! 4001 unless it refreshed; `refresh` on a live socket (and its errors); and changes
//! made with the CLI while the server runs (ban, unban, role, passwd) reaching it.

mod common;

use common::*;
use serde_json::{json, Value};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Sleeps until the wall clock is past `t` (unix seconds).
fn sleep_until(t: f64) {
    let d = t - now_f64();
    if d > 0.0 {
        sleep(Duration::from_secs_f64(d));
    }
}

fn exp_of(token: &str) -> i64 {
    let (_, p, _) = jwt_parts(token);
    p["exp"]
        .as_i64()
        .unwrap_or_else(|| panic!("exp claim in {p}"))
}

/// Unix seconds of an RFC 3339 timestamp (fraction dropped).
fn rfc3339_unix(s: &str) -> i64 {
    assert!(is_rfc3339(s), "{s:?} is not RFC 3339");
    let n = |a: usize, b: usize| -> i64 { s[a..b].parse().unwrap() };
    let (y, mo, d, h, mi, se) = (n(0, 4), n(5, 7), n(8, 10), n(11, 13), n(14, 16), n(17, 19));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let mut t = days * 86400 + h * 3600 + mi * 60 + se;
    let tz = s[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(sign) = tz.chars().next().filter(|c| *c == '+' || *c == '-') {
        let off = tz[1..3].parse::<i64>().unwrap() * 3600 + tz[4..6].parse::<i64>().unwrap() * 60;
        t -= if sign == '+' { off } else { -off };
    }
    t
}

/// What a live socket may send before the reply to a request: it is passed over.
const CHATTER: &[&str] = &["presence", "message"];

/// Proves the socket is open: a ping with a fresh ref is answered (presence and
/// message frames before it are skipped).
#[track_caller]
fn alive(ws: &mut Ws) {
    ws.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let r = format!("alive{}", unique());
    ws.send(&json!({"type": "ping", "ref": r}));
    loop {
        let v = ws.recv();
        match v["type"].as_str() {
            Some("pong") if v["ref"] == r.as_str() => return,
            Some("presence") | Some("message") | Some("deleted") => continue,
            _ => panic!("expected pong {r}, got {v}"),
        }
    }
}

/// The upgrade, by hand, with `token` in the Authorization header.
fn upgrade_header(srv: &Server, token: &str) -> Resp {
    let v = format!("Bearer {token}");
    ws_handshake_raw(srv, "/ws", &[("Authorization", &v)])
}

fn upgrade_query(srv: &Server, token: &str) -> Resp {
    ws_handshake_raw(srv, &format!("/ws?access_token={token}"), &[])
}

fn upgrade_subprotocol(srv: &Server, token: &str) -> Resp {
    let v = format!("parley.v1, bearer.{token}");
    ws_handshake_raw(srv, "/ws", &[("Sec-WebSocket-Protocol", &v)])
}

/// Polls the audit trail (as admin) until an event matches; returns it.
#[track_caller]
fn wait_audit(srv: &Server, admin: &str, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = srv.get("/api/admin/audit?limit=1000", Some(admin));
        assert_status(&r, 200);
        let v = r.json();
        if let Some(e) = v["events"].as_array().unwrap().iter().find(|e| pred(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no audit event for {what} within 10 s; events: {v}"
        );
        sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------
// role changes and the roles claim
// ---------------------------------------------------------------------------------

#[test]
fn a_role_change_takes_effect_at_once_on_a_live_socket() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let (_, m1) = a.send_msg("general", "one");
    let (_, m2) = a.send_msg("general", "two");
    let (_, m3) = a.send_msg("general", "three");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");

    b.send(&json!({"type": "delete", "id": m1, "ref": "before"}));
    expect_ws_error(&mut b, "forbidden", "before", CHATTER);

    // Promote bob; his socket (and his token, whose roles claim still says member)
    // may delete on the very next action.
    let r = put_roles(&srv, &alice, "bob", &["moderator"]);
    assert_status(&r, 200);
    b.send(&json!({"type": "delete", "id": m1, "ref": "after"}));
    let v = b.recv_skipping(&["presence", "message"]);
    assert_eq!(v["type"], "deleted", "promoted bob's delete: {v}");
    assert_eq!(v["id"], m1);
    assert_eq!(v["by"], "bob");
    let (_, p, _) = jwt_parts(&bob);
    assert!(
        !p["roles"].to_string().contains("moderator"),
        "test premise: bob's token predates the promotion ({p})"
    );
    let r = srv.request("DELETE", &format!("/api/messages/{m2}"), Some(&bob), None);
    assert_status(&r, 204);
    let v = b.recv_skipping(&["presence", "message"]);
    assert_eq!(v["type"], "deleted", "{v}");
    assert_eq!(v["id"], m2);

    // Demote him again: the next action is refused.
    let r = put_roles(&srv, &alice, "bob", &["member"]);
    assert_status(&r, 200);
    b.send(&json!({"type": "delete", "id": m3, "ref": "demoted"}));
    expect_ws_error(&mut b, "forbidden", "demoted", CHATTER);
    b.send(&json!({"type": "kick", "user": "alice", "ref": "kick"}));
    expect_ws_error(&mut b, "forbidden", "kick", CHATTER);
    let r = srv.request("DELETE", &format!("/api/messages/{m3}"), Some(&bob), None);
    assert_error(&r, 403, "forbidden");
    alive(&mut a);
    alive(&mut b);
}

#[test]
fn the_roles_claim_in_a_token_is_not_trusted() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let (_, p, _) = jwt_parts(&alice);
    assert!(
        p["roles"].to_string().contains("admin"),
        "test premise: alice's token says admin ({p})"
    );
    let mut a = Ws::connect(&srv, &alice);

    // bob becomes admin, and demotes alice.
    assert_status(&put_roles(&srv, &alice, "bob", &["admin"]), 200);
    assert_status(&put_roles(&srv, &bob, "alice", &["member"]), 200);

    // alice's token still claims admin; none of it works any more.
    assert_error(&srv.get("/api/admin/audit", Some(&alice)), 403, "forbidden");
    assert_error(
        &put_roles(&srv, &alice, "alice", &["admin"]),
        403,
        "forbidden",
    );
    assert_error(
        &srv.post("/api/admin/announce", Some(&alice), &json!({"body": "x"})),
        403,
        "forbidden",
    );
    assert_error(
        &srv.post_empty("/api/admin/users/bob/ban", Some(&alice)),
        403,
        "forbidden",
    );
    a.send(&json!({"type": "announce", "body": "x", "ref": "an"}));
    expect_ws_error(&mut a, "forbidden", "an", CHATTER);
    a.send(&json!({"type": "kick", "user": "bob", "ref": "k"}));
    expect_ws_error(&mut a, "forbidden", "k", CHATTER);
    // bob, whose token claims member, is admin.
    assert_status(&srv.get("/api/admin/audit", Some(&bob)), 200);
    alive(&mut a);
}

// ---------------------------------------------------------------------------------
// ban
// ---------------------------------------------------------------------------------

#[test]
fn the_ban_flow_end_to_end() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    let carol = new_user(&srv, "carol");
    let p1 = login(&srv, "bob");
    let p2 = login(&srv, "bob");
    let (t1, t2) = (access(&p1), access(&p2));
    let mut b1 = Ws::connect(&srv, &t1);
    b1.join("general");
    let mut b2 = Ws::connect(&srv, &t2);
    alive(&mut b2);
    let mut c = Ws::connect(&srv, &carol);
    c.join("general");
    assert_status(&srv.get("/api/me", Some(&t1)), 200);

    // Ban: every live socket of bob closes with 4003.
    let r = srv.post_empty("/api/admin/users/bob/ban", Some(&alice));
    assert_status(&r, 204);
    assert_eq!(wait_close(&mut b1, Duration::from_secs(5)), Some(4003));
    assert_eq!(wait_close(&mut b2, Duration::from_secs(5)), Some(4003));
    alive(&mut c);

    // Every token of bob: 403 on every endpoint and on the upgrade.
    for t in [&t1, &t2] {
        assert_error(&srv.get("/api/me", Some(t)), 403, "forbidden");
        assert_error(&srv.get("/api/rooms", Some(t)), 403, "forbidden");
        assert_error(
            &srv.get("/api/rooms/general/messages", Some(t)),
            403,
            "forbidden",
        );
        assert_error(
            &srv.post("/api/rooms", Some(t), &json!({"name": "bobs"})),
            403,
            "forbidden",
        );
        assert_ws_rejected(&upgrade_header(&srv, t), 403, "forbidden");
        assert_ws_rejected(&upgrade_query(&srv, t), 403, "forbidden");
        assert_ws_rejected(&upgrade_subprotocol(&srv, t), 403, "forbidden");
    }
    // A banned user's refused upgrades are on record as theirs (the token is genuine).
    let rows_by_bob = || -> i64 {
        open_db(&srv.db_path())
            .query_row(
                "SELECT count(*) FROM audit_log WHERE action = 'ws_rejected' AND actor = 'bob'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    wait_until(Duration::from_secs(5), "6 ws_rejected rows by bob", || {
        rows_by_bob() == 6
    });
    // Login and refresh: 403.
    assert_error(&login_resp(&srv, "bob", PW), 403, "forbidden");
    assert_error(&refresh_resp(&srv, &refresh_tok(&p2)), 403, "forbidden");
    // Others are unaffected.
    assert_status(&srv.get("/api/me", Some(&carol)), 200);
    alive(&mut c);

    // Unban: the old tokens stay dead (401), a fresh login works.
    let r = srv.post_empty("/api/admin/users/bob/unban", Some(&alice));
    assert_status(&r, 204);
    for t in [&t1, &t2] {
        assert_error(&srv.get("/api/me", Some(t)), 401, "unauthorized");
        assert_ws_rejected(&upgrade_header(&srv, t), 401, "unauthorized");
    }
    assert_error(&refresh_resp(&srv, &refresh_tok(&p1)), 401, "unauthorized");
    assert_error(&refresh_resp(&srv, &refresh_tok(&p2)), 401, "unauthorized");
    let fresh = access(&login(&srv, "bob"));
    assert_status(&srv.get("/api/me", Some(&fresh)), 200);
    let mut b3 = Ws::connect(&srv, &fresh);
    b3.join("general");
    alive(&mut b3);

    // Both are in the audit trail.
    wait_audit(
        &srv,
        &alice,
        |e| e["action"] == "ban" && e["actor"] == "alice" && e["target"] == "bob",
        "ban",
    );
    wait_audit(
        &srv,
        &alice,
        |e| e["action"] == "unban" && e["actor"] == "alice" && e["target"] == "bob",
        "unban",
    );
}

#[test]
fn a_banned_user_cannot_open_a_socket_even_between_checks() {
    // The ban is checked at the upgrade itself, not only by a later sweep.
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    assert_status(
        &srv.post_empty("/api/admin/users/bob/ban", Some(&alice)),
        204,
    );
    let req = with_header(
        ws_request(&srv, "/ws"),
        "Authorization",
        &format!("Bearer {bob}"),
    );
    match Ws::try_connect(&srv, req) {
        Ok(_) => panic!("a banned user's token was upgraded"),
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        Err(e) => panic!("expected HTTP 403, got {e:?}"),
    }
}

// ---------------------------------------------------------------------------------
// expiry and refresh on a live socket
// ---------------------------------------------------------------------------------

#[test]
fn an_expired_token_closes_its_socket_with_4001() {
    let srv = start_unlimited(&["--access-ttl", "2"]);
    register(&srv, "alice");
    let token = access(&login(&srv, "alice"));
    let exp = exp_of(&token);
    let mut ws = Ws::connect(&srv, &token);
    ws.join("general");
    alive(&mut ws);
    assert_eq!(wait_close(&mut ws, Duration::from_secs(10)), Some(4001));
    assert!(
        now_secs() >= exp,
        "closed for expiry before the token expired (exp {exp}, now {})",
        now_secs()
    );
    // The token cannot open a new socket either.
    assert_ws_rejected(&upgrade_header(&srv, &token), 401, "unauthorized");
}

/// Reads `ws` until its close frame, which must come before the wall clock passes
/// `deadline` (unix seconds); returns the close code.
#[track_caller]
fn close_before(ws: &mut Ws, deadline: f64) -> Option<u16> {
    let left = deadline - now_f64();
    assert!(
        left > 0.0,
        "already past the deadline {deadline} for a close"
    );
    let code = wait_close(ws, Duration::from_secs_f64(left));
    assert!(now_f64() <= deadline + 0.05, "closed after {deadline}");
    code
}

/// Two access tokens of a new user "alice", with their expiries, on a server started
/// with `--access-ttl 4`: the second expires at least two seconds after the first.
fn tokens_two_seconds_apart(srv: &Server) -> ((String, i64), (String, i64)) {
    register(srv, "alice");
    let early = access(&login(srv, "alice"));
    let exp1 = exp_of(&early);
    // Log in again once the clock is two whole seconds past the first token's iat.
    sleep_until((exp1 - 4 + 2) as f64);
    let late = access(&login(srv, "alice"));
    let exp2 = exp_of(&late);
    assert!(
        exp2 >= exp1 + 2,
        "test premise: the tokens expire two seconds apart ({exp1} vs {exp2})"
    );
    ((early, exp1), (late, exp2))
}

#[test]
fn sockets_close_in_the_order_their_tokens_expire() {
    // Claim: the one expiry timer closes each socket at its own token's expiry, the
    // earliest first. Two sockets of one user whose tokens expire two seconds apart:
    // the first closes (4001) within a second of its expiry while the second is still
    // open, and the second closes within a second of its own. (A timer that looked
    // at the latest expiry first would close both at the later one.)
    let srv = start_unlimited(&["--access-ttl", "4"]);
    let ((early, exp1), (late, exp2)) = tokens_two_seconds_apart(&srv);
    let mut a = Ws::connect(&srv, &early);
    let mut b = Ws::connect(&srv, &late);
    alive(&mut a);
    alive(&mut b);
    assert!(
        now_f64() < exp1 as f64,
        "test premise: both sockets opened in time"
    );

    assert_eq!(close_before(&mut a, exp1 as f64 + 1.0), Some(4001));
    assert!(now_secs() >= exp1, "closed before its token expired");
    // At that moment the later socket is open and working.
    alive(&mut b);
    assert_eq!(close_before(&mut b, exp2 as f64 + 1.0), Some(4001));
    assert!(now_secs() >= exp2, "closed before its token expired");
}

#[test]
fn a_socket_that_expires_sooner_than_those_before_it_closes_on_time() {
    // Claim: the timer sleeps until the earliest expiry it knows, and a socket that
    // expires sooner than every socket before it wakes it. The later token's socket
    // opens first, then the earlier one's: the earlier closes within a second of its
    // own expiry, not at the later one's. (A timer woken only when its heap was empty
    // would close it two seconds late.)
    let srv = start_unlimited(&["--access-ttl", "4"]);
    let ((early, exp1), (late, _)) = tokens_two_seconds_apart(&srv);
    let mut b = Ws::connect(&srv, &late);
    alive(&mut b);
    let mut a = Ws::connect(&srv, &early);
    alive(&mut a);
    assert!(
        now_f64() < exp1 as f64,
        "test premise: both sockets opened in time"
    );

    assert_eq!(close_before(&mut a, exp1 as f64 + 1.0), Some(4001));
    alive(&mut b);
}

#[test]
fn refresh_on_a_live_socket_keeps_it_open_until_the_new_expiry() {
    let srv = start_unlimited(&["--access-ttl", "4"]);
    register(&srv, "alice");
    let p1 = login(&srv, "alice");
    let old = access(&p1);
    let old_exp = exp_of(&old);
    let mut ws = Ws::connect(&srv, &old);
    alive(&mut ws);

    sleep(Duration::from_millis(2200));
    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_status(&r, 200);
    let new = access(&r.json());
    let new_exp = exp_of(&new);
    assert!(
        new_exp >= old_exp + 2,
        "test premise: the new token outlives the old ({old_exp} vs {new_exp})"
    );

    ws.send(&json!({"type": "refresh", "access_token": new, "ref": "r1"}));
    let v = reply_to(&mut ws, "r1", CHATTER);
    assert_eq!(v["type"], "refreshed", "{v}");
    let at = v["expires_at"]
        .as_str()
        .unwrap_or_else(|| panic!("expires_at in {v}"));
    assert_eq!(
        rfc3339_unix(at),
        new_exp,
        "expires_at {at} should be the new token's exp"
    );

    // Past the old token's expiry the socket is still open...
    sleep_until(old_exp as f64 + 0.8);
    alive(&mut ws);
    // ...and it closes with 4001 once the new one expires.
    assert_eq!(wait_close(&mut ws, Duration::from_secs(10)), Some(4001));
    assert!(
        now_secs() >= new_exp,
        "closed before the refreshed token expired (exp {new_exp}, now {})",
        now_secs()
    );
}

#[test]
fn refresh_errors_leave_the_socket_as_it_was() {
    let srv = start_unlimited(&[]);
    register(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mine = login(&srv, "alice");
    let mut ws = Ws::connect(&srv, &access(&mine));

    // Another user's valid token: forbidden.
    ws.send(&json!({"type": "refresh", "access_token": bob, "ref": "other"}));
    expect_ws_error(&mut ws, "forbidden", "other", CHATTER);
    // Garbage: unauthorized.
    ws.send(&json!({"type": "refresh", "access_token": "not.a.jwt", "ref": "junk"}));
    expect_ws_error(&mut ws, "unauthorized", "junk", CHATTER);
    // A tampered token of alice: unauthorized.
    let t = access(&login(&srv, "alice"));
    let parts: Vec<&str> = t.split('.').collect();
    let mut payload = jwt_parts(&t).1;
    payload["sub"] = json!("2");
    payload["name"] = json!("bob");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url(&serde_json::to_vec(&payload).unwrap()),
        parts[2]
    );
    ws.send(&json!({"type": "refresh", "access_token": forged, "ref": "tampered"}));
    expect_ws_error(&mut ws, "unauthorized", "tampered", CHATTER);
    // A revoked (logged out) token of alice: unauthorized.
    let gone = login(&srv, "alice");
    assert_status(&srv.post_empty("/api/logout", Some(&access(&gone))), 204);
    ws.send(&json!({"type": "refresh", "access_token": access(&gone), "ref": "revoked"}));
    expect_ws_error(&mut ws, "unauthorized", "revoked", CHATTER);
    // Missing field: bad_request.
    ws.send(&json!({"type": "refresh", "ref": "missing"}));
    expect_ws_error(&mut ws, "bad_request", "missing", CHATTER);

    // The socket is open and still alice's, on her original login.
    alive(&mut ws);
    let j = ws.join("general");
    assert_eq!(j["online"], json!(["alice"]), "{j}");
    assert_status(&srv.post_empty("/api/logout", Some(&access(&mine))), 204);
    assert_eq!(wait_close(&mut ws, Duration::from_secs(5)), Some(4003));
}

#[test]
fn refresh_moves_the_socket_to_the_new_tokens_login() {
    let srv = start_unlimited(&[]);
    register(&srv, "alice");
    let l1 = login(&srv, "alice");
    let l2 = login(&srv, "alice");
    let mut ws = Ws::connect(&srv, &access(&l1));
    ws.send(&json!({"type": "refresh", "access_token": access(&l2), "ref": "r"}));
    let v = reply_to(&mut ws, "r", CHATTER);
    assert_eq!(v["type"], "refreshed", "{v}");
    assert!(v["expires_at"].as_str().is_some_and(is_rfc3339), "{v}");

    // Logging out the first login no longer touches this socket: neither the logout
    // itself nor the revocation sweep that the change sets off. Instead of sleeping
    // "long enough", a canary proves a sweep has run since: another login's socket,
    // revoked by hand in the file (which only the sweep can notice), is closed.
    let l3 = login(&srv, "alice");
    let mut canary = Ws::connect(&srv, &access(&l3));
    alive(&mut canary);
    assert_status(&srv.post_empty("/api/logout", Some(&access(&l1))), 204);
    let sid3 = jwt_parts(&access(&l3)).1["sid"]
        .as_str()
        .expect("sid claim")
        .to_string();
    let n = open_db(&srv.db_path())
        .execute(
            "UPDATE sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), revoked_reason = 'canary' WHERE id = ?1",
            [&sid3],
        )
        .unwrap();
    assert_eq!(n, 1, "the canary's sid {sid3} is a sessions row");
    assert_eq!(wait_close(&mut canary, Duration::from_secs(10)), Some(4003));
    alive(&mut ws);
    // Logging out the second one closes it.
    assert_status(&srv.post_empty("/api/logout", Some(&access(&l2))), 204);
    assert_eq!(wait_close(&mut ws, Duration::from_secs(5)), Some(4003));
}

// ---------------------------------------------------------------------------------
// the CLI reaching a running server
// ---------------------------------------------------------------------------------

#[test]
fn cli_ban_and_unban_reach_a_running_server() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    let p = login(&srv, "bob");
    let bob = access(&p);
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let db = db_arg(&srv.dir);

    let out = run_cli(&["user", "ban", "bob", "--db", &db], "");
    assert_exit(&out, 0, "parley user ban bob");
    // Within 5 s: the live socket is closed, the token refused, login refused.
    assert_eq!(wait_close(&mut b, Duration::from_secs(5)), Some(4003));
    assert_error(&srv.get("/api/me", Some(&bob)), 403, "forbidden");
    assert_ws_rejected(&upgrade_header(&srv, &bob), 403, "forbidden");
    assert_error(&login_resp(&srv, "bob", PW), 403, "forbidden");
    assert_error(&refresh_resp(&srv, &refresh_tok(&p)), 403, "forbidden");
    alive(&mut a);

    let out = run_cli(&["user", "unban", "bob", "--db", &db], "");
    assert_exit(&out, 0, "parley user unban bob");
    let deadline = Instant::now() + Duration::from_secs(5);
    let fresh = loop {
        let r = login_resp(&srv, "bob", PW);
        if r.status == 200 {
            break access(&r.json());
        }
        assert!(
            Instant::now() < deadline,
            "login still refused 5 s after the CLI unban: {} {}",
            r.status,
            r.text()
        );
        sleep(Duration::from_millis(100));
    };
    assert_error(&srv.get("/api/me", Some(&bob)), 401, "unauthorized");
    let mut b = Ws::connect(&srv, &fresh);
    alive(&mut b);

    // The CLI's own audit rows are there (anonymous actor).
    wait_audit(
        &srv,
        &alice,
        |e| e["action"] == "ban" && e["target"] == "bob" && e["actor"].is_null(),
        "CLI ban",
    );
    wait_audit(
        &srv,
        &alice,
        |e| e["action"] == "unban" && e["target"] == "bob" && e["actor"].is_null(),
        "CLI unban",
    );

    let out = run_cli(&["user", "ban", "nobody", "--db", &db], "");
    assert_exit(&out, 1, "parley user ban nobody");
}

#[test]
fn cli_role_changes_reach_a_live_socket() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let (_, m1) = a.send_msg("general", "delete me");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    b.send(&json!({"type": "delete", "id": m1, "ref": "d0"}));
    expect_ws_error(&mut b, "forbidden", "d0", CHATTER);
    let db = db_arg(&srv.dir);

    let out = run_cli(&["user", "role", "bob", "moderator", "--db", &db], "");
    assert_exit(&out, 0, "parley user role bob moderator");
    // Within 5 s the same socket may delete.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    loop {
        let r = format!("d{}", {
            i += 1;
            i
        });
        b.send(&json!({"type": "delete", "id": m1, "ref": r}));
        let v = b.recv_skipping(&["presence", "message"]);
        if v["type"] == "deleted" {
            assert_eq!(v["id"], m1, "{v}");
            assert_eq!(v["by"], "bob", "{v}");
            break;
        }
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "forbidden", "{v}");
        assert!(
            Instant::now() < deadline,
            "bob still may not delete 5 s after `parley user role bob moderator`"
        );
        sleep(Duration::from_millis(200));
    }
    let r = srv.get("/api/me", Some(&bob));
    assert_status(&r, 200);
    assert_user_shape(&r.json()["user"], "bob", &["moderator"]);

    // And back: within 5 s a moderator-only action is refused again. (Kicking an
    // unknown user is not_found when permitted, forbidden when not.)
    let out = run_cli(&["user", "role", "bob", "member", "--db", &db], "");
    assert_exit(&out, 0, "parley user role bob member");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = format!("k{}", unique());
        b.send(&json!({"type": "kick", "user": "nobody", "ref": r}));
        let v = reply_to(&mut b, &r, CHATTER);
        assert_eq!(v["type"], "error", "{v}");
        if v["code"] == "forbidden" {
            break;
        }
        assert_eq!(v["code"], "not_found", "{v}");
        assert!(
            Instant::now() < deadline,
            "bob still a moderator 5 s after `parley user role bob member`"
        );
        sleep(Duration::from_millis(200));
    }

    // Several roles at once.
    let out = run_cli(
        &["user", "role", "bob", "member", "moderator", "--db", &db],
        "",
    );
    assert_exit(&out, 0, "parley user role bob member moderator");
    let r = srv.get("/api/me", Some(&bob));
    assert_user_shape(&r.json()["user"], "bob", &["member", "moderator"]);

    // The CLI refuses to remove the last admin.
    let out = run_cli(&["user", "role", "alice", "member", "--db", &db], "");
    assert_exit(&out, 1, "parley user role alice member (last admin)");
    let r = srv.get("/api/me", Some(&alice));
    assert_user_shape(&r.json()["user"], "alice", &["admin"]);
    assert_status(&srv.get("/api/admin/audit", Some(&alice)), 200);
    alive(&mut a);
}

#[test]
fn cli_passwd_revokes_every_login_and_closes_its_sockets() {
    let srv = start_unlimited(&[]);
    new_user(&srv, "alice");
    register(&srv, "bob");
    let carol = new_user(&srv, "carol");
    let p1 = login(&srv, "bob");
    let p2 = login(&srv, "bob");
    let mut b1 = Ws::connect(&srv, &access(&p1));
    let mut b2 = Ws::connect(&srv, &access(&p2));
    let mut c = Ws::connect(&srv, &carol);
    let db = db_arg(&srv.dir);

    let new_pw = "a brand new secret";
    let out = run_cli(
        // The servers' test cost (a cost-12 hash is slow to check in a debug build).
        &["user", "passwd", "bob", "--db", &db, "--bcrypt-cost", "4"],
        &format!("{new_pw}\n"),
    );
    assert_exit(&out, 0, "parley user passwd bob");
    assert_eq!(wait_close(&mut b1, Duration::from_secs(5)), Some(4003));
    assert_eq!(wait_close(&mut b2, Duration::from_secs(5)), Some(4003));
    alive(&mut c);

    for p in [&p1, &p2] {
        assert_error(&srv.get("/api/me", Some(&access(p))), 401, "unauthorized");
        assert_ws_rejected(&upgrade_header(&srv, &access(p)), 401, "unauthorized");
        assert_error(&refresh_resp(&srv, &refresh_tok(p)), 401, "unauthorized");
    }
    assert_error(&login_resp(&srv, "bob", PW), 401, "unauthorized");
    let fresh = access(&login_pw(&srv, "bob", new_pw));
    let mut b = Ws::connect(&srv, &fresh);
    alive(&mut b);
    // Other users' logins are untouched.
    assert_status(&srv.get("/api/me", Some(&carol)), 200);
}

#[test]
fn refresh_with_an_expired_token_is_unauthorized() {
    let srv = start_unlimited(&["--access-ttl", "3"]);
    register(&srv, "alice");
    let old = access(&login(&srv, "alice"));
    let old_exp = exp_of(&old);
    sleep(Duration::from_millis(2100));
    let newer = access(&login(&srv, "alice"));
    let new_exp = exp_of(&newer);
    assert!(
        new_exp >= old_exp + 2,
        "test premise ({old_exp} vs {new_exp})"
    );
    let mut ws = Ws::connect(&srv, &newer);
    sleep_until(old_exp as f64 + 0.3);
    ws.send(&json!({"type": "refresh", "access_token": old, "ref": "stale"}));
    expect_ws_error(&mut ws, "unauthorized", "stale", CHATTER);
    alive(&mut ws);
    // The socket keeps its own token, and expires with it.
    assert_eq!(wait_close(&mut ws, Duration::from_secs(10)), Some(4001));
    assert!(now_secs() >= new_exp);
}

#[test]
fn chat_does_not_start_login_sweeps_but_a_ban_does() {
    // The revocation sweep costs a query per live login, so it runs only when a
    // commit could have ended one: messages and audit rows from this process do not
    // count, a ban made with sqlite3 does.
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    let mut b = Ws::connect(&srv, &bob);
    a.join("general");
    b.join("general");
    let before = metric_now(&srv, "parley_login_sweeps_total");
    // Commits over three sweep intervals: a message every 150 ms.
    for i in 0..20 {
        a.send_msg("general", &format!("m{i}"));
        sleep(Duration::from_millis(150));
    }
    sleep(Duration::from_millis(1500));
    assert_eq!(
        metric_now(&srv, "parley_login_sweeps_total"),
        before,
        "messages started a login sweep"
    );
    let db = open_db(&srv.db_path());
    db.execute(
        "UPDATE users SET banned_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE username = 'bob'",
        [],
    )
    .unwrap();
    assert_eq!(wait_close(&mut b, Duration::from_secs(5)), Some(4003));
    assert!(metric_now(&srv, "parley_login_sweeps_total") > before);
    alive(&mut a);
}

#[test]
fn sqlite_changes_reach_a_live_server() {
    // Changes made with sqlite3 while the server runs reach it within 5 s,
    // live sockets included.
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let carol = new_user(&srv, "carol");
    let mut b = Ws::connect(&srv, &bob);
    let mut c = Ws::connect(&srv, &carol);
    let db = rusqlite::Connection::open(srv.db_path()).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();

    // Promote carol to moderator by hand: her socket may kick (unknown user: not_found
    // rather than forbidden) within 5 s.
    db.execute(
        "INSERT INTO user_roles(user_id, role) SELECT id, 'moderator' FROM users WHERE username = 'carol'",
        [],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = format!("k{}", unique());
        c.send(&json!({"type": "kick", "user": "nobody", "ref": r}));
        let v = reply_to(&mut c, &r, CHATTER);
        if v["code"] == "not_found" {
            break;
        }
        assert_eq!(v["code"], "forbidden", "{v}");
        assert!(
            Instant::now() < deadline,
            "a role granted with sqlite3 did not reach the server within 5 s"
        );
        sleep(Duration::from_millis(200));
    }

    // Ban bob by hand: his socket closes within 5 s, his token is refused.
    db.execute(
        "UPDATE users SET banned_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE username = 'bob'",
        [],
    )
    .unwrap();
    assert_eq!(wait_close(&mut b, Duration::from_secs(5)), Some(4003));
    assert_error(&srv.get("/api/me", Some(&bob)), 403, "forbidden");
    assert_error(&login_resp(&srv, "bob", PW), 403, "forbidden");

    // Revoke alice's login by hand: her socket closes within 5 s.
    let mut a = Ws::connect(&srv, &alice);
    alive(&mut a);
    let sid = jwt_parts(&alice).1["sid"].as_str().unwrap().to_string();
    let n = db
        .execute(
            "UPDATE sessions SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), revoked_reason = 'sqlite3' WHERE id = ?1",
            [&sid],
        )
        .unwrap();
    assert_eq!(n, 1, "alice's sid {sid} is a sessions row");
    assert_eq!(wait_close(&mut a, Duration::from_secs(5)), Some(4003));
    assert_error(&srv.get("/api/me", Some(&alice)), 401, "unauthorized");
    alive(&mut c);
}
