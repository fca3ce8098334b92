//! The command line: `user add`, `backup`, serving with and without the `serve`
//! subcommand, environment variables, and exit codes for bad usage.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

/// Asserts that a failed run's stderr is a `parley: ...` message mentioning `word`
/// (case-insensitively) and no panic.
#[track_caller]
fn assert_stderr_says(out: &Output, word: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("parley: ") && err.to_lowercase().contains(&word.to_lowercase()),
        "{what}: stderr should be a `parley: ...` message about {word:?}, got {err:?}"
    );
    assert!(!err.contains("panicked"), "{what}: the CLI panicked: {err}");
}

fn user_add(dir: &Path, name: &str, role: Option<&str>, password_line: &str) -> Output {
    let db = db_arg(dir);
    let mut args = vec!["user", "add", name];
    if let Some(r) = role {
        args.push("--role");
        args.push(r);
    }
    args.extend(["--db", &db, "--bcrypt-cost", "4"]);
    run_cli(&args, password_line)
}

#[test]
fn user_add_with_role_then_login() {
    let dir = TempDir::new();
    let out = user_add(dir.path(), "mod1", Some("moderator"), "s3cret-pass\n");
    assert_exit(&out, 0, "user add --role moderator");
    assert!(
        dir.path().join("chat.db").exists(),
        "user add creates the db"
    );

    let srv = Server::start_in(dir.path(), &[]);
    // The trailing newline was stripped: the password is exactly "s3cret-pass".
    let pair = login_pw(&srv, "mod1", "s3cret-pass");
    assert_user_shape(&pair["user"], "mod1", &["moderator"]);
    let r = login_resp(&srv, "mod1", "s3cret-pass\n");
    assert_error(&r, 401, "unauthorized");
    // The token works.
    let r = srv.get("/api/me", Some(&access(&pair)));
    assert_status(&r, 200);
    assert_eq!(r.json()["user"]["username"], "mod1");
    // The database is no longer empty: a registered account is a member.
    let u = register(&srv, "carol");
    assert_user_shape(&u, "carol", &["member"]);
}

#[test]
fn user_add_defaults_to_admin_on_an_empty_db_then_member() {
    let dir = TempDir::new();
    assert_exit(
        &user_add(dir.path(), "boss", None, "password-one\n"),
        0,
        "first user add",
    );
    assert_exit(
        &user_add(dir.path(), "worker", None, "password-two\n"),
        0,
        "second user add",
    );
    // --db before the subcommand is accepted too.
    let db = db_arg(dir.path());
    let out = run_cli(
        &["--db", &db, "user", "add", "third", "--bcrypt-cost", "4"],
        "password-three\n",
    );
    assert_exit(&out, 0, "--db before the subcommand");
    // A password without a trailing newline works as well.
    assert_exit(
        &user_add(dir.path(), "nonl", Some("admin"), "password-four"),
        0,
        "password without newline",
    );

    let srv = Server::start_in(dir.path(), &[]);
    assert_user_shape(
        &login_pw(&srv, "boss", "password-one")["user"],
        "boss",
        &["admin"],
    );
    assert_user_shape(
        &login_pw(&srv, "worker", "password-two")["user"],
        "worker",
        &["member"],
    );
    assert_user_shape(
        &login_pw(&srv, "third", "password-three")["user"],
        "third",
        &["member"],
    );
    assert_user_shape(
        &login_pw(&srv, "nonl", "password-four")["user"],
        "nonl",
        &["admin"],
    );
}

#[test]
fn user_add_honours_bcrypt_cost() {
    let dir = TempDir::new();
    assert_exit(
        &user_add(dir.path(), "alice", None, "password-one\n"),
        0,
        "user add",
    );
    // Somewhere in the users table there is a bcrypt hash of cost 04.
    let conn = rusqlite::Connection::open(dir.path().join("chat.db")).unwrap();
    let mut st = conn.prepare("SELECT * FROM users").expect("a users table");
    let ncol = st.column_count();
    let mut rows = st.query([]).unwrap();
    let mut hashes = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        for i in 0..ncol {
            if let Ok(rusqlite::types::ValueRef::Text(t)) = row.get_ref(i) {
                let t = String::from_utf8_lossy(t).into_owned();
                if t.starts_with("$2") {
                    hashes.push(t);
                }
            }
        }
    }
    assert_eq!(hashes.len(), 1, "one bcrypt hash stored: {hashes:?}");
    assert!(
        hashes[0].contains("$04$"),
        "hash should be cost 4: {}",
        &hashes[0][..7]
    );
    assert!(!hashes[0].contains("password-one"));
}

