//! Durability: every acknowledged message survives `kill -9` and a restart; SIGTERM /
//! SIGINT close sockets with 1001 and exit 0.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// How a sender's connection ended.
#[derive(Debug, Clone, PartialEq)]
enum Ending {
    /// A close frame arrived, with this code.
    Close(Option<u16>),
    /// The connection broke without a close frame.
    Broken(String),
}

/// Reads what is left on a connection until its close frame (or until it breaks).
fn drain_to_close(ws: &mut Ws) -> Ending {
    loop {
        match ws.ws.read() {
            Ok(Message::Close(f)) => return Ending::Close(f.map(|f| u16::from(f.code))),
            Ok(_) => continue,
            Err(e) => return Ending::Broken(format!("{e:?}")),
        }
    }
}

/// One sender on a connected socket that has joined `general`: sends until the
/// connection ends, recording every acknowledged (id, body). Never panics on I/O
/// errors (the server is stopped under it); returns how the connection ended.
fn sender(
    mut ws: Ws,
    t: usize,
    acked: Arc<Mutex<Vec<(i64, String)>>>,
    count: Arc<AtomicUsize>,
) -> Ending {
    enum Got {
        Json(Value),
        End(Ending),
    }
    let read_json = |ws: &mut Ws| -> Got {
        loop {
            match ws.ws.read() {
                Ok(Message::Text(t)) => {
                    return Got::Json(serde_json::from_str(t.as_str()).expect("JSON frame"))
                }
                Ok(Message::Close(f)) => {
                    return Got::End(Ending::Close(f.map(|f| u16::from(f.code))))
                }
                Ok(_) => continue,
                Err(e) => return Got::End(Ending::Broken(format!("{e:?}"))),
            }
        }
    };
    for i in 0.. {
        let body = format!("t{t}-m{i}");
        let msg = json!({"type": "send", "room": "general", "body": body, "ref": body});
        if ws.ws.send(Message::text(msg.to_string())).is_err() {
            return drain_to_close(&mut ws);
        }
        loop {
            let v = match read_json(&mut ws) {
                Got::Json(v) => v,
                Got::End(e) => return e,
            };
            match v["type"].as_str() {
                Some("ack") if v["ref"] == body.as_str() => {
                    let id = v["id"].as_i64().expect("ack id");
                    acked.lock().unwrap().push((id, body.clone()));
                    count.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Some("error") if v["code"] == "rate_limited" => {
                    thread::sleep(Duration::from_millis(60));
                    break;
                }
                // E.g. "shutting down": that message was not acknowledged, so it is
                // owed nothing; the connection's ending is checked by the caller.
                Some("error") if v["code"] == "internal" && v["ref"] == body.as_str() => break,
                Some("error") => panic!("sender {t}: unexpected error {v}"),
                _ => continue,
            }
        }
    }
    unreachable!()
}

/// Connects `n` sockets one after another (concurrent upgrades have their own test),
/// joins each to `general`, then lets each send from its own thread (numbered from
/// `first`, which tags their message bodies). Returns the threads, the shared ack
/// list and the ack counter.
#[allow(clippy::type_complexity)]
fn start_senders(
    srv: &Server,
    token: &str,
    n: usize,
    first: usize,
) -> (
    Vec<thread::JoinHandle<Ending>>,
    Arc<Mutex<Vec<(i64, String)>>>,
    Arc<AtomicUsize>,
) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let socks: Vec<Ws> = (0..n)
        .map(|_| {
            let mut ws = Ws::connect(srv, token);
            ws.join("general");
            ws
        })
        .collect();
    let threads = socks
        .into_iter()
        .enumerate()
        .map(|(t, ws)| {
            let (acked, count) = (acked.clone(), count.clone());
            thread::spawn(move || sender(ws, first + t, acked, count))
        })
        .collect();
    (threads, acked, count)
}

