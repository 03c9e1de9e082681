//! The two packet transports a `Device` needs, as small traits, and their Linux implementations:
//! a TUN interface (`/dev/net/tun`) and a dual-stack UDP socket.
//!
//! Reads block until a packet arrives or `close` is called (then they return `ErrorKind::NotConnected`),
//! so device threads can be stopped promptly. Buffers are the caller's (`crate::batch`). Both traits move
//! packets in batches; their single-packet methods are what in-memory test transports implement, and the
//! batch methods default to loops over them.
//!
//! The Linux TUN reads with a virtio-net header (`IFF_VNET_HDR`, `TUNSETOFFLOAD` with TSO and, where the
//! kernel has it, USO): one read brings a super-packet of up to 64 KiB that is split here into IP packets
//! (`crate::offload::split`), and a batch written to it is coalesced per flow first
//! (`crate::offload::coalesce`) and written with one gathered `writev` per super-packet. The UDP socket
//! sends with `sendmmsg`, runs of same-size datagrams to one endpoint as one UDP GSO message
//! (`UDP_SEGMENT`), and receives with `recvmmsg` and `UDP_GRO`. Each offload that is missing or refused
//! falls back to the plain path once, and says so in `OffloadStats::fallbacks`.

use crate::batch::{Batch, RecvBatch, RecvMeta};
use crate::error::{Error, Result};
use crate::offload::{self, GroTable, VnetHdr, MAX_GRO_SEGMENTS, MAX_SEGMENTS, VNET_HDR_LEN};
use parking_lot::Mutex;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering, Ordering::Relaxed};

/// Largest IP packet or datagram a transport reads (a TUN super-packet, a UDP GRO bundle).
pub const MAX_READ: usize = 65535;

/// Where IP packets enter and leave the host: a TUN interface, or a test's in-memory channel.
pub trait Tun: Send + Sync + 'static {
    /// Read one IP packet into `buf`; blocks. `NotConnected` once closed.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one IP packet to the host.
    fn send(&self, packet: &[u8]) -> io::Result<()>;
    /// Append one or more IP packets to `batch`; blocks until there is at least one. Returns how many
    /// were added. Needs `MAX_READ` bytes of room in `batch` (twice that with offloads).
    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let room = batch.remaining().min(MAX_READ);
        let n = self.recv(&mut batch.spare()[..room])?;
        batch.commit(n);
        Ok(1)
    }
    /// Write every packet of `batch` to the host, in order within each flow. An implementation may
    /// coalesce packets (changing their headers in place), using `gro` as scratch. Returns how many
    /// packets the host refused.
    fn send_batch(&self, batch: &mut Batch, gro: &mut GroTable) -> usize {
        let _ = gro;
        batch.iter().filter(|p| self.send(p).is_err()).count()
    }
    /// Add this transport's offload state and counters to `stats`.
    fn offload_stats(&self, stats: &mut OffloadStats) {
        let _ = stats;
    }
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
    /// Fill `batch` (cleared first) with what arrived: at least one slot; blocks. Returns the slots filled.
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.clear();
        let (n, from) = self.recv_from(batch.slot_mut(0))?;
        batch.push_meta(RecvMeta {
            len: n,
            stride: n,
            from,
        });
        Ok(1)
    }
    /// Send every datagram of `datagrams` to `to`; returns how many were sent (the others were refused).
    fn send_batch(&self, datagrams: &Batch, to: SocketAddr) -> usize {
        datagrams
            .iter()
            .filter(|d| self.send_to(d, to).is_ok())
            .count()
    }
    /// Add this transport's offload state and counters to `stats`.
    fn offload_stats(&self, stats: &mut OffloadStats) {
        let _ = stats;
    }
    fn local_port(&self) -> u16;
    /// Mark every datagram this socket sends with `mark` (Linux `SO_MARK`, socket(7); 0 clears), so that
    /// policy routing can keep it out of the tunnel. Needs CAP_NET_ADMIN. Transports that are not kernel
    /// sockets accept and ignore it.
    fn set_mark(&self, mark: u32) -> io::Result<()> {
        let _ = mark;
        Ok(())
    }
    fn close(&self);
    /// Close the socket; called once no thread reads it any more.
    fn release(&self) {}
}