#[test]
fn user_add_failures() {
    let dir = TempDir::new();
    assert_exit(
        &user_add(dir.path(), "alice", None, "password-one\n"),
        0,
        "user add",
    );
    // Taken, case-insensitively.
    assert_exit(
        &user_add(dir.path(), "ALICE", None, "password-two\n"),
        1,
        "duplicate name",
    );
    // Invalid values are bad usage: exit 2 (not 1, and not a panic's 101), with a
    // message on stderr that says what was wrong.
    for (name, pw, what, says) in [
        ("a b", "password-two\n", "invalid name", "username"),
        ("xy", "password-two\n", "name too short", "username"),
        ("bob", "short\n", "password too short", "password"),
        ("bob", "\n", "empty password", "password"),
        ("bob", "", "no password at all", "password"),
    ] {
        let out = user_add(dir.path(), name, None, pw);
        assert_exit(&out, 2, what);
        assert_stderr_says(&out, says, what);
    }
    let out = user_add(dir.path(), "bob", Some("wizard"), "password-two\n");
    assert_exit(&out, 2, "unknown role");
    assert_stderr_says(&out, "wizard", "unknown role");
    // The duplicate above was a runtime failure (exit 1) that said so.
    let out = user_add(dir.path(), "Alice", None, "password-two\n");
    assert_exit(&out, 1, "duplicate name");
    assert_stderr_says(&out, "taken", "duplicate name");
    // None of the failures created an account.
    let srv = Server::start_in(dir.path(), &[]);
    for name in ["bob", "xy"] {
        let r = login_resp(&srv, name, "password-two");
        assert_error(&r, 401, "unauthorized");
    }
    login_pw(&srv, "alice", "password-one");
}

