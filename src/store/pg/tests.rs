//! Tests of the PostgreSQL engine against a real server: set `PARLEY_TEST_POSTGRES` to
//! a server URL without a database (e.g. `postgres://parley@127.0.0.1:55432`, which
//! `.ci/postgres` prints). Each test creates a database of its own and drops it after;
//! without the variable each test says it was skipped and passes.
//!
//! They run on the test harness's threads, plus the engine's own `pg-writer` and
//! `pg-done`, which every test stops with `close`.

use super::writer::Locks;
use super::*;
use crate::model::{Page, Room, Stored};
use crate::store::audit::AuditEntry;
use crate::store::messages::Sender;
use crate::store::users::{RefreshOutcome, Rotation, GUARD_PERMISSION};
use crate::store::{Location, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// A database of its own on the test server, dropped when this is.
struct TestDb {
    server: String,
    name: String,
    url: String,
}

impl TestDb {
    /// A fresh database, or `None` (after saying so) without `PARLEY_TEST_POSTGRES`.
    fn new(test: &str) -> Option<TestDb> {
        let Ok(server) = std::env::var("PARLEY_TEST_POSTGRES") else {
            eprintln!("{test}: skipped (set PARLEY_TEST_POSTGRES to a PostgreSQL server URL)");
            return None;
        };
        static N: AtomicU64 = AtomicU64::new(0);
        let server = server.trim_end_matches('/').to_owned();
        let name = format!(
            "parley_unit_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            crate::clock::now_unix()
        );
        let mut admin = Client::connect(&format!("{server}/postgres"), NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = format!("{server}/{name}");
        Some(TestDb { server, name, url })
    }

    /// A client of its own on the database, as psql would be.
    fn shell(&self) -> Client {
        Client::connect(&self.url, NoTls).unwrap()
    }

    fn open(&self) -> Postgres {
        Postgres::open(&self.url).unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&format!("{}/postgres", self.server), NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

fn now() -> String {
    crate::clock::now_rfc3339()
}

fn general(pg: &Postgres) -> Room {
    pg.room("general").unwrap().unwrap()
}

fn sender(id: i64, name: &str, client_id: Option<&str>) -> Sender {
    Sender {
        id,
        name: name.into(),
        client_id: client_id.map(str::to_owned),
    }
}

/// Sends a room message and waits for its completion.
fn send(pg: &Postgres, room: &Room, from: Sender, body: &str) -> Result<Stored<Message>> {
    let (tx, rx) = mpsc::channel();
    pg.insert_message(room.clone(), from, body.into(), move |r| {
        tx.send(r).unwrap()
    });
    rx.recv().unwrap()
}

use crate::model::Message;

fn entry(actor: &str, action: &'static str) -> AuditEntry {
    AuditEntry {
        actor: Some(actor.into()),
        action,
        target: Some("general".into()),
        ip: Some("127.0.0.1".into()),
        detail: serde_json::json!({"n": 1, "why": "test"}),
    }
}

#[test]
fn open_creates_the_schema_and_general_and_reopening_changes_nothing() {
    let Some(db) = TestDb::new("open_creates_the_schema") else {
        return;
    };
    // Two nodes starting at once: the layout is created once, and both open.
    let opens: Vec<_> = (0..2)
        .map(|_| {
            let url = db.url.clone();
            std::thread::spawn(move || Store::open_at(&Location::Postgres(url)))
        })
        .collect();
    for o in opens {
        o.join().unwrap().unwrap().close();
    }
    let store = Store::open_at(&Location::Postgres(db.url.clone())).unwrap();
    let rooms = store.rooms(None, 10).unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].name, "general");
    let at = &rooms[0].created_at;
    assert!(
        at.len() == 24 && at.ends_with('Z') && humantime::parse_rfc3339(at).is_ok(),
        "{at} is RFC 3339 with milliseconds, as SQLite stores it"
    );
    assert!(matches!(
        store.cap_size(1 << 20),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.backup(Path::new("/nonexistent")),
        Err(StoreError::Conflict(_))
    ));
    store.close();
    let store = Store::open_at(&Location::Postgres(db.url.clone())).unwrap();
    assert_eq!(store.rooms(None, 10).unwrap().len(), 1);
    assert_eq!(
        store.setting("login_epoch").unwrap(),
        Some(b"0".to_vec()),
        "seeded once"
    );
    store.close();

    let mut shell = db.shell();
    let v: i32 = shell
        .query_one("SELECT version FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(i64::from(v), SCHEMA_VERSION);
    shell
        .batch_execute("UPDATE schema_version SET version = 5")
        .unwrap();
    match Postgres::open(&db.url) {
        Err(StoreError::Conflict(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("a newer layout was not refused: {:?}", other.err()),
    }
}

#[test]
fn a_database_with_other_tables_or_a_bad_url_is_refused() {
    let Some(db) = TestDb::new("a_database_with_other_tables") else {
        return;
    };
    db.shell().batch_execute("CREATE TABLE t (x int)").unwrap();
    assert!(matches!(
        Postgres::open(&db.url),
        Err(StoreError::Conflict(_))
    ));
    // No password in an error, whatever goes wrong.
    let bad = "postgres://parley:s3cretpw@127.0.0.1:1/x?connect_timeout=2";
    match Postgres::open(bad) {
        Err(StoreError::Postgres(m)) => assert!(!m.contains("s3cretpw"), "{m}"),
        other => panic!("expected a connection error, got {:?}", other.err()),
    }
    match Postgres::open("postgres://parley:s3cretpw@127.0.0.1:notaport/x") {
        Err(StoreError::Postgres(m)) => assert!(!m.contains("s3cretpw"), "{m}"),
        other => panic!("expected a URL error, got {:?}", other.err()),
    }
}

#[test]
fn usernames_are_unique_case_insensitively() {
    let Some(db) = TestDb::new("usernames_are_unique") else {
        return;
    };
    let pg = db.open();
    let alice = pg.create_user("Alice", "h".into(), None, now()).unwrap();
    assert_eq!(alice.roles, vec!["admin"], "the first account is the admin");
    assert_eq!(
        pg.create_user("aLICE", "h".into(), None, now()),
        Err(StoreError::Conflict("username is taken".into()))
    );
    let bob = pg.create_user("bob", "h".into(), None, now()).unwrap();
    assert_eq!(bob.roles, vec!["member"]);
    assert!(bob.id > alice.id);
    assert!(matches!(
        pg.create_user("carol", "h".into(), Some("nope".into()), now()),
        Err(StoreError::NotFound(_))
    ));
    let found = pg.user_by_name("ALICE").unwrap().unwrap();
    assert_eq!((found.id, found.username.as_str()), (alice.id, "Alice"));
    assert!(pg.user_by_name("nobody").unwrap().is_none());
    let listed = pg.list_users("AL", None, 10).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].user.roles, vec!["admin"]);
    let all = pg.list_users("", None, 10).unwrap();
    let names: Vec<_> = all.iter().map(|l| l.user.username.as_str()).collect();
    assert_eq!(names, ["Alice", "bob"]);
    let after = pg.list_users("", Some("ALICE"), 10).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(
        pg.list_users("a%", None, 10).unwrap().len(),
        0,
        "% is literal"
    );
    assert_eq!(
        pg.users_with_roles(&["admin".into(), "member".into()])
            .unwrap(),
        vec![alice.id, bob.id]
    );
    assert!(pg.has_permission(alice.id, "role.assign").unwrap());
    assert!(!pg.has_permission(bob.id, "role.assign").unwrap());

    // Reads work on a socket thread's small stack too (128 KiB, the default).
    let pg = Arc::new(pg);
    let on_small_stack = pg.clone();
    let found = std::thread::Builder::new()
        .stack_size(128 * 1024)
        .spawn(move || {
            on_small_stack.readers.close_idle();
            on_small_stack.user_by_name("bob").unwrap()
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(found.map(|u| u.id), Some(bob.id));
    pg.close();
}

#[test]
fn a_message_completes_after_its_commit_with_growing_ids() {
    let Some(db) = TestDb::new("a_message_completes_after_its_commit") else {
        return;
    };
    let pg = db.open();
    let u = pg.create_user("alice", "h".into(), None, now()).unwrap();
    let room = general(&pg);
    let shell = Arc::new(Mutex::new(db.shell()));
    let (tx, rx) = mpsc::channel();
    for i in 0..50 {
        let (tx, shell) = (tx.clone(), shell.clone());
        pg.insert_message(
            room.clone(),
            sender(u.id, "alice", None),
            format!("m{i}"),
            move |r| {
                let id = r.unwrap().id();
                // Another session sees the row: the completion ran after COMMIT.
                let seen: i64 = lock(&shell)
                    .query_one("SELECT count(*) FROM messages WHERE id = $1", &[&id])
                    .unwrap()
                    .get(0);
                let thread = std::thread::current().name().map(str::to_owned);
                tx.send((id, seen, thread)).unwrap();
            },
        );
    }
    let got: Vec<_> = (0..50).map(|_| rx.recv().unwrap()).collect();
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "ids grow in completion order"
    );
    assert!(got.iter().all(|(_, seen, _)| *seen == 1));
    assert!(got.iter().all(|(_, _, t)| t.as_deref() == Some("pg-done")));

    // A once-only key stores once; the repeat names the first.
    let first = send(&pg, &room, sender(u.id, "alice", Some("k1")), "once").unwrap();
    let Stored::New(m) = first else {
        panic!("the first send was not stored")
    };
    assert_eq!(m.client_id.as_deref(), Some("k1"));
    let again = send(&pg, &room, sender(u.id, "alice", Some("k1")), "once").unwrap();
    assert_eq!(again, Stored::Repeat(m.id));
    match pg.sent_with(u.id, "k1").unwrap() {
        Some(crate::store::messages::Sent::Room(Some(s))) => assert_eq!(s, m),
        other => panic!("{other:?}"),
    }
    assert_eq!(pg.writer_stats().queued.load(Ordering::Relaxed), 0);
    pg.close();
}

/// While another node's transaction holds the id-order lock, a message waits: it can
/// neither take an id nor commit before that transaction ends.
#[test]
fn a_message_waits_for_the_id_order_lock() {
    let Some(db) = TestDb::new("a_message_waits_for_the_id_order_lock") else {
        return;
    };
    let pg = db.open();
    let u = pg.create_user("alice", "h".into(), None, now()).unwrap();
    let key = Locks::ORDER.keys().next().unwrap();
    let mut other = db.shell();
    let mut held = other.transaction().unwrap();
    held.execute("SELECT pg_advisory_xact_lock($1)", &[&key])
        .unwrap();
    let (tx, rx) = mpsc::channel();
    pg.insert_message(
        general(&pg),
        sender(u.id, "alice", None),
        "hi".into(),
        move |r| tx.send(r).unwrap(),
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "stored while another node held the lock"
    );
    held.commit().unwrap();
    let stored = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert!(matches!(stored, Stored::New(_)));
    pg.close();
}

#[test]
fn history_pages_by_id_and_leaves_deleted_messages_out() {
    let Some(db) = TestDb::new("history_pages_by_id") else {
        return;
    };
    let pg = db.open();
    let a = pg.create_user("alice", "h".into(), None, now()).unwrap();
    let b = pg.create_user("bob", "h".into(), None, now()).unwrap();
    let room = general(&pg);
    let ids: Vec<i64> = (0..10)
        .map(|i| {
            send(&pg, &room, sender(a.id, "alice", None), &format!("m{i}"))
                .unwrap()
                .id()
        })
        .collect();
    let page = |before, after, limit| {
        pg.room_history(
            &room,
            Page {
                before,
                after,
                limit,
            },
        )
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect::<Vec<_>>()
    };
    assert_eq!(page(None, None, 3), ids[7..10]);
    assert_eq!(page(Some(ids[7]), None, 3), ids[4..7]);
    assert_eq!(page(None, Some(ids[1]), 3), ids[2..5]);
    assert_eq!(page(None, None, 50), ids);

    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    pg.delete_message(ids[9], b.id, now(), move |r| tx.send(r).unwrap());
    pg.delete_message(ids[9], b.id, now(), move |r| tx2.send(r).unwrap());
    assert_eq!(rx.recv().unwrap(), Ok("general".to_owned()));
    assert!(matches!(rx.recv().unwrap(), Err(StoreError::NotFound(_))));
    assert_eq!(page(None, None, 3), ids[6..9]);

    // Direct messages page the same way, in both directions of the pair.
    let mut dms = Vec::new();
    for i in 0..4 {
        let (from, to) = if i % 2 == 0 {
            (sender(a.id, "alice", None), (b.id, "bob".to_owned()))
        } else {
            (sender(b.id, "bob", None), (a.id, "alice".to_owned()))
        };
        let (tx, rx) = mpsc::channel();
        pg.insert_dm(from, to, format!("d{i}"), move |r| tx.send(r).unwrap());
        dms.push(rx.recv().unwrap().unwrap().id());
    }
    let got: Vec<i64> = pg
        .dm_history(
            b.id,
            a.id,
            Page {
                before: None,
                after: None,
                limit: 3,
            },
        )
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(got, dms[1..4]);
    let convs = pg.conversations(a.id, 10).unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].id, convs[0].from.as_str()), (dms[3], "bob"));
    pg.close();
}

#[test]
fn the_audit_chain_verifies_and_shows_tampering() {
    let Some(db) = TestDb::new("the_audit_chain_verifies") else {
        return;
    };
    let pg = db.open();
    pg.audit(entry("alice", "login"));
    pg.audit(entry("alice", "logout"));
    pg.audit(entry("alice", "ban"));
    pg.sync();
    assert_eq!(pg.verify_audit_chain().unwrap(), None);
    let events = pg.audit_events(10, None).unwrap();
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [3, 2, 1]);
    assert_eq!(events[0].action, "ban");
    assert_eq!(events[0].detail, serde_json::json!({"n": 1, "why": "test"}));
    assert_eq!(pg.audit_events(10, Some(2)).unwrap().len(), 1);

    // The newest row deleted by hand: the next one does not take its id.
    let mut shell = db.shell();
    shell
        .batch_execute("DELETE FROM audit_log WHERE id = 3")
        .unwrap();
    pg.audit(entry("alice", "login"));
    pg.sync();
    assert_eq!(
        pg.verify_audit_chain().unwrap(),
        Some((3, "was deleted (the next row present is 4)".into()))
    );
    shell
        .batch_execute("UPDATE audit_log SET actor = 'mallory' WHERE id = 1")
        .unwrap();
    assert_eq!(
        pg.verify_audit_chain().unwrap(),
        Some((1, "its content was changed".into()))
    );
    pg.close();
}

