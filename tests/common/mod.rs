//! Shared helpers for parley's black-box integration tests.
//!
//! Every test starts the real `parley` binary on an ephemeral loopback port with a
//! fresh database in its own temporary directory, and talks to it over real sockets:
//! a tiny HTTP/1.1 client written here, and tungstenite for WebSockets.
//!
//! With `PARLEY_TEST_POSTGRES` set to a PostgreSQL server URL without a database
//! (`postgres://parley@127.0.0.1:55432`), `Server::start*` gives each server a fresh
//! PostgreSQL database instead of an SQLite file (build with `--features postgres`);
//! see `postgres_enabled`. Helpers that name a directory or file (`start_in`, `launch`,
//! `db_arg`, `*_sqlite`) stay on SQLite.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use tungstenite::client::IntoClientRequest;
use tungstenite::http;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// Read timeout for every socket a test opens: a broken server fails, it does not hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default password used by the account helpers (valid: 8–72 bytes).
pub const PW: &str = "correct horse battery";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A process-unique number (for temp dir names, refs, message bodies).
pub fn unique() -> u64 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// Polls `cond` every 10 ms until it holds; fails the test, naming `what`, if it still
/// does not hold after `within`. The replacement for a fixed sleep: it waits exactly as
/// long as the condition needs, and a loaded machine only makes it slower, not wrong.
#[track_caller]
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------
// Temporary directories (no extra dependency)
// ---------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "parley-test-{}-{}-{}",
            std::process::id(),
            unique(),
            nanos
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_parley")
}

/// A running `parley serve`. Killed (SIGKILL) on drop; if the test is panicking, the
/// server's stderr is printed to help diagnose the failure.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    tmp: Option<TempDir>,
    /// Everything the server wrote to stderr, byte for byte (a log line need not be
    /// UTF-8 for a test to search it).
    stderr: Arc<Mutex<Vec<u8>>>,
    stdout: Arc<Mutex<String>>,
    /// Set by each pipe's reader thread once that pipe reached end-of-file.
    stderr_eof: Arc<AtomicBool>,
    stdout_eof: Arc<AtomicBool>,
    /// The server's PostgreSQL database (`PARLEY_TEST_POSTGRES`), dropped after the
    /// process is killed; `None` on SQLite.
    pg: Option<PgDb>,
}

