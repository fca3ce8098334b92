//! The audit trail: one row for every action in docs/audit.md (with actor, target,
//! ip, detail), `GET /api/admin/audit` paging and limits, `parley audit` (text and
//! `--json`), no secret in the trail or the logs after a full session, and
//! `parley audit --verify` detecting rows changed, deleted or inserted behind the
//! server's back.

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

/// `GET /api/admin/audit?{query}` as `admin`; the events.
#[track_caller]
fn events(srv: &Server, admin: &str, query: &str) -> Vec<Value> {
    let r = srv.get(&format!("/api/admin/audit{query}"), Some(admin));
    assert_status(&r, 200);
    assert!(r.is_json(), "audit answers JSON");
    r.json()["events"]
        .as_array()
        .unwrap_or_else(|| panic!("events array in {}", r.text()))
        .clone()
}

/// Polls until `pred` holds for the newest 1000 events (audit writes are batched and
/// asynchronous); returns them.
#[track_caller]
fn wait_events(
    srv: &Server,
    admin: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = events(srv, admin, "?limit=1000");
        if pred(&ev) {
            return ev;
        }
        assert!(
            Instant::now() < deadline,
            "audit trail never showed {what} within 10 s; newest events:\n{}",
            ev.iter()
                .take(60)
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        sleep(Duration::from_millis(100));
    }
}

fn ids(ev: &[Value]) -> Vec<i64> {
    ev.iter()
        .map(|e| e["id"].as_i64().unwrap_or_else(|| panic!("id in {e}")))
        .collect()
}

#[track_caller]
fn assert_event_shape(e: &Value) {
    assert!(e["id"].is_i64(), "id should be an int: {e}");
    let ts = e["ts"].as_str().unwrap_or_else(|| panic!("ts in {e}"));
    assert!(is_rfc3339(ts), "ts {ts:?} is not RFC 3339: {e}");
    assert!(e["action"].is_string(), "action should be a string: {e}");
    for k in ["actor", "target", "ip"] {
        assert!(
            e[k].is_null() || e[k].is_string(),
            "{k} should be a string or null: {e}"
        );
        assert!(
            e.as_object().unwrap().contains_key(k),
            "{k} should be present (null allowed): {e}"
        );
    }
    assert!(e["detail"].is_object(), "detail should be an object: {e}");
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `text` mentions the number `n` as a whole number (not inside another one).
fn names_number(text: &str, n: i64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|w| w == n.to_string())
}

/// SIGTERM; returns once the process exited and its output was read to the end.
fn stop(srv: &mut Server) {
    srv.stop();
}

// ---------------------------------------------------------------------------------
// one row per action
// ---------------------------------------------------------------------------------

