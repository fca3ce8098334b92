//! Wall-clock helpers: every timestamp parley stores or sends is RFC 3339 in UTC with
//! milliseconds, and token lifetimes are unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-11-23T18:20:00.123Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A unix time in seconds as RFC 3339 UTC (whole seconds).
pub fn unix_to_rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// Milliseconds on a monotonic clock that starts near zero when the process does:
/// for timeouts, where wall-clock steps must not count.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    // Never 0, so 0 can mean "never" in atomics.
    start.elapsed().as_millis() as u64 + 1
}

/// Now in unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_millis() {
        let s = now_rfc3339();
        assert_eq!(s.len(), "2026-11-23T18:20:00.123Z".len(), "{s}");
        assert!(s.ends_with('Z'));
        assert_eq!(unix_to_rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