impl Server {
    /// Starts a server on a fresh database in its own temp dir: an SQLite file there,
    /// or a fresh PostgreSQL database when `PARLEY_TEST_POSTGRES` is set.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_env(extra, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_env(extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let Some(pg) = PgDb::create_if_enabled() else {
            return Self::start_sqlite_env(extra, envs);
        };
        let tmp = TempDir::new();
        let mut srv = Self::launch_db(tmp.path(), &pg.url, extra, envs);
        srv.tmp = Some(tmp);
        srv.pg = Some(pg);
        srv
    }

    /// Like `start`, but always on an SQLite file in its own temp dir, whatever
    /// `PARLEY_TEST_POSTGRES` says: for tests that open the file (`db_path`).
    pub fn start_sqlite(extra: &[&str]) -> Server {
        Self::start_sqlite_env(extra, &[])
    }

    /// Like `start_sqlite`, with extra environment variables.
    pub fn start_sqlite_env(extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let tmp = TempDir::new();
        let mut srv = Self::launch(tmp.path(), extra, envs);
        srv.tmp = Some(tmp);
        srv
    }

    /// Starts a server on `dir/chat.db` (the caller owns `dir`, so a test can restart a
    /// server on the same database). Always SQLite.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Self::launch(dir, extra, &[])
    }

    /// Starts a server on `dir/chat.db`. Always SQLite.
    pub fn launch(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let db = dir.join("chat.db");
        Self::launch_db(dir, db.to_str().unwrap(), extra, envs)
    }

    /// Starts a server with `--db db` (a file path or a `postgres://` URL), recording
    /// `dir` as its directory.
    pub fn launch_db(dir: &Path, db: &str, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--db".into(),
            db.into(),
            "--bcrypt-cost".into(),
            "4".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_raw(dir, &args, envs)
    }

    /// Runs `parley ARGS...` exactly as given (no defaults added) and waits for the
    /// listening line. `dir` is recorded as the server's directory.
    pub fn spawn_raw(dir: &Path, args: &[String], envs: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        clear_parley_env(&mut cmd);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn parley");

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr_eof = Arc::new(AtomicBool::new(false));
        let stdout_eof = Arc::new(AtomicBool::new(false));
        {
            let mut err = child.stderr.take().unwrap();
            let (log, eof) = (stderr.clone(), stderr_eof.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match err.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => log.lock().unwrap().extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                eof.store(true, Ordering::SeqCst);
            });
        }
        let (tx, rx) = mpsc::channel::<String>();
        {
            let out = child.stdout.take().unwrap();
            let (rest, eof) = (stdout.clone(), stdout_eof.clone());
            thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut first = true;
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line).into_owned();
                            if first {
                                first = false;
                                let _ = tx.send(text);
                            } else {
                                rest.lock().unwrap().push_str(&text);
                            }
                        }
                    }
                }
                eof.store(true, Ordering::SeqCst);
            });
        }

        let mut srv = Server {
            child: Some(child),
            port: 0,
            dir: dir.to_path_buf(),
            tmp: None,
            stderr,
            stdout,
            stderr_eof,
            stdout_eof,
            pg: None,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let line = line.trim_end_matches(['\r', '\n']);
                let prefix = "parley listening on http://127.0.0.1:";
                assert!(
                    line.starts_with(prefix),
                    "first stdout line should be {prefix:?}PORT, got {line:?}"
                );
                srv.port = line[prefix.len()..]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad port in {line:?}"));
                assert_ne!(srv.port, 0, "server reported port 0");
            }
            Err(e) => {
                let status = srv.wait_exit(Duration::from_secs(2));
                panic!(
                    "server did not print its listening line ({e:?}); exit status {status:?}\n--- stderr ---\n{}",
                    srv.stderr_log()
                );
            }
        }
        srv
    }

    /// The server's SQLite file, `dir/chat.db`. Panics on a PostgreSQL server: a test
    /// that reads the file must start its server with `start_sqlite` (or `start_in`).
    #[track_caller]
    pub fn db_path(&self) -> PathBuf {
        if let Some(pg) = &self.pg {
            panic!(
                "this server runs on PostgreSQL ({}), not an SQLite file: start it with \
                 Server::start_sqlite / start_unlimited_sqlite",
                pg.url
            );
        }
        self.dir.join("chat.db")
    }

    /// The `postgres://` URL of the server's database, or `None` on SQLite.
    pub fn postgres_url(&self) -> Option<&str> {
        self.pg.as_ref().map(|pg| pg.url.as_str())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server already reaped").id()
    }

    /// The server's stderr so far, as text (invalid UTF-8 replaced).
    pub fn stderr_log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The server's stderr so far, byte for byte.
    pub fn stderr_raw(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether both of the server's output pipes have reached end-of-file (every
    /// process holding them has closed them).
    pub fn pipes_closed(&self) -> bool {
        self.stderr_eof.load(Ordering::SeqCst) && self.stdout_eof.load(Ordering::SeqCst)
    }

    /// SIGTERM, then waits (up to 30 s) for the process to exit and for its output
    /// pipes to reach end-of-file, so that everything it logged has been read.
    /// Returns the exit status.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        self.sigterm();
        let status = self
            .wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("server did not exit within 30 s of SIGTERM"));
        wait_until(
            Duration::from_secs(10),
            "the server's output pipes to close",
            || self.pipes_closed(),
        );
        status
    }

    pub fn stdout_rest(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// `kill -9`: the crash test. Waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (does not wait).
    pub fn sigterm(&self) {
        self.signal(rustix::process::Signal::TERM);
    }

    /// Sends SIGINT (does not wait).
    pub fn sigint(&self) {
        self.signal(rustix::process::Signal::INT);
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Waits up to `timeout` for the process to exit; returns its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    // ----- HTTP conveniences -----

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, &[u8])>,
    ) -> Resp {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        if let Some((ct, _)) = body {
            headers.push(("Content-Type", ct));
        }
        http_request(self.port, method, path, &headers, body.map(|b| b.1))
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.request("GET", path, token, None)
    }

    pub fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Resp {
        let b = serde_json::to_vec(body).unwrap();
        self.request("POST", path, token, Some(("application/json", &b)))
    }

    pub fn post_empty(&self, path: &str, token: Option<&str>) -> Resp {
        self.request("POST", path, token, None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- parley stderr (port {}) ---\n{}--- end ---",
                self.port,
                self.stderr_log()
            );
        }
        self.kill9();
    }
}