#[test]
fn every_action_writes_an_audit_row() {
    let srv = start_unlimited(&["--refresh-grace", "0"]);
    register(&srv, "alice");
    let alice = access(&login(&srv, "alice"));
    register(&srv, "bob");
    register(&srv, "carol");

    // login_failed: a known user with a wrong password, and an unknown user.
    assert_error(
        &login_resp(&srv, "bob", "wrong password!"),
        401,
        "unauthorized",
    );
    assert_error(
        &login_resp(&srv, "ghost", "wrong password!"),
        401,
        "unauthorized",
    );

    // refresh, then refresh_reuse.
    let pb1 = login(&srv, "bob");
    let r = refresh_resp(&srv, &refresh_tok(&pb1));
    assert_status(&r, 200);
    let pb2 = r.json();
    let r = refresh_resp(&srv, &refresh_tok(&pb1));
    assert_error(&r, 401, "unauthorized");

    // ws_connect, ws_disconnect; ws_rejected (the token must not be recorded).
    let bob = access(&login(&srv, "bob"));
    let mut b = Ws::connect(&srv, &bob);
    b.ping();
    b.close();
    let bad_token = format!("garbage-token-{}", unique());
    let r = ws_handshake_raw(&srv, &format!("/ws?access_token={bad_token}"), &[]);
    assert_ws_rejected(&r, 401, "unauthorized");
    // A valid token refused for its Origin: the token is not recorded either.
    let r = ws_handshake_raw(
        &srv,
        &format!("/ws?access_token={bob}"),
        &[("Origin", "http://evil.example")],
    );
    assert_ws_rejected(&r, 403, "forbidden");

    // forbidden (bob may not delete), room_create, message_delete.
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let (_, mid) = a.send_msg("general", "to be deleted");
    let r = srv.request("DELETE", &format!("/api/messages/{mid}"), Some(&bob), None);
    assert_error(&r, 403, "forbidden");
    let r = srv.post("/api/rooms", Some(&alice), &json!({"name": "ops"}));
    assert_status(&r, 201);
    let r = srv.request(
        "DELETE",
        &format!("/api/messages/{mid}"),
        Some(&alice),
        None,
    );
    assert_status(&r, 204);

    // role_change, then kick by the new moderator.
    assert_status(&put_roles(&srv, &alice, "carol", &["moderator"]), 200);
    let carol = access(&login(&srv, "carol"));
    let mut b = Ws::connect(&srv, &bob);
    b.ping(); // fully set up (the kick race is tested in moderation.rs)
    let r = srv.post_empty("/api/admin/users/bob/kick", Some(&carol));
    assert_status(&r, 200);
    assert_eq!(b.expect_close(), Some(4003));

    // announce, ban, unban.
    let r = srv.post("/api/admin/announce", Some(&alice), &json!({"body": "hi"}));
    assert_status(&r, 200);
    assert_status(
        &srv.post_empty("/api/admin/users/bob/ban", Some(&alice)),
        204,
    );
    assert_status(
        &srv.post_empty("/api/admin/users/bob/unban", Some(&alice)),
        204,
    );

    // logout.
    let bob2 = access(&login(&srv, "bob"));
    assert_status(&srv.post_empty("/api/logout", Some(&bob2)), 204);

    // What we expect: (action, actor, target); None = not checked.
    type Want = (&'static str, Option<Option<&'static str>>, Option<String>);
    let mid_s = mid.to_string();
    let want: Vec<Want> = vec![
        ("register", None, Some("alice".into())),
        ("register", None, Some("bob".into())),
        ("register", None, Some("carol".into())),
        ("login", Some(Some("alice")), Some("alice".into())),
        ("login_failed", Some(None), Some("bob".into())),
        ("login_failed", Some(None), Some("ghost".into())),
        ("refresh", Some(Some("bob")), None),
        ("refresh_reuse", None, None),
        ("ws_connect", Some(Some("bob")), None),
        ("ws_disconnect", Some(Some("bob")), None),
        ("ws_rejected", None, None),
        ("forbidden", Some(Some("bob")), None),
        ("room_create", Some(Some("alice")), Some("ops".into())),
        ("message_delete", Some(Some("alice")), Some(mid_s.clone())),
        ("role_change", Some(Some("alice")), Some("carol".into())),
        ("kick", Some(Some("carol")), Some("bob".into())),
        ("announce", Some(Some("alice")), None),
        ("ban", Some(Some("alice")), Some("bob".into())),
        ("unban", Some(Some("alice")), Some("bob".into())),
        ("logout", Some(Some("bob")), None),
    ];
    let matches = |e: &Value, w: &Want| -> bool {
        e["action"] == w.0
            && w.1.is_none_or(|a| match a {
                Some(name) => e["actor"] == name,
                None => e["actor"].is_null(),
            })
            && w.2.as_ref().is_none_or(|t| e["target"] == t.as_str())
    };
    let ev = wait_events(&srv, &alice, "every expected action", |ev| {
        want.iter().all(|w| ev.iter().any(|e| matches(e, w)))
    });

    for e in &ev {
        assert_event_shape(e);
    }
    let got_ids = ids(&ev);
    assert!(
        got_ids.windows(2).all(|w| w[0] > w[1]),
        "events must be newest first: {got_ids:?}"
    );
    for w in &want {
        let e = ev.iter().find(|e| matches(e, w)).unwrap();
        assert_eq!(
            e["ip"], "127.0.0.1",
            "{} should carry the peer IP without port: {e}",
            w.0
        );
    }
    // Specific facts.
    let reuse = ev.iter().find(|e| e["action"] == "refresh_reuse").unwrap();
    assert!(
        reuse["actor"] == "bob" || reuse["target"] == "bob",
        "refresh_reuse should name bob: {reuse}"
    );
    let refresh = ev.iter().find(|e| e["action"] == "refresh").unwrap();
    assert!(
        refresh.to_string().find(&refresh_tok(&pb2)).is_none(),
        "refresh row holds the token: {refresh}"
    );
    // Both refusals are anonymous and from one address within a minute: the first is
    // written in full, the second folded into the window's summary (abuse.rs).
    let rejected: Vec<&Value> = ev.iter().filter(|e| e["action"] == "ws_rejected").collect();
    assert_eq!(
        rejected.len(),
        1,
        "the first refused upgrade is audited: {rejected:?}"
    );
    for r in rejected {
        let text = r.to_string();
        assert!(
            !text.contains(&bad_token) && !text.contains(&bob),
            "ws_rejected must not record the token: {r}"
        );
        let sig = bob.rsplit_once('.').unwrap().1;
        assert!(
            !text.contains(sig),
            "ws_rejected records the signature: {r}"
        );
        assert!(
            !r["detail"].as_object().unwrap().is_empty(),
            "ws_rejected should record the reason in detail: {r}"
        );
    }
    let ban = ev.iter().find(|e| e["action"] == "ban").unwrap();
    let unban = ev.iter().find(|e| e["action"] == "unban").unwrap();
    assert!(
        ban["id"].as_i64() < unban["id"].as_i64(),
        "ban happened before unban"
    );
    let forb = ev
        .iter()
        .find(|e| e["action"] == "forbidden" && e["actor"] == "bob")
        .unwrap();
    assert!(
        forb.to_string().contains("message.delete") || forb["target"] == mid_s.as_str(),
        "the forbidden row should say what was refused: {forb}"
    );
}

