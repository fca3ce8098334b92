//! Accounts and tokens over HTTP: register, login, refresh, logout, me, and the
//! generic HTTP error rows (404, 405, 413, 415) plus /healthz.

mod common;

use common::*;
use serde_json::{json, Value};
use std::thread::sleep;
use std::time::Duration;

fn reg(srv: &Server, body: &Value) -> Resp {
    srv.post("/api/register", None, body)
}

#[test]
fn register_first_user_is_admin_then_members() {
    let srv = Server::start(&[]);
    let r = reg(&srv, &json!({"username": "alice", "password": PW}));
    assert_status(&r, 201);
    assert!(r.is_json(), "register should answer JSON");
    let alice = r.json()["user"].clone();
    assert_user_shape(&alice, "alice", &["admin"]);

    let bob = register(&srv, "bob");
    assert_user_shape(&bob, "bob", &["member"]);
    let carol = register(&srv, "carol");
    assert_user_shape(&carol, "carol", &["member"]);
    assert_ne!(alice["id"], bob["id"]);
    assert_ne!(bob["id"], carol["id"]);
}

#[test]
fn register_validates_usernames() {
    let srv = Server::start(&[]);
    let bad = [
        "",
        "ab",
        &"a".repeat(33),
        "has space",
        "slash/name",
        "at@sign",
        "héllo",
        "emoji😀",
        "semi;colon",
        "tab\tname",
    ];
    for name in bad {
        let r = reg(&srv, &json!({"username": name, "password": PW}));
        assert_error(&r, 400, "bad_request");
    }
    let good = [
        "abc".to_string(),
        "z".repeat(32),
        "A.b-c_9".to_string(),
        "X_Y".to_string(),
    ];
    for name in &good {
        let u = register(&srv, name);
        assert_eq!(u["username"], name.as_str());
    }
}

#[test]
fn register_validates_passwords_in_bytes() {
    let srv = Server::start(&[]);
    // 7 bytes: too short.
    assert_error(
        &reg(&srv, &json!({"username": "pw1", "password": "1234567"})),
        400,
        "bad_request",
    );
    // 73 bytes: too long.
    assert_error(
        &reg(
            &srv,
            &json!({"username": "pw2", "password": "x".repeat(73)}),
        ),
        400,
        "bad_request",
    );
    // 37 characters but 74 bytes: too long (the limit is in bytes).
    assert_error(
        &reg(
            &srv,
            &json!({"username": "pw3", "password": "é".repeat(37)}),
        ),
        400,
        "bad_request",
    );
    assert_error(
        &reg(&srv, &json!({"username": "pw4", "password": ""})),
        400,
        "bad_request",
    );
    // Boundaries that are valid: 8 bytes, 72 bytes, 4 two-byte characters (8 bytes).
    register_pw(&srv, "ok8", "12345678");
    register_pw(&srv, "ok72", &"y".repeat(72));
    register_pw(&srv, "okutf8", &"é".repeat(4));
    // And each of them can log in with exactly that password.
    login_pw(&srv, "ok8", "12345678");
    login_pw(&srv, "ok72", &"y".repeat(72));
    login_pw(&srv, "okutf8", &"é".repeat(4));
}

#[test]
fn register_rejects_malformed_bodies() {
    let srv = Server::start(&[]);
    let cases: Vec<&[u8]> = vec![
        b"{not json",
        b"",
        b"[]",
        b"\"alice\"",
        b"{\"username\": \"alice\"}",
        b"{\"password\": \"correct horse\"}",
        b"{\"username\": 42, \"password\": \"correct horse\"}",
        b"{\"username\": \"alice\", \"password\": 12345678}",
        b"{\"username\": null, \"password\": \"correct horse\"}",
    ];
    for body in cases {
        let r = srv.request(
            "POST",
            "/api/register",
            None,
            Some(("application/json", body)),
        );
        assert_eq!(
            r.status,
            400,
            "body {:?} should get 400, got {} {:?}",
            String::from_utf8_lossy(body),
            r.status,
            r.text()
        );
        assert_error(&r, 400, "bad_request");
    }
    // Nothing was created by the rejected requests: the first real account is admin.
    let u = register(&srv, "alice");
    assert_user_shape(&u, "alice", &["admin"]);
}

