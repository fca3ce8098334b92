//! Load generator for parley: the benchmark behind the README's performance figures.
//!
//! ```text
//! cargo build --release && cargo run --release --example loadgen -- SCENARIO [options]
//! ```
//!
//! It starts `target/release/parley` itself on a fresh temporary database (or talks to a
//! running server with `--addr`), creates its own accounts, opens the sockets, runs one
//! scenario, prints the figures and the verdict against the targets, and stops the server.
//! All traffic goes to loopback; every phase is bounded in count and time.
//!
//! Client design: the WebSocket handshake is done by hand over a `TcpStream` (keys from
//! `tungstenite::handshake`), then every socket is non-blocking and served by a couple of
//! epoll threads that parse frames in place, so 5,000 client sockets cost a few threads and
//! little CPU next to the server on the same two cores.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::epoll;
use serde_json::Value;

const USAGE: &str = "\
parley load generator

usage: cargo run --release --example loadgen -- SCENARIO [options]
       e.g. storm --sockets 2000 --presence each

scenarios (defaults in brackets):
  fanout   N sockets in one room [1000], S of them senders [10] at an aggregate paced
           rate [200 msg/s] for [10 s]; send->receive latency p50/p99/max over every
           delivery, deliveries expected vs received.      target: p99 < 50 ms, none lost
  burst    N sockets in one room [100], one sender at full speed keeping W un-acked
           messages in flight [256] for [5 s]; deliveries/s.  target: >= 250,000/s
  idle     N idle authenticated sockets [5000] that join one room and hold [5 s];
           server RSS and threads per socket; stops at the first failure (the ceiling).
                                      target: < 40 KiB RSS and <= 2 threads per socket
  acks     S senders [50], each in its own room, each keeping W messages in flight [8]
           for [10 s]; acknowledged messages/s, ack latency.  target: >= 5,000/s
  storm    everyone connects at once, as after a restart. N sockets [5000], one distinct
           user each, opened with up to --inflight handshakes at a time [256] by the epoll
           workers; each authenticates, upgrades and joins --room. Figures: wall time from
           the first connect to the last `joined`, upgrades+joins/s, per-socket connect /
           upgrade / join latency, frames received by type (presence, presence_batch or
           presence_count, other) until the clients go quiet, server CPU and RSS.
                                                target: >= 5,000 upgrades+joins/s
           Then (unless --no-restart) S senders [10] send at a paced [50 msg/s] for [2 s],
           the server is killed with SIGKILL while they send and started again at once on
           the same database and port; every client reconnects by itself after a random
           jitter [0-500 ms] (failed attempts back off 100 ms doubling, at most 1 s), joins
           again with \"since\": <last id it saw>, must receive every stored message it had
           not seen (checked against the acks and the database: no gap, no duplicate, in
           id order), and sends one message that must be acked: the senders to the room,
           the others a DM to themselves (so the check is not N x N deliveries; see
           --resend). Times from the kill to: reconnected, replayed, sent-and-acked.
                    target: every client back, replayed and sending within 5 s

options:
  --sockets N          sockets in total (acks: defaults to --senders)
  --senders N          sending sockets (the first N sockets)
  --rate R             aggregate paced rate in msg/s (0 = windowed by acks; storm: > 0)
  --window W           un-acked messages in flight per sender (when --rate is 0)
  --secs T             sending time: seconds (\"10\", \"2.5\") or a humantime (\"1m\");
                       storm: the sending before the kill
  --hold T             idle: how long to hold the sockets after they are all open [5s]
  --poll-us N          client read coalescing: after a wake-up, wait N µs before the
                       next poll [fanout, burst: 1000; others: 0]. Cuts the loadgen's
                       CPU on the shared cores; adds up to N µs to measured latency
  --body-bytes N       pad every message body to at least N bytes [0 = marker only]
  --login-flood N      fanout, burst, acks: while the sending phase runs, N more client
                       threads hammer POST /api/login with an unknown user and a wrong
                       password (a fresh connection each, Connection: close), so the server
                       checks the password against its dummy hash; reports their answers
                       by status, requests/s and answer latency [0 = off]. A started
                       server then runs with --bcrypt-cost 12 (its default) instead of 4
  --room NAME          room for fanout/burst/idle [general]
  --one-room           acks: put every sender in --room instead of one room each
  --per-user N         sockets per account [40; storm: always 1]
  --workers N          client epoll threads [2; idle: 1]
  --connectors N       client threads opening sockets in parallel [4]; storm: threads
                       creating the accounts [16]
  --addr HOST:PORT     use a running server instead of starting one (no RSS/CPU figures
                       unless --server-pid is given too)
  --server-pid PID     the running server's pid, for RSS/threads/CPU with --addr
  --node HOST:PORT     fanout, burst, acks with --addr: another node of the same cluster
                       (PostgreSQL, --db postgres://...), repeatable; socket i connects
                       to node i mod N (the --addr one first), so senders and receivers
                       sit on every node and most deliveries cross nodes
  --server-bin PATH    server binary to start [target/release/parley]
  --server-arg ARG     extra argument for the started server (repeatable). It runs with
                       --msg-rate 0 --login-rate 0, and --register-rate 0 when it knows
                       that flag; storm with the restart fixes a free port up front
  --password PW        password for the load-generator accounts [loadgen-password-1]
  --keep               keep the temporary database directory and server log
  --presence MODE      storm: batch (each join asks for \"presence\": \"batch\", i.e.
                       presence_batch frames), count (\"presence\": \"count\": no names,
                       presence_count frames) or each (plain joins) [batch]
  --restart            storm: kill -9 and restart after the storm (the default)
  --no-restart         storm: stop after the storm
  --inflight N         storm: handshakes in flight at once, over all workers [256]
  --jitter T           storm: reconnect delay after the kill, uniform in [0, T) [0.5s]
  --resend dm|room     storm: the message each client sends after rejoining: dm = the
                       senders to the room, the others a DM to themselves; room = every
                       client to the room (N x N deliveries) [dm]
  --deadline T         storm: the most the storm, the settling and the restart may each
                       take [2m]
  -h, --help           this text

exit status: 0 every target met, 3 a target missed, 1 the run failed, 2 bad usage.
";

// ---------------------------------------------------------------------------------------
// options

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Fanout,
    Burst,
    Idle,
    Acks,
    Storm,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Burst => "burst",
            Scenario::Idle => "idle",
            Scenario::Acks => "acks",
            Scenario::Storm => "storm",
        }
    }
}

#[derive(Debug, Clone)]
struct Opts {
    scenario: Scenario,
    sockets: usize,
    senders: usize,
    rate: f64,
    window: usize,
    secs: Duration,
    hold: Duration,
    poll: Duration,
    body_bytes: usize,
    login_flood: usize,
    room: String,
    one_room: bool,
    per_user: usize,
    workers: usize,
    connectors: usize,
    addr: Option<String>,
    /// Other nodes of the --addr server's cluster.
    nodes: Vec<String>,
    server_pid: Option<u32>,
    server_bin: PathBuf,
    server_args: Vec<String>,
    password: String,
    keep: bool,
    /// storm: the joins' presence mode (`each`, `batch` or `count`).
    presence: &'static str,
    /// storm: kill -9 and restart after the storm.
    restart: bool,
    /// storm: handshakes in flight at once.
    inflight: usize,
    /// storm: reconnect delay after the kill, uniform in [0, jitter).
    jitter: Duration,
    /// storm: every client's message after the rejoin goes to the room.
    resend_room: bool,
    /// storm: the most each phase (storm, settling, restart) may take.
    deadline: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() && f >= 0.0 {
            return Ok(Duration::from_secs_f64(f));
        }
    }
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let mut scenario = None;
    let mut sockets = None;
    let mut senders = None;
    let mut rate = None;
    let mut window = None;
    let mut secs = None;
    let mut hold = Duration::from_secs(5);
    let mut poll = None;
    let mut body_bytes = 0usize;
    let mut login_flood = 0usize;
    let mut room = "general".to_string();
    let mut one_room = false;
    let mut per_user = 40usize;
    let mut workers = None;
    let mut connectors = None;
    let mut addr = None;
    let mut nodes = Vec::new();
    let mut server_pid = None;
    let mut server_bin = PathBuf::from("target/release/parley");
    let mut server_args = Vec::new();
    let mut password = "loadgen-password-1".to_string();
    let mut keep = false;
    let mut presence = "batch";
    let mut restart = true;
    let mut inflight = 256usize;
    let mut jitter = Duration::from_millis(500);
    let mut resend_room = false;
    let mut deadline = Duration::from_secs(120);

    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if arg.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse::<T>()
                .map_err(|_| format!("{flag}: not a valid number: {v:?}"))
        }
        match flag.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--sockets" => sockets = Some(num::<usize>(&flag, value()?)?),
            "--senders" => senders = Some(num::<usize>(&flag, value()?)?),
            "--rate" => rate = Some(num::<f64>(&flag, value()?)?),
            "--window" => window = Some(num::<usize>(&flag, value()?)?),
            "--secs" => secs = Some(parse_duration(&value()?)?),
            "--hold" => hold = parse_duration(&value()?)?,
            "--poll-us" => poll = Some(Duration::from_micros(num(&flag, value()?)?)),
            "--body-bytes" => body_bytes = num(&flag, value()?)?,
            "--login-flood" => login_flood = num(&flag, value()?)?,
            "--room" => room = value()?,
            "--one-room" => one_room = true,
            "--per-user" => per_user = num(&flag, value()?)?,
            "--workers" => workers = Some(num::<usize>(&flag, value()?)?),
            "--connectors" => connectors = Some(num::<usize>(&flag, value()?)?),
            "--addr" => addr = Some(value()?),
            "--node" => nodes.push(value()?),
            "--server-pid" => server_pid = Some(num::<u32>(&flag, value()?)?),
            "--server-bin" => server_bin = PathBuf::from(value()?),
            "--server-arg" => server_args.push(value()?),
            "--password" => password = value()?,
            "--keep" => keep = true,
            "--presence" => {
                presence = match value()?.as_str() {
                    "batch" => "batch",
                    "count" => "count",
                    "each" => "each",
                    v => return Err(format!("--presence: batch, count or each, not {v:?}")),
                }
            }
            "--restart" => restart = true,
            "--no-restart" => restart = false,
            "--inflight" => inflight = num(&flag, value()?)?,
            "--jitter" => jitter = parse_duration(&value()?)?,
            "--resend" => {
                resend_room = match value()?.as_str() {
                    "room" => true,
                    "dm" => false,
                    v => return Err(format!("--resend: dm or room, not {v:?}")),
                }
            }
            "--deadline" => deadline = parse_duration(&value()?)?,
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => {
                if scenario.is_some() {
                    return Err(format!("unexpected argument {s:?}"));
                }
                scenario = Some(match s {
                    "fanout" => Scenario::Fanout,
                    "burst" => Scenario::Burst,
                    "idle" => Scenario::Idle,
                    "acks" => Scenario::Acks,
                    "storm" => Scenario::Storm,
                    _ => return Err(format!("unknown scenario {s:?}")),
                });
            }
        }
    }
    let scenario = scenario.ok_or("missing SCENARIO (fanout, burst, idle, acks or storm)")?;
    let (d_sockets, d_senders, d_rate, d_window, d_secs, d_workers, d_poll) = match scenario {
        Scenario::Fanout => (1000, 10, 200.0, 0, 10.0, 2, 1000),
        Scenario::Burst => (100, 1, 0.0, 256, 5.0, 2, 1000),
        Scenario::Idle => (5000, 0, 0.0, 0, 0.0, 1, 0),
        Scenario::Acks => (0, 50, 0.0, 8, 10.0, 2, 0),
        Scenario::Storm => (5000, 10, 50.0, 0, 2.0, 2, 0),
    };
    let senders = senders.unwrap_or(d_senders);
    let mut sockets = sockets.unwrap_or(d_sockets);
    if scenario == Scenario::Acks && sockets == 0 {
        sockets = senders;
    }
    let rate = rate.unwrap_or(d_rate);
    let window = window.unwrap_or(d_window);
    let o = Opts {
        scenario,
        sockets,
        senders: if scenario == Scenario::Idle {
            0
        } else {
            senders
        },
        rate,
        window,
        secs: secs.unwrap_or(Duration::from_secs_f64(d_secs)),
        hold,
        poll: poll.unwrap_or(Duration::from_micros(d_poll)),
        body_bytes,
        login_flood,
        room,
        one_room,
        // storm: one distinct user per socket.
        per_user: if scenario == Scenario::Storm {
            1
        } else {
            per_user
        },
        workers: workers.unwrap_or(d_workers),
        // storm: the threads that create the accounts.
        connectors: connectors.unwrap_or(if scenario == Scenario::Storm { 16 } else { 4 }),
        addr,
        nodes,
        server_pid,
        server_bin,
        server_args,
        password,
        keep,
        presence,
        restart,
        inflight,
        jitter,
        resend_room,
        deadline,
    };
    if o.sockets == 0 || o.sockets > 60_000 {
        return Err("--sockets must be 1..=60000".into());
    }
    if o.scenario != Scenario::Idle {
        if o.senders == 0 || o.senders > o.sockets {
            return Err("--senders must be 1..=--sockets".into());
        }
        if o.rate <= 0.0 && o.window == 0 {
            return Err("give a --rate or a --window".into());
        }
        if !(o.rate.is_finite() && o.rate <= 1_000_000.0) {
            return Err("--rate is too high".into());
        }
        if o.secs.is_zero() || o.secs > Duration::from_secs(3600) {
            return Err("--secs must be more than 0 and at most 1h".into());
        }
    }
    if o.hold > Duration::from_secs(3600) {
        return Err("--hold must be at most 1h".into());
    }
    if o.per_user == 0 || o.workers == 0 || o.workers > 64 || o.connectors == 0 {
        return Err("--per-user, --workers and --connectors must be at least 1".into());
    }
    if o.connectors > 64 {
        return Err("--connectors must be at most 64".into());
    }
    if o.login_flood > 0 && o.scenario == Scenario::Idle {
        return Err(
            "--login-flood runs during a sending phase: use it with fanout, burst or acks".into(),
        );
    }
    if o.login_flood > 1000 {
        return Err("--login-flood must be at most 1000".into());
    }
    if !o.nodes.is_empty() {
        if o.addr.is_none() {
            return Err("--node needs --addr: start the cluster's nodes yourself".into());
        }
        if !matches!(
            o.scenario,
            Scenario::Fanout | Scenario::Burst | Scenario::Acks
        ) {
            return Err("--node works with fanout, burst and acks".into());
        }
    }
    if o.scenario == Scenario::Storm {
        if o.rate <= 0.0 {
            return Err("storm: --rate must be more than 0 (the senders are paced)".into());
        }
        if o.login_flood > 0 {
            return Err("storm: --login-flood is not supported".into());
        }
        if o.restart && o.addr.is_some() {
            return Err(
                "storm: the restart kills and restarts the server, so it needs a started one: drop --addr or pass --no-restart"
                    .into(),
            );
        }
        if o.inflight == 0 || o.inflight > 60_000 {
            return Err("--inflight must be 1..=60000".into());
        }
        if o.jitter > Duration::from_secs(60) {
            return Err("--jitter must be at most 60 s".into());
        }
        if o.deadline.is_zero() || o.deadline > Duration::from_secs(3600) {
            return Err("--deadline must be more than 0 and at most 1h".into());
        }
    }
    if o.window > 100_000 || o.body_bytes > 60_000 {
        return Err("--window or --body-bytes too large".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// /proc helpers

fn proc_status_field(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_kib(pid: &str) -> Option<u64> {
    proc_status_field(pid, "VmRSS:")
}

fn dir_entries(path: String) -> Option<usize> {
    Some(std::fs::read_dir(path).ok()?.count())
}

fn threads(pid: &str) -> Option<usize> {
    dir_entries(format!("/proc/{pid}/task"))
}

fn fds(pid: &str) -> Option<usize> {
    dir_entries(format!("/proc/{pid}/fd"))
}

/// The numeric fields of `/proc/PID/stat` after the command name (which may hold
/// spaces): index 0 is the state, 7 `minflt`, 11 `utime`, 12 `stime`.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User + system CPU time of a process (all threads), in seconds. USER_HZ is 100 on Linux.
fn cpu_secs(pid: &str) -> Option<f64> {
    let f = stat_fields(pid)?;
    Some((f.get(11)? + f.get(12)?) as f64 / 100.0)
}

/// Minor page faults of a process so far (all threads): each is a fresh page the kernel
/// had to find and zero, which on a VM host can cost microseconds.
fn minor_faults(pid: &str) -> Option<u64> {
    stat_fields(pid)?.get(7).copied()
}

/// CPU seconds per thread name (summed over threads of the same name).
fn thread_cpu(pid: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let tid = e.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if let Some(c) = cpu_secs(&format!("{pid}/task/{tid}")) {
            *out.entry(name).or_insert(0.0) += c;
        }
    }
    out
}

/// The busiest thread names between two `thread_cpu` snapshots.
fn thread_cpu_line(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, secs: f64) -> String {
    let mut v: Vec<(f64, &String)> = b
        .iter()
        .map(|(k, y)| (y - a.get(k).copied().unwrap_or(0.0), k))
        .filter(|(d, _)| *d > 0.0)
        .collect();
    v.sort_by(|x, y| y.0.total_cmp(&x.0));
    v.iter()
        .take(4)
        .map(|(d, k)| format!("{k} {:.0} %", 100.0 * d / secs))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// the server process

struct Server {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    cmdline: String,
    keep: bool,
    stopped: bool,
}

/// Does the server binary know this `serve` flag? (New flags arrive while the loadgen
/// is used against older binaries; an unknown flag would stop the server from starting.)
fn server_knows_flag(bin: &PathBuf, flag: &str) -> bool {
    Command::new(bin)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// A free loopback port, for a server that must come back on the same address.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn log_tail_of(log: &PathBuf, n: usize) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts the server process (its stderr appended to `log`) and waits for the line that
/// announces its address. On failure the process is killed and the error says why.
fn launch(bin: &PathBuf, args: &[String], log: &PathBuf) -> Result<(Child, SocketAddr), String> {
    let cmdline = std::iter::once(bin.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open log {}: {e}", log.display()))?;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    // Read the first line, then keep draining stdout so the server never blocks on it.
    let drain = thread::Builder::new()
        .name("server-stdout".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut first = true;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if first {
                    let _ = tx.send(line);
                    first = false;
                }
            }
        });
    let fail = |child: &mut Child, msg: String| -> String {
        let _ = child.kill();
        let _ = child.wait();
        msg
    };
    if let Err(e) = drain {
        return Err(fail(&mut child, format!("spawn: {e}")));
    }
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(l) => l,
        Err(_) => {
            thread::sleep(Duration::from_millis(200));
            let status = match child.try_wait() {
                Ok(Some(s)) => format!("exited with {s}"),
                _ => "still running, printed nothing on stdout within 60 s".to_string(),
            };
            let msg = format!(
                "server did not announce its address ({status}); command: {cmdline}\nserver log tail:\n{}",
                log_tail_of(log, 20)
            );
            return Err(fail(&mut child, msg));
        }
    };
    let prefix = "parley listening on http://";
    let addr = line
        .strip_prefix(prefix)
        .ok_or_else(|| format!("unexpected first stdout line from server: {line:?}"))
        .and_then(|hostport| {
            hostport
                .trim()
                .trim_end_matches('/')
                .parse()
                .map_err(|e| format!("bad address in {line:?}: {e}"))
        });
    match addr {
        Ok(a) => Ok((child, a)),
        Err(e) => Err(fail(&mut child, e)),
    }
}

impl Server {
    /// `bcrypt_cost` is passed unless `extra` sets `--bcrypt-cost` itself; `listen` is
    /// the `--addr` (port 0: any free port).
    fn start(
        bin: &PathBuf,
        extra: &[String],
        keep: bool,
        bcrypt_cost: u32,
        listen: &str,
    ) -> Result<Server, String> {
        // A relative default also works from outside the repository.
        let in_repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(bin);
        let bin = if !bin.exists() && bin.is_relative() && in_repo.exists() {
            &in_repo
        } else {
            bin
        };
        if !bin.exists() {
            return Err(format!(
                "server binary {} not found: run `cargo build --release` first or pass --server-bin",
                bin.display()
            ));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "parley-loadgen-{}-{}",
            std::process::id(),
            nanos % 1_000_000_000
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let db = dir.join("chat.db");
        let log = dir.join("server.log");
        let cost = bcrypt_cost.to_string();
        let mut args: Vec<&str> = vec!["serve", "--addr", listen, "--db"];
        let db = db.to_string_lossy();
        args.push(&db);
        if !extra.iter().any(|a| a.starts_with("--bcrypt-cost")) {
            args.extend(["--bcrypt-cost", &cost]);
        }
        args.extend([
            "--max-sockets",
            "20000",
            "--max-sockets-per-user",
            "10000",
            "--msg-rate",
            "0",
            "--login-rate",
            "0",
        ]);
        // Every scenario registers more accounts from one IP than a real client would.
        if !extra.iter().any(|a| a.starts_with("--register-rate"))
            && server_knows_flag(bin, "--register-rate")
        {
            args.extend(["--register-rate", "0"]);
        }
        // `acks` creates a room per sender, more than --room-rate's hourly budget.
        if !extra.iter().any(|a| a.starts_with("--room-rate"))
            && server_knows_flag(bin, "--room-rate")
        {
            args.extend(["--room-rate", "0"]);
        }
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().cloned());
        let cmdline = std::iter::once(bin.display().to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let (child, addr) = match launch(bin, &args, &log) {
            Ok(x) => x,
            Err(e) => {
                if keep {
                    eprintln!("kept {}", dir.display());
                } else {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        Ok(Server {
            pid: child.id(),
            child,
            addr,
            dir,
            log,
            bin: bin.clone(),
            args,
            cmdline,
            keep,
            stopped: false,
        })
    }

    fn log_tail(&self, n: usize) -> String {
        log_tail_of(&self.log, n)
    }

    /// None while running, else a description of how it ended.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(format!("{s}")),
            Ok(None) => None,
            Err(e) => Some(format!("wait failed: {e}")),
        }
    }

    /// SIGKILL, no questions asked (the crash the restart test is about); returns once
    /// the process is gone.
    fn kill9(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }

    /// Starts the same command again (same database, same `--addr`) after `kill9`;
    /// the log continues in the same file.
    fn respawn(&mut self) -> Result<(), String> {
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(
                f,
                "---- loadgen: server killed with SIGKILL, starting it again ----"
            );
        }
        let (child, addr) = launch(&self.bin, &self.args, &self.log)?;
        self.pid = child.id();
        self.child = child;
        self.addr = addr;
        Ok(())
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns a description.
    fn stop(&mut self) -> String {
        self.stopped = true;
        if let Some(s) = self.exited() {
            return format!("server had already exited: {s}");
        }
        let t = Instant::now();
        let pid = rustix::process::Pid::from_raw(self.pid as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        while t.elapsed() < Duration::from_secs(10) {
            if let Some(s) = self.exited() {
                return format!(
                    "server exited {:.0} ms after SIGTERM: {s}",
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        "server did NOT exit within 10 s of SIGTERM; killed with SIGKILL".to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// a tiny HTTP/1.1 client (Connection: close)

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    memchr::memmem::find(hay, needle)
}

type Head = (u16, Vec<(String, String)>, usize);

/// Parses a response head; returns (status, headers, head length) when complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some((status, headers, end + 4)))
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
) -> Result<HttpResponse, String> {
    http_timeout(addr, method, path, body, bearer, Duration::from_secs(30))
}

/// One request on a fresh connection (`Connection: close`); `timeout` bounds the connect,
/// each read and write, and the whole wait for the response.
fn http_timeout(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    s.set_nodelay(true).ok();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: write: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let started = Instant::now();
    loop {
        if let Some((status, headers, hlen)) = parse_head(&buf)? {
            let clen = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse::<usize>().ok());
            if clen.is_some_and(|n| buf.len() >= hlen + n) {
                let n = clen.unwrap_or(0);
                return Ok(HttpResponse {
                    status,
                    headers,
                    body: String::from_utf8_lossy(&buf[hlen..hlen + n]).into_owned(),
                });
            }
        }
        if started.elapsed() > timeout || buf.len() > 8 * 1024 * 1024 {
            return Err(format!("{method} {path}: response too slow or too large"));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!("{method} {path}: no response within {timeout:?}"))
            }
            Err(e) => return Err(format!("{method} {path}: read: {e}")),
        }
    }
    match parse_head(&buf)? {
        Some((status, headers, hlen)) => Ok(HttpResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&buf[hlen..]).into_owned(),
        }),
        None => Err(format!(
            "{method} {path}: connection closed after {} bytes without a complete response",
            buf.len()
        )),
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Registers (or reuses) an account and logs in; returns the access token.
fn account_token(addr: SocketAddr, name: &str, password: &str) -> Result<String, String> {
    let creds = serde_json::json!({"username": name, "password": password}).to_string();
    for attempt in 0..6 {
        let r = http(addr, "POST", "/api/register", Some(&creds), None)?;
        match r.status {
            201 | 409 => break,
            429 if attempt < 5 => retry_after(&r),
            s => return Err(format!("register {name}: HTTP {s}: {}", short(&r.body))),
        }
    }
    for attempt in 0..6 {
        let r = http(addr, "POST", "/api/login", Some(&creds), None)?;
        match r.status {
            200 => {
                let v: Value = serde_json::from_str(&r.body)
                    .map_err(|e| format!("login {name}: bad JSON ({e}): {}", short(&r.body)))?;
                return v
                    .get("access_token")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("login {name}: no access_token in {}", short(&r.body)));
            }
            429 if attempt < 5 => retry_after(&r),
            s => return Err(format!("login {name}: HTTP {s}: {}", short(&r.body))),
        }
    }
    Err(format!("login {name}: still rate limited after 6 attempts"))
}

fn retry_after(r: &HttpResponse) {
    let secs = r
        .header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .clamp(1, 60);
    eprintln!("  rate limited (429); waiting {secs} s as Retry-After says");
    thread::sleep(Duration::from_secs(secs));
}

/// Creates `n` accounts in parallel; returns their access tokens in order.
fn make_accounts(
    addr: SocketAddr,
    run_id: &str,
    n: usize,
    password: &str,
    threads: usize,
) -> Result<Vec<String>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(vec![String::new(); n]));
    let failed = Arc::new(Mutex::new(None::<String>));
    let mut hs = Vec::new();
    for _ in 0..threads.min(n).max(1) {
        let (next, out, failed) = (next.clone(), out.clone(), failed.clone());
        let run_id = run_id.to_string();
        let password = password.to_string();
        let h = thread::Builder::new()
            .name("accounts".into())
            .stack_size(256 * 1024)
            .spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                match account_token(addr, &format!("lg{run_id}_{i}"), &password) {
                    Ok(t) => {
                        if let Ok(mut o) = out.lock() {
                            o[i] = t;
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                }
            })
            .map_err(|e| format!("spawn: {e}"))?;
        hs.push(h);
    }
    for h in hs {
        let _ = h.join();
    }
    if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
        return Err(e);
    }
    let v = out.lock().map_err(|_| "poisoned")?.clone();
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// the login flood

/// Upper bound on flood requests in one run; the time bound is the sending phase.
const FLOOD_MAX_REQUESTS: u64 = 5_000_000;
/// Connect, read and write timeout of one flood request, and the most it may take.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct FloodStats {
    sent: u64,
    /// Answers by HTTP status.
    status: BTreeMap<u16, u64>,
    /// Answer latency (connect to complete response) by status, µs.
    lat_us: BTreeMap<u16, Vec<u32>>,
    /// Requests without an answer, by error.
    errors: BTreeMap<String, u64>,
    /// Requests answered (or failed) after the sending phase ended.
    late: u64,
    /// A few answers other than 401 and 429.
    samples: Vec<String>,
}

impl FloodStats {
    fn merge(&mut self, o: FloodStats) {
        self.sent += o.sent;
        for (k, v) in o.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in o.lat_us {
            self.lat_us.entry(k).or_default().extend(v);
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.late += o.late;
        for x in o.samples {
            if self.samples.len() < 3 {
                self.samples.push(x);
            }
        }
    }
}

/// Client threads that hammer `POST /api/login` until `stop`.
struct Flood {
    clients: usize,
    stop: Arc<AtomicBool>,
    /// Requests started so far (also the next `flood-<i>` number).
    started: Arc<AtomicU64>,
    /// Answers so far: [401, 429, other status, no answer].
    answers: Arc<[AtomicU64; 4]>,
    t0: Instant,
    t1: Option<Instant>,
    hs: Vec<thread::JoinHandle<FloodStats>>,
}

impl Flood {
    /// Starts `clients` threads; each sends one login at a time on a fresh connection,
    /// for an unknown user, until `stop_flood` (or `limit` has passed, as a safety net).
    fn start(addr: SocketAddr, clients: usize, limit: Duration) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let answers = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let t0 = Instant::now();
        let deadline = t0 + limit;
        let mut hs = Vec::new();
        for _ in 0..clients {
            let (stop, started, answers) = (stop.clone(), started.clone(), answers.clone());
            let h = thread::Builder::new()
                .name("login-flood".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut st = FloodStats::default();
                    let answers: &[AtomicU64; 4] = &answers;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let i = started.fetch_add(1, Ordering::Relaxed);
                        if i >= FLOOD_MAX_REQUESTS {
                            break;
                        }
                        let body = format!(
                            "{{\"username\":\"flood-{i}\",\"password\":\"wrong-password-123\"}}"
                        );
                        let t = Instant::now();
                        let r = http_timeout(
                            addr,
                            "POST",
                            "/api/login",
                            Some(&body),
                            None,
                            FLOOD_TIMEOUT,
                        );
                        let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        st.sent += 1;
                        if stop.load(Ordering::Relaxed) {
                            st.late += 1;
                        }
                        match r {
                            Ok(resp) => {
                                *st.status.entry(resp.status).or_default() += 1;
                                st.lat_us.entry(resp.status).or_default().push(us);
                                let slot = match resp.status {
                                    401 => 0,
                                    429 => 1,
                                    _ => 2,
                                };
                                answers[slot].fetch_add(1, Ordering::Relaxed);
                                if slot == 2 && st.samples.len() < 3 {
                                    st.samples.push(format!(
                                        "HTTP {}: {}",
                                        resp.status,
                                        short(&resp.body)
                                    ));
                                }
                            }
                            Err(e) => {
                                *st.errors.entry(e).or_default() += 1;
                                answers[3].fetch_add(1, Ordering::Relaxed);
                                // Do not spin on a refused or failed connection.
                                thread::sleep(Duration::from_millis(5));
                            }
                        }
                    }
                    st
                });
            match h {
                Ok(h) => hs.push(h),
                Err(e) => {
                    eprintln!("could not start a login-flood thread: {e}");
                    break;
                }
            }
        }
        Flood {
            clients: hs.len(),
            stop,
            started,
            answers,
            t0,
            t1: None,
            hs,
        }
    }

    fn stop_flood(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.t1.get_or_insert_with(Instant::now);
    }

    /// Stops the threads, waits for their last requests, and returns the merged figures
    /// and the flood's duration (start to stop) in seconds.
    fn join(mut self) -> (FloodStats, f64) {
        self.stop_flood();
        let mut st = FloodStats::default();
        for h in self.hs {
            match h.join() {
                Ok(s) => st.merge(s),
                Err(_) => eprintln!("a login-flood thread panicked (loadgen bug)"),
            }
        }
        let secs = self
            .t1
            .unwrap_or_else(Instant::now)
            .duration_since(self.t0)
            .as_secs_f64();
        (st, secs)
    }
}