/// Waits until `count` reaches `target` (or 20 s pass).
fn wait_for_acks(count: &AtomicUsize, target: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(Ordering::SeqCst) < target && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts every acked (id, body) is returned by a server on `dir` (started here).
fn assert_all_present(dir: &std::path::Path, acked: &[(i64, String)]) -> Server {
    let srv = Server::start_in(dir, &[]);
    let at = access(&login(&srv, "alice"));
    let stored: BTreeMap<i64, Value> = all_messages(&srv, &at, "general")
        .into_iter()
        .map(|m| (m["id"].as_i64().unwrap(), m))
        .collect();
    for (id, body) in acked {
        let m = stored
            .get(id)
            .unwrap_or_else(|| panic!("acked message {id} ({body}) missing after restart"));
        assert_eq!(m["body"], body.as_str());
        assert_eq!(m["from"], "alice");
        assert_eq!(m["room"], "general");
    }
    srv
}

/// All messages of `room`, fetched with `after` paging.
fn all_messages(srv: &Server, token: &str, room: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut after = 0i64;
    loop {
        let r = srv.get(
            &format!("/api/rooms/{room}/messages?after={after}&limit=200"),
            Some(token),
        );
        assert_status(&r, 200);
        let page = r.json()["messages"].as_array().unwrap().clone();
        if page.is_empty() {
            return out;
        }
        after = page.last().unwrap()["id"].as_i64().unwrap();
        out.extend(page);
    }
}

#[test]
fn every_acked_message_survives_kill_9() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &["--msg-rate", "0"]);
    register(&srv, "alice");
    let token = access(&login(&srv, "alice"));
    let (threads, acked, count) = start_senders(&srv, &token, 8, 0);

    // Let the senders run, then pull the plug while they are still sending.
    wait_for_acks(&count, 400);
    srv.kill9();
    for t in threads {
        t.join().expect("sender thread panicked");
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} messages acknowledged before kill -9", acked.len());
    assert!(
        acked.len() >= 20,
        "only {} messages were acknowledged before the kill",
        acked.len()
    );
    let ids: BTreeSet<i64> = acked.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), acked.len(), "ack ids are unique");

    // 1. The crashed database file itself holds every acknowledged message.
    assert_all_in_file(dir.path(), &acked, "after kill -9");

    // 2. A restarted server on the same file returns every one of them...
    let srv = assert_all_present(dir.path(), &acked);
    // ...and keeps going, with ids beyond everything acked.
    let at = access(&login(&srv, "alice"));
    let mut ws = Ws::connect(&srv, &at);
    ws.join("general");
    let (_, id) = ws.send_msg("general", "after the crash");
    assert!(id > *ids.iter().max().unwrap());
}

/// Asserts that the database file in `dir` (opened directly, no server running)
/// holds every acked (id, body).
#[track_caller]
fn assert_all_in_file(dir: &std::path::Path, acked: &[(i64, String)], when: &str) {
    let conn = open_db(&dir.join("chat.db"));
    let mut st = conn
        .prepare("SELECT body FROM messages WHERE id = ?1")
        .expect("a messages table with id and body");
    for (id, body) in acked {
        let got: Option<String> = st
            .query_row([id], |r| r.get(0))
            .map(Some)
            .unwrap_or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => None,
                e => panic!("query: {e}"),
            });
        assert_eq!(
            got.as_deref(),
            Some(body.as_str()),
            "acked message {id} is not in the database file {when}"
        );
    }
}

/// A random number of milliseconds in `lo..=hi`.
fn random_ms(lo: u64, hi: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("random bytes");
    lo + u64::from_le_bytes(b) % (hi - lo + 1)
}

#[test]
fn acked_messages_survive_kill_9_at_random_moments() {
    // Claim: whatever the moment the server is killed (kill -9 during a send, a
    // commit, a checkpoint...), every message it acknowledged is in the database
    // file, and a restarted server serves it; ids stay unique across crashes. Ten
    // rounds on the same database: six senders as fast as acks allow, killed after a
    // random 50-500 ms; the file is checked right after each kill, before the next
    // start, and the API after each restart.
    let dir = TempDir::new();
    let mut all: Vec<(i64, String)> = Vec::new();
    for round in 0..10 {
        let mut srv = Server::start_in(dir.path(), &["--msg-rate", "0"]);
        if round == 0 {
            register(&srv, "alice");
        }
        let token = access(&login(&srv, "alice"));
        // Everything acked before the previous kills is served after this restart.
        let stored: BTreeMap<i64, Value> = all_messages(&srv, &token, "general")
            .into_iter()
            .map(|m| (m["id"].as_i64().unwrap(), m))
            .collect();
        for (id, body) in &all {
            let m = stored.get(id).unwrap_or_else(|| {
                panic!("acked message {id} ({body}) missing after restart {round}")
            });
            assert_eq!(m["body"], body.as_str());
        }

        let (threads, acked, _) = start_senders(&srv, &token, 6, 10 * round);
        // The passage of a random time is the point here: kill at an arbitrary moment.
        let delay = random_ms(50, 500);
        thread::sleep(Duration::from_millis(delay));
        srv.kill9();
        for t in threads {
            t.join().expect("sender thread panicked");
        }
        let acked = acked.lock().unwrap().clone();
        eprintln!(
            "round {round}: killed after {delay} ms, {} acks",
            acked.len()
        );
        all.extend(acked);
        let ids: BTreeSet<i64> = all.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), all.len(), "ack ids are unique across crashes");
        assert_all_in_file(dir.path(), &all, &format!("after kill -9 in round {round}"));
    }
    assert!(!all.is_empty(), "no message was acknowledged in ten rounds");
    // And after the last crash too.
    assert_all_present(dir.path(), &all);
}

