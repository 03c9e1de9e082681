//! The two packet transports a `Device` needs, as small traits, and their Linux implementations:
//! a TUN interface (`/dev/net/tun`) and a dual-stack UDP socket.
//!
//! Reads block until a packet arrives or `close` is called (then they return `ErrorKind::NotConnected`),
//! so device threads can be stopped promptly. Buffers are the caller's; the shape (one packet per call
//! into a caller buffer) leaves room for recvmmsg/sendmmsg and TUN offloads later.

use crate::error::{Error, Result};
use std::io;
use std::mem::ManuallyDrop;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Where IP packets enter and leave the host: a TUN interface, or a test's in-memory channel.
pub trait Tun: Send + Sync + 'static {
    /// Read one IP packet into `buf`; blocks. `NotConnected` once closed.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one IP packet to the host.
    fn send(&self, packet: &[u8]) -> io::Result<()>;
    /// Wake blocked readers; later reads fail with `NotConnected`.
    fn close(&self);
    /// Release the interface (the TUN disappears); called once no thread reads it any more.
    fn release(&self) {}
}

/// The one UDP socket of a device (WireGuard, STUN and disco share it).
pub trait Udp: Send + Sync + 'static {
    /// Receive one datagram into `buf`; blocks. `NotConnected` once closed.
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// Send one datagram; may block briefly while the socket buffer is full.
    fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()>;
    fn local_port(&self) -> u16;
    fn close(&self);
    /// Close the socket; called once no thread reads it any more.
    fn release(&self) {}
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is; others unchanged.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "closed")
}

