//! The command line: flags and environment variables parsed once into a
//! [`Config`](crate::config::Config), and the admin subcommands (`user`, `backup`, ...).
//!
//! Exit status: 0 success, 1 failure, 2 bad usage (clap's own exit code for usage
//! errors, and ours for invalid values).

use crate::config::{Config, Registration};
use crate::store::audit::AuditEntry;
use crate::store::users::{UserRecord, GUARD_PERMISSION};
use crate::store::{Location, Store, StoreError};
use clap::{Args, Parser, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;

/// parley: a small, secure, self-hosted chat server.
#[derive(Debug, Parser)]
#[command(name = "parley", about, disable_version_flag = true)]
pub struct Cli {
    /// Print the version of parley and of its SQLite, and exit.
    #[arg(short = 'V', long)]
    pub version: bool,
    /// The SQLite database file, or (in a build with `--features postgres`) a
    /// `postgres://USER@HOST/DB` URL.
    #[arg(long, env = "PARLEY_DB", default_value = "./chat.db", global = true, value_parser = parse_location)]
    pub db: Location,
    /// Server settings (also accepted by subcommands that need them).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// What to do; serving is the default.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Settings of a running server; docs/cli.md describes each.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "PARLEY_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub addr: String,
    /// Access-token lifetime, seconds.
    #[arg(long, env = "PARLEY_ACCESS_TTL", default_value_t = 900, global = true)]
    pub access_ttl: u64,
    /// Refresh-token lifetime, seconds.
    #[arg(
        long,
        env = "PARLEY_REFRESH_TTL",
        default_value_t = 2_592_000,
        global = true
    )]
    pub refresh_ttl: u64,
    /// Seconds a retired refresh token still gets a new pair (two tabs, a lost
    /// answer) instead of revoking its login (0 = off).
    #[arg(
        long,
        env = "PARLEY_REFRESH_GRACE",
        default_value_t = 10,
        global = true
    )]
    pub refresh_grace: u64,
    /// bcrypt cost for new password hashes.
    #[arg(long, env = "PARLEY_BCRYPT_COST", default_value_t = 12, global = true)]
    pub bcrypt_cost: u32,
    /// Extra allowed WebSocket origins (`*` for any); repeatable.
    #[arg(
        long = "allow-origin",
        env = "PARLEY_ALLOW_ORIGIN",
        value_delimiter = ',',
        global = true
    )]
    pub allow_origin: Vec<String>,
    /// A reverse proxy (an address or network, e.g. 127.0.0.1/32) whose
    /// X-Forwarded-For/-Proto/-Host and Forwarded headers are believed; repeatable.
    #[arg(
        long = "trusted-proxy",
        env = "PARLEY_TRUSTED_PROXY",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_proxy: Vec<String>,
    /// Whether anyone may register.
    #[arg(
        long,
        env = "PARLEY_REGISTRATION",
        value_enum,
        default_value = "open",
        global = true
    )]
    pub registration: Registration,
    /// Messages per second per socket (0 = off).
    #[arg(long, env = "PARLEY_MSG_RATE", default_value_t = 20, global = true)]
    pub msg_rate: u32,
    /// Login attempts per minute per IP and per username (0 = off).
    #[arg(long, env = "PARLEY_LOGIN_RATE", default_value_t = 10, global = true)]
    pub login_rate: u32,
    /// Registrations per hour per IP (0 = off).
    #[arg(
        long,
        env = "PARLEY_REGISTER_RATE",
        default_value_t = 30,
        global = true
    )]
    pub register_rate: u32,
    /// Rooms created per hour per user (0 = off).
    #[arg(long, env = "PARLEY_ROOM_RATE", default_value_t = 20, global = true)]
    pub room_rate: u32,
    /// Open WebSockets in total.
    #[arg(
        long,
        env = "PARLEY_MAX_SOCKETS",
        default_value_t = 10_000,
        global = true
    )]
    pub max_sockets: usize,
    /// Open WebSockets per user.
    #[arg(
        long,
        env = "PARLEY_MAX_SOCKETS_PER_USER",
        default_value_t = 50,
        global = true
    )]
    pub max_sockets_per_user: usize,
    /// Frames queued for a slow socket before it is dropped (1008).
    #[arg(long, env = "PARLEY_SEND_QUEUE", default_value_t = 1024, global = true)]
    pub send_queue: usize,
    /// Cap the database at this many MiB; new messages are refused near it (0 = no cap).
    #[arg(long, env = "PARLEY_MAX_DB_MB", default_value_t = 0, global = true)]
    pub max_db_mb: u64,
    /// Bytes queued for a slow socket before it is dropped (1008).
    #[arg(
        long,
        env = "PARLEY_SEND_QUEUE_BYTES",
        default_value_t = 4 << 20,
        global = true
    )]
    pub send_queue_bytes: usize,
    /// Ping a socket silent this many seconds; close it after two silent intervals
    /// (0 = off).
    #[arg(long, env = "PARLEY_WS_PING", default_value_t = 30, global = true)]
    pub ws_ping: u64,
    /// Close a GraphQL socket (4408) that sends no `connection_init` within this many
    /// seconds of its upgrade.
    #[arg(
        long,
        env = "PARLEY_GRAPHQL_INIT_TIMEOUT",
        default_value_t = 10,
        global = true
    )]
    pub graphql_init_timeout: u64,
    /// Close plain HTTP connections idle this many seconds.
    #[arg(
        long,
        env = "PARLEY_HTTP_IDLE_TIMEOUT",
        default_value_t = 30,
        global = true
    )]
    pub http_idle_timeout: u64,
    /// Seconds allowed to read a request body or write an answer (plus time for its
    /// size); past them the connection is shut down.
    #[arg(
        long,
        env = "PARLEY_HTTP_IO_TIMEOUT",
        default_value_t = 5,
        global = true
    )]
    pub http_io_timeout: u64,
    /// Slow HTTP requests (bodies, large answers) one client address may have in
    /// progress at once; more are refused.
    #[arg(
        long,
        env = "PARLEY_HTTP_PER_ADDRESS",
        default_value_t = 8,
        global = true
    )]
    pub http_per_address: usize,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage accounts.
    User {
        /// What to do to which user.
        #[command(subcommand)]
        action: UserCommand,
    },
    /// Show the audit trail, newest first, or check its hash chain.
    Audit {
        /// How many events.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Check the hash chain; exit 1 naming the first bad row.
        #[arg(long, conflicts_with_all = ["limit", "json"])]
        verify: bool,
    },
    /// Read-only health report: integrity, schema, WAL, audit chain, key, socket
    /// ceiling. Exit 1 when the data has a problem.
    Check,
    /// Write a consistent copy of the (possibly live) database to FILE.
    Backup {
        /// Destination; must not exist.
        file: PathBuf,
    },
    /// Copy a whole community from an SQLite file into a new PostgreSQL database
    /// (in a build with `--features postgres`).
    Migrate {
        /// The SQLite database to copy; opened read-only (a server may run on it).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The PostgreSQL database to fill, `postgres://USER@HOST/DB`: one with no
        /// parley data yet.
        #[arg(long, value_name = "URL", value_parser = parse_location)]
        to: Location,
    },
    /// Print the GraphQL schema (SDL).
    GraphqlSchema,
    /// Create FILE as a demo database (how chat.db.example is made).
    #[command(hide = true)]
    ExampleDb {
        /// Destination; must not exist.
        file: PathBuf,
    },
}

