//! Security fixes, each pinned by a test against the real binary, real sockets and the
//! real database file:
//!
//! 1. the last-admin rule counts only unbanned holders of `role.assign`, and bans obey
//!    it too (REST and CLI, atomically, so two admins cannot ban each other);
//! 2. user ids are never reused and logins are bound to the account's stamp, so an
//!    account created after a `sqlite3` delete inherits no tokens, roles or DMs; a
//!    version-1 database is upgraded in place;
//! 3. login takes as long for an unknown name as for a known one whose hash has a
//!    lower bcrypt cost than the server's;
//! 4. attempted login names are stored only when valid, and `parley audit` prints one
//!    line per event with every control character escaped;
//! 5. backups are created 0600, and a database (with its -wal and -shm) readable by
//!    others is made private when opened.

mod common;

use common::*;
use rusqlite::Connection;
use serde_json::json;
use sha2::Digest;
use std::path::Path;
use std::process::Output;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// Opens the live database file beside a server (WAL makes this safe).
fn open_db(path: &Path) -> Connection {
    let c = Connection::open(path).expect("open the database file");
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

fn ban_resp(srv: &Server, token: &str, user: &str) -> Resp {
    srv.post_empty(&format!("/api/admin/users/{user}/ban"), Some(token))
}

/// `parley ARGS --db DB` with `stdin`.
fn cli(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let db = db_arg(dir);
    let mut all = args.to_vec();
    all.extend(["--db", &db, "--bcrypt-cost", "4"]);
    run_cli(&all, stdin)
}

// ---------------------------------------------------------------------------------
// 1. The last admin
// ---------------------------------------------------------------------------------

/// alice (the first account: admin) and bob, whom she makes admin too; their tokens.
fn two_admins(srv: &Server) -> (String, String) {
    let alice = new_user(srv, "alice");
    let bob = new_user(srv, "bob");
    assert_status(&put_roles(srv, &alice, "bob", &["admin"]), 200);
    (alice, bob)
}

#[test]
fn a_banned_admin_does_not_count_as_the_last_admin() {
    let srv = start_unlimited(&[]);
    let (alice, _bob) = two_admins(&srv);
    assert_status(&ban_resp(&srv, &alice, "bob"), 204);
    // Bob is banned, so alice is the last admin able to act: she may not step down.
    for roles in [&["member"][..], &["moderator"], &[]] {
        assert_error(&put_roles(&srv, &alice, "alice", roles), 409, "conflict");
    }
    let me = srv.get("/api/me", Some(&alice));
    assert_status(&me, 200);
    assert_user_shape(&me.json()["user"], "alice", &["admin"]);
    // Once bob is unbanned he counts again, and alice may step down.
    let r = srv.post_empty("/api/admin/users/bob/unban", Some(&alice));
    assert_status(&r, 204);
    assert_status(&put_roles(&srv, &alice, "alice", &["member"]), 200);
}

#[test]
fn two_admins_banning_each_other_at_once_leave_exactly_one() {
    // A few rounds: before the fix both bans went through whenever both requests
    // passed authentication before either committed.
    for round in 0..4 {
        let srv = start_unlimited(&[]);
        let (alice, bob) = two_admins(&srv);
        let barrier = Barrier::new(2);
        let (a, b) = thread::scope(|s| {
            let a = s.spawn(|| {
                barrier.wait();
                ban_resp(&srv, &alice, "bob").status
            });
            let b = s.spawn(|| {
                barrier.wait();
                ban_resp(&srv, &bob, "alice").status
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        let wins = [a, b].iter().filter(|s| **s == 204).count();
        assert_eq!(
            wins, 1,
            "round {round}: exactly one ban succeeds (alice bans bob: {a}, bob bans alice: {b})"
        );
        // The loser was refused by the guard (409) or, if the winner had already
        // committed, as a banned user (403) or one whose login the ban revoked (401).
        let (winner, loser_status) = if a == 204 { (&alice, b) } else { (&bob, a) };
        assert!(
            matches!(loser_status, 401 | 403 | 409),
            "round {round}: the other ban is refused, got {loser_status}"
        );
        // The winner is an unbanned admin who can still undo it.
        let loser_name = if a == 204 { "bob" } else { "alice" };
        let r = srv.post_empty(
            &format!("/api/admin/users/{loser_name}/unban"),
            Some(winner),
        );
        assert_status(&r, 204);
    }
}

#[test]
fn the_cli_keeps_one_unbanned_admin_too() {
    let dir = TempDir::new();
    let d = dir.path();
    assert_exit(
        &cli(d, &["user", "add", "alice"], "password-one\n"),
        0,
        "add alice",
    );
    assert_exit(
        &cli(
            d,
            &["user", "add", "bob", "--role", "admin"],
            "password-two\n",
        ),
        0,
        "add bob",
    );
    assert_exit(&cli(d, &["user", "ban", "bob"], ""), 0, "ban bob");
    // alice is now the last unbanned admin: neither demoting nor banning her works.
    for args in [
        &["user", "role", "alice", "member"][..],
        &["user", "ban", "alice"],
    ] {
        let out = cli(d, args, "");
        assert_exit(&out, 1, &format!("{args:?}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("admin"),
            "{args:?}: a clear message, got {err:?}"
        );
    }
    // A running server agrees: alice is still an admin, bob still banned.
    let srv = Server::start_in(d, &["--login-rate", "0"]);
    let pair = login_pw(&srv, "alice", "password-one");
    assert_user_shape(&pair["user"], "alice", &["admin"]);
    assert_error(&login_resp(&srv, "bob", "password-two"), 403, "forbidden");
    // With bob unbanned, alice may be demoted.
    assert_exit(&cli(d, &["user", "unban", "bob"], ""), 0, "unban bob");
    assert_exit(
        &cli(d, &["user", "role", "alice", "member"], ""),
        0,
        "demote alice",
    );
}

// ---------------------------------------------------------------------------------
// 2. User ids are never reused; logins are bound to the account
// ---------------------------------------------------------------------------------

#[test]
fn an_account_made_after_a_shell_delete_inherits_nothing() {
    let srv = start_unlimited(&[]);
    let alice = new_user(&srv, "alice");
    register(&srv, "bob");
    assert_status(&put_roles(&srv, &alice, "bob", &["moderator"]), 200);
    let bob_pair = login(&srv, "bob");
    let bob_id = bob_pair["user"]["id"].as_i64().expect("bob's id");
    let (bob_at, bob_rt) = (access(&bob_pair), refresh_tok(&bob_pair));
    let mut ws = Ws::connect(&srv, &alice);
    ws.send(&json!({"type": "dm", "to": "bob", "body": "for bob only", "ref": "d1"}));
    let ack = reply_to(&mut ws, "d1", &["dm"]);
    assert_eq!(ack["type"], "ack", "{ack}");
    ws.close();

    // The operator deletes bob with the sqlite3 shell's default: foreign keys off.
    open_db(&srv.db_path())
        .execute_batch("PRAGMA foreign_keys=OFF; DELETE FROM users WHERE username='bob'")
        .unwrap();

    let carol = register(&srv, "carol");
    assert_ne!(
        carol["id"].as_i64(),
        Some(bob_id),
        "bob's id is never reused"
    );
    assert_user_shape(&carol, "carol", &["member"]);
    // Bob's tokens are dead everywhere.
    assert_error(&srv.get("/api/me", Some(&bob_at)), 401, "unauthorized");
    let bearer = format!("Bearer {bob_at}");
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", bearer.as_str())]);
    assert_ws_rejected(&r, 401, "unauthorized");
    assert_error(&refresh_resp(&srv, &bob_rt), 401, "unauthorized");
    // Carol has only her own role and sees none of bob's DMs.
    let carol_at = access(&login(&srv, "carol"));
    let me = srv.get("/api/me", Some(&carol_at));
    assert_status(&me, 200);
    assert_user_shape(&me.json()["user"], "carol", &["member"]);
    let r = srv.get("/api/dms/alice", Some(&carol_at));
    assert_status(&r, 200);
    assert_eq!(r.json()["messages"], json!([]), "carol sees no DMs");
    assert_error(
        &srv.request("DELETE", "/api/messages/1", Some(&carol_at), None),
        403,
        "forbidden",
    );

    // Even an account given bob's id by hand (a careless restore) gets no login of his:
    // logins are bound to the account's stamp, not to its id.
    open_db(&srv.db_path())
        .execute(
            "INSERT INTO users(id, username, password_hash, created_at, stamp)
             VALUES (?1, 'bobby', 'x', '2026-01-01T00:00:00Z', 'a-new-stamp')",
            [bob_id],
        )
        .unwrap();
    assert_error(&srv.get("/api/me", Some(&bob_at)), 401, "unauthorized");
    let r = ws_handshake_raw(&srv, "/ws", &[("Authorization", bearer.as_str())]);
    assert_ws_rejected(&r, 401, "unauthorized");
}

/// A JWT as the server signs it, for a login that exists only in the database.
fn forge_access(key: &[u8], user_id: i64, name: &str, sid: &str) -> String {
    let now = now_secs();
    forge_hmac(
        "HS256",
        key,
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": user_id.to_string(), "name": name, "roles": [], "sid": sid,
                "iat": now, "exp": now + 600, "jti": format!("j{}", unique())}),
    )
}

fn sha256_hex(s: &str) -> String {
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_version_1_database_is_upgraded_in_place() {
    let dir = TempDir::new();
    let path = dir.path().join("chat.db");
    let key = [7u8; 32];
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(V1_SCHEMA).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO settings(key, value) VALUES ('jwt_key', ?1)",
            [&key[..]],
        )
        .unwrap();
        let hash = bcrypt::hash(PW, 4).unwrap();
        let ts = "2025-01-01T00:00:00Z";
        c.execute(
            "INSERT INTO users(id, username, password_hash, created_at)
             VALUES (1, 'alice', ?1, ?2), (2, 'bob', ?1, ?2)",
            [&hash, ts],
        )
        .unwrap();
        c.execute_batch(
            "INSERT INTO user_roles(user_id, role) VALUES (1, 'admin'), (2, 'moderator');
             INSERT INTO direct_messages(from_id, to_id, body, ts)
                 VALUES (1, 2, 'for bob only', '2025-01-01T00:00:00Z');",
        )
        .unwrap();
        let expires = now_secs() + 3600;
        for (sid, uid, rt) in [("sid-alice", 1, "rt-alice"), ("sid-bob", 2, "rt-bob")] {
            c.execute(
                "INSERT INTO sessions(id, user_id, created_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![sid, uid, ts],
            )
            .unwrap();
            c.execute(
                "INSERT INTO refresh_tokens(token_hash, session_id, issued_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![sha256_hex(rt), sid, ts, expires],
            )
            .unwrap();
        }
        // The operator deletes bob with the sqlite3 shell's default: foreign keys off.
        c.execute_batch("PRAGMA foreign_keys=OFF; DELETE FROM users WHERE id = 2")
            .unwrap();
    }
    let alice_at = forge_access(&key, 1, "alice", "sid-alice");
    let bob_at = forge_access(&key, 2, "bob", "sid-bob");

    let srv = Server::start_in(dir.path(), &["--login-rate", "0"]);
    {
        let c = open_db(&path);
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 2, "upgraded to schema version 2");
        let sql: String = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            sql.contains("AUTOINCREMENT"),
            "users ids never reused: {sql}"
        );
    }
    // Logins from before the upgrade survive it; the deleted user's do not.
    assert_status(&srv.get("/api/me", Some(&alice_at)), 200);
    assert_status(&refresh_resp(&srv, "rt-alice"), 200);
    assert_error(&srv.get("/api/me", Some(&bob_at)), 401, "unauthorized");
    assert_error(&refresh_resp(&srv, "rt-bob"), 401, "unauthorized");
    // The user logs in with her password and keeps her role.
    let pair = login(&srv, "alice");
    assert_user_shape(&pair["user"], "alice", &["admin"]);
    assert_eq!(pair["user"]["id"], 1);
    // A new account never gets the deleted user's id, roles or DMs.
    let carol = register(&srv, "carol");
    let carol_id = carol["id"].as_i64().unwrap();
    assert!(
        carol_id > 2,
        "a fresh id above every id ever used, got {carol_id}"
    );
    assert_user_shape(&carol, "carol", &["member"]);
    let carol_at = access(&login(&srv, "carol"));
    let r = srv.get("/api/dms/alice", Some(&carol_at));
    assert_status(&r, 200);
    assert_eq!(r.json()["messages"], json!([]));
    assert_error(&srv.get("/api/me", Some(&bob_at)), 401, "unauthorized");
}

// ---------------------------------------------------------------------------------
// 3. Login timing with mixed bcrypt costs
// ---------------------------------------------------------------------------------

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn login_timing_does_not_reveal_names_whose_hash_has_another_cost() {
    let dir = TempDir::new();
    let db = db_arg(dir.path());
    // An account hashed at a low cost (as after lowering --bcrypt-cost on a Pi) ...
    let out = run_cli(
        &["user", "add", "known", "--db", &db, "--bcrypt-cost", "4"],
        "password-one\n",
    );
    assert_exit(&out, 0, "user add at cost 4");
    // ... served at a higher one.
    let args: Vec<String> = [
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--db",
        &db,
        "--bcrypt-cost",
        "8",
        "--login-rate",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let srv = Server::spawn_raw(dir.path(), &args, &[]);
    let attempt = |name: &str| {
        let t = Instant::now();
        let r = login_resp(&srv, name, "wrong-password");
        let took = t.elapsed();
        assert_error(&r, 401, "unauthorized");
        took
    };
    attempt("known");
    attempt("nobody_here");
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        known.push(attempt("known"));
        unknown.push(attempt("nobody_here"));
    }
    let (k, u) = (median(known), median(unknown));
    eprintln!("median login: existing user {k:?}, unknown user {u:?}");
    let (fast, slow) = if k < u { (k, u) } else { (u, k) };
    assert!(
        fast.as_secs_f64() >= 0.6 * slow.as_secs_f64(),
        "existing user with a wrong password took {k:?}, unknown user {u:?}"
    );
    // A successful login re-hashes the password at the server's cost, keeping it.
    login_pw(&srv, "known", "password-one");
    let hash: String = open_db(&srv.db_path())
        .query_row(
            "SELECT password_hash FROM users WHERE username = 'known'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        hash.starts_with("$2b$08$"),
        "re-hashed at cost 8: {}",
        &hash[..7]
    );
    login_pw(&srv, "known", "password-one");
}

// ---------------------------------------------------------------------------------
// The version-1 layout (schema.sql before user ids became AUTOINCREMENT), to test the
// upgrade of existing databases.
// ---------------------------------------------------------------------------------

const V1_SCHEMA: &str = r#"-- parley database layout, schema version 1.
--
-- This file is the one source of the layout: the binary embeds it and applies it to a
-- new database on first start, then sets PRAGMA user_version = 1 so later versions
-- know what to migrate from. Times are RFC 3339 text in UTC unless a column says
-- otherwise, so the file reads well in `sqlite3`.

-- Server-wide values, e.g. the JWT signing key (`jwt_key`, 32 random bytes).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,               -- bcrypt
    created_at    TEXT NOT NULL,
    banned_at     TEXT                         -- non-null while the user is banned
);