fn flood_report(f: &mut FloodStats, clients: usize, secs: f64, cost: &str) {
    let answered: u64 = f.status.values().sum();
    let failed: u64 = f.errors.values().sum();
    let statuses: Vec<String> = f
        .status
        .iter()
        .map(|(k, v)| format!("{} x {k}", thousands(*v)))
        .collect();
    println!(
        "  login flood:  {clients} clients, POST /api/login for unknown users (wrong password), a fresh connection each; server bcrypt cost {cost}"
    );
    println!(
        "                {} requests sent in {secs:.2} s = {} requests/s; {} answered ({}), {} without an answer",
        thousands(f.sent),
        thousands((f.sent as f64 / secs.max(1e-9)) as u64),
        thousands(answered),
        if statuses.is_empty() {
            "none".to_string()
        } else {
            statuses.join(", ")
        },
        thousands(failed)
    );
    if f.late > 0 {
        println!(
            "                ({} of them were in flight when the sending phase ended and were answered during the drain)",
            thousands(f.late)
        );
    }
    let mut all: Vec<u32> = f.lat_us.values().flatten().copied().collect();
    println!("    answer latency, all:  {}", lat_line(&mut all));
    for (code, v) in f.lat_us.iter_mut() {
        println!("    answer latency, {code}:  {}", lat_line(v));
    }
    let odd: Vec<String> = f
        .status
        .iter()
        .filter(|(k, _)| !matches!(**k, 401 | 429))
        .map(|(k, v)| format!("{} x HTTP {k}", thousands(*v)))
        .chain(
            f.errors
                .iter()
                .map(|(e, n)| format!("{} x {e}", thousands(*n))),
        )
        .collect();
    if !odd.is_empty() {
        println!(
            "    unexpected flood answers (only 401 and 429 are expected): {}",
            odd.join("; ")
        );
        if !f.samples.is_empty() {
            println!("      first: {}", f.samples.join(" | "));
        }
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket framing (client side: our frames are masked, the server's are not)

fn mask_key() -> [u8; 4] {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
            t | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x as u32).to_le_bytes()
    })
}

fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let m = mask_key();
    out.extend_from_slice(&m);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i & 3]));
}

struct FrameHead {
    fin: bool,
    opcode: u8,
    start: usize,
    end: usize,
    masked: bool,
}

/// Parses one frame at the start of `buf`; `Ok(None)` when incomplete. A masked server
/// frame (a protocol violation) is unmasked in place and flagged.
fn parse_frame(buf: &mut [u8]) -> Result<Option<FrameHead>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(format!("frame with RSV bits set (first byte {b0:#04x})"));
    }
    let mut len = (b1 & 0x7f) as u64;
    let mut pos = 2;
    if len == 126 {
        if buf.len() < 4 {
            return Ok(None);
        }
        len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
        pos = 4;
    } else if len == 127 {
        if buf.len() < 10 {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[2..10]);
        len = u64::from_be_bytes(b);
        pos = 10;
    }
    if len > 16 * 1024 * 1024 {
        return Err(format!("frame of {len} bytes"));
    }
    let masked = b1 & 0x80 != 0;
    let mut mask = [0u8; 4];
    if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        mask.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
    }
    let end = pos + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    if masked {
        for (i, b) in buf[pos..end].iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
    }
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        start: pos,
        end,
        masked,
    }))
}

/// What one text frame from the server means to us.
enum In {
    /// A `message` event carrying one of our marker bodies.
    Delivery {
        sender: usize,
        seq: u64,
        t_us: u64,
    },
    Ack {
        seq: Option<u64>,
    },
    Error {
        code: String,
        seq: Option<u64>,
        text: String,
    },
    Joined(String),
    Pong,
    Presence,
    Other(String),
}

const MARKER: &[u8] = b"\"body\":\"lg|";

fn parse_marker(s: &[u8]) -> Option<(usize, u64, u64)> {
    let mut nums = [0u64; 3];
    let mut pos = 0;
    for n in nums.iter_mut() {
        let start = pos;
        while pos < s.len() && s[pos].is_ascii_digit() {
            *n = n.checked_mul(10)?.checked_add((s[pos] - b'0') as u64)?;
            pos += 1;
        }
        if pos == start || pos >= s.len() || s[pos] != b'|' {
            return None;
        }
        pos += 1;
    }
    Some((nums[0] as usize, nums[1], nums[2]))
}

fn ref_seq(v: &Value) -> Option<u64> {
    match v.get("ref")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn classify(p: &[u8]) -> In {
    // Fast path for the bulk of the traffic: no JSON parse for our own messages.
    if let Some(i) = find(p, MARKER) {
        if let Some((sender, seq, t_us)) = parse_marker(&p[i + MARKER.len()..]) {
            if find(p, b"\"type\":\"message\"").is_some() {
                return In::Delivery { sender, seq, t_us };
            }
        }
    }
    let v: Value = match serde_json::from_slice(p) {
        Ok(v) => v,
        Err(_) => return In::Other("invalid JSON".into()),
    };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match v.get("type").and_then(Value::as_str) {
        Some("ack") => In::Ack { seq: ref_seq(&v) },
        Some("error") => In::Error {
            code: s("code"),
            seq: ref_seq(&v),
            text: s("message"),
        },
        Some("joined") => In::Joined(s("room")),
        Some("pong") => In::Pong,
        Some("presence") => In::Presence,
        Some("message") => In::Other("message (not ours)".into()),
        Some(t) => In::Other(t.to_string()),
        None => In::Other("JSON without type".into()),
    }
}

// ---------------------------------------------------------------------------------------
// opening a socket: handshake, join, wait for `joined`

struct Ws {
    sock: TcpStream,
    pending: Vec<u8>,
}

fn ws_open(
    addr: SocketAddr,
    token: &str,
    room: &str,
    timeout: Duration,
) -> Result<(Ws, u32, u32), String> {
    let t = Instant::now();
    let mut sock =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    sock.set_nodelay(true).ok();
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    let key = tungstenite::handshake::client::generate_key();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    sock.write_all(req.as_bytes())
        .map_err(|e| format!("upgrade request: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let deadline = t + timeout;
    let (status, headers, hlen) = loop {
        if let Some(h) = parse_head(&buf)? {
            break h;
        }
        if Instant::now() > deadline {
            return Err("no upgrade response in time".into());
        }
        match sock.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "connection closed during the upgrade ({} bytes received)",
                    buf.len()
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!(
                    "no upgrade response within {timeout:?} ({} bytes received)",
                    buf.len()
                ))
            }
            Err(e) => return Err(format!("upgrade response: {e}")),
        }
    };
    if status != 101 {
        // Best effort: show the error body.
        sock.set_read_timeout(Some(Duration::from_millis(300))).ok();
        let mut rest = buf[hlen..].to_vec();
        let _ = sock.take(4096).read_to_end(&mut rest);
        return Err(format!(
            "upgrade refused: HTTP {status}: {}",
            short(&String::from_utf8_lossy(&rest))
        ));
    }
    let accept = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    if accept != tungstenite::handshake::derive_accept_key(key.as_bytes()) {
        return Err(format!("bad Sec-WebSocket-Accept {accept:?}"));
    }
    let handshake_us = t.elapsed().as_micros() as u32;
    let mut pending = buf[hlen..].to_vec();

    let t2 = Instant::now();
    let join = serde_json::json!({"type": "join", "room": room}).to_string();
    let mut out = Vec::new();
    encode_frame(&mut out, 1, join.as_bytes());
    sock.write_all(&out).map_err(|e| format!("join: {e}"))?;
    loop {
        let mut off = 0;
        while let Some(f) = parse_frame(&mut pending[off..])? {
            let payload = &pending[off + f.start..off + f.end];
            off += f.end;
            match f.opcode {
                1 => match classify(payload) {
                    In::Joined(r) if r == room => {
                        pending.drain(..off);
                        let join_us = t2.elapsed().as_micros() as u32;
                        return Ok((Ws { sock, pending }, handshake_us, join_us));
                    }
                    In::Error { code, text, .. } => {
                        return Err(format!("join {room}: error {code}: {text}"))
                    }
                    _ => {}
                },
                8 => return Err(format!("closed while joining: {}", close_desc(payload))),
                _ => {}
            }
        }
        pending.drain(..off);
        if Instant::now() > deadline + timeout {
            return Err(format!("no `joined` reply within {timeout:?}"));
        }
        match sock.read(&mut chunk) {
            Ok(0) => return Err("connection closed while joining".into()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!("no `joined` reply within {timeout:?}"))
            }
            Err(e) => return Err(format!("waiting for joined: {e}")),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn close_desc(payload: &[u8]) -> String {
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        let reason = String::from_utf8_lossy(&payload[2..]);
        if reason.is_empty() {
            format!("close {code}")
        } else {
            format!("close {code} ({reason})")
        }
    } else {
        "close (no code)".to_string()
    }
}

struct Opened {
    socks: Vec<Ws>,
    handshake_us: Vec<u32>,
    join_us: Vec<u32>,
    /// (socket index, error) of the first failure; sockets after it were not opened.
    failure: Option<(usize, String)>,
    elapsed: Duration,
}

/// Opens `n` sockets with `threads` threads; socket i uses tokens[i / per_user] and
/// joins rooms[i % rooms.len()]. Stops at the first failure.
fn open_sockets(
    nodes: &[SocketAddr],
    tokens: &[String],
    per_user: usize,
    rooms: &[String],
    n: usize,
    threads: usize,
) -> Opened {
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(tokens.to_vec());
    let rooms = Arc::new(rooms.to_vec());
    let nodes = Arc::new(nodes.to_vec());
    type Part = (Vec<(usize, Ws, u32, u32)>, Option<(usize, String)>);
    let mut hs: Vec<thread::JoinHandle<Part>> = Vec::new();
    for _ in 0..threads.min(n) {
        let (next, stop_c, done, tokens, rooms, nodes) = (
            next.clone(),
            stop.clone(),
            done.clone(),
            tokens.clone(),
            rooms.clone(),
            nodes.clone(),
        );
        let h = thread::Builder::new()
            .name("connector".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut got = Vec::new();
                let mut err = None;
                loop {
                    if stop_c.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let token = &tokens[i / per_user];
                    let room = &rooms[i % rooms.len()];
                    let addr = nodes[i % nodes.len()];
                    match ws_open(addr, token, room, Duration::from_secs(15)) {
                        Ok((ws, h, j)) => got.push((i, ws, h, j)),
                        Err(e) => {
                            err = Some((i, e));
                            stop_c.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d % 1000 == 0 {
                        eprintln!("  {d} sockets open ({:.1} s)", t.elapsed().as_secs_f64());
                    }
                }
                (got, err)
            });
        match h {
            Ok(h) => hs.push(h),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                eprintln!("could not start a connector thread: {e}");
                break;
            }
        }
    }
    let mut all = Vec::new();
    let mut failure: Option<(usize, String)> = None;
    for h in hs {
        match h.join() {
            Ok((got, err)) => {
                all.extend(got);
                if let Some((i, e)) = err {
                    let earlier = match &failure {
                        Some((j, _)) => i < *j,
                        None => true,
                    };
                    if earlier {
                        failure = Some((i, e));
                    }
                }
            }
            Err(_) => failure = Some((usize::MAX, "connector thread panicked".into())),
        }
    }
    all.sort_by_key(|(i, ..)| *i);
    let mut o = Opened {
        socks: Vec::with_capacity(all.len()),
        handshake_us: Vec::with_capacity(all.len()),
        join_us: Vec::with_capacity(all.len()),
        failure,
        elapsed: t.elapsed(),
    };
    for (_, ws, h, j) in all {
        o.socks.push(ws);
        o.handshake_us.push(h);
        o.join_us.push(j);
    }
    o
}

// ---------------------------------------------------------------------------------------
// the epoll workers

const WARM: u8 = 0;
const SEND: u8 = 1;
const DRAIN: u8 = 2;
const STOP: u8 = 3;

struct Shared {
    base: Instant,
    phase: AtomicU8,
    /// When sending started, in µs since `base`.
    t0_us: AtomicU64,
    /// Paced senders: the aggregate rate in msg/s.
    rate: f64,
    /// After a wake-up with events, wait this long before polling again (0 = never).
    poll: Duration,
    ping_epoch: AtomicU64,
    sent: AtomicU64,
    acks: AtomicU64,
    send_errors: AtomicU64,
    deliveries: AtomicU64,
    closed: AtomicU64,
    pongs: AtomicU64,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

struct SenderState {
    idx: usize,
    room_json: String,
    pad: String,
    window: usize,
    /// Paced: the time between two sends of this sender.
    interval: Option<Duration>,
    next_due: Option<Instant>,
    next_seq: u64,
    inflight: HashMap<u64, u64>,
    sent: u64,
    acked: u64,
}

struct Conn {
    sock: TcpStream,
    pending: Vec<u8>,
    frag: Vec<u8>,
    frag_op: u8,
    out: Vec<u8>,
    received: u64,
    /// Last seq + 1 seen from each sender (0 = none yet).
    last_seq: Vec<u64>,
    closed: Option<String>,
    sender: Option<SenderState>,
    room: usize,
}

#[derive(Default)]
struct Stats {
    deliveries: u64,
    lat_us: Vec<u32>,
    ack_lat_us: Vec<u32>,
    acks: u64,
    unknown_acks: u64,
    sent: u64,
    send_errors: u64,
    pacer_skipped: u64,
    errors: BTreeMap<String, u64>,
    error_samples: Vec<String>,
    other: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    reorders: u64,
    pongs: u64,
    presence: u64,
    masked_frames: u64,
    last_delivery_us: u64,
    /// Per second of send time since t0: (deliveries, max latency µs, deliveries over 50 ms).
    by_sec: Vec<(u64, u32, u64)>,
    /// (sender idx, room, acked) for every sender.
    senders: Vec<(usize, usize, u64)>,
    /// (room, received) for every socket.
    received: Vec<(usize, u64)>,
    open_at_end: usize,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.deliveries += o.deliveries;
        self.lat_us.extend(o.lat_us);
        self.ack_lat_us.extend(o.ack_lat_us);
        self.acks += o.acks;
        self.unknown_acks += o.unknown_acks;
        self.sent += o.sent;
        self.send_errors += o.send_errors;
        self.pacer_skipped += o.pacer_skipped;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for s in o.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(s);
            }
        }
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        for (k, v) in o.closes {
            *self.closes.entry(k).or_default() += v;
        }
        self.reorders += o.reorders;
        self.pongs += o.pongs;
        self.presence += o.presence;
        self.masked_frames += o.masked_frames;
        self.last_delivery_us = self.last_delivery_us.max(o.last_delivery_us);
        if self.by_sec.len() < o.by_sec.len() {
            self.by_sec.resize(o.by_sec.len(), (0, 0, 0));
        }
        for (a, b) in self.by_sec.iter_mut().zip(o.by_sec) {
            a.0 += b.0;
            a.1 = a.1.max(b.1);
            a.2 += b.2;
        }
        self.senders.extend(o.senders);
        self.received.extend(o.received);
        self.open_at_end += o.open_at_end;
    }
}