#[test]
fn usernames_are_unique_case_insensitively() {
    let srv = Server::start(&[]);
    register(&srv, "Alice");
    for n in ["Alice", "alice", "ALICE", "aLiCe"] {
        let r = reg(&srv, &json!({"username": n, "password": PW}));
        assert_error(&r, 409, "conflict");
    }
    // Another name is still fine.
    register(&srv, "alicia");
}

#[test]
fn registration_closed_is_forbidden() {
    let srv = Server::start(&["--registration", "closed"]);
    let r = reg(&srv, &json!({"username": "alice", "password": PW}));
    assert_error(&r, 403, "forbidden");
}

#[test]
fn login_returns_token_pair() {
    let srv = Server::start(&[]);
    let user = register(&srv, "alice");
    let r = login_resp(&srv, "alice", PW);
    assert_status(&r, 200);
    assert!(r.is_json());
    let pair = r.json();
    assert_eq!(pair["token_type"], "Bearer", "{pair}");
    assert_eq!(
        pair["expires_in"], 900,
        "default access TTL is 900 s: {pair}"
    );
    let refresh = refresh_tok(&pair);
    assert!(
        refresh.len() >= 16,
        "refresh token looks too short: {refresh:?}"
    );
    assert_user_shape(&pair["user"], "alice", &["admin"]);
    assert_eq!(pair["user"]["id"], user["id"]);

    let at = access(&pair);
    let (h, p, _) = jwt_parts(&at);
    assert_eq!(h["alg"], "HS256", "access tokens are HS256: {h}");
    let id = user["id"].as_i64().unwrap();
    assert_eq!(
        p["sub"],
        id.to_string(),
        "sub is the user id as a string: {p}"
    );
    assert_eq!(p["name"], "alice", "{p}");
    assert_eq!(p["roles"], json!(["admin"]), "{p}");
    assert!(
        p["sid"].is_string() || p["sid"].is_number(),
        "sid claim: {p}"
    );
    assert!(p["jti"].is_string(), "jti claim: {p}");
    let iat = p["iat"].as_i64().expect("iat");
    let exp = p["exp"].as_i64().expect("exp");
    assert_eq!(exp - iat, 900, "exp - iat should equal the access TTL: {p}");
    assert!((iat - now_secs()).abs() < 60, "iat should be now: {p}");
    // The refresh token is opaque, not the access token.
    assert_ne!(refresh, at);

    // Two logins are two different logins (sid) with different tokens.
    let pair2 = login(&srv, "alice");
    let (_, p2, _) = jwt_parts(&access(&pair2));
    assert_ne!(p["sid"], p2["sid"], "each login has its own sid");
    assert_ne!(p["jti"], p2["jti"]);
    assert_ne!(refresh_tok(&pair2), refresh);
}

#[test]
fn access_ttl_flag_sets_expires_in() {
    let srv = Server::start(&["--access-ttl", "120"]);
    register(&srv, "alice");
    let pair = login(&srv, "alice");
    assert_eq!(pair["expires_in"], 120, "{pair}");
    let (_, p, _) = jwt_parts(&access(&pair));
    assert_eq!(p["exp"].as_i64().unwrap() - p["iat"].as_i64().unwrap(), 120);
}

