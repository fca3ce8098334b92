//! The one module that may use `unsafe`: finding the TCP socket behind an upgraded
//! tiny_http connection, plus process limits.
//!
//! tiny_http hands an upgraded connection back as an opaque `Box<dyn ReadWrite>`: no
//! fd, no clone, no non-blocking writes. Fan-out must write to a socket from other
//! threads without ever blocking (see [`crate::peer`]), so we find the socket's file
//! descriptor ourselves: the kernel knows every fd of this process, and exactly one
//! TCP socket has our local port and the client's address as its two ends. We
//! duplicate that fd and verify the duplicate's ends again, so the answer is right
//! even if the numbers changed hands while we looked.
#![allow(unsafe_code)]

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

/// A socket found by [`KnownSockets::claim`]: our duplicate of it, and every
/// descriptor number of it (tiny_http's two and ours) that later scans skip.
#[derive(Debug)]
pub struct Claimed {
    /// Our duplicate, for non-blocking writes.
    pub fd: OwnedFd,
    /// Numbers to hand back to [`KnownSockets::release`] before the connection closes.
    pub numbers: Vec<i32>,
}

/// How far past the highest known WebSocket descriptor a search walks, in words of 64
/// numbers: in a burst of upgrades, hundreds of connections accepted but not yet
/// upgraded sit above it.
const GAP_MARGIN: usize = 16;

/// A set of descriptor numbers as bits: cheap to walk for the numbers *not* in it.
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

    /// The numbers from 0 up to [`GAP_MARGIN`] words past the highest member of
    /// either set that are in neither, lowest first.
    fn gaps<'a>(&'a self, also: &'a FdSet) -> impl Iterator<Item = i32> + 'a {
        let len = self.words.len().max(also.words.len()) + GAP_MARGIN;
        (0..len)
            .map(|i| {
                let w = |s: &FdSet| s.words.get(i).copied().unwrap_or(0);
                (i, w(self) | w(also))
            })
            .filter(|(_, w)| *w != u64::MAX)
            .flat_map(|(i, w)| {
                (0..64)
                    .filter(move |b| w & (1 << b) == 0)
                    .map(move |b| (i * 64 + b) as i32)
            })
    }

    /// The members, lowest first.
    fn members(&self) -> impl Iterator<Item = i32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| (i * 64 + b) as i32)
        })
    }
}

/// Peers seen on descriptors a search passed over, remembered (and checked again
/// before use), so that in a burst of upgrades each connection is looked at about
/// once instead of once per upgrade accepted before it.
const SEEN_MAX: usize = 8192;

#[derive(Default)]
struct Fds {
    /// Descriptors of live WebSockets: searches skip them.
    known: FdSet,
    /// Peer address → the descriptor a search saw it on.
    seen: std::collections::HashMap<SocketAddr, i32>,
    /// The descriptors in `seen`: a search looks at them only if it found nothing
    /// elsewhere (one may since have closed and been reused by the new connection).
    seen_fds: FdSet,
}

impl Fds {
    fn forget_seen(&mut self) {
        self.seen.clear();
        self.seen_fds = FdSet::default();
    }
}

/// Descriptor numbers known to belong to live WebSockets. Scans skip them, so finding
/// a new connection costs a few system calls per *other* descriptor rather than per
/// open socket — with thousands of WebSockets that is the difference between
/// microseconds and tens of milliseconds per upgrade.
#[derive(Default)]
pub struct KnownSockets {
    fds: Mutex<Fds>,
}

