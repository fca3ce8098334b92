//! GraphQL over HTTP against the real server: every query and mutation, the same
//! effects as REST and the socket (broadcasts, audit rows, permission failures), and
//! every kind of bad request answered as GraphQL-over-HTTP says, never with a 500.

mod common;
#[path = "common/graphql.rs"]
mod gql;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// An admin (the first account) and a member, with their tokens.
fn two_users(srv: &Server) -> (String, String) {
    (new_user(srv, "admin"), new_user(srv, "bob"))
}

fn audit_rows(srv: &Server, action: &str) -> Vec<(Option<String>, Option<String>, String)> {
    let db = open_db(&srv.db_path());
    let mut st = db
        .prepare("SELECT actor, target, detail FROM audit_log WHERE action = ?1 ORDER BY id")
        .unwrap();
    st.query_map([action], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Waits (the writer commits audit rows on its own) until `action` has `n` rows.
#[track_caller]
fn audited(srv: &Server, action: &str, n: usize) {
    wait_until(Duration::from_secs(5), action, || {
        audit_rows(srv, action).len() == n
    });
}

#[test]
fn schema_file_matches_the_binary() {
    let out = run_cli(&["graphql-schema"], "");
    assert_exit(&out, 0, "graphql-schema");
    let printed = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql"))
        .expect("schema.graphql at the top of the repository");
    assert_eq!(
        printed, committed,
        "schema.graphql is stale: run `parley graphql-schema > schema.graphql`"
    );
    for root in [
        "type Query",
        "type Mutation",
        "type Subscription",
        "type DM",
    ] {
        assert!(printed.contains(root), "{root} missing");
    }
}

#[test]
fn every_query() {
    let srv = start_unlimited(&[]);
    let (admin, bob) = two_users(&srv);
    let me = gql::data(
        &srv,
        &bob,
        "{ me { id username roles createdAt } }",
        json!({}),
    );
    assert_eq!(me["me"]["username"], "bob");
    assert_eq!(me["me"]["roles"], json!(["member"]));
    assert!(is_rfc3339(me["me"]["createdAt"].as_str().unwrap()));

    // A /ws user in general makes it online 1 (GraphQL sockets never count).
    let mut ws = Ws::connect(&srv, &admin);
    ws.join("general");
    let rooms = gql::data(&srv, &bob, "{ rooms { name createdAt online } }", json!({}));
    assert_eq!(rooms["rooms"][0]["name"], "general");
    assert_eq!(rooms["rooms"][0]["online"], 1);

    let ids = post_messages(&srv, &admin, "general", 5, "m");
    let q = "query($a: Int, $b: Int, $l: Int) { messages(room: \"general\", after: $a, before: $b, limit: $l) { id room from body ts clientId } }";
    let page = gql::data(&srv, &bob, q, json!({"a": ids[0], "l": 2}));
    assert_eq!(ids_of(&page["messages"]), ids[1..3].to_vec());
    assert_eq!(page["messages"][0]["from"], "admin");
    assert_eq!(page["messages"][0]["room"], "general");
    assert!(page["messages"][0]["clientId"].is_null());
    let newest = gql::data(&srv, &bob, q, json!({"l": 2}));
    assert_eq!(ids_of(&newest["messages"]), ids[3..5].to_vec());
    gql::error(
        &srv,
        &bob,
        "{ messages(room: \"nope\") { id } }",
        json!({}),
        "not_found",
    );

    gql::data(
        &srv,
        &admin,
        "mutation { sendDm(to: \"bob\", body: \"hello bob\") { id } }",
        json!({}),
    );
    let dms = gql::data(
        &srv,
        &bob,
        "{ dms(user: \"admin\") { id from to body ts clientId } }",
        json!({}),
    );
    assert_eq!(dms["dms"][0]["body"], "hello bob");
    assert_eq!(dms["dms"][0]["to"], "bob");
    gql::error(
        &srv,
        &bob,
        "{ dms(user: \"nobody\") { id } }",
        json!({}),
        "not_found",
    );

    let users = gql::data(
        &srv,
        &bob,
        "{ users(q: \"AD\") { username online } }",
        json!({}),
    );
    assert_eq!(
        users["users"],
        json!([{"username": "admin", "online": true}])
    );

    let log = gql::data(
        &srv,
        &admin,
        "{ auditLog(limit: 3) { id ts actor action target ip detail } }",
        json!({}),
    );
    let events = log["auditLog"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    assert!(
        events[0]["id"].as_i64() > events[1]["id"].as_i64(),
        "newest first"
    );
    let detail: Value = serde_json::from_str(events[0]["detail"].as_str().unwrap()).unwrap();
    assert!(detail.is_object(), "detail is a JSON object as a string");
}

#[test]
fn permission_failures_are_errors_and_audited() {
    // SQLite even under PARLEY_TEST_POSTGRES: it reads audit rows from the file.
    let srv = start_unlimited_sqlite(&[]);
    let (admin, bob) = two_users(&srv);
    let (_, id) = {
        let mut ws = Ws::connect(&srv, &admin);
        ws.join("general");
        ws.send_msg("general", "keep me")
    };
    let cases = [
        ("{ auditLog { id } }", "audit.read"),
        ("mutation { deleteMessage(id: ID) }", "message.delete"),
        ("mutation { kick(user: \"admin\") }", "user.kick"),
        ("mutation { ban(user: \"admin\") }", "user.ban"),
        ("mutation { unban(user: \"admin\") }", "user.ban"),
        (
            "mutation { setRoles(user: \"bob\", roles: [\"admin\"]) { id } }",
            "role.assign",
        ),
        ("mutation { announce(body: \"hi\") }", "announce"),
    ];
    for (i, (q, permission)) in cases.iter().enumerate() {
        let q = q.replace("ID", &id.to_string());
        let v = gql::error(&srv, &bob, &q, json!({}), "forbidden");
        assert!(v["data"].is_null(), "{v}");
        // The audit trail is written by the store's writer: wait for the row.
        wait_until(Duration::from_secs(5), "the forbidden row", || {
            audit_rows(&srv, "forbidden").len() == i + 1
        });
        let rows = audit_rows(&srv, "forbidden");
        let last = rows.last().unwrap();
        assert_eq!(last.0.as_deref(), Some("bob"), "{q}");
        assert!(last.2.contains(permission), "{q}: {last:?}");
    }
    // Nothing happened: the message is still there.
    let msgs = gql::data(
        &srv,
        &bob,
        "{ messages(room: \"general\") { id } }",
        json!({}),
    );
    assert_eq!(ids_of(&msgs["messages"]), vec![id]);
}

#[test]
fn mutations_act_like_the_socket() {
    // SQLite even under PARLEY_TEST_POSTGRES: it counts messages and audit rows in the file.
    let srv = start_unlimited_sqlite(&[]);
    let (admin, bob) = two_users(&srv);
    let carol = new_user(&srv, "carol");
    let mut watcher = Ws::connect(&srv, &carol);
    watcher.join("general");

    // sendMessage needs no join and reaches the room like a socket `send`.
    let q = "mutation($b: String!, $c: String) { sendMessage(room: \"general\", body: $b, clientId: $c) { id room from body ts clientId } }";
    let sent =
        gql::data(&srv, &bob, q, json!({"b": "via graphql", "c": "k-1"}))["sendMessage"].clone();
    assert_eq!(sent["from"], "bob");
    assert_eq!(sent["clientId"], "k-1");
    let heard = watcher.recv_skipping(&["presence"]);
    assert_eq!(heard["type"], "message");
    assert_eq!(heard["id"], sent["id"]);
    assert_eq!(heard["body"], "via graphql");
    assert_eq!(heard["client_id"], "k-1");
    // Once only: a repeat returns the first message and stores nothing.
    let again =
        gql::data(&srv, &bob, q, json!({"b": "different", "c": "k-1"}))["sendMessage"].clone();
    assert_eq!(again, sent);
    assert_eq!(stored_message_count(&srv.db_path()), 1);
    gql::error(
        &srv,
        &bob,
        q,
        json!({"b": "x", "c": "bad id!"}),
        "bad_request",
    );
    gql::error(&srv, &bob, q, json!({"b": ""}), "bad_request");
    gql::error(&srv, &bob, q, json!({"b": "x".repeat(4001)}), "too_large");
    gql::error(
        &srv,
        &bob,
        "mutation { sendMessage(room: \"nope\", body: \"x\") { id } }",
        json!({}),
        "not_found",
    );
    watcher.ping();

    // sendDm reaches every socket of both users.
    let mut bob_ws = Ws::connect(&srv, &bob);
    let dq = "mutation($c: String) { sendDm(to: \"carol\", body: \"psst\", clientId: $c) { id from to body clientId } }";
    let dm = gql::data(&srv, &bob, dq, json!({"c": "d-1"}))["sendDm"].clone();
    for ws in [&mut watcher, &mut bob_ws] {
        let v = ws.recv_skipping(&["presence"]);
        assert_eq!(v["type"], "dm");
        assert_eq!(v["id"], dm["id"]);
        assert_eq!(v["to"], "carol");
    }
    assert_eq!(gql::data(&srv, &bob, dq, json!({"c": "d-1"}))["sendDm"], dm);
    gql::error(
        &srv,
        &bob,
        "mutation { sendDm(to: \"nobody\", body: \"x\") { id } }",
        json!({}),
        "not_found",
    );
    // A key first used for a DM is refused for a room message.
    gql::error(&srv, &bob, q, json!({"b": "x", "c": "d-1"}), "conflict");

    // deleteMessage (admin) sends `deleted` to the room.
    let del = gql::data(
        &srv,
        &admin,
        "mutation($i: Int!) { deleteMessage(id: $i) }",
        json!({"i": sent["id"]}),
    );
    assert_eq!(del["deleteMessage"], true);
    let v = watcher.recv_skipping(&["presence"]);
    assert_eq!(
        v,
        json!({"type": "deleted", "id": sent["id"], "room": "general", "by": "admin"})
    );
    gql::error(
        &srv,
        &admin,
        "mutation($i: Int!) { deleteMessage(id: $i) }",
        json!({"i": sent["id"]}),
        "not_found",
    );
    audited(&srv, "message_delete", 1);

    // createRoom.
    let room = gql::data(
        &srv,
        &bob,
        "mutation { createRoom(name: \"lobby\") { name createdAt online } }",
        json!({}),
    );
    assert_eq!(room["createRoom"]["name"], "lobby");
    assert_eq!(room["createRoom"]["online"], 0);
    gql::error(
        &srv,
        &bob,
        "mutation { createRoom(name: \"lobby\") { name } }",
        json!({}),
        "conflict",
    );
    gql::error(
        &srv,
        &bob,
        "mutation { createRoom(name: \"Bad Name\") { name } }",
        json!({}),
        "bad_request",
    );
    audited(&srv, "room_create", 1);

    // announce reaches chat sockets.
    let a = gql::data(
        &srv,
        &admin,
        "mutation { announce(body: \"maintenance\", roles: [\"member\"]) }",
        json!({}),
    );
    assert_eq!(a["announce"], true);
    let v = watcher.recv_skipping(&["presence"]);
    assert_eq!(v["type"], "announcement");
    assert_eq!(v["body"], "maintenance");

    // setRoles, with the last-admin guard.
    let roles = gql::data(
        &srv,
        &admin,
        "mutation { setRoles(user: \"bob\", roles: [\"moderator\"]) { username roles } }",
        json!({}),
    );
    assert_eq!(
        roles["setRoles"],
        json!({"username": "bob", "roles": ["moderator"]})
    );
    gql::error(
        &srv,
        &admin,
        "mutation { setRoles(user: \"admin\", roles: [\"member\"]) { id } }",
        json!({}),
        "conflict",
    );
    gql::error(
        &srv,
        &admin,
        "mutation { setRoles(user: \"bob\", roles: [\"wizard\"]) { id } }",
        json!({}),
        "bad_request",
    );

    // kick closes carol's socket with 4003.
    let k = gql::data(&srv, &bob, "mutation { kick(user: \"carol\") }", json!({}));
    assert_eq!(k["kick"], true);
    assert_eq!(wait_close(&mut watcher, Duration::from_secs(5)), Some(4003));
    audited(&srv, "kick", 1);

    // ban, then unban.
    assert_eq!(
        gql::data(&srv, &admin, "mutation { ban(user: \"carol\") }", json!({}))["ban"],
        true
    );
    assert_error(
        &gql::post(&srv, &carol, "{ me { id } }", json!({})),
        403,
        "forbidden",
    );
    assert_eq!(
        gql::data(
            &srv,
            &admin,
            "mutation { unban(user: \"carol\") }",
            json!({})
        )["unban"],
        true
    );
    gql::error(
        &srv,
        &admin,
        "mutation { ban(user: \"nobody\") }",
        json!({}),
        "not_found",
    );
    audited(&srv, "ban", 1);
    audited(&srv, "unban", 1);
}

#[test]
fn refusals_before_execution_use_the_rest_shape() {
    // SQLite even under PARLEY_TEST_POSTGRES: it counts the messages in the file.
    let srv = Server::start_sqlite(&["--msg-rate", "3", "--login-rate", "0"]);
    let (_, bob) = two_users(&srv);
    let body = json!({"query": "{ me { id } }"});
    assert_error(&gql::post_with(&srv, None, &body, &[]), 401, "unauthorized");
    assert_error(
        &gql::post_with(&srv, Some("not.a.jwt"), &body, &[]),
        401,
        "unauthorized",
    );
    let r = http_request(
        srv.port,
        "GET",
        "/graphql?query=%7Bme%7Bid%7D%7D",
        &[],
        None,
    );
    assert_error(&r, 401, "unauthorized");

    let auth = format!("Bearer {bob}");
    let big = vec![b' '; 65 * 1024];
    let r = http_request(
        srv.port,
        "POST",
        "/graphql",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&big),
    );
    assert_error(&r, 413, "too_large");
    let r = http_request(
        srv.port,
        "POST",
        "/graphql",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/graphql"),
        ],
        Some(b"{ me { id } }"),
    );
    assert_error(&r, 415, "bad_request");
    let r = http_request(
        srv.port,
        "POST",
        "/graphql",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{not json"),
    );
    assert_error(&r, 400, "bad_request");
    assert_error(
        &gql::post_with(
            &srv,
            Some(&bob),
            &json!({"query": "{ me { id } }", "variables": [1]}),
            &[],
        ),
        400,
        "bad_request",
    );
    assert_error(
        &gql::post_with(&srv, Some(&bob), &json!({"variables": {}}), &[]),
        400,
        "bad_request",
    );
    let r = http_request(
        srv.port,
        "PUT",
        "/graphql",
        &[("Authorization", &auth)],
        None,
    );
    assert_error(&r, 405, "bad_request");

    // GET runs queries; a mutation over GET is 405 (and runs nothing).
    let r = http_request(
        srv.port,
        "GET",
        "/graphql?query=%7Bme%7Busername%7D%7D",
        &[("Authorization", &auth)],
        None,
    );
    assert_status(&r, 200);
    assert_eq!(r.json()["data"]["me"]["username"], "bob");
    let path = "/graphql?query=query(%24n%3AInt)%7Bmessages(room%3A%22general%22%2Climit%3A%24n)%7Bid%7D%7D&variables=%7B%22n%22%3A1%7D";
    let r = http_request(srv.port, "GET", path, &[("Authorization", &auth)], None);
    assert_eq!(r.json()["data"]["messages"], json!([]));
    let path =
        "/graphql?query=mutation%7BsendMessage(room%3A%22general%22%2Cbody%3A%22x%22)%7Bid%7D%7D";
    let r = http_request(srv.port, "GET", path, &[("Authorization", &auth)], None);
    assert_error(&r, 405, "bad_request");
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(stored_message_count(&srv.db_path()), 0);

    // Each root mutation field is a write against --msg-rate (3 per second): a
    // mutation with four is refused whole with 429. (A full budget first.)
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let four = "mutation { a: createRoom(name: \"a1\") { name } b: createRoom(name: \"a2\") { name } c: createRoom(name: \"a3\") { name } d: createRoom(name: \"a4\") { name } }";
    let r = gql::post(&srv, &bob, four, json!({}));
    assert_error(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some());
    let rooms = gql::data(&srv, &bob, "{ rooms { name } }", json!({}));
    assert_eq!(
        rooms["rooms"].as_array().unwrap().len(),
        1,
        "nothing ran: {rooms}"
    );
    // ...and spent nothing: three fit at once.
    let three = "mutation { a: createRoom(name: \"b1\") { name } b: createRoom(name: \"b2\") { name } c: createRoom(name: \"b3\") { name } }";
    let made = gql::data(&srv, &bob, three, json!({}));
    assert_eq!(made["c"]["name"], "b3", "{made}");
    // Queries are not writes.
    for _ in 0..10 {
        gql::data(&srv, &bob, "{ me { id } }", json!({}));
    }
}

/// Every kind of bad document: GraphQL `errors` (no `data`), 200 for JSON clients and
/// 400 for clients that accept application/graphql-response+json; never a 500, and
/// the server keeps serving.
#[test]
fn bad_documents_are_graphql_errors() {
    let srv = start_unlimited(&[]);
    let (_, bob) = two_users(&srv);
    let nest = |n: usize| format!("{{ me(x: {}1{}) {{ id }} }}", "[".repeat(n), "]".repeat(n));
    let mut bomb = String::from("query { ...F0 }");
    for i in 0..25 {
        bomb.push_str(&format!(
            " fragment F{i} on Query {{ ...F{} ...F{} }}",
            i + 1,
            i + 1
        ));
    }
    bomb.push_str(" fragment F25 on Query { me { id } }");
    let deep_fragments: String = {
        let mut s = String::from("{ __schema { types { ...T0 } } }");
        for i in 0..20 {
            s.push_str(&format!(
                " fragment T{i} on __Type {{ ofType {{ ...T{} }} }}",
                i + 1
            ));
        }
        s.push_str(" fragment T20 on __Type { name }");
        s
    };
    let cases: Vec<(&str, String, Value)> = vec![
        ("syntax", "{ me { id ".into(), json!({}) ),
        ("unknown field", "{ me { id shoeSize } }".into(), json!({})),
        ("unknown argument", "{ me(x: 1) { id } }".into(), json!({})),
        ("wrong variable type", "query($n: Int) { messages(room: \"general\", limit: $n) { id } }".into(), json!({"n": "ten"})),
        ("missing variable", "query($r: String!) { messages(room: $r) { id } }".into(), json!({})),
        ("too deep", "{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } } } } }".into(), json!({})),
        ("too complex", "{ a: auditLog(limit: 1000) { id ts actor action target ip detail } b: auditLog(limit: 1000) { id ts actor action target ip detail } }".into(), json!({})),
        ("too many aliases", format!("{{ {} }}", (0..31).map(|i| format!("a{i}: me {{ id }}")).collect::<Vec<_>>().join(" ")), json!({})),
        ("too many root fields", format!("{{ {} }}", (0..21).map(|_| "me { id }").collect::<Vec<_>>().join(" ")), json!({})),
        ("too many fields", format!("{{ me {{ {} }} }}", "id ".repeat(1001)), json!({})),
        ("fragment cycle", "{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }".into(), json!({})),
        ("fragment bomb", bomb, json!({})),
        ("nested fragments", deep_fragments, json!({})),
        ("nested brackets", nest(10_000), json!({})),
        ("nested as deep as allowed", nest(30), json!({})),
        ("too many directives", format!("{{ me {} {{ id }} }}", "@skip(if: false) ".repeat(9)), json!({})),
        ("unknown operation", "query A { me { id } }".into(), json!({})),
        ("two anonymous operations", "{ me { id } } { me { id } }".into(), json!({})),
        ("subscription over HTTP", "subscription { dmReceived { id } }".into(), json!({})),
    ];
    for (what, query, variables) in &cases {
        let mut body = json!({"query": query, "variables": variables});
        if *what == "unknown operation" {
            body["operationName"] = json!("B");
        }
        let r = gql::post_with(&srv, Some(&bob), &body, &[]);
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert!(r.is_json(), "{what}");
        let v = r.json();
        assert!(
            v.get("data").is_none(),
            "{what}: a request error has no data: {v}"
        );
        let errors = v["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {v}"));
        assert!(
            !errors.is_empty() && errors[0]["message"].is_string(),
            "{what}: {v}"
        );

        let accept = [("Accept", "application/graphql-response+json")];
        let r = gql::post_with(&srv, Some(&bob), &body, &accept);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/graphql-response+json")
        );
        assert!(r.json()["errors"].is_array(), "{what}");
    }
    // A resolver failure is not a request error: 200 either way, with data.
    let accept = [(
        "Accept",
        "application/graphql-response+json, application/json;q=0.9",
    )];
    let r = gql::post_with(
        &srv,
        Some(&bob),
        &json!({"query": "{ auditLog { id } }"}),
        &accept,
    );
    assert_status(&r, 200);
    assert!(r.json().get("data").is_some());
    // Still serving, nothing logged as a panic.
    gql::data(&srv, &bob, "{ me { id } }", json!({}));
    assert!(
        !srv.stderr_log().contains("panicked"),
        "{}",
        srv.stderr_log()
    );
}

#[test]
fn introspection_works_for_callers() {
    let srv = start_unlimited(&[]);
    let (_, bob) = two_users(&srv);
    let q = "{ __schema { queryType { name } mutationType { name } subscriptionType { name } types { name fields { name args { name type { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } } }";
    let d = gql::data(&srv, &bob, q, json!({}));
    assert_eq!(d["__schema"]["subscriptionType"]["name"], "Subscription");
    let names: Vec<&str> = d["__schema"]["types"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for t in [
        "Message",
        "DM",
        "AuditEvent",
        "UserSummary",
        "Presence",
        "Deleted",
        "Room",
        "User",
    ] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }
    // Not without a token.
    assert_error(
        &gql::post_with(&srv, None, &json!({"query": q}), &[]),
        401,
        "unauthorized",
    );
}
