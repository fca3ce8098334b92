//! `parley migrate --from FILE --to postgres://...`: a community built on SQLite
//! through the real server moves to PostgreSQL intact — every row of every table with
//! its id, the signing key (old access tokens still work), refresh tokens, bans, roles,
//! history with its deletions, once-only keys, and an audit trail that still verifies
//! and continues — and a target that is not empty, or a source that is missing or not
//! parley's, is refused without changing anything.
//!
//! Needs `PARLEY_TEST_POSTGRES` (a PostgreSQL server URL without a database, e.g.
//! `postgres://parley@127.0.0.1:55432`, which `.ci/postgres start` prints) and a build
//! with `--features postgres`: `cargo test --features postgres --test migrate`.
#![cfg(feature = "postgres")]

mod common;

use common::*;
use rusqlite::types::ValueRef;
use serde_json::{json, Value};
use sha2::Digest;
use std::path::Path;
use std::time::{Duration, Instant};

/// Rate limits off: every test client comes from 127.0.0.1.
const FAST: &[&str] = &[
    "--login-rate",
    "0",
    "--msg-rate",
    "0",
    "--register-rate",
    "0",
    "--room-rate",
    "0",
];

/// The tables of `schema.sql` but `settings`, with their primary keys.
const TABLES: &[(&str, &str)] = &[
    ("users", "id"),
    ("roles", "name"),
    ("permissions", "name"),
    ("role_permissions", "role, permission"),
    ("user_roles", "user_id, role"),
    ("sessions", "id"),
    ("refresh_tokens", "token_hash"),
    ("rooms", "id"),
    ("messages", "id"),
    ("direct_messages", "id"),
    ("client_ids", "user_id, client_id"),
    ("audit_log", "id"),
];

/// A fresh PostgreSQL database; these tests cannot run without one.
#[track_caller]
fn target() -> PgDb {
    PgDb::create_if_enabled().unwrap_or_else(|| {
        panic!(
            "tests/migrate.rs needs {POSTGRES_ENV}: set it to a PostgreSQL server URL without \
             a database, e.g. postgres://parley@127.0.0.1:55432 (`.ci/postgres start` starts \
             one and prints it)"
        )
    })
}

fn pg_client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connect to the test database")
}

fn migrate(from: &str, to: &str) -> std::process::Output {
    run_cli(&["migrate", "--from", from, "--to", to], "")
}

fn sha256_file(path: &Path) -> Vec<u8> {
    sha2::Sha256::digest(std::fs::read(path).expect("read the file")).to_vec()
}

/// Sends a DM over `ws` and waits for its ack; returns the id.
#[track_caller]
fn send_dm(ws: &mut Ws, to: &str, body: &str, client_id: Option<&str>) -> i64 {
    let r = format!("d{}", unique());
    ws.send(&json!({"type": "dm", "to": to, "body": body, "ref": r, "client_id": client_id}));
    // The sender's own copy of the DM comes first (none for a repeat), then the ack.
    let v = ws.recv_skipping(&["presence", "dm", "message"]);
    assert_eq!(v["type"], "ack", "expected the DM's ack, got {v}");
    assert_eq!(v["ref"], r.as_str(), "{v}");
    v["id"].as_i64().expect("ack id")
}

/// Sends a room message with a once-only key; returns the acked id (the first
/// message's id, for a repeated key).
#[track_caller]
fn send_once(ws: &mut Ws, room: &str, body: &str, client_id: &str) -> i64 {
    let r = format!("o{}", unique());
    ws.send(&json!({"type": "send", "room": room, "body": body, "ref": r, "client_id": client_id}));
    let v = ws.recv_skipping(&["presence", "message"]);
    assert_eq!(v["type"], "ack", "expected an ack, got {v}");
    assert_eq!(v["ref"], r.as_str(), "{v}");
    v["id"].as_i64().expect("ack id")
}

