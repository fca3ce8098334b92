//! GraphQL subscriptions over `graphql-transport-ws` against the real server: the
//! upgrade's checks (the same as `/ws`), the protocol's rules, every subscription,
//! `since` replay across a reconnect with no gap or duplicate at the seam, traffic
//! between `/ws` and GraphQL both ways, live enforcement (4401, 4403), renewal, the
//! `connection_init` deadline (4408), the cap on operations per socket, and a
//! slow subscriber dropped rather than waited for.

mod common;
#[path = "common/graphql.rs"]
mod gql;

use common::*;
use gql::GqlWs;
use serde_json::json;
use std::time::Duration;

const ADDED: &str = "subscription($r: String!, $s: Int) { messageAdded(room: $r, since: $s) { id room from body ts clientId } }";

#[test]
fn the_upgrade_is_checked_like_ws() {
    let srv = start_unlimited(&["--max-sockets-per-user", "2"]);
    let admin = new_user(&srv, "admin");
    let bob = new_user(&srv, "bob");
    let proto = ("Sec-WebSocket-Protocol", "graphql-transport-ws");
    assert_ws_rejected(
        &ws_handshake_raw(&srv, "/graphql", &[proto]),
        401,
        "unauthorized",
    );
    let bad = ("Authorization", "Bearer nope");
    assert_ws_rejected(
        &ws_handshake_raw(&srv, "/graphql", &[proto, bad]),
        401,
        "unauthorized",
    );
    let auth = format!("Bearer {bob}");
    let evil = ("Origin", "http://evil.example");
    let r = ws_handshake_raw(&srv, "/graphql", &[proto, ("Authorization", &auth), evil]);
    assert_ws_rejected(&r, 403, "forbidden");

    // The token as a subprotocol entry (browsers), never echoed.
    let offered = format!("graphql-transport-ws, bearer.{bob}");
    let req = with_header(
        ws_request(&srv, "/graphql"),
        "Sec-WebSocket-Protocol",
        &offered,
    );
    let first = Ws::try_connect(&srv, req).expect("bearer subprotocol");
    let echoed = first
        .response
        .headers()
        .get("sec-websocket-protocol")
        .unwrap();
    assert_eq!(echoed, "graphql-transport-ws");
    // ...and in the query string.
    let req = gql::ws_request_for(&srv, &format!("?access_token={bob}"));
    let mut second = GqlWs {
        ws: Ws::try_connect(&srv, req).expect("query token"),
    };
    second.init();
    // Both count toward --max-sockets-per-user (2): a third socket of any kind is 429.
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    let r = ws_handshake_raw(&srv, "/graphql", &[proto, ("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    // They count as the user's sockets, but not as presence in any room.
    let users = gql::data(
        &srv,
        &admin,
        "{ users(q: \"bob\") { online } rooms { online } }",
        json!({}),
    );
    assert_eq!(users["users"][0]["online"], true);
    assert_eq!(users["rooms"][0]["online"], 0);

    // A banned user's token is 403 on the upgrade.
    gql::data(&srv, &admin, "mutation { ban(user: \"bob\") }", json!({}));
    let r = ws_handshake_raw(&srv, "/graphql", &[proto, ("Authorization", &auth)]);
    assert_ws_rejected(&r, 403, "forbidden");
}

#[test]
fn a_graphql_socket_takes_two_slots_of_max_sockets() {
    // --max-sockets 2 is 2 socket threads: two chat sockets (1 each) fit, but a
    // GraphQL socket (2) and a chat socket do not.
    let srv = start_unlimited(&["--max-sockets", "2"]);
    let bob = new_user(&srv, "bob");
    let auth = format!("Bearer {bob}");
    let proto = ("Sec-WebSocket-Protocol", "graphql-transport-ws");
    let mut sub = GqlWs {
        ws: Ws::try_connect(
            &srv,
            gql::ws_request_for(&srv, &format!("?access_token={bob}")),
        )
        .expect("the first socket fits"),
    };
    sub.init();
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    let r = ws_handshake_raw(&srv, "/graphql", &[proto, ("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    // Closing it gives its threads back: now two chat sockets fit.
    drop(sub);
    let mut first = None;
    wait_until(
        Duration::from_secs(5),
        "the GraphQL socket's slot back",
        || {
            first = Ws::connect_port(srv.port, &bob).ok();
            first.is_some()
        },
    );
    let second = Ws::connect_port(srv.port, &bob).expect("two chat sockets fit in 2");
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", &auth)]);
    assert_ws_rejected(&r, 429, "rate_limited");
    drop((first, second));
}

#[test]
fn renewal_and_operations_count_against_the_message_rate() {
    let srv = Server::start(&["--msg-rate", "2", "--login-rate", "0"]);
    let bob = new_user(&srv, "bob");
    let mut c = GqlWs::connect(&srv, &bob);
    for id in ["a", "b"] {
        c.subscribe(id, "subscription { dmReceived { id } }", json!({}));
    }
    c.subscribe("c", "subscription { dmReceived { id } }", json!({}));
    let errors = c.expect("c", "error");
    assert_eq!(errors[0]["extensions"]["code"], "rate_limited", "{errors}");
    c.send(&json!({"type": "ping", "payload": {"access_token": bob}}));
    assert_eq!(
        c.recv(),
        json!({"type": "pong", "payload": {"error": "rate_limited"}})
    );
}

#[test]
fn protocol_rules() {
    let srv = start_unlimited(&[]);
    let bob = new_user(&srv, "bob");
    // subscribe before connection_init: 4401.
    let mut c = GqlWs::open(&srv, &bob);
    c.subscribe("1", "{ me { id } }", json!({}));
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4401));
    // A second connection_init: 4429.
    let mut c = GqlWs::connect(&srv, &bob);
    c.send(&json!({"type": "connection_init"}));
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4429));
    // Not JSON, or an unknown type: 4400.
    let mut c = GqlWs::connect(&srv, &bob);
    c.ws.send_text("{nope");
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4400));
    let mut c = GqlWs::connect(&srv, &bob);
    c.send(&json!({"type": "start", "id": "1"}));
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4400));
    // The same id twice while running: 4409.
    let mut c = GqlWs::connect(&srv, &bob);
    c.subscribe("x", "subscription { dmReceived { id } }", json!({}));
    c.subscribe("x", "subscription { dmReceived { id } }", json!({}));
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4409));

    // A query and a mutation over the socket: next, then complete; `complete` from
    // the client ends a subscription, after which its id may be used again.
    let mut c = GqlWs::connect(&srv, &bob);
    c.subscribe("q", "{ me { username } }", json!({}));
    assert_eq!(c.next_data("q")["me"]["username"], "bob");
    c.expect("q", "complete");
    c.subscribe(
        "m",
        "mutation { sendMessage(room: \"general\", body: \"over ws\") { body } }",
        json!({}),
    );
    assert_eq!(c.next_data("m")["sendMessage"]["body"], "over ws");
    c.expect("m", "complete");
    c.subscribe("s", ADDED, json!({"r": "general"}));
    c.send(&json!({"type": "complete", "id": "s"}));
    c.subscribe("s", ADDED, json!({"r": "general", "s": 0}));
    assert_eq!(c.next_data("s")["messageAdded"]["body"], "over ws");
    // Bad documents and unknown rooms: an `error` message, the socket stays.
    c.subscribe("e1", "{ me { shoeSize } }", json!({}));
    let errors = c.expect("e1", "error");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("shoeSize"),
        "{errors}"
    );
    c.subscribe("e2", ADDED, json!({"r": "nowhere"}));
    let errors = c.expect("e2", "error");
    assert_eq!(errors[0]["extensions"]["code"], "not_found", "{errors}");
    let many: String = (0..21).map(|_| " me { id }").collect();
    c.subscribe("e3", &format!("{{{many} }}"), json!({}));
    assert!(c.expect("e3", "error").is_array());
    // A big document (introspection) runs on the socket's threads too.
    let q = "{ __schema { types { name fields { name args { name type { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } } }";
    c.subscribe("i", q, json!({}));
    assert!(
        c.next_data("i")["__schema"]["types"]
            .as_array()
            .unwrap()
            .len()
            > 10
    );
    c.expect("i", "complete");
    c.ping();
    // Announcements are for chat sockets (bob, the first account, is admin): nothing
    // stray arrives here.
    gql::data(
        &srv,
        &bob,
        "mutation { announce(body: \"hello all\") }",
        json!({}),
    );
    c.quiet_for(Duration::from_millis(300));
}

