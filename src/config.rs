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
    /// Seconds after its rotation in which a retired refresh token still gets a new
    /// pair instead of revoking its login (0 = off).
    pub refresh_grace: u64,
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
    /// The database's size cap in bytes (`None`: as big as the disk allows).
    pub max_db_bytes: Option<u64>,
    /// Bytes queued for one slow socket before it is dropped with 1008 (a single frame
    /// bigger than this still goes to a socket with nothing else queued).
    pub send_queue_bytes: usize,
    /// A socket silent this long is pinged; silent twice as long, closed (zero: off).
    pub ws_ping: std::time::Duration,
    /// Plain HTTP connections with no request for this long are closed.
    pub http_idle_timeout: std::time::Duration,
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
            refresh_grace: 10,
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
            send_queue_bytes: 4 << 20,
            max_db_bytes: None,
            ws_ping: std::time::Duration::from_secs(30),
            http_idle_timeout: std::time::Duration::from_secs(30),
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
        if self.send_queue == 0 || self.send_queue_bytes == 0 {
            return Err("--send-queue and --send-queue-bytes must be positive".into());
        }
        Ok(())
    }
}
