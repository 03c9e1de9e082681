//! The few Linux calls the network stack thread makes: `socketpair(2)`, `epoll(7)`, and nonblocking
//! `recv`/`send` on socketpair ends that report the errno instead of an `io::Error` allocation.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes each socketpair end asks the kernel to buffer (capped by `net.core.wmem_max`/`rmem_max`).
const SOCKETPAIR_BUFFER: libc::c_int = 1 << 20;

/// A connected pair of Unix sockets of `kind` (`SOCK_STREAM` or `SOCK_SEQPACKET`): `(ours, theirs)`.
/// Ours is nonblocking; theirs is left blocking, as a fresh socket is (the caller chooses).
pub fn socketpair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&ours, &theirs] {
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with a valid int; failure leaves the default size, which still works.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&SOCKETPAIR_BUFFER as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((ours, theirs))
}

/// The errno of the last failed call.
pub fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Nonblocking `recv` into `buf`: bytes read (0 = end of stream) or the errno.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Nonblocking `send` of `bufs` as one message (gathered): bytes sent or the errno. Never raises
/// SIGPIPE (`MSG_NOSIGNAL`).
pub fn send(fd: RawFd, bufs: &[&[u8]]) -> Result<usize, i32> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 2];
    let n = bufs.len().min(2);
    for (v, b) in iov.iter_mut().zip(bufs) {
        v.iov_base = b.as_ptr() as *mut _;
        v.iov_len = b.len();
    }
    // SAFETY: all-zero is a valid msghdr; it points at `iov`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    loop {
        // SAFETY: msg describes live buffers.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Shut down the writing half of a socket (the other end reads end-of-stream).
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: plain syscall on a descriptor the caller owns.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// An epoll instance; each registration carries a `u64` token.
pub struct Epoll(OwnedFd);

/// Readiness reported for a token.
pub const READABLE: u32 = 1;
pub const WRITABLE: u32 = 2;

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked and owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watch `fd` edge-triggered for reading and writing.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: ev is a valid epoll_event.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait up to `timeout_ms` (-1: forever) and append `(token, READABLE|WRITABLE)` to `out`.
    pub fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout_ms: i32,
        out: &mut Vec<(u64, u32)>,
    ) {
        // SAFETY: events is a valid buffer of events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        for ev in events.iter().take(n.max(0) as usize) {
            let e = ev.events as i32;
            let mut r = 0;
            if e & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                r |= READABLE;
            }
            if e & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0 {
                r |= WRITABLE;
            }
            out.push((ev.u64, r));
        }
    }
}