#[test]
fn sigterm_under_load_closes_every_socket_with_1001_and_keeps_every_ack() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &["--msg-rate", "0"]);
    register(&srv, "alice");
    let token = access(&login(&srv, "alice"));
    let (threads, acked, count) = start_senders(&srv, &token, 8, 0);
    wait_for_acks(&count, 200);
    srv.sigterm();
    let endings: Vec<Ending> = threads
        .into_iter()
        .map(|t| t.join().expect("sender thread panicked"))
        .collect();
    let status = srv
        .wait_exit(Duration::from_secs(15))
        .expect("server should exit after SIGTERM");
    assert!(status.success(), "exit status should be 0, got {status:?}");
    for (i, e) in endings.iter().enumerate() {
        assert_eq!(e, &Ending::Close(Some(1001)), "sender {i}'s socket");
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 20, "only {} acks", acked.len());
    assert_all_present(dir.path(), &acked);
}

#[test]
fn acked_dms_survive_kill_9() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    let mut ws = Ws::connect(&srv, &alice);
    let mut acked = Vec::new();
    for i in 0..30 {
        let body = format!("dm {i}");
        ws.send(&json!({"type": "dm", "to": "bob", "body": body, "ref": format!("{i}")}));
        loop {
            let v = ws.recv();
            if v["type"] == "ack" {
                acked.push((v["id"].as_i64().unwrap(), body));
                break;
            }
            if v["type"] == "error" && v["code"] == "rate_limited" {
                thread::sleep(Duration::from_millis(100));
                break;
            }
            assert_eq!(v["type"], "dm", "{v}");
        }
    }
    srv.kill9();
    let srv = Server::start_in(dir.path(), &[]);
    let bob = access(&login(&srv, "bob"));
    let r = srv.get("/api/dms/alice?limit=200", Some(&bob));
    assert_status(&r, 200);
    let got: Vec<(i64, String)> = r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_i64().unwrap(),
                m["body"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, acked);
}

fn shutdown_closes_sockets_with_1001(use_sigint: bool) {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &[]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    let mut idle = Ws::connect(&srv, &bob);
    idle.ping();
    let (_, id) = a.send_msg("general", "before shutdown");

    if use_sigint {
        srv.sigint();
    } else {
        srv.sigterm();
    }
    assert_eq!(a.expect_close(), Some(1001), "joined socket");
    assert_eq!(b.expect_close(), Some(1001), "second joined socket");
    assert_eq!(idle.expect_close(), Some(1001), "socket in no room");
    let status = srv
        .wait_exit(Duration::from_secs(15))
        .expect("server should exit after the signal");
    assert!(status.success(), "exit status should be 0, got {status:?}");
    // The process is gone and so is everything it held open (its listener included):
    // its output pipes reach end-of-file. (Reconnecting to the old port would race
    // with other tests that may have been given that port since.)
    wait_until(
        Duration::from_secs(10),
        "the server's pipes to close",
        || srv.pipes_closed(),
    );

    // The data is intact on restart.
    let srv = Server::start_in(dir.path(), &[]);
    let r = srv.get("/api/rooms/general/messages", Some(&alice));
    assert_status(&r, 200);
    assert_eq!(ids_of(&r.json()["messages"]), vec![id]);
}

#[test]
fn sigterm_closes_sockets_with_1001_and_exits_0() {
    shutdown_closes_sockets_with_1001(false);
}

#[test]
fn sigint_closes_sockets_with_1001_and_exits_0() {
    shutdown_closes_sockets_with_1001(true);
}

// ---------------------------------------------------------------------------------
// an ack means the message is on disk
// ---------------------------------------------------------------------------------

