//! The audit trail: one row per security event, hash-chained so that a row changed,
//! deleted or inserted behind the server's back is detectable.

use super::{sqlite::Sqlite, Result};
use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// An event to record. Never put a secret (password, token, key) in any field.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Acting username; `None` when anonymous.
    pub actor: Option<String>,
    /// One of the audit actions of docs/audit.md, e.g. `login_failed`.
    pub action: &'static str,
    /// A username, room name or message id.
    pub target: Option<String>,
    /// Peer IP without port.
    pub ip: Option<String>,
    /// Extra facts as a JSON object.
    pub detail: serde_json::Value,
}

/// A stored event, as `GET /api/admin/audit` returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEvent {
    /// Row id.
    pub id: i64,
    /// RFC 3339.
    pub ts: String,
    /// Acting username or null.
    pub actor: Option<String>,
    /// Action name.
    pub action: String,
    /// Target or null.
    pub target: Option<String>,
    /// Peer IP or null.
    pub ip: Option<String>,
    /// Extra facts.
    pub detail: serde_json::Value,
}

/// The hash of a row: SHA-256 (hex) over its content and the previous row's hash.
pub(super) fn row_hash(
    id: i64,
    ts: &str,
    e: (&Option<String>, &str, &Option<String>, &Option<String>),
    detail: &str,
    prev: &str,
) -> String {
    let (actor, action, target, ip) = e;
    // A tuple serialises to the same compact JSON array as `json!([...])` did, without
    // building a `Value` first (the writer hashes every audit row on one thread). It
    // cannot fail: every element is a string, an integer or null.
    let canonical =
        serde_json::to_vec(&(id, ts, actor, action, target, ip, detail, prev)).unwrap_or_default();
    hex(&Sha256::digest(&canonical))
}

/// Lower-case hex, two digits per byte.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Appends an event inside the caller's write transaction.
///
/// The row's id is chosen here, as AUTOINCREMENT would (past both the newest row and
/// the highest id ever used, so a deleted newest row still leaves its gap), which
/// lets the hash be computed before the insert: two statements per event, not three.
pub fn append(c: &Connection, e: &AuditEntry) -> Result<()> {
    let (used, prev): (i64, String) = c
        .prepare_cached(
            "SELECT max((SELECT coalesce(max(seq), 0) FROM sqlite_sequence
                          WHERE name = 'audit_log'),
                        coalesce((SELECT max(id) FROM audit_log), 0)),
                    coalesce((SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1), '')",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let id = used + 1;
    let ts = crate::clock::now_rfc3339();
    let detail = e.detail.to_string();
    let hash = row_hash(
        id,
        &ts,
        (&e.actor, e.action, &e.target, &e.ip),
        &detail,
        &prev,
    );
    c.prepare_cached(
        "INSERT INTO audit_log(id, ts, actor, action, target, ip, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        id, ts, e.actor, e.action, e.target, e.ip, detail, prev, hash
    ])?;
    Ok(())
}

impl Sqlite {
    /// Records an event through the batched writer without waiting for it.
    pub fn audit(&self, entry: AuditEntry) {
        // Nobody waits on an audit row: its batch may wait for company.
        self.writer.submit_patient(
            move |c| append(c, &entry),
            |r| {
                if let Err(e) = r {
                    log::error!("audit write failed: {e}");
                }
            },
        )
    }

    /// Events newest first: at most `limit`, only ids below `before` if given.
    pub fn audit_events(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEvent>> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, ts, actor, action, target, ip, detail FROM audit_log
                  WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![before.unwrap_or(i64::MAX), limit], |r| {
                let detail: String = r.get(6)?;
                Ok(AuditEvent {
                    id: r.get(0)?,
                    ts: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    ip: r.get(5)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })?;
            rows.collect()
        })
    }

    /// Walks the chain; returns the id of the first row that was changed, deleted or
    /// inserted, with the reason, or `None` if the chain is intact. Ids must run 1, 2,
    /// 3, … without gaps (AUTOINCREMENT never reuses or skips one on its own, since a
    /// rolled-back insert rolls back the sequence too), so a deleted row is found even
    /// when later rows were chained onto its predecessor.
    pub fn verify_audit_chain(&self) -> Result<Option<(i64, String)>> {
        self.read(verify_chain)
    }
}

/// [`Store::verify_audit_chain`] on any connection (`parley check` opens the file
/// read-only).
pub fn verify_chain(c: &Connection) -> rusqlite::Result<Option<(i64, String)>> {
    let mut st = c.prepare(
        "SELECT id, ts, actor, action, target, ip, detail, prev_hash, hash
           FROM audit_log ORDER BY id",
    )?;
    let mut rows = st.query([])?;
    let (mut prev, mut expected) = (String::new(), 1i64);
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let (ts, actor, action): (String, Option<String>, String) =
            (r.get(1)?, r.get(2)?, r.get(3)?);
        let (target, ip, detail): (Option<String>, Option<String>, String) =
            (r.get(4)?, r.get(5)?, r.get(6)?);
        let (prev_hash, hash): (String, String) = (r.get(7)?, r.get(8)?);
        if id != expected {
            return Ok(Some((
                expected,
                format!("was deleted (the next row present is {id})"),
            )));
        }
        if prev_hash != prev {
            return Ok(Some((
                id,
                "does not follow the previous row (a row was deleted or inserted before it)".into(),
            )));
        }
        if row_hash(
            id,
            &ts,
            (&actor, &action, &target, &ip),
            &detail,
            &prev_hash,
        ) != hash
        {
            return Ok(Some((id, "its content was changed".into())));
        }
        prev = hash;
        expected = id + 1;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::row_hash;
    use sha2::{Digest, Sha256};

    /// The canonical text a row's hash is taken over is part of the file format: rows
    /// written by any earlier build must still verify. This pins it, escapes included.
    #[test]
    fn row_hash_is_sha256_over_the_canonical_json_array() {
        let (actor, target, ip) = (
            Some("ann \"x\"\n\u{1}é".to_string()),
            None,
            Some("127.0.0.1".to_string()),
        );
        let detail = r#"{"socket":7,"reason":"a\tb"}"#;
        let canonical = "[42,\"2026-12-03T12:00:00.123Z\",\"ann \\\"x\\\"\\n\\u0001é\",\"ws_connect\",null,\"127.0.0.1\",\"{\\\"socket\\\":7,\\\"reason\\\":\\\"a\\\\tb\\\"}\",\"ab01\"]";
        let want: String = Sha256::digest(canonical.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        // The same digest, from `sha256sum` over that text.
        assert_eq!(
            want,
            "457bde9786530d1926b0964e80370c83eaec712508145ddfe1aaf429566d64f3"
        );
        let got = row_hash(
            42,
            "2026-12-03T12:00:00.123Z",
            (&actor, "ws_connect", &target, &ip),
            detail,
            "ab01",
        );
        assert_eq!(got, want);
        assert_eq!(got.len(), 64);
    }
}