const LAT_CAP: usize = 20_000_000;

struct Worker {
    ep: rustix::fd::OwnedFd,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    st: Stats,
    sh: Arc<Shared>,
    /// Connections whose read was cut short for fairness (edge-triggered: no new event).
    again: Vec<usize>,
}

impl Worker {
    fn close(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        if c.closed.is_none() {
            let _ = epoll::delete(&self.ep, &c.sock);
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
            *self.st.closes.entry(why.clone()).or_default() += 1;
            c.closed = Some(why);
            self.sh.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let mut written = 0;
        let mut err = None;
        while written < c.out.len() {
            match (&c.sock).write(&c.out[written..]) {
                Ok(0) => {
                    err = Some("write returned 0".to_string());
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    err = Some(format!("write error: {}", e.kind()));
                    break;
                }
            }
        }
        c.out.drain(..written);
        if let Some(e) = err {
            c.out.clear();
            self.close(i, e);
        }
    }

    fn send_one(c: &mut Conn, sh: &Shared, st: &mut Stats) {
        let Some(s) = c.sender.as_mut() else { return };
        let seq = s.next_seq;
        s.next_seq += 1;
        let t_us = sh.now_us();
        let msg = format!(
            "{{\"type\":\"send\",\"room\":{},\"body\":\"lg|{}|{}|{}|{}\",\"ref\":\"{}\"}}",
            s.room_json, s.idx, seq, t_us, s.pad, seq
        );
        encode_frame(&mut c.out, 1, msg.as_bytes());
        s.inflight.insert(seq, t_us);
        s.sent += 1;
        st.sent += 1;
    }

    /// Windowed senders: fill the window.
    fn top_up(&mut self, i: usize) {
        if self.sh.phase.load(Ordering::Relaxed) != SEND {
            return;
        }
        let c = &mut self.conns[i];
        if c.closed.is_some() {
            return;
        }
        let Some(s) = c.sender.as_ref() else { return };
        if s.interval.is_some() {
            return;
        }
        let need = s.window.saturating_sub(s.inflight.len());
        for _ in 0..need {
            Self::send_one(c, &self.sh, &mut self.st);
        }
        if need > 0 {
            self.flush(i);
        }
    }

    /// Paced senders: send what is due; returns the earliest next due time.
    fn pace(&mut self, i: usize, now: Instant) -> Option<Instant> {
        let sh = self.sh.clone();
        let c = &mut self.conns[i];
        if c.closed.is_some() {
            return None;
        }
        let s = c.sender.as_mut()?;
        let interval = s.interval?;
        let due = *s.next_due.get_or_insert_with(|| {
            let t0 = sh.base + Duration::from_micros(sh.t0_us.load(Ordering::Relaxed));
            t0 + Duration::from_secs_f64(s.idx as f64 / sh.rate)
        });
        if due > now {
            return Some(due);
        }
        let mut due = due;
        let mut n = 0;
        while due <= now {
            if now.duration_since(due) > Duration::from_secs(1) {
                // Far behind (the client was starved): skip rather than burst.
                let behind = now.duration_since(due).as_secs_f64();
                let skip = (behind / interval.as_secs_f64()) as u64;
                self.st.pacer_skipped += skip;
                due += interval * skip as u32;
                continue;
            }
            n += 1;
            due += interval;
        }
        s.next_due = Some(due);
        for _ in 0..n {
            Self::send_one(c, &sh, &mut self.st);
        }
        self.flush(i);
        Some(due)
    }

    fn handle_message(&mut self, i: usize, opcode: u8, payload: &[u8], now_us: u64) {
        match opcode {
            1 => {}
            2 => {
                *self.st.other.entry("binary frame".into()).or_default() += 1;
                return;
            }
            8 => {
                let d = close_desc(payload);
                // Answer the close (masked, echoing the code) and stop reading.
                let c = &mut self.conns[i];
                let code = if payload.len() >= 2 {
                    &payload[..2]
                } else {
                    &[]
                };
                encode_frame(&mut c.out, 8, code);
                self.flush(i);
                self.close(i, format!("server sent {d}"));
                return;
            }
            9 => {
                encode_frame(&mut self.conns[i].out, 10, payload);
                self.flush(i);
                return;
            }
            10 => return,
            op => {
                *self.st.other.entry(format!("opcode {op}")).or_default() += 1;
                return;
            }
        }
        match classify(payload) {
            In::Delivery { sender, seq, t_us } => {
                let st = &mut self.st;
                st.deliveries += 1;
                let lat = now_us.saturating_sub(t_us).min(u32::MAX as u64) as u32;
                if st.lat_us.len() < LAT_CAP {
                    st.lat_us.push(lat);
                }
                let sec = (t_us.saturating_sub(self.sh.t0_us.load(Ordering::Relaxed)) / 1_000_000)
                    .min(3600) as usize;
                if st.by_sec.len() <= sec {
                    st.by_sec.resize(sec + 1, (0, 0, 0));
                }
                let b = &mut st.by_sec[sec];
                b.0 += 1;
                b.1 = b.1.max(lat);
                b.2 += (lat > 50_000) as u64;
                st.last_delivery_us = st.last_delivery_us.max(now_us);
                let c = &mut self.conns[i];
                c.received += 1;
                if let Some(last) = c.last_seq.get_mut(sender) {
                    if seq < *last {
                        st.reorders += 1;
                    } else {
                        *last = seq + 1;
                    }
                }
            }
            In::Ack { seq } => {
                let c = &mut self.conns[i];
                let hit = match (c.sender.as_mut(), seq) {
                    (Some(s), Some(seq)) => s.inflight.remove(&seq).inspect(|_| s.acked += 1),
                    _ => None,
                };
                match hit {
                    Some(t) => {
                        self.st.acks += 1;
                        if self.st.ack_lat_us.len() < LAT_CAP {
                            self.st
                                .ack_lat_us
                                .push(now_us.saturating_sub(t).min(u32::MAX as u64) as u32);
                        }
                    }
                    None => self.st.unknown_acks += 1,
                }
            }
            In::Error { code, seq, text } => {
                *self.st.errors.entry(code.clone()).or_default() += 1;
                if self.st.error_samples.len() < 5 {
                    self.st
                        .error_samples
                        .push(format!("{code}: {text} (ref {seq:?})"));
                }
                if let (Some(s), Some(seq)) = (self.conns[i].sender.as_mut(), seq) {
                    if s.inflight.remove(&seq).is_some() {
                        self.st.send_errors += 1;
                    }
                }
            }
            In::Pong => self.st.pongs += 1,
            In::Presence => self.st.presence += 1,
            In::Joined(_) => *self.st.other.entry("joined".into()).or_default() += 1,
            In::Other(t) => *self.st.other.entry(t).or_default() += 1,
        }
    }

    /// Reads what is available (edge-triggered), handles every complete frame.
    /// `hup`: the peer may have closed; read until EOF or EAGAIN.
    fn on_readable(&mut self, i: usize, hup: bool) {
        if self.conns[i].closed.is_some() {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        self.read_conn(i, &mut scratch, hup);
        self.scratch = scratch;
    }

    fn read_conn(&mut self, i: usize, scratch: &mut Vec<u8>, hup: bool) {
        let mut len = 0;
        {
            let mut p = std::mem::take(&mut self.conns[i].pending);
            if scratch.len() < p.len() + 65536 {
                scratch.resize(p.len() + 65536, 0);
            }
            scratch[..p.len()].copy_from_slice(&p);
            len += p.len();
            p.clear();
            self.conns[i].pending = p;
        }
        let mut reads = 0;
        let mut have_data = len > 0;
        let mut drained = false;
        loop {
            if have_data {
                have_data = false;
                let now_us = self.sh.now_us();
                let mut off = 0;
                loop {
                    let f = match parse_frame(&mut scratch[off..len]) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            self.close(i, format!("client saw a protocol error: {e}"));
                            return;
                        }
                    };
                    if f.masked {
                        self.st.masked_frames += 1;
                    }
                    let (ps, pe) = (off + f.start, off + f.end);
                    off += f.end;
                    // Fragments: collect until FIN.
                    if f.opcode == 0 || (!f.fin && f.opcode < 8) {
                        let c = &mut self.conns[i];
                        if f.opcode != 0 {
                            c.frag_op = f.opcode;
                            c.frag.clear();
                        }
                        c.frag.extend_from_slice(&scratch[ps..pe]);
                        if f.fin {
                            let op = c.frag_op;
                            let whole = std::mem::take(&mut c.frag);
                            self.handle_message(i, op, &whole, now_us);
                        }
                    } else {
                        self.handle_message(i, f.opcode, &scratch[ps..pe], now_us);
                    }
                    if self.conns[i].closed.is_some() {
                        return;
                    }
                }
                scratch.copy_within(off..len, 0);
                len -= off;
            }
            if drained {
                break;
            }
            if reads >= 16 {
                // Fairness: come back to this one after the others.
                self.again.push(i);
                break;
            }
            if scratch.len() - len < 16384 {
                let n = scratch.len() * 2;
                scratch.resize(n, 0);
            }
            let room = scratch.len() - len;
            let r = (&self.conns[i].sock).read(&mut scratch[len..]);
            reads += 1;
            match r {
                Ok(0) => {
                    self.close(
                        i,
                        "server closed the TCP connection without a close frame".into(),
                    );
                    return;
                }
                Ok(n) => {
                    len += n;
                    have_data = true;
                    // A short read drained the socket: data arriving later raises a new
                    // edge, so skip the read that would only return EAGAIN.
                    drained = n < room && !hup;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(i, format!("read error: {}", e.kind()));
                    return;
                }
            }
        }
        let c = &mut self.conns[i];
        c.pending.extend_from_slice(&scratch[..len]);
        if c.sender.is_some() {
            self.top_up(i);
        }
    }

    fn run(mut self) -> (Stats, Vec<Conn>) {
        for (i, c) in self.conns.iter().enumerate() {
            if let Err(e) = c.sock.set_nonblocking(true) {
                eprintln!("set_nonblocking: {e}");
            }
            let flags = epoll::EventFlags::IN
                | epoll::EventFlags::OUT
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::ET;
            if let Err(e) = epoll::add(
                &self.ep,
                &c.sock,
                epoll::EventData::new_u64(i as u64),
                flags,
            ) {
                eprintln!("epoll add: {e}");
            }
        }
        // Frames that arrived together with `joined`.
        for i in 0..self.conns.len() {
            if !self.conns[i].pending.is_empty() {
                self.on_readable(i, false);
            }
        }
        let senders: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].sender.is_some())
            .collect();
        let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
        let mut ping_epoch = 0u64;
        let mut published = [0u64; 5];
        loop {
            let phase = self.sh.phase.load(Ordering::Relaxed);
            if phase == STOP {
                break;
            }
            let now = Instant::now();
            let mut next_due: Option<Instant> = None;
            if phase == SEND {
                for &i in &senders {
                    if self.conns[i]
                        .sender
                        .as_ref()
                        .is_some_and(|s| s.interval.is_some())
                    {
                        if let Some(d) = self.pace(i, now) {
                            next_due = Some(next_due.map_or(d, |n: Instant| n.min(d)));
                        }
                    } else {
                        self.top_up(i);
                    }
                }
            }
            let pe = self.sh.ping_epoch.load(Ordering::Relaxed);
            if pe != ping_epoch {
                ping_epoch = pe;
                for i in 0..self.conns.len() {
                    if self.conns[i].closed.is_none() {
                        encode_frame(&mut self.conns[i].out, 1, br#"{"type":"ping"}"#);
                        self.flush(i);
                    }
                }
            }
            let timeout = if !self.again.is_empty() {
                Duration::ZERO
            } else {
                match next_due {
                    Some(d) => d
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50)),
                    None => Duration::from_millis(50),
                }
            };
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: timeout.as_nanos() as _,
            };
            events.clear();
            match epoll::wait(
                &self.ep,
                rustix::buffer::spare_capacity(&mut events),
                Some(&ts),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    eprintln!("epoll_wait: {e}");
                    break;
                }
            }
            let woke = Instant::now();
            let again = std::mem::take(&mut self.again);
            for i in again {
                self.on_readable(i, true);
            }
            for ev in events.iter().copied() {
                let flags = ev.flags;
                let i = ev.data.u64() as usize;
                if i >= self.conns.len() {
                    continue;
                }
                if flags.intersects(
                    epoll::EventFlags::IN
                        | epoll::EventFlags::RDHUP
                        | epoll::EventFlags::HUP
                        | epoll::EventFlags::ERR,
                ) {
                    let hup = flags.intersects(
                        epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ERR,
                    );
                    self.on_readable(i, hup);
                }
                if flags.contains(epoll::EventFlags::OUT) && !self.conns[i].out.is_empty() {
                    self.flush(i);
                }
            }
            // Coalesce: let frames pile up a little instead of waking up for each one.
            if !self.sh.poll.is_zero() && !events.is_empty() {
                let mut until = woke + self.sh.poll;
                if let Some(d) = next_due {
                    until = until.min(d);
                }
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    thread::sleep(left);
                }
            }
            // Publish progress for the main thread.
            let counters = [
                (self.st.sent, &self.sh.sent),
                (self.st.acks, &self.sh.acks),
                (self.st.send_errors, &self.sh.send_errors),
                (self.st.deliveries, &self.sh.deliveries),
                (self.st.pongs, &self.sh.pongs),
            ];
            for (k, (now_val, target)) in counters.into_iter().enumerate() {
                if now_val != published[k] {
                    target.fetch_add(now_val - published[k], Ordering::Relaxed);
                    published[k] = now_val;
                }
            }
        }
        let mut st = std::mem::take(&mut self.st);
        for c in &self.conns {
            if let Some(s) = &c.sender {
                st.senders.push((s.idx, c.room, s.acked));
            }
            st.received.push((c.room, c.received));
            if c.closed.is_none() {
                st.open_at_end += 1;
            }
        }
        (st, self.conns)
    }
}

type WorkerHandle = thread::JoinHandle<(Stats, Vec<Conn>)>;

fn spawn_workers(
    socks: Vec<Ws>,
    rooms_of: &[usize],
    senders: Vec<Option<SenderState>>,
    nworkers: usize,
    nsenders: usize,
    sh: &Arc<Shared>,
) -> Result<Vec<WorkerHandle>, String> {
    let mut parts: Vec<Vec<Conn>> = (0..nworkers).map(|_| Vec::new()).collect();
    for (i, (ws, sender)) in socks.into_iter().zip(senders).enumerate() {
        parts[i % nworkers].push(Conn {
            sock: ws.sock,
            pending: ws.pending,
            frag: Vec::new(),
            frag_op: 0,
            out: Vec::new(),
            received: 0,
            last_seq: vec![0; nsenders],
            closed: None,
            sender,
            room: rooms_of[i],
        });
    }
    let mut hs = Vec::new();
    for (k, conns) in parts.into_iter().enumerate() {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
        let w = Worker {
            ep,
            conns,
            scratch: vec![0; 256 * 1024],
            st: Stats::default(),
            sh: sh.clone(),
            again: Vec::new(),
        };
        let h = thread::Builder::new()
            .name(format!("worker-{k}"))
            .stack_size(256 * 1024)
            .spawn(move || w.run())
            .map_err(|e| format!("spawn worker: {e}"))?;
        hs.push(h);
    }
    Ok(hs)
}

fn join_workers(hs: Vec<WorkerHandle>) -> (Stats, Vec<Conn>) {
    let mut st = Stats::default();
    let mut conns = Vec::new();
    for h in hs {
        match h.join() {
            Ok((s, c)) => {
                st.merge(s);
                conns.extend(c);
            }
            Err(_) => eprintln!("a worker thread panicked (loadgen bug)"),
        }
    }
    (st, conns)
}

// ---------------------------------------------------------------------------------------
// reporting helpers

fn pct_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

fn lat_line(v: &mut [u32]) -> String {
    v.sort_unstable();
    if v.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (n = {})",
        pct_ms(v, 50.0),
        pct_ms(v, 90.0),
        pct_ms(v, 99.0),
        pct_ms(v, 99.9),
        v[v.len() - 1] as f64 / 1000.0,
        v.len()
    )
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

struct Cpu {
    server: Option<f64>,
    faults: Option<u64>,
    threads: BTreeMap<String, f64>,
    client: Option<f64>,
    /// Machine-wide (process busy, irq + softirq, steal) CPU seconds from /proc/stat.
    machine: Option<(f64, f64, f64)>,
    at: Instant,
}

