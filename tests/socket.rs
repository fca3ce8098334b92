//! The WebSocket at `/ws`: token transports and rejections before the upgrade, join /
//! leave / presence, send / ack / fan-out, DMs, history, `since` replay, ping, bad
//! input, size limits, the socket cap, and revocation of live sockets.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

// ---------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Transport {
    Subprotocol,
    Header,
    Query,
}

const TRANSPORTS: [Transport; 3] = [Transport::Subprotocol, Transport::Header, Transport::Query];

/// The upgrade attempted by hand with `token` on `t`; returns the server's answer.
fn raw_attempt(srv: &Server, t: Transport, token: &str) -> Resp {
    match t {
        Transport::Subprotocol => {
            let v = format!("parley.v1, bearer.{token}");
            ws_handshake_raw(srv, "/ws", &[("Sec-WebSocket-Protocol", &v)])
        }
        Transport::Header => {
            let v = format!("Bearer {token}");
            ws_handshake_raw(srv, "/ws", &[("Authorization", &v)])
        }
        Transport::Query => ws_handshake_raw(srv, &format!("/ws?access_token={token}"), &[]),
    }
}

/// Asserts `token` is refused with 401 (JSON error, no upgrade) on every transport.
#[track_caller]
fn assert_rejected_everywhere(srv: &Server, token: &str, what: &str) {
    for t in TRANSPORTS {
        let r = raw_attempt(srv, t, token);
        assert_eq!(
            r.status,
            401,
            "{what} via {t:?}: expected 401, got {} {:?}",
            r.status,
            r.text()
        );
        assert_ws_rejected(&r, 401, "unauthorized");
    }
}

fn connect_via(srv: &Server, t: Transport, token: &str) -> Result<Ws, tungstenite::Error> {
    let req = match t {
        Transport::Subprotocol => with_header(
            ws_request(srv, "/ws"),
            "Sec-WebSocket-Protocol",
            &format!("parley.v1, bearer.{token}"),
        ),
        Transport::Header => with_header(
            ws_request(srv, "/ws"),
            "Authorization",
            &format!("Bearer {token}"),
        ),
        Transport::Query => ws_request(srv, &format!("/ws?access_token={token}")),
    };
    Ws::try_connect(srv, req)
}

/// Asserts a socket `error` frame with `code` and the echoed `ref`.
#[track_caller]
fn assert_ws_error(v: &Value, code: &str, r: Option<&str>) {
    assert_eq!(v["type"], "error", "expected an error frame, got {v}");
    assert_eq!(v["code"], code, "wrong error code in {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message should be a non-empty string: {v}"
    );
    match r {
        Some(r) => assert_eq!(v["ref"], r, "ref not echoed in {v}"),
        None => assert!(v["ref"].is_null(), "ref should be null in {v}"),
    }
}

/// The documented fields of a Message / DM (socket events carry `type` too, and
/// either may carry added fields).
fn strip_type(v: &Value) -> Value {
    let keys: &[&str] = if v.get("to").is_some() {
        &["id", "from", "to", "body", "ts"]
    } else {
        &["id", "room", "from", "body", "ts"]
    };
    let mut out = serde_json::Map::new();
    for k in keys {
        out.insert(k.to_string(), v[*k].clone());
    }
    Value::Object(out)
}

fn strip_all(v: &Value) -> Value {
    Value::Array(
        v.as_array()
            .expect("array")
            .iter()
            .map(strip_type)
            .collect(),
    )
}

fn set_of(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

fn names(n: &[&str]) -> BTreeSet<String> {
    n.iter().map(|s| s.to_string()).collect()
}

/// Asserts that `v` has every field of `want` with that value (extra fields are
/// allowed: clients must ignore fields they do not know).
#[track_caller]
fn assert_fields(v: &Value, want: &Value) {
    for (k, w) in want.as_object().unwrap() {
        assert_eq!(&v[k], w, "field {k:?} of {v}, expected {want}");
    }
}

#[track_caller]
fn assert_presence(v: &Value, user: &str, room: &str, status: &str) {
    assert_fields(
        v,
        &json!({"type": "presence", "user": user, "room": room, "status": status}),
    );
}

/// A `pong` reply; `ref` echoes the ping's (null when absent).
#[track_caller]
fn assert_pong(v: &Value, r: Option<&str>) {
    assert_eq!(v["type"], "pong", "expected pong, got {v}");
    assert_eq!(
        v["ref"],
        r.map_or(Value::Null, |r| json!(r)),
        "pong ref in {v}"
    );
}

// ---------------------------------------------------------------------------------
// token transports
// ---------------------------------------------------------------------------------

#[test]
fn transport_subprotocol_answers_exactly_parley_v1() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = connect_via(&srv, Transport::Subprotocol, &at).expect("upgrade");
    let proto = ws
        .response
        .headers()
        .get("sec-websocket-protocol")
        .expect("server must answer a subprotocol")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        proto, "parley.v1",
        "answer exactly parley.v1, never the token"
    );
    for (name, value) in ws.response.headers() {
        let value = value.to_str().unwrap_or("");
        assert!(
            !value.contains(&at),
            "the token is echoed in response header {name}"
        );
    }
    ws.ping();
    let j = ws.join("general");
    assert_eq!(set_of(&j["online"]), names(&["alice"]));
}

#[test]
fn transport_authorization_header() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = connect_via(&srv, Transport::Header, &at).expect("upgrade");
    assert!(
        ws.response
            .headers()
            .get("sec-websocket-protocol")
            .is_none(),
        "no subprotocol was offered, so none may be answered"
    );
    ws.ping();
    ws.join("general");
    let (m, _) = ws.send_msg("general", "via header");
    assert_eq!(m["from"], "alice");
}

#[test]
fn transport_query_parameter_and_not_logged() {
    let mut srv = Server::start_env(&[], &[("RUST_LOG", "trace")]);
    let at = new_user(&srv, "alice");
    let mut ws = connect_via(&srv, Transport::Query, &at).expect("upgrade");
    ws.ping();
    ws.join("general");
    let (m, _) = ws.send_msg("general", "via query");
    assert_eq!(m["from"], "alice");
    ws.close();
    // A rejected query token is not logged either.
    let bad = format!("{at}x");
    assert_rejected_everywhere(&srv, &bad, "tampered signature");
    // Stop the server and read its output to the end: every line it logged is in.
    assert!(srv.stop().success());
    let logs = srv.stderr_log() + &srv.stdout_rest();
    assert!(
        logs.contains("DEBUG") || logs.contains("TRACE"),
        "RUST_LOG=trace should give verbose logs (else this check proves nothing):\n{logs}"
    );
    let sig = at.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(sig),
        "an access token (its signature) appears in the server's output"
    );
}

