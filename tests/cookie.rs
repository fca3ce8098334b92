//! The web client's refresh cookie: login with `"cookie": true` puts the refresh token
//! in an HttpOnly, SameSite=Strict cookie scoped to /api/; refresh and logout take it
//! from there, but only with an Origin the upgrade rule accepts.

mod common;

use common::*;
use serde_json::{json, Value};

fn origin(srv: &Server) -> String {
    format!("http://127.0.0.1:{}", srv.port)
}

/// A JSON POST with extra headers.
fn post_with(srv: &Server, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    let b = body.to_string();
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    http_request(srv.port, "POST", path, &h, Some(b.as_bytes()))
}

/// The `parley_refresh` cookie a response sets: (value, attributes).
fn set_cookie(r: &Resp) -> (String, String) {
    let v = r
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie in {:?}", r.headers));
    let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
    let value = pair.strip_prefix("parley_refresh=").expect("cookie name");
    (value.to_owned(), attrs.to_owned())
}

fn cookie_login(srv: &Server) -> (String, String) {
    let r = post_with(
        srv,
        "/api/login",
        &json!({"username": "alice", "password": PW, "cookie": true}),
        &[],
    );
    assert_status(&r, 200);
    let v = r.json();
    assert!(v["access_token"].is_string(), "{v}");
    assert!(
        v.get("refresh_token").is_none(),
        "the token is only in the cookie: {v}"
    );
    let (value, attrs) = set_cookie(&r);
    for a in ["HttpOnly", "SameSite=Strict", "Path=/api/"] {
        assert!(attrs.contains(a), "{a} in {attrs}");
    }
    assert!(
        !attrs.contains("Secure"),
        "plain http: no Secure flag ({attrs})"
    );
    (access(&v), value)
}

#[test]
fn refresh_rotates_the_cookie_and_needs_an_allowed_origin() {
    let srv = Server::start(&["--refresh-grace", "0"]);
    register(&srv, "alice");
    let (_, first) = cookie_login(&srv);
    let cookie = format!("parley_refresh={first}");
    // Without an Origin, or with a foreign one: 403, and the token is not used.
    for headers in [
        vec![("Cookie", cookie.as_str())],
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", "http://evil.example"),
        ],
    ] {
        let r = post_with(&srv, "/api/refresh", &json!({}), &headers);
        assert_error(&r, 403, "forbidden");
    }
    let own = origin(&srv);
    let r = post_with(
        &srv,
        "/api/refresh",
        &json!({}),
        &[("Cookie", &cookie), ("Origin", &own)],
    );
    assert_status(&r, 200);
    let v = r.json();
    assert!(v.get("refresh_token").is_none(), "{v}");
    assert_status(&srv.get("/api/me", Some(&access(&v))), 200);
    let (second, _) = set_cookie(&r);
    assert_ne!(second, first, "rotated");
    // The first cookie is retired: presenting it again is reuse.
    let r = post_with(
        &srv,
        "/api/refresh",
        &json!({}),
        &[("Cookie", &cookie), ("Origin", &own)],
    );
    assert_error(&r, 401, "unauthorized");
    // Neither a body token nor a cookie: 401.
    let r = post_with(&srv, "/api/refresh", &json!({}), &[("Origin", &own)]);
    assert_error(&r, 401, "unauthorized");
}

#[test]
fn logout_clears_the_cookie_and_revokes_its_login() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let (at, value) = cookie_login(&srv);
    let cookie = format!("parley_refresh={value}");
    let bearer = format!("Bearer {at}");
    // Without an Origin: refused, nothing changes.
    let r = post_with(
        &srv,
        "/api/logout",
        &json!({}),
        &[("Cookie", &cookie), ("Authorization", &bearer)],
    );
    assert_error(&r, 403, "forbidden");
    assert_status(&srv.get("/api/me", Some(&at)), 200);
    let own = origin(&srv);
    let r = post_with(
        &srv,
        "/api/logout",
        &json!({}),
        &[
            ("Cookie", &cookie),
            ("Authorization", &bearer),
            ("Origin", &own),
        ],
    );
    assert_status(&r, 204);
    let (cleared, attrs) = set_cookie(&r);
    assert!(cleared.is_empty() && attrs.contains("Max-Age=0"), "{attrs}");
    assert_error(&srv.get("/api/me", Some(&at)), 401, "unauthorized");
    let r = post_with(
        &srv,
        "/api/refresh",
        &json!({}),
        &[("Cookie", &cookie), ("Origin", &own)],
    );
    assert_error(&r, 401, "unauthorized");
}