#[test]
fn the_watcher_sees_a_ban_from_any_session() {
    let Some(db) = TestDb::new("the_watcher_sees_a_ban") else {
        return;
    };
    let pg = db.open();
    let mut w = pg.watcher().unwrap();
    let admin = pg.create_user("admin", "h".into(), None, now()).unwrap();
    let bob = pg.create_user("bob", "h".into(), None, now()).unwrap();
    let rec = pg.user_by_id(bob.id).unwrap().unwrap();
    pg.start_session(&rec, "s1".into(), None, "r1".into(), u64::MAX / 4, now())
        .unwrap();
    assert!(!w.logins_changed(), "new accounts and logins end nothing");
    send(&pg, &general(&pg), sender(admin.id, "admin", None), "hi").unwrap();
    assert!(!w.logins_changed(), "a message ends no login");
    assert!(pg.session_alive("s1", bob.id).unwrap());
    assert!(pg
        .set_banned(bob.id, true, GUARD_PERMISSION, now())
        .unwrap());
    assert!(w.logins_changed(), "a ban");
    assert!(!w.logins_changed(), "nothing since");
    assert!(!pg.session_alive("s1", bob.id).unwrap());
    let mut shell = db.shell();
    shell
        .batch_execute("UPDATE users SET stamp = 'new' WHERE username = 'admin'")
        .unwrap();
    assert!(w.logins_changed(), "a change made in psql");
    shell
        .batch_execute("DELETE FROM settings WHERE key = 'login_epoch'")
        .unwrap();
    assert!(w.logins_changed());
    assert!(w.logins_changed(), "without the count every call counts");
    pg.close();
}