/// The value of the un-labelled metric `name` in the server's `/metrics` now.
#[track_caller]
pub fn metric_now(srv: &Server, name: &str) -> f64 {
    let r = srv.get("/metrics", None);
    assert_status(&r, 200);
    let text = r.text();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.trim().rsplit_once(' ')?;
            (k == name).then(|| v.parse::<f64>().expect("a numeric metric"))
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

/// A connection to the server's database file, as `sqlite3` would open it while the
/// server runs (WAL; waits up to 5 s for a lock).
pub fn open_db(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open the database file");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

/// `SELECT count(*) FROM messages` in the database file at `path`.
pub fn stored_message_count(path: &Path) -> i64 {
    open_db(path)
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .expect("count messages")
}

/// A server with the login and message rate limits off (every test connects from
/// 127.0.0.1 and would otherwise trip them), plus `extra` flags.
pub fn start_unlimited(extra: &[&str]) -> Server {
    let mut args = vec!["--login-rate", "0", "--msg-rate", "0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Like `start_unlimited`, but always on an SQLite file (see `Server::start_sqlite`).
pub fn start_unlimited_sqlite(extra: &[&str]) -> Server {
    let mut args = vec!["--login-rate", "0", "--msg-rate", "0"];
    args.extend_from_slice(extra);
    Server::start_sqlite(&args)
}

// ---------------------------------------------------------------------------------
// PostgreSQL (PARLEY_TEST_POSTGRES)
// ---------------------------------------------------------------------------------

/// The variable that runs the servers on PostgreSQL: a server URL without a database,
/// `postgres://USER[:PASSWORD]@HOST[:PORT]` (the `.ci/postgres` script prints one).
pub const POSTGRES_ENV: &str = "PARLEY_TEST_POSTGRES";

/// Whether `Server::start*` puts servers on PostgreSQL (`PARLEY_TEST_POSTGRES` is set).
pub fn postgres_enabled() -> bool {
    pg_server().is_some()
}

/// The PostgreSQL server `PARLEY_TEST_POSTGRES` names, parsed once.
struct PgServer {
    /// `postgres` or `postgresql`, as given.
    scheme: String,
    /// `USER[:PASSWORD]@HOST[:PORT]`, as given (the database URLs reuse it).
    authority: String,
    host: String,
    port: String,
    user: Option<String>,
    password: Option<String>,
}

fn pg_server() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Option<PgServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let url = std::env::var(POSTGRES_ENV).ok()?;
            let url = url.trim();
            (!url.is_empty()).then(|| parse_pg_server(url))
        })
        .as_ref()
}

fn parse_pg_server(url: &str) -> PgServer {
    let bad = |why: &str| -> ! {
        panic!("{POSTGRES_ENV}={url:?}: {why}; expected postgres://USER@HOST:PORT (no database)")
    };
    let (scheme, rest) = url.split_once("://").unwrap_or_else(|| bad("no scheme"));
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        bad("not a postgres:// URL");
    }
    let authority = match rest.split_once('/') {
        Some((a, "")) => a,
        Some(_) => bad("it names a database (each server gets its own)"),
        None => rest,
    };
    if authority.contains('?') {
        bad("query parameters are not supported");
    }
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((u, p)) => (
            (!u.is_empty()).then(|| u.to_string()),
            (!p.is_empty()).then(|| p.to_string()),
        ),
        None => (None, None),
    };
    // HOST, HOST:PORT, [V6], [V6]:PORT
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').unwrap_or_else(|| bad("unclosed ["));
        (h, after.strip_prefix(':').unwrap_or("5432"))
    } else {
        hostport.split_once(':').unwrap_or((hostport, "5432"))
    };
    if host.is_empty() {
        bad("no host");
    }
    if port.parse::<u16>().is_err() {
        bad("bad port");
    }
    PgServer {
        scheme: scheme.to_string(),
        authority: authority.to_string(),
        host: host.to_string(),
        port: port.to_string(),
        user,
        password,
    }
}

/// `psql` from PATH, or else from Debian's /usr/lib/postgresql/VERSION/bin (newest).
fn psql_program() -> PathBuf {
    static PSQL: OnceLock<PathBuf> = OnceLock::new();
    PSQL.get_or_init(|| {
        let on_path = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("psql").is_file()));
        if on_path {
            return PathBuf::from("psql");
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().join("bin/psql"))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default();
        found.sort_by_key(|p| {
            p.components()
                .nth(4)
                .and_then(|v| v.as_os_str().to_str()?.parse::<u32>().ok())
        });
        found.pop().unwrap_or_else(|| PathBuf::from("psql"))
    })
    .clone()
}

/// Runs one SQL statement with `psql` against the `postgres` database of `server`.
fn psql(server: &PgServer, sql: &str) -> Result<(), String> {
    let mut cmd = Command::new(psql_program());
    cmd.args(["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&server.host)
        .args(["-p", &server.port, "-d", "postgres", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
    if let Some(u) = &server.user {
        cmd.args(["-U", u]);
    }
    if let Some(p) = &server.password {
        cmd.env("PGPASSWORD", p);
    }
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "psql -c {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {:?}: {e}", psql_program())),
    }
}

/// A fresh, uniquely named PostgreSQL database for one server; dropped (with
/// `WITH (FORCE)`, best effort) on drop.
pub struct PgDb {
    name: String,
    /// `postgres://USER@HOST:PORT/NAME`, the server's `--db`.
    pub url: String,
    server: &'static PgServer,
}

impl PgDb {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs one SQL statement as the test server's user (in its `postgres` database).
    pub fn admin_sql(&self, sql: &str) -> Result<(), String> {
        psql(self.server, sql)
    }

    /// A new database when `PARLEY_TEST_POSTGRES` is set; `None` otherwise.
    #[track_caller]
    pub fn create_if_enabled() -> Option<PgDb> {
        let server = pg_server()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("parley_t{}_{}_{}", std::process::id(), unique(), nanos);
        if let Err(e) = psql(server, &format!("CREATE DATABASE \"{name}\"")) {
            panic!("{POSTGRES_ENV}: cannot create a test database: {e}");
        }
        let url = format!("{}://{}/{name}", server.scheme, server.authority);
        Some(PgDb { name, url, server })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = psql(self.server, &sql) {
            eprintln!(
                "{POSTGRES_ENV}: could not drop test database {}: {e}",
                self.name
            );
        }
    }
}

/// Keeps the caller's PARLEY_* settings out of the tests.
fn clear_parley_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PARLEY_") {
            cmd.env_remove(k);
        }
    }
}