#[test]
fn a_bad_token_is_not_passed_over_for_a_later_one() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    // Bad subprotocol token, good Authorization header.
    let sub = "parley.v1, bearer.garbage";
    let auth = format!("Bearer {at}");
    let r = ws_handshake_raw(
        &srv,
        "/ws",
        &[("Sec-WebSocket-Protocol", sub), ("Authorization", &auth)],
    );
    assert_ws_rejected(&r, 401, "unauthorized");
    // Bad subprotocol token, good query token.
    let r = ws_handshake_raw(
        &srv,
        &format!("/ws?access_token={at}"),
        &[("Sec-WebSocket-Protocol", sub)],
    );
    assert_ws_rejected(&r, 401, "unauthorized");
    // Bad Authorization header, good query token.
    let r = ws_handshake_raw(
        &srv,
        &format!("/ws?access_token={at}"),
        &[("Authorization", "Bearer garbage")],
    );
    assert_ws_rejected(&r, 401, "unauthorized");
    // And the good ones do work in the same combinations when the earlier is good.
    let good_sub = format!("parley.v1, bearer.{at}");
    let r = ws_handshake_raw(
        &srv,
        "/ws?access_token=garbage",
        &[("Sec-WebSocket-Protocol", &good_sub)],
    );
    assert_eq!(
        r.status,
        101,
        "a good subprotocol token wins over a later bad query token: {} {:?}",
        r.status,
        r.text()
    );
}

// ---------------------------------------------------------------------------------
// rejections before the upgrade
// ---------------------------------------------------------------------------------

#[test]
fn concurrent_upgrades_are_all_answered() {
    // Many clients connecting at the same moment (a room reconnecting after a network
    // blip): every upgrade is answered, none waits for another socket to close.
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let n = 16;
    let barrier = std::sync::Barrier::new(n);
    let (srv_ref, at_ref, barrier_ref) = (&srv, &at, &barrier);
    let results: Vec<Result<Ws, String>> = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(move || {
                    barrier_ref.wait();
                    Ws::connect_port(srv_ref.port, at_ref).map_err(|e| format!("{e:?}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {n} simultaneous upgrades failed: {failed:?}",
        failed.len()
    );
    for ws in results.into_iter().map(Result::unwrap) {
        let mut ws = ws;
        ws.ping();
    }
}

#[test]
fn rejects_missing_token() {
    let srv = Server::start(&[]);
    new_user(&srv, "alice");
    let r = ws_handshake_raw(&srv, "/ws", &[]);
    assert_ws_rejected(&r, 401, "unauthorized");
    // Only the protocol, no bearer entry.
    let r = ws_handshake_raw(&srv, "/ws", &[("Sec-WebSocket-Protocol", "parley.v1")]);
    assert_ws_rejected(&r, 401, "unauthorized");
    // Empty query parameter.
    let r = ws_handshake_raw(&srv, "/ws?access_token=", &[]);
    assert_ws_rejected(&r, 401, "unauthorized");
    // A real WebSocket client gets an HTTP error, not a socket.
    match Ws::try_connect(&srv, ws_request(&srv, "/ws")) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        Err(e) => panic!("expected HTTP 401, got {e:?}"),
        Ok(_) => panic!("upgrade without a token must fail"),
    }
}

#[test]
fn rejects_garbage_tokens() {
    let srv = Server::start(&[]);
    new_user(&srv, "alice");
    for tok in ["garbage", "a.b.c", "x.y", "e30.e30.e30", "....", "bearer"] {
        assert_rejected_everywhere(&srv, tok, tok);
    }
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", "Bearer")]);
    assert_ws_rejected(&r, 401, "unauthorized");
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", "Basic YWxpY2U6cHc=")]);
    assert_ws_rejected(&r, 401, "unauthorized");
}

#[test]
fn rejects_tampered_tokens() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    register(&srv, "bob");
    let (h, p, sig) = jwt_parts(&at);
    let enc = |h: &Value, p: &Value, sig: &str| {
        format!(
            "{}.{}.{}",
            b64url(&serde_json::to_vec(h).unwrap()),
            b64url(&serde_json::to_vec(p).unwrap()),
            sig
        )
    };
    // Someone else's identity with the old signature.
    let mut p2 = p.clone();
    p2["sub"] = json!("2");
    p2["name"] = json!("bob");
    assert_rejected_everywhere(&srv, &enc(&h, &p2, &sig), "sub changed");
    // A longer life.
    let mut p3 = p.clone();
    p3["exp"] = json!(p["exp"].as_i64().unwrap() + 86400);
    assert_rejected_everywhere(&srv, &enc(&h, &p3, &sig), "exp changed");
    // Signature flipped.
    let mut bad_sig = b64url_decode(&sig);
    bad_sig[0] ^= 1;
    assert_rejected_everywhere(&srv, &enc(&h, &p, &b64url(&bad_sig)), "signature changed");
    // Signature removed.
    let parts: Vec<&str> = at.split('.').collect();
    assert_rejected_everywhere(&srv, &format!("{}.{}.", parts[0], parts[1]), "no signature");
    // The untouched token still works (the rejections were about the tampering).
    let mut ws = connect_via(&srv, Transport::Header, &at).expect("real token");
    ws.ping();
}

fn custom_claims(p: &Value) -> Value {
    json!({"name": p["name"], "roles": p["roles"], "sid": p["sid"]})
}

#[test]
fn rejects_wrong_key_and_other_algorithms() {
    use jwt_simple::prelude::{
        Claims, ECDSAP256KeyPairLike, ES256KeyPair, HS256Key, HS512Key, MACLike,
    };
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let (h, p, _) = jwt_parts(&at);
    let sub = p["sub"].as_str().unwrap().to_string();
    let claims = || {
        Claims::with_custom_claims(
            custom_claims(&p),
            jwt_simple::prelude::Duration::from_secs(600),
        )
        .with_subject(&sub)
    };

    // HS256 with another key (jwt-simple).
    let other = HS256Key::generate();
    let t = other.authenticate(claims()).unwrap();
    assert_rejected_everywhere(&srv, &t, "HS256 signed with another key");
    // HS256 with another key, the real header and payload (hand-made).
    let t = forge_hmac("HS256", b"0123456789abcdef0123456789abcdef", &h, &p);
    assert_rejected_everywhere(&srv, &t, "HS256 hand-made with another key");
    // HS512.
    let t = HS512Key::generate().authenticate(claims()).unwrap();
    assert_rejected_everywhere(&srv, &t, "HS512");
    // ES256.
    let t = ES256KeyPair::generate().sign(claims()).unwrap();
    assert_rejected_everywhere(&srv, &t, "ES256");
    // alg none, with and without a signature segment.
    assert_rejected_everywhere(&srv, &forge_none(&p), "alg none");
    let t = format!("{}sig", forge_none(&p));
    assert_rejected_everywhere(&srv, &t, "alg none with junk signature");
    for alg in ["None", "NONE", "nOnE"] {
        let t = format!(
            "{}.{}.",
            b64url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes()),
            b64url(&serde_json::to_vec(&p).unwrap())
        );
        assert_rejected_everywhere(&srv, &t, alg);
    }
}