#[test]
fn messages_flow_between_ws_and_graphql() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut sub = GqlWs::connect(&srv, &bob);
    sub.subscribe("m", ADDED, json!({"r": "general"}));
    sub.subscribe(
        "d",
        "subscription { messageDeleted(room: \"general\") { id room by } }",
        json!({}),
    );
    sub.subscribe(
        "p",
        "subscription { presence(room: \"general\") { user room status } }",
        json!({}),
    );
    sub.sync();

    // A /ws join is presence; a /ws send reaches the GraphQL subscriber.
    let mut ws = Ws::connect(&srv, &alice);
    ws.join("general");
    let p = sub.next_data("p");
    assert_eq!(
        p["presence"],
        json!({"user": "alice", "room": "general", "status": "online"})
    );
    let (msg, id) = ws.send_msg("general", "from the socket");
    let got = sub.next_data("m")["messageAdded"].clone();
    assert_eq!(got["id"], id);
    assert_eq!(got["from"], "alice");
    assert_eq!(got["body"], msg["body"]);

    // A GraphQL mutation (over HTTP) reaches the /ws client, and the subscriber.
    let sent = gql::data(&srv, &bob, "mutation { sendMessage(room: \"general\", body: \"from graphql\", clientId: \"c1\") { id } }", json!({}));
    let v = ws.recv_skipping(&["presence"]);
    assert_eq!(v["type"], "message");
    assert_eq!(v["id"], sent["sendMessage"]["id"]);
    assert_eq!(v["from"], "bob");
    let got = sub.next_data("m")["messageAdded"].clone();
    assert_eq!(got["id"], sent["sendMessage"]["id"]);
    assert_eq!(got["clientId"], "c1");

    // Deletion.
    gql::data(
        &srv,
        &alice,
        &format!("mutation {{ deleteMessage(id: {id}) }}"),
        json!({}),
    );
    assert_eq!(
        sub.next_data("d")["messageDeleted"],
        json!({"id": id, "room": "general", "by": "alice"})
    );

    // Leaving is presence too.
    ws.close_and_wait();
    let p = sub.next_data("p");
    assert_eq!(p["presence"]["status"], "offline");
}

