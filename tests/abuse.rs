//! Limits on what strangers and members can make the server store: registrations per
//! address, rooms per user.

mod common;

use common::*;
use serde_json::json;

/// `--register-rate` is a budget of its own per address: past it, 429 with
/// Retry-After and nothing created; logins are not affected.
#[test]
fn registrations_per_address_are_limited() {
    let srv = Server::start(&["--register-rate", "3", "--login-rate", "0"]);
    for name in ["ann", "bob", "cat"] {
        register(&srv, name);
    }
    let r = register_resp(&srv, "dan", PW);
    assert_error(&r, 429, "rate_limited");
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(
        wait > 60,
        "the budget refills over an hour, not seconds: {wait}"
    );
    assert_error(&login_resp(&srv, "dan", PW), 401, "unauthorized");
    // Logins have their own budget.
    for _ in 0..5 {
        login(&srv, "ann");
    }
}

/// `--register-rate 0` turns the limit off.
#[test]
fn zero_register_rate_is_off() {
    let srv = Server::start(&["--register-rate", "0"]);
    for i in 0..40 {
        register(&srv, &format!("user{i:02}"));
    }
}

/// `--room-rate` counts per user: past it, 429 and no room; another user still may.
#[test]
fn rooms_per_user_are_limited() {
    let srv = start_unlimited(&["--room-rate", "2"]);
    let alice = new_user(&srv, "alice");
    let bob = new_user(&srv, "bob");
    for name in ["r1", "r2"] {
        assert_status(
            &srv.post("/api/rooms", Some(&alice), &json!({"name": name})),
            201,
        );
    }
    let r = srv.post("/api/rooms", Some(&alice), &json!({"name": "r3"}));
    assert_error(&r, 429, "rate_limited");
    assert!(r.header("retry-after").is_some());
    let rooms = srv.get("/api/rooms", Some(&alice)).json();
    let names: Vec<&str> = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["general", "r1", "r2"]);
    assert_status(
        &srv.post("/api/rooms", Some(&bob), &json!({"name": "r3"})),
        201,
    );
}