/// A nonblocking eventfd used to wake threads blocked in `poll`.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked and owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Make the eventfd readable.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. A full counter (EAGAIN) is still readable: fine.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Make the eventfd unreadable again.
    pub fn reset(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN when already reset is fine.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A file descriptor that can be closed while others hold `&self` (they then see -1 and fail with EBADF).
#[derive(Debug)]
struct FdCell(AtomicI32);

impl FdCell {
    fn new(fd: OwnedFd) -> Self {
        FdCell(AtomicI32::new(fd.into_raw_fd()))
    }

    fn get(&self) -> RawFd {
        self.0.load(Ordering::Relaxed)
    }

    fn release(&self) {
        let fd = self.0.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: we owned fd and nobody else closes it (swap hands it out once).
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl Drop for FdCell {
    fn drop(&mut self) {
        self.release();
    }
}

/// Block until `fd` is ready for `events` or `wake` is signalled (then `Err(NotConnected)`).
fn wait(fd: RawFd, events: libc::c_short, wake: &EventFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of 2 pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Err(closed());
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// A Linux TUN interface (IFF_TUN | IFF_NO_PI), removed when dropped.
pub struct LinuxTun {
    fd: FdCell,
    wake: EventFd,
    name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqMtu {
    name: [u8; libc::IFNAMSIZ],
    mtu: libc::c_int,
    _pad: [u8; 20],
}

fn ifname(name: &str) -> Result<[u8; libc::IFNAMSIZ]> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(Error::Config(format!(
            "TUN name {name:?} must be 1 to {} characters without '/', spaces or NUL",
            libc::IFNAMSIZ - 1
        )));
    }
    let mut out = [0u8; libc::IFNAMSIZ];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

impl LinuxTun {
    /// Create TUN `name` with `mtu`; the link is left down and unaddressed (Python configures it).
    pub fn create(name: &str, mtu: u32) -> Result<Self> {
        let raw_name = ifname(name)?;
        if !(576..=65535).contains(&mtu) {
            return Err(Error::Config(format!(
                "MTU must be between 576 and 65535, got {mtu}"
            )));
        }
        // SAFETY: open(2) with a static NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied(format!(
                    "creating TUN device {name} needs CAP_NET_ADMIN (run as root)"
                )),
                _ => Error::Device(format!("cannot open /dev/net/tun to create {name}: {e}")),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReqFlags {
            name: raw_name,
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReqFlags is laid out as (40 bytes).
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => Error::PermissionDenied(format!(
                    "creating TUN device {name} needs CAP_NET_ADMIN (run as root)"
                )),
                Some(libc::EBUSY) => Error::Device(format!(
                    "TUN device {name} is already in use by another process"
                )),
                _ => Error::Device(format!("cannot create TUN device {name}: {e}")),
            });
        }
        set_mtu(&raw_name, name, mtu)?;
        Ok(LinuxTun {
            fd: FdCell::new(fd),
            wake: EventFd::new().map_err(|e| Error::Device(format!("eventfd: {e}")))?,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_mtu(raw_name: &[u8; libc::IFNAMSIZ], name: &str, mtu: u32) -> Result<()> {
    // SAFETY: socket(2); result checked and owned.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(Error::Device(format!(
            "cannot set the MTU of {name}: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: s is a fresh descriptor we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReqMtu {
        name: *raw_name,
        mtu: mtu as libc::c_int,
        _pad: [0; 20],
    };
    // SAFETY: SIOCSIFMTU reads an ifreq with ifr_mtu, which IfReqMtu is laid out as.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFMTU as _, &mut req) } < 0 {
        return Err(Error::Device(format!(
            "cannot set the MTU of {name} to {mtu}: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl Tun for LinuxTun {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: reads at most buf.len() bytes into buf.
            let n = unsafe { libc::read(self.fd.get(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => wait(self.fd.get(), libc::POLLIN, &self.wake)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: writes packet.len() bytes from packet.
            let n = unsafe { libc::write(self.fd.get(), packet.as_ptr().cast(), packet.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => wait(self.fd.get(), libc::POLLOUT, &self.wake)?,
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    fn close(&self) {
        self.wake.signal();
    }

    fn release(&self) {
        self.fd.release();
    }
}

/// Send buffer size asked for (the kernel may cap it unless we are root, where SO_SNDBUFFORCE works).
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Receive buffer size asked for (forced as root; the kernel doubles it for bookkeeping, so ~512 KiB of
/// skb truesize, ~220 full-size datagrams, a few ms at 1 Gbit/s). This buffer is where packets wait when
/// the receive thread falls behind, so it is a queue every tunnelled flow shares: 8 MiB (16 MiB
/// effective) let one TCP stream park megabytes in it and delay everything else, pings included. Kept
/// small it bounds that delay, and as it counts bytes, small packets still fit when full-size ones do not.
pub const RECV_BUFFER: usize = 256 << 10;

/// A UDP socket bound to `[::]:port` accepting IPv4 too (falls back to `0.0.0.0:port` without IPv6).
pub struct LinuxUdp {
    fd: FdCell,
    wake: EventFd,
    port: u16,
    v6: bool,
}

fn force_buffer(fd: RawFd, opt: libc::c_int, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: setsockopt with a valid int; failure (not root) is ignored, the normal option was set.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as _,
        )
    };
}

impl LinuxUdp {
    pub fn bind(port: u16) -> Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let bind_err = |e: io::Error| match e.kind() {
            io::ErrorKind::AddrInUse => Error::Device(format!("UDP port {port} is already in use")),
            io::ErrorKind::PermissionDenied => {
                Error::PermissionDenied(format!("binding UDP port {port} is not permitted"))
            }
            _ => Error::Device(format!("cannot bind UDP port {port}: {e}")),
        };
        let (sock, v6) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
            Ok(s) => {
                s.set_only_v6(false).map_err(|e| {
                    Error::Device(format!("cannot make the UDP socket dual-stack: {e}"))
                })?;
                let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
                s.bind(&addr.into()).map_err(bind_err)?;
                (s, true)
            }
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                    .map_err(|e| Error::Device(format!("cannot create a UDP socket: {e}")))?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                    .map_err(bind_err)?;
                (s, false)
            }
        };
        let _ = sock.set_recv_buffer_size(RECV_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        force_buffer(sock.as_raw_fd(), libc::SO_RCVBUFFORCE, RECV_BUFFER);
        force_buffer(sock.as_raw_fd(), libc::SO_SNDBUFFORCE, SOCKET_BUFFER);
        sock.set_nonblocking(true)
            .map_err(|e| Error::Device(format!("cannot make the UDP socket nonblocking: {e}")))?;
        let sock: UdpSocket = sock.into();
        let port = sock
            .local_addr()
            .map_err(|e| Error::Device(format!("UDP socket has no address: {e}")))?
            .port();
        Ok(LinuxUdp {
            fd: FdCell::new(OwnedFd::from(sock)),
            wake: EventFd::new().map_err(|e| Error::Device(format!("eventfd: {e}")))?,
            port,
            v6,
        })
    }
}

impl LinuxUdp {
    /// A std view of the socket, without taking ownership.
    fn sock(&self) -> ManuallyDrop<UdpSocket> {
        // SAFETY: the fd stays open while borrowed (released only after reader threads stop), and
        // ManuallyDrop keeps this view from closing it.
        ManuallyDrop::new(unsafe { UdpSocket::from_raw_fd(self.fd.get()) })
    }
}

impl Udp for LinuxUdp {
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            match self.sock().recv_from(buf) {
                Ok((n, from)) => return Ok((n, unmap(from))),
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => wait(self.fd.get(), libc::POLLIN, &self.wake)?,
                    // ICMP errors from earlier sends surface here on Linux; they are not ours to handle.
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused => {}
                    _ => return Err(e),
                },
            }
        }
    }

    fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = match to {
            SocketAddr::V4(v4) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        };
        loop {
            match self.sock().send_to(data, to) {
                Ok(_) => return Ok(()),
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => wait(self.fd.get(), libc::POLLOUT, &self.wake)?,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                },
            }
        }
    }

    fn local_port(&self) -> u16 {
        self.port
    }

    fn close(&self) {
        self.wake.signal();
    }

    fn release(&self) {
        self.fd.release();
    }
}