#[test]
fn rejects_other_algorithms_signed_with_the_real_key() {
    // The real key is located in the database (or the file beside it) by checking
    // which stored value reproduces the real token's signature. With it, a forged
    // HS256 token is accepted (control), while HS384 / HS512 made with the very same
    // key, alg none and an expired HS256 token are refused.
    // SQLite even under PARLEY_TEST_POSTGRES: the key is searched for in the file.
    let srv = Server::start_sqlite(&[]);
    let at = new_user(&srv, "alice");
    let key = find_signing_key(&srv.dir, &at)
        .expect("could not locate the HS256 signing key in the database or beside it");
    let (h, p, _) = jwt_parts(&at);

    let mut p_new = p.clone();
    p_new["jti"] = json!(format!("forged-{}", unique()));
    let control = forge_hmac("HS256", &key, &h, &p_new);
    let mut ws = connect_via(&srv, Transport::Header, &control)
        .expect("control: HS256 with the real key must be accepted");
    ws.ping();
    ws.close();

    for alg in ["HS384", "HS512"] {
        let mut hh = h.clone();
        hh["alg"] = json!(alg);
        let t = forge_hmac(alg, &key, &hh, &p);
        assert_rejected_everywhere(&srv, &t, &format!("{alg} signed with the real key"));
    }
    // Header says HS512 but the signature is HS256 with the real key.
    let mut hh = h.clone();
    hh["alg"] = json!("HS512");
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&hh).unwrap()),
        b64url(&serde_json::to_vec(&p).unwrap())
    );
    let t = format!(
        "{signing_input}.{}",
        b64url(&hmac("HS256", &key, signing_input.as_bytes()))
    );
    assert_rejected_everywhere(&srv, &t, "alg HS512 with an HS256 signature");
    // Expired an hour ago, correctly signed.
    let mut p_old = p.clone();
    p_old["iat"] = json!(now_secs() - 7200);
    p_old["exp"] = json!(now_secs() - 3600);
    let t = forge_hmac("HS256", &key, &h, &p_old);
    assert_rejected_everywhere(&srv, &t, "expired an hour ago");
    // Correctly signed but claiming a login (sid) that does not exist.
    let mut p_sid = p.clone();
    p_sid["sid"] = if p["sid"].is_number() {
        json!(999_999)
    } else {
        json!("no-such-login")
    };
    let t = forge_hmac("HS256", &key, &h, &p_sid);
    assert_rejected_everywhere(&srv, &t, "unknown sid");
}

#[test]
fn rejects_expired_token() {
    let srv = Server::start(&["--access-ttl", "1"]);
    let at = new_user(&srv, "alice");
    // Past the token's `exp` (whole seconds, wall clock) by a full second.
    let exp = jwt_parts(&at).1["exp"].as_i64().expect("exp claim");
    while now_secs() < exp + 1 {
        thread::sleep(Duration::from_millis(50));
    }
    assert_rejected_everywhere(&srv, &at, "expired (ttl 1 s)");
}

#[test]
fn rejects_revoked_token() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let pair = login(&srv, "alice");
    let at = access(&pair);
    let mut ws = connect_via(&srv, Transport::Header, &at).expect("before logout");
    ws.ping();
    drop(ws);
    let r = srv.post_empty("/api/logout", Some(&at));
    assert_status(&r, 204);
    assert_rejected_everywhere(&srv, &at, "revoked by logout");
}

// ---------------------------------------------------------------------------------
// join, leave, presence
// ---------------------------------------------------------------------------------

#[test]
fn the_online_list_is_sorted_and_counts_each_user_once() {
    // More than 20 names, joined out of order: the server sorts them itself.
    let srv = Server::start(&["--login-rate", "0"]);
    let mut order: Vec<String> = (0..24)
        .map(|i| format!("user{:02}", (i * 7) % 24))
        .collect();
    let mut sockets = Vec::new();
    for name in &order {
        let token = new_user(&srv, name);
        let mut ws = Ws::connect(&srv, &token);
        ws.join("general");
        sockets.push(ws);
    }
    // A second socket of one user adds no second entry.
    let again = access(&login(&srv, &order[0]));
    let mut last = Ws::connect(&srv, &again);
    let joined = last.join("general");
    order.sort();
    let got: Vec<String> = joined["online"]
        .as_array()
        .expect("online array")
        .iter()
        .map(|v| v.as_str().expect("a name").to_string())
        .collect();
    assert_eq!(got, order);
}

#[test]
fn join_lists_online_users_and_announces_presence() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    let ja = a.join("general");
    assert_eq!(ja["type"], "joined");
    assert_eq!(set_of(&ja["online"]), names(&["alice"]));

    let mut b = Ws::connect(&srv, &bob);
    b.send(&json!({"type": "join", "room": "general"}));
    let jb = b.recv();
    assert_eq!(jb["type"], "joined", "{jb}");
    assert_eq!(jb["room"], "general");
    assert_eq!(set_of(&jb["online"]), names(&["alice", "bob"]));
    assert_presence(&a.recv(), "bob", "general", "online");
    // bob does not get a presence event about himself.
    b.ping();

    // Leave: reply `left`; alice sees bob go offline.
    b.send(&json!({"type": "leave", "room": "general"}));
    let l = b.recv();
    // `left` names the room it answers.
    assert_eq!(l["type"], "left", "{l}");
    assert_eq!(l["room"], "general", "{l}");
    assert_presence(&a.recv(), "bob", "general", "offline");
    a.ping();
    b.ping();

    // Disconnecting also counts as leaving.
    b.join("general");
    assert_presence(&a.recv(), "bob", "general", "online");
    drop(b);
    assert_presence(&a.recv(), "bob", "general", "offline");
    a.ping();
}