/// Which offloads a device's transports use, what they fell back from, and what they did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffloadStats {
    /// The TUN carries a virtio-net header (offloads possible).
    pub tun_vnet_hdr: bool,
    /// The TUN hands us TCP super-packets (TSO4/TSO6).
    pub tun_tso: bool,
    /// The TUN hands us UDP super-packets (USO4/USO6), and received UDP is coalesced too.
    pub tun_uso: bool,
    /// TCP (and with USO, UDP) segments are coalesced before TUN writes.
    pub tun_gro: bool,
    /// Runs of same-size datagrams leave as one UDP GSO send.
    pub udp_gso: bool,
    /// The socket takes coalesced datagrams (UDP_GRO).
    pub udp_gro: bool,
    /// Each fallback taken, once, in words ("udp: GSO refused (EIO), sending plain").
    pub fallbacks: Vec<String>,
    /// TUN reads that carried a GSO super-packet, and the packets they were split into.
    pub tun_super_packets_read: u64,
    pub tun_split_packets: u64,
    /// Packets from the TUN dropped because their header or split failed.
    pub tun_split_errors: u64,
    /// TUN writes of coalesced super-packets, and the segments appended to their heads.
    pub tun_super_packets_written: u64,
    pub tun_coalesced_segments: u64,
    /// TUN writes the kernel refused.
    pub tun_write_errors: u64,
    /// UDP GSO sends, and the datagrams they carried.
    pub udp_gso_sends: u64,
    pub udp_gso_datagrams: u64,
    /// Receives that brought coalesced datagrams (UDP GRO), and how many datagrams they held.
    pub udp_gro_receives: u64,
    pub udp_gro_datagrams: u64,
}

/// Fallbacks taken, each recorded once.
#[derive(Default)]
struct Fallbacks(Mutex<Vec<String>>);

impl Fallbacks {
    fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let mut v = self.0.lock();
        if !v.contains(&what) {
            v.push(what);
        }
    }

    fn extend_into(&self, out: &mut Vec<String>) {
        out.extend(self.0.lock().iter().cloned());
    }
}

/// An environment variable meaning "off" ("0", "off", "false", "no").
fn env_off(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "off" | "false" | "no"
            )
        })
        .unwrap_or(false)
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

