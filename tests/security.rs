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
use serde_json::{json, Value};
use sha2::Digest;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
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

/// Polls `f` until it returns `Some`, for up to 10 s (audit rows are written
/// asynchronously, after the answer).
#[track_caller]
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        thread::sleep(Duration::from_millis(50));
    }
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

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
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
        assert_eq!(v, 4, "upgraded to the current schema version");
        let triggers: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'login_epoch_%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            triggers, 4,
            "the upgrade adds schema.sql's login_epoch triggers"
        );
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
// 4. The audit trail and attacker-chosen names
// ---------------------------------------------------------------------------------

const FORGED: &str =
    "x\n     1 2026-01-01T00:00:00Z login          actor=admin target=- forged line\x1b[31m";

/// `(target, detail)` of every `login_failed` row, oldest first.
fn failed_logins(db: &Path) -> Vec<(Option<String>, Value)> {
    let c = open_db(db);
    let mut st = c
        .prepare("SELECT target, detail FROM audit_log WHERE action = 'login_failed' ORDER BY id")
        .unwrap();
    st.query_map([], |r| {
        let detail: String = r.get(1)?;
        Ok((r.get(0)?, serde_json::from_str(&detail).unwrap()))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
fn only_valid_attempted_names_are_stored() {
    let srv = start_unlimited(&[]);
    let big = "n".repeat(60 * 1024);
    for name in [FORGED, big.as_str(), "ghost"] {
        assert_error(
            &login_resp(&srv, name, "wrong-password"),
            401,
            "unauthorized",
        );
    }
    let rows = eventually("three login_failed rows", || {
        let rows = failed_logins(&srv.db_path());
        (rows.len() == 3).then_some(rows)
    });
    for ((target, detail), name) in rows[..2].iter().zip([FORGED, &big]) {
        assert_eq!(*target, None, "an invalid name is not stored as the target");
        assert_eq!(detail["invalid_name"], true, "{detail}");
        assert_eq!(detail["name_bytes"], name.len(), "{detail}");
        assert!(
            detail.to_string().len() < 200,
            "detail stays small: {detail}"
        );
        assert!(!detail.to_string().contains("forged"), "{detail}");
    }
    assert_eq!(
        rows[2].0.as_deref(),
        Some("ghost"),
        "a valid name is the target"
    );
    assert_eq!(rows[2].1["reason"], "bad credentials");
}

/// Whether `out` holds a C0 control other than newline, DEL, or a C1 control.
fn has_raw_control(out: &str) -> bool {
    out.chars().any(|c| c != '\n' && c.is_control())
}

/// `parley audit --limit 1000 EXTRA` on `db`: asserts success, one line per event
/// (`rows`) and no raw control character; returns the output.
#[track_caller]
fn audit_output(db: &str, extra: &[&str], rows: i64) -> String {
    let mut args = vec!["audit", "--limit", "1000", "--db", db];
    args.extend_from_slice(extra);
    let out = run_cli(&args, "");
    assert_exit(&out, 0, &format!("parley {args:?}"));
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert_eq!(
        text.lines().count() as i64,
        rows,
        "one line per event:\n{text}"
    );
    assert!(
        !has_raw_control(&text),
        "no raw control character:\n{text:?}"
    );
    text
}

#[test]
fn parley_audit_prints_one_line_per_event_and_no_control_characters() {
    let srv = start_unlimited(&[]);
    new_user(&srv, "alice");
    assert_error(
        &login_resp(&srv, FORGED, "wrong-password"),
        401,
        "unauthorized",
    );
    eventually("the login_failed row", || {
        (failed_logins(&srv.db_path()).len() == 1).then_some(())
    });
    // A row as a database from before this fix holds (or as anyone able to write the
    // file could plant): raw newline, ESC, DEL and a C1 CSI in text and detail.
    let planted = "x\n  forged\x1b[31m\u{9b}31m\x7f";
    let c = open_db(&srv.db_path());
    c.execute(
        "INSERT INTO audit_log(ts, actor, action, target, ip, detail, prev_hash, hash)
         VALUES ('2026-01-01T00:00:00Z', ?1, 'login_failed', ?1, ?1, ?2, '', '')",
        rusqlite::params![planted, json!({"reason": planted}).to_string()],
    )
    .unwrap();
    let rows: i64 = c
        .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    let db = srv.db_path();
    let db = db.to_str().unwrap();

    let text = audit_output(db, &[], rows);
    assert!(!text.contains('\u{1b}'));
    assert!(
        text.contains("forged"),
        "the planted row is shown, escaped:\n{text}"
    );
    let text = audit_output(db, &["--json"], rows);
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    // JSON consumers still get the exact stored text back.
    assert_eq!(events[0]["target"], planted);
    assert_eq!(events[0]["detail"]["reason"], planted);
}

// ---------------------------------------------------------------------------------
// 5. Secrets at rest
// ---------------------------------------------------------------------------------

#[test]
fn a_backup_is_private_under_a_permissive_umask() {
    let srv = start_unlimited(&[]);
    new_user(&srv, "alice");
    let out_dir = TempDir::new();
    let copy = out_dir.path().join("copy.db");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 022 && exec \"$0\" \"$@\"", bin(), "backup"])
        .arg(&copy)
        .arg("--db")
        .arg(srv.db_path())
        .stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PARLEY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run parley backup");
    assert_exit(&out, 0, "backup");
    assert_eq!(mode_of(&copy), 0o600, "the backup holds the signing key");
    let n: i64 = open_db(&copy)
        .query_row(
            "SELECT count(*) FROM users WHERE username = 'alice'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1, "the backup is complete");
    // An existing file is never overwritten.
    let out = run_cli(
        &[
            "backup",
            copy.to_str().unwrap(),
            "--db",
            srv.db_path().to_str().unwrap(),
        ],
        "",
    );
    assert_exit(&out, 1, "backup onto an existing file");
}

#[test]
fn a_database_readable_by_others_is_made_private_when_opened() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &[]);
    new_user(&srv, "alice");
    // A crash leaves the -wal and -shm beside the file; then a careless restore.
    srv.kill9();
    let files: Vec<_> = ["chat.db", "chat.db-wal", "chat.db-shm"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    for f in &files {
        assert!(f.exists(), "{} exists after kill -9", f.display());
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let srv = Server::start_in(dir.path(), &[]);
    for f in &files {
        assert_eq!(mode_of(f), 0o600, "{} is private again", f.display());
    }
    let log = eventually("a warning about the mode", || {
        let log = srv.stderr_log();
        (log.contains("0644") && log.contains("0600")).then_some(log)
    });
    assert!(log.contains("chat.db"), "the warning names the file: {log}");
    // Nothing was lost.
    login(&srv, "alice");
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