#[test]
fn login_failures_share_one_message() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let unknown = login_resp(&srv, "nobody", PW);
    let m1 = assert_error(&unknown, 401, "unauthorized");
    let wrong = login_resp(&srv, "alice", "wrong password");
    let m2 = assert_error(&wrong, 401, "unauthorized");
    assert_eq!(
        m1, m2,
        "unknown user and wrong password must give the same message"
    );
    // The body does not reveal which case it was either.
    assert_eq!(unknown.json(), wrong.json());
    // Malformed login bodies are bad requests, not 401.
    let r = srv.request(
        "POST",
        "/api/login",
        None,
        Some(("application/json", b"{\"username\":\"alice\"")),
    );
    assert_error(&r, 400, "bad_request");
    let r = srv.post("/api/login", None, &json!({"username": "alice"}));
    assert_error(&r, 400, "bad_request");
    // The right password still works after failures.
    login(&srv, "alice");
}

#[test]
fn me_requires_a_valid_bearer_token() {
    let srv = Server::start(&[]);
    let user = register(&srv, "alice");
    let at = access(&login(&srv, "alice"));

    let r = srv.get("/api/me", Some(&at));
    assert_status(&r, 200);
    assert!(r.is_json());
    let me = r.json()["user"].clone();
    assert_user_shape(&me, "alice", &["admin"]);
    assert_eq!(me["id"], user["id"]);

    assert_error(&srv.get("/api/me", None), 401, "unauthorized");
    assert_error(&srv.get("/api/me", Some("garbage")), 401, "unauthorized");
    assert_error(&srv.get("/api/me", Some("a.b.c")), 401, "unauthorized");
    // Wrong scheme.
    let basic = format!("Basic {at}");
    let r = http_request(
        srv.port,
        "GET",
        "/api/me",
        &[("Authorization", &basic)],
        None,
    );
    assert_error(&r, 401, "unauthorized");
    // Tampered payload (name changed, signature kept).
    let (h, mut p, sig) = jwt_parts(&at);
    p["name"] = json!("mallory");
    let tampered = format!(
        "{}.{}.{}",
        b64url(&serde_json::to_vec(&h).unwrap()),
        b64url(&serde_json::to_vec(&p).unwrap()),
        sig
    );
    assert_error(&srv.get("/api/me", Some(&tampered)), 401, "unauthorized");
    // Signed with some other key.
    let (h, p, _) = jwt_parts(&at);
    let wrong_key = forge_hmac("HS256", b"not the server's key, 32 bytes!!", &h, &p);
    assert_error(&srv.get("/api/me", Some(&wrong_key)), 401, "unauthorized");
    // alg none.
    assert_error(
        &srv.get("/api/me", Some(&forge_none(&p))),
        401,
        "unauthorized",
    );
}

#[test]
fn expired_access_token_is_rejected() {
    // Claim: an access token works until its `exp` and is refused after it. With a
    // 3 s lifetime the token has at least 2 s left when it is first used (`exp` is
    // whole seconds), so the first check cannot race its expiry.
    let srv = Server::start(&["--access-ttl", "3"]);
    register(&srv, "alice");
    let pair = login(&srv, "alice");
    assert_eq!(pair["expires_in"], 3);
    let at = access(&pair);
    let exp = jwt_parts(&at).1["exp"].as_i64().expect("exp claim");
    assert_status(&srv.get("/api/me", Some(&at)), 200);
    // Wait (on the wall clock, which is what `exp` is about) until a full second past
    // the expiry, then the token is refused.
    while now_secs() < exp + 1 {
        sleep(Duration::from_millis(50));
    }
    assert_error(&srv.get("/api/me", Some(&at)), 401, "unauthorized");
    // The refresh token still works and gives a fresh, working access token.
    let r = refresh_resp(&srv, &refresh_tok(&pair));
    assert_status(&r, 200);
    let at2 = access(&r.json());
    assert_status(&srv.get("/api/me", Some(&at2)), 200);
}