#[test]
fn presence_is_per_user_not_per_socket() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let mut b1 = Ws::connect(&srv, &bob);
    let mut b2 = Ws::connect(&srv, &bob);
    b1.join("general");
    assert_presence(&a.recv(), "bob", "general", "online");
    let j2 = b2.join("general");
    assert_eq!(set_of(&j2["online"]), names(&["alice", "bob"]));
    // bob's second socket: no new presence for alice, nor for bob's first socket.
    a.ping();
    b1.ping();
    // bob's second socket leaves: bob is still online through the first.
    b2.send(&json!({"type": "leave", "room": "general"}));
    assert_eq!(b2.recv()["type"], "left");
    a.ping();
    // A disconnect of a socket that is not in the room changes nothing either.
    drop(b2);
    a.ping();
    // The last socket leaves: offline.
    drop(b1);
    assert_presence(&a.recv(), "bob", "general", "offline");
    a.ping();
}

#[test]
fn join_and_history_errors() {
    // Claim: joining or reading an unknown room is not_found; sending to a room not
    // joined is bad_request and to an unknown room not_found (as docs/socket.md says),
    // the socket stays open, and none of the refused sends is ever stored.
    // SQLite even under PARLEY_TEST_POSTGRES: it reads the stored bodies from the file.
    let srv = Server::start_sqlite(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.send(&json!({"type": "join", "room": "nosuchroom", "ref": "j1"}));
    assert_ws_error(&ws.recv(), "not_found", Some("j1"));
    ws.ping();
    ws.send(&json!({"type": "history", "room": "nosuchroom", "ref": "h1"}));
    assert_ws_error(&ws.recv(), "not_found", Some("h1"));
    ws.ping();
    // Sending to a room not joined.
    ws.send(&json!({"type": "send", "room": "general", "body": "sneaky", "ref": "s1"}));
    assert_ws_error(&ws.recv(), "bad_request", Some("s1"));
    ws.ping();
    // Sending to a room that does not exist.
    ws.send(&json!({"type": "send", "room": "nosuchroom", "body": "sneaky", "ref": "s2"}));
    assert_ws_error(&ws.recv(), "not_found", Some("s2"));
    ws.ping();
    // After leaving, sending is refused again.
    ws.join("general");
    ws.send(&json!({"type": "leave", "room": "general"}));
    assert_eq!(ws.recv()["type"], "left");
    ws.send(&json!({"type": "send", "room": "general", "body": "sneaky", "ref": "s3"}));
    assert_ws_error(&ws.recv(), "bad_request", Some("s3"));
    ws.ping();
    // One accepted send after the refused ones: once it is acked, anything queued
    // before it would have been written too. The file holds exactly that one message.
    ws.join("general");
    let (_, id) = ws.send_msg("general", "the only one");
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    assert_status(&r, 200);
    assert_eq!(ids_of(&r.json()["messages"]), vec![id]);
    let bodies: Vec<String> = open_db(&srv.db_path())
        .prepare("SELECT body FROM messages")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(bodies, vec!["the only one"], "refused sends are not stored");
}

// ---------------------------------------------------------------------------------
// send, fan-out, dm
// ---------------------------------------------------------------------------------

#[test]
fn send_reaches_every_room_socket_then_acks() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let carol = new_user(&srv, "carol");
    let mut a = Ws::connect(&srv, &alice);
    let mut b = Ws::connect(&srv, &bob);
    let mut c = Ws::connect(&srv, &carol);
    a.join("general");
    b.join("general");
    assert_presence(&a.recv(), "bob", "general", "online");

    a.send(&json!({"type": "send", "room": "general", "body": "hello, world", "ref": "x1"}));
    let m = a.recv();
    assert_eq!(m["type"], "message", "sender gets the message first: {m}");
    let id = m["id"].as_i64().expect("id");
    assert_eq!(m["room"], "general");
    assert_eq!(m["from"], "alice");
    assert_eq!(m["body"], "hello, world");
    assert!(is_rfc3339(m["ts"].as_str().expect("ts")), "{m}");
    let ack = a.recv();
    assert_fields(&ack, &json!({"type": "ack", "ref": "x1", "id": id}));
    assert_eq!(b.recv(), m, "bob gets the same message");
    // carol is not in the room: nothing for her.
    c.ping();

    // No ref: the ack carries ref null.
    a.send(&json!({"type": "send", "room": "general", "body": "no ref"}));
    let m2 = a.recv();
    assert_eq!(m2["type"], "message");
    let ack2 = a.recv();
    assert_eq!(ack2["type"], "ack");
    assert!(ack2["ref"].is_null(), "absent ref echoes as null: {ack2}");
    assert_eq!(ack2["id"], m2["id"]);
    assert!(m2["id"].as_i64().unwrap() > id);
    assert_eq!(b.recv(), m2);

    // bob answers; alice gets it.
    let (mb, _) = b.send_msg("general", "hi alice");
    assert_eq!(a.recv(), mb);
    c.ping();

    // Everything is in the stored history (the same objects, without `type`).
    let r = srv.get("/api/rooms/general/messages", Some(&carol));
    let stored = r.json()["messages"].clone();
    assert_eq!(
        stored,
        json!([strip_type(&m), strip_type(&m2), strip_type(&mb)])
    );
}

#[test]
fn fan_out_to_twenty_sockets() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut socks: Vec<Ws> = Vec::new();
    for i in 0..20 {
        let t = if i < 10 { &alice } else { &bob };
        let mut ws = Ws::connect(&srv, t);
        ws.join("general");
        socks.push(ws);
    }
    let n = 5;
    let mut sent = Vec::new();
    for i in 0..n {
        let (m, _) = socks[0].send_msg("general", &format!("fan {i}"));
        sent.push(m);
    }
    for (k, ws) in socks.iter_mut().enumerate().skip(1) {
        for m in &sent {
            let got = ws.recv_skipping(&["presence"]);
            assert_eq!(&got, m, "socket {k}");
        }
    }
    for ws in socks.iter_mut() {
        ws.ping();
    }
}