/// `parley user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account; the password is read from stdin.
    Add {
        /// Username.
        name: String,
        /// Role (default: admin on an empty database, else member).
        #[arg(long)]
        role: Option<String>,
    },
    /// Set a user's full list of roles.
    Role {
        /// Username.
        name: String,
        /// The roles the user will hold.
        #[arg(required = true)]
        roles: Vec<String>,
    },
    /// Set a new password (read from stdin); revokes every login of the user.
    Passwd {
        /// Username.
        name: String,
    },
    /// Ban a user: logins refused, tokens revoked, live sockets closed.
    Ban {
        /// Username.
        name: String,
    },
    /// Lift a ban (tokens issued before it stay dead).
    Unban {
        /// Username.
        name: String,
    },
}

impl Cli {
    /// The validated server configuration.
    pub fn config(&self) -> Result<Config, String> {
        let a = &self.serve;
        let cfg = Config {
            addr: a.addr.clone(),
            db: self.db.clone(),
            access_ttl: a.access_ttl,
            refresh_ttl: a.refresh_ttl,
            refresh_grace: a.refresh_grace,
            bcrypt_cost: a.bcrypt_cost,
            registration: a.registration,
            allow_origins: a
                .allow_origin
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            trusted_proxies: a
                .trusted_proxy
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.parse().map_err(|e| format!("--trusted-proxy: {e}")))
                .collect::<Result<_, String>>()?,
            msg_rate: a.msg_rate,
            login_rate: a.login_rate,
            register_rate: a.register_rate,
            room_rate: a.room_rate,
            max_sockets: a.max_sockets,
            max_sockets_per_user: a.max_sockets_per_user,
            send_queue: a.send_queue,
            send_queue_bytes: a.send_queue_bytes,
            max_db_bytes: (a.max_db_mb > 0).then(|| a.max_db_mb.saturating_mul(1 << 20)),
            ws_ping: std::time::Duration::from_secs(a.ws_ping),
            graphql_init_timeout: std::time::Duration::from_secs(a.graphql_init_timeout),
            http_idle_timeout: std::time::Duration::from_secs(a.http_idle_timeout),
            http_io_timeout: std::time::Duration::from_secs(a.http_io_timeout),
            http_per_address: a.http_per_address,
            ..Config::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// How a command failed: bad usage (exit 2) or a runtime failure (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Invalid arguments or values.
    #[error("{0}")]
    Usage(String),
    /// The command could not be carried out.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

/// `--db` as clap reads it (never fails: anything but a `postgres://` URL is a path).
fn parse_location(value: &str) -> Result<Location, String> {
    Ok(Location::parse(value))
}

/// The SQLite file a file-only command works on; a PostgreSQL `--db` is bad usage.
fn sqlite_only<'a>(db: &'a Location, command: &str) -> Result<&'a std::path::Path, CliError> {
    db.file().ok_or_else(|| {
        CliError::Usage(format!(
            "`parley {command}` works on an SQLite file; use PostgreSQL's own tools for {db}"
        ))
    })
}