/// Asserts that no frame at all arrives on `ws` for `quiet`.
#[track_caller]
fn assert_silent(ws: &mut Ws, quiet: Duration, what: &str) {
    ws.stream().set_read_timeout(Some(quiet)).unwrap();
    match ws.ws.read() {
        Err(tungstenite::Error::Io(e))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("{what}: expected nothing for {quiet:?}, got {other:?}"),
    }
    ws.stream().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// The body of message `id` in the database file, if it is there.
fn stored_body(dir: &std::path::Path, id: i64) -> Option<String> {
    open_db(&dir.join("chat.db"))
        .query_row("SELECT body FROM messages WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .map(Some)
        .unwrap_or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => None,
            e => panic!("query: {e}"),
        })
}

/// Two users joined to `general` on a fresh server in `dir`: (server, alice's
/// socket, bob's socket), with every presence frame already read.
fn two_in_general(dir: &std::path::Path) -> (Server, Ws, Ws) {
    let srv = Server::start_in(dir, &["--msg-rate", "0"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let mut b = Ws::connect(&srv, &bob);
    b.join("general");
    // alice is told bob arrived (presence comes through the fan-out, so wait for it);
    // after that nothing else is pending for either socket.
    let p = a.recv();
    assert_eq!(p["type"], "presence", "{p}");
    assert_eq!(p["user"], "bob", "{p}");
    a.ping();
    b.ping();
    (srv, a, b)
}

#[test]
fn no_ack_or_broadcast_while_the_database_cannot_be_written() {
    // Claim: "An ack means the message is on disk", and messages are "stored first,
    // then" broadcast. While the test holds the database's write lock (as sqlite3
    // could), a send gets neither its ack nor its broadcast; once the lock is
    // released (well inside the writer's 5 s busy timeout) both come, and the row is
    // in the file.
    let dir = TempDir::new();
    let (_srv, mut a, mut b) = two_in_general(dir.path());
    let lock = open_db(&dir.path().join("chat.db"));
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let held = Instant::now();
    a.send(&json!({"type": "send", "room": "general", "body": "held back", "ref": "h"}));
    assert_silent(
        &mut a,
        Duration::from_secs(1),
        "the sender, while the lock is held",
    );
    assert_silent(
        &mut b,
        Duration::from_millis(100),
        "bob, while the lock is held",
    );
    assert!(
        held.elapsed() < Duration::from_secs(4),
        "test premise: the lock was held well under the writer's 5 s busy timeout"
    );
    lock.execute_batch("ROLLBACK").unwrap();

    let m = a.recv();
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["body"], "held back");
    let ack = a.recv();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["ref"], "h");
    assert_eq!(ack["id"], m["id"]);
    assert_eq!(b.recv(), m, "bob gets the broadcast after the commit");
    let id = ack["id"].as_i64().unwrap();
    assert_eq!(stored_body(dir.path(), id).as_deref(), Some("held back"));
}

#[test]
fn a_failed_commit_is_never_acked_or_broadcast() {
    // Claim: the ack (and the broadcast) follow the COMMIT, not the INSERT. A trap
    // set in the file makes the writer's COMMIT fail for one message body: a deferred
    // foreign key that only COMMIT checks. That send must get an error, never an
    // ack; bob must not see it; it is not in the file; the next send works.
    let dir = TempDir::new();
    let (_srv, mut a, mut b) = two_in_general(dir.path());
    open_db(&dir.path().join("chat.db"))
        .execute_batch(
            "CREATE TABLE test_trap_parent(id INTEGER PRIMARY KEY);
             CREATE TABLE test_trap(x INTEGER REFERENCES test_trap_parent(id)
                                    DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER test_trap_fire AFTER INSERT ON messages
               WHEN NEW.body = 'doomed'
               BEGIN INSERT INTO test_trap(x) VALUES (42); END;",
        )
        .unwrap();

    a.send(&json!({"type": "send", "room": "general", "body": "doomed", "ref": "d"}));
    let v = reply_to(&mut a, "d", &[]);
    assert_eq!(v["type"], "error", "a send whose COMMIT failed: {v}");
    assert_silent(
        &mut b,
        Duration::from_millis(300),
        "bob, after a failed commit",
    );
    let n: i64 = open_db(&dir.path().join("chat.db"))
        .query_row(
            "SELECT count(*) FROM messages WHERE body = 'doomed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0, "the failed message is not in the file");

    // Other messages are unaffected.
    let (m, id) = a.send_msg("general", "fine");
    assert_eq!(b.recv(), m);
    assert_eq!(stored_body(dir.path(), id).as_deref(), Some("fine"));
}