#[test]
fn one_user_with_several_sockets() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a1 = Ws::connect(&srv, &alice);
    let mut a2 = Ws::connect(&srv, &alice);
    let mut a3 = Ws::connect(&srv, &alice);
    a1.join("general");
    a2.join("general");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    assert_presence(&a1.recv(), "bob", "general", "online");
    assert_presence(&a2.recv(), "bob", "general", "online");
    // bob's message reaches alice's two joined sockets, not the third.
    let (m, _) = b.send_msg("general", "to all of alice's joined sockets");
    assert_eq!(a1.recv(), m);
    assert_eq!(a2.recv(), m);
    a3.ping();
    // A message from a1 reaches a2 (the same user's other socket) and bob.
    let (m, _) = a1.send_msg("general", "from a1");
    assert_eq!(a2.recv(), m);
    assert_eq!(b.recv(), m);
    a3.ping();
}

#[test]
fn live_messages_arrive_in_id_order_on_every_socket() {
    // Resuming with "the last id it saw" loses nothing only if every socket sees ids
    // in increasing order, also when several people send at once.
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut receivers: Vec<Ws> = (0..3)
        .map(|_| {
            let mut w = Ws::connect(&srv, &bob);
            w.join("general");
            w
        })
        .collect();
    let (srv_ref, alice_ref) = (&srv, &alice);
    let mut sent: Vec<i64> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|k| {
                s.spawn(move || {
                    let mut ws = Ws::connect(srv_ref, alice_ref);
                    ws.join("general");
                    (0..12)
                        .map(|i| ws.send_msg("general", &format!("c{k}-{i}")).1)
                        .collect::<Vec<i64>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    sent.sort();
    for (k, r) in receivers.iter_mut().enumerate() {
        let got: Vec<i64> = (0..sent.len())
            .map(|_| {
                let m = r.recv_skipping(&["presence"]);
                assert_eq!(m["type"], "message", "{m}");
                m["id"].as_i64().unwrap()
            })
            .collect();
        assert_eq!(got, sent, "receiver {k}: every message once, in id order");
        // Nothing more (no duplicates) before the pong; presence may interleave.
        r.send(&json!({"type": "ping"}));
        assert_pong(&r.recv_skipping(&["presence"]), None);
    }
}

#[test]
fn dm_reaches_every_socket_of_both_users() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let carol = new_user(&srv, "carol");
    let mut a1 = Ws::connect(&srv, &alice);
    let mut a2 = Ws::connect(&srv, &alice);
    let mut b1 = Ws::connect(&srv, &bob);
    let mut b2 = Ws::connect(&srv, &bob);
    let mut b3 = Ws::connect(&srv, &bob);
    let mut c = Ws::connect(&srv, &carol);

    a1.send(&json!({"type": "dm", "to": "bob", "body": "psst", "ref": "d1"}));
    let d = a1.recv();
    assert_eq!(d["type"], "dm", "{d}");
    let id = d["id"].as_i64().expect("id");
    assert_eq!(d["from"], "alice");
    assert_eq!(d["to"], "bob");
    assert_eq!(d["body"], "psst");
    assert!(is_rfc3339(d["ts"].as_str().expect("ts")), "{d}");
    assert_fields(&a1.recv(), &json!({"type": "ack", "ref": "d1", "id": id}));
    for (k, ws) in [&mut a2, &mut b1, &mut b2, &mut b3].into_iter().enumerate() {
        assert_eq!(ws.recv(), d, "socket {k}");
    }
    c.ping();

    // bob answers from his second socket.
    b2.send(&json!({"type": "dm", "to": "alice", "body": "what?", "ref": "d2"}));
    let d2 = b2.recv();
    assert_eq!(d2["type"], "dm");
    assert_eq!(d2["from"], "bob");
    assert_eq!(d2["to"], "alice");
    let ack = b2.recv();
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["ref"], "d2");
    assert_eq!(ack["id"], d2["id"]);
    for ws in [&mut a1, &mut a2, &mut b1, &mut b3] {
        assert_eq!(ws.recv(), d2);
    }
    c.ping();

    // Stored: visible through REST to both.
    let r = srv.get("/api/dms/bob", Some(&alice));
    assert_status(&r, 200);
    let stored = strip_all(&r.json()["messages"]);
    assert_eq!(stored, json!([strip_type(&d), strip_type(&d2)]));
}

#[test]
fn dm_errors() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.send(&json!({"type": "dm", "to": "ghost", "body": "boo", "ref": "g1"}));
    assert_ws_error(&a.recv(), "not_found", Some("g1"));
    a.ping();
    register(&srv, "bob");
    a.send(&json!({"type": "dm", "to": "bob", "body": "x".repeat(4001), "ref": "g2"}));
    assert_ws_error(&a.recv(), "too_large", Some("g2"));
    a.ping();
    a.send(&json!({"type": "dm", "to": "bob", "body": "", "ref": "g3"}));
    assert_ws_error(&a.recv(), "bad_request", Some("g3"));
    a.ping();
    let r = srv.get("/api/dms/bob", Some(&alice));
    assert_eq!(
        r.json()["messages"],
        json!([]),
        "refused DMs are not stored"
    );
}

// ---------------------------------------------------------------------------------
// history and since-replay
// ---------------------------------------------------------------------------------

#[test]
fn history_over_the_socket() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let ids = post_messages(&srv, &at, "general", 8, "h");
    let mut ws = Ws::connect(&srv, &at);
    // Not joined: history still works.
    let mut hist = |q: Value| -> Vec<i64> {
        let mut req = json!({"type": "history", "room": "general"});
        for (k, v) in q.as_object().unwrap() {
            req[k] = v.clone();
        }
        ws.send(&req);
        let v = ws.recv();
        assert_eq!(v["type"], "history", "{v}");
        assert_eq!(v["room"], "general", "{v}");
        ids_of(&v["messages"])
    };
    assert_eq!(hist(json!({})), ids);
    assert_eq!(hist(json!({"limit": 3})), ids[5..8]);
    assert_eq!(hist(json!({"before": ids[4], "limit": 2})), ids[2..4]);
    assert_eq!(hist(json!({"after": ids[4]})), ids[5..8]);
    assert_eq!(
        hist(json!({"after": ids[0], "before": ids[7], "limit": 2})),
        ids[1..3]
    );
    assert_eq!(hist(json!({"limit": 0})), ids[7..8]);
    assert_eq!(hist(json!({"limit": 100000})), ids);
    // Full message objects, equal to REST's.
    ws.send(&json!({"type": "history", "room": "general"}));
    let v = ws.recv();
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    assert_eq!(v["messages"], r.json()["messages"]);
    ws.ping();
}