#[test]
fn refresh_rotates_the_pair() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let p1 = login(&srv, "alice");
    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_status(&r, 200);
    let p2 = r.json();
    assert_eq!(p2["token_type"], "Bearer");
    assert_eq!(p2["expires_in"], 900);
    assert_user_shape(&p2["user"], "alice", &["admin"]);
    assert_ne!(
        refresh_tok(&p2),
        refresh_tok(&p1),
        "refresh token must rotate"
    );
    assert_ne!(access(&p2), access(&p1), "a new access token is issued");
    // Same login: the sid is kept.
    let (_, c1, _) = jwt_parts(&access(&p1));
    let (_, c2, _) = jwt_parts(&access(&p2));
    assert_eq!(c1["sid"], c2["sid"], "refresh keeps the login (sid)");
    // Both tokens work while the login lives.
    assert_status(&srv.get("/api/me", Some(&access(&p2))), 200);
    // The new refresh token can be rotated again.
    let r = refresh_resp(&srv, &refresh_tok(&p2));
    assert_status(&r, 200);
    let p3 = r.json();
    assert_status(&srv.get("/api/me", Some(&access(&p3))), 200);
}

#[test]
fn refresh_failures() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let r = refresh_resp(&srv, "no-such-token-0123456789abcdef");
    assert_error(&r, 401, "unauthorized");
    let r = refresh_resp(&srv, "");
    assert_error(&r, 401, "unauthorized");
    // An access token is not a refresh token.
    let pair = login(&srv, "alice");
    let r = refresh_resp(&srv, &access(&pair));
    assert_error(&r, 401, "unauthorized");
    // No token in the body and no cookie: 401 (the web client's cookie could have
    // stood in); a malformed body is still a bad request.
    assert_error(
        &srv.post("/api/refresh", None, &json!({})),
        401,
        "unauthorized",
    );
    let r = srv.request(
        "POST",
        "/api/refresh",
        None,
        Some(("application/json", b"{\"refresh_token\":")),
    );
    assert_error(&r, 400, "bad_request");
    // The failures above did not harm the real login.
    let r = refresh_resp(&srv, &refresh_tok(&pair));
    assert_status(&r, 200);
}

#[test]
fn expired_refresh_token_is_rejected() {
    let srv = Server::start(&["--refresh-ttl", "1"]);
    register(&srv, "alice");
    let pair = login(&srv, "alice");
    sleep(Duration::from_millis(2600));
    let r = refresh_resp(&srv, &refresh_tok(&pair));
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn refresh_reuse_revokes_the_whole_login() {
    // No grace: a retired token presented again at once is reuse (the grace has its
    // own tests in refresh_grace.rs).
    let srv = Server::start(&["--refresh-grace", "0"]);
    register(&srv, "alice");
    let p1 = login(&srv, "alice");
    // A second, independent login of the same user.
    let other = login(&srv, "alice");

    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_status(&r, 200);
    let p2 = r.json();
    assert_status(&srv.get("/api/me", Some(&access(&p2))), 200);

    // Reuse of the retired refresh token.
    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_error(&r, 401, "unauthorized");

    // The whole login is now dead: its current refresh token...
    let r = refresh_resp(&srv, &refresh_tok(&p2));
    assert_error(&r, 401, "unauthorized");
    // ...its current access token, and the older one.
    assert_error(&srv.get("/api/me", Some(&access(&p2))), 401, "unauthorized");
    assert_error(&srv.get("/api/me", Some(&access(&p1))), 401, "unauthorized");

    // The other login of the same user is untouched.
    assert_status(&srv.get("/api/me", Some(&access(&other))), 200);
    let r = refresh_resp(&srv, &refresh_tok(&other));
    assert_status(&r, 200);
    // And the user can still log in afresh.
    let fresh = login(&srv, "alice");
    assert_status(&srv.get("/api/me", Some(&access(&fresh))), 200);
}

#[test]
fn logout_revokes_the_login() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let p1 = login(&srv, "alice");
    let other = login(&srv, "alice");

    // Without a token: 401.
    assert_error(&srv.post_empty("/api/logout", None), 401, "unauthorized");
    assert_error(
        &srv.post("/api/logout", Some("garbage"), &json!({})),
        401,
        "unauthorized",
    );

    // Logout with no body.
    let r = srv.post_empty("/api/logout", Some(&access(&p1)));
    assert_status(&r, 204);
    assert!(r.body.is_empty(), "204 has no body");
    assert_error(&srv.get("/api/me", Some(&access(&p1))), 401, "unauthorized");
    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_error(&r, 401, "unauthorized");
    // Logging out again with the dead token: 401.
    assert_error(
        &srv.post_empty("/api/logout", Some(&access(&p1))),
        401,
        "unauthorized",
    );

    // The other login is untouched.
    assert_status(&srv.get("/api/me", Some(&access(&other))), 200);
}

