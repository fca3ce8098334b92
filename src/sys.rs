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
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // New connections usually hold the highest numbers: look there first.
    fds.sort_unstable_by(|a, b| b.cmp(a));
    for fd in fds {
        // SAFETY: `borrow_raw` needs the fd to stay open while borrowed. We only make
        // read-only queries (getsockname/getpeername) and an F_DUPFD_CLOEXEC on it; if
        // another thread closed the number meanwhile these fail with EBADF, and if the
        // number was reused they describe another file — which the check on our own
        // duplicate below rejects. No memory is reached through the fd.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if !is_connection(borrowed, local_port, peer) {
            continue;
        }
        let Ok(dup) = rustix::io::fcntl_dupfd_cloexec(borrowed, 0) else {
            continue;
        };
        if is_connection(dup.as_fd(), local_port, peer) {
            return Ok(Some(dup));
        }
    }
    Ok(None)
}

fn is_connection(fd: BorrowedFd<'_>, local_port: u16, peer: SocketAddr) -> bool {
    let peer_matches = matches!(
        rustix::net::getpeername(fd).ok().flatten().map(SocketAddr::try_from),
        Some(Ok(p)) if p == peer
    );
    peer_matches
        && matches!(
            rustix::net::getsockname(fd).map(SocketAddr::try_from),
            Ok(Ok(l)) if l.port() == local_port
        )
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
        drop(accepted);
    }
}
