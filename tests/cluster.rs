//! Several nodes on one PostgreSQL database: what one node commits reaches the sockets
//! of the others, once and in id order; a ban or a kick on one node closes the user's
//! sockets on another; a node killed with `kill -9` costs its clients nothing once
//! they reconnect to another node with `since`.
//!
//! Needs the PostgreSQL engine and a server to run on: `PARLEY_TEST_POSTGRES=URL cargo
//! test --features postgres --test cluster` (`.ci/run` does this; see the README).
#![cfg(feature = "postgres")]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

/// Three nodes on one fresh database, each in its own directory.
struct Cluster {
    nodes: Vec<Server>,
    _dirs: Vec<TempDir>,
    // Dropped last: the database outlives the servers using it.
    _db: PgDb,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let db = PgDb::create_if_enabled().unwrap_or_else(|| {
            panic!("the cluster tests run on PostgreSQL: set {POSTGRES_ENV} (see the README)")
        });
        let mut dirs = Vec::new();
        let mut nodes = Vec::new();
        for _ in 0..n {
            let dir = TempDir::new();
            let args = ["--login-rate", "0", "--msg-rate", "0"];
            nodes.push(Server::launch_db(dir.path(), &db.url, &args, &[]));
            dirs.push(dir);
        }
        Cluster {
            nodes,
            _dirs: dirs,
            _db: db,
        }
    }
}

/// A user's socket on `node`, joined to `general`.
fn member(node: &Server, name: &str) -> (String, Ws) {
    let token = new_user(node, name);
    let mut ws = Ws::connect(node, &token);
    ws.join("general");
    (token, ws)
}

/// Reads until `want` distinct room messages arrived (and the acks of `acks` sends);
/// returns their ids in arrival order. Fails on a duplicate, or on an ack that comes
/// before the sender's own message.
fn collect(ws: &mut Ws, want: usize, acks: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    let mut acked = 0;
    while ids.len() < want || acked < acks {
        let v = ws.recv_skipping(&["presence", "presence_batch"]);
        match v["type"].as_str() {
            Some("message") => {
                let id = v["id"].as_i64().expect("message id");
                assert!(seen.insert(id), "message {id} delivered twice");
                ids.push(id);
            }
            Some("ack") => {
                let id = v["id"].as_i64().expect("ack id");
                assert!(seen.contains(&id), "ack of {id} before the message itself");
                acked += 1;
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
    ids
}

#[track_caller]
fn assert_increasing(ids: &[i64], who: &str) {
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{who} got messages out of id order: {ids:?}"
    );
}

/// Two senders on two nodes at once; every socket on every node gets all of their
/// messages once, in id order (the order resume with `since` relies on).
#[test]
fn messages_reach_every_node_once_and_in_id_order() {
    let c = Cluster::start(3);
    let (_, a) = member(&c.nodes[0], "ann");
    let (_, b) = member(&c.nodes[1], "bob");
    let (_, mut w) = member(&c.nodes[2], "cat");
    const EACH: usize = 100;
    let sender = |mut ws: Ws, who: &'static str| {
        thread::spawn(move || {
            for i in 0..EACH {
                let ref_ = format!("{who}{i}");
                ws.send(&json!({"type": "send", "room": "general", "body": ref_, "ref": ref_}));
            }
            collect(&mut ws, 2 * EACH, EACH)
        })
    };
    let (ta, tb) = (sender(a, "a"), sender(b, "b"));
    let watched = collect(&mut w, 2 * EACH, 0);
    let (got_a, got_b) = (ta.join().unwrap(), tb.join().unwrap());
    for (ids, who) in [
        (&watched, "cat on node 3"),
        (&got_a, "ann on node 1"),
        (&got_b, "bob on node 2"),
    ] {
        assert_eq!(ids.len(), 2 * EACH, "{who}");
        assert_increasing(ids, who);
    }
    assert_eq!(got_a, watched, "two nodes saw different streams");
    assert_eq!(got_b, watched, "two nodes saw different streams");
}

/// A direct message and a deletion made on one node reach sockets on another.
#[test]
fn dms_and_deletions_cross_nodes() {
    let c = Cluster::start(2);
    let (admin, mut a) = member(&c.nodes[0], "root");
    let (_, mut b) = member(&c.nodes[1], "bob");
    a.send(&json!({"type": "dm", "to": "bob", "body": "psst", "ref": "d1"}));
    let own = a.recv_skipping(&["presence"]);
    assert_eq!(own["type"], "dm", "the sender's own copy first: {own}");
    assert_eq!(a.recv_skipping(&["presence"])["type"], "ack");
    let dm = b.recv_skipping(&["presence"]);
    assert_eq!(
        (dm["type"].as_str(), dm["body"].as_str()),
        (Some("dm"), Some("psst")),
        "{dm}"
    );
    let (_, id) = a.send_msg("general", "to be deleted");
    let m = b.recv_skipping(&["presence"]);
    assert_eq!(m["id"], id, "{m}");
    let r = c.nodes[0].request("DELETE", &format!("/api/messages/{id}"), Some(&admin), None);
    assert_status(&r, 204);
    let d = b.recv_skipping(&["presence"]);
    assert_eq!(
        (d["type"].as_str(), d["id"].as_i64()),
        (Some("deleted"), Some(id)),
        "{d}"
    );
}

/// A ban issued on node 1 closes the user's socket on node 3 in under a second; a
/// kick does too.
#[test]
fn a_ban_or_kick_on_one_node_closes_sockets_on_another_within_a_second() {
    let c = Cluster::start(3);
    let (admin, mut a) = member(&c.nodes[0], "root");
    let (_, mut banned) = member(&c.nodes[2], "bob");
    let (_, mut kicked) = member(&c.nodes[1], "cat");
    let started = Instant::now();
    let r = c.nodes[0].post_empty("/api/admin/users/bob/ban", Some(&admin));
    assert_status(&r, 204);
    assert_eq!(wait_close(&mut banned, Duration::from_secs(5)), Some(4003));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the ban took {took:?} to reach node 3"
    );
    let started = Instant::now();
    a.send(&json!({"type": "kick", "user": "cat"}));
    assert_eq!(wait_close(&mut kicked, Duration::from_secs(5)), Some(4003));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the kick took {took:?} to reach node 2"
    );
}