/// Runs the `parley` binary with `args` and `stdin`, waiting up to 60 s.
pub fn run_cli(args: &[&str], stdin: &str) -> Output {
    run_cli_env(args, stdin, &[])
}

pub fn run_cli_env(args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> Output {
    run_cli_in(None, args, stdin, envs)
}

/// Like `run_cli_env`, optionally in working directory `cwd`.
pub fn run_cli_in(cwd: Option<&Path>, args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clear_parley_env(&mut cmd);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn parley");
    {
        let mut si = child.stdin.take().unwrap();
        let _ = si.write_all(stdin.as_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("parley {args:?} did not exit within 60 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `dir/chat.db` as a string, for a CLI `--db` argument.
pub fn db_arg(dir: &Path) -> String {
    dir.join("chat.db").to_str().unwrap().to_string()
}

/// Asserts a CLI run exited with `code`, showing its output otherwise.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}, got {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------
// A tiny HTTP/1.1 client
// ---------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the body) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub fn is_json(&self) -> bool {
        self.header("content-type")
            .map(|v| v.to_ascii_lowercase().starts_with("application/json"))
            .unwrap_or(false)
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), IO_TIMEOUT)
        .expect("connect to server");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// One request on a fresh connection. Adds `Host`, `Connection: close` (unless a
/// `Connection` header is given) and `Content-Length` (when a body is given). Errors
/// while writing the body are ignored, so a server may answer early (413).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut s = connect(port);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        head.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write request head");
    if let Some(b) = body {
        let _ = s.write_all(b);
    }
    let _ = s.flush();
    read_response(&mut s, method == "HEAD")
        .unwrap_or_else(|e| panic!("{method} {path}: reading the response failed: {e}"))
}

/// Reads one response from `s` (framed by Content-Length, chunked, or up to EOF); with
/// `head_only`, the head alone (the answer to a HEAD request).
pub fn read_response(s: &mut TcpStream, head_only: bool) -> Result<Resp, String> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "connection closed before a full response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(format!(
                    "{e} before a full response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ))
            }
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut rest = buf[head_end + 4..].to_vec();
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 101 || status == 204 || status == 304 || (100..200).contains(&status)
    {
        return Ok(resp);
    }
    let chunked = resp
        .header("transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false);
    let length: Option<usize> = resp.header("content-length").and_then(|v| v.parse().ok());
    let mut read_more = |rest: &mut Vec<u8>| -> Result<bool, String> {
        match s.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                rest.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) => Err(format!("{e} while reading the body")),
        }
    };
    if chunked {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let line_end = loop {
                if let Some(i) = find(&rest[pos..], b"\r\n") {
                    break pos + i;
                }
                if !read_more(&mut rest)? {
                    return Err("eof inside chunked body".into());
                }
            };
            let size_s = String::from_utf8_lossy(&rest[pos..line_end]).into_owned();
            let size = usize::from_str_radix(size_s.split(';').next().unwrap().trim(), 16)
                .map_err(|_| format!("bad chunk size {size_s:?}"))?;
            pos = line_end + 2;
            if size == 0 {
                break;
            }
            while rest.len() < pos + size + 2 {
                if !read_more(&mut rest)? {
                    return Err("eof inside chunk".into());
                }
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
        resp.body = body;
    } else if let Some(n) = length {
        while rest.len() < n {
            if !read_more(&mut rest)? {
                return Err(format!("eof after {} of {n} body bytes", rest.len()));
            }
        }
        rest.truncate(n);
        resp.body = rest;
    } else {
        while read_more(&mut rest)? {}
        resp.body = rest;
    }
    Ok(resp)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Asserts an HTTP error response: status, JSON content type, and the body
/// `{"error": {"code": code, "message": <non-empty string>}}`. Returns the message.
#[track_caller]
pub fn assert_error(resp: &Resp, status: u16, code: &str) -> String {
    assert_eq!(
        resp.status,
        status,
        "expected HTTP {status} ({code}), got {} with body {:?}",
        resp.status,
        resp.text()
    );
    assert!(
        resp.is_json(),
        "error response should be application/json, got {:?} (body {:?})",
        resp.header("content-type"),
        resp.text()
    );
    let v = resp.json();
    assert_eq!(
        v["error"]["code"], code,
        "wrong error code in {v} (HTTP {status})"
    );
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error.message should be a string in {v}"));
    assert!(!msg.is_empty(), "error.message is empty in {v}");
    msg.to_string()
}

#[track_caller]
pub fn assert_status(resp: &Resp, status: u16) {
    assert_eq!(
        resp.status,
        status,
        "expected HTTP {status}, got {} with body {:?}",
        resp.status,
        resp.text()
    );
}

// ---------------------------------------------------------------------------------
// Accounts
// ---------------------------------------------------------------------------------

/// Registers `name` with `PW`; asserts 201 and returns the `user` object.
#[track_caller]
pub fn register(srv: &Server, name: &str) -> Value {
    register_pw(srv, name, PW)
}

#[track_caller]
pub fn register_pw(srv: &Server, name: &str, pw: &str) -> Value {
    let r = register_resp(srv, name, pw);
    assert_status(&r, 201);
    let v = r.json();
    assert!(v["user"].is_object(), "register: no user in {v}");
    v["user"].clone()
}

/// Logs in with `PW`; asserts 200 and returns the TokenPair.
#[track_caller]
pub fn login(srv: &Server, name: &str) -> Value {
    login_pw(srv, name, PW)
}

#[track_caller]
pub fn login_pw(srv: &Server, name: &str, pw: &str) -> Value {
    let r = login_resp(srv, name, pw);
    assert_status(&r, 200);
    r.json()
}

/// `POST /api/register` with `name` and `pw`; the response, unchecked.
pub fn register_resp(srv: &Server, name: &str, pw: &str) -> Resp {
    srv.post(
        "/api/register",
        None,
        &json!({"username": name, "password": pw}),
    )
}

/// `POST /api/login` with `name` and `pw`; the response, unchecked.
pub fn login_resp(srv: &Server, name: &str, pw: &str) -> Resp {
    srv.post(
        "/api/login",
        None,
        &json!({"username": name, "password": pw}),
    )
}

/// `POST /api/refresh` with the refresh token `rt`; the response, unchecked.
pub fn refresh_resp(srv: &Server, rt: &str) -> Resp {
    srv.post("/api/refresh", None, &json!({ "refresh_token": rt }))
}

/// `PUT /api/admin/users/{user}/roles` as the holder of `token`; the response, unchecked.
pub fn put_roles(srv: &Server, token: &str, user: &str, roles: &[&str]) -> Resp {
    let b = serde_json::to_vec(&json!({ "roles": roles })).unwrap();
    srv.request(
        "PUT",
        &format!("/api/admin/users/{user}/roles"),
        Some(token),
        Some(("application/json", &b)),
    )
}

/// Registers and logs in; returns the access token.
#[track_caller]
pub fn new_user(srv: &Server, name: &str) -> String {
    register(srv, name);
    access(&login(srv, name))
}

pub fn access(pair: &Value) -> String {
    pair["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {pair}"))
        .to_string()
}

