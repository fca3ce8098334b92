//! The one module that may use `unsafe`: the TCP sockets behind tiny_http's
//! connections, plus process limits and, on Linux with glibc, the process's start
//! ([`main`], which spares every thread the standard library's signal stack).
//!
//! tiny_http hands an upgraded connection back as an opaque `Box<dyn ReadWrite>`: no
//! clone, no non-blocking writes. Fan-out must write to a socket from other threads
//! without ever blocking (see [`crate::peer`]), so [`KnownSockets::adopt`] duplicates
//! the connection's descriptor, whose numbers our vendored tiny_http reports on each
//! request (`Request::socket_fds`), and remembers them so that listings skip live
//! WebSockets.
//!
//! Plain HTTP connections are found by listing `/proc/self/fd`, to be shut down (idle,
//! past a deadline, or shed when descriptors run short). Shedding matters most when
//! every descriptor is taken, so [`KnownSockets::reserve_descriptors`] keeps two open
//! from the start: the `/proc/self/fd` directory, read again from its beginning each
//! time, and a slot that a connection is `dup2`ed into (which replaces what the slot
//! held, so it needs no free number). Also here: whether tiny_http still holds our
//! listening socket (its accept thread drops it when it dies) and how many descriptors
//! are free.
//!
//! No thread of its own; called by the upgrade (adopt), the reaper, the accept
//! supervisor ([`crate::front`]) and whoever cuts a connection ([`crate::exchange`]).
#![allow(unsafe_code)]

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

/// A socket taken by [`KnownSockets::adopt`]: our duplicate of it, and every
/// descriptor number of it (tiny_http's and ours) that later listings skip.
#[derive(Debug)]
pub struct Adopted {
    /// Our duplicate, for non-blocking writes.
    pub fd: OwnedFd,
    /// Numbers to hand back to [`KnownSockets::release`] before the connection closes.
    pub numbers: Vec<i32>,
}

/// A set of descriptor numbers as bits.
#[derive(Default, Clone)]
struct FdSet {
    words: Vec<u64>,
}

impl FdSet {
    fn insert(&mut self, n: i32) {
        let Ok(n) = usize::try_from(n) else { return };
        if self.words.len() <= n / 64 {
            self.words.resize(n / 64 + 1, 0);
        }
        if let Some(w) = self.words.get_mut(n / 64) {
            *w |= 1 << (n % 64);
        }
    }

    fn remove(&mut self, n: i32) {
        let Ok(n) = usize::try_from(n) else { return };
        if let Some(w) = self.words.get_mut(n / 64) {
            *w &= !(1 << (n % 64));
        }
    }

    fn contains(&self, n: i32) -> bool {
        usize::try_from(n)
            .ok()
            .and_then(|n| self.words.get(n / 64).map(|w| w & (1 << (n % 64)) != 0))
            .unwrap_or(false)
    }
}

#[derive(Default)]
struct Fds {
    /// Descriptors of live WebSockets: listings skip them.
    known: FdSet,
}

/// Descriptor numbers known to belong to live WebSockets. Listings skip them, so
/// looking for plain connections costs a few system calls per *other* descriptor
/// rather than per open socket: with thousands of WebSockets, that is the difference
/// between microseconds and tens of milliseconds.
#[derive(Default)]
pub struct KnownSockets {
    fds: Mutex<Fds>,
    reserve: Mutex<Option<Reserve>>,
}

/// Descriptors kept so that listing and shutting down connections needs no free one.
struct Reserve {
    /// `/proc/self/fd`, rewound before each listing.
    dir: rustix::fs::Dir,
    dir_number: i32,
    /// Where a connection is duplicated to be checked and shut down; holds a duplicate
    /// of the directory in between.
    slot: OwnedFd,
}