/// An announcement made on one node reaches the sockets of every node.
#[test]
fn announcements_reach_every_node() {
    let c = Cluster::start(2);
    let (_, mut a) = member(&c.nodes[0], "root");
    let (_, mut b) = member(&c.nodes[1], "bob");
    a.send(&json!({"type": "announce", "body": "maintenance at noon"}));
    for ws in [&mut a, &mut b] {
        let v = ws.recv_skipping(&["presence"]);
        assert_eq!(v["type"], "announcement", "{v}");
        assert_eq!(v["body"], "maintenance at noon", "{v}");
    }
}

/// `kill -9` of the node a client is on, while another keeps sending: the client
/// reconnects to a surviving node with `since` and has every message once.
#[test]
fn a_killed_nodes_clients_resume_on_another_and_lose_nothing() {
    let mut c = Cluster::start(3);
    let (_, mut a) = member(&c.nodes[0], "ann");
    let (cat, mut w) = member(&c.nodes[2], "cat");
    let (_, first) = a.send_msg("general", "before");
    let m = w.recv_skipping(&["presence"]);
    assert_eq!(m["id"], first);
    c.nodes[2].kill9();
    let sent: Vec<i64> = (0..20)
        .map(|i| a.send_msg("general", &format!("while away {i}")).1)
        .collect();
    let mut w = Ws::connect(&c.nodes[1], &cat);
    w.send(&json!({"type": "join", "room": "general", "since": first}));
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let v: Value = w.recv_skipping(&["presence", "joined"]);
        assert_eq!(v["type"], "message", "{v}");
        got.push(v["id"].as_i64().unwrap());
    }
    assert_eq!(got, sent, "the resumed client missed or repeated messages");
}