pub fn refresh_tok(pair: &Value) -> String {
    pair["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no refresh_token in {pair}"))
        .to_string()
}

/// Checks the `User` shape; returns nothing.
#[track_caller]
pub fn assert_user_shape(u: &Value, name: &str, roles: &[&str]) {
    assert!(u["id"].is_i64(), "user.id should be an int: {u}");
    assert_eq!(u["username"], name, "username in {u}");
    let got: Vec<&str> = u["roles"]
        .as_array()
        .unwrap_or_else(|| panic!("user.roles should be an array: {u}"))
        .iter()
        .map(|r| r.as_str().expect("role string"))
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let mut want: Vec<&str> = roles.to_vec();
    want.sort();
    assert_eq!(got_sorted, want, "roles in {u}");
    let ca = u["created_at"]
        .as_str()
        .unwrap_or_else(|| panic!("user.created_at should be a string: {u}"));
    assert!(is_rfc3339(ca), "created_at {ca:?} is not RFC 3339");
}

/// A strict-enough RFC 3339 check: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    if b.len() < 20 {
        return false;
    }
    if !(digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z') | Some(b'z') => i + 1 == b.len(),
        Some(b'+') | Some(b'-') => {
            i + 6 == b.len() && digits(i + 1..i + 3) && b[i + 3] == b':' && digits(i + 4..i + 6)
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------
// JWT helpers (for crafting bad tokens)
// ---------------------------------------------------------------------------------

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("bad base64url {s:?}: {e}"))
}

/// Splits a JWT into (header JSON, payload JSON, signature segment).
pub fn jwt_parts(token: &str) -> (Value, Value, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three segments: {token:?}");
    let h: Value = serde_json::from_slice(&b64url_decode(parts[0])).expect("header JSON");
    let p: Value = serde_json::from_slice(&b64url_decode(parts[1])).expect("payload JSON");
    (h, p, parts[2].to_string())
}