/// A Linux TUN interface (IFF_TUN | IFF_NO_PI, with IFF_VNET_HDR and offloads where the kernel has
/// them), removed when dropped.
///
/// `TAILPY_TUN_OFFLOAD=0` opens it without the virtio-net header (the plain path: one packet per read and
/// write); `TAILPY_TUN_OFFLOAD=tso` enables TSO but not USO.
pub struct LinuxTun {
    fd: FdCell,
    wake: EventFd,
    name: String,
    /// Reads and writes carry a virtio-net header.
    vnet: bool,
    tso: bool,
    uso: bool,
    /// Coalescing before writes is on (turned off if the kernel refuses a super-packet).
    gro: AtomicBool,
    fallbacks: Fallbacks,
    super_read: AtomicU64,
    split_packets: AtomicU64,
    split_errors: AtomicU64,
    super_written: AtomicU64,
    coalesced: AtomicU64,
    write_errors: AtomicU64,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

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
        let fallbacks = Fallbacks::default();
        let mode = std::env::var("TAILPY_TUN_OFFLOAD").unwrap_or_default();
        let mut vnet = !env_off("TAILPY_TUN_OFFLOAD");
        if !vnet {
            fallbacks
                .note("tun: offloads disabled (TAILPY_TUN_OFFLOAD), one packet per read and write");
        } else {
            let mut features: libc::c_uint = 0;
            // SAFETY: TUNGETFEATURES writes an unsigned int.
            let ok =
                unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETFEATURES as _, &mut features) } == 0;
            if !ok || features & IFF_VNET_HDR as libc::c_uint == 0 {
                vnet = false;
                fallbacks
                    .note("tun: the kernel has no IFF_VNET_HDR, one packet per read and write");
            }
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet {
            flags |= IFF_VNET_HDR;
        }
        let mut req = IfReqFlags {
            name: raw_name,
            flags: flags as libc::c_short,
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
        let (mut tso, mut uso) = (false, false);
        if vnet {
            let raw = fd.as_raw_fd();
            let hdr_len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int; TUNSETOFFLOAD takes the flags as the argument.
            let sized = unsafe { libc::ioctl(raw, TUNSETVNETHDRSZ as _, &hdr_len) } == 0;
            let set = |f: libc::c_uint| unsafe { libc::ioctl(raw, TUNSETOFFLOAD as _, f as libc::c_ulong) } == 0;
            let tso_flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            if !sized {
                fallbacks
                    .note("tun: the kernel refused the virtio-net header size, no TUN offloads");
            } else if mode.trim().eq_ignore_ascii_case("tso") {
                tso = set(tso_flags);
                fallbacks.note("tun: USO disabled (TAILPY_TUN_OFFLOAD=tso)");
            } else if set(tso_flags | TUN_F_USO4 | TUN_F_USO6) {
                (tso, uso) = (true, true);
            } else {
                tso = set(tso_flags);
                fallbacks.note(
                    "tun: the kernel refused USO (Linux >= 6.2 has it), UDP one packet per read",
                );
            }
            if sized && !tso {
                fallbacks.note("tun: the kernel refused TSO, one packet per read");
            }
        }
        Ok(LinuxTun {
            fd: FdCell::new(fd),
            wake: EventFd::new().map_err(|e| Error::Device(format!("eventfd: {e}")))?,
            name: name.to_string(),
            vnet,
            tso,
            uso,
            gro: AtomicBool::new(vnet),
            fallbacks,
            super_read: AtomicU64::new(0),
            split_packets: AtomicU64::new(0),
            split_errors: AtomicU64::new(0),
            super_written: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
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

impl LinuxTun {
    /// One read into `buf`: the byte count, 0 when nothing is waiting and `block` is false.
    fn read_into(&self, buf: &mut [u8], block: bool) -> io::Result<usize> {
        loop {
            // SAFETY: reads at most buf.len() bytes into buf.
            let n = unsafe { libc::read(self.fd.get(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock if block => {
                    wait(self.fd.get(), libc::POLLIN, &self.wake)?
                }
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
        }
    }

    /// One gathered write of `iov`.
    fn writev(&self, iov: &[libc::iovec]) -> io::Result<()> {
        loop {
            // SAFETY: iov points at live buffers for the duration of the call.
            let n = unsafe { libc::writev(self.fd.get(), iov.as_ptr(), iov.len() as libc::c_int) };
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

    /// Read one packet (with its virtio-net header) into `batch`'s spare room and add what it holds:
    /// itself, or the packets it splits into. Returns the packets added (0: nothing was waiting, or the
    /// packet was malformed and dropped).
    fn read_vnet(&self, batch: &mut Batch, block: bool) -> io::Result<usize> {
        let base = batch.used();
        let read_len = (MAX_READ + VNET_HDR_LEN).min(batch.remaining());
        let n = self.read_into(&mut batch.spare()[..read_len], block)?;
        if n == 0 {
            return Ok(0);
        }
        let room_for = MAX_SEGMENTS.min(batch.packets_left());
        let mut segs = [(0usize, 0usize); MAX_SEGMENTS];
        let (read, out) = batch.raw_mut()[base..].split_at_mut(n);
        let result = VnetHdr::parse(read).and_then(|hdr| {
            let pkt = &mut read[VNET_HDR_LEN..];
            if hdr.gso_type == offload::GSO_NONE {
                offload::complete_checksum(&hdr, pkt).map(|()| None)
            } else {
                offload::split(&hdr, pkt, out, &mut segs[..room_for]).map(Some)
            }
        });
        match result {
            Ok(None) => {
                batch.commit_at(base + VNET_HDR_LEN, n - VNET_HDR_LEN);
                Ok(1)
            }
            Ok(Some(k)) => {
                for &(o, l) in &segs[..k] {
                    batch.commit_at(base + n + o, l);
                }
                self.super_read.fetch_add(1, Relaxed);
                self.split_packets.fetch_add(k as u64, Relaxed);
                Ok(k)
            }
            Err(_) => {
                self.split_errors.fetch_add(1, Relaxed);
                Ok(0)
            }
        }
    }
}

impl Tun for LinuxTun {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.vnet {
            return self.read_into(buf, true);
        }
        let mut batch = Batch::new(
            2 * (MAX_READ + VNET_HDR_LEN) + MAX_SEGMENTS * 128,
            MAX_SEGMENTS,
        );
        loop {
            if self.read_vnet(&mut batch, true)? > 0 {
                let p = batch.get(0);
                let n = p.len().min(buf.len());
                buf[..n].copy_from_slice(&p[..n]);
                return Ok(n);
            }
        }
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut _,
                iov_len: packet.len(),
            },
        ];
        if self.vnet {
            self.writev(&iov)
        } else {
            self.writev(&iov[1..])
        }
    }

    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        // Block for the first packet, then take what is already waiting while there is room.
        let need = if self.vnet {
            2 * (MAX_READ + VNET_HDR_LEN) + MAX_SEGMENTS * 128
        } else {
            MAX_READ
        };
        // Room for the most packets one read can split into.
        let slots = if self.vnet { MAX_SEGMENTS } else { 1 };
        let mut added = 0;
        let mut block = true;
        while batch.remaining() >= need && batch.packets_left() >= slots {
            let k = if self.vnet {
                self.read_vnet(batch, block)?
            } else {
                let n = self.read_into(&mut batch.spare()[..MAX_READ], block)?;
                if n > 0 {
                    batch.commit(n);
                }
                usize::from(n > 0)
            };
            if k == 0 && !block {
                break;
            }
            added += k;
            if added > 0 {
                block = false;
            }
        }
        Ok(added)
    }

    fn send_batch(&self, batch: &mut Batch, gro: &mut GroTable) -> usize {
        if !self.vnet {
            return batch.iter().filter(|p| self.send(p).is_err()).count();
        }
        let coalescing = self.gro.load(Relaxed);
        if coalescing {
            offload::coalesce(batch, gro, self.uso);
        }
        let mut refused = 0;
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_GRO_SEGMENTS as usize + 1];
        for i in 0..batch.len() {
            if coalescing && !gro.is_written(i) {
                continue;
            }
            let hdr = if coalescing {
                gro.header(i).encode()
            } else {
                [0u8; VNET_HDR_LEN]
            };
            let head = batch.get(i);
            iov[0] = libc::iovec {
                iov_base: hdr.as_ptr() as *mut _,
                iov_len: VNET_HDR_LEN,
            };
            iov[1] = libc::iovec {
                iov_base: head.as_ptr() as *mut _,
                iov_len: head.len(),
            };
            let mut k = 2;
            if coalescing {
                for (j, at) in gro.members(i) {
                    let p = batch.get(j);
                    if k < iov.len() && at <= p.len() {
                        iov[k] = libc::iovec {
                            iov_base: p[at..].as_ptr() as *mut _,
                            iov_len: p.len() - at,
                        };
                        k += 1;
                    }
                }
            }
            match self.writev(&iov[..k]) {
                Ok(()) => {
                    if k > 2 {
                        self.super_written.fetch_add(1, Relaxed);
                        self.coalesced.fetch_add((k - 2) as u64, Relaxed);
                    }
                }
                Err(e) => {
                    refused += 1 + k - 2;
                    self.write_errors.fetch_add(1, Relaxed);
                    if k > 2 && e.raw_os_error() == Some(libc::EINVAL) {
                        // The kernel does not take our super-packets: write packets one by one.
                        self.gro.store(false, Relaxed);
                        self.fallbacks.note(format!(
                            "tun: the kernel refused a coalesced write ({e}), no GRO"
                        ));
                    }
                }
            }
        }
        refused
    }

    fn offload_stats(&self, s: &mut OffloadStats) {
        s.tun_vnet_hdr = self.vnet;
        s.tun_tso = self.tso;
        s.tun_uso = self.uso;
        s.tun_gro = self.gro.load(Relaxed);
        self.fallbacks.extend_into(&mut s.fallbacks);
        s.tun_super_packets_read = self.super_read.load(Relaxed);
        s.tun_split_packets = self.split_packets.load(Relaxed);
        s.tun_split_errors = self.split_errors.load(Relaxed);
        s.tun_super_packets_written = self.super_written.load(Relaxed);
        s.tun_coalesced_segments = self.coalesced.load(Relaxed);
        s.tun_write_errors = self.write_errors.load(Relaxed);
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

/// Receive buffer size asked for (forced as root; the kernel doubles it for bookkeeping). This buffer is
/// where datagrams wait when the receive thread falls behind (descheduled on a busy host, or simply
/// slower than the sender: it also runs the host's TCP receive path in its TUN writes), so it is both a
/// queue every tunnelled flow shares and what absorbs bursts. With UDP GSO a sender bursts 64 KiB
/// bundles, and a drop loses a whole bundle: 256 KiB (~8 bundles) dropped ~9 % of one TCP stream's
/// datagrams on a loaded 2-core host, 4 MiB still dropped bundles of 4 parallel streams; at 8 MiB
/// (wireguard-go asks for 7 MiB) none were dropped while ping under load (p99 ~25-30 ms there) stayed
/// well below wireguard-go's. Measured with iperf3 and ping through two bare nodes on a 2-vCPU VM,
/// netns + veth, MTU 1420.
pub const RECV_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `[::]:port` accepting IPv4 too (falls back to `0.0.0.0:port` without IPv6).
///
/// Sends batches with `sendmmsg`, runs of same-size datagrams as one UDP GSO message (`UDP_SEGMENT`,
/// `udp(7)`); receives with `recvmmsg` and `UDP_GRO`. `TAILPY_UDP_GSO=0` / `TAILPY_UDP_GRO=0` turn each
/// off.
pub struct LinuxUdp {
    fd: FdCell,
    wake: EventFd,
    port: u16,
    v6: bool,
    gso: AtomicBool,
    gro: bool,
    fallbacks: Fallbacks,
    gso_sends: AtomicU64,
    gso_datagrams: AtomicU64,
    gro_receives: AtomicU64,
    gro_datagrams: AtomicU64,
}

/// Messages per `sendmmsg`/`recvmmsg` call.
const MMSG: usize = 64;
/// Most datagrams in one GSO send (`UDP_MAX_SEGMENTS` is 64 before Linux 6.11, 128 after).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (an IP packet's payload, less the UDP and IPv6 headers).
const GSO_MAX_BYTES: usize = 65535 - 8 - 40;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// Room for one control message of a `u16` or `int` (`CMSG_SPACE(4)` is 24 on 64-bit Linux).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 32]);

fn sockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: setsockopt with a valid int.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as _,
        ) == 0
    }
}

/// `(name, len)` of `to` as the kernel wants it for this socket (IPv4 as IPv4-mapped on a v6 socket).
fn sockaddr_for(to: SocketAddr, v6: bool) -> socket2::SockAddr {
    let to = match to {
        SocketAddr::V4(v4) if v6 => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    };
    socket2::SockAddr::from(to)
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
        let fallbacks = Fallbacks::default();
        let raw = sock.as_raw_fd();
        let gso = if env_off("TAILPY_UDP_GSO") {
            fallbacks.note("udp: GSO disabled (TAILPY_UDP_GSO), one datagram per message");
            false
        } else {
            // The kernel has UDP GSO if it knows the option (Linux >= 4.18).
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into a valid int.
            let ok = unsafe {
                libc::getsockopt(
                    raw,
                    libc::SOL_UDP,
                    UDP_SEGMENT,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            } == 0;
            if !ok {
                fallbacks
                    .note("udp: the kernel has no UDP GSO (UDP_SEGMENT), one datagram per message");
            }
            ok
        };
        let gro = if env_off("TAILPY_UDP_GRO") {
            fallbacks.note("udp: GRO disabled (TAILPY_UDP_GRO), one datagram per receive slot");
            false
        } else if sockopt_int(raw, libc::SOL_UDP, UDP_GRO, 1) {
            true
        } else {
            fallbacks.note("udp: the kernel refused UDP_GRO, one datagram per receive slot");
            false
        };
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
            gso: AtomicBool::new(gso),
            gro,
            fallbacks,
            gso_sends: AtomicU64::new(0),
            gso_datagrams: AtomicU64::new(0),
            gro_receives: AtomicU64::new(0),
            gro_datagrams: AtomicU64::new(0),
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

impl LinuxUdp {
    /// Send datagrams `from..` of `d` to `dst`; returns how many were sent. Runs of same-size
    /// datagrams (the last of a run may be shorter) that lie end to end go as one GSO message.
    fn send_mmsg(&self, d: &Batch, from: usize, dst: &socket2::SockAddr) -> usize {
        let gso = self.gso.load(Relaxed);
        // SAFETY: all-zero is a valid mmsghdr/iovec (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; MMSG] = unsafe { std::mem::zeroed() };
        let mut cmsgs = [CmsgBuf([0; 32]); MMSG];
        // Per message: index of its first datagram and how many it carries.
        let mut spans = [(0usize, 0usize); MMSG];
        let raw = d.raw();
        let mut sent = 0;
        let mut i = from;
        while i < d.len() {
            // Build up to MMSG messages.
            let mut m = 0;
            while m < MMSG && i < d.len() {
                let (off, seg) = d.entry(i);
                let mut count = 1;
                let mut total = seg;
                if gso {
                    while i + count < d.len() && count < GSO_MAX_SEGMENTS {
                        let (o, l) = d.entry(i + count);
                        if o != off + total || l > seg || total + l > GSO_MAX_BYTES {
                            break;
                        }
                        count += 1;
                        total += l;
                        if l < seg {
                            break;
                        }
                    }
                }
                iovs[m] = libc::iovec {
                    iov_base: raw[off..].as_ptr() as *mut _,
                    iov_len: total,
                };
                let h = &mut msgs[m].msg_hdr;
                h.msg_name = dst.as_ptr() as *mut _;
                h.msg_namelen = dst.len();
                h.msg_iov = &mut iovs[m];
                h.msg_iovlen = 1;
                if count > 1 {
                    let c = &mut cmsgs[m];
                    // SAFETY: CMSG_LEN/CMSG_SPACE are pure arithmetic.
                    let (clen, cspace) = unsafe { (libc::CMSG_LEN(2), libc::CMSG_SPACE(2)) };
                    let hdr = libc::cmsghdr {
                        cmsg_len: clen as _,
                        cmsg_level: libc::SOL_UDP,
                        cmsg_type: UDP_SEGMENT,
                    };
                    let hl = std::mem::size_of::<libc::cmsghdr>();
                    // SAFETY: c.0 has room for a cmsghdr followed by a u16 (CMSG_SPACE(2) <= 32).
                    unsafe { std::ptr::write_unaligned(c.0.as_mut_ptr().cast(), hdr) };
                    c.0[hl..hl + 2].copy_from_slice(&(seg as u16).to_ne_bytes());
                    h.msg_control = c.0.as_mut_ptr().cast();
                    h.msg_controllen = cspace as _;
                } else {
                    h.msg_control = std::ptr::null_mut();
                    h.msg_controllen = 0;
                }
                spans[m] = (i, count);
                m += 1;
                i += count;
            }
            // Send them, resuming after partial sends.
            let mut k = 0;
            while k < m {
                // SAFETY: msgs[k..m] point at live buffers, addresses and control data.
                let r = unsafe {
                    libc::sendmmsg(self.fd.get(), msgs[k..].as_mut_ptr(), (m - k) as u32, 0)
                };
                if r > 0 {
                    for &(_, c) in &spans[k..k + r as usize] {
                        sent += c;
                        if c > 1 {
                            self.gso_sends.fetch_add(1, Relaxed);
                            self.gso_datagrams.fetch_add(c as u64, Relaxed);
                        }
                    }
                    k += r as usize;
                    continue;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        if wait(self.fd.get(), libc::POLLOUT, &self.wake).is_err() {
                            return sent;
                        }
                    }
                    Some(libc::EINTR) => {}
                    Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE)
                        if spans[k].1 > 1 =>
                    {
                        // The kernel refuses GSO on this route (EIO: the device cannot checksum for
                        // us; EMSGSIZE/EINVAL: a segment exceeds the route's MTU, which a plain send
                        // fragments): send the rest, and everything after, one datagram per message.
                        self.gso.store(false, Relaxed);
                        self.fallbacks
                            .note(format!("udp: GSO refused ({e}), one datagram per message"));
                        return sent + self.send_mmsg(d, spans[k].0, dst);
                    }
                    _ => {
                        // This message is refused (unreachable, too big...): skip it.
                        k += 1;
                    }
                }
            }
        }
        sent
    }
}

impl Udp for LinuxUdp {
    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.clear();
        let slots = batch.slots().min(MMSG);
        let slot_len = batch.slot_len();
        // SAFETY: all-zero is valid for these C structs.
        let mut msgs: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; MMSG] = unsafe { std::mem::zeroed() };
        let mut names: [libc::sockaddr_in6; MMSG] = unsafe { std::mem::zeroed() };
        let mut cmsgs = [CmsgBuf([0; 32]); MMSG];
        let base = batch.slots_mut().as_mut_ptr();
        for k in 0..slots {
            iovs[k] = libc::iovec {
                // SAFETY: slot k lies within the batch's buffer.
                iov_base: unsafe { base.add(k * slot_len) }.cast(),
                iov_len: slot_len,
            };
            let h = &mut msgs[k].msg_hdr;
            h.msg_name = (&mut names[k] as *mut libc::sockaddr_in6).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as _;
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
            if self.gro {
                h.msg_control = cmsgs[k].0.as_mut_ptr().cast();
                h.msg_controllen = 32;
            }
        }
        let n = loop {
            // SAFETY: msgs point at live slots, names and control buffers.
            let r = unsafe {
                libc::recvmmsg(
                    self.fd.get(),
                    msgs.as_mut_ptr(),
                    slots as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => wait(self.fd.get(), libc::POLLIN, &self.wake)?,
                // ICMP errors from earlier sends surface here on Linux; they are not ours to handle.
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused => {}
                _ => return Err(e),
            }
        };
        for k in 0..n {
            let len = (msgs[k].msg_len as usize).min(slot_len);
            let h = &msgs[k].msg_hdr;
            // SAFETY: the kernel wrote a sockaddr of msg_namelen bytes into names[k].
            let from = unsafe {
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::copy_nonoverlapping(
                    (&names[k] as *const libc::sockaddr_in6).cast::<u8>(),
                    (&mut storage as *mut libc::sockaddr_storage).cast::<u8>(),
                    std::mem::size_of::<libc::sockaddr_in6>(),
                );
                socket2::SockAddr::new(storage, h.msg_namelen).as_socket()
            };
            let Some(from) = from else {
                // Keep slots and metadata aligned: an empty slot.
                batch.push_meta(RecvMeta::default());
                continue;
            };
            let mut stride = len;
            if self.gro && h.msg_controllen > 0 {
                // SAFETY: walking the control messages the kernel wrote into cmsgs[k].
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(h);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                            let v =
                                std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                            if v > 0 {
                                stride = v as usize;
                            }
                        }
                        c = libc::CMSG_NXTHDR(h, c);
                    }
                }
            }
            if stride < len {
                self.gro_receives.fetch_add(1, Relaxed);
                self.gro_datagrams
                    .fetch_add(len.div_ceil(stride) as u64, Relaxed);
            }
            batch.push_meta(RecvMeta {
                len,
                stride,
                from: unmap(from),
            });
        }
        Ok(batch.len())
    }

    fn send_batch(&self, datagrams: &Batch, to: SocketAddr) -> usize {
        let dst = sockaddr_for(to, self.v6);
        self.send_mmsg(datagrams, 0, &dst)
    }

    fn offload_stats(&self, s: &mut OffloadStats) {
        s.udp_gso = self.gso.load(Relaxed);
        s.udp_gro = self.gro;
        self.fallbacks.extend_into(&mut s.fallbacks);
        s.udp_gso_sends = self.gso_sends.load(Relaxed);
        s.udp_gso_datagrams = self.gso_datagrams.load(Relaxed);
        s.udp_gro_receives = self.gro_receives.load(Relaxed);
        s.udp_gro_datagrams = self.gro_datagrams.load(Relaxed);
    }

    /// With `UDP_GRO` on, datagrams a sender coalesced (GSO) may arrive here as one bundle; the device
    /// uses `recv_batch`, which says where to cut them.
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

    fn set_mark(&self, mark: u32) -> io::Result<()> {
        // One dual-stack socket carries IPv4 and IPv6, so one SO_MARK covers both.
        socket2::SockRef::from(&*self.sock()).set_mark(mark)
    }

    fn close(&self) {
        self.wake.signal();
    }

    fn release(&self) {
        self.fd.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark_of(fd: RawFd) -> u32 {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a valid int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt(SO_MARK)");
        v as u32
    }

    #[test]
    fn set_mark_marks_the_socket_and_zero_clears() {
        let udp = LinuxUdp::bind(0).expect("bind");
        match udp.set_mark(0x80000) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: SO_MARK needs CAP_NET_ADMIN");
                return;
            }
            r => r.expect("set_mark"),
        }
        assert_eq!(mark_of(udp.fd.get()), 0x80000);
        udp.set_mark(0).expect("clear");
        assert_eq!(mark_of(udp.fd.get()), 0);
    }
}