#[test]
fn user_add_reaches_a_running_server() {
    let srv = Server::start(&[]);
    register(&srv, "alice");
    let out = user_add(&srv.dir, "dave", Some("moderator"), "dave-password\n");
    assert_exit(&out, 0, "user add next to a running server");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = login_resp(&srv, "dave", "dave-password");
        if r.status == 200 {
            assert_user_shape(&r.json()["user"], "dave", &["moderator"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the running server never saw the new user: {} {:?}",
            r.status,
            r.text()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn backup_of_a_live_database() {
    let srv = Server::start(&[]);
    let at = new_user(&srv, "alice");
    let before = post_messages(&srv, &at, "general", 10, "keep");
    let out_dir = TempDir::new();
    let backup = out_dir.path().join("chat.db");
    let db = srv.db_path();

    // Writes keep going while the backup runs.
    let (during, out) = thread::scope(|s| {
        let w = s.spawn(|| post_messages(&srv, &at, "general", 30, "during"));
        // Start the backup once the concurrent writes have begun.
        wait_until(
            Duration::from_secs(10),
            "the first concurrent write",
            || stored_message_count(&db) > before.len() as i64,
        );
        let out = run_cli(
            &[
                "backup",
                backup.to_str().unwrap(),
                "--db",
                db.to_str().unwrap(),
            ],
            "",
        );
        (w.join().unwrap(), out)
    });
    assert_exit(&out, 0, "backup");
    assert!(backup.exists(), "backup file written");

    // The copy is a complete, consistent SQLite database on its own.
    {
        let conn = rusqlite::Connection::open(&backup).expect("open backup");
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM users WHERE username = 'alice'",
                [],
                |r| r.get(0),
            )
            .expect("users table");
        assert_eq!(n, 1);
        let mut st = conn
            .prepare("SELECT body FROM messages WHERE id = ?1")
            .unwrap();
        for (i, id) in before.iter().enumerate() {
            let body: String = st
                .query_row([id], |r| r.get(0))
                .unwrap_or_else(|e| panic!("message {id} missing from backup: {e}"));
            assert_eq!(body, format!("keep{i}"));
        }
    }

    // A server started on the backup has the account and the messages. Messages
    // written during the backup are either wholly in it or not: ids form a prefix.
    let srv2 = Server::start_in(out_dir.path(), &[]);
    let at2 = access(&login(&srv2, "alice"));
    let r = srv2.get("/api/rooms/general/messages?after=0&limit=200", Some(&at2));
    assert_status(&r, 200);
    let ids = ids_of(&r.json()["messages"]);
    assert_eq!(ids[..10], before[..], "all earlier messages in the backup");
    let rest = &ids[10..];
    assert_eq!(
        rest,
        &during[..rest.len()],
        "a consistent prefix of later writes"
    );
    drop(srv);
}

#[test]
fn backup_failures() {
    let dir = TempDir::new();
    // No such database.
    let missing = dir.path().join("nope").join("chat.db");
    let target = dir.path().join("copy.db");
    let out = run_cli(
        &[
            "backup",
            target.to_str().unwrap(),
            "--db",
            missing.to_str().unwrap(),
        ],
        "",
    );
    // A runtime failure (exit 1), explained, and no copy written.
    assert_exit(&out, 1, "backup of a missing database");
    assert_stderr_says(&out, "nope", "backup of a missing database");
    assert!(!target.exists(), "no copy of a missing database");
    // Missing FILE argument.
    let out = run_cli(&["backup", "--db", missing.to_str().unwrap()], "");
    assert_exit(&out, 2, "backup without FILE");
}

#[test]
fn bad_usage_exits_2() {
    let dir = TempDir::new();
    let db = db_arg(dir.path());
    let cases: Vec<Vec<&str>> = vec![
        vec!["frobnicate"],
        vec!["serve", "--no-such-flag"],
        vec!["serve", "--addr"],
        vec!["serve", "--registration", "maybe", "--db", &db],
        vec!["serve", "--access-ttl", "soon", "--db", &db],
        vec!["serve", "--bcrypt-cost", "many", "--db", &db],
        vec!["user"],
        vec!["user", "add"],
        vec!["user", "add", "bob", "--db"],
        vec!["user", "frobnicate", "bob"],
        vec!["backup"],
    ];
    for args in cases {
        let out = run_cli_in(Some(dir.path()), &args, "password-one\n", &[]);
        assert_exit(&out, 2, &format!("parley {args:?}"));
    }
    // Bad usage never created the database.
    assert!(!dir.path().join("chat.db").exists());
}

/// A `postgres://` `--db` picks the PostgreSQL engine: a build without it says how to
/// get one, and a file-only command says it needs a file; neither creates anything,
/// and no message repeats the URL's password.
#[test]
fn a_postgres_url_needs_the_feature_and_a_file_only_command_refuses_it() {
    let dir = TempDir::new();
    let url = "postgres://chat:hunter2-secret@127.0.0.1:1/chat";
    let out = run_cli_in(Some(dir.path()), &["check", "--db", url], "", &[]);
    assert_exit(&out, 2, "check on a PostgreSQL url");
    let why = if cfg!(feature = "postgres") {
        "SQLite file"
    } else {
        "--features postgres"
    };
    assert_stderr_says(&out, why, "check on a PostgreSQL url");
    let serve = run_cli_in(
        Some(dir.path()),
        &["serve", "--addr", "127.0.0.1:0", "--db", url],
        "",
        &[],
    );
    if cfg!(feature = "postgres") {
        assert_exit(&serve, 1, "serve on a PostgreSQL url that answers nothing");
        assert!(
            String::from_utf8_lossy(&serve.stderr).contains("parley: opening postgres://chat:***@")
        );
    } else {
        assert_exit(&serve, 2, "serve without the engine");
        assert_stderr_says(&serve, "--features postgres", "serve without the engine");
    }
    for out in [&out, &serve] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains("hunter2"), "the password was printed: {all}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

#[test]
fn serves_without_the_serve_subcommand() {
    let dir = TempDir::new();
    let args: Vec<String> = vec![
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--db".into(),
        db_arg(dir.path()),
        "--bcrypt-cost".into(),
        "4".into(),
    ];
    let srv = Server::spawn_raw(dir.path(), &args, &[]);
    let r = srv.get("/healthz", None);
    assert_status(&r, 200);
    register(&srv, "alice");
    assert!(dir.path().join("chat.db").exists());
}

#[test]
fn settings_from_environment_variables() {
    let dir = TempDir::new();
    let db = db_arg(dir.path());
    let args: Vec<String> = vec!["serve".into()];
    let envs = [
        ("PARLEY_ADDR", "127.0.0.1:0"),
        ("PARLEY_DB", db.as_str()),
        ("PARLEY_BCRYPT_COST", "4"),
        ("PARLEY_ACCESS_TTL", "77"),
    ];
    let srv = Server::spawn_raw(dir.path(), &args, &envs);
    register(&srv, "alice");
    assert!(dir.path().join("chat.db").exists(), "PARLEY_DB honoured");
    let pair = login(&srv, "alice");
    assert_eq!(pair["expires_in"], 77, "PARLEY_ACCESS_TTL honoured");
    drop(srv);

    let dir2 = TempDir::new();
    let db2 = db_arg(dir2.path());
    let envs = [
        ("PARLEY_ADDR", "127.0.0.1:0"),
        ("PARLEY_DB", db2.as_str()),
        ("PARLEY_BCRYPT_COST", "4"),
        ("PARLEY_REGISTRATION", "closed"),
    ];
    let srv = Server::spawn_raw(dir2.path(), &args, &envs);
    let r = register_resp(&srv, "alice", PW);
    assert_error(&r, 403, "forbidden");

    // A flag overrides its environment variable.
    let dir3 = TempDir::new();
    let envs = [
        ("PARLEY_ACCESS_TTL", "77"),
        ("PARLEY_DB", "/nonexistent/dir/x.db"),
    ];
    let srv = Server::launch(dir3.path(), &["--access-ttl", "33"], &envs);
    register(&srv, "alice");
    assert_eq!(login(&srv, "alice")["expires_in"], 33);
}

#[test]
fn closed_registration_with_cli_accounts() {
    let dir = TempDir::new();
    assert_exit(
        &user_add(dir.path(), "alice", None, "password-one\n"),
        0,
        "user add",
    );
    let srv = Server::start_in(dir.path(), &["--registration", "closed"]);
    let r = register_resp(&srv, "bob", PW);
    assert_error(&r, 403, "forbidden");
    let pair = login_pw(&srv, "alice", "password-one");
    assert_user_shape(&pair["user"], "alice", &["admin"]);
}