#[test]
fn socket_actions_are_audited_too() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let (_, mid) = a.send_msg("general", "gone soon");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    // forbidden over the socket.
    b.send(&json!({"type": "delete", "id": mid, "ref": "x"}));
    let v = b.recv_skipping(&["presence"]);
    assert_eq!(v["code"], "forbidden", "{v}");
    // message_delete, announce and kick over the socket.
    a.send(&json!({"type": "delete", "id": mid, "ref": "d"}));
    let v = a.recv_skipping(&["presence"]);
    assert_eq!(v["type"], "deleted", "{v}");
    a.send(&json!({"type": "announce", "body": "socket announce", "ref": "n"}));
    let v = a.recv_skipping(&["presence", "deleted"]);
    assert_eq!(v["type"], "announcement", "{v}");
    a.send(&json!({"type": "kick", "user": "bob", "ref": "k"}));
    assert_eq!(b.expect_close(), Some(4003));

    let mid_s = mid.to_string();
    wait_events(&srv, &alice, "socket-made rows", |ev| {
        let has = |action: &str, actor: &str| {
            ev.iter()
                .any(|e| e["action"] == action && e["actor"] == actor && e["ip"] == "127.0.0.1")
        };
        has("forbidden", "bob")
            && has("announce", "alice")
            && ev.iter().any(|e| {
                e["action"] == "message_delete" && e["actor"] == "alice" && e["target"] == mid_s
            })
            && ev
                .iter()
                .any(|e| e["action"] == "kick" && e["actor"] == "alice" && e["target"] == "bob")
    });
}

// ---------------------------------------------------------------------------------
// reading the trail
// ---------------------------------------------------------------------------------

#[test]
fn audit_paging_and_limits() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    // 1005 failed logins: 1005 rows, enough to see every clamp.
    for i in 0..1005 {
        let r = login_resp(&srv, &format!("ghost{i}"), "wrong password!");
        assert_eq!(r.status, 401, "failed login {i}: {}", r.text());
    }
    let all = wait_events(&srv, &alice, "1005 login_failed rows", |ev| {
        ev.iter().any(|e| e["target"] == "ghost1004")
    });
    // limit clamps to 1000.
    assert_eq!(all.len(), 1000, "limit=1000 should give 1000 events");
    let big = events(&srv, &alice, "?limit=5000");
    assert_eq!(big.len(), 1000, "limit is clamped to 1000");
    assert_eq!(ids(&big), ids(&all));
    // Default 100.
    let dflt = events(&srv, &alice, "");
    assert_eq!(dflt.len(), 100, "the default limit is 100");
    assert_eq!(ids(&dflt), ids(&all)[..100].to_vec());
    assert_eq!(dflt[0]["target"], "ghost1004", "newest first");
    // limit 0 and negative clamp to 1.
    for q in ["?limit=0", "?limit=-5"] {
        let one = events(&srv, &alice, q);
        assert_eq!(one.len(), 1, "{q} clamps to 1");
        assert_eq!(one[0]["id"], all[0]["id"]);
    }
    // Paging with before.
    let p1 = events(&srv, &alice, "?limit=10");
    assert_eq!(p1.len(), 10);
    let last = p1[9]["id"].as_i64().unwrap();
    let p2 = events(&srv, &alice, &format!("?limit=10&before={last}"));
    assert_eq!(p2.len(), 10);
    let mut joined = ids(&p1);
    joined.extend(ids(&p2));
    assert_eq!(joined, ids(&all)[..20].to_vec(), "pages join without gap");
    assert!(ids(&p2).iter().all(|i| *i < last));
    // The very oldest end of the trail, against the file itself: `before` the second
    // oldest row gives exactly the oldest row, and `before` the oldest gives nothing.
    let first_two: Vec<i64> = open_db(&srv.db_path())
        .prepare("SELECT id FROM audit_log ORDER BY id LIMIT 2")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(first_two.len(), 2, "the trail has over a thousand rows");
    let oldest = events(
        &srv,
        &alice,
        &format!("?limit=1000&before={}", first_two[1]),
    );
    assert_eq!(ids(&oldest), vec![first_two[0]], "{oldest:?}");
    assert_eq!(
        oldest[0]["action"], "register",
        "the oldest row: {oldest:?}"
    );
    assert_eq!(oldest[0]["target"], "alice", "the oldest row: {oldest:?}");
    let none = events(&srv, &alice, &format!("?before={}", first_two[0]));
    assert!(none.is_empty(), "nothing before the oldest row: {none:?}");
}