#[test]
fn accounts_keep_an_admin_and_refresh_tokens_rotate_once() {
    let Some(db) = TestDb::new("accounts_keep_an_admin") else {
        return;
    };
    let pg = db.open();
    let admin = pg.create_user("admin", "h".into(), None, now()).unwrap();
    let bob = pg.create_user("bob", "h".into(), None, now()).unwrap();
    let last = Err(StoreError::Conflict(
        "that would leave no unbanned admin (nobody could assign roles or lift bans)".into(),
    ));
    assert_eq!(pg.set_banned(admin.id, true, GUARD_PERMISSION, now()), last);
    assert_eq!(
        pg.set_roles(admin.id, vec!["member".into()], GUARD_PERMISSION)
            .map(|_| ()),
        last.clone().map(|_: bool| ())
    );
    let change = pg
        .set_roles(
            bob.id,
            vec!["admin".into(), "moderator".into()],
            GUARD_PERMISSION,
        )
        .unwrap();
    assert_eq!(change.from, vec!["member"]);
    assert_eq!(change.to, vec!["admin", "moderator"]);
    assert!(pg
        .set_banned(admin.id, true, GUARD_PERMISSION, now())
        .unwrap());
    assert!(pg
        .set_banned(admin.id, false, GUARD_PERMISSION, now())
        .unwrap());

    let rec = pg.user_by_id(bob.id).unwrap().unwrap();
    let t0 = crate::clock::now_unix();
    pg.start_session(
        &rec,
        "s1".into(),
        Some("10.0.0.1".into()),
        "r1".into(),
        t0 + 600,
        now(),
    )
    .unwrap();
    let login = pg.token_login(bob.id, "s1").unwrap().unwrap();
    assert!(login.live && !login.banned);
    assert_eq!(
        pg.refresh_token_session("r1").unwrap(),
        Some(("s1".into(), bob.id))
    );
    let rotate = |old: &str, new: &str| {
        pg.rotate_refresh(Rotation {
            old_hash: old.into(),
            new_hash: new.into(),
            new_expires_at: t0 + 600,
            now_unix: t0,
            now: now(),
            grace_secs: 0,
        })
        .unwrap()
    };
    let sid = "s1".to_owned();
    assert_eq!(
        rotate("r1", "r2"),
        RefreshOutcome::Rotated {
            user_id: bob.id,
            sid: sid.clone()
        }
    );
    assert_eq!(
        rotate("r1", "r3"),
        RefreshOutcome::Reused {
            user_id: bob.id,
            sid
        }
    );
    assert_eq!(
        rotate("r2", "r4"),
        RefreshOutcome::Invalid,
        "the login is revoked"
    );
    assert!(
        !pg.revoke_session("s1", "logout", now()).unwrap(),
        "already revoked"
    );
    assert_eq!(
        pg.token_login(bob.id, "s1").unwrap().map(|l| l.live),
        Some(false)
    );

    pg.rehash_password(bob.id, "h".into(), "$2b$12$x".into())
        .unwrap();
    let mut prefixes = pg.password_hash_prefixes().unwrap();
    prefixes.sort();
    assert_eq!(prefixes, vec!["$2b$12$", "h"]);
    pg.close();
}