#[test]
fn join_since_replays_missed_messages_before_live_ones() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let ids = post_messages(&srv, &alice, "general", 4, "old");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");

    let mut b = Ws::connect(&srv, &bob);
    b.send(&json!({"type": "join", "room": "general", "since": ids[1]}));
    let j = b.recv();
    assert_eq!(j["type"], "joined", "{j}");
    assert_eq!(set_of(&j["online"]), names(&["alice", "bob"]));
    for (k, want) in ids[2..].iter().enumerate() {
        let m = b.recv();
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["id"], *want);
        assert_eq!(m["body"], format!("old{}", k + 2));
        assert_eq!(m["room"], "general");
        assert_eq!(m["from"], "alice");
    }
    // Then live ones.
    assert_presence(&a.recv(), "bob", "general", "online");
    let (live, live_id) = a.send_msg("general", "live");
    assert!(live_id > ids[3]);
    assert_eq!(b.recv(), live);
    b.ping();

    // since = 0 replays everything; since = newest replays nothing.
    let mut c = Ws::connect(&srv, &bob);
    c.send(&json!({"type": "join", "room": "general", "since": 0}));
    assert_eq!(c.recv()["type"], "joined");
    let mut all = ids.clone();
    all.push(live_id);
    for want in &all {
        let m = c.recv();
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["id"], *want);
    }
    c.ping();
    let mut d = Ws::connect(&srv, &bob);
    d.send(&json!({"type": "join", "room": "general", "since": live_id}));
    assert_eq!(d.recv()["type"], "joined");
    d.ping();
}

#[test]
fn since_replay_is_not_capped_at_a_page() {
    let srv = Server::start(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let ids = post_messages(&srv, &alice, "general", 230, "m");
    let mut b = Ws::connect(&srv, &bob);
    b.send(&json!({"type": "join", "room": "general", "since": ids[0]}));
    assert_eq!(b.recv()["type"], "joined");
    for want in &ids[1..] {
        let m = b.recv();
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["id"], *want, "replay must be complete and in order");
    }
    b.ping();
}

#[test]
fn reconnect_with_since_loses_nothing_under_concurrent_sends() {
    // SQLite even under PARLEY_TEST_POSTGRES: it polls the message count in the file.
    let srv = Server::start_sqlite(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let first = post_messages(&srv, &alice, "general", 3, "pre");

    // bob is in the room, sees the first messages, then drops off.
    {
        let mut b = Ws::connect(&srv, &bob);
        b.send(&json!({"type": "join", "room": "general", "since": 0}));
        assert_eq!(b.recv()["type"], "joined");
        for want in &first {
            assert_eq!(b.recv()["id"], *want);
        }
    }
    let last_seen = *first.last().unwrap();

    // alice keeps sending while bob reconnects.
    let srv_ref = &srv;
    let (sent, seen) = thread::scope(|s| {
        let sender = s.spawn(|| post_messages(srv_ref, &alice, "general", 45, "during"));
        // Let some of them land while bob is away.
        wait_until(
            Duration::from_secs(10),
            "messages sent while bob is away",
            || stored_message_count(&srv_ref.db_path()) > first.len() as i64,
        );
        let mut b = Ws::connect(&srv, &bob);
        b.send(&json!({"type": "join", "room": "general", "since": last_seen}));
        let j = b.recv();
        assert_eq!(j["type"], "joined", "{j}");
        let sent = sender.join().unwrap();
        let last = *sent.last().unwrap();
        let mut seen = Vec::new();
        loop {
            let m = b.recv_skipping(&["presence"]);
            assert_eq!(m["type"], "message", "{m}");
            let id = m["id"].as_i64().unwrap();
            seen.push(id);
            if id == last {
                break;
            }
        }
        (sent, seen)
    });
    assert_eq!(
        seen, sent,
        "after reconnecting with since, every message arrives exactly once, in order"
    );
}

// ---------------------------------------------------------------------------------
// ping, bad input, limits
// ---------------------------------------------------------------------------------

#[test]
fn ping_pong() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    for _ in 0..3 {
        ws.send(&json!({"type": "ping"}));
        assert_pong(&ws.recv(), None);
    }
    ws.send(&json!({"type": "ping", "ref": "p1"}));
    assert_pong(&ws.recv(), Some("p1"));
    // A WebSocket-level ping is answered with a pong frame too.
    ws.ws.send(Message::Ping(vec![1u8, 2, 3].into())).unwrap();
    match ws.ws.read() {
        Ok(Message::Pong(p)) => assert_eq!(&p[..], &[1u8, 2, 3], "pong echoes the payload"),
        other => panic!("expected a pong frame (RFC 6455 5.5.2), got {other:?}"),
    }
}