#[test]
fn dm_received_both_directions() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = GqlWs::connect(&srv, &alice);
    let mut b = GqlWs::connect(&srv, &bob);
    for c in [&mut a, &mut b] {
        c.subscribe(
            "dm",
            "subscription { dmReceived { id from to body clientId } }",
            json!({}),
        );
        c.sync();
    }
    // Over /ws from alice to bob: both hear it.
    let mut ws = Ws::connect(&srv, &alice);
    ws.send(&json!({"type": "dm", "to": "bob", "body": "hi bob", "ref": "r"}));
    for c in [&mut a, &mut b] {
        let dm = c.next_data("dm")["dmReceived"].clone();
        assert_eq!(
            (dm["from"].as_str(), dm["to"].as_str(), dm["body"].as_str()),
            (Some("alice"), Some("bob"), Some("hi bob"))
        );
    }
    // Through GraphQL from bob to alice: both hear it, and alice's /ws socket too.
    gql::data(
        &srv,
        &bob,
        "mutation { sendDm(to: \"alice\", body: \"hi alice\") { id } }",
        json!({}),
    );
    for c in [&mut a, &mut b] {
        assert_eq!(c.next_data("dm")["dmReceived"]["from"], "bob");
    }
    // alice's own socket had its DM to bob too; then bob's to her.
    let v = ws.recv_skipping(&["ack"]);
    assert_eq!(
        (v["type"].as_str(), v["body"].as_str()),
        (Some("dm"), Some("hi bob"))
    );
    let v = ws.recv_skipping(&["ack"]);
    assert_eq!(
        (v["type"].as_str(), v["body"].as_str()),
        (Some("dm"), Some("hi alice"))
    );
    // A third user's DMs are not heard.
    let carol = new_user(&srv, "carol");
    gql::data(
        &srv,
        &carol,
        "mutation { sendDm(to: \"carol\", body: \"note to self\") { id } }",
        json!({}),
    );
    a.quiet_for(Duration::from_millis(200));
    b.quiet_for(Duration::from_millis(200));
}