/// A job that fails or panics is rolled back alone; its neighbours commit, and the
/// writer refuses to wait on itself.
#[test]
fn a_failing_or_panicking_job_rolls_back_alone() {
    let Some(db) = TestDb::new("a_failing_or_panicking_job") else {
        return;
    };
    let pg = Arc::new(db.open());
    let put = |key: &'static str| {
        move |c: &mut Tx<'_, '_>| -> Result<()> {
            c.execute(
                "INSERT INTO settings(key, value) VALUES ($1, '\\x01')",
                &[&key],
            )?;
            Ok(())
        }
    };
    let (tx, rx) = mpsc::channel();
    let report = |name: &'static str| {
        let tx = tx.clone();
        move |r: Result<()>| tx.send((name, r)).unwrap()
    };
    pg.submit(Locks::NONE, put("ok1"), report("ok1"));
    pg.submit(
        Locks::NONE,
        move |c| {
            put("failing")(c)?;
            Err(StoreError::Conflict("refused".into()))
        },
        report("failing"),
    );
    pg.submit(
        Locks::NONE,
        move |c| {
            put("panicking")(c)?;
            panic!("a bug in a job")
        },
        report("panicking"),
    );
    // A statement error (a duplicate key) is rolled back to the savepoint.
    pg.submit(Locks::NONE, put("ok1"), report("duplicate"));
    pg.submit(Locks::NONE, put("ok2"), report("ok2"));
    let mut got: Vec<_> = (0..5).map(|_| rx.recv().unwrap()).collect();
    got.sort_by_key(|(n, _)| *n);
    assert!(
        matches!(got[0], ("duplicate", Err(StoreError::Postgres(_)))),
        "{got:?}"
    );
    assert_eq!(
        got[1],
        ("failing", Err(StoreError::Conflict("refused".into())))
    );
    assert_eq!(got[2], ("ok1", Ok(())));
    assert_eq!(got[3], ("ok2", Ok(())));
    assert_eq!(got[4], ("panicking", Err(StoreError::Panicked)));
    assert!(pg.setting("ok1").unwrap().is_some());
    assert!(pg.setting("ok2").unwrap().is_some());
    assert!(pg.setting("failing").unwrap().is_none());
    assert!(pg.setting("panicking").unwrap().is_none());

    let inner = pg.clone();
    let r = pg.write(Locks::NONE, move |_| {
        Ok(inner.write(Locks::NONE, |_| Ok(())))
    });
    assert_eq!(r, Ok(Err(StoreError::Reentrant)));
    assert_eq!(pg.setting_or_insert("k", b"a".to_vec()).unwrap(), b"a");
    assert_eq!(pg.setting_or_insert("k", b"b".to_vec()).unwrap(), b"a");
    pg.close();
    assert_eq!(
        pg.setting_or_insert("k2", b"a".to_vec()),
        Err(StoreError::Closed)
    );
}

