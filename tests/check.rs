//! `parley check` (the read-only health report) and `parley --version`.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn version_names_parley_and_sqlite() {
    let out = run_cli(&["--version"], "");
    assert_exit(&out, 0, "--version");
    let text = stdout(&out);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(concat!("parley ", env!("CARGO_PKG_VERSION")))
    );
    let sqlite = lines.next().unwrap_or_default();
    assert!(sqlite.starts_with("SQLite 3."), "{text}");
}

#[test]
fn a_sound_database_passes_and_nothing_is_created_for_a_missing_one() {
    let dir = TempDir::new();
    let missing = dir.path().join("nothing.db");
    let out = run_cli(&["check", "--db", missing.to_str().unwrap()], "");
    assert_exit(&out, 1, "check of a missing file");
    assert!(!missing.exists(), "check created the file");

    let mut srv = Server::start_in(dir.path(), &[]);
    register(&srv, "alice");
    srv.sigterm();
    srv.wait_exit(std::time::Duration::from_secs(10))
        .expect("exit");
    let out = run_cli(&["check", "--db", &db_arg(dir.path())], "");
    assert_exit(&out, 0, "check of a sound database");
    let text = stdout(&out);
    for line in [
        "ok    integrity: ok",
        "ok    schema: version",
        "audit trail: 1 rows, chain intact",
        "signing key: present; file mode 0600",
        "socket ceiling: open files",
        "result: sound",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
}

#[test]
fn a_tampered_audit_trail_or_a_loose_mode_is_reported() {
    let dir = TempDir::new();
    let mut srv = Server::start_in(dir.path(), &[]);
    register(&srv, "alice");
    register(&srv, "bob");
    srv.sigterm();
    srv.wait_exit(std::time::Duration::from_secs(10))
        .expect("exit");
    let db = dir.path().join("chat.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_cli(&["check", "--db", db.to_str().unwrap()], "");
    assert_exit(&out, 0, "a loose mode is a warning");
    assert!(stdout(&out).contains("chmod 600"), "{}", stdout(&out));
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute("UPDATE audit_log SET target = 'mallory' WHERE id = 1", [])
        .unwrap();
    c.pragma_update(None, "journal_mode", "DELETE").unwrap();
    drop(c);
    let before = std::fs::read(&db).unwrap();
    let out = run_cli(&["check", "--db", db.to_str().unwrap()], "");
    assert_exit(&out, 1, "a changed audit row fails the check");
    assert!(
        stdout(&out).contains("FAIL  audit trail: row 1"),
        "{}",
        stdout(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("audit trail"), "{stderr}");
    // Read-only: the file is byte for byte as it was, and no WAL appeared.
    assert_eq!(std::fs::read(&db).unwrap(), before);
    assert!(!dir.path().join("chat.db-wal").exists());
}
