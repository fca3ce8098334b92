//! Process-wide counters for `/metrics` (Prometheus text format).
//!
//! Plain atomics in one static: cheap enough to bump on the hot path, and readable
//! from anywhere without threading a handle through every layer.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Room and direct messages stored.
    pub messages_stored: AtomicU64,
    /// Frames handed to sockets (each recipient counts).
    pub frames_delivered: AtomicU64,
    /// Sockets closed with 1008 because they could not keep up.
    pub slow_clients_dropped: AtomicU64,
    /// Upgrades refused with 401.
    pub upgrades_rejected_unauthorized: AtomicU64,
    /// Upgrades refused with 403 (ban, Origin).
    pub upgrades_rejected_forbidden: AtomicU64,
    /// Upgrades refused with 429 (socket limits, refusal flood).
    pub upgrades_rejected_limit: AtomicU64,
    /// Upgrades refused with 400 or 405: not a WebSocket handshake.
    pub upgrades_rejected_invalid: AtomicU64,
    /// Successful logins.
    pub logins_ok: AtomicU64,
    /// Failed logins.
    pub logins_failed: AtomicU64,
    /// HTTP requests refused for want of an IO thread (all busy, or the address's
    /// share taken); their connections were shut down.
    pub http_refused: AtomicU64,
    /// HTTP connections shut down for pipelining too many requests.
    pub http_cut_pipeline: AtomicU64,
    /// HTTP connections shut down because a body or an answer took too long.
    pub http_cut_deadline: AtomicU64,
    /// Idle HTTP connections closed (idle timeout, or no request head in time).
    pub http_reaped_idle: AtomicU64,
    /// Idle HTTP connections closed early because descriptors ran short.
    pub http_reaped_pressure: AtomicU64,
    /// Times tiny_http's accept loop died and was started again.
    pub http_accept_restarts: AtomicU64,
    /// Times the live sockets' logins were checked again against the database.
    pub login_sweeps: AtomicU64,
}

/// The one instance.
pub static METRICS: Metrics = Metrics {
    messages_stored: AtomicU64::new(0),
    frames_delivered: AtomicU64::new(0),
    slow_clients_dropped: AtomicU64::new(0),
    upgrades_rejected_unauthorized: AtomicU64::new(0),
    upgrades_rejected_forbidden: AtomicU64::new(0),
    upgrades_rejected_limit: AtomicU64::new(0),
    upgrades_rejected_invalid: AtomicU64::new(0),
    logins_ok: AtomicU64::new(0),
    logins_failed: AtomicU64::new(0),
    http_refused: AtomicU64::new(0),
    http_cut_pipeline: AtomicU64::new(0),
    http_cut_deadline: AtomicU64::new(0),
    http_reaped_idle: AtomicU64::new(0),
    http_reaped_pressure: AtomicU64::new(0),
    http_accept_restarts: AtomicU64::new(0),
    login_sweeps: AtomicU64::new(0),
};

/// Bumps a counter by one.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Relaxed);
}

/// Values read from elsewhere at render time.
pub struct Gauges {
    /// Open WebSockets.
    pub open_sockets: usize,
    /// Write transactions committed.
    pub db_batches: u64,
    /// Writes committed in them.
    pub db_batched_writes: u64,
    /// Largest batch so far.
    pub db_max_batch: u64,
    /// Writes waiting for the writer.
    pub db_queued: u64,
}

/// Renders every counter plus the gauges, in Prometheus text format.
pub fn render(g: &Gauges) -> String {
    let Gauges {
        open_sockets,
        db_batches: batches,
        db_batched_writes: batched_jobs,
        db_max_batch: max_batch,
        db_queued,
    } = *g;
    let m = &METRICS;
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    line(
        "parley_open_sockets",
        "gauge",
        "Open WebSockets.",
        open_sockets.to_string(),
    );
    let counters = [
        (
            "parley_messages_stored_total",
            "Messages stored.",
            &m.messages_stored,
        ),
        (
            "parley_frames_delivered_total",
            "Frames delivered to sockets.",
            &m.frames_delivered,
        ),
        (
            "parley_slow_clients_dropped_total",
            "Sockets dropped for not keeping up.",
            &m.slow_clients_dropped,
        ),
        ("parley_logins_ok_total", "Successful logins.", &m.logins_ok),
        (
            "parley_logins_failed_total",
            "Failed logins.",
            &m.logins_failed,
        ),
        (
            "parley_http_accept_restarts_total",
            "Times the HTTP accept loop died (out of descriptors) and was started again.",
            &m.http_accept_restarts,
        ),
        (
            "parley_login_sweeps_total",
            "Times live sockets' logins were checked again after a revoke, ban or account change.",
            &m.login_sweeps,
        ),
    ];
    for (name, help, c) in counters {
        line(name, "counter", help, c.load(Relaxed).to_string());
    }
    by_reason(
        &mut out,
        "parley_upgrades_rejected_total",
        "WebSocket upgrades refused, by reason.",
        &[
            ("unauthorized", &m.upgrades_rejected_unauthorized),
            ("forbidden", &m.upgrades_rejected_forbidden),
            ("limit", &m.upgrades_rejected_limit),
            ("invalid", &m.upgrades_rejected_invalid),
        ],
    );
    by_reason(
        &mut out,
        "parley_http_closed_total",
        "HTTP connections the server shut down, by reason.",
        &[
            ("idle", &m.http_reaped_idle),
            ("pressure", &m.http_reaped_pressure),
            ("deadline", &m.http_cut_deadline),
            ("refused", &m.http_refused),
            ("pipeline", &m.http_cut_pipeline),
        ],
    );
    let mut line = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    line(
        "parley_db_batches_total",
        "counter",
        "Write transactions committed.",
        batches,
    );
    line(
        "parley_db_batched_writes_total",
        "counter",
        "Writes committed in batches.",
        batched_jobs,
    );
    line(
        "parley_db_max_batch",
        "gauge",
        "Largest write batch so far.",
        max_batch,
    );
    line(
        "parley_db_queue_depth",
        "gauge",
        "Writes waiting for the writer.",
        db_queued,
    );
    out
}

/// A counter with one value per `reason` label.
fn by_reason(out: &mut String, name: &str, help: &str, values: &[(&str, &AtomicU64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, c) in values {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", c.load(Relaxed));
    }
}