#[test]
fn parley_audit_cli_lists_the_trail() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    assert_error(
        &login_resp(&srv, "bob", "wrong password!"),
        401,
        "unauthorized",
    );
    assert_status(
        &srv.post_empty("/api/admin/users/bob/ban", Some(&alice)),
        204,
    );
    let rest = wait_events(&srv, &alice, "the ban", |ev| {
        ev.iter().any(|e| e["action"] == "ban")
    });
    let db = srv.db_path().to_str().unwrap().to_string();

    // --json: one object per line, newest first, the same events as the API.
    let out = run_cli(&["audit", "--db", &db, "--json", "--limit", "3"], "");
    assert_exit(&out, 0, "parley audit --json --limit 3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "--limit 3 gives 3 lines: {text:?}");
    let cli: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect();
    for e in &cli {
        assert_event_shape(e);
    }
    assert_eq!(cli, rest[..3].to_vec(), "CLI and API agree");

    // Without --limit: everything here (fewer than 100 rows), --db before the command.
    let out = run_cli(&["--db", &db, "audit", "--json"], "");
    assert_exit(&out, 0, "parley --db PATH audit --json");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let cli: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ids(&cli), ids(&rest));
    let failed = cli
        .iter()
        .find(|e| e["action"] == "login_failed")
        .expect("login_failed in the CLI output");
    assert!(failed["actor"].is_null(), "{failed}");
    assert_eq!(failed["target"], "bob");
    assert_eq!(failed["ip"], "127.0.0.1");

    // Plain text: one line per event, naming the actions.
    let out = run_cli(&["audit", "--db", &db], "");
    assert_exit(&out, 0, "parley audit");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.lines().filter(|l| !l.trim().is_empty()).count(),
        rest.len(),
        "{text}"
    );
    for action in ["register", "login", "login_failed", "ban"] {
        assert!(text.contains(action), "text output lacks {action}: {text}");
    }
}

// ---------------------------------------------------------------------------------
// no secrets
// ---------------------------------------------------------------------------------

fn secret_pw(tag: &str) -> String {
    format!("Pw{tag}{}x{}", unique(), now_secs())
}

#[test]
fn no_secret_in_the_audit_trail_or_the_debug_log() {
    full_session_leaks_nothing("debug");
}

/// "No token, password or signing key ever appears in ... the logs": at the most
/// verbose level too, which an operator chasing a problem will reach for.
#[test]
fn no_secret_in_the_trace_log() {
    full_session_leaks_nothing("trace");
}