impl KnownSockets {
    fn fds(&self) -> MutexGuard<'_, Fds> {
        crate::sync::lock(&self.fds)
    }

    /// Finds the TCP socket whose local port is `local_port` and whose peer is `peer`,
    /// duplicates it, and records its descriptor numbers.
    pub fn claim(&self, local_port: u16, peer: SocketAddr) -> std::io::Result<Option<Claimed>> {
        let mut fds = self.fds();
        let dup_of = |fd: BorrowedFd<'_>| verified_dup(fd, |d| is_connection(d, local_port, peer));
        let mut found = fds.seen.remove(&peer).and_then(|n| {
            fds.seen_fds.remove(n);
            Some((n, dup_of(borrow(n))?))
        });
        if found.is_none() {
            // The kernel hands out the lowest free number, so a new connection sits
            // low: walking up past the known numbers finds it without listing /proc
            // (which costs milliseconds with thousands of descriptors open).
            found = search_gaps(&mut fds, local_port, peer);
        }
        if found.is_none() {
            found = search_seen(&mut fds, local_port, peer);
        }
        if found.is_none() {
            scan(&fds.known, |fd| {
                found = is_connection(fd, local_port, peer)
                    .then(|| Some((fd.as_raw_fd(), dup_of(fd)?)))
                    .flatten();
                found.is_none()
            })?;
        }
        let Some((number, fd)) = found else {
            return Ok(None);
        };
        // tiny_http holds the connection twice (try_clone), usually at a neighbouring
        // number; skip that one too when it is ours.
        let mut numbers = vec![number, fd.as_raw_fd()];
        for n in [number - 1, number + 1] {
            if n >= 0 && !numbers.contains(&n) && is_connection(borrow(n), local_port, peer) {
                numbers.push(n);
            }
        }
        for n in &numbers {
            fds.known.insert(*n);
            fds.seen_fds.remove(*n);
        }
        Ok(Some(Claimed { fd, numbers }))
    }

    /// Forgets a WebSocket's numbers; call before its connection is closed, since
    /// closed numbers are reused by new connections.
    pub fn release(&self, numbers: &[i32]) {
        let mut fds = self.fds();
        for n in numbers {
            fds.known.remove(*n);
        }
    }

    /// The peers of our accepted connections that are not claimed WebSockets.
    pub fn unclaimed_peers(&self, local_port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let skip = self.fds().known.clone();
        let mut out = Vec::new();
        scan(&skip, |fd| {
            out.extend(peer_of(fd, local_port));
            true
        })?;
        Ok(out)
    }

    /// Shuts down the unclaimed connection from `peer` (both directions).
    pub fn shut_down(&self, local_port: u16, peer: SocketAddr) -> std::io::Result<bool> {
        let skip = self.fds().known.clone();
        let mut done = false;
        scan(&skip, |fd| {
            if let Some(dup) = verified_dup(fd, |d| is_connection(d, local_port, peer)) {
                done = rustix::net::shutdown(&dup, rustix::net::Shutdown::Both).is_ok();
                return false;
            }
            true
        })?;
        Ok(done)
    }
}

/// Walks the numbers that are not known WebSockets, lowest first, for the connection
/// from `peer`; remembers the other connections it passes.
fn search_gaps(fds: &mut Fds, local_port: u16, peer: SocketAddr) -> Option<(i32, OwnedFd)> {
    if fds.seen.len() >= SEEN_MAX {
        fds.forget_seen();
    }
    let Fds {
        known,
        seen,
        seen_fds,
    } = fds;
    let mut passed = Vec::new();
    let mut found = None;
    for n in known.gaps(seen_fds) {
        match peer_of(borrow(n), local_port) {
            Some(p) if p == peer => {
                found = verified_dup(borrow(n), |d| is_connection(d, local_port, peer))
                    .map(|dup| (n, dup));
                if found.is_some() {
                    break;
                }
            }
            Some(other) => passed.push((other, n)),
            None => {}
        }
    }
    for (other, n) in passed {
        seen.insert(other, n);
        seen_fds.insert(n);
    }
    found
}

/// Looks again at the descriptors earlier searches saw (checking each, since any may
/// have closed and been reused), for the connection from `peer`.
fn search_seen(fds: &mut Fds, local_port: u16, peer: SocketAddr) -> Option<(i32, OwnedFd)> {
    let numbers: Vec<i32> = fds.seen_fds.members().collect();
    fds.forget_seen();
    let mut found = None;
    for n in numbers {
        match peer_of(borrow(n), local_port) {
            Some(p) if p == peer && found.is_none() => {
                found = verified_dup(borrow(n), |d| is_connection(d, local_port, peer))
                    .map(|dup| (n, dup));
            }
            Some(other) => {
                fds.seen.insert(other, n);
                fds.seen_fds.insert(n);
            }
            None => {}
        }
    }
    found
}

