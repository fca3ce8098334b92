//! The audit trail on PostgreSQL: the same hash chain as [`crate::store::audit`],
//! hashed by the same function, so `verify_audit_chain` means the same on both
//! engines.
//!
//! Appending is a patient job on the `pg-writer` thread ([`super::writer`]) that holds
//! the `AUDIT` advisory lock from before it reads the newest row's hash until COMMIT,
//! so every node appends to one chain. Ids run 1, 2, 3, … without gaps, as on SQLite:
//! a sequence would leave a gap for every rolled-back insert, so the id is chosen here,
//! past both the newest row and the `audit_seq` setting (the highest id ever used,
//! which rolls back with the insert), and a deleted newest row still leaves its gap.
//! Reads and the verification run on the caller's thread (a pooled client).

use super::writer::Locks;
use super::{big, col, Postgres, Tx};
use crate::store::audit::{row_hash, AuditEntry, AuditEvent};
use crate::store::Result;

/// Appends an event inside the caller's write transaction (which holds `AUDIT`).
fn append(c: &mut Tx<'_, '_>, e: &AuditEntry) -> Result<()> {
    let row = c.query_one(
        "SELECT greatest(
                    coalesce((SELECT max(id) FROM audit_log), 0),
                    coalesce((SELECT encode(value, 'escape')::bigint FROM settings
                               WHERE key = 'audit_seq'
                                 AND encode(value, 'escape') ~ '^[0-9]{1,18}$'), 0)),
                coalesce((SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1), '')",
        &[],
    )?;
    let used: i64 = col(&row, 0)?;
    let prev: String = col(&row, 1)?;
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
    c.execute(
        "WITH seq AS (
             INSERT INTO settings(key, value) VALUES ('audit_seq', convert_to($1::bigint::text, 'UTF8'))
             ON CONFLICT (key) DO UPDATE SET value = excluded.value)
         INSERT INTO audit_log(id, ts, actor, action, target, ip, detail, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &id, &ts, &e.actor, &e.action, &e.target, &e.ip, &detail, &prev, &hash,
        ],
    )?;
    Ok(())
}

impl Postgres {
    /// Records an event through the batched writer without waiting for it.
    pub fn audit(&self, entry: AuditEntry) {
        // Nobody waits on an audit row: its batch may wait for company.
        self.writer.submit_patient(
            Locks::AUDIT,
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
            c.query(
                "SELECT id, ts, actor, action, target, ip, detail FROM audit_log
                  WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before.unwrap_or(i64::MAX), &big(limit)],
            )?
            .iter()
            .map(|r| {
                let detail: String = col(r, 6)?;
                Ok(AuditEvent {
                    id: col(r, 0)?,
                    ts: col(r, 1)?,
                    actor: col(r, 2)?,
                    action: col(r, 3)?,
                    target: col(r, 4)?,
                    ip: col(r, 5)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
        })
    }

    /// Walks the chain; returns the id of the first row that was changed, deleted or
    /// inserted, with the reason, or `None` if the chain is intact. Ids must run 1, 2,
    /// 3, … without gaps, so a deleted row is found even when later rows were chained
    /// onto its predecessor. The rows stream through; the table is never held whole.
    pub fn verify_audit_chain(&self) -> Result<Option<(i64, String)>> {
        self.read(|c| {
            let (mut prev, mut expected) = (String::new(), 1i64);
            let mut broken = None;
            c.for_each(
                "SELECT id, ts, actor, action, target, ip, detail, prev_hash, hash
                   FROM audit_log ORDER BY id",
                &[],
                |r| {
                    let id: i64 = col(r, 0)?;
                    let (ts, actor, action): (String, Option<String>, String) =
                        (col(r, 1)?, col(r, 2)?, col(r, 3)?);
                    let (target, ip, detail): (Option<String>, Option<String>, String) =
                        (col(r, 4)?, col(r, 5)?, col(r, 6)?);
                    let (prev_hash, hash): (String, String) = (col(r, 7)?, col(r, 8)?);
                    if id != expected {
                        broken = Some((
                            expected,
                            format!("was deleted (the next row present is {id})"),
                        ));
                        return Ok(false);
                    }
                    if prev_hash != prev {
                        broken = Some((
                            id,
                            "does not follow the previous row (a row was deleted or inserted \
                             before it)"
                                .into(),
                        ));
                        return Ok(false);
                    }
                    let want = row_hash(
                        id,
                        &ts,
                        (&actor, &action, &target, &ip),
                        &detail,
                        &prev_hash,
                    );
                    if want != hash {
                        broken = Some((id, "its content was changed".into()));
                        return Ok(false);
                    }
                    prev = hash;
                    expected = id + 1;
                    Ok(true)
                },
            )?;
            Ok(broken)
        })
    }
}