/// Runs a full session (register, failed logins, login, refresh and reuse, sockets with
/// the token in the query string and the subprotocol, a socket `refresh`, a rejected
/// upgrade, logout, a CLI password change) with `RUST_LOG=rust_log`, then greps the
/// server's log, the audit_log table and `parley audit --json` for every password,
/// token and the signing key.
fn full_session_leaks_nothing(rust_log: &str) {
    let mut srv = Server::start_env(
        &[
            "--login-rate",
            "0",
            "--msg-rate",
            "0",
            "--refresh-grace",
            "0",
        ],
        &[("RUST_LOG", rust_log)],
    );
    let p1 = secret_pw("reg");
    let p2 = secret_pw("wrong");
    let p3 = secret_pw("passwd");
    let mut tokens: Vec<String> = Vec::new();
    let mut refresh_tokens: Vec<String> = Vec::new();
    fn keep(pair: &Value, t: &mut Vec<String>, rt: &mut Vec<String>) {
        t.push(access(pair));
        rt.push(refresh_tok(pair));
    }

    register_pw(&srv, "alice", &p1);
    let pair1 = login_pw(&srv, "alice", &p1);
    keep(&pair1, &mut tokens, &mut refresh_tokens);
    assert_error(&login_resp(&srv, "alice", &p2), 401, "unauthorized");
    assert_error(&login_resp(&srv, "ghost", &p2), 401, "unauthorized");
    let r = refresh_resp(&srv, &refresh_tok(&pair1));
    assert_status(&r, 200);
    let pair2 = r.json();
    keep(&pair2, &mut tokens, &mut refresh_tokens);
    // Refresh-token reuse (revokes that login).
    let r = refresh_resp(&srv, &refresh_tok(&pair1));
    assert_error(&r, 401, "unauthorized");

    let pair3 = login_pw(&srv, "alice", &p1);
    keep(&pair3, &mut tokens, &mut refresh_tokens);
    let t3 = access(&pair3);
    // The socket, with the token in the query string, then in the subprotocol.
    let mut ws = Ws::try_connect(&srv, ws_request(&srv, &format!("/ws?access_token={t3}")))
        .expect("ws with ?access_token");
    ws.join("general");
    ws.send_msg("general", "hello");
    let req = with_header(
        ws_request(&srv, "/ws"),
        "Sec-WebSocket-Protocol",
        &format!("parley.v1, bearer.{t3}"),
    );
    let mut ws2 = Ws::try_connect(&srv, req).expect("ws with bearer subprotocol");
    ws2.ping();
    // A socket refresh.
    let r = refresh_resp(&srv, &refresh_tok(&pair3));
    assert_status(&r, 200);
    let pair4 = r.json();
    keep(&pair4, &mut tokens, &mut refresh_tokens);
    ws.send(&json!({"type": "refresh", "access_token": access(&pair4), "ref": "r"}));
    let v = ws.recv_skipping(&["presence"]);
    assert_eq!(v["type"], "refreshed", "{v}");
    // A rejected upgrade with a tampered token in the query string.
    let mut bad = access(&pair4);
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    tokens.push(bad.clone());
    let r = ws_handshake_raw(&srv, &format!("/ws?access_token={bad}"), &[]);
    assert_ws_rejected(&r, 401, "unauthorized");
    // Logout with the refresh token in the body.
    let r = srv.post(
        "/api/logout",
        Some(&access(&pair4)),
        &json!({"refresh_token": refresh_tok(&pair4)}),
    );
    assert_status(&r, 204);
    assert_eq!(ws.expect_close(), Some(4003));
    // A password change from the CLI while the server runs.
    let db = srv.db_path().to_str().unwrap().to_string();
    let out = run_cli(
        // The servers' test cost: a cost-12 hash takes a debug build about a second
        // to check, and five on a busy machine, past the client's read timeout.
        &["user", "passwd", "alice", "--db", &db, "--bcrypt-cost", "4"],
        &format!("{p3}\n"),
    );
    assert_exit(&out, 0, "parley user passwd");
    let cli_out = output_text(&out);
    let pair5 = login_pw(&srv, "alice", &p3);
    keep(&pair5, &mut tokens, &mut refresh_tokens);
    assert_status(&srv.post_empty("/api/logout", Some(&access(&pair5))), 204);

    // The signing key, as stored; it really signs the tokens.
    let key: Vec<u8> = {
        let db = rusqlite::Connection::open(srv.db_path()).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.query_row(
            "SELECT value FROM settings WHERE key = 'jwt_key'",
            [],
            |r| {
                Ok(match r.get_ref(0)? {
                    rusqlite::types::ValueRef::Blob(b) => b.to_vec(),
                    rusqlite::types::ValueRef::Text(t) => t.to_vec(),
                    other => panic!("jwt_key has type {:?}", other.data_type()),
                })
            },
        )
        .expect("settings.jwt_key")
    };
    let (signing_input, sig) = t3.rsplit_once('.').unwrap();
    assert_eq!(
        hmac("HS256", &key, signing_input.as_bytes()),
        b64url_decode(sig),
        "settings.jwt_key should be the key that signs access tokens"
    );

    // Let the server flush everything, then collect what it wrote.
    stop(&mut srv);
    let log = format!("{}{}", srv.stderr_log(), srv.stdout_rest());
    assert!(
        !log.trim().is_empty(),
        "the server wrote no log at all with RUST_LOG={rust_log}; the test would prove nothing"
    );
    let audit_dump: Vec<u8> = {
        let db = rusqlite::Connection::open(srv.db_path()).unwrap();
        let mut st = db.prepare("SELECT * FROM audit_log ORDER BY id").unwrap();
        let n = st.column_count();
        let mut rows = st.query([]).unwrap();
        let mut out = Vec::new();
        let mut count = 0;
        while let Some(row) = rows.next().unwrap() {
            count += 1;
            for i in 0..n {
                match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        out.extend_from_slice(t)
                    }
                    rusqlite::types::ValueRef::Integer(x) => {
                        out.extend_from_slice(x.to_string().as_bytes())
                    }
                    _ => {}
                }
                out.push(b'\n');
            }
        }
        assert!(
            count >= 15,
            "expected a full session's audit rows, got {count}"
        );
        out
    };
    let out = run_cli(&["audit", "--db", &db, "--json", "--limit", "100000"], "");
    assert_exit(&out, 0, "parley audit --json");
    let cli_audit = output_text(&out);

    let hex_of = |b: &[u8]| -> String { b.iter().map(|b| format!("{b:02x}")).collect() };
    let mut needles: Vec<(String, String)> = Vec::new();
    for (i, p) in [&p1, &p2, &p3].iter().enumerate() {
        needles.push((format!("password #{i}"), p.to_string()));
        needles.push((format!("password #{i} (hex)"), hex_of(p.as_bytes())));
    }
    for (i, t) in tokens.iter().enumerate() {
        needles.push((format!("access token #{i}"), t.clone()));
        let sig = t.rsplit_once('.').unwrap().1.to_string();
        needles.push((format!("signature of access token #{i}"), sig.clone()));
        needles.push((
            format!("signature of access token #{i} (hex)"),
            hex_of(sig.as_bytes()),
        ));
    }
    for (i, t) in refresh_tokens.iter().enumerate() {
        needles.push((format!("refresh token #{i}"), t.clone()));
        needles.push((format!("refresh token #{i} (hex)"), hex_of(t.as_bytes())));
    }
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    needles.push(("key (hex)".into(), hex.clone()));
    needles.push(("key (HEX)".into(), hex.to_uppercase()));
    use base64::engine::general_purpose as b64;
    for (name, e) in [
        ("standard", &b64::STANDARD),
        ("standard no pad", &b64::STANDARD_NO_PAD),
        ("url-safe", &b64::URL_SAFE),
        ("url-safe no pad", &b64::URL_SAFE_NO_PAD),
    ] {
        needles.push((format!("key (base64 {name})"), e.encode(&key)));
    }

    let haystacks: [(&str, &[u8]); 4] = [
        ("server log", log.as_bytes()),
        ("audit_log table", &audit_dump),
        ("parley audit --json", cli_audit.as_bytes()),
        ("parley user passwd output", cli_out.as_bytes()),
    ];
    let mut leaks: Vec<String> = Vec::new();
    for (hname, hay) in haystacks {
        for (nname, needle) in &needles {
            if contains(hay, needle.as_bytes()) {
                let text = String::from_utf8_lossy(hay);
                let line = text
                    .lines()
                    .find(|l| l.contains(needle.as_str()))
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect::<String>();
                leaks.push(format!("{nname} appears in the {hname}, e.g. in: {line}"));
            }
        }
        if contains(hay, &key) {
            leaks.push(format!("the raw key appears in the {hname}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets leaked with RUST_LOG={rust_log}:\n{}",
        leaks.join("\n")
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------
// the hash chain
// ---------------------------------------------------------------------------------

fn verify(db: &Path) -> Output {
    run_cli(&["audit", "--verify", "--db", db.to_str().unwrap()], "")
}

/// A copy of the (stopped) database at `to`, made by SQLite itself.
fn copy_db(from: &Path, to: &Path) {
    let db = rusqlite::Connection::open(from).unwrap();
    db.execute("VACUUM INTO ?1", [to.to_str().unwrap()])
        .expect("VACUUM INTO");
}

fn audit_ids(db: &Path) -> Vec<(i64, String)> {
    let db = rusqlite::Connection::open(db).unwrap();
    let mut st = db
        .prepare("SELECT id, action FROM audit_log ORDER BY id")
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}

#[test]
fn audit_verify_detects_changed_deleted_and_inserted_rows() {
    let mut srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    b.send_msg("general", "hi");
    assert_error(
        &login_resp(&srv, "bob", "wrong password!"),
        401,
        "unauthorized",
    );
    let db = srv.db_path();

    // CLI writes interleaved with the server's own keep the chain intact.
    let dbs = db.to_str().unwrap().to_string();
    assert_exit(
        &run_cli(&["user", "role", "bob", "moderator", "--db", &dbs], ""),
        0,
        "user role",
    );
    assert_status(
        &srv.post("/api/rooms", Some(&alice), &json!({"name": "x"})),
        201,
    );
    assert_exit(
        &run_cli(&["user", "ban", "bob", "--db", &dbs], ""),
        0,
        "user ban",
    );
    assert_eq!(b.expect_close(), Some(4003));
    assert_exit(
        &run_cli(&["user", "unban", "bob", "--db", &dbs], ""),
        0,
        "user unban",
    );
    login(&srv, "bob");
    wait_events(&srv, &alice, "the CLI unban", |ev| {
        ev.iter().any(|e| e["action"] == "unban")
    });
    // Verify while the server runs.
    assert_exit(&verify(&db), 0, "verify on the live database");
    stop(&mut srv);
    assert_exit(&verify(&db), 0, "verify after shutdown");

    let rows = audit_ids(&db);
    assert!(rows.len() >= 10, "a session's worth of rows: {rows:?}");
    let max = rows.last().unwrap().0;
    // A row in the middle (not the first, not the last).
    let k = rows[rows.len() / 2].0;
    let work = TempDir::new();
    let fresh = |name: &str| {
        let p = work.path().join(name);
        copy_db(&db, &p);
        p
    };

    // An untouched copy verifies.
    let same = fresh("same.db");
    assert_exit(&verify(&same), 0, "verify an untouched copy");

    // Changed content.
    let changed = fresh("changed.db");
    {
        let c = rusqlite::Connection::open(&changed).unwrap();
        let n = c
            .execute("UPDATE audit_log SET actor = 'mallory' WHERE id = ?1", [k])
            .unwrap();
        assert_eq!(n, 1);
    }
    let out = verify(&changed);
    assert_exit(&out, 1, "verify after changing a row's actor");
    assert!(
        names_number(&output_text(&out), k),
        "verify should name row {k}: {}",
        output_text(&out)
    );

    let changed2 = fresh("changed2.db");
    {
        let c = rusqlite::Connection::open(&changed2).unwrap();
        c.execute(
            "UPDATE audit_log SET detail = '{\"forged\":true}', ts = ts WHERE id = ?1",
            [k - 1],
        )
        .unwrap();
    }
    let out = verify(&changed2);
    assert_exit(&out, 1, "verify after changing a row's detail");
    assert!(
        names_number(&output_text(&out), k - 1),
        "verify should name row {}: {}",
        k - 1,
        output_text(&out)
    );

    // A deleted row: the break is at the gap.
    let deleted = fresh("deleted.db");
    {
        let c = rusqlite::Connection::open(&deleted).unwrap();
        assert_eq!(
            c.execute("DELETE FROM audit_log WHERE id = ?1", [k])
                .unwrap(),
            1
        );
    }
    let out = verify(&deleted);
    assert_exit(&out, 1, "verify after deleting a row");
    let text = output_text(&out);
    assert!(
        names_number(&text, k) || names_number(&text, k + 1),
        "verify should name the deleted row {k} or the row after it: {text}"
    );

    // A row inserted in the middle (later rows renumbered to make room), linked to its
    // predecessor's hash as a forger would.
    let inserted = fresh("inserted.db");
    {
        let c = rusqlite::Connection::open(&inserted).unwrap();
        c.execute("UPDATE audit_log SET id = -id WHERE id > ?1", [k])
            .unwrap();
        c.execute("UPDATE audit_log SET id = 1 - id WHERE id < 0", [])
            .unwrap();
        let prev: String = c
            .query_row("SELECT hash FROM audit_log WHERE id = ?1", [k], |r| {
                r.get(0)
            })
            .unwrap();
        c.execute(
            "INSERT INTO audit_log(id, ts, actor, action, target, ip, detail, prev_hash, hash)
             VALUES (?1, '2020-01-01T00:00:00Z', 'alice', 'unban', 'mallory', '127.0.0.1', '{}', ?2, ?3)",
            rusqlite::params![k + 1, prev, "0".repeat(64)],
        )
        .unwrap();
    }
    let out = verify(&inserted);
    assert_exit(&out, 1, "verify after inserting a row");
    assert!(
        names_number(&output_text(&out), k + 1),
        "verify should name the inserted row {}: {}",
        k + 1,
        output_text(&out)
    );

    // A row appended at the end behind the server's back.
    let appended = fresh("appended.db");
    {
        let c = rusqlite::Connection::open(&appended).unwrap();
        let prev: String = c
            .query_row("SELECT hash FROM audit_log WHERE id = ?1", [max], |r| {
                r.get(0)
            })
            .unwrap();
        c.execute(
            "INSERT INTO audit_log(id, ts, actor, action, target, ip, detail, prev_hash, hash)
             VALUES (?1, '2030-01-01T00:00:00Z', NULL, 'login', 'mallory', '10.0.0.1', '{}', ?2, ?3)",
            rusqlite::params![max + 1, prev, "f".repeat(64)],
        )
        .unwrap();
    }
    let out = verify(&appended);
    assert_exit(&out, 1, "verify after appending a forged row");
    assert!(
        names_number(&output_text(&out), max + 1),
        "verify should name the forged row {}: {}",
        max + 1,
        output_text(&out)
    );

    // The original is still intact, and a restarted server keeps extending it.
    assert_exit(&verify(&db), 0, "verify the original again");
    let srv = Server::start_in(srv.dir.as_path(), &["--login-rate", "0"]);
    login(&srv, "alice");
    assert_error(
        &login_resp(&srv, "alice", "wrong password!"),
        401,
        "unauthorized",
    );
    let alice2 = access(&login(&srv, "alice"));
    let before = max;
    wait_events(&srv, &alice2, "rows after the restart", |ev| {
        ev.iter()
            .filter(|e| e["id"].as_i64().unwrap() > before)
            .count()
            >= 3
    });
    assert_exit(&verify(&db), 0, "verify after a restart and more rows");
}

#[test]
fn audit_verify_detects_a_deleted_newest_row_once_more_rows_follow() {
    // The incident case: someone with the database file deletes the row recording
    // their latest action (the newest one) while the server runs; the server then goes
    // on appending. The deleted row must still be detected.
    let mut srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    new_user(&srv, "bob");
    assert_status(
        &srv.post_empty("/api/admin/users/bob/ban", Some(&alice)),
        204,
    );
    wait_events(&srv, &alice, "the ban", |ev| {
        ev.first().is_some_and(|e| e["action"] == "ban")
    });
    let db = srv.db_path();
    let gone = {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        let (id, action): (i64, String) = c
            .query_row(
                "SELECT id, action FROM audit_log ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(action, "ban", "test premise: the ban is the newest row");
        assert_eq!(
            c.execute("DELETE FROM audit_log WHERE id = ?1", [id])
                .unwrap(),
            1
        );
        id
    };
    // Business as usual afterwards: more rows.
    assert_error(&login_resp(&srv, "bob", PW), 403, "forbidden");
    login(&srv, "alice");
    wait_events(&srv, &alice, "rows after the deletion", |ev| {
        ev.iter().any(|e| e["id"].as_i64().unwrap() > gone)
    });
    stop(&mut srv);
    let out = verify(&db);
    assert_exit(
        &out,
        1,
        &format!("verify after row {gone} (the newest) was deleted and more rows followed"),
    );
    let text = output_text(&out);
    assert!(
        names_number(&text, gone) || names_number(&text, gone + 1),
        "verify should name the deleted row {gone} or the row after it: {text}"
    );
}

#[test]
fn the_chain_stays_whole_under_concurrent_server_and_cli_writes() {
    let mut srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    let db = srv.db_path().to_str().unwrap().to_string();
    let n_fail = 150;
    let rounds = 5;
    std::thread::scope(|s| {
        let srv = &srv;
        s.spawn(move || {
            for i in 0..n_fail {
                let r = login_resp(srv, &format!("storm{i}"), "wrong password!");
                assert_eq!(r.status, 401, "{}", r.text());
            }
        });
        for _ in 0..rounds {
            assert_exit(&run_cli(&["user", "ban", "bob", "--db", &db], ""), 0, "ban");
            assert_exit(
                &run_cli(&["user", "unban", "bob", "--db", &db], ""),
                0,
                "unban",
            );
        }
    });
    let ev = wait_events(&srv, &alice, "every row", |ev| {
        ev.iter().filter(|e| e["action"] == "login_failed").count() >= n_fail
    });
    let count = |action: &str| ev.iter().filter(|e| e["action"] == action).count();
    assert_eq!(count("login_failed"), n_fail, "one row per failed login");
    assert_eq!(count("ban"), rounds, "one row per CLI ban");
    assert_eq!(count("unban"), rounds, "one row per CLI unban");
    assert_exit(&verify(srv.db_path().as_path()), 0, "verify while running");
    stop(&mut srv);
    assert_exit(&verify(srv.db_path().as_path()), 0, "verify after shutdown");
}
