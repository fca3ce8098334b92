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
//!
//! The same search finds plain HTTP connections to shut down (idle, past a deadline,
//! or shed when descriptors run short). Shedding matters most when every descriptor
//! is taken, so [`KnownSockets::reserve_descriptors`] keeps two open from the start:
//! the `/proc/self/fd` directory, read again from its beginning each time, and a slot
//! that a connection is `dup2`ed into (which replaces what the slot held, so it needs
//! no free number). Also here: whether tiny_http still holds our listening socket
//! (its accept thread drops it when it dies) and how many descriptors are free.
//!
//! No thread of its own; called by the upgrade (claim), the reaper, the accept
//! supervisor ([`crate::front`]) and whoever cuts a connection ([`crate::exchange`]).
#![allow(unsafe_code)]

use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::collections::HashSet;
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

/// Descriptor numbers known to belong to live WebSockets. Scans skip them, so finding
/// a new connection costs a few system calls per *other* descriptor rather than per
/// open socket — with thousands of WebSockets that is the difference between
/// microseconds and tens of milliseconds per upgrade.
#[derive(Default)]
pub struct KnownSockets {
    fds: Mutex<HashSet<i32>>,
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
    /// Peers of our accepted connections that are not claimed WebSockets, lowest
    /// descriptor number first: numbers are handed out lowest first, so among
    /// connections open at once the earlier ones usually come first.
    pub peers: Vec<SocketAddr>,
    /// Descriptors this process has open, all kinds.
    pub open: usize,
    /// Peers whose connection has bytes waiting unread in the kernel.
    pub unread: HashSet<SocketAddr>,
}

impl KnownSockets {
    fn known(&self) -> MutexGuard<'_, HashSet<i32>> {
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

    /// Finds the TCP socket whose local port is `local_port` and whose peer is `peer`,
    /// duplicates it, and records its descriptor numbers.
    pub fn claim(&self, local_port: u16, peer: SocketAddr) -> std::io::Result<Option<Claimed>> {
        let mut known = self.known();
        let matches = |fd: BorrowedFd<'_>| -> Option<(i32, OwnedFd)> {
            if !is_connection(fd, local_port, peer) {
                return None;
            }
            let dup = verified_dup(fd, |d| is_connection(d, local_port, peer))?;
            Some((fd.as_raw_fd(), dup))
        };
        // The kernel hands out the lowest free number, so a new connection sits low:
        // counting up past the known numbers finds it without listing /proc (which
        // costs milliseconds with thousands of descriptors open).
        let upto = known.iter().max().copied().unwrap_or(0).saturating_add(256);
        let mut found = (0..=upto)
            .filter(|n| !known.contains(n))
            .find_map(|n| matches(borrow(n)));
        if found.is_none() {
            scan(&known, |fd| {
                found = matches(fd);
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
        known.extend(numbers.iter().copied());
        Ok(Some(Claimed { fd, numbers }))
    }

    /// Forgets a WebSocket's numbers; call before its connection is closed, since
    /// closed numbers are reused by new connections.
    pub fn release(&self, numbers: &[i32]) {
        let mut known = self.known();
        for n in numbers {
            known.remove(n);
        }
    }

    /// The peers of our accepted connections that are not claimed WebSockets, and how
    /// many descriptors are open.
    pub fn survey(&self, local_port: u16) -> std::io::Result<Survey> {
        let skip = self.known().clone();
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

    /// Shuts down the unclaimed connection from `peer` (both directions).
    pub fn shut_down(&self, local_port: u16, peer: SocketAddr) -> std::io::Result<bool> {
        Ok(self.shut_down_all(local_port, &HashSet::from([peer]))? > 0)
    }

    /// Shuts down the unclaimed connections from `peers` (both directions) in one
    /// listing; returns how many were found.
    pub fn shut_down_all(
        &self,
        local_port: u16,
        peers: &HashSet<SocketAddr>,
    ) -> std::io::Result<usize> {
        if peers.is_empty() {
            return Ok(0);
        }
        let skip = self.known().clone();
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
fn list(reserve: Option<&mut Reserve>, skip: &HashSet<i32>) -> std::io::Result<(Vec<i32>, usize)> {
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
    all.retain(|n| !skip.contains(n) && !own.contains(n));
    // New connections usually hold the highest numbers: look there first.
    all.sort_unstable_by(|a, b| b.cmp(a));
    Ok((all, open))
}

/// Calls `visit` on each open descriptor not in `skip`, highest numbers first, until
/// it returns false.
fn scan(skip: &HashSet<i32>, mut visit: impl FnMut(BorrowedFd<'_>) -> bool) -> std::io::Result<()> {
    for fd in list(None, skip)?.0 {
        if !visit(borrow(fd)) {
            break;
        }
    }
    Ok(())
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
    // check on the slot) rejects before anything acts on it. No memory is reached
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
    let local = SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()?;
    if local.port() != local_port {
        return None;
    }
    SocketAddr::try_from(rustix::net::getpeername(fd).ok()??).ok()
}

fn is_connection(fd: BorrowedFd<'_>, local_port: u16, peer: SocketAddr) -> bool {
    peer_of(fd, local_port) == Some(peer)
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
    fn finds_the_right_socket_among_many() {
        let (port, clients, accepted) = connections(5);
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
        assert!(known.survey(port).unwrap().peers.is_empty());
        let first = clients[0].local_addr().unwrap();
        known.release(&claims.remove(0).numbers);
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
        // In the order they were accepted (their numbers ascend).
        let expected: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        assert_eq!(survey.peers, expected);
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