/// `(id, username, roles, banned)` of every account, by name, as an admin sees them.
#[track_caller]
fn accounts(srv: &Server, admin: &str) -> Vec<(i64, String, Vec<String>, bool)> {
    let r = srv.get("/api/admin/users?limit=1000", Some(admin));
    assert_status(&r, 200);
    r.json()["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| {
            let mut roles: Vec<String> = u["roles"]
                .as_array()
                .expect("roles")
                .iter()
                .map(|r| r.as_str().expect("role").to_owned())
                .collect();
            roles.sort();
            (
                u["id"].as_i64().expect("id"),
                u["username"].as_str().expect("username").to_owned(),
                roles,
                u["banned"].as_bool().expect("banned"),
            )
        })
        .collect()
}

/// `(id, body)` of a page of history.
#[track_caller]
fn history(srv: &Server, token: &str, path: &str) -> Vec<(i64, String)> {
    let r = srv.get(path, Some(token));
    assert_status(&r, 200);
    r.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["id"].as_i64().expect("id"),
                m["body"].as_str().expect("body").to_owned(),
            )
        })
        .collect()
}

type Rows = Vec<Vec<Option<String>>>;

/// The column names of `table` in the SQLite file.
fn sqlite_columns(db: &rusqlite::Connection, table: &str) -> Vec<String> {
    db.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Every row of `table` in the SQLite file, each value as text (NULL as `None`).
fn sqlite_rows(db: &rusqlite::Connection, table: &str, order: &str) -> Rows {
    let columns = sqlite_columns(db, table);
    let sql = format!(
        "SELECT {} FROM {table} ORDER BY {order}",
        columns.join(", ")
    );
    let mut st = db.prepare(&sql).unwrap();
    let mut rows = st.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        out.push(
            (0..columns.len())
                .map(|i| match row.get_ref(i).unwrap() {
                    ValueRef::Null => None,
                    ValueRef::Integer(n) => Some(n.to_string()),
                    ValueRef::Real(f) => Some(f.to_string()),
                    ValueRef::Text(t) => Some(String::from_utf8(t.to_vec()).unwrap()),
                    ValueRef::Blob(b) => panic!("a blob in {table}: {b:?}"),
                })
                .collect(),
        );
    }
    out
}

/// The same columns of `table` in PostgreSQL, each value cast to text.
fn pg_rows(pg: &mut postgres::Client, table: &str, columns: &[String], order: &str) -> Rows {
    // Aliased: `ORDER BY id` must sort by the column, not by its text.
    let cast: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c}::text AS text_{i}"))
        .collect();
    let sql = format!("SELECT {} FROM {table} ORDER BY {order}", cast.join(", "));
    pg.query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| (0..columns.len()).map(|i| r.get(i)).collect())
        .collect()
}

/// `settings` in the SQLite file, as the bytes PostgreSQL should hold: numbers as
/// decimal ASCII.
fn sqlite_settings(db: &rusqlite::Connection) -> Vec<(String, Vec<u8>)> {
    let mut st = db
        .prepare("SELECT key, value FROM settings ORDER BY key")
        .unwrap();
    let mut rows = st.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        let value = match row.get_ref(1).unwrap() {
            ValueRef::Integer(n) => n.to_string().into_bytes(),
            ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
            other => panic!("unexpected setting value {other:?}"),
        };
        out.push((row.get(0).unwrap(), value));
    }
    out
}

/// Every row of every parley table in PostgreSQL, as the server would show them in psql.
fn pg_dump(url: &str) -> Vec<(String, Vec<String>)> {
    let mut pg = pg_client(url);
    std::iter::once(&("settings", "key"))
        .chain(TABLES)
        .map(|(table, order)| {
            let sql = format!("SELECT t::text FROM {table} t ORDER BY {order}");
            let rows = pg.query(&sql, &[]).unwrap();
            (table.to_string(), rows.iter().map(|r| r.get(0)).collect())
        })
        .collect()
}

