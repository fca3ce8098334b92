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
}

impl KnownSockets {
    fn known(&self) -> MutexGuard<'_, HashSet<i32>> {
        crate::sync::lock(&self.fds)
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

    /// The peers of our accepted connections that are not claimed WebSockets.
    pub fn unclaimed_peers(&self, local_port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let skip = self.known().clone();
        let mut out = Vec::new();
        scan(&skip, |fd| {
            out.extend(peer_of(fd, local_port));
            true
        })?;
        Ok(out)
    }

    /// Shuts down the unclaimed connection from `peer` (both directions).
    pub fn shut_down(&self, local_port: u16, peer: SocketAddr) -> std::io::Result<bool> {
        let skip = self.known().clone();
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

/// Calls `visit` on each open descriptor not in `skip`, highest numbers first, until
/// it returns false.
fn scan(skip: &HashSet<i32>, mut visit: impl FnMut(BorrowedFd<'_>) -> bool) -> std::io::Result<()> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|n| !skip.contains(n))
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

/// Socket options every accepted connection inherits from the listener: no Nagle delay
/// (chat frames are small and latency matters), and TCP keepalive as a backstop for
/// peers that vanished without a word (the server's WebSocket pings catch them first).
pub fn tune_listener(listener: &std::net::TcpListener) {
    use rustix::net::sockopt;
    let _ = sockopt::set_tcp_nodelay(listener, true);
    let _ = sockopt::set_socket_keepalive(listener, true);
    let _ = sockopt::set_tcp_keepidle(listener, std::time::Duration::from_secs(60));
    let _ = sockopt::set_tcp_keepintvl(listener, std::time::Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(listener, 6);
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

    #[test]
    fn accepted_connections_inherit_nodelay_and_keepalive() {
        use rustix::net::sockopt;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tune_listener(&listener);
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