#[test]
fn bad_input_gets_errors_and_the_socket_keeps_working() {
    // 50-odd frames in a burst: the per-socket rate limit is not what is tested here.
    let srv = Server::start(&["--msg-rate", "0"]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.join("general");
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{not json".into(), "bad_request", None),
        ("".into(), "bad_request", None),
        ("[1, 2]".into(), "bad_request", None),
        ("\"ping\"".into(), "bad_request", None),
        ("null".into(), "bad_request", None),
        (
            r#"{"type":"dance","ref":"u1"}"#.into(),
            "bad_request",
            Some("u1"),
        ),
        (r#"{"ref":"u2"}"#.into(), "bad_request", Some("u2")),
        (r#"{"type":5,"ref":"u3"}"#.into(), "bad_request", Some("u3")),
        (
            r#"{"type":"send","room":"general","ref":"m1"}"#.into(),
            "bad_request",
            Some("m1"),
        ),
        (
            r#"{"type":"send","body":"x","ref":"m2"}"#.into(),
            "bad_request",
            Some("m2"),
        ),
        (
            r#"{"type":"join","ref":"m3"}"#.into(),
            "bad_request",
            Some("m3"),
        ),
        (
            r#"{"type":"dm","body":"x","ref":"m4"}"#.into(),
            "bad_request",
            Some("m4"),
        ),
        (
            r#"{"type":"dm","to":"alice","ref":"m5"}"#.into(),
            "bad_request",
            Some("m5"),
        ),
        (
            r#"{"type":"history","ref":"m6"}"#.into(),
            "bad_request",
            Some("m6"),
        ),
        (
            r#"{"type":"send","room":"general","body":42,"ref":"w1"}"#.into(),
            "bad_request",
            Some("w1"),
        ),
        (
            r#"{"type":"send","room":["general"],"body":"x","ref":"w2"}"#.into(),
            "bad_request",
            Some("w2"),
        ),
        (
            r#"{"type":"join","room":5,"ref":"w3"}"#.into(),
            "bad_request",
            Some("w3"),
        ),
        (
            r#"{"type":"history","room":"general","limit":"ten","ref":"w4"}"#.into(),
            "bad_request",
            Some("w4"),
        ),
        (
            r#"{"type":"join","room":"general","since":"abc","ref":"w5"}"#.into(),
            "bad_request",
            Some("w5"),
        ),
        (
            r#"{"type":"dm","to":7,"body":"x","ref":"w6"}"#.into(),
            "bad_request",
            Some("w6"),
        ),
        (
            r#"{"type":"send","room":"general","body":null,"ref":"w7"}"#.into(),
            "bad_request",
            Some("w7"),
        ),
        (
            r#"{"type":"send","room":"general","body":"","ref":"e1"}"#.into(),
            "bad_request",
            Some("e1"),
        ),
        (
            json!({"type": "send", "room": "general", "body": "x".repeat(4001), "ref": "big"})
                .to_string(),
            "too_large",
            Some("big"),
        ),
        (
            r#"{"type":"join","room":"nosuchroom","ref":"nf"}"#.into(),
            "not_found",
            Some("nf"),
        ),
    ];
    for (text, code, r) in &cases {
        ws.send_text(text);
        let v = ws.recv();
        assert_eq!(
            v["type"], "error",
            "input {text:?} should get an error, got {v}"
        );
        assert_eq!(v["code"], *code, "input {text:?}: {v}");
        assert_ws_error(&v, code, *r);
        ws.ping();
    }
    // None of it was stored, and real sends still work.
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    assert_eq!(r.json()["messages"], json!([]));
    ws.send_msg("general", "still alive");
}

#[test]
fn body_length_is_counted_in_unicode_characters() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.join("general");
    for ch in ["x", "é", "😀"] {
        let body = ch.repeat(4000);
        let (m, _) = ws.send_msg("general", &body);
        assert_eq!(m["body"].as_str().unwrap().chars().count(), 4000);
        let too_long = ch.repeat(4001);
        ws.send(&json!({"type": "send", "room": "general", "body": too_long, "ref": ch}));
        assert_ws_error(&ws.recv(), "too_large", Some(ch));
        ws.ping();
    }
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    let msgs = r.json()["messages"].clone();
    let bodies: Vec<String> = msgs
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        bodies,
        vec!["x".repeat(4000), "é".repeat(4000), "😀".repeat(4000)],
        "stored bodies are intact"
    );
}

#[test]
fn a_body_with_a_nul_character_is_refused_and_nothing_is_stored() {
    // Claim: a body holding U+0000 is refused with bad_request on every door (socket
    // send, DM, GraphQL) and nothing is stored, while other control characters (a tab,
    // a newline, U+0001) are kept as sent. Both engines then hold the same messages.
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    new_user(&srv, "bob");
    let mut ws = Ws::connect(&srv, &at);
    ws.join("general");
    ws.send(&json!({"type": "send", "room": "general", "body": "a\u{0}b", "ref": "n1"}));
    assert_ws_error(&ws.recv(), "bad_request", Some("n1"));
    ws.send(&json!({"type": "dm", "to": "bob", "body": "\u{0}", "ref": "n2"}));
    assert_ws_error(&ws.recv(), "bad_request", Some("n2"));
    let q = "mutation($b: String!) { sendMessage(room: \"general\", body: $b) { id } }";
    let r = srv.post(
        "/graphql",
        Some(&at),
        &json!({"query": q, "variables": {"b": "x\u{0}"}}),
    );
    let code = &r.json()["errors"][0]["extensions"]["code"];
    assert_eq!(code, "bad_request", "{}", r.text());
    ws.ping();
    let kept = "tab\tnewline\n\u{1}end";
    let (m, _) = ws.send_msg("general", kept);
    assert_eq!(m["body"], kept);
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    let bodies: Vec<Value> = r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(
        bodies,
        vec![json!(kept)],
        "only the message without NUL is stored"
    );
}

#[test]
fn binary_frames_get_bad_request() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.ws
        .send(Message::binary(br#"{"type":"ping"}"#.to_vec()))
        .unwrap();
    assert_ws_error(&ws.recv(), "bad_request", None);
    ws.ping();
    ws.ws
        .send(Message::binary(vec![0u8, 159, 146, 150]))
        .unwrap();
    assert_ws_error(&ws.recv(), "bad_request", None);
    ws.ping();
}

#[test]
fn a_large_frame_under_64k_is_only_an_error() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.join("general");
    let body = "y".repeat(60 * 1024);
    ws.send(&json!({"type": "send", "room": "general", "body": body, "ref": "l"}));
    assert_ws_error(&ws.recv(), "too_large", Some("l"));
    ws.ping();
}

#[test]
fn a_frame_over_64k_closes_with_1009() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.ping();
    let body = "z".repeat(64 * 1024 + 100);
    let _ = ws.ws.send(Message::text(
        json!({"type": "send", "room": "general", "body": body}).to_string(),
    ));
    assert_eq!(ws.expect_close(), Some(1009));
    // The server is fine.
    let mut again = Ws::connect(&srv, &at);
    again.ping();
}

#[test]
fn fragments_over_64k_close_with_1009() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    ws.ping();
    let chunk = vec![b'a'; 16 * 1024];
    let _ = ws.ws.send(Message::Frame(Frame::message(
        chunk.clone(),
        OpCode::Data(Data::Text),
        false,
    )));
    for i in 0..4 {
        let _ = ws.ws.send(Message::Frame(Frame::message(
            chunk.clone(),
            OpCode::Data(Data::Continue),
            i == 3,
        )));
    }
    assert_eq!(ws.expect_close(), Some(1009));
    let mut again = Ws::connect(&srv, &at);
    again.ping();
}