fn machine_cpu() -> Option<(f64, f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    if v.len() < 8 {
        return None;
    }
    Some((
        (v[0] + v[1] + v[2]) / 100.0,
        (v[5] + v[6]) / 100.0,
        v[7] / 100.0,
    ))
}

fn cpu_now(pid: Option<&str>) -> Cpu {
    Cpu {
        server: pid.and_then(cpu_secs),
        faults: pid.and_then(minor_faults),
        threads: pid.map(thread_cpu).unwrap_or_default(),
        client: cpu_secs("self"),
        machine: machine_cpu(),
        at: Instant::now(),
    }
}

fn cpu_report(a: &Cpu, b: &Cpu, per: Option<(u64, &str)>) {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    if let (Some(x), Some(y)) = (a.server, b.server) {
        let used = y - x;
        let mut s = format!(
            "  server CPU:   {:.0} % of one core ({used:.2} s in {secs:.1} s)",
            100.0 * used / secs
        );
        if let Some((n, what)) = per {
            if n > 0 {
                s.push_str(&format!(", {:.2} µs per {what}", used * 1e6 / n as f64));
            }
        }
        if let (Some(fa), Some(fb), Some((n, what))) = (a.faults, b.faults, per) {
            if n > 0 {
                let faults = fb.saturating_sub(fa);
                s.push_str(&format!(
                    ", {faults} page faults ({:.1} per {what})",
                    faults as f64 / n as f64
                ));
            }
        }
        println!("{s}");
        let busiest = thread_cpu_line(&a.threads, &b.threads, secs);
        if !busiest.is_empty() {
            println!("  server threads by CPU (one core = 100 %): {busiest}");
        }
    }
    if let (Some(x), Some(y)) = (a.client, b.client) {
        println!(
            "  loadgen CPU:  {:.0} % of one core (on the same 2 cores)",
            100.0 * (y - x) / secs
        );
        if let (Some(ma), Some(mb)) = (a.machine, b.machine) {
            let ours = (y - x) + b.server.zip(a.server).map_or(0.0, |(q, p)| q - p);
            let others = ((mb.0 - ma.0) - ours).max(0.0);
            let steal = mb.2 - ma.2;
            println!(
                "  rest of the machine: irq/softirq {:.0} %, other processes {:.0} %, stolen by the host {:.0} % (of one core){}",
                100.0 * (mb.1 - ma.1) / secs,
                100.0 * others / secs,
                100.0 * steal / secs,
                if others / secs > 0.2 || steal / secs > 0.1 {
                    "  <- noisy run, figures are not reliable"
                } else {
                    ""
                }
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// scenarios

struct Target {
    addr: SocketAddr,
    /// Every node sockets connect to, `addr` first.
    nodes: Vec<SocketAddr>,
    pid: Option<String>,
    server: Option<Server>,
}

fn run_id() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 20);
    let mut x = t % 36u64.pow(6);
    let mut s = Vec::new();
    for _ in 0..6 {
        s.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(x % 36) as usize]);
        x /= 36;
    }
    String::from_utf8(s).unwrap_or_else(|_| "run".into())
}

/// Is the server still up and answering? Adds what is wrong to `problems`.
fn check_server(t: &mut Target, problems: &mut Vec<String>) {
    if let Some(s) = t.server.as_mut() {
        if let Some(st) = s.exited() {
            problems.push(format!(
                "the server process exited during the run: {st}\n  server log tail:\n{}",
                s.log_tail(20)
            ));
            return;
        }
    }
    let health = health(t.addr);
    if let Err(e) = health {
        let mut p = format!("GET /healthz after the run failed: {e}");
        if let Some(s) = t.server.as_ref() {
            p.push_str(&format!("\n  server log tail:\n{}", s.log_tail(12)));
        }
        problems.push(p);
    }
}

fn health(addr: SocketAddr) -> Result<(), String> {
    // A short timeout of its own: a deaf server must not stall the report.
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 65536 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!("no response within 5 s ({} bytes)", buf.len()))
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    match parse_head(&buf)? {
        Some((200, ..)) => Ok(()),
        Some((st, ..)) => Err(format!("HTTP {st}")),
        None => Err(format!("no complete response ({} bytes)", buf.len())),
    }
}

fn print_problems(problems: &[String], st: Option<&Stats>) {
    let mut lines = problems.to_vec();
    if let Some(st) = st {
        if !st.closes.is_empty() {
            for (why, n) in &st.closes {
                lines.push(format!("{n} socket(s) ended: {why}"));
            }
        }
        if !st.errors.is_empty() {
            let e: Vec<String> = st.errors.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            lines.push(format!(
                "error frames from the server: {}; first: {}",
                e.join(", "),
                st.error_samples.join(" | ")
            ));
        }
        if st.masked_frames > 0 {
            lines.push(format!(
                "{} server frames were masked (RFC 6455 forbids it)",
                st.masked_frames
            ));
        }
        if st.unknown_acks > 0 {
            lines.push(format!(
                "{} acks did not match an in-flight ref",
                st.unknown_acks
            ));
        }
        if st.reorders > 0 {
            lines.push(format!(
                "{} deliveries arrived out of order or twice (per sender, per socket)",
                st.reorders
            ));
        }
        let interesting: Vec<String> = st
            .other
            .iter()
            .filter(|(k, _)| k.as_str() != "joined")
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        if !interesting.is_empty() {
            lines.push(format!("unexpected frames: {}", interesting.join(", ")));
        }
    }
    if lines.is_empty() {
        println!("  problems seen: none");
    } else {
        println!("  problems seen:");
        for l in lines {
            println!("    - {l}");
        }
    }
}

/// The bcrypt cost the server runs at, as far as the loadgen knows.
fn server_cost(o: &Opts) -> String {
    if o.addr.is_some() {
        return "unknown (a running server)".into();
    }
    let mut it = o.server_args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--bcrypt-cost=") {
            return format!("{v} (from --server-arg)");
        }
        if a == "--bcrypt-cost" {
            return format!(
                "{} (from --server-arg)",
                it.next().map_or("?", |v| v.as_str())
            );
        }
    }
    if o.login_flood > 0 { "12" } else { "4" }.into()
}