fn hmac_generic<D: Digest>(block: usize, key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = if key.len() > block {
        D::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(block, 0);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let mut inner = D::new();
    inner.update(&ipad);
    inner.update(msg);
    let ih = inner.finalize();
    let mut outer = D::new();
    outer.update(&opad);
    outer.update(ih);
    outer.finalize().to_vec()
}

/// HMAC for JWT `alg` HS256 / HS384 / HS512.
pub fn hmac(alg: &str, key: &[u8], msg: &[u8]) -> Vec<u8> {
    match alg {
        "HS256" => hmac_generic::<sha2::Sha256>(64, key, msg),
        "HS384" => hmac_generic::<sha2::Sha384>(128, key, msg),
        "HS512" => hmac_generic::<sha2::Sha512>(128, key, msg),
        other => panic!("unsupported alg {other}"),
    }
}

/// Builds a JWT with the given header and payload, HMAC-signed with `alg` and `key`.
pub fn forge_hmac(alg: &str, key: &[u8], header: &Value, payload: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(header).unwrap()),
        b64url(&serde_json::to_vec(payload).unwrap())
    );
    let sig = hmac(alg, key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&sig))
}

/// Builds an unsigned JWT (`alg: none`, empty signature segment).
pub fn forge_none(payload: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(&serde_json::to_vec(payload).unwrap())
    )
}

