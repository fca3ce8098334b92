//! `parley check`: a read-only health report an operator runs before calling for help.
//!
//! It opens the database read-only (a missing file is an error; nothing is created),
//! and reports SQLite's integrity check, the schema version, the WAL's size, the audit
//! chain, the signing key and the file's mode, and this machine's socket ceiling with
//! the commands that raise it. Problems with the data (integrity, schema, audit chain)
//! fail the check (exit 1); a low ceiling or a missing key is only a warning.

use crate::store::health::{inspect, open_read_only, Health};
use crate::sys::Ceiling;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How one line of the report came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Report {
    lines: Vec<(Verdict, String)>,
}

impl Report {
    fn add(&mut self, v: Verdict, text: impl Into<String>) {
        self.lines.push((v, text.into()));
    }

    fn count(&self, v: Verdict) -> usize {
        self.lines.iter().filter(|l| l.0 == v).count()
    }
}

/// Runs the check on `db`, printing the report; `Err` names the problems (exit 1).
pub fn run(db: &Path, max_sockets: usize) -> Result<(), String> {
    if !db.exists() {
        return Err(format!(
            "no database at {} (nothing was created)",
            db.display()
        ));
    }
    let conn = open_read_only(db).map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let health = inspect(&conn).map_err(|e| format!("reading {}: {e}", db.display()))?;
    let mut r = Report { lines: Vec::new() };
    data(&mut r, &health);
    files(&mut r, db, &health);
    ceiling(&mut r, &Ceiling::read(), max_sockets);
    println!("parley check: {}", db.display());
    for (v, text) in &r.lines {
        let tag = match v {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("  {tag}  {}", text.replace('\n', "\n        "));
    }
    let (fails, warns) = (r.count(Verdict::Fail), r.count(Verdict::Warn));
    if fails > 0 {
        let what: Vec<&str> = r
            .lines
            .iter()
            .filter(|l| l.0 == Verdict::Fail)
            .map(|l| l.1.as_str())
            .collect();
        return Err(format!("{fails} problem(s): {}", what.join("; ")));
    }
    println!("result: sound ({warns} warning(s))");
    Ok(())
}

/// Integrity, schema version and the audit chain.
fn data(r: &mut Report, h: &Health) {
    match h.integrity.as_slice() {
        [ok] if ok == "ok" => r.add(Verdict::Ok, "integrity: ok"),
        lines => r.add(Verdict::Fail, format!("integrity: {}", lines.join("; "))),
    }
    let (v, cur) = (h.schema_version, h.current_version);
    match v {
        0 => r.add(
            Verdict::Fail,
            "schema: not a parley database (user_version 0)",
        ),
        v if v > cur => r.add(
            Verdict::Fail,
            format!("schema: version {v} is newer than this build ({cur}); upgrade parley"),
        ),
        v if v < cur => r.add(
            Verdict::Warn,
            format!("schema: version {v}; the server upgrades it to {cur} when it starts"),
        ),
        v => r.add(Verdict::Ok, format!("schema: version {v}")),
    }
    match &h.audit_break {
        None if v > 0 => r.add(
            Verdict::Ok,
            format!("audit trail: {} rows, chain intact", h.audit_rows),
        ),
        None => {}
        Some((id, why)) => r.add(Verdict::Fail, format!("audit trail: row {id} {why}")),
    }
}

/// The WAL's size, the signing key, and who may read the file.
fn files(r: &mut Report, db: &Path, h: &Health) {
    let wal = db.with_file_name(format!(
        "{}-wal",
        db.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    ));
    let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
    r.add(Verdict::Ok, format!("WAL: {} KiB", wal_bytes / 1024));
    let mode = std::fs::metadata(db).map_or(0, |m| m.permissions().mode() & 0o777);
    let key = match h.has_key {
        true => "present",
        false => "not created yet (the server makes it on first start)",
    };
    let private = mode & 0o077 == 0;
    let verdict = match (h.has_key, private) {
        (true, true) => Verdict::Ok,
        _ => Verdict::Warn,
    };
    let note = match private {
        true => String::new(),
        false => format!(
            "\nothers may read the file (it holds the key and password hashes): chmod 600 {}",
            db.display()
        ),
    };
    r.add(
        verdict,
        format!("signing key: {key}; file mode {mode:04o}{note}"),
    );
}

/// How many WebSockets this machine's limits allow, and how to raise them.
fn ceiling(r: &mut Report, c: &Ceiling, max_sockets: usize) {
    let fits = c.sockets();
    let maps = c
        .max_map_count
        .map_or("unknown".to_owned(), |m| m.to_string());
    let text = format!(
        "socket ceiling: open files {} (hard {}), vm.max_map_count {maps}: about {fits} WebSockets \
         for --max-sockets {max_sockets} (as limited for this shell; a service may have others)",
        c.files_soft, c.files_hard
    );
    if fits >= max_sockets as u64 {
        return r.add(Verdict::Ok, text);
    }
    r.add(
        Verdict::Warn,
        format!(
            "{text}\nraise it: `ulimit -n 65536` in the shell that starts parley, or LimitNOFILE=65536 \
             in its systemd unit; and `sysctl -w vm.max_map_count=262144` (persist it in \
             /etc/sysctl.d/90-parley.conf)"
        ),
    );
}