/// After the server dropped every connection (a restart), the next read and the next
/// write work: dead pooled clients are replaced, and so is the writer's.
#[test]
fn reads_and_writes_survive_lost_connections() {
    let Some(db) = TestDb::new("reads_and_writes_survive_lost_connections") else {
        return;
    };
    let pg = db.open();
    let u = pg.create_user("alice", "h".into(), None, now()).unwrap();
    assert!(pg.user_by_name("alice").unwrap().is_some());
    let mut w = pg.watcher().unwrap();
    let killed: i64 = db
        .shell()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 3, "writer, reader and watcher: {killed}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(pg.user_by_name("alice").unwrap().is_some());
    assert_eq!(pg.create_room("r1", u.id, now()).unwrap().name, "r1");
    assert!(!w.logins_changed(), "no change, only a lost connection");
    assert!(pg.set_banned(u.id, false, GUARD_PERMISSION, now()).is_ok());
    pg.revoke_session("none", "logout", now()).unwrap();
    pg.close();
}

/// A write that waits for a lock past the writer's lock timeout fails as busy, like
/// SQLite's busy timeout, and the writer goes on.
#[test]
fn a_write_held_up_past_the_lock_timeout_is_busy() {
    let Some(db) = TestDb::new("a_write_held_up_past_the_lock_timeout") else {
        return;
    };
    let pg = db.open();
    let u = pg.create_user("alice", "h".into(), None, now()).unwrap();
    let mut other = db.shell();
    let mut held = other.transaction().unwrap();
    held.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&Locks::ORDER.keys().next().unwrap()],
    )
    .unwrap();
    let r = send(&pg, &general(&pg), sender(u.id, "alice", None), "hi");
    assert_eq!(r, Err(StoreError::Busy));
    held.rollback().unwrap();
    assert!(send(&pg, &general(&pg), sender(u.id, "alice", None), "hi").is_ok());
    pg.close();
}