/// Unix time now, in seconds.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Finds the server's HS256 signing key without knowing how it is stored: every text
/// or blob value in the database and every small file beside it is tried (raw, trimmed,
/// hex-decoded, base64-decoded) as a key, and the one whose HMAC-SHA256 reproduces the
/// signature of the real token `token` is returned.
pub fn find_signing_key(dir: &Path, token: &str) -> Option<Vec<u8>> {
    let (signing_input, sig) = token.rsplit_once('.')?;
    let sig = b64url_decode(sig);
    let mut raw_values: Vec<Vec<u8>> = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("chat.db") {
                continue;
            }
            if let Ok(md) = e.metadata() {
                if md.is_file() && md.len() <= 4096 {
                    if let Ok(b) = std::fs::read(e.path()) {
                        raw_values.push(b);
                    }
                }
            }
        }
    }
    if let Ok(conn) = rusqlite::Connection::open(dir.join("chat.db")) {
        let _ = conn.busy_timeout(Duration::from_secs(5));
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(0))
                    .map(|it| it.flatten().collect())
            })
            .unwrap_or_default();
        for t in tables {
            let sql = format!("SELECT * FROM \"{}\"", t.replace('"', "\"\""));
            let Ok(mut st) = conn.prepare(&sql) else {
                continue;
            };
            let ncol = st.column_count();
            let Ok(mut rows) = st.query([]) else { continue };
            while let Ok(Some(row)) = rows.next() {
                for i in 0..ncol {
                    match row.get_ref(i) {
                        Ok(rusqlite::types::ValueRef::Text(t)) => raw_values.push(t.to_vec()),
                        Ok(rusqlite::types::ValueRef::Blob(b)) => raw_values.push(b.to_vec()),
                        _ => {}
                    }
                }
            }
        }
    }
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    for raw in raw_values {
        let mut cands = vec![raw.clone()];
        if let Ok(s) = std::str::from_utf8(&raw) {
            let t = s.trim();
            cands.push(t.as_bytes().to_vec());
            if t.len() % 2 == 0 && t.bytes().all(|c| c.is_ascii_hexdigit()) {
                let h: Vec<u8> = (0..t.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap())
                    .collect();
                cands.push(h);
            }
            for e in &engines {
                if let Ok(d) = e.decode(t) {
                    cands.push(d);
                }
            }
        }
        for c in cands {
            if !c.is_empty() && hmac("HS256", &c, signing_input.as_bytes()) == sig {
                return Some(c);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------

/// A `/ws` handshake request for `path_and_query` (e.g. `/ws` or `/ws?access_token=..`).
pub fn ws_request(srv: &Server, path_and_query: &str) -> http::Request<()> {
    format!("ws://127.0.0.1:{}{}", srv.port, path_and_query)
        .into_client_request()
        .expect("ws request")
}

pub fn with_header(mut req: http::Request<()>, name: &str, value: &str) -> http::Request<()> {
    req.headers_mut().insert(
        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        http::HeaderValue::from_str(value).unwrap(),
    );
    req
}

/// Sends a WebSocket upgrade request by hand and returns the server's answer, for the
/// cases where the upgrade must be refused (so there is no WebSocket to speak of).
pub fn ws_handshake_raw(srv: &Server, path_and_query: &str, headers: &[(&str, &str)]) -> Resp {
    let mut h: Vec<(&str, &str)> = vec![
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    h.extend_from_slice(headers);
    http_request(srv.port, "GET", path_and_query, &h, None)
}

/// Asserts that an upgrade was refused with `status` and the JSON error `code`.
#[track_caller]
pub fn assert_ws_rejected(resp: &Resp, status: u16, code: &str) {
    assert_ne!(resp.status, 101, "the upgrade should have been refused");
    assert!(
        resp.header("sec-websocket-accept").is_none(),
        "a refused upgrade must not carry Sec-WebSocket-Accept"
    );
    assert_error(resp, status, code);
}

pub struct Ws {
    pub ws: WebSocket<TcpStream>,
    pub response: http::Response<Option<Vec<u8>>>,
}

impl Ws {
    /// Connects with `Authorization: Bearer <token>`; panics on failure.
    #[track_caller]
    pub fn connect(srv: &Server, token: &str) -> Ws {
        let req = with_header(
            ws_request(srv, "/ws"),
            "Authorization",
            &format!("Bearer {token}"),
        );
        Ws::try_connect(srv, req).unwrap_or_else(|e| panic!("ws connect failed: {e:?}"))
    }

    pub fn try_connect(srv: &Server, req: http::Request<()>) -> Result<Ws, tungstenite::Error> {
        Ws::try_connect_port(srv.port, req)
    }

    /// Connects to `port` with `Authorization: Bearer <token>`.
    pub fn connect_port(port: u16, token: &str) -> Result<Ws, tungstenite::Error> {
        let req = format!("ws://127.0.0.1:{port}/ws")
            .into_client_request()
            .expect("ws request");
        let req = with_header(req, "Authorization", &format!("Bearer {token}"));
        Ws::try_connect_port(port, req)
    }

    pub fn try_connect_port(port: u16, req: http::Request<()>) -> Result<Ws, tungstenite::Error> {
        let stream =
            TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        match tungstenite::client::client(req, stream) {
            Ok((ws, response)) => Ok(Ws { ws, response }),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            // A blocking handshake is only interrupted by the read timeout.
            Err(tungstenite::HandshakeError::Interrupted(_)) => {
                Err(tungstenite::Error::Io(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "no answer to the upgrade request within the read timeout",
                )))
            }
        }
    }

    pub fn stream(&self) -> &TcpStream {
        self.ws.get_ref()
    }

    pub fn send(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_string())).expect("ws send");
    }

    /// Next data frame, as a tungstenite message (Ping/Pong control frames skipped).
    pub fn next_message(&mut self) -> Result<Message, tungstenite::Error> {
        loop {
            match self.ws.read() {
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                other => return other,
            }
        }
    }

    /// Next text frame parsed as JSON; panics on close, timeout, binary or bad JSON.
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        match self.next_message() {
            Ok(Message::Text(t)) => serde_json::from_str(t.as_str())
                .unwrap_or_else(|e| panic!("server sent invalid JSON {:?}: {e}", t.as_str())),
            Ok(other) => panic!("expected a text frame, got {other:?}"),
            Err(e) => panic!("expected a text frame, got error {e:?}"),
        }
    }

    /// Next text frame whose `type` is not in `skip`.
    #[track_caller]
    pub fn recv_skipping(&mut self, skip: &[&str]) -> Value {
        loop {
            let v = self.recv();
            if !skip.iter().any(|t| v["type"] == *t) {
                return v;
            }
        }
    }

    /// Reads frames until a close frame arrives; returns its code (None for a close
    /// frame without a code). Text frames before it are skipped. Panics on timeout or
    /// if the connection ends without a close frame.
    #[track_caller]
    pub fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            assert!(Instant::now() < deadline, "no close frame within 15 s");
            match self.ws.read() {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    panic!("timed out waiting for a close frame")
                }
                Err(e) => panic!("connection ended without a close frame: {e:?}"),
            }
        }
    }

    /// Sends `ping` and asserts the very next frame is `pong`: proof the socket is
    /// alive and that nothing else was queued for it before the pong.
    #[track_caller]
    pub fn ping(&mut self) {
        self.send(&json!({"type": "ping"}));
        let v = self.recv();
        assert_eq!(v["type"], "pong", "expected pong, got {v}");
        assert!(v["ref"].is_null(), "a ping without ref gets ref null: {v}");
    }

    /// Joins `room`; asserts the `joined` reply and returns it.
    #[track_caller]
    pub fn join(&mut self, room: &str) -> Value {
        self.send(&json!({"type": "join", "room": room}));
        let v = self.recv_skipping(&["presence"]);
        assert_eq!(v["type"], "joined", "expected joined, got {v}");
        assert_eq!(v["room"], room, "joined reply for wrong room: {v}");
        v
    }

    /// Sends `body` to `room` and waits for the echoed message and then the ack
    /// (skipping presence and other users' messages). Returns (message, id).
    #[track_caller]
    pub fn send_msg(&mut self, room: &str, body: &str) -> (Value, i64) {
        let r = format!("r{}", unique());
        self.send(&json!({"type": "send", "room": room, "body": body, "ref": r}));
        let mut mine: Option<Value> = None;
        loop {
            let v = self.recv_skipping(&["presence"]);
            match v["type"].as_str() {
                Some("message") if v["body"] == body && v["room"] == room => {
                    assert!(mine.is_none(), "message delivered twice: {v}");
                    mine = Some(v);
                }
                Some("message") => {}
                Some("ack") => {
                    assert_eq!(v["ref"], r.as_str(), "ack with wrong ref: {v}");
                    let m = mine.unwrap_or_else(|| {
                        panic!("ack {v} arrived before the sender's own message")
                    });
                    let id = v["id"].as_i64().expect("ack id");
                    assert_eq!(m["id"], id, "ack id differs from the message id");
                    return (m, id);
                }
                _ => panic!("unexpected frame while waiting for ack: {v}"),
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }

    /// Closes the socket and waits until the server has closed the TCP connection,
    /// which it does only after it has taken the socket out of its rooms (so no later
    /// `presence` from it can reach a socket that joins afterwards).
    #[track_caller]
    pub fn close_and_wait(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
        let deadline = Instant::now() + IO_TIMEOUT;
        // The close handshake first (tungstenite answers ConnectionClosed once done)...
        loop {
            match self.ws.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    panic!("no answer to a close frame within {IO_TIMEOUT:?}")
                }
                Err(_) => break,
            }
        }
        // ...then the end of the TCP stream.
        let s = self.ws.get_mut();
        let mut buf = [0u8; 1024];
        loop {
            assert!(
                Instant::now() < deadline,
                "the server kept the connection open"
            );
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    panic!("the server kept the connection open")
                }
                Err(_) => return,
            }
        }
    }
}