/// Checks, right after a migration, that PostgreSQL holds exactly the SQLite file's
/// rows: every column of every table, and the settings converted as the layout wants.
#[track_caller]
fn assert_same_rows(file: &Path, url: &str) {
    let db = open_db(file);
    let mut pg = pg_client(url);
    for (table, order) in TABLES {
        let columns = sqlite_columns(&db, table);
        let want = sqlite_rows(&db, table, order);
        let got = pg_rows(&mut pg, table, &columns, order);
        assert_eq!(got.len(), want.len(), "rows of {table}");
        assert_eq!(got, want, "{table} differs");
    }
    let mut want = sqlite_settings(&db);
    let audit_high: i64 = db
        .query_row("SELECT coalesce(max(id), 0) FROM audit_log", [], |r| {
            r.get(0)
        })
        .unwrap();
    want.push(("audit_seq".into(), audit_high.to_string().into_bytes()));
    want.sort();
    let got: Vec<(String, Vec<u8>)> = pg
        .query("SELECT key, value FROM settings ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, want, "settings differ");
    assert!(
        got.iter().any(|(k, v)| k == "jwt_key" && v.len() >= 32),
        "the signing key was copied: {got:?}"
    );
}

#[test]
fn a_whole_community_moves_to_postgres_intact() {
    // ----- a community on SQLite, built through the real server -----
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), FAST);
    let ann = register(&srv, "ann");
    assert_eq!(
        ann["roles"],
        json!(["admin"]),
        "the first account is the admin"
    );
    for name in ["bob", "carol", "dave"] {
        register(&srv, name);
    }
    let ann_tok = access(&login(&srv, "ann"));
    assert_status(&put_roles(&srv, &ann_tok, "bob", &["moderator"]), 200);
    let bob_tok = access(&login(&srv, "bob"));
    let carol_pair = login(&srv, "carol");
    let carol_tok = access(&carol_pair);
    login(&srv, "dave");
    assert_status(
        &srv.post_empty("/api/admin/users/dave/ban", Some(&ann_tok)),
        204,
    );
    assert_status(
        &srv.post("/api/rooms", Some(&bob_tok), &json!({"name": "lobby"})),
        201,
    );
    let general = post_messages(&srv, &ann_tok, "general", 12, "hello ");
    let lobby = post_messages(&srv, &carol_tok, "lobby", 5, "lobby ");
    let gone = general[3];
    let del = srv.request(
        "DELETE",
        &format!("/api/messages/{gone}"),
        Some(&bob_tok),
        None,
    );
    assert_status(&del, 204);
    let mut ws = Ws::connect(&srv, &carol_tok);
    ws.join("general");
    let once = send_once(&mut ws, "general", "only once", "key-1");
    let mut dms = Vec::new();
    for i in 0..4 {
        let key = format!("dm-{i}");
        dms.push(send_dm(&mut ws, "ann", &format!("psst {i}"), Some(&key)));
    }
    ws.close_and_wait();
    // A rotated refresh token: the successor is the one that must keep working.
    let r = refresh_resp(&srv, &refresh_tok(&carol_pair));
    assert_status(&r, 200);
    let carol_rt = refresh_tok(&r.json());

    let users_before = accounts(&srv, &ann_tok);
    assert!(
        users_before
            .iter()
            .any(|u| u.1 == "dave" && u.3 && u.2 == ["member"]),
        "{users_before:?}"
    );
    let general_before = history(&srv, &ann_tok, "/api/rooms/general/messages?limit=200");
    assert!(general_before.iter().all(|(id, _)| *id != gone));
    assert_eq!(general_before.len(), general.len()); // 12 - 1 deleted + 1 once-only
    let lobby_before = history(&srv, &ann_tok, "/api/rooms/lobby/messages?limit=200");
    let dms_before = history(&srv, &ann_tok, "/api/dms/carol?limit=200");
    assert_eq!(dms_before.len(), dms.len());
    srv.stop();

    let file = dir.path().join("chat.db");
    let source_hash = sha256_file(&file);
    let high = |sql: &str| -> i64 { open_db(&file).query_row(sql, [], |r| r.get(0)).unwrap() };
    let (max_user, max_message, max_dm, max_room, max_audit) = (
        high("SELECT max(id) FROM users"),
        high("SELECT max(id) FROM messages"),
        high("SELECT max(id) FROM direct_messages"),
        high("SELECT max(id) FROM rooms"),
        high("SELECT max(id) FROM audit_log"),
    );
    assert!(max_audit > 10, "the community has an audit trail");
    assert_eq!(
        high("SELECT count(*) FROM messages WHERE deleted_at IS NOT NULL"),
        1
    );
    assert!(high("SELECT count(*) FROM client_ids") >= 5);

    // ----- the migration -----
    let pg = target();
    let out = migrate(file.to_str().unwrap(), &pg.url);
    assert_exit(&out, 0, "parley migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("audit trail intact"), "{stdout}");
    for table in ["messages", "direct_messages", "audit_log", "refresh_tokens"] {
        assert!(stdout.contains(table), "a count for {table} in: {stdout}");
    }
    assert_eq!(
        sha256_file(&file),
        source_hash,
        "the source was not written to"
    );
    assert_same_rows(&file, &pg.url);

    // ----- the same community, served from PostgreSQL -----
    let dir2 = TempDir::new();
    let mut srv2 = Server::launch_db(dir2.path(), &pg.url, FAST, &[]);
    // The access token issued on SQLite still works: same key, same login.
    assert_eq!(accounts(&srv2, &ann_tok), users_before);
    let me = srv2.get("/api/me", Some(&carol_tok));
    assert_status(&me, 200);
    assert_eq!(me.json()["user"]["username"], "carol");
    // The refresh token issued on SQLite refreshes, once.
    let r = refresh_resp(&srv2, &carol_rt);
    assert_status(&r, 200);
    let carol_tok2 = access(&r.json());
    // The ban holds.
    assert_status(&login_resp(&srv2, "dave", PW), 403);
    // History: the same ids and bodies, the deleted message still absent.
    assert_eq!(
        history(&srv2, &ann_tok, "/api/rooms/general/messages?limit=200"),
        general_before
    );
    assert_eq!(
        history(&srv2, &ann_tok, "/api/rooms/lobby/messages?limit=200"),
        lobby_before
    );
    assert_eq!(
        history(&srv2, &ann_tok, "/api/dms/carol?limit=200"),
        dms_before
    );
    // The moderator keeps the right to delete; the once-only keys still hold.
    let mut ws = Ws::connect(&srv2, &carol_tok2);
    ws.join("general");
    assert_eq!(send_once(&mut ws, "general", "again?", "key-1"), once);
    assert_eq!(send_dm(&mut ws, "ann", "again?", Some("dm-0")), dms[0]);
    // New rows get ids above the old ones.
    let (_, new_message) = ws.send_msg("general", "hello from postgres");
    assert!(new_message > max_message, "{new_message} > {max_message}");
    assert!(!lobby.contains(&new_message) && !general.contains(&new_message));
    let new_dm = send_dm(&mut ws, "ann", "and a DM", None);
    assert!(new_dm > max_dm, "{new_dm} > {max_dm}");
    ws.close_and_wait();
    let erin = register(&srv2, "erin");
    assert!(erin["id"].as_i64().unwrap() > max_user, "{erin}");
    assert_status(
        &srv2.post("/api/rooms", Some(&bob_tok), &json!({"name": "annex"})),
        201,
    );
    let annex: i64 = pg_client(&pg.url)
        .query_one("SELECT id FROM rooms WHERE name = 'annex'", &[])
        .unwrap()
        .get(0);
    assert!(annex > max_room, "{annex} > {max_room}");
    let del = srv2.request(
        "DELETE",
        &format!("/api/messages/{}", general[0]),
        Some(&bob_tok),
        None,
    );
    assert_status(&del, 204);

    // The audit trail verifies, and continues the chain past the copied rows.
    let verify = run_cli(&["audit", "--verify", "--db", &pg.url], "");
    assert_exit(&verify, 0, "parley audit --verify after the migration");
    srv2.stop();
    let mut client = pg_client(&pg.url);
    let (count, max): (i64, i64) = {
        let r = client
            .query_one("SELECT count(*), max(id) FROM audit_log", &[])
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        max > max_audit + 3,
        "new audit rows: {max} after {max_audit}"
    );
    assert_eq!(count, max, "audit ids run 1, 2, 3, ... without gaps");
    let verify = run_cli(&["audit", "--verify", "--db", &pg.url], "");
    assert_exit(&verify, 0, "parley audit --verify after new events");
    assert!(String::from_utf8_lossy(&verify.stdout).contains("audit trail intact"));
}

