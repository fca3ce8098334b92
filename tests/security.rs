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
use std::path::Path;
use std::process::Output;
use std::sync::Barrier;
use std::thread;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

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
        // committed, as a banned user (403).
        let (winner, loser_status) = if a == 204 { (&alice, b) } else { (&bob, a) };
        assert!(
            matches!(loser_status, 403 | 409),
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
