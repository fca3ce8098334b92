//! Several nodes on one PostgreSQL database: what one node commits reaches the sockets
//! of the others, once and in id order; a ban or a kick on one node closes the user's
//! sockets on another; a node killed with `kill -9` costs its clients nothing once
//! they reconnect to another node with `since`; presence is the same from every node,
//! a late node included, and a killed node's users go offline everywhere.
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
use tungstenite::Message;

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
        let mut c = Cluster {
            nodes: Vec::new(),
            _dirs: Vec::new(),
            _db: db,
        };
        for _ in 0..n {
            c.add_node();
        }
        c
    }

    /// Starts one more node on the cluster's database; returns its index.
    fn add_node(&mut self) -> usize {
        let dir = TempDir::new();
        let args = ["--login-rate", "0", "--msg-rate", "0"];
        let node = Server::launch_db(dir.path(), &self._db.url, &args, &[]);
        self.nodes.push(node);
        self._dirs.push(dir);
        self.nodes.len() - 1
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

/// The next `presence` frame on `ws` (other frames are passed over), within `within`.
#[track_caller]
fn next_presence(ws: &mut Ws, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no presence frame within {within:?}");
        ws.stream()
            .set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        match ws.next_message() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "presence" {
                    return v;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("no presence frame within {within:?}: {e:?}"),
        }
    }
}

#[track_caller]
fn assert_presence(v: &Value, user: &str, status: &str) {
    assert_eq!(
        (v["user"].as_str(), v["status"].as_str(), v["room"].as_str()),
        (Some(user), Some(status), Some("general")),
        "{v}"
    );
}

/// `general`'s online count as `node` reports it (`GET /api/rooms`).
fn online_count(node: &Server, token: &str) -> i64 {
    let rooms = node.get("/api/rooms", Some(token)).json();
    let rooms = rooms["rooms"].as_array().cloned().unwrap_or_default();
    let general = rooms.iter().find(|r| r["name"] == "general");
    general.and_then(|r| r["online"].as_i64()).unwrap_or(-1)
}