/// A small community on SQLite in `dir/chat.db`, the server stopped.
fn small_source(dir: &Path) {
    let mut srv = Server::start_in(dir, FAST);
    let tok = new_user(&srv, "ann");
    post_messages(&srv, &tok, "general", 2, "hi ");
    srv.stop();
}

#[test]
fn a_target_with_data_is_refused_and_left_alone() {
    let dir = TempDir::new();
    small_source(dir.path());
    let file = dir.path().join("chat.db");
    let pg = target();
    let other = TempDir::new();
    let mut srv = Server::launch_db(other.path(), &pg.url, FAST, &[]);
    let tok = new_user(&srv, "zed");
    post_messages(&srv, &tok, "general", 1, "mine ");
    srv.stop();
    let before = pg_dump(&pg.url);

    let out = migrate(file.to_str().unwrap(), &pg.url);
    assert_exit(&out, 1, "migrate into a database in use");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds parley data"), "{err}");
    assert!(
        err.contains("1 users") && err.contains("1 messages"),
        "{err}"
    );
    assert_eq!(pg_dump(&pg.url), before, "the target is unchanged");

    // Only a room of its own (no user, no message) is data too.
    let pg2 = target();
    let out = migrate(file.to_str().unwrap(), &pg2.url);
    assert_exit(&out, 0, "migrate into a new database");
    let out = migrate(file.to_str().unwrap(), &pg2.url);
    assert_exit(&out, 1, "migrate twice into the same database");
    let pg3 = target();
    let mut c = pg_client(&pg3.url);
    drop(run_cli(&["audit", "--verify", "--db", &pg3.url], "")); // creates the layout
    c.batch_execute("INSERT INTO rooms(name, created_at) VALUES ('mine', 'now')")
        .unwrap();
    let before = pg_dump(&pg3.url);
    let out = migrate(file.to_str().unwrap(), &pg3.url);
    assert_exit(&out, 1, "migrate into a database with a room");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 rooms"));
    assert_eq!(pg_dump(&pg3.url), before);
}

