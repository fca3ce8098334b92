//! Room left for the database, so that a full disk (or a database at its size cap,
//! `--max-db-mb`) refuses new messages with a clear error while logins, refreshes and
//! audit rows — small, and needed to use the server at all — still fit.
//!
//! The writer thread measures before each batch (a few system calls): the pages the
//! database may still grow by (its `max_page_count` cap, less the pages in use, plus
//! the free ones) and the bytes free on its file system. Below [`PAGE_RESERVE`] or
//! [`DISK_RESERVE`] the store refuses messages with [`super::StoreError::Full`] until
//! space returns (messages deleted, the disk cleaned up), which needs no restart.

use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Room under the size cap kept for everything but messages.
pub const PAGE_RESERVE: u64 = 256 * 1024;
/// Free disk kept for everything but messages (the WAL grows before a checkpoint).
pub const DISK_RESERVE: u64 = 16 * 1024 * 1024;

/// Whether the database is short of room, as last measured.
pub struct Space {
    dir: PathBuf,
    low: AtomicBool,
}

impl Space {
    /// Watches the database at `path`.
    pub fn new(path: &std::path::Path) -> Space {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Space {
            dir,
            low: AtomicBool::new(false),
        }
    }

    /// Whether new messages must be refused.
    pub fn low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Measures again (called by the writer thread before each batch).
    pub fn measure(&self, conn: &Connection) {
        let pages = page_headroom(conn).unwrap_or(u64::MAX);
        let disk = rustix::fs::statvfs(&self.dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        let low = pages < PAGE_RESERVE || disk < DISK_RESERVE;
        if self.low.swap(low, Ordering::Relaxed) != low {
            match low {
                true => log::warn!(
                    "database nearly full ({pages} bytes under its cap, {disk} bytes free on disk): refusing new messages"
                ),
                false => log::info!("database has room again: accepting messages"),
            }
        }
    }
}

/// Bytes the database may still grow by under its page cap.
fn page_headroom(conn: &Connection) -> rusqlite::Result<u64> {
    let get = |pragma: &str| -> rusqlite::Result<u64> {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get::<_, i64>(0))
            .map(|v| u64::try_from(v).unwrap_or(0))
    };
    let (max, used, free, size) = (
        get("max_page_count")?,
        get("page_count")?,
        get("freelist_count")?,
        get("page_size")?,
    );
    Ok((max.saturating_sub(used) + free).saturating_mul(size))
}
