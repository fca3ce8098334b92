//! `chat.db.example` is a real SQLite database whose layout is exactly schema.sql's,
//! with a little demo data; a server starts on (a copy of) it.

mod common;

use common::*;
use rusqlite::Connection;
use std::path::Path;

type SchemaRow = (String, String, String, Option<String>);

fn layout(conn: &Connection) -> Vec<SchemaRow> {
    let mut st = conn
        .prepare(
            "SELECT type, name, tbl_name, sql FROM sqlite_master \
             WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name",
        )
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn count(conn: &Connection, table: &str) -> i64 {
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("count {table}: {e}"))
}

#[test]
fn example_db_opens_and_matches_schema_sql() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let schema = std::fs::read_to_string(root.join("schema.sql")).expect("schema.sql");
    // Work on a copy: opening a WAL database writes beside it.
    let tmp = TempDir::new();
    let copy = tmp.path().join("chat.db");
    std::fs::copy(root.join("chat.db.example"), &copy).expect("chat.db.example exists");

    let example = Connection::open(&copy).expect("chat.db.example opens");
    let ok: String = example
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");

    let fresh = Connection::open_in_memory().unwrap();
    fresh.execute_batch(&schema).expect("schema.sql applies");
    let want = layout(&fresh);
    assert!(!want.is_empty(), "schema.sql creates tables");
    assert_eq!(
        layout(&example),
        want,
        "chat.db.example layout == schema.sql"
    );

    // The example carries the schema version that the current binary writes into a
    // database it creates (a fresh file made by `parley user add`), so a server built
    // from this tree accepts it as its own.
    let v_example: i64 = example
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let fresh_dir = TempDir::new();
    let out = run_cli(
        &[
            "user",
            "add",
            "someone",
            "--db",
            &db_arg(fresh_dir.path()),
            "--bcrypt-cost",
            "4",
        ],
        "password-one\n",
    );
    assert_exit(&out, 0, "user add on a fresh database");
    let v_fresh: i64 = Connection::open(fresh_dir.path().join("chat.db"))
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(v_fresh > 0, "a fresh database carries a schema version");
    assert_eq!(
        v_example, v_fresh,
        "chat.db.example's user_version == a fresh database's"
    );

    // The permission tables (docs/accounts.md), and a little demo data.
    for t in ["roles", "permissions", "role_permissions"] {
        assert!(count(&example, t) > 0, "{t} is seeded");
    }
    assert!(count(&example, "users") >= 2, "an admin and a member");
    assert!(count(&example, "messages") >= 1, "a few messages");
    drop(example);

    // A server runs on it, and `general` is there with its messages.
    let srv = Server::start_in(tmp.path(), &[]);
    let at = new_user(&srv, "examiner");
    let r = srv.get("/api/rooms/general/messages", Some(&at));
    assert_status(&r, 200);
    assert!(
        !r.json()["messages"].as_array().unwrap().is_empty(),
        "the demo messages are in general"
    );
}
