//! Every limit and setting of a running server, in one validated struct.
//!
//! The command line and the environment are parsed into a [`Config`] once, in
//! [`crate::cli`]; everything else reads it. Defaults are the safe ones from
//! PROTOCOL.md, in the spirit of tungstenite's `WebSocketConfig`.

use std::path::PathBuf;

/// Who may create accounts through `POST /api/register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Registration {
    /// Anyone may register.
    Open,
    /// Only `parley user add` creates accounts; register answers 403.
    Closed,
}

/// The settings and limits of one server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on, `host:port` (port 0 picks a free one).
    pub addr: String,
    /// The SQLite database file.
    pub db: PathBuf,
    /// Access-token lifetime in seconds.
    pub access_ttl: u64,
    /// Refresh-token lifetime in seconds.
    pub refresh_ttl: u64,
    /// bcrypt cost for new password hashes (4–31).
    pub bcrypt_cost: u32,
    /// Whether self-registration is open.
    pub registration: Registration,
    /// Extra origins allowed on the WebSocket upgrade (`*` allows all).
    pub allow_origins: Vec<String>,
    /// Messages per second per socket (0 = unlimited).
    pub msg_rate: u32,
    /// Login attempts per minute per IP and per username (0 = unlimited).
    pub login_rate: u32,
    /// Registrations per hour per IP (0 = unlimited); a budget apart from logins.
    pub register_rate: u32,
    /// Rooms created per hour per user (0 = unlimited).
    pub room_rate: u32,
    /// Open WebSockets in total.
    pub max_sockets: usize,
    /// Open WebSockets per user.
    pub max_sockets_per_user: usize,
    /// Frames queued for one slow socket before it is dropped with 1008.
    pub send_queue: usize,
    /// Plain HTTP connections with no request for this long are closed.
    pub http_idle_timeout: std::time::Duration,
    /// A connection that has not sent a whole request head this long after it opened
    /// is closed (if the idle timeout is shorter, that applies).
    pub http_head_timeout: std::time::Duration,
    /// Time allowed to read a request body, or to write an answer, on top of the time
    /// its bytes take at `http_min_rate`; past it the connection is shut down.
    pub http_io_timeout: std::time::Duration,
    /// The slowest transfer, in bytes per second, that `http_io_timeout` allows for.
    pub http_min_rate: usize,
    /// Answer bytes an HTTP worker writes to one connection itself (a write that fits
    /// in the kernel's send buffer cannot wait on the client); past it, IO threads write.
    pub http_inline_bytes: usize,
    /// IO threads (reading bodies, writing answers that may wait) at most.
    pub http_io_threads: usize,
    /// IO threads the connections of one client address may hold at once.
    pub http_per_address: usize,
    /// Pipelined requests that may wait behind the one in progress on a connection
    /// before it is shut down.
    pub http_pipeline: usize,
    /// Open descriptors, in percent of the open-file limit, past which the reaper
    /// closes idle HTTP connections at once, oldest first ...
    pub fd_pressure_percent: u8,
    /// ... until this percent is open.
    pub fd_relief_percent: u8,
    /// Connections younger than this are spared by that (their request may be on its
    /// way).
    pub fd_pressure_grace: std::time::Duration,
    /// Free descriptors needed before a dead accept loop is started again.
    pub accept_headroom: usize,
    /// Largest HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest WebSocket message after reassembly, in bytes (over it: close 1009).
    pub max_frame_bytes: usize,
    /// Longest chat message body, in Unicode characters.
    pub max_message_chars: usize,
    /// tungstenite read buffer per socket; small, because idle sockets pay for it.
    pub ws_read_buffer: usize,
    /// Threads answering plain HTTP requests.
    pub http_workers: usize,
    /// Stack size of each per-socket thread, in bytes.
    pub socket_thread_stack: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: "127.0.0.1:8080".into(),
            db: PathBuf::from("./chat.db"),
            access_ttl: 900,
            refresh_ttl: 2_592_000,
            bcrypt_cost: 12,
            registration: Registration::Open,
            allow_origins: Vec::new(),
            msg_rate: 20,
            login_rate: 10,
            register_rate: 30,
            room_rate: 20,
            max_sockets: 10_000,
            max_sockets_per_user: 50,
            send_queue: 1024,
            http_idle_timeout: std::time::Duration::from_secs(30),
            http_head_timeout: std::time::Duration::from_secs(10),
            http_io_timeout: std::time::Duration::from_secs(5),
            http_min_rate: 16 * 1024,
            http_inline_bytes: 8 * 1024,
            http_io_threads: 64,
            http_per_address: 8,
            http_pipeline: 16,
            fd_pressure_percent: 85,
            fd_relief_percent: 70,
            fd_pressure_grace: std::time::Duration::from_secs(2),
            accept_headroom: 16,
            max_body_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            max_message_chars: 4000,
            ws_read_buffer: 1024,
            http_workers: 16,
            socket_thread_stack: 128 * 1024,
        }
    }
}

impl Config {
    /// Checks that the values make sense together; the message names the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(format!(
                "--bcrypt-cost must be 4..=31, got {}",
                self.bcrypt_cost
            ));
        }
        if self.access_ttl == 0 || self.refresh_ttl == 0 {
            return Err("--access-ttl and --refresh-ttl must be positive".into());
        }
        if self.max_sockets == 0 || self.max_sockets_per_user == 0 {
            return Err("--max-sockets and --max-sockets-per-user must be positive".into());
        }
        if self.http_idle_timeout.is_zero() {
            return Err("--http-idle-timeout must be positive".into());
        }
        if self.http_io_timeout.is_zero() {
            return Err("--http-io-timeout must be positive".into());
        }
        if self.http_per_address == 0 {
            return Err("--http-per-address must be positive".into());
        }
        if self.send_queue == 0 {
            return Err("--send-queue must be positive".into());
        }
        Ok(())
    }
}