/// A role named on the command line that does not exist is bad usage (exit 2).
fn unknown_is_usage(e: StoreError) -> CliError {
    match e {
        StoreError::NotFound(what) => CliError::Usage(format!("unknown {what}")),
        other => failed(other),
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    if cli.version {
        println!("parley {}", env!("CARGO_PKG_VERSION"));
        println!("SQLite {}", rusqlite::version());
        return Ok(());
    }
    let cfg = cli.config().map_err(CliError::Usage)?;
    match cli.command {
        None | Some(Command::Serve) => crate::server::serve(cfg).map_err(CliError::Failed),
        Some(Command::User { action }) => user(&cfg, action),
        Some(Command::Audit {
            limit,
            json,
            verify,
        }) => audit(&cfg, limit, json, verify),
        Some(Command::Backup { file }) => {
            let store = Store::open_at(&cfg.db).map_err(failed)?;
            store.backup(&file).map_err(failed)?;
            println!("backup written to {}", file.display());
            Ok(())
        }
        Some(Command::Check) => {
            let file = sqlite_only(&cfg.db, "check")?;
            crate::check::run(file, cfg.max_sockets).map_err(CliError::Failed)
        }
        Some(Command::Migrate { from, to }) => migrate(&from, &to),
        Some(Command::GraphqlSchema) => {
            print!("{}", crate::graphql::sdl());
            Ok(())
        }
        Some(Command::ExampleDb { file }) => {
            crate::server::example_db(&file, &cfg).map_err(CliError::Failed)
        }
    }
}

fn user(cfg: &Config, action: UserCommand) -> Result<(), CliError> {
    let store = Store::open_at(&cfg.db).map_err(failed)?;
    let result = user_on(&store, cfg, action);
    store.close();
    result
}

fn cli_audit(store: &Store, action: &'static str, target: &str, detail: serde_json::Value) {
    store.audit(AuditEntry {
        actor: None,
        action,
        target: Some(target.to_owned()),
        ip: None,
        detail: serde_json::json!({"via": "cli", "detail": detail}),
    });
}

fn existing_user(store: &Store, name: &str) -> Result<UserRecord, CliError> {
    store
        .user_by_name(name)
        .map_err(failed)?
        .ok_or_else(|| CliError::Failed(format!("no user named {name:?}")))
}

fn new_password() -> Result<String, CliError> {
    let password = read_password()?;
    crate::actions::check_password(&password).map_err(|e| CliError::Usage(e.message))?;
    Ok(password)
}

fn user_on(store: &Store, cfg: &Config, action: UserCommand) -> Result<(), CliError> {
    let now = crate::clock::now_rfc3339;
    match action {
        UserCommand::Add { name, role } => {
            if !crate::actions::valid_username(&name) {
                return Err(CliError::Usage(
                    "username must be 3 to 32 characters of A-Z a-z 0-9 _ . -".into(),
                ));
            }
            let hash =
                crate::auth::hash_password(&new_password()?, cfg.bcrypt_cost).map_err(failed)?;
            let user = store
                .create_user(&name, hash, role, now())
                .map_err(unknown_is_usage)?;
            cli_audit(
                store,
                "register",
                &user.username,
                serde_json::json!({"roles": user.roles}),
            );
            println!("created user {} ({})", user.username, user.roles.join(", "));
        }
        UserCommand::Role { name, roles } => {
            let user = existing_user(store, &name)?;
            let change = store
                .set_roles(user.id, roles, GUARD_PERMISSION)
                .map_err(unknown_is_usage)?;
            cli_audit(
                store,
                "role_change",
                &user.username,
                serde_json::json!({"from": change.from, "to": change.to}),
            );
            println!("{}: {}", user.username, change.to.join(", "));
        }
        UserCommand::Passwd { name } => {
            let user = existing_user(store, &name)?;
            let hash =
                crate::auth::hash_password(&new_password()?, cfg.bcrypt_cost).map_err(failed)?;
            store.set_password(user.id, hash, now()).map_err(failed)?;
            cli_audit(
                store,
                "password_change",
                &user.username,
                serde_json::json!({}),
            );
            println!(
                "password of {} changed; every login of theirs is revoked",
                user.username
            );
        }
        UserCommand::Ban { name } => ban(store, &name, true)?,
        UserCommand::Unban { name } => ban(store, &name, false)?,
    }
    Ok(())
}

fn ban(store: &Store, name: &str, banned: bool) -> Result<(), CliError> {
    let user = existing_user(store, name)?;
    store
        .set_banned(
            user.id,
            banned,
            GUARD_PERMISSION,
            crate::clock::now_rfc3339(),
        )
        .map_err(failed)?;
    let action = if banned { "ban" } else { "unban" };
    cli_audit(store, action, &user.username, serde_json::json!({}));
    println!("{action}ned {}", user.username);
    Ok(())
}

/// `parley migrate`: the copy ([`crate::store::pg::import`], one transaction), then
/// the target's audit chain verified by the engine that will serve it.
#[cfg(feature = "postgres")]
fn migrate(from: &std::path::Path, to: &Location) -> Result<(), CliError> {
    let Location::Postgres(url) = to else {
        return Err(CliError::Usage(format!(
            "--to must be a postgres://USER@HOST/DB URL, not {to}"
        )));
    };
    let copied = crate::store::pg::import::from_sqlite(from, url).map_err(CliError::Failed)?;
    println!(
        "copied {} into {to}: {} rows in {:.1} s",
        from.display(),
        copied.rows(),
        copied.elapsed.as_secs_f64()
    );
    for (table, rows) in &copied.tables {
        println!("  {table:<16} {rows:>10}");
    }
    let committed = |e: StoreError| {
        CliError::Failed(format!(
            "the copy was committed, but its audit trail could not be verified: {e}"
        ))
    };
    let store = Store::open_at(to).map_err(committed)?;
    let verdict = store.verify_audit_chain();
    store.close();
    match verdict.map_err(committed)? {
        None => {
            println!("audit trail intact");
            Ok(())
        }
        Some((id, why)) => Err(CliError::Failed(format!(
            "the copy was committed, but its audit trail does not verify: audit row {id}: {why}"
        ))),
    }
}

/// `parley migrate` in a build without PostgreSQL: bad usage, naming the feature.
#[cfg(not(feature = "postgres"))]
fn migrate(_from: &std::path::Path, _to: &Location) -> Result<(), CliError> {
    Err(CliError::Usage(
        "`parley migrate` needs a build with PostgreSQL: cargo build --features postgres".into(),
    ))
}

fn audit(cfg: &Config, limit: u32, json: bool, verify: bool) -> Result<(), CliError> {
    let store = Store::open_at(&cfg.db).map_err(failed)?;
    if verify {
        return match store.verify_audit_chain().map_err(failed)? {
            None => {
                println!("audit trail intact");
                Ok(())
            }
            Some((id, why)) => Err(CliError::Failed(format!("audit row {id}: {why}"))),
        };
    }
    for e in store
        .audit_events(limit.clamp(1, 100_000), None)
        .map_err(failed)?
    {
        if json {
            let line = serde_json::to_string(&e).map_err(failed)?;
            println!("{}", escape_unseen(&line, Escape::Json));
        } else {
            fn text(s: &str) -> std::borrow::Cow<'_, str> {
                escape_unseen(s, Escape::Text)
            }
            println!(
                "{:>6} {} {:<14} actor={} target={} ip={} {}",
                e.id,
                text(&e.ts),
                text(&e.action),
                text(e.actor.as_deref().unwrap_or("-")),
                text(e.target.as_deref().unwrap_or("-")),
                text(e.ip.as_deref().unwrap_or("-")),
                text(&e.detail.to_string())
            );
        }
    }
    Ok(())
}