/// Calls `visit` on each open descriptor not in `skip`, highest numbers first, until
/// it returns false.
fn scan(skip: &FdSet, mut visit: impl FnMut(BorrowedFd<'_>) -> bool) -> std::io::Result<()> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|n| !skip.contains(*n))
        .collect();
    // New connections usually hold the highest numbers: look there first.
    fds.sort_unstable_by(|a, b| b.cmp(a));
    for fd in fds {
        if !visit(borrow(fd)) {
            break;
        }
    }
    Ok(())
}

/// Borrows a descriptor number for a few system calls.
fn borrow<'a>(fd: i32) -> BorrowedFd<'a> {
    // SAFETY: `borrow_raw` needs the fd to stay open while borrowed. Callers only make
    // read-only queries (getsockname/getpeername) and an F_DUPFD_CLOEXEC on it; if
    // another thread closed the number meanwhile these fail with EBADF, and if the
    // number was reused they describe another file — which the check on the duplicate
    // (`verified_dup`) rejects. No memory is reached through the fd.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Duplicates `fd` and keeps the duplicate only if it still passes `check`.
fn verified_dup(fd: BorrowedFd<'_>, check: impl Fn(BorrowedFd<'_>) -> bool) -> Option<OwnedFd> {
    let dup = rustix::io::fcntl_dupfd_cloexec(fd, 0).ok()?;
    check(dup.as_fd()).then_some(dup)
}

/// The peer of a TCP connection accepted on `local_port`, if `fd` is one.
fn peer_of(fd: BorrowedFd<'_>, local_port: u16) -> Option<SocketAddr> {
    let local = SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()?;
    if local.port() != local_port {
        return None;
    }
    SocketAddr::try_from(rustix::net::getpeername(fd).ok()??).ok()
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

/// Opens a TCP connection to `to` without waiting for it and closes it again: on
/// loopback the handshake is usually done before `connect` returns, so the listener
/// sees a connection that ends at once; if not, nothing is left behind.
pub fn connect_and_close(to: SocketAddr) {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = match to {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    if let Ok(fd) = rustix::net::socket_with(family, SocketType::STREAM, flags, None) {
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

    /// WebSockets that fit: each holds 3 descriptors (plus 512 kept for everything
    /// else) and 2 threads of 4 memory mappings each (plus 2,000 kept).
    pub fn sockets(&self) -> u64 {
        let by_fds = self.files_hard.saturating_sub(512) / 3;
        let by_maps = self
            .max_map_count
            .map_or(u64::MAX, |m| m.saturating_sub(2000) / 8);
        by_fds.min(by_maps).max(1)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Claiming the newest connection first walks past the older ones and remembers
    /// them; claiming those then takes no walk, and still gets the right socket.
    #[test]
    fn a_search_remembers_the_connections_it_passes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let _accepted: Vec<TcpStream> = (0..4).map(|_| listener.accept().unwrap().0).collect();
        let known = KnownSockets::default();
        let newest = clients[3].local_addr().unwrap();
        assert!(known.claim(port, newest).unwrap().is_some());
        let remembered = known.fds().seen.len();
        assert!(remembered >= 3, "passed {remembered} connections");
        for (i, client) in clients.iter().enumerate().take(3) {
            let claim = known.claim(port, client.local_addr().unwrap()).unwrap();
            let mut dup = TcpStream::from(claim.expect("found").fd);
            dup.write_all(&[i as u8]).unwrap();
            let mut b = [0u8; 1];
            client.try_clone().unwrap().read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8, "the right socket");
        }
        assert!(
            known.fds().seen.len() < remembered,
            "used entries are dropped"
        );
    }

    #[test]
    fn fd_sets_walk_their_gaps() {
        let mut s = FdSet::default();
        for n in [0, 1, 2, 3, 5, 64, 65, 130] {
            s.insert(n);
        }
        s.remove(1);
        assert!(s.contains(130) && !s.contains(1) && !s.contains(-1));
        let none = FdSet::default();
        let gaps: Vec<i32> = s.gaps(&none).take(5).collect();
        assert_eq!(gaps, vec![1, 4, 6, 7, 8]);
        assert_eq!(
            s.gaps(&none).last(),
            Some(64 * (3 + GAP_MARGIN as i32) - 1),
            "up to the margin past the highest word"
        );
        assert!(!s
            .gaps(&none)
            .any(|n| [0, 2, 3, 5, 64, 65, 130].contains(&n)));
        let mut also = FdSet::default();
        also.insert(4);
        assert_eq!(s.gaps(&also).take(2).collect::<Vec<_>>(), vec![1, 6]);
        assert_eq!(also.members().collect::<Vec<_>>(), vec![4]);
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

    #[test]
    fn finds_the_right_socket_among_many() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let accepted: Vec<TcpStream> = (0..5).map(|_| listener.accept().unwrap().0).collect();
        let known = KnownSockets::default();
        let mut claims = Vec::new();
        for (i, client) in clients.iter().enumerate() {
            let peer = client.local_addr().unwrap();
            let claim = known.claim(port, peer).unwrap().expect("socket found");
            // Writing through the duplicate must reach exactly this client.
            let mut dup = TcpStream::from(claim.fd.try_clone().unwrap());
            dup.write_all(&[i as u8]).unwrap();
            let mut c = client.try_clone().unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
            claims.push(claim);
        }
        let stranger: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(known.claim(port, stranger).unwrap().is_none());
        // Claimed sockets are skipped: nothing is left unclaimed.
        assert!(known.unclaimed_peers(port).unwrap().is_empty());
        let first = clients[0].local_addr().unwrap();
        known.release(&claims.remove(0).numbers);
        assert_eq!(known.unclaimed_peers(port).unwrap(), vec![first]);
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
}