-- Roles and permissions are data, not code: the server asks "may this user do X?" by
-- joining these tables, so editing them changes what people may do.
CREATE TABLE roles (
    name TEXT PRIMARY KEY
);

CREATE TABLE permissions (
    name TEXT PRIMARY KEY
);

CREATE TABLE role_permissions (
    role       TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,
    permission TEXT NOT NULL REFERENCES permissions(name) ON DELETE CASCADE,
    PRIMARY KEY (role, permission)
);

CREATE TABLE user_roles (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role    TEXT NOT NULL REFERENCES roles(name) ON DELETE CASCADE,
    PRIMARY KEY (user_id, role)
);

-- One row per login: the `sid` claim of its access tokens. Revoking a session kills its
-- refresh tokens, its access tokens and its live sockets.
CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    user_id        INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at     TEXT NOT NULL,
    ip             TEXT,
    revoked_at     TEXT,
    revoked_reason TEXT
);
CREATE INDEX sessions_user ON sessions(user_id);

-- Refresh tokens are stored only as a SHA-256 hash (hex). `used_at` marks a retired
-- token: presenting it again revokes its whole session.
CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    issued_at  TEXT NOT NULL,
    expires_at INTEGER NOT NULL,               -- unix seconds
    used_at    TEXT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens(session_id);