/// `since` replays everything stored after it, in id order and without a cap, then
/// goes live; a client that reconnects with the last id it saw misses nothing and
/// gets nothing twice, even while messages keep arriving during its replay.
#[test]
fn since_replays_across_a_reconnect() {
    let srv = start_unlimited(&["--send-queue", "64"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    // More than one page (200) and more than the socket's queue.
    let first = post_messages(&srv, &alice, "general", 450, "a");
    let mut c = GqlWs::connect(&srv, &bob);
    c.subscribe("m", ADDED, json!({"r": "general", "s": 0}));
    let mut seen = Vec::new();
    while seen.len() < first.len() {
        seen.push(c.next_data("m")["messageAdded"]["id"].as_i64().unwrap());
    }
    assert_eq!(seen, first);
    drop(c);

    // While it is away, and while it replays, messages keep coming.
    let gone = post_messages(&srv, &alice, "general", 20, "b");
    let sender = {
        let (port, alice) = (srv.port, alice.clone());
        std::thread::spawn(move || {
            let mut ws = Ws::connect_port(port, &alice).unwrap();
            ws.join("general");
            (0..60)
                .map(|i| ws.send_msg("general", &format!("c{i}")).1)
                .collect::<Vec<_>>()
        })
    };
    let last = *seen.last().unwrap();
    let mut c = GqlWs::connect(&srv, &bob);
    c.subscribe("m", ADDED, json!({"r": "general", "s": last}));
    let during = sender.join().unwrap();
    let mut want: Vec<i64> = gone.clone();
    want.extend(&during);
    let mut again = Vec::new();
    while again.len() < want.len() {
        again.push(c.next_data("m")["messageAdded"]["id"].as_i64().unwrap());
    }
    assert_eq!(again, want, "in order, no gap, no duplicate");
    c.ping();
    c.quiet_for(Duration::from_millis(200));
}

#[test]
fn expiry_closes_with_4401_unless_renewed() {
    let srv = start_unlimited(&["--access-ttl", "3"]);
    register(&srv, "bob");
    let pair = login(&srv, "bob");
    let mut stays = GqlWs::connect(&srv, &access(&pair));
    let mut expires = GqlWs::connect(&srv, &access(&pair));
    stays.subscribe("d", "subscription { dmReceived { id } }", json!({}));
    // Renewal with a bad token or another user's is refused; the old token stays.
    stays.send(&json!({"type": "ping", "payload": {"access_token": "garbage"}}));
    assert_eq!(
        stays.recv(),
        json!({"type": "pong", "payload": {"error": "unauthorized"}})
    );
    let other = new_user(&srv, "carol");
    stays.send(&json!({"type": "ping", "payload": {"access_token": other}}));
    assert_eq!(
        stays.recv(),
        json!({"type": "pong", "payload": {"error": "forbidden"}})
    );
    // A fresh token of the same user renews the socket.
    std::thread::sleep(Duration::from_millis(1100));
    let fresh = access(&refresh_resp(&srv, &refresh_tok(&pair)).json());
    stays.send(&json!({"type": "ping", "payload": {"access_token": fresh}}));
    let pong = stays.recv();
    assert_eq!(pong["type"], "pong");
    assert!(
        is_rfc3339(pong["payload"]["expires_at"].as_str().unwrap()),
        "{pong}"
    );
    assert_eq!(expires.close_code(Duration::from_secs(8)), Some(4401));
    // The renewed one outlives the first token, and still hears its subscription.
    let other = access(&login(&srv, "carol"));
    gql::data(
        &srv,
        &other,
        "mutation { sendDm(to: \"bob\", body: \"still here\") { id } }",
        json!({}),
    );
    assert!(stays.next_data("d")["dmReceived"]["id"].is_i64());
}

#[test]
fn kick_ban_and_revocation_close_with_4403() {
    // SQLite even under PARLEY_TEST_POSTGRES: `parley user ban --db` is given the file.
    let srv = start_unlimited_sqlite(&[]);
    let admin = new_user(&srv, "admin");
    register(&srv, "bob");
    let pair = login(&srv, "bob");
    let bob = access(&pair);

    let mut c = GqlWs::connect(&srv, &bob);
    c.subscribe("m", ADDED, json!({"r": "general"}));
    c.sync();
    gql::data(&srv, &admin, "mutation { kick(user: \"bob\") }", json!({}));
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4403));

    // Revocation: logging out this login closes its sockets.
    let mut c = GqlWs::connect(&srv, &bob);
    let r = srv.post(
        "/api/logout",
        Some(&bob),
        &json!({"refresh_token": refresh_tok(&pair)}),
    );
    assert_status(&r, 204);
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4403));

    let bob = access(&login(&srv, "bob"));
    let mut c = GqlWs::connect(&srv, &bob);
    gql::data(&srv, &admin, "mutation { ban(user: \"bob\") }", json!({}));
    assert_eq!(c.close_code(Duration::from_secs(5)), Some(4403));
    // A ban from the command line reaches the socket too (the revocation sweep).
    gql::data(&srv, &admin, "mutation { unban(user: \"bob\") }", json!({}));
    let bob = access(&login(&srv, "bob"));
    let mut c = GqlWs::connect(&srv, &bob);
    let out = run_cli(
        &[
            "user",
            "ban",
            "bob",
            "--db",
            srv.db_path().to_str().unwrap(),
        ],
        "",
    );
    assert_exit(&out, 0, "user ban");
    assert_eq!(c.close_code(Duration::from_secs(10)), Some(4403));
}