/// What one listing found.
#[derive(Debug)]
pub struct Survey {
    /// Peers of our accepted connections that are not adopted WebSockets, lowest
    /// descriptor number first: numbers are handed out lowest first, so among
    /// connections open at once the earlier ones usually come first.
    pub peers: Vec<SocketAddr>,
    /// Descriptors this process has open, all kinds.
    pub open: usize,
    /// Peers whose connection has bytes waiting unread in the kernel.
    pub unread: HashSet<SocketAddr>,
}

impl KnownSockets {
    fn fds(&self) -> MutexGuard<'_, Fds> {
        crate::sync::lock(&self.fds)
    }

    /// Opens the reserve (see the module doc). Without it, listings and shutdowns
    /// open descriptors of their own, and fail when none is free.
    pub fn reserve_descriptors(&self) -> std::io::Result<()> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let dir = rustix::fs::open("/proc/self/fd", flags, Mode::empty())?;
        let slot = rustix::io::fcntl_dupfd_cloexec(&dir, 0)?;
        let dir_number = dir.as_raw_fd();
        *crate::sync::lock(&self.reserve) = Some(Reserve {
            dir: rustix::fs::Dir::new(dir)?,
            dir_number,
            slot,
        });
        Ok(())
    }

    /// Takes the socket of an upgraded connection, given its descriptor numbers as
    /// tiny_http reports them (`Request::socket_fds`): duplicates it for our own
    /// writes and records every number (tiny_http's and ours) so that listings skip
    /// it. The caller must hold the request, or the stream its upgrade returned,
    /// until this returns: they keep those numbers this connection's.
    pub fn adopt(&self, numbers: &[i32]) -> std::io::Result<Adopted> {
        let first = numbers.first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no descriptor reported")
        })?;
        let fd = rustix::io::fcntl_dupfd_cloexec(borrow(*first), 0)?;
        let mut numbers = numbers.to_vec();
        numbers.push(fd.as_raw_fd());
        let mut fds = self.fds();
        for n in &numbers {
            fds.known.insert(*n);
        }
        Ok(Adopted { fd, numbers })
    }

    /// Forgets a WebSocket's numbers; call before its connection is closed, since
    /// closed numbers are reused by new connections.
    pub fn release(&self, numbers: &[i32]) {
        let mut fds = self.fds();
        for n in numbers {
            fds.known.remove(*n);
        }
    }

    /// The peers of our accepted connections that are not adopted WebSockets, and how
    /// many descriptors are open.
    pub fn survey(&self, local_port: u16) -> std::io::Result<Survey> {
        let skip = self.fds().known.clone();
        let mut reserve = crate::sync::lock(&self.reserve);
        let (numbers, open) = list(reserve.as_mut(), &skip)?;
        // Highest first, so a connection's last (lowest) number is kept.
        let mut lowest = std::collections::HashMap::new();
        let mut unread = HashSet::new();
        for n in numbers {
            if let Some(peer) = peer_of(borrow(n), local_port) {
                lowest.insert(peer, n);
                if rustix::io::ioctl_fionread(borrow(n)).is_ok_and(|bytes| bytes > 0) {
                    unread.insert(peer);
                }
            }
        }
        let mut peers: Vec<(SocketAddr, i32)> = lowest.into_iter().collect();
        peers.sort_unstable_by_key(|(_, n)| *n);
        Ok(Survey {
            peers: peers.into_iter().map(|(p, _)| p).collect(),
            open,
            unread,
        })
    }

    /// Shuts down the plain connection from `peer` (both directions).
    pub fn shut_down(&self, local_port: u16, peer: SocketAddr) -> std::io::Result<bool> {
        Ok(self.shut_down_all(local_port, &HashSet::from([peer]))? > 0)
    }

    /// Shuts down the plain connections from `peers` (both directions) in one
    /// listing; returns how many were found.
    pub fn shut_down_all(
        &self,
        local_port: u16,
        peers: &HashSet<SocketAddr>,
    ) -> std::io::Result<usize> {
        if peers.is_empty() {
            return Ok(0);
        }
        let skip = self.fds().known.clone();
        let mut reserve = crate::sync::lock(&self.reserve);
        let (numbers, _) = list(reserve.as_mut(), &skip)?;
        let mut left = peers.clone();
        for n in numbers {
            if left.is_empty() {
                break;
            }
            let Some(peer) = peer_of(borrow(n), local_port).filter(|p| left.contains(p)) else {
                continue;
            };
            let still = |fd: BorrowedFd<'_>| is_connection(fd, local_port, peer);
            let both = rustix::net::Shutdown::Both;
            let shut = match reserve.as_mut() {
                Some(r) => {
                    rustix::io::dup2(borrow(n), &mut r.slot).is_ok()
                        && still(r.slot.as_fd())
                        && rustix::net::shutdown(&r.slot, both).is_ok()
                }
                None => verified_dup(borrow(n), still)
                    .is_some_and(|d| rustix::net::shutdown(&d, both).is_ok()),
            };
            if shut {
                left.remove(&peer);
            }
        }
        if let Some(Reserve { dir, slot, .. }) = reserve.as_mut() {
            // Let go of the last connection: its descriptors must close when tiny_http's do.
            let _ = dir.fd().and_then(|d| rustix::io::dup2(d, slot));
        }
        Ok(peers.len() - left.len())
    }
}