/// How [`escape_unseen`] writes a character.
#[derive(Clone, Copy)]
enum Escape {
    /// Rust style, `\u{1b}`: for the text listing, meant for eyes. A backslash is
    /// left as it is, so the escaped form is for reading; `--json` gives exact text.
    Text,
    /// JSON's own `\u009b`, which every JSON parser decodes back to the character.
    Json,
}

/// Whether printing `c` raw could forge or hide output: control characters (C0, DEL
/// and C1: newlines, terminal escape sequences) and the invisible characters that
/// break lines or reorder text (U+2028, U+2029, bidirectional controls).
fn unseen(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `s` with every [`unseen`] character escaped, so one audit event is always one line
/// and nothing in it reaches the terminal as a control sequence. Audit fields hold
/// text chosen by others (attempted names before they were checked, rows written by
/// anyone able to write the file). In JSON the characters can only stand inside
/// strings (serde_json already escapes C0 but passes DEL, C1 and the rest through),
/// so escaping them there keeps every line valid JSON of the same value.
fn escape_unseen(s: &str, how: Escape) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write;
    if !s.chars().any(unseen) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !unseen(c) {
            out.push(c);
            continue;
        }
        let code = u32::from(c);
        let _ = match how {
            Escape::Text => write!(out, "\\u{{{code:x}}}"),
            // Every unseen character is in the Basic Multilingual Plane: four digits.
            Escape::Json => write!(out, "\\u{code:04x}"),
        };
    }
    out.into()
}

/// One line from stdin, without its trailing newline.
fn read_password() -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(failed)?;
    let trimmed = line.strip_suffix('\n').unwrap_or(&line);
    Ok(trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unseen_characters_are_escaped() {
        let raw = "a\nb\x1b[31m\x7f\u{9b}c\u{202e}d\u{2028}é";
        assert_eq!(
            escape_unseen(raw, Escape::Text),
            "a\\u{a}b\\u{1b}[31m\\u{7f}\\u{9b}c\\u{202e}d\\u{2028}é"
        );
        assert!(matches!(
            escape_unseen("plain é", Escape::Text),
            std::borrow::Cow::Borrowed(_)
        ));
        // JSON lines stay valid JSON of the same value.
        let line = serde_json::to_string(&serde_json::json!({ "t": raw })).unwrap();
        let escaped = escape_unseen(&line, Escape::Json);
        assert!(!escaped.chars().any(unseen), "{escaped}");
        let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
        assert_eq!(back["t"], raw);
    }
}