/// A subscriber that stops reading is dropped (1008) once its queue overflows; the
/// room and other subscribers go on at full speed.
#[test]
fn a_slow_subscriber_is_dropped_not_waited_for() {
    let srv = start_unlimited(&["--send-queue", "16"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let carol = new_user(&srv, "carol");
    // Control characters are escaped to 6 bytes each: ~24 KB a frame, so a few
    // hundred fill what the kernel holds for the socket on loopback (~2.5 MB) and the
    // server's queue for it.
    let big = "\u{1}".repeat(3990);

    let mut slow = {
        let req = gql::ws_request_for(&srv, &format!("?access_token={bob}"));
        let sock = tiny_window_upgrade(&srv, req);
        GqlWs {
            ws: Ws {
                ws: sock,
                response: Default::default(),
            },
        }
    };
    slow.init();
    slow.subscribe("m", ADDED, json!({"r": "general"}));
    slow.sync();
    let mut fast = GqlWs::connect(&srv, &carol);
    fast.subscribe("m", ADDED, json!({"r": "general"}));
    fast.sync();

    let mut ws = Ws::connect(&srv, &alice);
    ws.join("general");
    for i in 0..200 {
        ws.send_msg("general", &format!("{i}{big}"));
        assert!(fast.next_data("m")["messageAdded"]["body"]
            .as_str()
            .unwrap()
            .starts_with(&i.to_string()));
    }
    assert!(
        gql::closed_within(&mut slow.ws, Duration::from_secs(10)),
        "the slow subscriber was not dropped"
    );
    assert!(metric_now(&srv, "parley_slow_clients_dropped_total") >= 1.0);
}

#[test]
fn a_socket_without_connection_init_is_closed_with_4408() {
    let srv = start_unlimited(&["--graphql-init-timeout", "1"]);
    let bob = new_user(&srv, "bob");
    // One that initialises in time outlives the timeout and keeps working.
    let mut kept = GqlWs::connect(&srv, &bob);
    let started = std::time::Instant::now();
    let mut silent = GqlWs::open(&srv, &bob);
    assert_eq!(silent.close_code(Duration::from_secs(5)), Some(4408));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the 1 s timeout"
    );
    std::thread::sleep(Duration::from_millis(300));
    kept.subscribe("q", "{ me { username } }", json!({}));
    assert_eq!(kept.next_data("q")["me"]["username"], "bob");
    kept.expect("q", "complete");
}

#[test]
fn at_most_32_operations_run_at_once_on_one_socket() {
    let srv = start_unlimited(&[]);
    let bob = new_user(&srv, "bob");
    let mut c = GqlWs::connect(&srv, &bob);
    for i in 0..32 {
        c.subscribe(&format!("s{i}"), ADDED, json!({"r": "general"}));
    }
    // The 33rd is refused with an `error`; the socket and the 32 stay.
    c.subscribe("over", ADDED, json!({"r": "general"}));
    let errors = c.expect("over", "error");
    assert!(
        errors[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 32 operations")),
        "{errors}"
    );
    // Completing two makes room for another, and for the query that waits until
    // every subscription is live.
    c.send(&json!({"type": "complete", "id": "s0"}));
    c.send(&json!({"type": "complete", "id": "s1"}));
    c.subscribe("again", ADDED, json!({"r": "general"}));
    c.sync();
    gql::data(
        &srv,
        &bob,
        "mutation { sendMessage(room: \"general\", body: \"to all\") { id } }",
        json!({}),
    );
    let mut heard = std::collections::BTreeSet::new();
    while heard.len() < 31 {
        let v = c.recv();
        assert_eq!(v["type"], "next", "{v}");
        assert_eq!(v["payload"]["data"]["messageAdded"]["body"], "to all");
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        assert!(!["s0", "s1", "over"].contains(&id.as_str()), "{v}");
        assert!(heard.insert(id), "{v} twice");
    }
    assert!(heard.contains("again"));
    c.quiet_for(Duration::from_millis(300));
}