#[test]
fn a_missing_or_foreign_source_is_refused_and_nothing_is_created() {
    let dir = TempDir::new();
    let pg = target();
    let missing = dir.path().join("missing.db");
    let out = migrate(missing.to_str().unwrap(), &pg.url);
    assert_exit(&out, 1, "--from a missing file");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no database at"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!missing.exists(), "the missing source was not created");
    let untouched: bool = pg_client(&pg.url)
        .query_one("SELECT to_regclass('schema_version') IS NULL", &[])
        .unwrap()
        .get(0);
    assert!(
        untouched,
        "the target was not touched before the source was checked"
    );

    let foreign = dir.path().join("other.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let hash = sha256_file(&foreign);
    let out = migrate(foreign.to_str().unwrap(), &pg.url);
    assert_exit(&out, 1, "--from a database that is not parley's");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a parley database"));
    assert_eq!(sha256_file(&foreign), hash);

    // An older parley file is refused, not upgraded.
    let old = dir.path().join("old.db");
    small_source(dir.path());
    std::fs::copy(dir.path().join("chat.db"), &old).unwrap();
    open_db(&old)
        .pragma_update(None, "user_version", 3)
        .unwrap();
    let hash = sha256_file(&old);
    let out = migrate(old.to_str().unwrap(), &pg.url);
    assert_exit(&out, 1, "--from an older schema");
    assert!(String::from_utf8_lossy(&out.stderr).contains("schema version 3"));
    assert_eq!(sha256_file(&old), hash);

    // --to must be a PostgreSQL URL.
    let out = migrate(
        old.to_str().unwrap(),
        dir.path().join("x.db").to_str().unwrap(),
    );
    assert_exit(&out, 2, "--to a file");
}

/// `audit_log`'s hash, as `src/store/audit.rs` computes it.
fn row_hash(id: i64, ts: &str, action: &str, detail: &str, prev: &str) -> String {
    let canonical = json!([
        id,
        ts,
        Value::Null,
        action,
        Value::Null,
        Value::Null,
        detail,
        prev
    ]);
    let digest = sha2::Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The speed of a larger copy: `PARLEY_MIGRATE_MESSAGES` room messages (50,000 by
/// default), a fifth as many DMs and a tenth as many audit rows, written straight
/// into the file. Run with
/// `cargo test --features postgres --test migrate -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: run it on purpose"]
fn bench_a_large_community() {
    let n: i64 = std::env::var("PARLEY_MIGRATE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), FAST);
    register(&srv, "ann");
    register(&srv, "bob");
    srv.stop();
    let file = dir.path().join("chat.db");
    {
        let mut db = open_db(&file);
        let tx = db.transaction().unwrap();
        let body = "a message of some ordinary length, about eighty characters long, give or take";
        let ts = "2025-01-31T12:00:00.123Z";
        for i in 0..n {
            tx.execute(
                "INSERT INTO messages(room_id, user_id, body, ts) VALUES (1, ?1, ?2, ?3)",
                rusqlite::params![1 + i % 2, format!("{body} {i}"), ts],
            )
            .unwrap();
        }
        for i in 0..n / 5 {
            tx.execute(
                "INSERT INTO direct_messages(from_id, to_id, body, ts) VALUES (1, 2, ?1, ?2)",
                rusqlite::params![format!("{body} {i}"), ts],
            )
            .unwrap();
        }
        let (mut id, mut prev): (i64, String) = tx
            .query_row(
                "SELECT max(id), hash FROM audit_log WHERE id = (SELECT max(id) FROM audit_log)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        for _ in 0..n / 10 {
            id += 1;
            let detail = r#"{"reason":"bad credentials"}"#;
            let hash = row_hash(id, ts, "login_failed", detail, &prev);
            tx.execute(
                "INSERT INTO audit_log(id, ts, action, detail, prev_hash, hash)
                 VALUES (?1, ?2, 'login_failed', ?3, ?4, ?5)",
                rusqlite::params![id, ts, detail, prev, hash],
            )
            .unwrap();
            prev = hash;
        }
        tx.commit().unwrap();
    }
    let pg = target();
    let started = Instant::now();
    let out = migrate(file.to_str().unwrap(), &pg.url);
    let took = started.elapsed();
    assert_exit(&out, 0, "parley migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("audit trail intact"), "{stdout}");
    let rows = n + n / 5 + n / 10;
    eprintln!("{stdout}");
    eprintln!(
        "migrate: {rows} rows (messages, DMs, audit) in {took:.2?} including the process, \
         its audit verification and PostgreSQL's layout: {:.0} rows/s",
        rows as f64 / took.max(Duration::from_millis(1)).as_secs_f64()
    );
}