#[test]
fn logout_with_body_revokes_that_login_of_the_same_user_only() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    register(&srv, "bob");
    let a1 = login(&srv, "alice");
    let a2 = login(&srv, "alice");
    let a3 = login(&srv, "alice");
    let b1 = login(&srv, "bob");

    // alice logs out a1, naming a2's refresh token in the body: both die.
    let r = srv.post(
        "/api/logout",
        Some(&access(&a1)),
        &json!({"refresh_token": refresh_tok(&a2)}),
    );
    assert_status(&r, 204);
    assert_error(&srv.get("/api/me", Some(&access(&a1))), 401, "unauthorized");
    assert_error(&srv.get("/api/me", Some(&access(&a2))), 401, "unauthorized");
    let r = refresh_resp(&srv, &refresh_tok(&a2));
    assert_error(&r, 401, "unauthorized");
    // a3 lives.
    assert_status(&srv.get("/api/me", Some(&access(&a3))), 200);

    // alice logs out a3 naming bob's refresh token: bob's login is not alice's to end.
    // The foreign token is ignored (a body's login is revoked only if it is the same
    // user's); the logout itself succeeds and ends alice's own login.
    let r = srv.post(
        "/api/logout",
        Some(&access(&a3)),
        &json!({"refresh_token": refresh_tok(&b1)}),
    );
    assert_status(&r, 204);
    assert_error(&srv.get("/api/me", Some(&access(&a3))), 401, "unauthorized");
    assert_error(&refresh_resp(&srv, &refresh_tok(&a3)), 401, "unauthorized");
    assert_status(&srv.get("/api/me", Some(&access(&b1))), 200);
    let r = refresh_resp(&srv, &refresh_tok(&b1));
    assert_status(&r, 200);
}

#[test]
fn unknown_routes_get_404_json() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let at = access(&login(&srv, "alice"));
    for path in ["/api/nope", "/nope", "/api/rooms/general/nope", "/api"] {
        let r = srv.get(path, Some(&at));
        assert_error(&r, 404, "not_found");
    }
    let r = srv.get("/api/does-not-exist", None);
    assert_error(&r, 404, "not_found");
}

#[test]
fn wrong_method_gets_405() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let at = access(&login(&srv, "alice"));
    let cases = [
        ("GET", "/api/register"),
        ("GET", "/api/login"),
        ("PUT", "/api/login"),
        ("GET", "/api/refresh"),
        ("GET", "/api/logout"),
        ("DELETE", "/api/me"),
        ("POST", "/api/me"),
        ("POST", "/healthz"),
    ];
    for (m, p) in cases {
        let r = srv.request(m, p, Some(&at), None);
        assert_eq!(r.status, 405, "{m} {p}: got {} {:?}", r.status, r.text());
        assert_error(&r, 405, "bad_request");
    }
}

