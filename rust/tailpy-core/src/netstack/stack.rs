//! The stack thread's state: smoltcp's interface and sockets, the socketpair end of each, listeners
//! and pending dials, and the loop that polls smoltcp and moves bytes.

use super::sys::{self, Epoll, READABLE, WRITABLE};
use super::Pipes;
use crate::batch::Batch;
use crate::device::{TUN_READ_BYTES, TUN_READ_PACKETS};
use crate::error::{Error, Result};
use crate::io::EventFd;
use parking_lot::Mutex;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::SyncSender;

/// Bytes of each TCP socket's receive and send buffers: the window (scaled, RFC 7323 §2) is the
/// receive buffer. Memory is only touched as data flows (the buffers are zero-allocated).
const TCP_BUFFER: usize = 2 << 20;
/// Datagrams and payload bytes of each UDP socket's receive and send buffers.
const UDP_PACKETS: usize = 512;
const UDP_BUFFER: usize = 1 << 20;
/// Length of the header of each UDP message on a socketpair: family, 16-byte IP, port.
pub const UDP_HEADER_LEN: usize = 19;
/// Largest IPv4 packet the stack fragments on the way out and reassembles on the way in (smoltcp's
/// `fragmentation-buffer-size-16384` / `reassembly-buffer-size-16384` features; RFC 791 §2.3). smoltcp
/// 0.14 fragments IPv4 only: an IPv6 UDP datagram must fit one packet of the MTU.
pub const IPV4_MAX_PACKET: usize = 16384;
/// Largest UDP message read from a socketpair (header + the largest UDP payload).
const UDP_MAX_MESSAGE: usize = UDP_HEADER_LEN + 65535;
/// Listening sockets kept ready per listener at most (each SYN takes one).
const LISTEN_SOCKETS: usize = 8;
/// Ephemeral ports (RFC 6335 §6).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// epoll token of the wake eventfd; connections count up from 1.
const WAKE_TOKEN: u64 = 0;
/// Passes of poll-then-move per wakeup before the thread looks at epoll again.
const MAX_PASSES: usize = 16;

/// smoltcp's view of the device: packets the device decrypted in, packets for it to encrypt out.
struct Phy {
    pipes: std::sync::Arc<Pipes>,
    /// The inbound batch being consumed, and the index of its next packet.
    cur: Option<Batch>,
    idx: usize,
    /// Inbound batches this poll may still take (so that one poll stays bounded).
    budget: usize,
    out: Batch,
    mtu: usize,
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a> {
    out: &'a mut Batch,
    pipes: &'a Pipes,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let c = &self.pipes.counters;
        if self.out.has_room(len) {
            let r = f(&mut self.out.spare()[..len]);
            self.out.commit(len);
            c.tx_packets.fetch_add(1, Relaxed);
            c.tx_bytes.fetch_add(len as u64, Relaxed);
            r
        } else {
            // Only reached if smoltcp emits more than one packet per token; never larger than the MTU.
            let mut scratch = vec![0u8; len];
            f(&mut scratch)
        }
    }
}