/// The open descriptor numbers not in `skip` (nor the reserve's own), highest first,
/// and how many are open in all.
fn list(reserve: Option<&mut Reserve>, skip: &FdSet) -> std::io::Result<(Vec<i32>, usize)> {
    let mut all: Vec<i32> = Vec::new();
    let mut own = Vec::new();
    match reserve {
        Some(r) => {
            own.extend([r.dir_number, r.slot.as_raw_fd()]);
            r.dir.rewind();
            while let Some(entry) = r.dir.read() {
                let entry = entry?;
                if let Some(n) = entry.file_name().to_str().ok().and_then(|s| s.parse().ok()) {
                    all.push(n);
                }
            }
        }
        None => {
            all.extend(
                std::fs::read_dir("/proc/self/fd")?
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()),
            );
        }
    }
    let open = all.len();
    all.retain(|n| !skip.contains(*n) && !own.contains(n));
    // New connections usually hold the highest numbers: look there first.
    all.sort_unstable_by(|a, b| b.cmp(a));
    Ok((all, open))
}

/// Whether descriptor `number` is `listener`'s socket (a duplicate of it): tiny_http's
/// accept thread holds the listening socket under its own number and closes it when
/// the thread ends, for whatever reason.
pub fn is_same_socket(number: i32, listener: &impl AsFd) -> bool {
    let (Ok(theirs), Ok(ours)) = (
        rustix::fs::fstat(borrow(number)),
        rustix::fs::fstat(listener),
    ) else {
        return false;
    };
    rustix::fs::FileType::from_raw_mode(theirs.st_mode) == rustix::fs::FileType::Socket
        && (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
}

/// Whether at least `n` descriptors are free: tries to take them (duplicates of
/// `any`) and gives them back.
pub fn fds_free(any: &impl AsFd, n: usize) -> bool {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match rustix::io::fcntl_dupfd_cloexec(any, 0) {
            Ok(fd) => held.push(fd),
            Err(_) => return false,
        }
    }
    true
}

/// The lowest free descriptor number (the kernel hands out the lowest), or None when
/// none is free. Cheap: a flood fills numbers from the bottom up, so a high number
/// says the table is nearly full.
pub fn lowest_free_fd() -> Option<i32> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty());
    fd.ok().map(|fd| fd.as_raw_fd())
}

