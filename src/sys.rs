//! The one module that may use `unsafe`: finding the TCP socket behind an upgraded
//! tiny_http connection, plus process limits.
//!
//! tiny_http hands an upgraded connection back as an opaque `Box<dyn ReadWrite>`: no
//! fd, no clone, no non-blocking writes. Fan-out must write to a socket from other
//! threads without ever blocking (NOTES.md, design C), so we find the socket's file
//! descriptor ourselves: the kernel knows every fd of this process, and exactly one
//! TCP socket has our local port and the client's address as its two ends. We
//! duplicate that fd and verify the duplicate's ends again, so the answer is right
//! even if the numbers changed hands while we looked.
#![allow(unsafe_code)]

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::net::SocketAddr;

/// Finds this process's TCP socket whose local port is `local_port` and whose peer is
/// `peer`, and returns a duplicate of its descriptor.
pub fn find_tcp_socket(local_port: u16, peer: SocketAddr) -> std::io::Result<Option<OwnedFd>> {
    let mut found = None;
    scan(|fd| {
        if !is_connection(fd, local_port, peer) {
            return true;
        }
        if let Some(dup) = verified_dup(fd, |d| is_connection(d, local_port, peer)) {
            found = Some(dup);
            return false;
        }
        true
    })?;
    Ok(found)
}

/// Every TCP connection of this process accepted on `local_port`, with its peer
/// address and a duplicate of its descriptor.
pub fn tcp_connections(local_port: u16) -> std::io::Result<Vec<(SocketAddr, OwnedFd)>> {
    let mut out = Vec::new();
    scan(|fd| {
        let Some(peer) = peer_of(fd, local_port) else {
            return true;
        };
        if let Some(dup) = verified_dup(fd, |d| is_connection(d, local_port, peer)) {
            out.push((peer, dup));
        }
        true
    })?;
    Ok(out)
}

/// Calls `visit` on each open descriptor, newest numbers first, until it returns false.
fn scan(mut visit: impl FnMut(BorrowedFd<'_>) -> bool) -> std::io::Result<()> {
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // New connections usually hold the highest numbers: look there first.
    fds.sort_unstable_by(|a, b| b.cmp(a));
    for fd in fds {
        // SAFETY: `borrow_raw` needs the fd to stay open while borrowed. Callers only
        // make read-only queries (getsockname/getpeername) and an F_DUPFD_CLOEXEC on
        // it; if another thread closed the number meanwhile these fail with EBADF, and
        // if the number was reused they describe another file — which the check on the
        // duplicate (`verified_dup`) rejects. No memory is reached through the fd.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if !visit(borrowed) {
            break;
        }
    }
    Ok(())
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

/// Raises the open-file soft limit to the hard limit; each WebSocket costs 2–3 fds
/// and tiny_http's accept thread panics at EMFILE. Returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_the_right_socket_among_many() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let accepted: Vec<TcpStream> = (0..5).map(|_| listener.accept().unwrap().0).collect();
        for (i, client) in clients.iter().enumerate() {
            let peer = client.local_addr().unwrap();
            let fd = find_tcp_socket(port, peer).unwrap().expect("socket found");
            // Writing through the duplicate must reach exactly this client.
            let mut dup = TcpStream::from(fd);
            dup.write_all(&[i as u8]).unwrap();
            let mut c = client.try_clone().unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
        }
        let stranger: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(find_tcp_socket(port, stranger).unwrap().is_none());
        let mut all: Vec<SocketAddr> = tcp_connections(port)
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect();
        let mut want: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        all.sort();
        want.sort();
        assert_eq!(all, want, "exactly the accepted connections");
        drop(accepted);
    }
}