fn online_list(joined: &Value) -> Vec<String> {
    let names = joined["online"].as_array().expect("online list");
    names
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

/// A user online on node 1 is in the `joined` list of a socket on node 2, and in its
/// online count; someone coming online or going offline on node 3 is announced on
/// both; a second socket of an online user, on another node, announces nothing.
#[test]
fn presence_is_the_same_from_every_node() {
    let c = Cluster::start(3);
    let (_, mut x) = member(&c.nodes[0], "xena");
    let ty = new_user(&c.nodes[1], "yuri");
    wait_until(Duration::from_secs(5), "node 2 to count xena", || {
        online_count(&c.nodes[1], &ty) == 1
    });
    let mut y = Ws::connect(&c.nodes[1], &ty);
    let joined = y.join("general");
    assert_eq!(online_list(&joined), ["xena", "yuri"], "{joined}");
    assert_presence(&next_presence(&mut x, IO_TIMEOUT), "yuri", "online");

    // xena's second socket, on node 2: online already, so nobody hears of it.
    let tx2 = access(&login(&c.nodes[1], "xena"));
    let mut x2 = Ws::connect(&c.nodes[1], &tx2);
    let again = x2.join("general");
    assert_eq!(online_list(&again), ["xena", "yuri"], "{again}");
    x2.close_and_wait();
    thread::sleep(Duration::from_millis(300));

    let tz = new_user(&c.nodes[2], "zed");
    let mut z = Ws::connect(&c.nodes[2], &tz);
    let joined = z.join("general");
    assert_eq!(online_list(&joined), ["xena", "yuri", "zed"], "{joined}");
    for ws in [&mut x, &mut y] {
        assert_presence(&next_presence(ws, IO_TIMEOUT), "zed", "online");
    }
    z.send(&json!({"type": "leave", "room": "general"}));
    for ws in [&mut x, &mut y] {
        assert_presence(&next_presence(ws, IO_TIMEOUT), "zed", "offline");
    }
    wait_until(Duration::from_secs(5), "every node to count 2", || {
        c.nodes.iter().all(|n| online_count(n, &ty) == 2)
    });
}

/// A socket that takes presence batches hears another node's changes in a
/// `presence_batch`.
#[test]
fn batches_carry_other_nodes_presence() {
    let c = Cluster::start(2);
    let tb = new_user(&c.nodes[1], "bea");
    let mut b = Ws::connect(&c.nodes[1], &tb);
    b.send(&json!({"type": "join", "room": "general", "presence": "batch"}));
    assert_eq!(b.recv()["type"], "joined");
    let (_, w) = member(&c.nodes[0], "wes");
    let v = b.recv_skipping(&[]);
    assert_eq!(v["type"], "presence_batch", "{v}");
    assert_eq!(v["online"], json!(["wes"]), "{v}");
    w.close_and_wait();
    let v = b.recv_skipping(&[]);
    assert_eq!(v["type"], "presence_batch", "{v}");
    assert_eq!(v["offline"], json!(["wes"]), "{v}");
}

/// A socket that takes counts hears another node's changes in a `presence_count`, and
/// pages the other node's users with `online`.
#[test]
fn counts_and_online_pages_include_other_nodes() {
    let c = Cluster::start(2);
    let tb = new_user(&c.nodes[1], "bea");
    let mut b = Ws::connect(&c.nodes[1], &tb);
    b.send(&json!({"type": "join", "room": "general", "presence": "count"}));
    assert_eq!(b.recv()["online_count"], 1);
    let (_, w) = member(&c.nodes[0], "wes");
    let v = b.recv_skipping(&[]);
    assert_eq!(
        (v["type"].as_str(), v["online_count"].as_u64()),
        (Some("presence_count"), Some(2)),
        "{v}"
    );
    b.send(&json!({"type": "online", "room": "general"}));
    assert_eq!(b.recv_skipping(&[])["online"], json!(["bea", "wes"]));
    w.close_and_wait();
    let v = b.recv_skipping(&[]);
    assert_eq!(
        (v["type"].as_str(), v["online_count"].as_u64()),
        (Some("presence_count"), Some(1)),
        "{v}"
    );
}

/// `kill -9` of the node a user is on: the other nodes' sockets hear the user go
/// offline once the node has been silent for three heartbeats (2 s each), plus a
/// little; a node that stops cleanly takes its users offline at once.
#[test]
fn a_dead_nodes_users_go_offline_everywhere() {
    let mut c = Cluster::start(3);
    let (_, mut a) = member(&c.nodes[0], "ann");
    let (_, _z) = member(&c.nodes[2], "zed");
    assert_presence(&next_presence(&mut a, IO_TIMEOUT), "zed", "online");
    let (_, _q) = member(&c.nodes[1], "quinn");
    assert_presence(&next_presence(&mut a, IO_TIMEOUT), "quinn", "online");
    let killed = Instant::now();
    c.nodes[2].kill9();
    assert_presence(
        &next_presence(&mut a, Duration::from_secs(15)),
        "zed",
        "offline",
    );
    let took = killed.elapsed();
    eprintln!("a killed node's user showed offline after {took:?}");
    assert!(
        took >= Duration::from_secs(3) && took <= Duration::from_secs(7),
        "offline {took:?} after the kill (expected 6 s since last heard, plus a tick)"
    );
    let stopped = Instant::now();
    c.nodes[1].sigterm();
    assert_presence(&next_presence(&mut a, IO_TIMEOUT), "quinn", "offline");
    let took = stopped.elapsed();
    eprintln!("a stopped node's user showed offline after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A node started after the others lists their online users in its first `joined`.
#[test]
fn a_late_node_sees_who_is_online_already() {
    let mut c = Cluster::start(2);
    let (_, _x) = member(&c.nodes[0], "xena");
    let (_, _y) = member(&c.nodes[1], "yuri");
    let late = c.add_node();
    let tz = new_user(&c.nodes[late], "zed");
    let mut z = Ws::connect(&c.nodes[late], &tz);
    let joined = z.join("general");
    assert_eq!(online_list(&joined), ["xena", "yuri", "zed"], "{joined}");
}

/// A node taken for dead (silent too long: here, stopped with SIGSTOP) that comes back
/// is asked for its state again, since its heartbeat's digest no longer matches what
/// the others know of it: its users come back online everywhere.
#[test]
fn a_node_taken_for_dead_that_comes_back_is_heard_again() {
    let c = Cluster::start(2);
    let (_, mut a) = member(&c.nodes[0], "ann");
    let (_, _b) = member(&c.nodes[1], "ben");
    assert_presence(&next_presence(&mut a, IO_TIMEOUT), "ben", "online");
    c.nodes[1].signal(rustix::process::Signal::STOP);
    assert_presence(
        &next_presence(&mut a, Duration::from_secs(15)),
        "ben",
        "offline",
    );
    c.nodes[1].signal(rustix::process::Signal::CONT);
    let resumed = Instant::now();
    assert_presence(
        &next_presence(&mut a, Duration::from_secs(10)),
        "ben",
        "online",
    );
    eprintln!(
        "a node back from the dead was heard again after {:?}",
        resumed.elapsed()
    );
}

/// A node whose listening connection is cut (here: every node's, by the database)
/// cannot know what it missed, so it closes its sockets with 1012 once it listens again;
/// a client that then resumes with `since` gets what was sent meanwhile.
#[test]
fn a_node_that_missed_notices_asks_its_clients_to_resume() {
    let c = Cluster::start(2);
    let (ann, mut a) = member(&c.nodes[0], "ann");
    let (bob, mut b) = member(&c.nodes[1], "bob");
    let (_, first) = a.send_msg("general", "before the cut");
    assert_eq!(b.recv_skipping(&["presence"])["id"], first);
    // Only this test's nodes: other tests' databases share the server.
    let cut = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'parley-listen' AND datname = '{}'",
        c._db.name()
    );
    c._db.admin_sql(&cut).unwrap();
    assert_eq!(wait_close(&mut b, Duration::from_secs(10)), Some(1012));
    assert_eq!(wait_close(&mut a, Duration::from_secs(10)), Some(1012));
    let mut a = Ws::connect(&c.nodes[0], &ann);
    a.join("general");
    let mut b = Ws::connect(&c.nodes[1], &bob);
    let (_, later) = a.send_msg("general", "after the cut");
    b.send(&json!({"type": "join", "room": "general", "since": first}));
    let m = b.recv_skipping(&["presence", "presence_batch", "joined"]);
    assert_eq!(
        (m["type"].as_str(), m["id"].as_i64()),
        (Some("message"), Some(later)),
        "{m}"
    );
}