#[test]
fn fragmented_small_message_is_reassembled() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let mut ws = Ws::connect(&srv, &at);
    let text = br#"{"type":"ping"}"#;
    ws.ws
        .send(Message::Frame(Frame::message(
            text[..5].to_vec(),
            OpCode::Data(Data::Text),
            false,
        )))
        .unwrap();
    ws.ws
        .send(Message::Frame(Frame::message(
            text[5..].to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .unwrap();
    assert_pong(&ws.recv(), None);
}

// ---------------------------------------------------------------------------------
// the socket cap, revocation
// ---------------------------------------------------------------------------------

// (Slow clients and 1008 have their own file: tests/slow_clients.rs.)

#[test]
fn max_sockets_caps_connections_with_429() {
    let srv = Server::start(&["--max-sockets", "2"]);
    let alice = new_user(&srv, "alice");
    let mut s1 = Ws::connect(&srv, &alice);
    let mut s2 = Ws::connect(&srv, &alice);
    s1.ping();
    s2.ping();
    let r = raw_attempt(&srv, Transport::Header, &alice);
    assert_ws_rejected(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some(), "429 carries Retry-After");
    // A bad token is still 401 first.
    let r = raw_attempt(&srv, Transport::Header, "garbage");
    assert_ws_rejected(&r, 401, "unauthorized");
    // Freeing a slot lets a new socket in.
    s1.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s3 = loop {
        match connect_via(&srv, Transport::Header, &alice) {
            Ok(ws) => break ws,
            Err(e) => {
                assert!(Instant::now() < deadline, "slot never freed: {e:?}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    };
    s3.ping();
    s2.ping();
}

#[test]
fn max_sockets_per_user_caps_one_users_sockets_with_429() {
    let srv = Server::start(&["--max-sockets-per-user", "2"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a1 = Ws::connect(&srv, &alice);
    let mut a2 = Ws::connect(&srv, &alice);
    let r = raw_attempt(&srv, Transport::Query, &alice);
    assert_ws_rejected(&r, 429, "rate_limited");
    // Another user is not affected.
    let mut b = Ws::connect(&srv, &bob);
    b.ping();
    a1.ping();
    a2.ping();
}

#[test]
fn refresh_reuse_closes_the_logins_live_sockets_with_4003() {
    let srv = Server::start(&["--refresh-grace", "0"]);
    register(&srv, "alice");
    let p1 = login(&srv, "alice");
    let other = login(&srv, "alice");
    let mut doomed = Ws::connect(&srv, &access(&p1));
    doomed.join("general");
    let mut survivor = Ws::connect(&srv, &access(&other));
    survivor.ping();
    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_status(&r, 200);
    let p2 = r.json();
    let mut doomed2 = Ws::connect(&srv, &access(&p2));
    doomed2.ping();
    // Reuse.
    let r = refresh_resp(&srv, &refresh_tok(&p1));
    assert_error(&r, 401, "unauthorized");
    assert_eq!(doomed.expect_close(), Some(4003));
    assert_eq!(doomed2.expect_close(), Some(4003));
    survivor.ping();
}

#[test]
fn logout_closes_the_logins_live_sockets_with_4003() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let p1 = login(&srv, "alice");
    let other = login(&srv, "alice");
    let mut doomed = Ws::connect(&srv, &access(&p1));
    doomed.ping();
    let mut survivor = Ws::connect(&srv, &access(&other));
    survivor.ping();
    let r = srv.post_empty("/api/logout", Some(&access(&p1)));
    assert_status(&r, 204);
    assert_eq!(doomed.expect_close(), Some(4003));
    survivor.ping();
}

/// Threads of a process, from /proc.
fn thread_count(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// One socket opened and closed, so that what every socket shares exists before a
/// count: tiny_http's pool keeps a few threads, the IO lanes and workers exist.
fn warm_up(srv: &Server, token: &str) {
    drop(Ws::connect(srv, token));
    std::thread::sleep(Duration::from_millis(200));
}

/// `n` sockets, each answering a ping.
fn open_chatting(srv: &Server, token: &str, n: usize) -> Vec<Ws> {
    let mut socks: Vec<Ws> = (0..n).map(|_| Ws::connect(srv, token)).collect();
    for s in &mut socks {
        s.ping();
    }
    socks
}

/// Memory mappings of a process, from /proc.
fn mapping_count(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines().count()
}

/// A line of /proc/PID/status as a hexadecimal signal mask.
fn signal_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim()
        .to_owned();
    u64::from_str_radix(&hex, 16).unwrap()
}

/// On Linux with glibc the server starts without the standard library's runtime
/// start (`sys::main`), which gave every thread a signal stack of its own: a socket's
/// thread costs two mappings (its stack and guard page) instead of four, so
/// `vm.max_map_count` holds twice the sockets; and SIGPIPE is still ignored, as that
/// start did, so a closed log pipe cannot kill the server.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_sockets_thread_costs_two_memory_mappings_and_sigpipe_stays_ignored() {
    let srv = start_unlimited(&[]);
    let sigpipe = 1u64 << (13 - 1);
    assert_ne!(
        signal_mask(srv.pid(), "SigIgn:") & sigpipe,
        0,
        "SIGPIPE is not ignored"
    );
    let token = new_user(&srv, "alice");
    warm_up(&srv, &token);
    let threads = thread_count(srv.pid());
    let before = mapping_count(srv.pid());
    let n = 40;
    let mut socks = open_chatting(&srv, &token, n);
    // tiny_http's idle pool threads (and their mappings) linger 5 s; wait them out.
    wait_until(Duration::from_secs(10), "pool threads to wind down", || {
        thread_count(srv.pid()) <= threads + n
    });
    let per_socket = (mapping_count(srv.pid()) as f64 - before as f64) / n as f64;
    assert!(
        (1.5..=2.5).contains(&per_socket),
        "{n} sockets took {per_socket:.2} mappings each (4 with per-thread signal stacks)"
    );
    for s in &mut socks {
        s.ping();
    }
}

/// An upgraded socket costs the server one thread, its reader: tiny_http's connection
/// thread goes back to its pool at the upgrade (it once stayed parked for the socket's
/// life, doubling the threads, memory and mappings a socket costs). Sockets still
/// chat, and closing them ends their threads.
#[test]
fn an_upgraded_socket_holds_one_thread() {
    let srv = start_unlimited(&[]);
    let token = new_user(&srv, "alice");
    warm_up(&srv, &token);
    let before = thread_count(srv.pid());
    let n = 40;
    let mut socks = open_chatting(&srv, &token, n);
    // Idle pool threads linger for 5 s after their connection ends; wait them out.
    wait_until(Duration::from_secs(10), "pool threads to wind down", || {
        thread_count(srv.pid()) <= before + n + 4
    });
    let during = thread_count(srv.pid());
    assert!(
        during >= before + n && during <= before + n + 4,
        "{n} sockets took the server from {before} to {during} threads"
    );
    for s in &mut socks {
        s.ping();
    }
    drop(socks);
    wait_until(Duration::from_secs(10), "socket threads to end", || {
        thread_count(srv.pid()) <= before + 4
    });
}