/// Two nodes on one database: what one stores, the other hears, in id order and whole
/// (a long message goes in parts); nobody hears their own notices.
#[test]
fn nodes_hear_each_others_notices() {
    use crate::store::notice::Notice;
    let Some(db) = TestDb::new("nodes_hear_each_others_notices") else {
        return;
    };
    let a = db.open();
    let b = db.open();
    let (tx, heard_by_b) = mpsc::channel();
    b.listen(Box::new(move |_, n| tx.send(n).unwrap())).unwrap();
    assert!(matches!(
        b.listen(Box::new(|_, _| {})),
        Err(StoreError::Conflict(_))
    ));
    let (tx, heard_by_a) = mpsc::channel();
    a.listen(Box::new(move |_, n| tx.send(n).unwrap())).unwrap();
    let alice = a.create_user("alice", "h".into(), None, now()).unwrap();
    let bob = a.create_user("bob", "h".into(), None, now()).unwrap();
    let room = general(&a);
    let long = "€".repeat(4000);
    let mut sent = Vec::new();
    for body in ["one", long.as_str(), "three"] {
        match send(&a, &room, sender(alice.id, "alice", None), body).unwrap() {
            Stored::New(m) => sent.push(m),
            Stored::Repeat(_) => panic!("not a repeat"),
        }
    }
    let wait = |rx: &mpsc::Receiver<Notice>| rx.recv_timeout(Duration::from_secs(5)).unwrap();
    for m in &sent {
        assert_eq!(wait(&heard_by_b), Notice::Message { message: m.clone() });
    }
    let (tx, rx) = mpsc::channel();
    a.insert_dm(
        sender(alice.id, "alice", None),
        (bob.id, "bob".into()),
        "psst".into(),
        move |r| tx.send(r).unwrap(),
    );
    let Stored::New(dm) = rx.recv().unwrap().unwrap() else {
        panic!("not stored")
    };
    assert_eq!(
        wait(&heard_by_b),
        Notice::Dm {
            dm,
            users: [alice.id, bob.id]
        }
    );
    let (tx, rx) = mpsc::channel();
    a.delete_message(sent[0].id, bob.id, now(), move |r| tx.send(r).unwrap());
    rx.recv().unwrap().unwrap();
    assert_eq!(
        wait(&heard_by_b),
        Notice::Deleted {
            deleted: crate::model::Deleted {
                id: sent[0].id,
                room: "general".into(),
                by: "bob".into()
            }
        }
    );
    a.notify(Notice::Kick { user_id: bob.id });
    assert_eq!(wait(&heard_by_b), Notice::Kick { user_id: bob.id });
    // B's own notice reaches A, not B.
    b.notify(Notice::Kick { user_id: alice.id });
    assert_eq!(wait(&heard_by_a), Notice::Kick { user_id: alice.id });
    assert!(heard_by_a.try_recv().is_err(), "A heard nothing of its own");
    a.sync();
    b.sync();
    assert!(
        heard_by_b.recv_timeout(Duration::from_millis(200)).is_err(),
        "B heard nothing of its own"
    );

    // B's listening connection is lost: it listens again, says that it missed notices,
    // and hears what follows.
    let killed: i64 = db
        .shell()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 2, "both listeners");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wait(&heard_by_b), Notice::Missed);
    a.notify(Notice::Kick { user_id: 42 });
    assert_eq!(wait(&heard_by_b), Notice::Kick { user_id: 42 });
    a.close();
    b.close();
}
