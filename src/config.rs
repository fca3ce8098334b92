//! Every limit and setting of a running server, in one validated struct.
//!
//! The command line and the environment are parsed into a [`Config`] once, in
//! [`crate::cli`]; everything else reads it. Defaults are the safe ones documented in
//! docs/cli.md, in the spirit of tungstenite's `WebSocketConfig`.

use crate::store::Location;
use std::path::PathBuf;

/// An IP network, `address/prefix` (a bare address is the network of that one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let net: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (e.g. 10.0.0.0/8, ::1/128)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside the network (an IPv4-mapped IPv6 address counts as its
    /// IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let ip = match ip {
            V6(v6) => v6.to_ipv4_mapped().map_or(V6(v6), V4),
            v4 => v4,
        };
        let (net, addr, bits) = match (self.net, ip) {
            (V4(n), V4(a)) => (u32::from(n) as u128, u32::from(a) as u128, 32),
            (V6(n), V6(a)) => (u128::from(n), u128::from(a), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (net >> shift) == (addr >> shift)
    }
}

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
    /// Where the data lives: an SQLite file, or a PostgreSQL URL (with the `postgres`
    /// feature).
    pub db: Location,
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
    /// Reverse proxies whose `X-Forwarded-*` / `Forwarded` headers are believed.
    pub trusted_proxies: Vec<Cidr>,
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
    /// A GraphQL socket that sends no `connection_init` this long after its upgrade is
    /// closed with 4408: it holds a thread and a socket slot while it waits.
    pub graphql_init_timeout: std::time::Duration,
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
    /// IO threads the connections of one client address may hold at once (its further
    /// requests wait in a bounded backlog: see [`crate::lane`]).
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
            db: Location::File(PathBuf::from("./chat.db")),
            access_ttl: 900,
            refresh_ttl: 2_592_000,
            refresh_grace: 10,
            bcrypt_cost: 12,
            registration: Registration::Open,
            allow_origins: Vec::new(),
            trusted_proxies: Vec::new(),
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
            graphql_init_timeout: std::time::Duration::from_secs(10),
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
        if matches!(self.db, Location::Postgres(_)) && !cfg!(feature = "postgres") {
            return Err(format!(
                "--db {}: this build has no PostgreSQL engine; build parley with \
                 `cargo build --release --features postgres`",
                self.db
            ));
        }
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
        if self.graphql_init_timeout.is_zero() {
            return Err("--graphql-init-timeout must be positive".into());
        }
        if self.http_io_timeout.is_zero() {
            return Err("--http-io-timeout must be positive".into());
        }
        if self.http_per_address == 0 {
            return Err("--http-per-address must be positive".into());
        }
        if self.send_queue == 0 || self.send_queue_bytes == 0 {
            return Err("--send-queue and --send-queue-bytes must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Cidr;

    #[test]
    fn networks_parse_and_contain() {
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped"
        );
        let one: Cidr = "127.0.0.2".parse().unwrap();
        assert!(one.contains("127.0.0.2".parse().unwrap()));
        assert!(!one.contains("127.0.0.3".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "example.org", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }
}