/// The open-file limit in force now (an operator may change it while we run).
pub fn fd_limit() -> u64 {
    use rustix::process::{getrlimit, Resource};
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Borrows a descriptor number for a few system calls.
fn borrow<'a>(fd: i32) -> BorrowedFd<'a> {
    // SAFETY: `borrow_raw` needs the fd to stay open while borrowed. Callers only make
    // read-only queries (getsockname/getpeername/fstat/FIONREAD) and a duplication (F_DUPFD_CLOEXEC,
    // or dup2 into our reserve slot) on it; if another thread closed the number
    // meanwhile these fail with EBADF, and if the number was reused they describe
    // another file — which the check on the duplicate (`verified_dup`, or the same
    // check on the slot) rejects before anything acts on it. `adopt` duplicates with
    // no check: its caller holds the tiny_http request whose streams own the number,
    // so it can neither close nor change hands while borrowed. No memory is reached
    // through the fd.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Duplicates `fd` and keeps the duplicate only if it still passes `check`.
fn verified_dup(fd: BorrowedFd<'_>, check: impl Fn(BorrowedFd<'_>) -> bool) -> Option<OwnedFd> {
    let dup = rustix::io::fcntl_dupfd_cloexec(fd, 0).ok()?;
    check(dup.as_fd()).then_some(dup)
}

/// The peer of a TCP connection accepted on `local_port`, if `fd` is one.
fn peer_of(fd: BorrowedFd<'_>, local_port: u16) -> Option<SocketAddr> {
    match look_at(fd, local_port) {
        Looked::Connection(peer) => Some(peer),
        Looked::OurPort | Looked::Elsewhere | Looked::Free => None,
    }
}

/// What a descriptor number holds, as far as finding connections goes.
enum Looked {
    /// A connection to our port, from this peer.
    Connection(SocketAddr),
    /// A socket on our port with no peer: the listener, or a connection already
    /// reset (whose number will soon be free).
    OurPort,
    /// Open, and nothing on our port: a file, a pipe, another port's socket.
    Elsewhere,
    /// Not open.
    Free,
}

fn look_at(fd: BorrowedFd<'_>, local_port: u16) -> Looked {
    use rustix::io::Errno;
    let local = match rustix::net::getsockname(fd) {
        Ok(a) => a,
        Err(Errno::BADF) => return Looked::Free,
        Err(_) => return Looked::Elsewhere,
    };
    match SocketAddr::try_from(local) {
        Ok(l) if l.port() == local_port => {}
        _ => return Looked::Elsewhere,
    }
    match rustix::net::getpeername(fd)
        .ok()
        .flatten()
        .map(SocketAddr::try_from)
    {
        Some(Ok(peer)) => Looked::Connection(peer),
        _ => Looked::OurPort,
    }
}

fn is_connection(fd: BorrowedFd<'_>, local_port: u16, peer: SocketAddr) -> bool {
    peer_of(fd, local_port) == Some(peer)
}

/// Pending connections the kernel may queue before we accept them (it caps this at
/// `net.core.somaxconn`). The standard library's 128 drops SYNs when every client
/// reconnects at once after a restart, and each dropped one waits a second to retry.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds and listens on `addr` (the first address it resolves to) with a deep
/// backlog and the socket options of [`tune_listener`].
pub fn listen(addr: &str) -> std::io::Result<std::net::TcpListener> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    use std::net::ToSocketAddrs;
    let at = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    })?;
    let family = match at {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket(family, SocketType::STREAM, None)?;
    // As the standard library does: rebind at once after a restart.
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &at)?;
    rustix::net::listen(&fd, LISTEN_BACKLOG)?;
    let listener = std::net::TcpListener::from(fd);
    tune_listener(&listener);
    Ok(listener)
}