fn traffic(o: &Opts, t: &mut Target, rid: &str) -> Result<bool, String> {
    let addr = t.addr;
    let mut problems = Vec::new();
    let users = o.sockets.div_ceil(o.per_user);
    let ts = Instant::now();
    let tokens = make_accounts(addr, rid, users, &o.password, o.connectors)?;
    println!(
        "setup:    {users} accounts registered and logged in ({:.1} s, {} at a time, bcrypt cost {})",
        ts.elapsed().as_secs_f64(),
        o.connectors.min(users),
        server_cost(o)
    );

    // Rooms: fanout/burst/idle share one; acks gives each sender its own unless --one-room.
    let mut rooms = vec![o.room.clone()];
    if o.scenario == Scenario::Acks && !o.one_room {
        rooms = (0..o.senders).map(|i| format!("lg{rid}-{i}")).collect();
        for r in &rooms {
            let body = serde_json::json!({"name": r}).to_string();
            let resp = http(addr, "POST", "/api/rooms", Some(&body), Some(&tokens[0]))?;
            if resp.status != 201 && resp.status != 409 {
                return Err(format!(
                    "POST /api/rooms {r}: HTTP {}: {} (use --one-room to skip room creation)",
                    resp.status,
                    short(&resp.body)
                ));
            }
        }
        println!("          {} rooms created, one per sender", rooms.len());
    }
    // Socket i joins rooms[i % rooms.len()]; the senders are sockets 0..senders.
    let opened = open_sockets(
        &t.nodes,
        &tokens,
        o.per_user,
        &rooms,
        o.sockets,
        o.connectors,
    );
    let mut hs = opened.handshake_us.clone();
    let mut js = opened.join_us.clone();
    hs.sort_unstable();
    js.sort_unstable();
    println!(
        "          {} sockets open and joined in {:.1} s; upgrade p50 {:.2} ms p99 {:.2} ms, join p50 {:.2} ms p99 {:.2} ms",
        opened.socks.len(),
        opened.elapsed.as_secs_f64(),
        pct_ms(&hs, 50.0),
        pct_ms(&hs, 99.0),
        pct_ms(&js, 50.0),
        pct_ms(&js, 99.0)
    );
    if let Some((i, e)) = &opened.failure {
        check_server(t, &mut problems);
        return Err(format!(
            "socket {i} could not be opened: {e}{}",
            problems
                .first()
                .map(|p| format!("\n{p}"))
                .unwrap_or_default()
        ));
    }
    let n = opened.socks.len();
    let rooms_of: Vec<usize> = (0..n).map(|i| i % rooms.len()).collect();
    let mut members = vec![0u64; rooms.len()];
    for &r in &rooms_of {
        members[r] += 1;
    }
    let paced = o.rate > 0.0;
    let pad = "x".repeat(o.body_bytes.saturating_sub(24));
    let senders: Vec<Option<SenderState>> = (0..n)
        .map(|i| {
            (i < o.senders).then(|| SenderState {
                idx: i,
                room_json: serde_json::to_string(&rooms[rooms_of[i]]).unwrap_or_default(),
                pad: pad.clone(),
                window: o.window,
                interval: paced.then(|| Duration::from_secs_f64(o.senders as f64 / o.rate)),
                next_due: None,
                next_seq: 0,
                inflight: HashMap::new(),
                sent: 0,
                acked: 0,
            })
        })
        .collect();
    let sh = Arc::new(Shared {
        base: Instant::now(),
        phase: AtomicU8::new(WARM),
        t0_us: AtomicU64::new(0),
        rate: o.rate,
        poll: o.poll,
        ping_epoch: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        pongs: AtomicU64::new(0),
    });
    let workers = spawn_workers(opened.socks, &rooms_of, senders, o.workers, o.senders, &sh)?;
    thread::sleep(Duration::from_millis(500)); // drain presence events

    let pid = t.pid.clone();
    let cpu0 = cpu_now(pid.as_deref());
    let t0_us = sh.now_us();
    sh.t0_us.store(t0_us, Ordering::SeqCst);
    sh.phase.store(SEND, Ordering::SeqCst);
    let t0 = sh.base + Duration::from_micros(t0_us);
    let end = t0 + o.secs;
    // The login flood runs for exactly the sending phase (the limit is a safety net).
    let mut flood = (o.login_flood > 0)
        .then(|| Flood::start(addr, o.login_flood, o.secs + Duration::from_secs(5)));
    if let Some(f) = &flood {
        println!(
            "login flood: {} clients hammering POST /api/login during the sending phase",
            f.clients
        );
    }
    let mut flood_last = [0u64; 5];
    let mut last = (0u64, 0u64, 0u64, Instant::now());
    let mut tick = t0 + Duration::from_secs(1);
    while Instant::now() < end {
        let now = Instant::now();
        if now >= tick {
            tick += Duration::from_secs(1);
            let (s, a, d) = (
                sh.sent.load(Ordering::Relaxed),
                sh.acks.load(Ordering::Relaxed),
                sh.deliveries.load(Ordering::Relaxed),
            );
            let dt = now.duration_since(last.3).as_secs_f64();
            let flood_cell = match &flood {
                Some(f) => {
                    let cur = [
                        f.started.load(Ordering::Relaxed),
                        f.answers[0].load(Ordering::Relaxed),
                        f.answers[1].load(Ordering::Relaxed),
                        f.answers[2].load(Ordering::Relaxed),
                        f.answers[3].load(Ordering::Relaxed),
                    ];
                    let r = |k: usize| thousands(((cur[k] - flood_last[k]) as f64 / dt) as u64);
                    let c = format!(
                        "  | flood {}/s: 401 {}/s, 429 {}/s, other {}/s, failed {}/s",
                        r(0),
                        r(1),
                        r(2),
                        r(3),
                        r(4)
                    );
                    flood_last = cur;
                    c
                }
                None => String::new(),
            };
            println!(
                "  t={:>4.1}s  sent {:>8}/s  acked {:>8}/s  delivered {:>9}/s  closed sockets {}{flood_cell}",
                now.duration_since(t0).as_secs_f64(),
                thousands(((s - last.0) as f64 / dt) as u64),
                thousands(((a - last.1) as f64 / dt) as u64),
                thousands(((d - last.2) as f64 / dt) as u64),
                sh.closed.load(Ordering::Relaxed)
            );
            last = (s, a, d, now);
            if t.server.as_mut().is_some_and(|s| s.exited().is_some()) {
                break;
            }
        }
        thread::sleep(
            end.min(tick)
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        );
    }
    sh.phase.store(DRAIN, Ordering::SeqCst);
    if let Some(f) = flood.as_mut() {
        f.stop_flood();
    }
    let stop_at = Instant::now();
    let window_secs = stop_at.duration_since(t0).as_secs_f64();
    let cpu1 = cpu_now(pid.as_deref());
    let (acked_w, deliv_w) = (
        sh.acks.load(Ordering::SeqCst),
        sh.deliveries.load(Ordering::SeqCst),
    );
    // Drain: wait for outstanding acks and deliveries (bounded).
    let factor = members.iter().sum::<u64>() / rooms.len() as u64;
    let drain_deadline = stop_at + Duration::from_secs(10);
    let mut last_change = (sh.deliveries.load(Ordering::SeqCst), Instant::now());
    while Instant::now() < drain_deadline {
        let s = sh.sent.load(Ordering::SeqCst);
        let a = sh.acks.load(Ordering::SeqCst);
        let e = sh.send_errors.load(Ordering::SeqCst);
        let d = sh.deliveries.load(Ordering::SeqCst);
        if a + e >= s && d >= a * factor {
            break;
        }
        if d != last_change.0 {
            last_change = (d, Instant::now());
        } else if last_change.1.elapsed() > Duration::from_secs(3) && a + e >= s {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let drain_secs = stop_at.elapsed().as_secs_f64();
    sh.phase.store(STOP, Ordering::SeqCst);
    let (mut st, conns) = join_workers(workers);
    let flood = flood.map(|f| (f.clients, f.join()));
    check_server(t, &mut problems);

    // Expected deliveries: every acknowledged message reaches every member of its room.
    let mut acked_per_room = vec![0u64; rooms.len()];
    for &(_, room, acked) in &st.senders {
        acked_per_room[room] += acked;
    }
    let expected: u64 = (0..rooms.len())
        .map(|r| acked_per_room[r] * members[r])
        .sum();
    let short_socks = st
        .received
        .iter()
        .filter(|(room, got)| *got < acked_per_room[*room])
        .count();
    let lost = expected.saturating_sub(st.deliveries);

    println!();
    match &flood {
        Some((clients, _)) => println!(
            "results (everything below was measured UNDER A LOGIN FLOOD of {clients} clients, server bcrypt cost {}):",
            server_cost(o)
        ),
        None => println!("results:"),
    }
    println!(
        "  messages:     {} sent, {} acknowledged, {} answered with an error, {} unanswered after a {:.1} s drain",
        thousands(st.sent),
        thousands(st.acks),
        st.send_errors,
        st.sent.saturating_sub(st.acks + st.send_errors),
        drain_secs
    );
    if st.pacer_skipped > 0 {
        println!(
            "  pacer:        {} sends skipped because the loadgen fell > 1 s behind",
            st.pacer_skipped
        );
    }
    println!(
        "  deliveries:   {} expected (acked messages x room members), {} received, {} missing, {} sockets short",
        thousands(expected),
        thousands(st.deliveries),
        thousands(lost),
        short_socks
    );
    println!(
        "  sending window: {window_secs:.2} s; in it {} msgs acked/s, {} deliveries/s",
        thousands((acked_w as f64 / window_secs) as u64),
        thousands((deliv_w as f64 / window_secs) as u64)
    );
    println!("  send->receive latency: {}", lat_line(&mut st.lat_us));
    println!("  ack latency:           {}", lat_line(&mut st.ack_lat_us));
    if st.by_sec.len() > 1 {
        let cells: Vec<String> = st
            .by_sec
            .iter()
            .map(|(n, max, over)| {
                if *over > 0 {
                    format!(
                        "{:.0}ms({:.1}%>50ms)",
                        *max as f64 / 1e3,
                        100.0 * *over as f64 / *n as f64
                    )
                } else {
                    format!("{:.0}ms", *max as f64 / 1e3)
                }
            })
            .collect();
        println!("  max latency by second of send time: {}", cells.join(" "));
    }
    cpu_report(
        &cpu0,
        &cpu1,
        Some(if o.scenario == Scenario::Acks {
            (acked_w, "acked message")
        } else {
            (deliv_w, "delivery")
        }),
    );
    if let Some((clients, (mut fs, secs))) = flood {
        flood_report(&mut fs, clients, secs, &server_cost(o));
    }
    drop(conns);
    print_problems(&problems, Some(&st));

    println!();
    let ok = match o.scenario {
        Scenario::Fanout => {
            let p99 = pct_ms(&st.lat_us, 99.0);
            let ok1 = p99 < 50.0;
            let ok2 = lost == 0 && st.acks > 0 && st.acks == st.sent;
            println!(
                "verdict:  p99 send->receive {p99:.2} ms (target < 50 ms): {}",
                verdict(ok1)
            );
            println!(
                "          nothing lost ({} of {} deliveries, {} of {} messages acked): {}",
                thousands(st.deliveries),
                thousands(expected),
                thousands(st.acks),
                thousands(st.sent),
                verdict(ok2)
            );
            ok1 && ok2
        }
        Scenario::Burst => {
            let rate = deliv_w as f64 / window_secs;
            let ok1 = rate >= 250_000.0;
            println!(
                "verdict:  {} deliveries/s (target >= 250,000): {}",
                thousands(rate as u64),
                verdict(ok1)
            );
            if lost > 0 {
                println!(
                    "          {} deliveries missing after the drain: FAIL",
                    thousands(lost)
                );
            }
            ok1 && lost == 0
        }
        Scenario::Acks => {
            let rate = acked_w as f64 / window_secs;
            let ok1 = rate >= 5000.0;
            println!(
                "verdict:  {} acknowledged messages/s from {} senders (target >= 5,000): {}",
                thousands(rate as u64),
                o.senders,
                verdict(ok1)
            );
            ok1
        }
        Scenario::Idle | Scenario::Storm => unreachable!(),
    };
    if o.login_flood > 0 {
        println!(
            "          (the {} figures above were measured under the login flood of {} clients)",
            o.scenario.name(),
            o.login_flood
        );
    }
    Ok(ok && problems.is_empty())
}

fn idle(o: &Opts, t: &mut Target, rid: &str) -> Result<bool, String> {
    let addr = t.addr;
    let mut problems = Vec::new();
    let users = o.sockets.div_ceil(o.per_user);
    let ts = Instant::now();
    let tokens = make_accounts(addr, rid, users, &o.password, o.connectors)?;
    println!(
        "setup:    {users} accounts registered and logged in ({:.1} s)",
        ts.elapsed().as_secs_f64()
    );
    let pid = t.pid.clone();
    thread::sleep(Duration::from_secs(1));
    let p = pid.as_deref();
    let (rss0, thr0, fd0) = (p.and_then(rss_kib), p.and_then(threads), p.and_then(fds));
    let rooms = vec![o.room.clone()];
    let opened = open_sockets(
        &t.nodes,
        &tokens,
        o.per_user,
        &rooms,
        o.sockets,
        o.connectors,
    );
    let n = opened.socks.len();
    let mut hs = opened.handshake_us.clone();
    let mut js = opened.join_us.clone();
    hs.sort_unstable();
    js.sort_unstable();
    println!(
        "          {n} sockets open and joined in {:.1} s; upgrade p50 {:.2} ms p99 {:.2} ms, join p50 {:.2} ms p99 {:.2} ms",
        opened.elapsed.as_secs_f64(),
        pct_ms(&hs, 50.0),
        pct_ms(&hs, 99.0),
        pct_ms(&js, 50.0),
        pct_ms(&js, 99.0)
    );
    if let Some((i, e)) = &opened.failure {
        println!("          stopped at socket {i} of {}: {e}", o.sockets);
        problems.push(format!(
            "socket {i} (after {n} open) could not be opened: {e}"
        ));
    }
    if n == 0 {
        check_server(t, &mut problems);
        print_problems(&problems, None);
        return Err("no socket could be opened".into());
    }
    let rooms_of = vec![0usize; n];
    let senders = (0..n).map(|_| None).collect();
    let sh = Arc::new(Shared {
        base: Instant::now(),
        phase: AtomicU8::new(WARM),
        t0_us: AtomicU64::new(0),
        rate: 0.0,
        poll: o.poll,
        ping_epoch: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        pongs: AtomicU64::new(0),
    });
    let workers = spawn_workers(opened.socks, &rooms_of, senders, o.workers, 0, &sh)?;
    // Let presence settle and idle pool threads of the server go.
    thread::sleep(Duration::from_secs(2));
    let (rss1, thr1, fd1) = (p.and_then(rss_kib), p.and_then(threads), p.and_then(fds));
    let cpu_a = cpu_now(p);
    println!("holding {n} sockets for {:.1} s ...", o.hold.as_secs_f64());
    thread::sleep(o.hold);
    let cpu_b = cpu_now(p);
    let (rss2, thr2, fd2) = (p.and_then(rss_kib), p.and_then(threads), p.and_then(fds));
    // Liveness: every socket should still answer a ping.
    let tp = Instant::now();
    let open_before_ping = n as u64 - sh.closed.load(Ordering::SeqCst);
    sh.ping_epoch.store(1, Ordering::SeqCst);
    while tp.elapsed() < Duration::from_secs(15)
        && sh.pongs.load(Ordering::SeqCst) < open_before_ping
    {
        thread::sleep(Duration::from_millis(20));
    }
    let ping_secs = tp.elapsed().as_secs_f64();
    sh.phase.store(STOP, Ordering::SeqCst);
    let (st, conns) = join_workers(workers);
    check_server(t, &mut problems);

    println!();
    println!("results:");
    let kib = |v: Option<u64>| v.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let cnt = |v: Option<usize>| v.map_or("n/a".into(), |k| k.to_string());
    println!(
        "  server RSS:     before {}  after open {}  after hold {}",
        kib(rss0),
        kib(rss1),
        kib(rss2)
    );
    println!(
        "  server threads: before {}  after open {}  after hold {}",
        cnt(thr0),
        cnt(thr1),
        cnt(thr2)
    );
    println!(
        "  server fds:     before {}  after open {}  after hold {}",
        cnt(fd0),
        cnt(fd1),
        cnt(fd2)
    );
    let mut ok = true;
    match (rss0, rss2, thr0, thr2) {
        (Some(r0), Some(r2), Some(t0), Some(t2)) => {
            let per = (r2 as f64 - r0 as f64) / n as f64;
            let tper = (t2 as f64 - t0 as f64) / n as f64;
            println!(
                "  per socket:     {per:.1} KiB RSS, {tper:.2} threads{}",
                match (fd0, fd2) {
                    (Some(a), Some(b)) => format!(", {:.2} fds", (b as f64 - a as f64) / n as f64),
                    _ => String::new(),
                }
            );
            cpu_report(&cpu_a, &cpu_b, None);
            println!(
                "  liveness:       {} of {} sockets answered a ping within {ping_secs:.1} s; {} open at the end",
                st.pongs, open_before_ping, st.open_at_end
            );
            if st.pongs < open_before_ping {
                problems.push(format!(
                    "{} sockets did not answer a ping",
                    open_before_ping - st.pongs
                ));
            }
            if let Some(me) = rss_kib("self") {
                println!("  loadgen RSS:    {:.1} MiB", me as f64 / 1024.0);
            }
            drop(conns);
            print_problems(&problems, Some(&st));
            println!();
            let ok1 = per < 40.0;
            let ok2 = tper <= 2.0;
            println!(
                "verdict:  {per:.1} KiB RSS per socket (target < 40): {}",
                verdict(ok1)
            );
            println!(
                "          {tper:.2} server threads per socket (target <= 2): {}",
                verdict(ok2)
            );
            if n < o.sockets {
                println!(
                    "          only {n} of {} sockets could be opened: FAIL (see problems above)",
                    o.sockets
                );
                ok = false;
            }
            ok = ok && ok1 && ok2;
        }
        _ => {
            println!(
                "  (no server pid: RSS and threads not measured; pass --server-pid with --addr)"
            );
            println!(
                "  liveness:       {} of {} sockets answered a ping within {ping_secs:.1} s",
                st.pongs, open_before_ping
            );
            drop(conns);
            print_problems(&problems, Some(&st));
            ok = n == o.sockets;
        }
    }
    Ok(ok && problems.is_empty())
}

// ---------------------------------------------------------------------------------------
// the storm: every client connects at once, and again after a kill -9
//
// Each client is a small state machine on a non-blocking socket, driven by the epoll
// workers from the first connect on (connect, upgrade, join, live, and after the kill:
// wait a random jitter, reconnect, re-join with `since`, send once), so thousands of
// handshakes can be in flight without a thread each.

/// Storm phases, set by the main thread.
const S_IDLE: u8 = 0;
const S_STORM: u8 = 1;
const S_SEND: u8 = 2;
const S_KILL: u8 = 3;
const S_STOP: u8 = 4;

/// Progress counters the workers publish (index into `StormShared::ctr`).
const C_UPGRADED: usize = 0;
const C_JOINED: usize = 1;
const C_REUPGRADED: usize = 2;
const C_REJOINED: usize = 3;
const C_RESENT: usize = 4;
const C_FRAMES: usize = 5;
const C_PRESENCE: usize = 6;
const C_PBATCH: usize = 7;
const C_MESSAGES: usize = 8;
const C_SENT: usize = 9;
const C_ACKS: usize = 10;
const C_DROPS: usize = 11;
const C_ATTEMPTS: usize = 12;
const C_FAILS: usize = 13;
const NC: usize = 14;

/// Longest one connect + upgrade + join may take before the attempt counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

struct StormShared {
    base: Instant,
    addr: SocketAddr,
    room_json: String,
    presence: &'static str,
    resend_room: bool,
    jitter: Duration,
    rate: f64,
    /// Handshakes in flight per worker during the storm.
    inflight: usize,
    phase: AtomicU8,
    /// Set just before the kill: from then on a lost connection means "reconnect"
    /// (the senders keep sending until their connection drops).
    armed: AtomicBool,
    /// When sending started, µs since `base`.
    t0_us: AtomicU64,
    ctr: [AtomicU64; NC],
    /// Presence-view snapshots: the main thread bumps `snap_req`; each worker counts
    /// its joined clients whose view is `snap_want` users, notes the others, and bumps
    /// `snap_done`.
    snap_req: AtomicU64,
    snap_done: AtomicU64,
    snap_want: AtomicU64,
    snap_ok: AtomicU64,
    snap_wrong: Mutex<Vec<(usize, i64)>>,
}

impl StormShared {
    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
    fn get(&self, k: usize) -> u64 {
        self.ctr[k].load(Ordering::Relaxed)
    }
    /// Asks every worker for its clients' presence views; returns (right, wrong ones).
    fn views(&self, want: usize, workers: usize) -> (u64, Vec<(usize, i64)>) {
        self.snap_ok.store(0, Ordering::SeqCst);
        if let Ok(mut w) = self.snap_wrong.lock() {
            w.clear();
        }
        self.snap_want.store(want as u64, Ordering::SeqCst);
        let done = self.snap_done.load(Ordering::SeqCst);
        self.snap_req.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        while self.snap_done.load(Ordering::SeqCst) < done + workers as u64
            && t.elapsed() < Duration::from_secs(10)
        {
            thread::sleep(Duration::from_millis(2));
        }
        let wrong = self
            .snap_wrong
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default();
        (self.snap_ok.load(Ordering::SeqCst), wrong)
    }

    fn frames(&self) -> [u64; 4] {
        [
            self.get(C_FRAMES),
            self.get(C_PRESENCE),
            self.get(C_PBATCH),
            self.get(C_MESSAGES),
        ]
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cs {
    /// Not started yet (waits for a free in-flight slot in the storm).
    Pending,
    /// Waiting until `due` to connect (jitter after the kill, or backoff after a failure).
    Backoff,
    /// Non-blocking connect in progress.
    Connecting,
    /// Upgrade request written, reading the response head.
    Upgrading,
    /// `join` sent, waiting for `joined`.
    Joining,
    Live,
}

struct StormSender {
    interval: Duration,
    next_due: Option<Instant>,
    seq: u64,
    /// seq -> send time (µs since base) of messages not yet acked.
    inflight: HashMap<u64, u64>,
    /// (seq, message id) of every acked message, before the kill.
    acked: Vec<(u64, i64)>,
    sent: u64,
    skipped: u64,
    errors: u64,
}

/// What a client's one message after the rejoin came to.
#[derive(Clone, Debug, PartialEq)]
enum Resend {
    NotYet,
    /// Sent at (µs since base), no answer yet.
    Sent(u64),
    /// Acked with this id at (µs since base).
    Acked(i64, u64),
    Failed(String),
}

struct StormClient {
    idx: usize,
    name: String,
    token: String,
    state: Cs,
    sock: Option<TcpStream>,
    key: String,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    frag: Vec<u8>,
    frag_op: u8,
    due: Instant,
    /// The current attempt: when it started, when TCP connected, when the 101 came.
    attempt_us: u64,
    conn_us: u64,
    up_us: u64,
    /// Failed attempts in a row (for the backoff).
    fails: u32,
    /// 0 before the kill, 1 after this client lost its connection to the kill.
    round: usize,
    /// Per round, of the last successful attempt: (start, TCP connected, 101, joined).
    times: [(u64, u64, u64, u64); 2],
    joined: [bool; 2],
    /// Connect attempts after the kill.
    reattempts: u32,
    /// The highest message id seen, and the one the first rejoin asked `since`.
    last_id: i64,
    since: Option<i64>,
    /// Every room message id received, with its arrival time (µs since base).
    ids: Vec<(i64, u64)>,
    /// How many of `ids` had arrived when the kill cut this client off.
    ids_at_kill: usize,
    /// Room messages that did not have a higher id than the one before (duplicate or
    /// out of order).
    disorder: u32,
    /// Online users as this client's frames tell it: `joined.online`, then presence
    /// (applied as set updates, as a real client does).
    view: View,
    sender: Option<StormSender>,
    resend: Resend,
}

/// A client reached `joined`; sent to the main thread for the live report.
struct JoinedEv {
    round: usize,
    times: (u64, u64, u64, u64),
}

#[derive(Default)]
struct StormStats {
    /// Failed connect attempts by (round, reason).
    fails: BTreeMap<(usize, String), u64>,
    /// Connections lost before the kill, by reason.
    early_drops: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    error_samples: Vec<String>,
    other: BTreeMap<String, u64>,
    masked: u64,
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never zero
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The `type` of a server frame, without a full parse. Our server sorts JSON keys, so
/// `type` is near the end; look there first.
fn frame_type(p: &[u8]) -> &[u8] {
    const KEY: &[u8] = b"\"type\":\"";
    let tail = p.len().saturating_sub(48);
    let at = find(&p[tail..], KEY)
        .map(|i| tail + i)
        .or_else(|| find(p, KEY));
    match at {
        Some(i) => {
            let rest = &p[i + KEY.len()..];
            let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
            &rest[..end]
        }
        None => b"",
    }
}

/// The set of load-generator users (`lg<run>_<index>`) a client believes online, as
/// bits by index.
#[derive(Default)]
struct View {
    bits: Vec<u64>,
    count: i64,
    /// `"lg<run>_`, learnt from the first name read the slow way: the names that start
    /// with it are then read with no search at all.
    prefix: Vec<u8>,
}

impl View {
    /// Marks online (or offline) every user named in the JSON string list (or single
    /// string) after `key`.
    fn apply(&mut self, p: &[u8], key: &[u8], online: bool) {
        let Some(i) = find(p, key) else { return };
        let rest = &p[i + key.len()..];
        // A list ends at `]`, a single string at `,` or `}`; inside a list, names are
        // read by `quick_name`, or cut at commas when they do not fit it.
        let end = if key.ends_with(b"[") {
            memchr::memchr(b']', rest)
        } else {
            memchr::memchr2(b',', b'}', rest)
        };
        let mut list = &rest[..end.unwrap_or(rest.len())];
        while !list.is_empty() {
            if let Some((idx, used)) = quick_name(list, &self.prefix) {
                self.set(idx, online);
                list = &list[used..];
                continue;
            }
            let (name, next) = match first_comma(list) {
                Some(at) => (&list[..at], &list[at + 1..]),
                None => (list, &list[list.len()..]),
            };
            if let Some(idx) = user_index(name) {
                self.learn(name);
                self.set(idx, online);
            }
            list = next;
        }
    }

    /// Keeps `name`'s `"lg<run>_` for [`quick_name`], if none is kept yet and the name
    /// is written plainly (quoted, no spaces).
    fn learn(&mut self, name: &[u8]) {
        if !self.prefix.is_empty() || !name.starts_with(b"\"") || !name.ends_with(b"\"") {
            return;
        }
        if let Some(us) = name.iter().rposition(|&b| b == b'_') {
            self.prefix = name[..=us].to_vec();
        }
    }

    fn set(&mut self, idx: usize, online: bool) {
        if self.bits.len() <= idx / 64 {
            self.bits.resize(idx / 64 + 1, 0);
        }
        let (w, bit) = (&mut self.bits[idx / 64], 1u64 << (idx % 64));
        let was = *w & bit != 0;
        match (was, online) {
            (false, true) => {
                *w |= bit;
                self.count += 1;
            }
            (true, false) => {
                *w &= !bit;
                self.count -= 1;
            }
            _ => {}
        }
    }
}

/// The user index of the name at the start of `list` when it is written exactly
/// `<prefix><digits>"` and followed by `,` or the list's end, with the bytes it takes
/// (its comma included); `None` sends the name the slow way ([`first_comma`],
/// [`user_index`]).
///
/// A storm delivers about 25 million names, and the load generator shares the
/// server's cores: searching each name's end and then its `_` cost about 30 cycles a
/// name, a third of the machine's CPU with the other parsing it did then.
fn quick_name(list: &[u8], prefix: &[u8]) -> Option<(usize, usize)> {
    if prefix.is_empty() {
        return None;
    }
    let digits = list.strip_prefix(prefix)?;
    let (mut n, mut len) = (0usize, 0);
    while let Some(&b @ b'0'..=b'9') = digits.get(len) {
        if len == 9 {
            return None;
        }
        n = n * 10 + usize::from(b - b'0');
        len += 1;
    }
    if len == 0 || digits.get(len) != Some(&b'"') {
        return None;
    }
    let used = prefix.len() + len + 1;
    match list.get(used) {
        None => Some((n, used)),
        Some(b',') => Some((n, used + 1)),
        Some(_) => None,
    }
}

/// Where the first `,` in `b` is: eight bytes at a time (a zero byte of `w ^ commas`
/// marks a comma), then byte by byte for the tail. A `memchr` call per name cost more
/// in its setup than such a short search.
fn first_comma(b: &[u8]) -> Option<usize> {
    const COMMAS: u64 = u64::from_ne_bytes([b','; 8]);
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut chunks = b.chunks_exact(8);
    let mut at = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ COMMAS;
        let zero = x.wrapping_sub(LOW) & !x & HIGH;
        if zero != 0 {
            return Some(at + (zero.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == b',')
        .map(|p| at + p)
}

/// The index of a `"lg<run>_<index>"` user name (quotes and spaces allowed around it).
/// Byte by byte, with no UTF-8 check: a storm's `joined` replies carry millions of
/// names, and parsing them was most of the load generator's CPU.
fn user_index(name: &[u8]) -> Option<usize> {
    let name = name.trim_ascii();
    let name = name.strip_prefix(b"\"").unwrap_or(name);
    let name = name.strip_suffix(b"\"").unwrap_or(name);
    if !name.starts_with(b"lg") {
        return None;
    }
    // The digits after the last `_`, read back from the end in one pass.
    let (mut n, mut scale, mut digits) = (0usize, 1usize, 0);
    for &b in name.iter().rev() {
        match b {
            b'0'..=b'9' if digits < 9 => {
                n += usize::from(b - b'0') * scale;
                scale *= 10;
                digits += 1;
            }
            b'_' if digits > 0 => return Some(n),
            _ => return None,
        }
    }
    None
}

/// The integer after `key` (e.g. `"id":`).
fn int_after(p: &[u8], key: &[u8]) -> Option<i64> {
    let i = find(p, key)?;
    let rest = &p[i + key.len()..];
    let mut n: i64 = 0;
    let mut digits = 0;
    for &b in rest.iter().skip_while(|b| b.is_ascii_whitespace()) {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add((b - b'0') as i64)?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

struct StormWorker {
    ep: rustix::fd::OwnedFd,
    cl: Vec<StormClient>,
    sh: Arc<StormShared>,
    rng: Rng,
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, usize)>>,
    /// Next client that has never been started.
    next_pending: usize,
    /// Clients started in the storm that have not joined yet.
    inflight: usize,
    again: Vec<usize>,
    scratch: Vec<u8>,
    local: [u64; NC],
    published: [u64; NC],
    st: StormStats,
    tx: mpsc::Sender<JoinedEv>,
    senders: Vec<usize>,
}

impl StormWorker {
    fn bump(&mut self, k: usize) {
        self.local[k] += 1;
    }

    fn publish(&mut self) {
        for k in 0..NC {
            if self.local[k] != self.published[k] {
                self.sh.ctr[k].fetch_add(self.local[k] - self.published[k], Ordering::Relaxed);
                self.published[k] = self.local[k];
            }
        }
    }

    fn arm(&mut self, i: usize, after: Duration) {
        let due = Instant::now() + after;
        let c = &mut self.cl[i];
        c.state = Cs::Backoff;
        c.due = due;
        self.timers.push(std::cmp::Reverse((due, i)));
    }

    /// Forgets the socket (if any) and everything half-read on it.
    fn drop_socket(&mut self, i: usize) {
        let c = &mut self.cl[i];
        if let Some(s) = c.sock.take() {
            let _ = epoll::delete(&self.ep, &s);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        c.inbuf = Vec::new();
        c.out.clear();
        c.frag.clear();
    }

    /// A connect attempt failed: back off exponentially (100 ms doubling, at most 1 s,
    /// times a random 0.5-1.5) and try again.
    fn fail_attempt(&mut self, i: usize, why: String) {
        self.drop_socket(i);
        let round = self.cl[i].round;
        *self.st.fails.entry((round, why)).or_default() += 1;
        self.bump(C_FAILS);
        let c = &mut self.cl[i];
        c.fails += 1;
        let base = (0.1 * 2f64.powi(c.fails.min(10) as i32 - 1)).min(1.0);
        let wait = base * (0.5 + self.rng.unit());
        self.arm(i, Duration::from_secs_f64(wait));
    }

    /// A joined (or joining) connection was lost. After the kill that is expected: wait a
    /// random jitter and reconnect. Before it, note why, and reconnect the same way.
    fn lost(&mut self, i: usize, why: String) {
        let state = self.cl[i].state;
        if matches!(state, Cs::Connecting | Cs::Upgrading) {
            return self.fail_attempt(i, why);
        }
        if state != Cs::Live && state != Cs::Joining {
            return;
        }
        self.drop_socket(i);
        self.bump(C_DROPS);
        let killed = self.sh.armed.load(Ordering::Relaxed);
        let c = &mut self.cl[i];
        if killed && c.round == 0 {
            c.round = 1;
            c.since = Some(c.last_id);
            c.ids_at_kill = c.ids.len();
            let jitter = self.sh.jitter.as_secs_f64() * self.rng.unit();
            self.arm(i, Duration::from_secs_f64(jitter));
        } else {
            if !killed {
                *self.st.early_drops.entry(why).or_default() += 1;
            }
            let jitter = self.sh.jitter.as_secs_f64() * self.rng.unit();
            self.arm(i, Duration::from_secs_f64(jitter.max(0.05)));
        }
    }

    fn start_connect(&mut self, i: usize) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let now_us = self.sh.now_us();
        if self.cl[i].round == 1 {
            self.cl[i].reattempts += 1;
            self.bump(C_ATTEMPTS);
        }
        {
            let c = &mut self.cl[i];
            c.attempt_us = now_us;
            c.conn_us = 0;
            c.up_us = 0;
            c.due = Instant::now() + HANDSHAKE_TIMEOUT;
            c.inbuf = Vec::new();
            c.out.clear();
        }
        let family = if self.sh.addr.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = match rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        ) {
            Ok(fd) => fd,
            Err(e) => {
                return self.fail_attempt(i, format!("socket: {:?}", io::Error::from(e).kind()))
            }
        };
        let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
        let r = rustix::net::connect(&fd, &self.sh.addr);
        let sock = TcpStream::from(fd);
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        match r {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {
                if let Err(e) =
                    epoll::add(&self.ep, &sock, epoll::EventData::new_u64(i as u64), flags)
                {
                    return self.fail_attempt(i, format!("epoll add: {e}"));
                }
                self.cl[i].sock = Some(sock);
                self.cl[i].state = Cs::Connecting;
                if r.is_ok() {
                    self.connected(i);
                }
            }
            Err(e) => self.fail_attempt(i, format!("connect: {:?}", io::Error::from(e).kind())),
        }
    }

    /// TCP is up: send the upgrade request.
    fn connected(&mut self, i: usize) {
        let now_us = self.sh.now_us();
        let addr = self.sh.addr;
        let c = &mut self.cl[i];
        c.conn_us = now_us;
        c.key = tungstenite::handshake::client::generate_key();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {}\r\n\r\n",
            c.key, c.token
        );
        c.out.extend_from_slice(req.as_bytes());
        c.state = Cs::Upgrading;
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.cl[i];
        let Some(sock) = c.sock.as_ref() else {
            c.out.clear();
            return;
        };
        let mut written = 0;
        let mut err = None;
        while written < c.out.len() {
            match (&*sock).write(&c.out[written..]) {
                Ok(0) => {
                    err = Some("write returned 0".to_string());
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    err = Some(format!("write error: {:?}", e.kind()));
                    break;
                }
            }
        }
        c.out.drain(..written);
        if let Some(e) = err {
            self.lost(i, e);
        }
    }

    fn send_text(&mut self, i: usize, text: &str) {
        encode_frame(&mut self.cl[i].out, 1, text.as_bytes());
        self.flush(i);
    }

    fn send_join(&mut self, i: usize) {
        let c = &self.cl[i];
        let mut j = format!("{{\"type\":\"join\",\"room\":{}", self.sh.room_json);
        if self.sh.presence != "each" {
            j.push_str(&format!(",\"presence\":\"{}\"", self.sh.presence));
        }
        if c.joined[0] {
            // A rejoin: everything after the last message seen.
            j.push_str(&format!(",\"since\":{}", c.last_id));
        }
        j.push('}');
        self.cl[i].state = Cs::Joining;
        self.send_text(i, &j);
    }

    /// After the rejoin: one message, acked. The senders (or everyone with
    /// `--resend room`) post to the room; the others send a DM to themselves.
    fn send_resend(&mut self, i: usize) {
        let c = &self.cl[i];
        if matches!(c.resend, Resend::Acked(..)) {
            return;
        }
        let body = format!("st|r|{}", c.idx);
        let msg = if self.sh.resend_room || c.sender.is_some() {
            format!(
                "{{\"type\":\"send\",\"room\":{},\"body\":\"{body}\",\"ref\":\"r\"}}",
                self.sh.room_json
            )
        } else {
            format!(
                "{{\"type\":\"dm\",\"to\":\"{}\",\"body\":\"{body}\",\"ref\":\"r\"}}",
                c.name
            )
        };
        self.cl[i].resend = Resend::Sent(self.sh.now_us());
        self.send_text(i, &msg);
    }

    /// Paced senders: send what is due; returns the next due time.
    fn pace(&mut self, i: usize, now: Instant) -> Option<Instant> {
        let t0 = self.sh.base + Duration::from_micros(self.sh.t0_us.load(Ordering::Relaxed));
        let room_json = self.sh.room_json.clone();
        let rate = self.sh.rate;
        let now_us = self.sh.now_us();
        let c = &mut self.cl[i];
        if c.state != Cs::Live || c.round != 0 {
            return None;
        }
        let idx = c.idx;
        let s = c.sender.as_mut()?;
        let mut due = *s
            .next_due
            .get_or_insert_with(|| t0 + Duration::from_secs_f64(idx as f64 / rate));
        let mut n = 0u64;
        while due <= now {
            if now.duration_since(due) > Duration::from_secs(1) {
                let skip =
                    (now.duration_since(due).as_secs_f64() / s.interval.as_secs_f64()) as u32;
                s.skipped += skip as u64;
                due += s.interval * skip.max(1);
                continue;
            }
            n += 1;
            due += s.interval;
        }
        s.next_due = Some(due);
        for _ in 0..n {
            let seq = s.seq;
            s.seq += 1;
            s.sent += 1;
            s.inflight.insert(seq, now_us);
            let msg = format!(
                "{{\"type\":\"send\",\"room\":{room_json},\"body\":\"st|{idx}|{seq}\",\"ref\":\"{seq}\"}}"
            );
            encode_frame(&mut c.out, 1, msg.as_bytes());
        }
        if n > 0 {
            self.local[C_SENT] += n;
            self.flush(i);
        }
        Some(due)
    }

    fn on_joined(&mut self, i: usize, p: &[u8]) {
        let now_us = self.sh.now_us();
        let c = &mut self.cl[i];
        if c.state != Cs::Joining {
            *self.st.other.entry("joined (unasked)".into()).or_default() += 1;
            return;
        }
        c.state = Cs::Live;
        c.fails = 0;
        c.view = View::default();
        match int_after(p, b"\"online_count\":") {
            Some(n) if self.sh.presence == "count" => c.view.count = n,
            _ => c.view.apply(p, b"\"online\":[", true),
        }
        let r = c.round;
        c.times[r] = (c.attempt_us, c.conn_us, c.up_us, now_us);
        let first = !c.joined[r];
        c.joined[r] = true;
        let ev = JoinedEv {
            round: r,
            times: c.times[r],
        };
        if first {
            if r == 0 {
                self.inflight = self.inflight.saturating_sub(1);
                self.bump(C_JOINED);
            } else {
                self.bump(C_REJOINED);
            }
            let _ = self.tx.send(ev);
        }
        if r == 1 {
            self.send_resend(i);
        }
    }

    fn on_ack_or_error(&mut self, i: usize, p: &[u8], is_ack: bool) {
        let v: Value = match serde_json::from_slice(p) {
            Ok(v) => v,
            Err(_) => {
                *self.st.other.entry("invalid JSON".into()).or_default() += 1;
                return;
            }
        };
        let now_us = self.sh.now_us();
        let reference = v.get("ref").and_then(Value::as_str).unwrap_or("");
        if !is_ack {
            let code = v
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            let text = v.get("message").and_then(Value::as_str).unwrap_or("");
            *self.st.errors.entry(code.clone()).or_default() += 1;
            if self.st.error_samples.len() < 5 {
                self.st
                    .error_samples
                    .push(format!("{code}: {text} (ref {reference:?})"));
            }
        }
        let c = &mut self.cl[i];
        if reference == "r" {
            c.resend = if is_ack {
                match v.get("id").and_then(Value::as_i64) {
                    Some(id) => {
                        self.local[C_RESENT] += 1;
                        Resend::Acked(id, now_us)
                    }
                    None => Resend::Failed("ack without id".into()),
                }
            } else {
                self.local[C_RESENT] += 1;
                Resend::Failed(format!("error {}", v.get("code").unwrap_or(&Value::Null)))
            };
            return;
        }
        let (Some(s), Ok(seq)) = (c.sender.as_mut(), reference.parse::<u64>()) else {
            *self
                .st
                .other
                .entry("answer to nothing we sent".into())
                .or_default() += 1;
            return;
        };
        if s.inflight.remove(&seq).is_none() {
            *self
                .st
                .other
                .entry("answer to nothing in flight".into())
                .or_default() += 1;
            return;
        }
        if is_ack {
            match v.get("id").and_then(Value::as_i64) {
                Some(id) => {
                    s.acked.push((seq, id));
                    self.local[C_ACKS] += 1;
                }
                None => {
                    *self.st.other.entry("ack without id".into()).or_default() += 1;
                }
            }
        } else {
            s.errors += 1;
        }
    }

    fn handle_text(&mut self, i: usize, p: &[u8]) {
        self.bump(C_FRAMES);
        match frame_type(p) {
            b"presence" => {
                self.bump(C_PRESENCE);
                let online = find(p, b"\"status\":\"online\"").is_some();
                self.cl[i].view.apply(p, b"\"user\":", online);
            }
            b"presence_count" => {
                self.bump(C_PBATCH);
                if let Some(n) = int_after(p, b"\"online_count\":") {
                    self.cl[i].view.count = n;
                }
            }
            b"presence_batch" => {
                self.bump(C_PBATCH);
                let view = &mut self.cl[i].view;
                view.apply(p, b"\"online\":[", true);
                view.apply(p, b"\"offline\":[", false);
            }
            b"message" => {
                self.bump(C_MESSAGES);
                let now_us = self.sh.now_us();
                match int_after(p, b"\"id\":") {
                    Some(id) => {
                        let c = &mut self.cl[i];
                        c.ids.push((id, now_us));
                        if id > c.last_id {
                            c.last_id = id;
                        } else {
                            c.disorder += 1;
                        }
                    }
                    None => {
                        *self
                            .st
                            .other
                            .entry("message without id".into())
                            .or_default() += 1
                    }
                }
            }
            b"joined" => self.on_joined(i, p),
            b"ack" => self.on_ack_or_error(i, p, true),
            b"error" => self.on_ack_or_error(i, p, false),
            t => {
                let t = String::from_utf8_lossy(t).into_owned();
                *self.st.other.entry(t).or_default() += 1;
            }
        }
    }

    fn handle_frame(&mut self, i: usize, opcode: u8, payload: &[u8]) {
        match opcode {
            1 => self.handle_text(i, payload),
            8 => {
                let d = close_desc(payload);
                let code = if payload.len() >= 2 {
                    &payload[..2]
                } else {
                    &[]
                };
                encode_frame(&mut self.cl[i].out, 8, code);
                self.flush(i);
                self.lost(i, format!("server sent {d}"));
            }
            9 => {
                encode_frame(&mut self.cl[i].out, 10, payload);
                self.flush(i);
            }
            10 => {}
            op => *self.st.other.entry(format!("opcode {op}")).or_default() += 1,
        }
    }

    /// The 101 (or a refusal) in `buf`; returns how many bytes the head took, or None
    /// when the attempt is over or the head is incomplete.
    fn upgrade_reply(&mut self, i: usize, buf: &[u8]) -> Option<usize> {
        let (status, headers, hlen) = match parse_head(buf) {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => {
                self.fail_attempt(i, e);
                return None;
            }
        };
        if status != 101 {
            self.fail_attempt(i, format!("upgrade refused: HTTP {status}"));
            return None;
        }
        let accept = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if accept != tungstenite::handshake::derive_accept_key(self.cl[i].key.as_bytes()) {
            self.fail_attempt(i, "bad Sec-WebSocket-Accept".into());
            return None;
        }
        self.cl[i].up_us = self.sh.now_us();
        self.bump(if self.cl[i].round == 0 {
            C_UPGRADED
        } else {
            C_REUPGRADED
        });
        self.send_join(i);
        Some(hlen)
    }

    /// Handles what `buf` holds: the upgrade reply, then whole frames. Returns how many
    /// bytes were used (the rest is an unfinished head or frame), or `None` when the
    /// client was lost on the way and nothing of it is to be kept.
    fn process(&mut self, i: usize, buf: &mut [u8]) -> Option<usize> {
        let mut off = 0;
        if self.cl[i].state == Cs::Upgrading {
            match self.upgrade_reply(i, buf) {
                Some(h) => off = h,
                None => return (self.cl[i].state == Cs::Upgrading).then_some(0),
            }
        }
        loop {
            if !matches!(self.cl[i].state, Cs::Joining | Cs::Live) {
                return None; // lost while handling a frame
            }
            let f = match parse_frame(&mut buf[off..]) {
                Ok(Some(f)) => f,
                Ok(None) => return Some(off),
                Err(e) => {
                    self.lost(i, format!("client saw a protocol error: {e}"));
                    return None;
                }
            };
            if f.masked {
                self.st.masked += 1;
            }
            let (ps, pe) = (off + f.start, off + f.end);
            off += f.end;
            if f.opcode == 0 || (!f.fin && f.opcode < 8) {
                let c = &mut self.cl[i];
                if f.opcode != 0 {
                    c.frag_op = f.opcode;
                    c.frag.clear();
                }
                c.frag.extend_from_slice(&buf[ps..pe]);
                if f.fin {
                    let op = c.frag_op;
                    let whole = std::mem::take(&mut c.frag);
                    self.handle_frame(i, op, &whole);
                }
            } else {
                self.handle_frame(i, f.opcode, &buf[ps..pe]);
            }
        }
    }

    /// Handles `n` bytes just read into `scratch`, after whatever was left over.
    ///
    /// Most reads end on a frame's end, so with nothing left over the frames are
    /// handled where they were read and only an unfinished one is kept. Copying every
    /// read into the client's own buffer first gave each of a storm's clients a buffer
    /// the size of its `joined` reply (tens of KiB, page-faulted in one by one).
    fn take_read(&mut self, i: usize, scratch: &mut [u8], n: usize) {
        if self.cl[i].inbuf.is_empty() {
            if let Some(used) = self.process(i, &mut scratch[..n]) {
                self.cl[i].inbuf.extend_from_slice(&scratch[used..n]);
            }
            return;
        }
        let mut buf = std::mem::take(&mut self.cl[i].inbuf);
        buf.extend_from_slice(&scratch[..n]);
        let Some(used) = self.process(i, &mut buf) else {
            return;
        };
        buf.drain(..used);
        if buf.is_empty() {
            buf = Vec::new();
        } else if buf.capacity() > 256 * 1024 && buf.len() < 64 * 1024 {
            buf.shrink_to(64 * 1024);
        }
        self.cl[i].inbuf = buf;
    }

    /// Reads what is available (edge-triggered) and handles it.
    fn on_readable(&mut self, i: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut reads = 0;
        while let Some(sock) = self.cl[i].sock.as_ref() {
            if reads >= 16 {
                self.again.push(i); // fairness: come back after the others
                break;
            }
            reads += 1;
            match (&*sock).read(&mut scratch) {
                Ok(0) => {
                    self.lost(
                        i,
                        "server closed the TCP connection without a close frame".into(),
                    );
                    break;
                }
                Ok(n) => self.take_read(i, &mut scratch, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.lost(i, format!("read error: {:?}", e.kind()));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    fn on_event(&mut self, i: usize, flags: epoll::EventFlags) {
        if self.cl[i].sock.is_none() {
            return;
        }
        if self.cl[i].state == Cs::Connecting {
            if !flags.intersects(
                epoll::EventFlags::OUT | epoll::EventFlags::ERR | epoll::EventFlags::HUP,
            ) {
                return;
            }
            let err = match self.cl[i]
                .sock
                .as_ref()
                .map(rustix::net::sockopt::socket_error)
            {
                Some(Ok(Ok(()))) => None,
                Some(Ok(Err(e))) => Some(format!("connect: {:?}", io::Error::from(e).kind())),
                Some(Err(e)) => Some(format!("SO_ERROR: {e}")),
                None => return,
            };
            match err {
                Some(e) => return self.fail_attempt(i, e),
                None => self.connected(i),
            }
            // Fall through: the reply may already be readable.
        }
        if flags.intersects(
            epoll::EventFlags::IN
                | epoll::EventFlags::RDHUP
                | epoll::EventFlags::HUP
                | epoll::EventFlags::ERR,
        ) {
            self.on_readable(i);
        }
        if flags.contains(epoll::EventFlags::OUT) && !self.cl[i].out.is_empty() {
            self.flush(i);
        }
    }

    fn run(mut self) -> (Vec<StormClient>, StormStats) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
        let mut last_scan = Instant::now();
        let mut snap = 0u64;
        loop {
            let phase = self.sh.phase.load(Ordering::Relaxed);
            if phase == S_STOP {
                break;
            }
            let req = self.sh.snap_req.load(Ordering::SeqCst);
            if req != snap {
                snap = req;
                self.snapshot();
            }
            let now = Instant::now();
            // The storm: start clients while there are free in-flight slots.
            if phase >= S_STORM {
                while self.inflight < self.sh.inflight && self.next_pending < self.cl.len() {
                    let i = self.next_pending;
                    self.next_pending += 1;
                    self.inflight += 1;
                    self.start_connect(i);
                }
            }
            // Reconnects that are due.
            while let Some(std::cmp::Reverse((due, i))) = self.timers.peek().copied() {
                if due > now {
                    break;
                }
                self.timers.pop();
                if self.cl[i].state == Cs::Backoff && self.cl[i].due == due {
                    self.start_connect(i);
                }
            }
            // Handshakes that take too long.
            if now.duration_since(last_scan) > Duration::from_millis(250) {
                last_scan = now;
                for i in 0..self.cl.len() {
                    let c = &self.cl[i];
                    if matches!(c.state, Cs::Connecting | Cs::Upgrading | Cs::Joining)
                        && c.due < now
                    {
                        let what = match c.state {
                            Cs::Connecting => "connect",
                            Cs::Upgrading => "upgrade reply",
                            _ => "joined reply",
                        };
                        let why = format!("no {what} within {HANDSHAKE_TIMEOUT:?}");
                        if c.state == Cs::Joining {
                            // Counts as a failed attempt, not as a lost live socket.
                            self.cl[i].state = Cs::Upgrading;
                        }
                        self.fail_attempt(i, why);
                    }
                }
            }
            let mut next_due: Option<Instant> = self.timers.peek().map(|r| r.0 .0);
            if phase == S_SEND {
                for k in 0..self.senders.len() {
                    let i = self.senders[k];
                    if let Some(d) = self.pace(i, now) {
                        next_due = Some(next_due.map_or(d, |n: Instant| n.min(d)));
                    }
                }
            }
            let timeout = if !self.again.is_empty() {
                Duration::ZERO
            } else {
                next_due
                    .map_or(Duration::from_millis(20), |d| {
                        d.saturating_duration_since(Instant::now())
                    })
                    .min(Duration::from_millis(20))
            };
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: timeout.as_nanos() as _,
            };
            events.clear();
            match epoll::wait(
                &self.ep,
                rustix::buffer::spare_capacity(&mut events),
                Some(&ts),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    eprintln!("epoll_wait: {e}");
                    break;
                }
            }
            for i in std::mem::take(&mut self.again) {
                self.on_readable(i);
            }
            for ev in events.iter().copied() {
                let i = ev.data.u64() as usize;
                if i < self.cl.len() {
                    self.on_event(i, ev.flags);
                }
            }
            self.publish();
        }
        self.publish();
        for i in 0..self.cl.len() {
            self.drop_socket(i);
        }
        (self.cl, self.st)
    }

    /// Answers a presence-view snapshot request (see `StormShared::views`).
    fn snapshot(&mut self) {
        let want = self.sh.snap_want.load(Ordering::SeqCst) as i64;
        let mut ok = 0;
        let mut wrong = Vec::new();
        for c in &self.cl {
            if c.state == Cs::Live {
                if c.view.count == want {
                    ok += 1;
                } else {
                    wrong.push((c.idx, c.view.count));
                }
            }
        }
        self.sh.snap_ok.fetch_add(ok, Ordering::SeqCst);
        if let Ok(mut w) = self.sh.snap_wrong.lock() {
            w.extend(wrong);
        }
        self.sh.snap_done.fetch_add(1, Ordering::SeqCst);
    }
}

type StormHandle = thread::JoinHandle<(Vec<StormClient>, StormStats)>;

fn spawn_storm_workers(
    tokens: Vec<String>,
    names: Vec<String>,
    senders: usize,
    nworkers: usize,
    sh: &Arc<StormShared>,
    tx: &mpsc::Sender<JoinedEv>,
) -> Result<Vec<StormHandle>, String> {
    let mut parts: Vec<Vec<StormClient>> = (0..nworkers).map(|_| Vec::new()).collect();
    let now = Instant::now();
    for (i, (token, name)) in tokens.into_iter().zip(names).enumerate() {
        parts[i % nworkers].push(StormClient {
            idx: i,
            name,
            token,
            state: Cs::Pending,
            sock: None,
            key: String::new(),
            inbuf: Vec::new(),
            out: Vec::new(),
            frag: Vec::new(),
            frag_op: 0,
            due: now,
            attempt_us: 0,
            conn_us: 0,
            up_us: 0,
            fails: 0,
            round: 0,
            times: [(0, 0, 0, 0); 2],
            joined: [false; 2],
            reattempts: 0,
            last_id: 0,
            since: None,
            ids: Vec::new(),
            ids_at_kill: 0,
            disorder: 0,
            view: View::default(),
            sender: (i < senders).then(|| StormSender {
                interval: Duration::from_secs_f64(senders as f64 / sh.rate),
                next_due: None,
                seq: 0,
                inflight: HashMap::new(),
                acked: Vec::new(),
                sent: 0,
                skipped: 0,
                errors: 0,
            }),
            resend: Resend::NotYet,
        });
    }
    let mut hs = Vec::new();
    for (k, cl) in parts.into_iter().enumerate() {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
        let senders = (0..cl.len()).filter(|&i| cl[i].sender.is_some()).collect();
        let w = StormWorker {
            ep,
            cl,
            sh: sh.clone(),
            rng: Rng::new(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    ^ (k as u64) << 56,
            ),
            timers: std::collections::BinaryHeap::new(),
            next_pending: 0,
            inflight: 0,
            again: Vec::new(),
            scratch: vec![0; 256 * 1024],
            local: [0; NC],
            published: [0; NC],
            st: StormStats::default(),
            tx: tx.clone(),
            senders,
        };
        let h = thread::Builder::new()
            .name(format!("storm-{k}"))
            .stack_size(256 * 1024)
            .spawn(move || w.run())
            .map_err(|e| format!("spawn worker: {e}"))?;
        hs.push(h);
    }
    Ok(hs)
}

/// Ids of every stored message of `room`, oldest first (REST, paged).
fn stored_ids(addr: SocketAddr, token: &str, room: &str) -> Result<Vec<i64>, String> {
    let mut out = Vec::new();
    let mut after = 0i64;
    for _ in 0..100_000 {
        let path = format!("/api/rooms/{room}/messages?after={after}&limit=200");
        let r = http(addr, "GET", &path, None, Some(token))?;
        if r.status != 200 {
            return Err(format!("GET {path}: HTTP {}: {}", r.status, short(&r.body)));
        }
        let v: Value =
            serde_json::from_str(&r.body).map_err(|e| format!("GET {path}: bad JSON: {e}"))?;
        let page: Vec<i64> = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("GET {path}: no messages array"))?
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_i64))
            .collect();
        out.extend(&page);
        match page.last() {
            Some(&last) if page.len() >= 200 => after = last,
            _ => return Ok(out),
        }
    }
    Err("too many pages of history".into())
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in /proc/net/netstat; machine-wide).
fn listen_overflows() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let k = names
        .split_whitespace()
        .position(|x| x == "ListenOverflows")?;
    values.split_whitespace().nth(k)?.parse().ok()
}

/// Per-socket handshake figures from (start, TCP connected, 101, joined) times, µs.
fn handshake_lines(times: &[(u64, u64, u64, u64)]) {
    let mut tcp: Vec<u64> = times.iter().map(|x| x.1.saturating_sub(x.0)).collect();
    let mut up: Vec<u64> = times.iter().map(|x| x.2.saturating_sub(x.1)).collect();
    let mut jn: Vec<u64> = times.iter().map(|x| x.3.saturating_sub(x.2)).collect();
    let mut whole: Vec<u64> = times.iter().map(|x| x.3.saturating_sub(x.0)).collect();
    let slow_syn = tcp.iter().filter(|&&us| us >= 900_000).count();
    println!(
        "  per socket:   TCP connect            {}",
        spread(&mut tcp, false)
    );
    println!(
        "                upgrade request -> 101 {}",
        spread(&mut up, false)
    );
    println!(
        "                join -> `joined`       {}",
        spread(&mut jn, false)
    );
    println!(
        "                connect -> `joined`    {}",
        spread(&mut whole, false)
    );
    if slow_syn > 0 {
        println!(
            "                {} sockets waited >= 0.9 s for TCP connect: their SYN was dropped and resent (a full listen queue)",
            thousands(slow_syn as u64)
        );
    }
}

/// "p50 X  p99 Y  max Z" of µs values, in ms (or seconds when `secs`).
fn spread(v: &mut [u64], secs: bool) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_unstable();
    let at = |p: f64| v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    let f = |us: u64| {
        if secs {
            format!("{:.2} s", us as f64 / 1e6)
        } else {
            format!("{:.1} ms", us as f64 / 1e3)
        }
    };
    format!(
        "p50 {}  p99 {}  max {}",
        f(at(50.0)),
        f(at(99.0)),
        f(v[v.len() - 1])
    )
}

fn mib(k: Option<u64>) -> String {
    k.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn millions(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.1} M", n as f64 / 1e6)
    } else {
        thousands(n)
    }
}

/// "total (presence a, presence_batch or presence_count b, other c)" from two `StormShared::frames` snapshots.
fn frames_line(a: [u64; 4], b: [u64; 4]) -> String {
    let d: Vec<u64> = (0..4).map(|k| b[k] - a[k]).collect();
    format!(
        "{} (presence {}, presence_batch/count {}, message {}, other {})",
        thousands(d[0]),
        thousands(d[1]),
        thousands(d[2]),
        thousands(d[3]),
        thousands(d[0] - d[1] - d[2] - d[3])
    )
}

fn fail_reasons(st: &StormStats, round: usize) -> String {
    let v: Vec<String> = st
        .fails
        .iter()
        .filter(|((r, _), _)| *r == round)
        .map(|((_, why), n)| format!("{} x {why}", thousands(*n)))
        .collect();
    v.join(", ")
}

/// Once the frames have stopped, every joined client should count every user online
/// (from `joined.online` plus the presence frames since). Returns the report line and
/// a problem, if any.
fn presence_check(sh: &StormShared, o: &Opts, names: &[String]) -> (String, Option<String>) {
    let n = names.len();
    let (ok, wrong) = sh.views(n, o.workers);
    let line = format!(
        "{} of {} joined clients count all {n} users online from `joined` + {} frames",
        thousands(ok),
        thousands(ok + wrong.len() as u64),
        match o.presence {
            "batch" => "presence_batch (or presence)",
            "count" => "presence_count",
            _ => "presence",
        }
    );
    let problem = (!wrong.is_empty()).then(|| {
        let ex: Vec<String> = wrong
            .iter()
            .take(5)
            .map(|(i, v)| format!("{} counts {v}", names[*i]))
            .collect();
        format!(
            "{} clients' presence view is not {n} users: {}",
            wrong.len(),
            ex.join(", ")
        )
    });
    (line, problem)
}

fn storm(o: &Opts, t: &mut Target, rid: &str) -> Result<bool, String> {
    let addr = t.addr;
    let n = o.sockets;
    let mut problems: Vec<String> = Vec::new();
    let ts = Instant::now();
    let tokens = make_accounts(addr, rid, n, &o.password, o.connectors)?;
    let secs = ts.elapsed().as_secs_f64();
    println!(
        "setup:    {n} accounts, one per socket, registered and logged in ({secs:.1} s = {} accounts/s, {} at a time, bcrypt cost {})",
        thousands((n as f64 / secs.max(1e-9)) as u64),
        o.connectors.min(n),
        server_cost(o)
    );
    let names: Vec<String> = (0..n).map(|i| format!("lg{rid}_{i}")).collect();
    let sh = Arc::new(StormShared {
        base: Instant::now(),
        addr,
        room_json: serde_json::to_string(&o.room).unwrap_or_default(),
        presence: o.presence,
        resend_room: o.resend_room,
        jitter: o.jitter,
        rate: o.rate,
        inflight: o.inflight.div_ceil(o.workers).max(1),
        phase: AtomicU8::new(S_IDLE),
        armed: AtomicBool::new(false),
        t0_us: AtomicU64::new(0),
        ctr: std::array::from_fn(|_| AtomicU64::new(0)),
        snap_req: AtomicU64::new(0),
        snap_done: AtomicU64::new(0),
        snap_want: AtomicU64::new(0),
        snap_ok: AtomicU64::new(0),
        snap_wrong: Mutex::new(Vec::new()),
    });
    let (tx, rx) = mpsc::channel::<JoinedEv>();
    let workers = spawn_storm_workers(
        tokens.clone(),
        names.clone(),
        o.senders,
        o.workers,
        &sh,
        &tx,
    )?;
    drop(tx);
    let pid = t.pid.clone();
    let p = pid.as_deref();
    thread::sleep(Duration::from_millis(500)); // let the server's login work settle
    let (rss0, thr0) = (p.and_then(rss_kib), p.and_then(threads));
    let cpu0 = cpu_now(p);
    let f0 = sh.frames();
    let lo0 = listen_overflows();
    let mode = o.presence;
    println!(
        "storm:    {n} sockets connect at once, at most {} handshakes in flight ({} epoll workers), joins with presence {mode}",
        sh.inflight * o.workers,
        o.workers
    );

    // 1. The storm: until every socket has its `joined`.
    sh.phase.store(S_STORM, Ordering::SeqCst);
    let started = Instant::now();
    let deadline = started + o.deadline;
    let mut storm_times: Vec<(u64, u64, u64, u64)> = Vec::with_capacity(n);
    let mut tick = started + Duration::from_secs(1);
    let mut last = (sh.frames(), 0u64, started);
    let mut dead = false;
    let progress = |sh: &StormShared,
                    last: &mut ([u64; 4], u64, Instant),
                    now: Instant,
                    t0: Instant| {
        let f = sh.frames();
        let j = sh.get(C_JOINED) + sh.get(C_REJOINED);
        let dt = now.duration_since(last.2).as_secs_f64().max(1e-9);
        println!(
            "  t={:>5.1}s  upgraded {:>6}  joined {:>6}  (+{}/s)  frames {:>11}/s (presence {}/s, batch {}/s)  failed attempts {}",
            now.duration_since(t0).as_secs_f64(),
            sh.get(C_UPGRADED) + sh.get(C_REUPGRADED),
            j,
            thousands(((j - last.1) as f64 / dt) as u64),
            thousands(((f[0] - last.0[0]) as f64 / dt) as u64),
            thousands(((f[1] - last.0[1]) as f64 / dt) as u64),
            thousands(((f[2] - last.0[2]) as f64 / dt) as u64),
            sh.get(C_FAILS)
        );
        *last = (f, j, now);
    };
    loop {
        while let Ok(ev) = rx.try_recv() {
            if ev.round == 0 {
                storm_times.push(ev.times);
            }
        }
        if storm_times.len() >= n {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            problems.push(format!(
                "the storm did not finish within --deadline {:.0} s: {} of {n} joined",
                o.deadline.as_secs_f64(),
                storm_times.len()
            ));
            break;
        }
        if now >= tick {
            tick += Duration::from_secs(1);
            progress(&sh, &mut last, now, started);
            if t.server.as_mut().is_some_and(|s| s.exited().is_some()) {
                dead = true;
                break;
            }
        }
        thread::sleep(Duration::from_millis(2));
    }
    let cpu1 = cpu_now(p);
    let (rss1, thr1) = (p.and_then(rss_kib), p.and_then(threads));
    let f1 = sh.frames();
    let lo1 = listen_overflows();
    let joined_all = storm_times.len() >= n;

    // Presence still arrives after the last `joined`: wait until the clients go quiet.
    let settle_from = Instant::now();
    let mut last_f = sh.get(C_FRAMES);
    let mut last_change = settle_from;
    let settle_deadline = settle_from + o.deadline;
    while !dead && Instant::now() < settle_deadline {
        thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        let f = sh.get(C_FRAMES);
        if f != last_f {
            last_f = f;
            last_change = now;
        } else if now.duration_since(last_change) >= Duration::from_secs(1) {
            break;
        }
        if now >= tick {
            tick += Duration::from_secs(1);
            progress(&sh, &mut last, now, started);
        }
    }
    if !dead && Instant::now() >= settle_deadline {
        problems.push(format!(
            "frames were still arriving {:.0} s after the last joined (--deadline)",
            o.deadline.as_secs_f64()
        ));
    }
    let quiet_after = last_change.duration_since(settle_from).as_secs_f64();
    let cpu2 = cpu_now(p);
    let (rss2, thr2) = (p.and_then(rss_kib), p.and_then(threads));
    let f2 = sh.frames();

    // The storm's figures.
    println!();
    println!("storm results:");
    let first = storm_times.iter().map(|x| x.0).min().unwrap_or(0);
    let last_joined = storm_times.iter().map(|x| x.3).max().unwrap_or(0);
    let wall = (last_joined.saturating_sub(first)) as f64 / 1e6;
    let rate = if wall > 0.0 {
        storm_times.len() as f64 / wall
    } else {
        0.0
    };
    println!(
        "  sockets:      {} of {n} upgraded and joined; {} failed attempts (retried)",
        thousands(storm_times.len() as u64),
        thousands(sh.get(C_FAILS))
    );
    println!(
        "  wall time:    first connect -> last `joined` {wall:.2} s  =>  {} upgrades+joins/s",
        thousands(rate as u64)
    );
    handshake_lines(&storm_times);
    if let (Some(a), Some(b)) = (lo0, lo1) {
        println!(
            "                kernel ListenOverflows +{} during the storm (machine-wide counter)",
            thousands(b - a)
        );
    }
    println!(
        "  frames:       by the last joined:  {}",
        frames_line(f0, f1)
    );
    println!(
        "                until quiet (last frame {quiet_after:.2} s after the last joined): {}",
        frames_line(f0, f2)
    );
    if let (Some(a), Some(b), Some(c)) = (cpu0.server, cpu1.server, cpu2.server) {
        println!(
            "  server CPU:   {:.2} s up to the last joined, {:.2} s until quiet",
            b - a,
            c - a
        );
    }
    println!(
        "  server RSS:   before {}, at the last joined {}, when quiet {}; threads {} / {} / {}",
        mib(rss0),
        mib(rss1),
        mib(rss2),
        thr0.map_or("n/a".into(), |x| x.to_string()),
        thr1.map_or("n/a".into(), |x| x.to_string()),
        thr2.map_or("n/a".into(), |x| x.to_string())
    );
    cpu_report(
        &cpu0,
        &cpu1,
        Some((storm_times.len() as u64, "upgrade+join")),
    );
    if !dead {
        let (line, problem) = presence_check(&sh, o, &names);
        println!("  presence:     {line}");
        problems.extend(problem);
    }
    if o.presence != "each" && f2[2] == f0[2] && f2[1] > f0[1] {
        println!(
            "                (the server sent plain presence frames: it does not implement \"presence\": \"{}\" yet)",
            o.presence
        );
    }
    let storm_frames = f2[0] - f0[0];
    let storm_presence = (f2[1] - f0[1]) + (f2[2] - f0[2]);
    let storm_cpu = cpu0.server.zip(cpu2.server).map(|(a, c)| c - a);
    let storm_rss = rss2;

    // 2. The restart.
    let restart = o.restart && joined_all && !dead && t.server.is_some();
    if o.restart && !restart {
        problems.push("the restart was skipped: the storm did not complete".into());
    }
    struct Restart {
        kill_us: u64,
        up_ms: f64,
        stored: Result<Vec<i64>, String>,
        f_kill: [u64; 4],
        f_end: [u64; 4],
        cpu: Option<f64>,
        rss: Option<u64>,
        finished: bool,
        presence: (String, Option<String>),
        overflows: Option<u64>,
    }
    let mut rs: Option<Restart> = None;
    if restart {
        println!();
        println!(
            "restart:  {} senders send {} msg/s in all to {} for {:.1} s; then kill -9 the server while they send,",
            o.senders,
            o.rate,
            o.room,
            o.secs.as_secs_f64()
        );
        println!(
            "          start it again on the same database and port; every client reconnects after 0-{:.0} ms of jitter,",
            o.jitter.as_secs_f64() * 1e3
        );
        println!(
            "          re-joins with `since` and sends one message ({})",
            if o.resend_room {
                "to the room".to_string()
            } else {
                format!(
                    "the {} senders to the room, the others a DM to themselves",
                    o.senders
                )
            }
        );
        let t0_us = sh.now_us();
        sh.t0_us.store(t0_us, Ordering::SeqCst);
        sh.phase.store(S_SEND, Ordering::SeqCst);
        let t0 = Instant::now();
        let end = t0 + o.secs;
        let mut tick = t0 + Duration::from_secs(1);
        let mut last = (0u64, 0u64, sh.get(C_MESSAGES), t0);
        while Instant::now() < end {
            let now = Instant::now();
            if now >= tick {
                tick += Duration::from_secs(1);
                let (s, a, m) = (sh.get(C_SENT), sh.get(C_ACKS), sh.get(C_MESSAGES));
                let dt = now.duration_since(last.3).as_secs_f64();
                println!(
                    "  t={:>4.1}s  sent {:>5}/s  acked {:>5}/s  delivered {:>9}/s",
                    now.duration_since(t0).as_secs_f64(),
                    thousands(((s - last.0) as f64 / dt) as u64),
                    thousands(((a - last.1) as f64 / dt) as u64),
                    thousands(((m - last.2) as f64 / dt) as u64)
                );
                last = (s, a, m, now);
            }
            thread::sleep(
                end.min(tick)
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
        }
        // The crash, while the senders are sending: arm the reconnects, kill, and only
        // then stop the pacing (the senders are cut off by the kill anyway).
        sh.armed.store(true, Ordering::SeqCst);
        let server = t.server.as_mut().ok_or("no server to kill")?;
        let old_pid = server.pid;
        let kill_us = sh.now_us();
        let kill_at = Instant::now();
        let lo_kill = listen_overflows();
        server.kill9();
        sh.phase.store(S_KILL, Ordering::SeqCst);
        let (sent, acked) = (sh.get(C_SENT), sh.get(C_ACKS));
        let f_kill = sh.frames();
        let respawned = server.respawn();
        let up_ms = kill_at.elapsed().as_secs_f64() * 1e3;
        match respawned {
            Ok(()) => {
                t.pid = Some(server.pid.to_string());
                println!(
                    "  killed pid {old_pid} with SIGKILL ({} messages sent, {} acked by then); new server pid {} listening on {} {up_ms:.0} ms after the kill",
                    thousands(sent),
                    thousands(acked),
                    server.pid,
                    server.addr
                );
                if server.addr != addr {
                    problems.push(format!(
                        "the restarted server listens on {} instead of {addr}",
                        server.addr
                    ));
                }
            }
            Err(e) => problems.push(format!("the server could not be started again: {e}")),
        }
        let p2 = t.pid.clone();
        let p2 = p2.as_deref();
        // Until every client is back, has replayed and has its one message acked.
        let deadline = kill_at + o.deadline;
        let mut tick = kill_at + Duration::from_secs(1);
        let mut last = (sh.frames(), 0u64, kill_at);
        let mut done_at: Option<Instant> = None;
        let mut last_f = sh.get(C_FRAMES);
        let mut finished = false;
        while t.server.as_mut().is_some_and(|s| s.exited().is_none()) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let f = sh.get(C_FRAMES);
            if sh.get(C_REJOINED) >= n as u64 && sh.get(C_RESENT) >= n as u64 {
                // Then wait for the tail (room messages of the others) to go quiet.
                match done_at {
                    Some(d)
                        if f == last_f && now.duration_since(d) >= Duration::from_millis(500) =>
                    {
                        finished = true;
                        break;
                    }
                    Some(_) if f != last_f => done_at = Some(now),
                    None => done_at = Some(now),
                    _ => {}
                }
            }
            last_f = f;
            if now >= tick {
                tick += Duration::from_secs(1);
                let fr = sh.frames();
                let dt = now.duration_since(last.2).as_secs_f64().max(1e-9);
                println!(
                    "  t={:>5.1}s after the kill: attempts {:>6}  upgraded {:>6}  rejoined {:>6}  sent+acked {:>6}  frames {:>10}/s (presence {}/s, batch {}/s)",
                    now.duration_since(kill_at).as_secs_f64(),
                    sh.get(C_ATTEMPTS),
                    sh.get(C_REUPGRADED),
                    sh.get(C_REJOINED),
                    sh.get(C_RESENT),
                    thousands(((fr[0] - last.0[0]) as f64 / dt) as u64),
                    thousands(((fr[1] - last.0[1]) as f64 / dt) as u64),
                    thousands(((fr[2] - last.0[2]) as f64 / dt) as u64),
                );
                last = (fr, 0, now);
            }
            thread::sleep(Duration::from_millis(10));
        }
        if !finished {
            problems.push(format!(
                "after the restart, not every client was back, replayed and acked within --deadline {:.0} s ({} rejoined, {} sent+acked of {n})",
                o.deadline.as_secs_f64(),
                sh.get(C_REJOINED),
                sh.get(C_RESENT)
            ));
        }
        let f_end = sh.frames();
        let overflows = lo_kill.zip(listen_overflows()).map(|(a, b)| b - a);
        let presence = presence_check(&sh, o, &names);
        let cpu = p2.and_then(cpu_secs);
        let rss = p2.and_then(rss_kib);
        let stored = stored_ids(t.addr, &tokens[0], &o.room);
        rs = Some(Restart {
            kill_us,
            up_ms,
            stored,
            f_kill,
            f_end,
            cpu,
            rss,
            finished,
            presence,
            overflows,
        });
    }
    sh.phase.store(S_STOP, Ordering::SeqCst);
    let mut clients = Vec::with_capacity(n);
    let mut st = StormStats::default();
    for h in workers {
        match h.join() {
            Ok((c, s)) => {
                clients.extend(c);
                for (k, v) in s.fails {
                    *st.fails.entry(k).or_default() += v;
                }
                for (k, v) in s.early_drops {
                    *st.early_drops.entry(k).or_default() += v;
                }
                for (k, v) in s.errors {
                    *st.errors.entry(k).or_default() += v;
                }
                for (k, v) in s.other {
                    *st.other.entry(k).or_default() += v;
                }
                st.error_samples.extend(s.error_samples);
                st.masked += s.masked;
            }
            Err(_) => problems.push("a storm worker thread panicked (loadgen bug)".into()),
        }
    }
    clients.sort_by_key(|c| c.idx);
    check_server(t, &mut problems);

    let storm_fails = fail_reasons(&st, 0);
    if !storm_fails.is_empty() {
        println!();
        println!("storm: failed attempts (each retried): {storm_fails}");
    }
    if !st.early_drops.is_empty() {
        let v: Vec<String> = st
            .early_drops
            .iter()
            .map(|(k, v)| format!("{v} x {k}"))
            .collect();
        problems.push(format!(
            "sockets lost before the kill (they reconnected): {}",
            v.join(", ")
        ));
    }

    let mut verdicts: Vec<(String, bool)> = Vec::new();
    let mut restart_summary = String::new();
    if let Some(r) = &rs {
        println!();
        println!("restart results:");
        let rel = |us: u64| us.saturating_sub(r.kill_us);
        let pre_acked: Vec<i64> = {
            let mut v: Vec<i64> = clients
                .iter()
                .filter_map(|c| c.sender.as_ref())
                .flat_map(|s| s.acked.iter().map(|x| x.1))
                .collect();
            v.sort_unstable();
            v
        };
        let skipped: u64 = clients
            .iter()
            .filter_map(|c| c.sender.as_ref())
            .map(|s| s.skipped)
            .sum();
        let send_errors: u64 = clients
            .iter()
            .filter_map(|c| c.sender.as_ref())
            .map(|s| s.errors)
            .sum();
        let resent_room: Vec<i64> = {
            let mut v: Vec<i64> = clients
                .iter()
                .filter(|c| o.resend_room || c.sender.is_some())
                .filter_map(|c| match c.resend {
                    Resend::Acked(id, _) => Some(id),
                    _ => None,
                })
                .collect();
            v.sort_unstable();
            v
        };
        let stored: Vec<i64> = match &r.stored {
            Ok(v) => v.clone(),
            Err(e) => {
                problems.push(format!("could not read the room's stored messages: {e}"));
                Vec::new()
            }
        };
        let has = |v: &[i64], x: i64| v.binary_search(&x).is_ok();
        let lost_acked: Vec<i64> = pre_acked
            .iter()
            .chain(&resent_room)
            .copied()
            .filter(|&x| !has(&stored, x))
            .collect();
        let unacked_stored: Vec<i64> = stored
            .iter()
            .copied()
            .filter(|&x| !has(&pre_acked, x) && !has(&resent_room, x))
            .collect();
        let pre_kill_stored: Vec<i64> = stored
            .iter()
            .copied()
            .filter(|&x| !has(&resent_room, x))
            .collect();
        let sent: u64 = clients
            .iter()
            .filter_map(|c| c.sender.as_ref())
            .map(|s| s.sent)
            .sum();
        println!(
            "  before the kill: {} messages sent, {} acked, {} answered with an error, {} in flight at the kill{}",
            thousands(sent),
            thousands(pre_acked.len() as u64),
            send_errors,
            thousands(sent.saturating_sub(pre_acked.len() as u64 + send_errors)),
            if skipped > 0 {
                format!(" ({skipped} sends skipped: the loadgen fell behind)")
            } else {
                String::new()
            }
        );
        println!(
            "  new server:   listening {:.0} ms after the kill, on the same port and database",
            r.up_ms
        );
        println!(
            "  stored:       {} messages in {} ({} acked before the kill, {} of the in-flight ones, {} sent after the restart); acked but NOT stored: {}",
            thousands(stored.len() as u64),
            o.room,
            thousands(pre_acked.len() as u64),
            unacked_stored.len(),
            resent_room.len(),
            lost_acked.len()
        );
        if !lost_acked.is_empty() {
            problems.push(format!(
                "{} acked messages are not in the database after the restart (an ack must mean on disk): ids {:?}",
                lost_acked.len(),
                &lost_acked[..lost_acked.len().min(10)]
            ));
        }
        // Per client: gaps, duplicates, and the times.
        let mut back = Vec::new();
        let mut rejoined = Vec::new();
        let mut replayed = Vec::new();
        let mut acked_t = Vec::new();
        let mut all_done = Vec::new();
        let mut attempts = Vec::new();
        // (client, its `since`, acked ids it missed, stored unacked ids it missed)
        type Missed = (String, Option<i64>, Vec<i64>, Vec<i64>);
        let mut missed: Vec<Missed> = Vec::new();
        let (mut n_missed_acked, mut n_missed_unacked, mut n_extra, mut n_disorder) = (0, 0, 0, 0);
        let mut not_back = 0;
        let mut resend_failed: BTreeMap<String, u64> = BTreeMap::new();
        let mut replayed_msgs = 0u64;
        for c in &clients {
            attempts.push(c.reattempts as u64);
            let mut got: Vec<i64> = c.ids.iter().map(|x| x.0).collect();
            got.sort_unstable();
            got.dedup();
            let miss_acked: Vec<i64> = pre_acked
                .iter()
                .chain(&resent_room)
                .copied()
                .filter(|&x| !has(&got, x))
                .collect();
            let miss_unacked: Vec<i64> = unacked_stored
                .iter()
                .copied()
                .filter(|&x| !has(&got, x))
                .collect();
            let extra = got.iter().filter(|&&x| !has(&stored, x)).count();
            if !miss_acked.is_empty() {
                n_missed_acked += 1;
            }
            if !miss_unacked.is_empty() {
                n_missed_unacked += 1;
            }
            if extra > 0 {
                n_extra += 1;
            }
            if c.disorder > 0 {
                n_disorder += 1;
            }
            if !miss_acked.is_empty() || !miss_unacked.is_empty() {
                missed.push((c.name.clone(), c.since, miss_acked, miss_unacked));
            }
            if !c.joined[1] {
                not_back += 1;
                continue;
            }
            let (_, _, up_us, joined_us) = c.times[1];
            back.push(rel(up_us));
            rejoined.push(rel(joined_us));
            // Replayed: every message stored before the kill that it had not seen is in.
            let since = c.since.unwrap_or(0);
            let mut rep = Some(joined_us);
            for &id in pre_kill_stored.iter().filter(|&&x| x > since) {
                replayed_msgs += 1;
                match c.ids.iter().find(|x| x.0 == id) {
                    Some(&(_, at)) => rep = rep.map(|r| r.max(at)),
                    None => rep = None,
                }
            }
            if let Some(at) = rep {
                replayed.push(rel(at));
            }
            let ack = match &c.resend {
                Resend::Acked(_, at) => {
                    acked_t.push(rel(*at));
                    Some(*at)
                }
                Resend::Failed(e) => {
                    *resend_failed.entry(e.clone()).or_default() += 1;
                    None
                }
                Resend::Sent(_) => {
                    *resend_failed.entry("no answer".into()).or_default() += 1;
                    None
                }
                Resend::NotYet => {
                    *resend_failed.entry("never sent".into()).or_default() += 1;
                    None
                }
            };
            if let (Some(a), Some(b)) = (rep, ack) {
                all_done.push(rel(joined_us.max(a).max(b)));
            }
        }
        let refused = fail_reasons(&st, 1);
        println!(
            "  clients:      {} of {n} reconnected and re-joined, after {} connect attempts in all ({} per client at most){}",
            thousands(back.len() as u64),
            thousands(attempts.iter().sum::<u64>()),
            attempts.iter().max().copied().unwrap_or(0),
            if refused.is_empty() {
                String::new()
            } else {
                format!("; failed attempts: {refused}")
            }
        );
        let re_times: Vec<(u64, u64, u64, u64)> = clients
            .iter()
            .filter(|c| c.joined[1])
            .map(|c| c.times[1])
            .collect();
        handshake_lines(&re_times);
        if let Some(d) = r.overflows {
            println!(
                "                kernel ListenOverflows +{} after the kill (machine-wide counter)",
                thousands(d)
            );
        }
        println!(
            "  from the kill to: reconnected (101)  {}",
            spread(&mut back.clone(), true)
        );
        println!(
            "                    re-joined          {}",
            spread(&mut rejoined.clone(), true)
        );
        println!(
            "                    replayed           {}  ({} of {n}; {} replayed messages in all)",
            spread(&mut replayed.clone(), true),
            thousands(replayed.len() as u64),
            thousands(replayed_msgs)
        );
        println!(
            "                    sent and acked     {}  ({} of {n})",
            spread(&mut acked_t.clone(), true),
            thousands(acked_t.len() as u64)
        );
        println!(
            "                    all three          {}  ({} of {n})",
            spread(&mut all_done.clone(), true),
            thousands(all_done.len() as u64)
        );
        println!(
            "  gaps:         {n_missed_acked} clients missed an acked message, {n_missed_unacked} a stored unacked one; {n_extra} got a message that is not stored; {n_disorder} saw an id twice or out of order"
        );
        for (name, since, a, u) in missed.iter().take(10) {
            println!(
                "    {name} (re-joined since {}): missing acked {:?}{}, missing stored-unacked {:?}",
                since.map_or("-".into(), |s| s.to_string()),
                &a[..a.len().min(8)],
                if a.len() > 8 { " ..." } else { "" },
                &u[..u.len().min(8)]
            );
        }
        if missed.len() > 10 {
            println!("    ... and {} more clients", missed.len() - 10);
        }
        for c in clients.iter().filter(|c| c.disorder > 0).take(3) {
            let after: Vec<String> = c.ids[c.ids_at_kill.min(c.ids.len())..]
                .iter()
                .map(|(id, at)| format!("{id}@{:.0}ms", rel(*at) as f64 / 1e3))
                .collect();
            println!(
                "    {} saw a duplicate or disorder: last id before the kill {}, re-joined since {}, ids after the kill (ms after it): {}",
                c.name,
                c.ids[..c.ids_at_kill.min(c.ids.len())].last().map_or("-".into(), |x| x.0.to_string()),
                c.since.map_or("-".into(), |s| s.to_string()),
                after.join(" ")
            );
        }
        if n_missed_acked + n_missed_unacked + n_extra + n_disorder > 0 {
            problems.push(format!(
                "replay after the restart: {n_missed_acked} clients missed acked messages, {n_missed_unacked} missed stored unacked ones, {n_extra} got unstored ones, {n_disorder} saw duplicates or disorder"
            ));
        }
        if not_back > 0 {
            problems.push(format!(
                "{not_back} clients never re-joined after the restart"
            ));
        }
        if !resend_failed.is_empty() {
            let v: Vec<String> = resend_failed
                .iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect();
            problems.push(format!(
                "the message after the rejoin was not acked: {}",
                v.join(", ")
            ));
        }
        println!(
            "  frames after the kill: {}",
            frames_line(r.f_kill, r.f_end)
        );
        println!("  presence:     {}", r.presence.0);
        problems.extend(r.presence.1.clone());
        println!(
            "  new server:   {} CPU s since its start, RSS {} at the end",
            r.cpu.map_or("n/a".into(), |c| format!("{c:.2}")),
            mib(r.rss)
        );
        let worst = |v: &[u64]| v.iter().max().map_or(f64::NAN, |&x| x as f64 / 1e6);
        let done_all = all_done.len() == n && r.finished;
        let worst_all = worst(&all_done);
        let gaps = n_missed_acked + n_missed_unacked + n_extra + n_disorder;
        restart_summary = format!(
            "; restart (kill -9 while sending): all back {:.1} s, replayed {:.1} s, sent+acked {:.1} s, {} clients missed a message, {} got one twice",
            worst(&rejoined),
            worst(&replayed),
            worst(&acked_t),
            thousands((n_missed_acked + n_missed_unacked) as u64),
            thousands(n_disorder as u64)
        );
        verdicts.push((
            format!(
                "every client back, replayed and sending within 5 s: {} of {n}, the last after {worst_all:.2} s",
                thousands(all_done.len() as u64)
            ),
            done_all && worst_all <= 5.0,
        ));
        verdicts.push((
            format!(
                "nothing missed after the restart: {} clients with a gap, {n_disorder} with a duplicate, {} acked messages not stored",
                n_missed_acked + n_missed_unacked + n_extra,
                lost_acked.len()
            ),
            gaps == 0 && lost_acked.is_empty() && r.stored.is_ok(),
        ));
    }

    if !st.errors.is_empty() {
        let e: Vec<String> = st.errors.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        problems.push(format!(
            "error frames from the server: {}; first: {}",
            e.join(", "),
            st.error_samples.join(" | ")
        ));
    }
    if st.masked > 0 {
        problems.push(format!("{} server frames were masked", st.masked));
    }
    let odd: Vec<String> = st
        .other
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "dm" | "joined"))
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    if !odd.is_empty() {
        problems.push(format!("unexpected frames: {}", odd.join(", ")));
    }
    println!();
    print_problems(&problems, None);
    println!();
    let ok1 = joined_all && rate >= 5000.0;
    verdicts.insert(
        0,
        (
            format!(
                "{} of {n} sockets upgraded and joined in {wall:.2} s = {} upgrades+joins/s (target >= 5,000/s)",
                thousands(storm_times.len() as u64),
                thousands(rate as u64)
            ),
            ok1,
        ),
    );
    for (k, (line, ok)) in verdicts.iter().enumerate() {
        let head = if k == 0 { "verdict: " } else { "         " };
        println!("{head} {line}: {}", verdict(*ok));
    }
    println!();
    println!(
        "summary:  | `storm --presence {mode}`: {} sockets, one user each, all connecting at once | **{} upgrades+joins/s** ({wall:.1} s), {} frames to the clients ({} presence), server {} CPU s, {} RSS{restart_summary} | >= 5,000/s{} |",
        thousands(n as u64),
        thousands(rate as u64),
        millions(storm_frames),
        millions(storm_presence),
        storm_cpu.map_or("n/a".into(), |c| format!("{c:.1}")),
        mib(storm_rss),
        if rs.is_some() {
            "; all back within 5 s"
        } else {
            ""
        }
    );
    Ok(verdicts.iter().all(|v| v.1) && problems.is_empty())
}