CREATE TABLE rooms (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    created_by INTEGER REFERENCES users(id) ON DELETE SET NULL
);

-- AUTOINCREMENT: an id is never reused, even after the newest row is deleted, so a
-- client resuming with `since` can trust that ids only grow.
CREATE TABLE messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id    INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    body       TEXT NOT NULL,
    ts         TEXT NOT NULL,
    deleted_at TEXT,
    deleted_by INTEGER REFERENCES users(id) ON DELETE SET NULL
);
CREATE INDEX messages_room ON messages(room_id, id);

CREATE TABLE direct_messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    from_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    to_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    body       TEXT NOT NULL,
    ts         TEXT NOT NULL,
    deleted_at TEXT
);
CREATE INDEX direct_messages_pair ON direct_messages(from_id, to_id, id);
CREATE INDEX direct_messages_pair_rev ON direct_messages(to_id, from_id, id);

-- Security events. `hash` = SHA-256 over this row's content and `prev_hash`, so a row
-- changed, deleted or inserted behind the server's back breaks the chain.
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        TEXT NOT NULL,
    actor     TEXT,                            -- username, NULL when anonymous
    action    TEXT NOT NULL,
    target    TEXT,
    ip        TEXT,
    detail    TEXT NOT NULL DEFAULT '{}',      -- JSON object
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

-- Seed data: applied once, when the database is created, and never again.
INSERT INTO roles(name) VALUES ('admin'), ('moderator'), ('member');

INSERT INTO permissions(name) VALUES
    ('message.delete'), ('user.kick'), ('user.ban'), ('role.assign'),
    ('audit.read'), ('announce'), ('room.create');

INSERT INTO role_permissions(role, permission) VALUES
    ('admin', 'message.delete'), ('admin', 'user.kick'), ('admin', 'user.ban'),
    ('admin', 'role.assign'), ('admin', 'audit.read'), ('admin', 'announce'),
    ('admin', 'room.create'),
    ('moderator', 'message.delete'), ('moderator', 'user.kick'),
    ('moderator', 'room.create'),
    ('member', 'room.create');

INSERT INTO rooms(name, created_at) VALUES ('general', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
"#;
