//! Once-only sends: `send` and `dm` with a `client_id` store at most one message per
//! (sender, client_id), across rooms, DMs and restarts; a repeat is acked with the
//! first message's id and neither stored nor broadcast again.

mod common;

use common::*;
use serde_json::{json, Value};

/// Sends `frame` (with a fresh ref) and returns the frames up to and including the
/// reply to that ref.
fn exchange(ws: &mut Ws, mut frame: Value) -> Vec<Value> {
    let r = format!("r{}", unique());
    frame["ref"] = json!(r);
    ws.send(&frame);
    let mut got = Vec::new();
    loop {
        let v = ws.recv_skipping(&["presence"]);
        let done = v["ref"] == r.as_str();
        got.push(v);
        if done {
            return got;
        }
    }
}

fn stored_messages(srv: &Server) -> i64 {
    let c = rusqlite::Connection::open(srv.db_path()).unwrap();
    let rooms: i64 = c
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    let dms: i64 = c
        .query_row("SELECT count(*) FROM direct_messages", [], |r| r.get(0))
        .unwrap();
    rooms + dms
}

#[test]
fn a_repeated_client_id_is_acked_with_the_first_id_and_not_stored_again() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &["--login-rate", "0", "--msg-rate", "0"]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let mut watcher = Ws::connect(&srv, &alice);
    watcher.join("general");

    let first = exchange(
        &mut a,
        json!({"type": "send", "room": "general", "body": "hello", "client_id": "c-1"}),
    );
    assert_eq!(first.len(), 2, "the message, then the ack: {first:?}");
    assert_eq!(first[0]["type"], "message");
    assert_eq!(
        first[0]["client_id"], "c-1",
        "the event carries its client_id"
    );
    let id = first[1]["id"].as_i64().unwrap();
    assert_eq!(watcher.recv()["id"], id);

    // The same client_id again — another body, even as a DM — is only acked.
    for frame in [
        json!({"type": "send", "room": "general", "body": "hello", "client_id": "c-1"}),
        json!({"type": "send", "room": "general", "body": "other", "client_id": "c-1"}),
        json!({"type": "dm", "to": "bob", "body": "psst", "client_id": "c-1"}),
    ] {
        let got = exchange(&mut a, frame);
        assert_eq!(got.len(), 1, "only the ack: {got:?}");
        assert_eq!(got[0]["type"], "ack");
        assert_eq!(got[0]["id"], id, "the first message's id");
    }
    watcher.ping();
    assert_eq!(stored_messages(&srv), 1);

    // Also after a restart.
    srv.kill9();
    let srv = Server::start_in(dir.path(), &["--login-rate", "0", "--msg-rate", "0"]);
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let got = exchange(
        &mut a,
        json!({"type": "send", "room": "general", "body": "hello", "client_id": "c-1"}),
    );
    assert_eq!((got.len(), &got[0]["id"]), (1, &json!(id)));
    // Another client_id, and none at all (or null), are new messages.
    for cid in [json!("c-2"), Value::Null] {
        let got = exchange(
            &mut a,
            json!({"type": "send", "room": "general", "body": "new", "client_id": cid}),
        );
        assert_eq!(got.len(), 2, "{got:?}");
    }
    assert_eq!(stored_messages(&srv), 3);
}

#[test]
fn dms_are_once_only_too_and_bad_client_ids_store_nothing() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    let first = exchange(
        &mut a,
        json!({"type": "dm", "to": "bob", "body": "hi", "client_id": "d1"}),
    );
    assert_eq!(first[0]["type"], "dm");
    assert_eq!(first[0]["client_id"], "d1");
    let id = first.last().unwrap()["id"].clone();
    let again = exchange(
        &mut a,
        json!({"type": "dm", "to": "bob", "body": "hi", "client_id": "d1"}),
    );
    assert_eq!((again.len(), &again[0]["id"]), (1, &id));
    for bad in [
        json!("has space"),
        json!("x".repeat(65)),
        json!(""),
        json!(7),
    ] {
        let got = exchange(
            &mut a,
            json!({"type": "dm", "to": "bob", "body": "hi", "client_id": bad}),
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["type"], "error", "{bad}: {got:?}");
        assert_eq!(got[0]["code"], "bad_request");
    }
    assert_eq!(stored_messages(&srv), 1);
    a.ping();
}