impl Phy {
    fn has_room(&self) -> bool {
        self.out.has_room(self.mtu)
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if !self.has_room() {
            return None;
        }
        loop {
            if self.cur.as_ref().is_some_and(|b| self.idx < b.len()) {
                break;
            }
            if let Some(mut b) = self.cur.take() {
                b.clear();
                self.pipes.inbound.lock().empty.push(b);
            }
            if self.budget == 0 {
                return None;
            }
            let next = self.pipes.inbound.lock().full.pop_front()?;
            self.budget -= 1;
            self.cur = Some(next);
            self.idx = 0;
        }
        let i = self.idx;
        self.idx += 1;
        let packet = self.cur.as_ref()?.get(i);
        let c = &self.pipes.counters;
        c.rx_packets.fetch_add(1, Relaxed);
        c.rx_bytes.fetch_add(packet.len() as u64, Relaxed);
        Some((
            Rx(packet),
            Tx {
                out: &mut self.out,
                pipes: &self.pipes,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        if !self.has_room() {
            return None;
        }
        Some(Tx {
            out: &mut self.out,
            pipes: &self.pipes,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Packets from the device were authenticated by WireGuard (Poly1305 covers every byte), so
        // checksums are computed on transmit only, as Tailscale's netstack skips receive checksums.
        let mut cs = ChecksumCapabilities::default();
        cs.ipv4 = Checksum::Tx;
        cs.tcp = Checksum::Tx;
        cs.udp = Checksum::Tx;
        caps.checksum = cs;
        caps
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
}

/// One smoltcp socket and its socketpair end.
struct Conn {
    kind: Kind,
    handle: SocketHandle,
    /// Our end; `None` once closed (the smoltcp socket may live on to finish the close).
    fd: Option<OwnedFd>,
    /// Edge-triggered readiness, cleared when a call would block.
    readable: bool,
    writable: bool,
    /// The caller shut its writing half (we sent FIN).
    eof_in: bool,
    /// We shut our writing half (the peer sent FIN).
    shut_out: bool,
    /// A UDP message read from the socketpair that smoltcp had no room for yet.
    pending: Option<Vec<u8>>,
    /// The UDP port, to free it.
    port: u16,
}

struct Listener {
    port: u16,
    backlog: usize,
    listening: Vec<SocketHandle>,
    half_open: Vec<SocketHandle>,
    queue: VecDeque<(OwnedFd, SocketAddr)>,
    event: EventFd,
}

type DialReply = SyncSender<Result<OwnedFd>>;

struct Dial {
    handle: SocketHandle,
    dst: SocketAddr,
    port: u16,
    reply: DialReply,
}

pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    phy: Phy,
    /// `None` once released; the stack thread holds its own clone while it runs.
    epoll: Option<std::sync::Arc<Epoll>>,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    listeners: HashMap<u32, Listener>,
    next_listener: u32,
    dials: HashMap<u64, Dial>,
    next_dial: u64,
    tcp_ports: HashSet<u16>,
    udp_ports: HashSet<u16>,
    /// Scratch for UDP messages read from socketpairs.
    scratch: Vec<u8>,
    released: bool,
}

fn to_ip(a: IpAddress) -> IpAddr {
    match a {
        IpAddress::Ipv4(v) => IpAddr::V4(v),
        IpAddress::Ipv6(v) => IpAddr::V6(v),
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
    let tx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
    let mut s = tcp::Socket::new(rx, tx);
    // Bytes arrive from the socketpair in large reads already; Nagle would only delay the tail.
    s.set_nagle_enabled(false);
    // Without congestion control smoltcp sends the whole peer window at once; over a real path the
    // burst overflows socket buffers, and the losses back its retransmission timer off to seconds.
    s.set_congestion_control(tcp::CongestionControl::Cubic);
    s
}

fn random_port(used: &HashSet<u16>) -> Option<u16> {
    let mut seed = [0u8; 2];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let span = (EPHEMERAL.end() - EPHEMERAL.start()) as u32 + 1;
    let start = u32::from(u16::from_le_bytes(seed)) % span;
    (0..span)
        .map(|i| EPHEMERAL.start() + ((start + i) % span) as u16)
        .find(|p| !used.contains(p))
}

/// Encode a UDP message header for `ep`.
fn udp_header(ep: IpEndpoint) -> [u8; UDP_HEADER_LEN] {
    let mut h = [0u8; UDP_HEADER_LEN];
    match to_ip(ep.addr) {
        IpAddr::V4(a) => {
            h[0] = 4;
            h[1..5].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            h[0] = 6;
            h[1..17].copy_from_slice(&a.octets());
        }
    }
    h[17..19].copy_from_slice(&ep.port.to_be_bytes());
    h
}

/// Decode a UDP message header; `None` if malformed, or if the payload is too large: over
/// [`IPV4_MAX_PACKET`] bytes with the IPv4 and UDP headers (28 bytes; sent as fragments), or for IPv6 over
/// one packet of `mtu` bytes with the IPv6 and UDP headers (48 bytes).
fn parse_udp_header(m: &[u8], mtu: usize) -> Option<IpEndpoint> {
    if m.len() < UDP_HEADER_LEN {
        return None;
    }
    let (overhead, limit) = if m[0] == 4 {
        (28, IPV4_MAX_PACKET)
    } else {
        (48, mtu)
    };
    if m.len() - UDP_HEADER_LEN + overhead > limit {
        return None;
    }
    let port = u16::from_be_bytes([m[17], m[18]]);
    let addr: IpAddr = match m[0] {
        4 => Ipv4Addr::new(m[1], m[2], m[3], m[4]).into(),
        6 => Ipv6Addr::from(<[u8; 16]>::try_from(&m[1..17]).ok()?).into(),
        _ => return None,
    };
    if port == 0 || addr.is_unspecified() {
        return None;
    }
    Some(IpEndpoint::new(addr.into(), port))
}

impl Stack {
    pub(super) fn new(pipes: std::sync::Arc<Pipes>, mtu: usize) -> io::Result<Stack> {
        let epoll = Epoll::new()?;
        epoll.add(pipes.wake.fd(), WAKE_TOKEN)?;
        let mut phy = Phy {
            pipes,
            cur: None,
            idx: 0,
            budget: 0,
            out: Batch::new(TUN_READ_BYTES, TUN_READ_PACKETS),
            mtu,
        };
        let mut config = Config::new(HardwareAddress::Ip);
        let mut seed = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        config.random_seed = u64::from_le_bytes(seed);
        let iface = Interface::new(config, &mut phy, Instant::now());
        Ok(Stack {
            iface,
            sockets: SocketSet::new(vec![]),
            phy,
            epoll: Some(std::sync::Arc::new(epoll)),
            conns: HashMap::new(),
            next_token: 1,
            listeners: HashMap::new(),
            next_listener: 1,
            dials: HashMap::new(),
            next_dial: 1,
            tcp_ports: HashSet::new(),
            udp_ports: HashSet::new(),
            scratch: vec![0u8; UDP_MAX_MESSAGE],
            released: false,
        })
    }

    /// Set the interface's addresses, and default routes through them (a point-to-point link: every
    /// destination is handed to the device, which routes it by peers' allowed IPs).
    pub(super) fn set_addresses(&mut self, addrs: &[(IpAddr, u8)]) {
        self.iface.update_ip_addrs(|a| {
            a.clear();
            for &(ip, len) in addrs {
                let _ = a.push(IpCidr::new(ip.into(), len));
            }
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        routes.remove_default_ipv6_route();
        for &(ip, _) in addrs {
            match ip {
                IpAddr::V4(v) => {
                    let _ = routes.add_default_ipv4_route(v);
                }
                IpAddr::V6(v) => {
                    let _ = routes.add_default_ipv6_route(v);
                }
            }
        }
    }

    pub(super) fn addresses(&self) -> Vec<IpAddr> {
        self.iface
            .ip_addrs()
            .iter()
            .map(|c| to_ip(c.address()))
            .collect()
    }

    fn has_family(&self, v4: bool) -> bool {
        self.addresses().iter().any(|a| a.is_ipv4() == v4)
    }

    pub(super) fn socket_counts(&self) -> (u64, u64, u64) {
        let tcp = self
            .conns
            .values()
            .filter(|c| c.kind == Kind::Tcp && c.fd.is_some())
            .count()
            + self.dials.len();
        let udp = self.conns.values().filter(|c| c.kind == Kind::Udp).count();
        (tcp as u64, self.listeners.len() as u64, udp as u64)
    }

    /// Register our end of a socketpair for `handle`; returns its token.
    fn add_conn(
        &mut self,
        kind: Kind,
        handle: SocketHandle,
        fd: OwnedFd,
        port: u16,
    ) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        match &self.epoll {
            Some(ep) => ep.add(fd.as_raw_fd(), token)?,
            None => return Err(io::Error::new(io::ErrorKind::NotConnected, "closed")),
        }
        self.conns.insert(
            token,
            Conn {
                kind,
                handle,
                fd: Some(fd),
                readable: true,
                writable: true,
                eof_in: false,
                shut_out: false,
                pending: None,
                port,
            },
        );
        Ok(token)
    }

    pub(super) fn dial(&mut self, dst: SocketAddr, reply: DialReply) -> Result<u64> {
        let dst = crate::io::unmap(dst);
        if !self.has_family(dst.is_ipv4()) {
            return Err(Error::Dial(format!(
                "cannot connect to {dst}: this node has no IPv{} address",
                if dst.is_ipv4() { 4 } else { 6 }
            )));
        }
        if dst.port() == 0 || dst.ip().is_unspecified() || dst.ip().is_multicast() {
            return Err(Error::Config(format!(
                "cannot connect to {dst}: not a unicast address and nonzero port"
            )));
        }
        let port = random_port(&self.tcp_ports)
            .ok_or_else(|| Error::Dial("no free local TCP port".into()))?;
        let mut s = tcp_socket();
        s.connect(
            self.iface.context(),
            (IpAddress::from(dst.ip()), dst.port()),
            port,
        )
        .map_err(|e| Error::Dial(format!("cannot connect to {dst}: {e}")))?;
        let handle = self.sockets.add(s);
        self.tcp_ports.insert(port);
        let id = self.next_dial;
        self.next_dial += 1;
        self.dials.insert(
            id,
            Dial {
                handle,
                dst,
                port,
                reply,
            },
        );
        Ok(id)
    }

    /// Forget dial `id` (its caller gave up). False if it was already answered.
    pub(super) fn cancel_dial(&mut self, id: u64) -> bool {
        match self.dials.remove(&id) {
            Some(d) => {
                self.sockets.get_mut::<tcp::Socket>(d.handle).abort();
                // Sent with the next poll; the socket is removed once closed.
                self.remove_tcp_later(d.handle, d.port);
                true
            }
            None => false,
        }
    }

    /// Keep a socket without a socketpair until it is closed (finishing a close or sending an RST).
    fn remove_tcp_later(&mut self, handle: SocketHandle, port: u16) {
        let token = self.next_token;
        self.next_token += 1;
        self.conns.insert(
            token,
            Conn {
                kind: Kind::Tcp,
                handle,
                fd: None,
                readable: false,
                writable: false,
                eof_in: true,
                shut_out: true,
                pending: None,
                port,
            },
        );
    }

    pub(super) fn listen(&mut self, port: u16, backlog: usize) -> Result<u32> {
        if self.listeners.values().any(|l| l.port == port) {
            return Err(Error::Device(format!(
                "TCP port {port} is already listening"
            )));
        }
        let event = EventFd::new().map_err(|e| Error::Device(format!("eventfd: {e}")))?;
        let id = self.next_listener;
        self.next_listener += 1;
        let mut l = Listener {
            port,
            backlog,
            listening: Vec::new(),
            half_open: Vec::new(),
            queue: VecDeque::new(),
            event,
        };
        Self::replenish(&mut self.sockets, &mut l);
        self.listeners.insert(id, l);
        Ok(id)
    }

    fn replenish(sockets: &mut SocketSet<'static>, l: &mut Listener) {
        while l.listening.len() < LISTEN_SOCKETS
            && l.listening.len() + l.half_open.len() + l.queue.len() < l.backlog
        {
            let mut s = tcp_socket();
            if s.listen(l.port).is_err() {
                return;
            }
            l.listening.push(sockets.add(s));
        }
    }

    fn listener(&mut self, id: u32) -> Result<&mut Listener> {
        self.listeners
            .get_mut(&id)
            .ok_or_else(|| Error::Device(format!("no TCP listener {id}")))
    }

    pub(super) fn accept_fd(&mut self, id: u32) -> Result<i32> {
        Ok(self.listener(id)?.event.fd())
    }

    pub(super) fn accept(&mut self, id: u32) -> Result<Option<(OwnedFd, SocketAddr)>> {
        let l = self.listener(id)?;
        let next = l.queue.pop_front();
        if l.queue.is_empty() {
            l.event.reset();
        }
        Ok(next)
    }

    pub(super) fn close_listener(&mut self, id: u32) -> Result<()> {
        let l = self
            .listeners
            .remove(&id)
            .ok_or_else(|| Error::Device(format!("no TCP listener {id}")))?;
        for h in l.listening {
            self.sockets.remove(h);
        }
        for h in l.half_open {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
            self.remove_tcp_later(h, 0);
        }
        // Queued connections: their caller ends close here, so our ends read end-of-stream and the
        // connections close.
        drop(l.queue);
        Ok(())
    }

    pub(super) fn udp_bind(&mut self, port: u16) -> Result<(OwnedFd, u16)> {
        let port = if port == 0 {
            random_port(&self.udp_ports).ok_or_else(|| Error::Device("no free UDP port".into()))?
        } else if self.udp_ports.contains(&port) {
            return Err(Error::Device(format!("UDP port {port} is already bound")));
        } else {
            port
        };
        let buf = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0u8; UDP_BUFFER],
            )
        };
        let mut s = udp::Socket::new(buf(), buf());
        s.bind(IpListenEndpoint { addr: None, port })
            .map_err(|e| Error::Device(format!("cannot bind UDP port {port}: {e}")))?;
        let (ours, theirs) = sys::socketpair(libc::SOCK_SEQPACKET)
            .map_err(|e| Error::Device(format!("socketpair: {e}")))?;
        let handle = self.sockets.add(s);
        if let Err(e) = self.add_conn(Kind::Udp, handle, ours, port) {
            self.sockets.remove(handle);
            return Err(Error::Device(format!("epoll: {e}")));
        }
        self.udp_ports.insert(port);
        Ok((theirs, port))
    }

    /// Close everything (the device is closing): sockets, socketpair ends, listeners, pending dials.
    pub(super) fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        self.conns.clear();
        self.listeners.clear();
        for (_, d) in self.dials.drain() {
            let _ = d
                .reply
                .try_send(Err(Error::Device("the device is closed".into())));
        }
        let handles: Vec<_> = self.sockets.iter().map(|(h, _)| h).collect();
        for h in handles {
            self.sockets.remove(h);
        }
        self.phy.cur = None;
        self.epoll = None;
    }

    /// Poll smoltcp and move bytes until nothing moves (or `MAX_PASSES`); returns how long the
    /// thread may sleep (`None`: until an fd or the eventfd wakes it).
    fn work(&mut self, events: &[(u64, u32)]) -> Option<std::time::Duration> {
        for &(token, r) in events {
            if let Some(c) = self.conns.get_mut(&token) {
                c.readable |= r & READABLE != 0;
                c.writable |= r & WRITABLE != 0;
            }
        }
        for _ in 0..MAX_PASSES {
            self.phy.budget = 2;
            self.iface
                .poll(Instant::now(), &mut self.phy, &mut self.sockets);
            self.phy.pipes.flush(&mut self.phy.out);
            let mut progress = self.service_listeners();
            progress |= self.service_dials();
            progress |= self.service_conns();
            let more_in = self
                .phy
                .cur
                .as_ref()
                .is_some_and(|b| self.phy.idx < b.len())
                || !self.phy.pipes.inbound.lock().full.is_empty();
            if !(progress || (more_in && self.phy.has_room())) {
                break;
            }
        }
        self.iface
            .poll(Instant::now(), &mut self.phy, &mut self.sockets);
        self.phy.pipes.flush(&mut self.phy.out);
        let more_in = self
            .phy
            .cur
            .as_ref()
            .is_some_and(|b| self.phy.idx < b.len())
            || !self.phy.pipes.inbound.lock().full.is_empty();
        if more_in && self.phy.has_room() {
            return Some(std::time::Duration::ZERO);
        }
        self.iface
            .poll_delay(Instant::now(), &self.sockets)
            .map(Into::into)
    }

    fn service_listeners(&mut self) -> bool {
        let mut progress = false;
        let ids: Vec<u32> = self.listeners.keys().copied().collect();
        for id in ids {
            let mut l = self.listeners.remove(&id).expect("listener");
            // Listening sockets that took a SYN.
            let mut k = 0;
            while k < l.listening.len() {
                let h = l.listening[k];
                if self.sockets.get::<tcp::Socket>(h).state() != tcp::State::Listen {
                    l.half_open.push(l.listening.swap_remove(k));
                } else {
                    k += 1;
                }
            }
            let mut k = 0;
            while k < l.half_open.len() {
                let h = l.half_open[k];
                let s = self.sockets.get_mut::<tcp::Socket>(h);
                match s.state() {
                    tcp::State::SynReceived => k += 1,
                    tcp::State::Listen => {
                        // An RST during the handshake returns the socket to listening.
                        l.listening.push(l.half_open.swap_remove(k));
                    }
                    tcp::State::Closed => {
                        l.half_open.swap_remove(k);
                        self.sockets.remove(h);
                    }
                    _ => {
                        l.half_open.swap_remove(k);
                        let remote = s
                            .remote_endpoint()
                            .map(|e| SocketAddr::new(to_ip(e.addr), e.port));
                        match (remote, sys::socketpair(libc::SOCK_STREAM)) {
                            (Some(remote), Ok((ours, theirs))) => {
                                if self.add_conn(Kind::Tcp, h, ours, 0).is_ok() {
                                    l.queue.push_back((theirs, remote));
                                    l.event.signal();
                                    progress = true;
                                } else {
                                    self.sockets.get_mut::<tcp::Socket>(h).abort();
                                    self.remove_tcp_later(h, 0);
                                }
                            }
                            _ => {
                                s.abort();
                                self.remove_tcp_later(h, 0);
                            }
                        }
                    }
                }
            }
            Self::replenish(&mut self.sockets, &mut l);
            self.listeners.insert(id, l);
        }
        progress
    }

    fn service_dials(&mut self) -> bool {
        let mut done = Vec::new();
        for (&id, d) in &self.dials {
            let s = self.sockets.get::<tcp::Socket>(d.handle);
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {}
                tcp::State::Closed => done.push((id, false)),
                _ => done.push((id, true)),
            }
        }
        let progress = !done.is_empty();
        for (id, established) in done {
            let d = self.dials.remove(&id).expect("dial");
            if !established {
                self.sockets.remove(d.handle);
                self.tcp_ports.remove(&d.port);
                let _ = d.reply.try_send(Err(Error::Dial(format!(
                    "connection to {} refused (the peer answered with a TCP reset)",
                    d.dst
                ))));
                continue;
            }
            let pair = sys::socketpair(libc::SOCK_STREAM);
            match pair {
                Ok((ours, theirs)) => match self.add_conn(Kind::Tcp, d.handle, ours, d.port) {
                    Ok(token) => {
                        if d.reply.try_send(Ok(theirs)).is_err() {
                            // The caller gave up: close.
                            if let Some(c) = self.conns.get_mut(&token) {
                                c.fd = None;
                            }
                            self.sockets.get_mut::<tcp::Socket>(d.handle).abort();
                        }
                    }
                    Err(e) => {
                        self.sockets.get_mut::<tcp::Socket>(d.handle).abort();
                        self.remove_tcp_later(d.handle, d.port);
                        let _ = d.reply.try_send(Err(Error::Device(format!("epoll: {e}"))));
                    }
                },
                Err(e) => {
                    self.sockets.get_mut::<tcp::Socket>(d.handle).abort();
                    self.remove_tcp_later(d.handle, d.port);
                    let _ = d
                        .reply
                        .try_send(Err(Error::Device(format!("socketpair: {e}"))));
                }
            }
        }
        progress
    }

    fn service_conns(&mut self) -> bool {
        let mut progress = false;
        let mut gone = Vec::new();
        let counters = &self.phy.pipes.counters;
        for (&token, c) in self.conns.iter_mut() {
            let done = match c.kind {
                Kind::Tcp => {
                    let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
                    shuttle_tcp(c, s, &mut progress, counters)
                }
                Kind::Udp => {
                    let s = self.sockets.get_mut::<udp::Socket>(c.handle);
                    shuttle_udp(
                        c,
                        s,
                        &mut self.scratch,
                        self.phy.mtu,
                        &mut progress,
                        counters,
                    )
                }
            };
            if done {
                gone.push(token);
            }
        }
        for token in gone {
            if let Some(c) = self.conns.remove(&token) {
                self.sockets.remove(c.handle);
                match c.kind {
                    Kind::Tcp => self.tcp_ports.remove(&c.port),
                    Kind::Udp => self.udp_ports.remove(&c.port),
                };
                progress = true;
            }
        }
        progress
    }
}

/// Move bytes between a TCP socket and its socketpair end; true when both are finished with.
fn shuttle_tcp(
    c: &mut Conn,
    s: &mut tcp::Socket,
    progress: &mut bool,
    counters: &super::Counters,
) -> bool {
    let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
        return s.state() == tcp::State::Closed;
    };
    // The tailnet to the caller.
    while c.writable && !c.shut_out && s.can_recv() {
        match s.recv(|buf| match sys::send(fd, &[buf]) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(n)) => {
                counters.tcp_bytes_in.fetch_add(n as u64, Relaxed);
                *progress = true;
            }
            Ok(Err(libc::EAGAIN)) => c.writable = false,
            Ok(Err(_)) => {
                // The caller closed its end: reset, as a kernel does for data to a closed socket.
                s.abort();
                c.fd = None;
                *progress = true;
                return false;
            }
            Err(_) => break,
        }
    }
    if !c.shut_out && !s.may_recv() && s.recv_queue() == 0 && s.state() != tcp::State::SynSent {
        sys::shutdown_write(fd);
        c.shut_out = true;
        *progress = true;
    }
    // The caller to the tailnet.
    while c.readable && !c.eof_in && s.may_send() && s.send_queue() < s.send_capacity() {
        match s.send(|buf| match sys::recv(fd, buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        }) {
            Ok(Ok(0)) => {
                c.eof_in = true;
                s.close();
                *progress = true;
            }
            Ok(Ok(n)) => {
                counters.tcp_bytes_out.fetch_add(n as u64, Relaxed);
                *progress = true;
            }
            Ok(Err(libc::EAGAIN)) => c.readable = false,
            Ok(Err(_)) => {
                s.abort();
                c.fd = None;
                *progress = true;
                return false;
            }
            Err(_) => break,
        }
    }
    if !c.eof_in && !s.may_send() && s.state() != tcp::State::SynSent {
        // The connection can no longer send (reset, or closed by the peer and us): stop reading.
        if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
            c.eof_in = true;
        }
    }
    match s.state() {
        tcp::State::Closed => {
            // Reset or fully closed: the caller reads end-of-stream (after what was delivered).
            c.fd = None;
            true
        }
        _ => {
            if c.eof_in && c.shut_out {
                c.fd = None;
            }
            false
        }
    }
}