/// Makes tiny_http's connection pool take up to `times` more connections: the
/// reaper's safety net for connections it sees waiting unread.
///
/// The vendored pool starts a thread for each connection no idle thread is left for,
/// so this should find nothing to do; if a connection ever does land behind one that
/// holds its thread (idle, or a WebSocket), each empty connection of our own is a task
/// that gets a new thread, which then takes the next queued connection. A nudge never
/// waits: it starts a connection without blocking and closes it; on loopback the
/// handshake is usually done before `connect` returns, and one the full listen queue
/// would delay is lost.
pub fn nudge_pool(listening: SocketAddr, times: usize) {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let mut to = listening;
    if to.ip().is_unspecified() {
        to.set_ip(match to {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let family = match to {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    for _ in 0..times {
        let Ok(fd) = rustix::net::socket_with(family, SocketType::STREAM, flags, None) else {
            return;
        };
        let _ = rustix::net::connect(&fd, &to);
    }
}

/// Socket options every accepted connection inherits from the listener: no Nagle delay
/// (chat frames are small and latency matters), and TCP keepalive as a backstop for
/// peers that vanished without a word (the server's WebSocket pings catch them first).
fn tune_listener(listener: &std::net::TcpListener) {
    use rustix::net::sockopt;
    let _ = sockopt::set_tcp_nodelay(listener, true);
    let _ = sockopt::set_socket_keepalive(listener, true);
    let _ = sockopt::set_tcp_keepidle(listener, std::time::Duration::from_secs(60));
    let _ = sockopt::set_tcp_keepintvl(listener, std::time::Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(listener, 6);
}

/// The machine's ceiling for open sockets: the open-file limit (soft, hard) and
/// `vm.max_map_count`, and how many WebSockets fit under them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    /// Soft open-file limit.
    pub files_soft: u64,
    /// Hard open-file limit (the server raises the soft limit to it).
    pub files_hard: u64,
    /// `vm.max_map_count` (None if unreadable).
    pub max_map_count: Option<u64>,
}

impl Ceiling {
    /// Reads this process's limits.
    pub fn read() -> Ceiling {
        use rustix::process::{getrlimit, Resource};
        let lim = getrlimit(Resource::Nofile);
        Ceiling {
            files_soft: lim.current.unwrap_or(u64::MAX),
            files_hard: lim.maximum.unwrap_or(u64::MAX),
            max_map_count: std::fs::read_to_string("/proc/sys/vm/max_map_count")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }

    /// WebSockets that fit under the hard open-file limit: see [`socket_ceiling`].
    pub fn sockets(&self) -> u64 {
        socket_ceiling(self.files_hard, self.max_map_count)
    }
}

/// Memory mappings a thread holds: its stack and guard page; elsewhere than where
/// [`main`] starts the process, also the standard library's signal stack and its
/// guard.
pub const MAPS_PER_THREAD: u64 = if cfg!(all(target_os = "linux", target_env = "gnu")) {
    2
} else {
    4
};

/// Chat WebSockets that fit in `files` descriptors and `max_map_count` memory
/// mappings: each holds 3 descriptors (plus 512 kept for everything else) and one
/// thread, its reader, of [`MAPS_PER_THREAD`] mappings (plus 2,000 kept). Never zero.
pub fn socket_ceiling(files: u64, max_map_count: Option<u64>) -> u64 {
    let by_fds = files.saturating_sub(512) / 3;
    let by_maps = max_map_count.map_or(u64::MAX, |m| m.saturating_sub(2000) / MAPS_PER_THREAD);
    by_fds.min(by_maps).max(1)
}

/// Raises the open-file limit as far as allowed — each WebSocket costs 3 descriptors
/// and tiny_http's accept thread panics at EMFILE. A privileged process may lift the
/// hard limit up to the kernel's `fs.nr_open`; others get their hard limit. Returns
/// the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    let set = |n: u64| {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(n),
                maximum: Some(n),
            },
        )
    };
    let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
    if wanted <= hard || set(wanted).is_err() {
        let _ = set(hard);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Where the process starts on Linux with glibc, instead of the standard library's
/// runtime start (`main.rs` is `#![no_main]` there).
///
/// That start installs a SIGSEGV handler that prints "thread … has overflowed its
/// stack", and so gives every thread it starts an alternate signal stack: two more
/// memory mappings (the stack and its guard page) and five more system calls
/// (`mmap`, `mprotect`, `sigaltstack`, `pthread_getattr_np`'s `sched_getaffinity`,
/// and `munmap` at the thread's end). With a thread per socket that was a seventh of
/// the server's CPU in a reconnect storm (a profile, 2026-12-03; 5,000 threads start
/// at 28 µs each without it, 46 µs with it) and half the mappings a socket costs,
/// which `vm.max_map_count` bounds ([`socket_ceiling`]). Without the handler a stack
/// overflow still ends the process when it touches the guard page — by SIGSEGV,
/// without the message.
///
/// What that start did and parley needs is done here: SIGPIPE ignored (a write to a
/// closed pipe or socket fails with EPIPE instead of killing the server), the
/// standard descriptors kept open ([`keep_standard_descriptors`]), a panic out of
/// [`crate::run`] ends the process with 101, and `std::process::exit` flushes stdout.
/// `std::env::args` is filled by glibc's `.init_array` hook, which runs either way.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
// SAFETY: `no_mangle` exports this as the C symbol `main`, which glibc's start code
// calls with the usual signature (the arguments are not read); `main.rs` is
// `#![no_main]` under the same condition, so no other `main` is linked.
#[no_mangle]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // SAFETY: `signal` with SIG_IGN installs no handler code, only a disposition, and
    // runs before any other thread exists; the standard library's start does the same.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    keep_standard_descriptors();
    let code = std::panic::catch_unwind(crate::run).unwrap_or(101);
    std::process::exit(code)
}

/// Puts `/dev/null` on whichever of descriptors 0, 1 and 2 is closed, as the standard
/// library's start does: otherwise the first file or connection opened would take the
/// number, and log lines meant for stderr would go to it.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
fn keep_standard_descriptors() {
    for _ in 0..3 {
        let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        else {
            return;
        };
        if null.as_raw_fd() > 2 {
            return;
        }
        // Left open for the process's life, in the slot it filled.
        let _ = rustix::fd::IntoRawFd::into_raw_fd(null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// tiny_http reports the descriptors a request holds: an upgrade keeps both
    /// streams, a plain GET only the one it answers on. Adopting them gives a
    /// duplicate that writes to exactly that client.
    #[test]
    fn a_request_names_its_connections_descriptors() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let ask = |head: &str| {
            let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            client.write_all(head.as_bytes()).unwrap();
            (client, server.recv().unwrap())
        };
        let (_plain, get) = ask("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(get.socket_fds().len(), 1, "its write stream");
        let upgrade = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n";
        let (mut client, request) = ask(upgrade);
        let me = client.local_addr().unwrap();
        assert_eq!(request.socket_fds().len(), 2, "its read and write streams");
        for n in request.socket_fds() {
            assert_eq!(peer_of(borrow(*n), port), Some(me), "descriptor {n}");
        }
        let known = KnownSockets::default();
        let adopted = known.adopt(request.socket_fds()).unwrap();
        assert_eq!(adopted.numbers.len(), 3);
        TcpStream::from(adopted.fd).write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        assert!(
            known.adopt(&[]).is_err(),
            "nothing reported, nothing adopted"
        );
    }

    #[test]
    fn fd_sets_hold_what_was_put_in() {
        let mut s = FdSet::default();
        for n in [0, 1, 5, 64, 130] {
            s.insert(n);
        }
        s.remove(1);
        s.insert(-1);
        assert!(s.contains(130) && s.contains(0) && s.contains(64));
        assert!(!s.contains(1) && !s.contains(-1) && !s.contains(2) && !s.contains(9999));
    }

    #[test]
    fn accepted_connections_inherit_nodelay_and_keepalive() {
        use rustix::net::sockopt;
        let listener = listen("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (conn, _) = listener.accept().unwrap();
        assert!(sockopt::tcp_nodelay(&conn).unwrap());
        assert!(sockopt::socket_keepalive(&conn).unwrap());
        assert_eq!(
            sockopt::tcp_keepidle(&conn).unwrap(),
            std::time::Duration::from_secs(60)
        );
    }

    /// A listener's port, `n` clients connected to it, and their accepted ends.
    fn connections(n: usize) -> (u16, Vec<TcpStream>, Vec<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let accepted = (0..n).map(|_| listener.accept().unwrap().0).collect();
        (port, clients, accepted)
    }

    #[test]
    fn adopted_sockets_are_skipped_until_released() {
        let (port, clients, accepted) = connections(5);
        let known = KnownSockets::default();
        let mut adopted = Vec::new();
        for (i, (client, ours)) in clients.iter().zip(&accepted).enumerate() {
            let it = known.adopt(&[ours.as_raw_fd()]).unwrap();
            // Writing through the duplicate must reach exactly this client.
            let mut dup = TcpStream::from(it.fd.try_clone().unwrap());
            dup.write_all(&[i as u8]).unwrap();
            let mut c = client.try_clone().unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
            adopted.push(it);
        }
        // Adopted sockets are skipped: no plain connection is left.
        assert!(known.survey(port).unwrap().peers.is_empty());
        let first = clients[0].local_addr().unwrap();
        let it = adopted.remove(0);
        known.release(&it.numbers);
        drop(it);
        assert_eq!(known.survey(port).unwrap().peers, vec![first]);
        assert!(known.shut_down(port, first).unwrap());
        let mut c = clients[0].try_clone().unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            c.read(&mut b).unwrap(),
            0,
            "the released connection was shut down"
        );
        drop(accepted);
    }

    fn is_shut(s: &TcpStream) -> bool {
        s.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!((&*s).read(&mut b), Ok(0))
    }

    #[test]
    fn the_reserve_lists_and_shuts_down_several_connections() {
        let (port, clients, accepted) = connections(4);
        let known = KnownSockets::default();
        known.reserve_descriptors().unwrap();
        let survey = known.survey(port).unwrap();
        // Lowest descriptor number first. Not simply the accept order: tests running beside
        // this one free descriptors between our accepts, so numbers can be reused.
        let mut by_number: Vec<&TcpStream> = accepted.iter().collect();
        by_number.sort_by_key(|s| s.as_raw_fd());
        let listed: Vec<SocketAddr> = by_number.iter().map(|s| s.peer_addr().unwrap()).collect();
        assert_eq!(survey.peers, listed);
        let expected: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        assert!(survey.unread.is_empty(), "nothing sent yet");
        (&clients[3]).write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while known.survey(port).unwrap().unread.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "unread bytes not seen"
            );
        }
        assert_eq!(
            known.survey(port).unwrap().unread,
            HashSet::from([expected[3]]),
            "bytes nobody read yet"
        );
        assert!(
            survey.open >= 2 + 8,
            "reserve and both ends of four connections"
        );
        // Through the slot: exactly the two asked for are shut down.
        let two: HashSet<SocketAddr> = expected[..2].iter().copied().collect();
        assert_eq!(known.shut_down_all(port, &two).unwrap(), 2);
        for c in &clients {
            let asked = two.contains(&c.local_addr().unwrap());
            assert_eq!(is_shut(c), asked, "{:?}", c.local_addr());
        }
        // The slot let go of the last one: closing ours ends that connection for good.
        let slot = crate::sync::lock(&known.reserve)
            .as_ref()
            .map(|r| r.slot.as_raw_fd())
            .unwrap();
        assert_eq!(
            peer_of(borrow(slot), port),
            None,
            "the slot holds no connection"
        );
        drop(accepted);
        assert!(known.survey(port).unwrap().peers.is_empty());
    }

    #[test]
    fn tells_whether_a_number_is_still_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let theirs = listener.try_clone().unwrap();
        let number = theirs.as_raw_fd();
        assert!(is_same_socket(number, &listener));
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(
            !is_same_socket(other.as_raw_fd(), &listener),
            "another socket"
        );
        drop(theirs);
        // The number may be reused at once by a parallel test, but not for our listener.
        assert!(!is_same_socket(number, &listener), "closed");
        assert!(fds_free(&listener, 8));
        assert!(lowest_free_fd().is_some());
        assert!(fd_limit() > 8);
    }
}
