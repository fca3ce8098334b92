//! What `parley check` reads from a database file, opened read-only so that looking
//! never changes anything (no schema is created or upgraded, no WAL is checkpointed).

use super::{Result, StoreError, SCHEMA_VERSION};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;

/// The facts about one database file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `PRAGMA integrity_check`'s lines (`["ok"]` when sound).
    pub integrity: Vec<String>,
    /// `PRAGMA user_version`.
    pub schema_version: i64,
    /// The version this build writes.
    pub current_version: i64,
    /// The first broken audit row and why, if any.
    pub audit_break: Option<(i64, String)>,
    /// Audit rows.
    pub audit_rows: i64,
    /// Whether the JWT signing key exists yet (made on first start).
    pub has_key: bool,
}

/// Opens `path` read-only; a missing file is an error (nothing is created).
pub fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.exists() {
        return Err(StoreError::NotFound(format!("{}", path.display())));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let c = Connection::open_with_flags(path, flags)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(c)
}

/// Reads every fact `parley check` reports.
pub fn inspect(c: &Connection) -> Result<Health> {
    let mut st = c.prepare("PRAGMA integrity_check")?;
    let integrity = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let schema_version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let parley = schema_version > 0;
    let audit_break = match parley {
        true => super::audit::verify_chain(c)?,
        false => None,
    };
    let count = |sql: &str| -> Result<i64> { Ok(c.query_row(sql, [], |r| r.get(0))?) };
    let audit_rows = match parley {
        true => count("SELECT count(*) FROM audit_log")?,
        false => 0,
    };
    let has_key = parley
        && c.query_row(
            "SELECT 1 FROM settings WHERE key = 'jwt_key' AND length(value) >= 32",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    Ok(Health {
        integrity,
        schema_version,
        current_version: SCHEMA_VERSION,
        audit_break,
        audit_rows,
        has_key,
    })
}