/// Move datagrams between a UDP socket and its socketpair end; true when the caller closed its end.
fn shuttle_udp(
    c: &mut Conn,
    s: &mut udp::Socket,
    scratch: &mut [u8],
    mtu: usize,
    progress: &mut bool,
    counters: &super::Counters,
) -> bool {
    let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
        return true;
    };
    // The tailnet to the caller.
    while c.writable && s.can_recv() {
        let r = match s.peek() {
            Ok((payload, meta)) => sys::send(fd, &[&udp_header(meta.endpoint), payload]),
            Err(_) => break,
        };
        match r {
            Ok(_) => {
                let _ = s.recv();
                counters.udp_datagrams_in.fetch_add(1, Relaxed);
                *progress = true;
            }
            Err(libc::EAGAIN) => c.writable = false,
            Err(libc::EPIPE) | Err(libc::ECONNRESET) | Err(libc::ECONNREFUSED) => return true,
            Err(_) => {
                let _ = s.recv();
                counters.udp_dropped.fetch_add(1, Relaxed);
            }
        }
    }
    // The caller to the tailnet.
    loop {
        if let Some(m) = c.pending.take() {
            match parse_udp_header(&m, mtu) {
                Some(ep) => match s.send_slice(&m[UDP_HEADER_LEN..], ep) {
                    Ok(()) => {
                        counters.udp_datagrams_out.fetch_add(1, Relaxed);
                        *progress = true;
                    }
                    Err(udp::SendError::BufferFull) => {
                        c.pending = Some(m);
                        break;
                    }
                    Err(_) => {
                        counters.udp_dropped.fetch_add(1, Relaxed);
                    }
                },
                None => {
                    counters.udp_dropped.fetch_add(1, Relaxed);
                }
            }
        }
        if !c.readable {
            break;
        }
        match sys::recv(fd, scratch) {
            Ok(0) => return true,
            Ok(n) => {
                let m = &scratch[..n];
                match parse_udp_header(m, mtu) {
                    Some(ep) => match s.send_slice(&m[UDP_HEADER_LEN..], ep) {
                        Ok(()) => {
                            counters.udp_datagrams_out.fetch_add(1, Relaxed);
                            *progress = true;
                        }
                        Err(udp::SendError::BufferFull) => {
                            c.pending = Some(m.to_vec());
                            break;
                        }
                        Err(_) => {
                            counters.udp_dropped.fetch_add(1, Relaxed);
                        }
                    },
                    None => {
                        counters.udp_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            Err(libc::EAGAIN) => c.readable = false,
            Err(_) => return true,
        }
    }
    false
}

/// The stack thread: work, then wait for the eventfd, a socketpair end, or smoltcp's next timer.
pub(super) fn run(pipes: &Pipes, stack: &Mutex<Stack>) {
    let Some(epoll) = stack.lock().epoll.clone() else {
        return;
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready: Vec<(u64, u32)> = Vec::with_capacity(256);
    loop {
        if pipes.closed.load(Relaxed) {
            return;
        }
        // The eventfd is watched edge-triggered, so every signal wakes the wait; resetting it only
        // when it fired spares a read per pass.
        if ready.iter().any(|&(t, _)| t == WAKE_TOKEN) {
            pipes.wake.reset();
        }
        let delay = {
            let mut st = stack.lock();
            let d = st.work(&ready);
            ready.clear();
            d
        };
        let timeout = match delay {
            Some(d) => d.as_millis().min(1000) as i32,
            None => 1000,
        };
        epoll.wait(&mut events, timeout, &mut ready);
    }
}