/// Reads until a close frame arrives (within `within`); returns its code.
#[track_caller]
pub fn wait_close(ws: &mut Ws, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no close frame within {within:?}");
        ws.stream()
            .set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        match ws.ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
            {
                panic!("no close frame within {within:?}")
            }
            Err(e) => panic!("connection ended without a close frame: {e:?}"),
        }
    }
}

/// The next frame answering `ref` r. Frames before it whose `type` is in `skip` are
/// passed over; any other frame fails the test.
#[track_caller]
pub fn reply_to(ws: &mut Ws, r: &str, skip: &[&str]) -> Value {
    loop {
        let v = ws.recv();
        if v["ref"] == r {
            return v;
        }
        if !skip.iter().any(|t| v["type"] == *t) {
            panic!("expected the reply to {r}, got {v}");
        }
    }
}

/// Asserts that the reply to `ref` r (see `reply_to`, with `skip`) is an `error` frame
/// with `code` and a non-empty message.
#[track_caller]
pub fn expect_ws_error(ws: &mut Ws, code: &str, r: &str, skip: &[&str]) {
    let v = reply_to(ws, r, skip);
    assert_eq!(
        v["type"], "error",
        "expected error {code} for ref {r}, got {v}"
    );
    assert_eq!(v["code"], code, "wrong code in {v}");
    assert_eq!(v["ref"], r, "ref not echoed in {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message in {v}"
    );
}

/// Posts `n` messages to `room` as the holder of `token` and returns their ids in
/// order. Uses a fresh socket per 15 messages so that a per-socket rate limit (20/s by
/// default in a later version) is never reached; each is fully closed (the server has
/// let go of it) before the function returns.
pub fn post_messages(srv: &Server, token: &str, room: &str, n: usize, prefix: &str) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let mut ws = Ws::connect(srv, token);
        ws.join(room);
        for _ in 0..15 {
            if i == n {
                break;
            }
            let (_, id) = ws.send_msg(room, &format!("{prefix}{i}"));
            ids.push(id);
            i += 1;
        }
        ws.close_and_wait();
    }
    ids
}

/// The ids of a JSON array of messages.
pub fn ids_of(msgs: &Value) -> Vec<i64> {
    msgs.as_array()
        .unwrap_or_else(|| panic!("expected an array of messages, got {msgs}"))
        .iter()
        .map(|m| {
            m["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("message id in {m}"))
        })
        .collect()
}

/// A WebSocket whose TCP receive buffer is tiny (set before the connection exists, so
/// the window TCP advertises is small too): a client that stops reading fills up fast.
pub fn tiny_window_socket(srv: &Server, token: &str) -> tungstenite::WebSocket<TcpStream> {
    let mut req = ws_request(srv, "/ws");
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tiny_window_upgrade(srv, req)
}

/// The upgrade `req` over a connection with a tiny receive window (see
/// `tiny_window_socket`).
pub fn tiny_window_upgrade(
    srv: &Server,
    req: http::Request<()>,
) -> tungstenite::WebSocket<TcpStream> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    sockopt::set_socket_recv_buffer_size(&fd, 2048).unwrap();
    rustix::net::connect(&fd, &SocketAddr::from(([127, 0, 0, 1], srv.port))).unwrap();
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (ws, _) = tungstenite::client::client(req, stream).expect("upgrade");
    ws
}