fn audit_rows(db: &std::path::Path, action: &str) -> Vec<(Option<String>, serde_json::Value)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT ip, detail FROM audit_log WHERE action = ?1 ORDER BY id")
        .unwrap();
    let rows = st
        .query_map([action], |r| {
            let detail: String = r.get(1)?;
            Ok((r.get(0)?, serde_json::from_str(&detail).unwrap()))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// One client with no account sending tokenless upgrades over fresh connections (it
/// once wrote 47,054 audit rows in 5 s): the trail keeps one row for the first refusal
/// and one summary row counting the rest; past 60 a minute the answers are 429s, each
/// after the tarpit's pause.
#[test]
fn anonymous_refused_upgrades_are_cheap_and_folded() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &[]);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..30)
            .map(|_| {
                s.spawn(|| {
                    (0..4)
                        .map(|_| ws_handshake_raw(&srv, "/ws", &[]).status)
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(refused + limited, 120, "{statuses:?}");
    assert!(
        (60..=65).contains(&refused),
        "{refused} answered 401 at once"
    );
    let rows = audit_rows(&srv.db_path(), "ws_rejected");
    assert_eq!(rows.len(), 1, "one row while the window is open: {rows:?}");
    assert_eq!(rows[0].0.as_deref(), Some("127.0.0.1"));
    // The window's summary is written when it closes, at the latest at shutdown.
    srv.sigterm();
    assert!(srv.wait_exit(std::time::Duration::from_secs(15)).is_some());
    let rows = audit_rows(&dir.path().join("chat.db"), "ws_rejected");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1].1["repeated"], 119, "{rows:?}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn metric(srv: &Server, name: &str) -> u64 {
    let text = srv.get("/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

/// A socket that never reads and asks for the biggest history pages it can (200
/// messages of 4,000 control characters, each escaped to 6 bytes: ~4.8 MB a page)
/// every 50 ms once grew the server by ~90 MiB/s. Its queue is capped in bytes: it is
/// dropped with 1008 and the server stays within a bound — `--send-queue-bytes`
/// (4 MiB) plus one page per socket, with room here for the allocator's slack.
#[test]
fn one_reader_that_never_reads_cannot_eat_the_servers_memory() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let nasty = "\u{1}".repeat(4000);
    for _ in 0..200 {
        a.send_msg("general", &nasty);
    }
    let before = rss_kib(srv.pid());
    let mut hog = tiny_window_socket(&srv, &alice);
    let ask = json!({"type": "history", "room": "general", "limit": 200}).to_string();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut peak = before;
    while std::time::Instant::now() < until {
        if hog.send(tungstenite::Message::text(ask.clone())).is_err() {
            break;
        }
        peak = peak.max(rss_kib(srv.pid()));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(growth_mib < 48, "the server grew by {growth_mib} MiB");
    assert_eq!(metric(&srv, "parley_slow_clients_dropped_total"), 1);
    a.ping();
}

/// One socket cannot fill the writer's queue: while the database is locked (by the
/// test, as another process would), a socket that sends 500 messages without waiting
/// gets at most 64 of them queued; its reader waits for those before reading more.
/// All 500 are stored once the lock is gone.
#[test]
fn one_socket_keeps_at_most_64_writes_in_flight() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let lock = rusqlite::Connection::open(srv.db_path()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    for i in 0..500 {
        a.send(&json!({"type": "send", "room": "general", "body": format!("m{i}")}));
    }
    // The socket's first writes reach the queue; then it holds still.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while metric(&srv, "parley_db_queue_depth") < 64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes never queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let queued = metric(&srv, "parley_db_queue_depth");
    assert!(
        (60..=70).contains(&queued),
        "{queued} writes queued for one socket"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    let mut acks = 0;
    while acks < 500 {
        if a.recv()["type"] == "ack" {
            acks += 1;
        }
    }
    let r = srv.get("/api/rooms/general/messages?limit=1", Some(&alice));
    assert_eq!(r.json()["messages"][0]["body"], "m499");
}

/// REST writes count against the user's `--msg-rate` budget per second; reads and
/// logout do not.
#[test]
fn rest_writes_share_the_message_rate_budget() {
    let srv = Server::start(&["--msg-rate", "3", "--login-rate", "0", "--room-rate", "0"]);
    let alice = new_user(&srv, "alice");
    for i in 0..3 {
        let r = srv.post(
            "/api/rooms",
            Some(&alice),
            &json!({"name": format!("r{i}")}),
        );
        assert_status(&r, 201);
    }
    let r = srv.post("/api/rooms", Some(&alice), &json!({"name": "r3"}));
    assert_error(&r, 429, "rate_limited");
    for _ in 0..10 {
        assert_status(&srv.get("/api/rooms", Some(&alice)), 200);
    }
    assert_status(&srv.post_empty("/api/logout", Some(&alice)), 204);
}

/// Sends one message and returns its id, or the error frame it got instead.
fn try_send(ws: &mut Ws, body: &str) -> Result<i64, serde_json::Value> {
    let r = format!("s{}", unique());
    ws.send(&json!({"type": "send", "room": "general", "body": body, "ref": r}));
    loop {
        let v = ws.recv();
        if v["ref"] == r.as_str() {
            return match v["type"].as_str() {
                Some("ack") => Ok(v["id"].as_i64().unwrap()),
                _ => Err(v),
            };
        }
    }
}

/// A database at its size cap (`--max-db-mb 1`, as a full disk would be): sends get a
/// clear error and no ack, while logins and reads still work and nothing stored is
/// lost; once space returns (old messages deleted with sqlite3) sending works again,
/// without a restart.
#[test]
fn a_full_database_refuses_messages_and_recovers_by_itself() {
    let srv = start_unlimited(&["--max-db-mb", "1"]);
    let alice = new_user(&srv, "alice");
    let mut a = Ws::connect(&srv, &alice);
    a.join("general");
    let body = "x".repeat(3000);
    let mut acked = Vec::new();
    let refusal = loop {
        assert!(acked.len() < 1000, "never refused");
        match try_send(&mut a, &body) {
            Ok(id) => acked.push(id),
            Err(e) => break e,
        }
    };
    assert!(acked.len() > 50, "only {} messages fit", acked.len());
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["code"], "internal");
    assert!(
        refusal["message"].as_str().unwrap().contains("full"),
        "{refusal}"
    );
    // Refused again, while logins and reads go on.
    assert!(try_send(&mut a, "still full?").is_err());
    login(&srv, "alice");
    let page = srv
        .get("/api/rooms/general/messages?limit=200", Some(&alice))
        .json();
    let ids = ids_of(&page["messages"]);
    assert_eq!(
        ids.last(),
        acked.last(),
        "nothing past the refusals was stored"
    );
    let c = rusqlite::Connection::open(srv.db_path()).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let stored: i64 = c
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored as usize, acked.len(), "every acked message is there");
    // Space returns: the operator deletes the older half.
    let half = acked[acked.len() / 2];
    c.execute("DELETE FROM messages WHERE id <= ?1", [half])
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if try_send(&mut a, "room again").is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never accepted again");
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
}