fn raise_nofile() -> String {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let want = cur.maximum;
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: want,
            maximum: cur.maximum,
        },
    ) {
        Ok(()) => want.map_or("unlimited".into(), |v| v.to_string()),
        Err(e) => format!(
            "{} (raising failed: {e})",
            cur.current.map_or("unlimited".into(), |v| v.to_string())
        ),
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let o = match parse_args(argv[1..].to_vec()) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let nofile = raise_nofile();
    println!("parley loadgen: scenario {}", o.scenario.name());
    println!("command:  {}", argv.join(" "));
    println!(
        "          (= cargo run --release --example loadgen -- {})",
        argv[1..].join(" ")
    );
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "machine:  {cores} cores, Linux {}, loadgen RLIMIT_NOFILE {nofile}, client threads: {} epoll + {} connectors",
        kernel.trim(),
        o.workers,
        o.connectors
    );
    let mut target = if let Some(a) = &o.addr {
        let addr = match a.to_socket_addrs().ok().and_then(|mut i| i.next()) {
            Some(a) => a,
            None => {
                eprintln!("loadgen: cannot resolve --addr {a}");
                std::process::exit(2);
            }
        };
        if !addr.ip().is_loopback() {
            eprintln!("loadgen: --addr must be a loopback address (127.0.0.0/8 or ::1)");
            std::process::exit(2);
        }
        println!(
            "server:   running server at {addr} (settings unknown to the loadgen; rate limits must be off){}",
            o.server_pid.map_or(String::new(), |p| format!(", pid {p}"))
        );
        let mut nodes = vec![addr];
        for n in &o.nodes {
            match n.to_socket_addrs().ok().and_then(|mut i| i.next()) {
                Some(a) if a.ip().is_loopback() => nodes.push(a),
                _ => {
                    eprintln!("loadgen: --node {n}: not a loopback address");
                    std::process::exit(2);
                }
            }
        }
        if nodes.len() > 1 {
            println!(
                "          {} nodes of one cluster: {}; socket i connects to node i mod {}",
                nodes.len(),
                nodes
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                nodes.len()
            );
        }
        Target {
            addr,
            nodes,
            pid: o.server_pid.map(|p| p.to_string()),
            server: None,
        }
    } else {
        // A login flood is only realistic at the production cost (the server's default).
        let cost = if o.login_flood > 0 { 12 } else { 4 };
        // The storm's restart brings the server back on the same port: fix it up front.
        let listen = if o.scenario == Scenario::Storm && o.restart {
            match free_port() {
                Ok(port) => format!("127.0.0.1:{port}"),
                Err(e) => {
                    eprintln!("loadgen: no free port: {e}");
                    std::process::exit(1);
                }
            }
        } else {
            "127.0.0.1:0".to_string()
        };
        match Server::start(&o.server_bin, &o.server_args, o.keep, cost, &listen) {
            Ok(s) => {
                println!("server:   {}", s.cmdline);
                println!(
                    "          pid {}, listening on {}, log {}, RUST_LOG={}",
                    s.pid,
                    s.addr,
                    s.log.display(),
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "(unset)".into())
                );
                Target {
                    addr: s.addr,
                    nodes: vec![s.addr],
                    pid: Some(s.pid.to_string()),
                    server: Some(s),
                }
            }
            Err(e) => {
                eprintln!("loadgen: {e}");
                std::process::exit(1);
            }
        }
    };
    let settings = match o.scenario {
        Scenario::Idle => format!(
            "sockets={} per-user={} room={} hold={:.1}s",
            o.sockets,
            o.per_user,
            o.room,
            o.hold.as_secs_f64()
        ),
        Scenario::Storm => format!(
            "sockets={} (one user each) room={} presence={} inflight={} workers={}{}",
            o.sockets,
            o.room,
            o.presence,
            o.inflight,
            o.workers,
            if o.restart {
                format!(
                    " restart: senders={} rate={}/s secs={:.1} jitter={:.0}ms resend={} deadline={:.0}s",
                    o.senders,
                    o.rate,
                    o.secs.as_secs_f64(),
                    o.jitter.as_secs_f64() * 1e3,
                    if o.resend_room { "room" } else { "dm" },
                    o.deadline.as_secs_f64()
                )
            } else {
                " (no restart)".to_string()
            }
        ),
        _ => format!(
            "sockets={} senders={} {} secs={:.1} body-bytes={} per-user={} rooms={} poll-us={}{}",
            o.sockets,
            o.senders,
            if o.rate > 0.0 {
                format!("rate={}/s (paced, open loop)", o.rate)
            } else {
                format!("window={} in flight per sender", o.window)
            },
            o.secs.as_secs_f64(),
            o.body_bytes,
            o.per_user,
            if o.scenario == Scenario::Acks && !o.one_room {
                "one per sender".to_string()
            } else {
                o.room.clone()
            },
            o.poll.as_micros(),
            if o.login_flood > 0 {
                format!(
                    " login-flood={} (server bcrypt cost {})",
                    o.login_flood,
                    server_cost(&o)
                )
            } else {
                String::new()
            }
        ),
    };
    println!("settings: {settings}");
    let rid = run_id();
    let res = match o.scenario {
        Scenario::Idle => idle(&o, &mut target, &rid),
        Scenario::Storm => storm(&o, &mut target, &rid),
        _ => traffic(&o, &mut target, &rid),
    };
    if let Some(s) = target.server.as_mut() {
        thread::sleep(Duration::from_millis(200));
        println!("shutdown: {}", s.stop());
    }
    drop(target);
    match res {
        Ok(true) => {}
        Ok(false) => std::process::exit(3),
        Err(e) => {
            eprintln!("loadgen: run failed: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_found_in_every_position_of_a_word() {
        for len in 0..24 {
            for at in 0..len {
                let mut b = vec![b'x'; len];
                b[at] = b',';
                assert_eq!(first_comma(&b), Some(at), "len {len}, comma at {at}");
                // A later comma does not hide the first.
                if at + 1 < len {
                    b[len - 1] = b',';
                    assert_eq!(first_comma(&b), Some(at), "len {len}, commas at {at}");
                }
            }
            assert_eq!(first_comma(&vec![b'x'; len]), None);
        }
        // Bytes just above and below `,` are not commas.
        assert_eq!(first_comma(b"+-+-+-+-+-,"), Some(10));
    }

    #[test]
    fn users_are_counted_once_whichever_way_their_names_are_read() {
        let mut v = View::default();
        // The first name teaches the prefix; " lgab_22" (a space) and "admin" go the
        // slow way; "lgab_1" twice counts once.
        let list = br#"{"online":["lgab_1", "lgab_22","admin","lgab_1","lgab_4"]}"#;
        v.apply(list, b"\"online\":[", true);
        assert_eq!(v.prefix, br#""lgab_"#);
        assert_eq!(
            v.count, 3,
            "lgab_1, lgab_22 and lgab_4; admin is not a load-generator user"
        );
        v.apply(
            br#"{"offline":["lgab_22","lgab_9"],"online":[]}"#,
            b"\"offline\":[",
            false,
        );
        assert_eq!(v.count, 2, "lgab_9 was not online");
        v.apply(br#"{"online":[]}"#, b"\"online\":[", true);
        assert_eq!(v.count, 2);
    }

    #[test]
    fn a_quick_name_is_exactly_prefix_digits_quote() {
        let p = br#""lgab_"#;
        assert_eq!(quick_name(br#""lgab_12","lgab_3""#, p), Some((12, 10)));
        assert_eq!(quick_name(br#""lgab_3""#, p), Some((3, 8)));
        for slow in [
            &br#""lgab_""#[..],
            br#""lgab_1x""#,
            br#""lgab_1234567890""#,
            br#""lgab_1" ,"#,
            br#""lgxy_1""#,
            br#" "lgab_1""#,
        ] {
            assert_eq!(
                quick_name(slow, p),
                None,
                "{}",
                String::from_utf8_lossy(slow)
            );
        }
        assert_eq!(
            quick_name(br#""lgab_1""#, b""),
            None,
            "no prefix learnt yet"
        );
    }

    #[test]
    fn a_user_index_is_the_digits_after_the_last_underscore() {
        assert_eq!(user_index(br#""lgab_0""#), Some(0));
        assert_eq!(user_index(br#" "lgab_c_4096" "#), Some(4096));
        assert_eq!(user_index(b"lgab_123456789"), Some(123_456_789));
        for bad in [
            &b"lgab_1234567890"[..],
            b"lgab_",
            b"lgab_1x",
            b"lgab12",
            b"xlg_1",
            b"\"\"",
        ] {
            assert_eq!(user_index(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
