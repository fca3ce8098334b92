//! The command line: flags and environment variables parsed once into a
//! [`Config`](crate::config::Config), and the admin subcommands (`user`, `backup`, ...).
//!
//! Exit status: 0 success, 1 failure, 2 bad usage (clap's own exit code for usage
//! errors, and ours for invalid values).

use crate::config::{Config, Registration};
use crate::store::Store;
use clap::{Args, Parser, Subcommand};
use std::io::BufRead;
use std::path::PathBuf;

/// parley: a small, secure, self-hosted chat server.
#[derive(Debug, Parser)]
#[command(name = "parley", version, about)]
pub struct Cli {
    /// The SQLite database file.
    #[arg(long, env = "PARLEY_DB", default_value = "./chat.db", global = true)]
    pub db: PathBuf,
    /// Server settings (also accepted by subcommands that need them).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// What to do; serving is the default.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Settings of a running server; see PROTOCOL.md for each.
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
    /// Write a consistent copy of the (possibly live) database to FILE.
    Backup {
        /// Destination; must not exist.
        file: PathBuf,
    },
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
            bcrypt_cost: a.bcrypt_cost,
            registration: a.registration,
            allow_origins: a
                .allow_origin
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            msg_rate: a.msg_rate,
            login_rate: a.login_rate,
            max_sockets: a.max_sockets,
            max_sockets_per_user: a.max_sockets_per_user,
            send_queue: a.send_queue,
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

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let cfg = cli.config().map_err(CliError::Usage)?;
    match cli.command {
        None | Some(Command::Serve) => crate::server::serve(cfg).map_err(CliError::Failed),
        Some(Command::User { action }) => user(&cfg, action),
        Some(Command::Backup { file }) => {
            let store = Store::open(&cfg.db).map_err(failed)?;
            store.backup(&file).map_err(failed)?;
            println!("backup written to {}", file.display());
            Ok(())
        }
        Some(Command::ExampleDb { file }) => {
            crate::server::example_db(&file, &cfg).map_err(CliError::Failed)
        }
    }
}

fn user(cfg: &Config, action: UserCommand) -> Result<(), CliError> {
    match action {
        UserCommand::Add { name, role } => {
            if !crate::actions::valid_username(&name) {
                return Err(CliError::Usage(
                    "username must be 3 to 32 characters of A-Z a-z 0-9 _ . -".into(),
                ));
            }
            let password = read_password()?;
            crate::actions::check_password(&password).map_err(|e| CliError::Usage(e.message))?;
            let store = Store::open(&cfg.db).map_err(failed)?;
            let hash = crate::auth::hash_password(&password, cfg.bcrypt_cost).map_err(failed)?;
            let user = store
                .create_user(&name, hash, role, crate::clock::now_rfc3339())
                .map_err(failed)?;
            store.audit(crate::store::audit::AuditEntry {
                actor: None,
                action: "register",
                target: Some(user.username.clone()),
                ip: None,
                detail: serde_json::json!({"via": "cli", "roles": user.roles}),
            });
            store.close();
            println!("created user {} ({})", user.username, user.roles.join(", "));
            Ok(())
        }
    }
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