#[test]
fn oversized_body_gets_413() {
    let srv = Server::start(&[]);
    // A syntactically valid JSON body just over 64 KiB.
    let pad = "p".repeat(64 * 1024);
    let body = format!(r#"{{"username":"alice","password":"{pad}"}}"#);
    assert!(body.len() > 64 * 1024);
    let r = srv.request(
        "POST",
        "/api/register",
        None,
        Some(("application/json", body.as_bytes())),
    );
    assert_error(&r, 413, "too_large");
    // Same on login.
    let body = format!(r#"{{"username":"alice","password":"{pad}"}}"#);
    let r = srv.request(
        "POST",
        "/api/login",
        None,
        Some(("application/json", body.as_bytes())),
    );
    assert_error(&r, 413, "too_large");
    // The server is fine afterwards, and nothing was registered.
    let u = register(&srv, "alice");
    assert_user_shape(&u, "alice", &["admin"]);
}

#[test]
fn non_json_content_type_gets_415() {
    let srv = Server::start(&[]);
    let body = serde_json::to_vec(&json!({"username": "alice", "password": PW})).unwrap();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        let r = srv.request("POST", "/api/register", None, Some((ct, &body)));
        assert_eq!(
            r.status,
            415,
            "content type {ct}: {} {:?}",
            r.status,
            r.text()
        );
        assert_error(&r, 415, "bad_request");
    }
    // application/json with a charset parameter is JSON.
    let r = srv.request(
        "POST",
        "/api/register",
        None,
        Some(("application/json; charset=utf-8", &body)),
    );
    assert_status(&r, 201);
    let r = srv.request("POST", "/api/login", None, Some(("text/plain", &body)));
    assert_error(&r, 415, "bad_request");
}

#[test]
fn healthz() {
    let srv = Server::start(&[]);
    let r = srv.get("/healthz", None);
    assert_status(&r, 200);
    assert!(
        r.is_json(),
        "healthz content type {:?}",
        r.header("content-type")
    );
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[test]
fn tokens_survive_a_restart() {
    // The signing key is generated once and kept: a token issued before a restart
    // still verifies after it, and so does its refresh token. The key never appears in
    // the server's output, even at the most verbose log level, in any usual encoding.
    // SQLite even under PARLEY_TEST_POSTGRES (`launch` on a dir): the key is searched for in the file.
    let dir = TempDir::new();
    let trace = [("RUST_LOG", "trace")];
    let mut first = Server::launch(dir.path(), &[], &trace);
    register(&first, "alice");
    let pair = login(&first, "alice");
    let (at, rt) = (access(&pair), refresh_tok(&pair));
    assert!(first.stop().success(), "first run exits 0 on SIGTERM");

    let mut srv = Server::launch(dir.path(), &[], &trace);
    let r = srv.get("/api/me", Some(&at));
    assert_status(&r, 200);
    assert_eq!(r.json()["user"]["username"], "alice");
    let r = refresh_resp(&srv, &rt);
    assert_status(&r, 200);
    assert!(srv.stop().success(), "second run exits 0 on SIGTERM");

    let key = find_signing_key(dir.path(), &at).expect("locate the signing key");
    let mut raw: Vec<u8> = Vec::new();
    for s in [&first, &srv] {
        raw.extend_from_slice(&s.stderr_raw());
        raw.extend_from_slice(s.stdout_rest().as_bytes());
    }
    let logs = String::from_utf8_lossy(&raw).into_owned();
    // With RUST_LOG=trace the server does log (its requests), so the checks below are
    // made against real, verbose output.
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "RUST_LOG=trace should give verbose logs, got:\n{logs}"
    );
    let lower_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let debug_list = format!("{key:?}");
    let debug_prefix = &debug_list[..debug_list.len() - 1];
    let mut encodings: Vec<(&str, String)> = vec![
        ("lower-case hex", lower_hex.clone()),
        ("upper-case hex", lower_hex.to_uppercase()),
        ("a Debug byte list", debug_prefix.to_string()),
    ];
    use base64::Engine;
    for (name, engine) in [
        ("base64", base64::engine::general_purpose::STANDARD),
        (
            "base64 (no padding)",
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ),
        ("base64url", base64::engine::general_purpose::URL_SAFE),
        (
            "base64url (no padding)",
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ),
    ] {
        encodings.push((name, engine.encode(&key)));
    }
    for (name, text) in &encodings {
        assert!(
            !logs.contains(text.as_str()),
            "signing key ({name}) in the logs"
        );
    }
    assert!(
        !raw.windows(key.len()).any(|w| w == key.as_slice()),
        "signing key (raw bytes) in the logs"
    );
}
