//! `Device`: one node's data plane. A TUN, one UDP socket, a peer table keyed by public key, a
//! longest-prefix-match table of allowed IPs, and four threads (TUN reader, UDP reader, TUN writer,
//! timers).
//!
//! Packets move in batches. The TUN thread reads a batch of IP packets (a super-packet already split by
//! the transport), encrypts each into one contiguous batch of datagrams per run of packets for one peer,
//! and hands that batch to the socket (one `sendmmsg`, GSO where it can). The UDP thread receives a batch
//! (`recvmmsg`, GRO bundles cut at their stride), demultiplexes each datagram (WireGuard to its peer,
//! STUN/disco to Python's queue), decrypts WireGuard data straight into a batch for the TUN, and writes
//! that batch once per receive (coalesced per flow by the transport); under bulk traffic it hands full
//! batches to the TUN writer thread instead, so that the next batch is decrypted while the host runs
//! its receive path for this one. One thread per direction (plus the writer, fed in order) keeps each
//! flow in order and lets encryption, decryption and TUN writes run on the cores there are.
//!
//! Each decrypted packet passes the packet filter (`filter`), if one is set, before it joins the TUN batch;
//! outbound UDP packets record their flow for the filter to admit the replies.
//!
//! Locking: the device state (peers, index map, routes, keys, the packet filter) sits behind one `RwLock`,
//! read-locked per batch and write-locked only by configuration calls; each peer's `Tunn` has its own
//! `Mutex`; counters are atomics, and so is the filter's flow table. No allocation per packet: each thread
//! owns its buffers.

use crate::batch::{Batch, RecvBatch};
use crate::error::{Error, Result};
use crate::filter::{DropReason, Filter, FlowTable, RuleSpec};
use crate::io::{unmap, EventFd, OffloadStats, Tun, Udp};
use crate::keys::{self, KEY_LEN};
use crate::offload::GroTable;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering, Ordering::Relaxed,
};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Largest datagram or packet handled (a TUN super-packet or UDP GRO bundle is at most 64 KiB).
pub const MAX_PACKET: usize = 65536;
/// Room for WireGuard's overhead and the largest handshake message.
const BUF_LEN: usize = MAX_PACKET + 256;
/// WireGuard's overhead on a data packet (header and tag) plus padding to 16 bytes.
const WG_OVERHEAD: usize = 32 + 16;
/// Bytes and packets of the batch read from the TUN (room for a super-packet and its split).
pub(crate) const TUN_READ_BYTES: usize = 640 << 10;
pub(crate) const TUN_READ_PACKETS: usize = 512;
/// Bytes and packets of a batch of encrypted datagrams for one peer.
const UDP_OUT_BYTES: usize = 512 << 10;
const UDP_OUT_PACKETS: usize = 512;
/// Receive slots per `recvmmsg` (each holds a GRO bundle of up to 64 KiB).
const UDP_RECV_SLOTS: usize = 64;
/// Bytes and packets of the batch of decrypted packets written to the TUN at once.
pub(crate) const TUN_WRITE_BYTES: usize = 1 << 20;
pub(crate) const TUN_WRITE_PACKETS: usize = 1024;
/// Batches of decrypted packets handed to the TUN writer thread at most at once.
const TUN_WRITER_DEPTH: usize = 2;
/// A batch of at least this many packets goes to the TUN writer thread (so that the next batch is
/// decrypted while it is written); smaller ones, while the writer is idle, are written at once.
const TUN_WRITER_MIN_PACKETS: usize = 8;
/// How often timers run.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Items each queue to Python holds before new ones are dropped.
pub const QUEUE_LIMIT: usize = 4096;
/// Payload bytes the STUN/disco queue to Python holds before new datagrams are dropped (anyone can send
/// these, unauthenticated: the queue must stay small).
pub const DATAGRAM_QUEUE_BYTES: usize = 1 << 20;
/// Largest STUN or disco datagram queued for Python; longer ones are counted as malformed. STUN over UDP
/// stays within the path MTU (RFC 8489 §6.1), and disco messages are a few hundred bytes.
pub const MAX_STUN_DISCO_LEN: usize = 2048;
/// Payload bytes the relay queue to Python holds before new datagrams are dropped (our own encrypted
/// packets, each up to MTU + 32 bytes).
pub const RELAY_QUEUE_BYTES: usize = 4 << 20;
/// Least time between two handshakes a peer's data for an unknown index starts (WireGuard's REKEY_TIMEOUT).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a handshake is retried before WireGuard gives it up and drops its queued packets
/// (REKEY_ATTEMPT_TIME, WireGuard paper §6.4): a handshake started longer ago is no longer pending.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// Handshake initiations per second before the device asks for cookies (as boringtun's device does).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The disco magic, "TS💬".
pub const DISCO_MAGIC: &[u8] = b"TS\xf0\x9f\x92\xac";
const STUN_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// What a datagram arriving on the socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    WireGuard,
    Stun,
    Disco,
    Other,
}

/// Classify a datagram by its first bytes (WireGuard: type 1-4 then three zero bytes; STUN: magic
/// cookie at offset 4, RFC 8489 §5; disco: `TS💬`).
pub fn classify(d: &[u8]) -> Kind {
    if d.len() >= 4 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0] {
        Kind::WireGuard
    } else if d.len() >= 20 && d[0] & 0xc0 == 0 && d[4..8] == STUN_COOKIE {
        Kind::Stun
    } else if d.starts_with(DISCO_MAGIC) {
        Kind::Disco
    } else {
        Kind::Other
    }
}

/// How a peer's encrypted datagrams leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Direct,
    Relay,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }
}

impl FromStr for Path {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "direct" => Ok(Path::Direct),
            "relay" => Ok(Path::Relay),
            _ => Err(Error::Config(format!(
                "path must be \"direct\" or \"relay\", got {s:?}"
            ))),
        }
    }
}

/// Parse "ip:port" or "[ipv6]:port".
pub fn parse_endpoint(s: &str) -> Result<SocketAddr> {
    SocketAddr::from_str(s.trim()).map(unmap).map_err(|_| {
        Error::Config(format!(
            "malformed endpoint {s:?}: expected ip:port or [ipv6]:port"
        ))
    })
}

/// Parse a CIDR prefix ("100.64.0.1/32", "fd7a::/48"; a bare address means the host prefix). Host bits
/// are cleared, as wg(8) does.
pub fn parse_prefix(s: &str) -> Result<IpNetwork> {
    let bad = || {
        Error::Config(format!(
            "malformed allowed IP {s:?}: expected a CIDR prefix such as 100.64.0.1/32"
        ))
    };
    let (addr, len) = match s.trim().split_once('/') {
        Some((a, l)) => (
            IpAddr::from_str(a).map_err(|_| bad())?,
            Some(l.parse::<u8>().map_err(|_| bad())?),
        ),
        None => (IpAddr::from_str(s.trim()).map_err(|_| bad())?, None),
    };
    match addr {
        IpAddr::V4(a) => {
            ip_network::Ipv4Network::new_truncate(a, len.unwrap_or(32)).map(IpNetwork::V4)
        }
        IpAddr::V6(a) => {
            ip_network::Ipv6Network::new_truncate(a, len.unwrap_or(128)).map(IpNetwork::V6)
        }
    }
    .map_err(|_| bad())
}

/// Configuration of one peer, as `set_peer` takes it.
#[derive(Debug, Clone, Default)]
pub struct PeerConfig {
    pub allowed_ips: Vec<IpNetwork>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 = off.
    pub persistent_keepalive: u16,
    pub preshared_key: Option<[u8; KEY_LEN]>,
}

/// A snapshot of one peer, for `peers()`.
#[derive(Debug, Clone)]
pub struct PeerStats {
    pub public_key: [u8; KEY_LEN],
    pub allowed_ips: Vec<IpNetwork>,
    pub endpoint: Option<SocketAddr>,
    pub path: Path,
    pub persistent_keepalive: Option<u16>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Unix time, seconds.
    pub last_handshake: Option<f64>,
    /// Handshake initiations (WireGuard message type 1) sent to this peer, on either path.
    pub handshakes_sent: u64,
}

/// Device-wide counters (see `_native.pyi` `DeviceStats`).
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_datagrams: AtomicU64,
    pub tx_datagrams: AtomicU64,
    pub to_python: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_unknown_peer: AtomicU64,
    pub dropped_decrypt: AtomicU64,
    pub dropped_no_route: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_not_allowed: AtomicU64,
    pub dropped_no_endpoint: AtomicU64,
    pub dropped_send_error: AtomicU64,
    pub handshakes_sent: AtomicU64,
    pub handshakes_for_unknown_index: AtomicU64,
    /// Inbound packets the packet filter dropped, per `DropReason` (its discriminant).
    pub filter_dropped: [AtomicU64; DropReason::COUNT],
    pub handshakes_retried: AtomicU64,
}

/// A snapshot of `Counters`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub rx_datagrams: u64,
    pub tx_datagrams: u64,
    pub to_python: u64,
    pub dropped_malformed: u64,
    pub dropped_unknown_peer: u64,
    pub dropped_decrypt: u64,
    pub dropped_no_route: u64,
    pub dropped_queue_full: u64,
    pub dropped_not_allowed: u64,
    pub dropped_no_endpoint: u64,
    pub dropped_send_error: u64,
    pub handshakes_sent: u64,
    pub handshakes_for_unknown_index: u64,
    /// Rules of the packet filter in force; None when none is set (everything allowed).
    pub filter_rules: Option<usize>,
    /// Inbound packets the filter dropped, per `DropReason` (indexed by its discriminant).
    pub filter_dropped: [u64; DropReason::COUNT],
    /// UDP/SCTP flows this node started whose replies pass the filter (live entries of the flow table).
    pub filter_flows: usize,
    pub handshakes_retried: u64,
}

struct Peer {
    public_key: [u8; KEY_LEN],
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    path: AtomicU8,
    /// On the direct path: whether it is confirmed (by the caller, e.g. a disco Pong). While it is not,
    /// handshake messages to the peer also go to the relay queue.
    confirmed: AtomicBool,
    /// Milliseconds since device start of the last handshake initiation sent (`NEVER` if none).
    init_sent_ms: AtomicU64,
    keepalive: AtomicU64,
    /// Milliseconds since device start of the last datagram sent to this peer (for persistent keepalive).
    last_tx_ms: AtomicU64,
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    rx_packets: AtomicU64,
    /// Handshake initiations sent to this peer.
    handshakes_sent: AtomicU64,
    /// Milliseconds since device start of the last handshake started for data with an unknown index
    /// (`NEVER` if none).
    unknown_index_hs_ms: AtomicU64,
}

const NEVER: u64 = u64::MAX;

impl Peer {
    fn path(&self) -> Path {
        if self.path.load(Relaxed) == 1 {
            Path::Relay
        } else {
            Path::Direct
        }
    }

    /// Whether a handshake message to this peer also goes to the relay queue: on a direct path that is
    /// not confirmed (as Tailscale sends over DERP until a direct path is confirmed), or when `via_relay`
    /// (a reply to a message that came over DERP goes back that way too).
    fn handshake_via_relay(&self, via_relay: bool) -> bool {
        self.path() == Path::Direct && (via_relay || !self.confirmed.load(Relaxed))
    }
}

/// Whether a WireGuard datagram is a handshake message (initiation or response).
fn is_handshake(d: &[u8]) -> bool {
    matches!(d.first(), Some(1) | Some(2))
}

struct State {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: HashMap<[u8; KEY_LEN], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: IpNetworkTable<Arc<Peer>>,
    next_index: u32,
    /// The packet filter for decrypted inbound packets; None admits everything.
    filter: Option<Arc<Filter>>,
}

#[derive(Default)]
struct Queues {
    datagrams: VecDeque<(Vec<u8>, SocketAddr)>,
    relay: VecDeque<([u8; KEY_LEN], Vec<u8>)>,
    /// Payload bytes in `datagrams` and in `relay`.
    datagram_bytes: usize,
    relay_bytes: usize,
}

struct Shared {
    state: RwLock<State>,
    tun: Box<dyn Tun>,
    udp: Box<dyn Udp>,
    counters: Counters,
    /// Flows this node started (outbound UDP/SCTP), for the filter to admit their replies. Kept across
    /// filter changes, and recorded while no filter is set, so that setting one breaks no flow.
    flows: FlowTable,
    queues: Mutex<Queues>,
    /// Peers by their current endpoint, to find which peer data with an unknown index comes from. Entries
    /// are checked against the peer's endpoint on use. Lock order: `state`, then this.
    endpoints: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    event: EventFd,
    /// Buffers for `inject` (called from Python threads), allocated once.
    inject_bufs: Mutex<Bufs>,
    started: Instant,
    stopped: AtomicBool,
}

/// Items taken by `Device::drain`: STUN/disco datagrams with their source, and relay datagrams per peer.
pub type Drained = (Vec<(Vec<u8>, SocketAddr)>, Vec<([u8; KEY_LEN], Vec<u8>)>);

/// One node's data plane. Threads stop on `close` (or drop).
pub struct Device {
    shared: Arc<Shared>,
    /// The userspace network stack standing in for the TUN, if any (`userspace`).
    netstack: Option<crate::netstack::Netstack>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    timer_stop: Mutex<Option<mpsc::Sender<()>>>,
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Device(format!("{what}: {e}"))
}

impl Device {
    /// A device on a real TUN `tun_name` (MTU set, link left down) and UDP `[::]:listen_port`.
    pub fn open(
        private_key: &[u8; KEY_LEN],
        tun_name: &str,
        listen_port: u16,
        mtu: u32,
    ) -> Result<Device> {
        keys::check_private_key(private_key, "private key")?;
        let tun = crate::io::LinuxTun::create(tun_name, mtu)?;
        let udp = crate::io::LinuxUdp::bind(listen_port)?;
        Device::with_io(private_key, Box::new(tun), Box::new(udp))
    }

    /// A device without a TUN, on UDP `[::]:listen_port`: a userspace TCP/IP stack
    /// (`crate::netstack`) terminates TCP and UDP for `addresses` (CIDR host prefixes) in the process.
    /// Needs no privilege.
    pub fn userspace(
        private_key: &[u8; KEY_LEN],
        listen_port: u16,
        addresses: &[String],
        mtu: u32,
    ) -> Result<Device> {
        keys::check_private_key(private_key, "private key")?;
        let udp = crate::io::LinuxUdp::bind(listen_port)?;
        Device::with_netstack(private_key, Box::new(udp), addresses, mtu)
    }

    /// A device whose packets enter and leave through a userspace stack for `addresses`, over any UDP
    /// transport (tests pass in-memory ones).
    pub fn with_netstack(
        private_key: &[u8; KEY_LEN],
        udp: Box<dyn Udp>,
        addresses: &[String],
        mtu: u32,
    ) -> Result<Device> {
        keys::check_private_key(private_key, "private key")?;
        let ns = crate::netstack::Netstack::new(addresses, mtu)?;
        let mut dev = match Device::with_io(private_key, Box::new(ns.clone()), udp) {
            Ok(d) => d,
            Err(e) => {
                crate::io::Tun::release(&ns);
                return Err(e);
            }
        };
        dev.netstack = Some(ns);
        Ok(dev)
    }

    /// The userspace network stack; `Error::Device` for a device on a TUN or a closed device.
    pub fn netstack(&self) -> Result<&crate::netstack::Netstack> {
        self.check_open()?;
        self.netstack.as_ref().ok_or_else(|| {
            Error::Device("this device has a TUN, not a userspace network stack".into())
        })
    }

    /// Open a TCP connection to `dst` through the userspace stack (see `Netstack::tcp_dial`);
    /// `Error::Dial` at once if no peer's allowed IPs contain `dst`.
    pub fn tcp_dial(&self, dst: SocketAddr, timeout: Duration) -> Result<std::os::fd::OwnedFd> {
        let ns = self.netstack()?;
        let dst = unmap(dst);
        if self
            .shared
            .state
            .read()
            .routes
            .longest_match(dst.ip())
            .is_none()
        {
            return Err(Error::Dial(format!(
                "cannot connect to {dst}: no peer's allowed IPs contain {}",
                dst.ip()
            )));
        }
        ns.tcp_dial(dst, timeout)
    }

    /// A device over any transports (tests pass in-memory ones).
    pub fn with_io(
        private_key: &[u8; KEY_LEN],
        tun: Box<dyn Tun>,
        udp: Box<dyn Udp>,
    ) -> Result<Device> {
        keys::check_private_key(private_key, "private key")?;
        let private = StaticSecret::from(*private_key);
        let public = PublicKey::from(&private);
        let mut seed = [0u8; 4];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                private,
                public,
                peers: HashMap::new(),
                by_index: HashMap::new(),
                routes: IpNetworkTable::new(),
                next_index: u32::from_le_bytes(seed) >> 8,
                filter: None,
            }),
            tun,
            udp,
            counters: Counters::default(),
            flows: FlowTable::new(),
            queues: Mutex::new(Queues::default()),
            endpoints: Mutex::new(HashMap::new()),
            event: EventFd::new().map_err(|e| io_err("cannot create an eventfd", e))?,
            inject_bufs: Mutex::new(Bufs::new(2 * BUF_LEN, 64)),
            started: Instant::now(),
            stopped: AtomicBool::new(false),
        });
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| io_err("cannot start a thread", e))
        };
        let s1 = shared.clone();
        let s2 = shared.clone();
        let s3 = shared.clone();
        let s4 = shared.clone();
        let (to_writer, writer_rx) = mpsc::sync_channel::<Batch>(TUN_WRITER_DEPTH);
        let (writer_back, empties) = mpsc::sync_channel::<Batch>(TUN_WRITER_DEPTH);
        for _ in 0..TUN_WRITER_DEPTH {
            let _ = writer_back.send(Batch::new(TUN_WRITE_BYTES, TUN_WRITE_PACKETS));
        }
        let in_flight = Arc::new(AtomicUsize::new(0));
        let pipe = Pipe {
            to_writer,
            empties,
            in_flight: in_flight.clone(),
        };
        let threads = vec![
            spawn("tailpy-tun", Box::new(move || s1.tun_loop()))?,
            spawn("tailpy-udp", Box::new(move || s2.udp_loop(pipe)))?,
            spawn(
                "tailpy-tunw",
                Box::new(move || s4.tun_writer(writer_rx, writer_back, in_flight)),
            )?,
            spawn("tailpy-timers", Box::new(move || s3.timer_loop(stop_rx)))?,
        ];
        Ok(Device {
            shared,
            netstack: None,
            threads: Mutex::new(threads),
            timer_stop: Mutex::new(Some(stop_tx)),
        })
    }

    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.shared.state.read().public.to_bytes()
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.udp.local_port()
    }

    /// Mark every datagram the device's UDP socket sends with `mark` (`SO_MARK`; 0 clears): the bypass
    /// mark of policy routing, so WireGuard, STUN and disco never loop into the tunnel (Tailscale
    /// `wgengine/router`, `linuxfw.TailscaleBypassMark`). Needs CAP_NET_ADMIN.
    pub fn set_fwmark(&self, mark: u32) -> Result<()> {
        self.check_open()?;
        self.shared.udp.set_mark(mark).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied(format!(
                "setting the UDP socket's fwmark {mark:#x} needs CAP_NET_ADMIN"
            )),
            _ => io_err(&format!("cannot set the UDP socket's fwmark {mark:#x}"), e),
        })
    }

    /// Replace the private key; every peer's sessions are dropped.
    pub fn set_private_key(&self, private_key: &[u8; KEY_LEN]) -> Result<()> {
        keys::check_private_key(private_key, "private key")?;
        let mut st = self.shared.state.write();
        let private = StaticSecret::from(*private_key);
        let public = PublicKey::from(&private);
        if st.peers.contains_key(&public.to_bytes()) {
            return Err(Error::InvalidKey(
                "private key's public key is one of this device's peers".into(),
            ));
        }
        for p in st.peers.values() {
            p.tunn
                .lock()
                .set_static_private(private.clone(), public, None);
        }
        st.rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        st.private = private;
        st.public = public;
        Ok(())
    }

    /// Add a peer or update it in place (sessions survive changes of allowed IPs, endpoint and
    /// keepalive; a changed preshared key starts a new session).
    pub fn set_peer(&self, public_key: &[u8; KEY_LEN], config: PeerConfig) -> Result<()> {
        self.check_open()?;
        keys::check_peer_public_key(public_key, "peer public key")?;
        let mut guard = self.shared.state.write();
        let st = &mut *guard;
        if *public_key == st.public.to_bytes() {
            return Err(Error::InvalidKey(
                "peer public key is this device's own public key".into(),
            ));
        }
        let keepalive = config.persistent_keepalive;
        let peer = match st.peers.get(public_key) {
            Some(p) => {
                if let Some(psk) = config.preshared_key {
                    // boringtun cannot change the PSK of a Tunn: start afresh (same index).
                    let t = Tunn::new(
                        st.private.clone(),
                        PublicKey::from(*public_key),
                        Some(psk),
                        None,
                        p.index,
                        None,
                    );
                    *p.tunn.lock() = t;
                }
                p.clone()
            }
            None => {
                let index = loop {
                    let i = st.next_index & 0x00ff_ffff;
                    st.next_index = st.next_index.wrapping_add(1);
                    if !st.by_index.contains_key(&i) {
                        break i;
                    }
                };
                let tunn = Tunn::new(
                    st.private.clone(),
                    PublicKey::from(*public_key),
                    config.preshared_key,
                    None,
                    index,
                    None,
                );
                let p = Arc::new(Peer {
                    public_key: *public_key,
                    index,
                    tunn: Mutex::new(tunn),
                    endpoint: RwLock::new(None),
                    path: AtomicU8::new(0),
                    confirmed: AtomicBool::new(true),
                    init_sent_ms: AtomicU64::new(NEVER),
                    keepalive: AtomicU64::new(0),
                    last_tx_ms: AtomicU64::new(0),
                    tx_bytes: AtomicU64::new(0),
                    rx_bytes: AtomicU64::new(0),
                    tx_packets: AtomicU64::new(0),
                    rx_packets: AtomicU64::new(0),
                    handshakes_sent: AtomicU64::new(0),
                    unknown_index_hs_ms: AtomicU64::new(NEVER),
                });
                st.peers.insert(*public_key, p.clone());
                st.by_index.insert(index, p.clone());
                p
            }
        };
        if let Some(ep) = config.endpoint {
            self.shared.set_endpoint(&peer, unmap(ep));
        }
        peer.keepalive.store(u64::from(keepalive), Relaxed);
        st.routes.retain(|_, p| !Arc::ptr_eq(p, &peer));
        for net in config.allowed_ips {
            st.routes.insert(net, peer.clone());
        }
        Ok(())
    }

    /// Set the packet filter for decrypted inbound packets (see `filter`), or none (`None`: everything
    /// is admitted, as before any filter). The rules are compiled before the swap; packets of a batch in
    /// progress see the old filter or the new one, never a mix. Raises `Error::Config` for a malformed
    /// rule, and then the filter in force stays.
    pub fn set_filter(&self, rules: Option<&[RuleSpec]>) -> Result<()> {
        let compiled = rules.map(Filter::new).transpose()?.map(Arc::new);
        self.shared.state.write().filter = compiled;
        Ok(())
    }

    /// Remove a peer; true if it existed.
    pub fn remove_peer(&self, public_key: &[u8; KEY_LEN]) -> bool {
        let mut st = self.shared.state.write();
        match st.peers.remove(public_key) {
            Some(p) => {
                st.by_index.remove(&p.index);
                st.routes.retain(|_, q| !Arc::ptr_eq(q, &p));
                self.shared
                    .endpoints
                    .lock()
                    .retain(|_, q| !Arc::ptr_eq(q, &p));
                true
            }
            None => false,
        }
    }

    fn peer(&self, public_key: &[u8; KEY_LEN]) -> Result<Arc<Peer>> {
        self.shared
            .state
            .read()
            .peers
            .get(public_key)
            .cloned()
            .ok_or_else(|| {
                Error::Device(format!("no peer with public key {}", hex_short(public_key)))
            })
    }

    /// Choose how `public_key`'s datagrams leave. `confirmed` matters on the direct path only: while it
    /// is false (a best-guess endpoint nothing has answered on yet), handshake messages also go to the
    /// relay queue.
    pub fn set_path(&self, public_key: &[u8; KEY_LEN], path: Path, confirmed: bool) -> Result<()> {
        let peer = self.peer(public_key)?;
        peer.confirmed.store(confirmed, Relaxed);
        peer.path.store(u8::from(path == Path::Relay), Relaxed);
        Ok(())
    }

    /// Re-send a pending handshake at once on the peer's current path: when this device sent a handshake
    /// initiation to `public_key` within `REKEY_ATTEMPT_TIME` and has no session with it (the initiation
    /// or its response was lost, e.g. sent before any path to the peer worked), a new initiation is sent
    /// now (boringtun's `format_handshake_initiation(force_resend = true)`) instead of after
    /// REKEY_TIMEOUT; packets queued for the peer go out once it completes. Call it when the peer's path
    /// is confirmed or changes. Returns whether one was sent; an unknown peer is an error.
    pub fn retry_handshake(&self, public_key: &[u8; KEY_LEN]) -> Result<bool> {
        self.check_open()?;
        let peer = self.peer(public_key)?;
        let sent = peer.init_sent_ms.load(Relaxed);
        let now = self.shared.now_ms();
        if sent == NEVER || now.saturating_sub(sent) >= REKEY_ATTEMPT_TIME.as_millis() as u64 {
            return Ok(false);
        }
        let mut buf = [0u8; 256];
        let mut tunn = peer.tunn.lock();
        if tunn.time_since_last_handshake().is_some() {
            return Ok(false);
        }
        let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, true)
        else {
            return Ok(false);
        };
        let init = init.to_vec();
        drop(tunn);
        self.shared
            .counters
            .handshakes_retried
            .fetch_add(1, Relaxed);
        self.shared.send_to_peer(&peer, &init, false);
        Ok(true)
    }

    /// Process a WireGuard datagram as if received from `public_key` (a DERP payload).
    pub fn inject(&self, public_key: &[u8; KEY_LEN], datagram: &[u8]) -> Result<()> {
        self.check_open()?;
        let peer = self.peer(public_key)?;
        if classify(datagram) != Kind::WireGuard {
            self.shared.counters.dropped_malformed.fetch_add(1, Relaxed);
            return Ok(());
        }
        let mut bufs = self.shared.inject_bufs.lock();
        bufs.now_s = self.shared.now_s();
        let st = self.shared.state.read();
        self.shared
            .receive_wireguard(&st, datagram, None, Some(&peer), &mut bufs);
        self.shared.flush_tun(&mut bufs);
        Ok(())
    }

    /// Send one datagram from the device's socket.
    pub fn send_datagram(&self, data: &[u8], to: SocketAddr) -> Result<()> {
        self.check_open()?;
        self.shared
            .udp
            .send_to(data, to)
            .map_err(|e| io_err(&format!("cannot send a datagram to {to}"), e))?;
        self.shared.counters.tx_datagrams.fetch_add(1, Relaxed);
        Ok(())
    }

    /// The eventfd that is readable while `drain` has items.
    pub fn event_fd(&self) -> i32 {
        self.shared.event.fd()
    }

    /// Take up to `max_items` from each queue; the eventfd stays readable only if items remain.
    pub fn drain(&self, max_items: usize) -> Drained {
        let mut guard = self.shared.queues.lock();
        let q = &mut *guard;
        let n = max_items.min(q.datagrams.len());
        let datagrams: Vec<_> = q.datagrams.drain(..n).collect();
        q.datagram_bytes -= datagrams.iter().map(|(d, _)| d.len()).sum::<usize>();
        let n = max_items.min(q.relay.len());
        let relay: Vec<_> = q.relay.drain(..n).collect();
        q.relay_bytes -= relay.iter().map(|(_, d)| d.len()).sum::<usize>();
        if q.datagrams.is_empty() && q.relay.is_empty() {
            self.shared.event.reset();
        }
        (datagrams, relay)
    }

    pub fn peers(&self) -> Vec<PeerStats> {
        let st = self.shared.state.read();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut out: Vec<PeerStats> = st
            .peers
            .values()
            .map(|p| {
                let since = p.tunn.lock().stats().0;
                let ka = p.keepalive.load(Relaxed) as u16;
                PeerStats {
                    public_key: p.public_key,
                    allowed_ips: st
                        .routes
                        .iter()
                        .filter(|(_, q)| Arc::ptr_eq(q, p))
                        .map(|(n, _)| n)
                        .collect(),
                    endpoint: *p.endpoint.read(),
                    path: p.path(),
                    persistent_keepalive: (ka > 0).then_some(ka),
                    tx_bytes: p.tx_bytes.load(Relaxed),
                    rx_bytes: p.rx_bytes.load(Relaxed),
                    tx_packets: p.tx_packets.load(Relaxed),
                    rx_packets: p.rx_packets.load(Relaxed),
                    last_handshake: since.map(|d| now.saturating_sub(d).as_secs_f64()),
                    handshakes_sent: p.handshakes_sent.load(Relaxed),
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        out
    }

    /// Which offloads the transports use, the fallbacks they took, and their counters.
    pub fn offload_stats(&self) -> OffloadStats {
        let mut s = OffloadStats::default();
        self.shared.tun.offload_stats(&mut s);
        self.shared.udp.offload_stats(&mut s);
        s
    }

    pub fn stats(&self) -> DeviceStats {
        let c = &self.shared.counters;
        DeviceStats {
            rx_datagrams: c.rx_datagrams.load(Relaxed),
            tx_datagrams: c.tx_datagrams.load(Relaxed),
            to_python: c.to_python.load(Relaxed),
            dropped_malformed: c.dropped_malformed.load(Relaxed),
            dropped_unknown_peer: c.dropped_unknown_peer.load(Relaxed),
            dropped_decrypt: c.dropped_decrypt.load(Relaxed),
            dropped_no_route: c.dropped_no_route.load(Relaxed),
            dropped_queue_full: c.dropped_queue_full.load(Relaxed),
            dropped_not_allowed: c.dropped_not_allowed.load(Relaxed),
            dropped_no_endpoint: c.dropped_no_endpoint.load(Relaxed),
            dropped_send_error: c.dropped_send_error.load(Relaxed),
            handshakes_sent: c.handshakes_sent.load(Relaxed),
            handshakes_for_unknown_index: c.handshakes_for_unknown_index.load(Relaxed),
            filter_rules: self.shared.state.read().filter.as_ref().map(|f| f.rules()),
            filter_dropped: std::array::from_fn(|i| c.filter_dropped[i].load(Relaxed)),
            filter_flows: self.shared.flows.live_flows(self.shared.now_s()),
            handshakes_retried: c.handshakes_retried.load(Relaxed),
        }
    }

    /// Stop the threads and release the TUN and socket (when the device is dropped). Idempotent.
    pub fn close(&self) {
        self.shared.stopped.store(true, Relaxed);
        self.shared.tun.close();
        self.shared.udp.close();
        self.timer_stop.lock().take();
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        self.shared.tun.release();
        self.shared.udp.release();
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Device("the device is closed".into()));
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        self.shared.stopped.load(Relaxed)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.close();
    }
}

fn hex_short(k: &[u8]) -> String {
    k.iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + "…"
}

/// A thread's buffers, reused for every batch.
struct Bufs {
    /// Scratch for handshake messages, cookies and timers' output.
    dst: Vec<u8>,
    /// Encrypted datagrams for one peer, end to end (one GSO send).
    out: Batch,
    /// Decrypted packets for the TUN.
    tun: Batch,
    gro: GroTable,
    /// The TUN writer thread, for the UDP thread's full batches.
    pipe: Option<Pipe>,
    /// Seconds on the device's clock, read once per batch (the filter's flow table).
    now_s: u64,
}

impl Bufs {
    /// Buffers with a TUN batch of `tun_bytes` / `tun_packets`.
    fn new(tun_bytes: usize, tun_packets: usize) -> Self {
        Bufs {
            dst: vec![0; BUF_LEN],
            out: Batch::new(UDP_OUT_BYTES, UDP_OUT_PACKETS),
            tun: Batch::new(tun_bytes, tun_packets),
            gro: GroTable::new(),
            pipe: None,
            now_s: 0,
        }
    }
}

/// The UDP thread's end of the TUN writer thread: full batches go out on `to_writer`, written (empty)
/// ones come back on `empties`; `in_flight` counts batches handed over and not yet written. A batch is
/// written by the UDP thread itself only while nothing is in flight, so packets reach the TUN in the
/// order they were decrypted.
struct Pipe {
    to_writer: mpsc::SyncSender<Batch>,
    empties: mpsc::Receiver<Batch>,
    in_flight: Arc<AtomicUsize>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn now_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn signal_if(&self, was_empty: bool) {
        if was_empty {
            self.event.signal();
        }
    }

    /// Send one WireGuard datagram (a handshake message, a keepalive) to a peer on its current path; a
    /// handshake message also to the relay queue while the direct path is unconfirmed or when `via_relay`
    /// (see `Peer::handshake_via_relay`).
    fn send_to_peer(&self, peer: &Peer, datagram: &[u8], via_relay: bool) {
        let now = self.now_ms();
        if datagram.first() == Some(&1) {
            self.counters.handshakes_sent.fetch_add(1, Relaxed);
            peer.init_sent_ms.store(now, Relaxed);
            peer.handshakes_sent.fetch_add(1, Relaxed);
        }
        peer.last_tx_ms.store(now, Relaxed);
        // Also relayed: counted as sent even when the direct copy cannot go.
        let relayed = is_handshake(datagram)
            && peer.handshake_via_relay(via_relay)
            && self.queue_relay(peer, datagram);
        let sent = match peer.path() {
            Path::Relay => self.queue_relay(peer, datagram),
            Path::Direct => match *peer.endpoint.read() {
                None => {
                    self.counters.dropped_no_endpoint.fetch_add(1, Relaxed);
                    false
                }
                Some(to) if self.udp.send_to(datagram, to).is_err() => {
                    self.counters.dropped_send_error.fetch_add(1, Relaxed);
                    false
                }
                Some(_) => {
                    self.counters.tx_datagrams.fetch_add(1, Relaxed);
                    true
                }
            },
        };
        if !sent && !relayed {
            return;
        }
        peer.tx_packets.fetch_add(1, Relaxed);
        peer.tx_bytes.fetch_add(datagram.len() as u64, Relaxed);
    }

    fn tun_loop(&self) {
        let mut bufs = Bufs::new(BUF_LEN, 1);
        let mut input = Batch::new(TUN_READ_BYTES, TUN_READ_PACKETS);
        while !self.stopped.load(Relaxed) {
            input.clear();
            match self.tun.recv_batch(&mut input) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => break,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            self.outbound(&input, &mut bufs);
        }
    }

    /// Packets from the TUN: route each, encrypt runs of packets for one peer into `bufs.out`, send
    /// each run as one batch.
    fn outbound(&self, input: &Batch, bufs: &mut Bufs) {
        let mut run: Option<Arc<Peer>> = None;
        let mut last: Option<(IpAddr, Arc<Peer>)> = None;
        let now = self.now_s();
        let st = self.state.read();
        for packet in input.iter() {
            let Some(dst) = Tunn::dst_address(packet) else {
                self.counters.dropped_no_route.fetch_add(1, Relaxed);
                continue;
            };
            // Packets of one super-packet share their destination: look it up once.
            let peer = match &last {
                Some((a, p)) if *a == dst => p.clone(),
                _ => match st.routes.longest_match(dst) {
                    Some((_, p)) => {
                        last = Some((dst, p.clone()));
                        p.clone()
                    }
                    None => {
                        self.counters.dropped_no_route.fetch_add(1, Relaxed);
                        continue;
                    }
                },
            };
            if let Some(r) = &run {
                if !Arc::ptr_eq(r, &peer) || !bufs.out.has_room(packet.len() + WG_OVERHEAD) {
                    self.flush_out(r, &mut bufs.out);
                }
            }
            run = Some(peer.clone());
            self.flows.record_outbound(packet, now);
            let res = peer.tunn.lock().encapsulate(packet, bufs.out.spare());
            if let TunnResult::WriteToNetwork(d) = res {
                let n = d.len();
                bufs.out.commit(n);
            }
        }
        drop(st);
        if let Some(r) = &run {
            self.flush_out(r, &mut bufs.out);
        }
    }

    /// Send the datagrams in `out` (all for `peer`) on the peer's path, and empty `out`.
    fn flush_out(&self, peer: &Peer, out: &mut Batch) {
        if out.is_empty() {
            return;
        }
        let c = &self.counters;
        let handshakes = out.iter().filter(|d| d.first() == Some(&1)).count();
        c.handshakes_sent.fetch_add(handshakes as u64, Relaxed);
        peer.handshakes_sent.fetch_add(handshakes as u64, Relaxed);
        let now = self.now_ms();
        if handshakes > 0 {
            peer.init_sent_ms.store(now, Relaxed);
        }
        peer.last_tx_ms.store(now, Relaxed);
        let mut relayed = 0;
        if peer.handshake_via_relay(false) {
            relayed = out
                .iter()
                .filter(|d| is_handshake(d) && self.queue_relay(peer, d))
                .count();
        }
        let sent = match peer.path() {
            Path::Relay => out.iter().filter(|d| self.queue_relay(peer, d)).count(),
            Path::Direct => match *peer.endpoint.read() {
                None => {
                    c.dropped_no_endpoint.fetch_add(out.len() as u64, Relaxed);
                    0
                }
                Some(to) => {
                    let sent = self.udp.send_batch(out, to);
                    c.tx_datagrams.fetch_add(sent as u64, Relaxed);
                    c.dropped_send_error
                        .fetch_add((out.len() - sent) as u64, Relaxed);
                    sent
                }
            },
        };
        let bytes: usize = out.iter().take(sent).map(<[u8]>::len).sum();
        // A handshake that could only go to the relay queue counts as sent (for activity).
        let sent = if sent == 0 { relayed } else { sent };
        peer.tx_packets.fetch_add(sent as u64, Relaxed);
        peer.tx_bytes.fetch_add(bytes as u64, Relaxed);
        out.clear();
    }

    /// Queue a datagram for Python to send over the relay; false (counted) if the queue is full.
    fn queue_relay(&self, peer: &Peer, datagram: &[u8]) -> bool {
        let mut q = self.queues.lock();
        if q.relay.len() >= QUEUE_LIMIT || q.relay_bytes + datagram.len() > RELAY_QUEUE_BYTES {
            self.counters.dropped_queue_full.fetch_add(1, Relaxed);
            return false;
        }
        let was_empty = q.relay.is_empty() && q.datagrams.is_empty();
        q.relay.push_back((peer.public_key, datagram.to_vec()));
        q.relay_bytes += datagram.len();
        self.signal_if(was_empty);
        true
    }

    /// Write the decrypted packets in `bufs.tun` to the TUN, or hand them to the TUN writer thread, and
    /// leave `bufs.tun` empty. Large batches (bulk traffic) go to the writer so that decryption of the
    /// next one overlaps the write (which runs the host's receive path: TCP, socket wakeups); small ones
    /// are written at once while the writer is idle, sparing interactive packets a thread handoff.
    fn flush_tun(&self, bufs: &mut Bufs) {
        if bufs.tun.is_empty() {
            return;
        }
        if let Some(pipe) = &bufs.pipe {
            let busy = pipe.in_flight.load(Ordering::Acquire) > 0;
            if busy || bufs.tun.len() >= TUN_WRITER_MIN_PACKETS {
                if let Ok(empty) = pipe.empties.recv() {
                    let full = std::mem::replace(&mut bufs.tun, empty);
                    pipe.in_flight.fetch_add(1, Ordering::AcqRel);
                    if pipe.to_writer.send(full).is_ok() {
                        return;
                    }
                    pipe.in_flight.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        self.tun.send_batch(&mut bufs.tun, &mut bufs.gro);
        bufs.tun.clear();
    }

    /// The TUN writer thread: write the batches the UDP thread hands over, in order, and hand them back.
    fn tun_writer(
        &self,
        full: mpsc::Receiver<Batch>,
        back: mpsc::SyncSender<Batch>,
        in_flight: Arc<AtomicUsize>,
    ) {
        let mut gro = GroTable::new();
        while let Ok(mut batch) = full.recv() {
            self.tun.send_batch(&mut batch, &mut gro);
            batch.clear();
            in_flight.fetch_sub(1, Ordering::AcqRel);
            if back.send(batch).is_err() {
                break;
            }
        }
    }

    fn udp_loop(&self, pipe: Pipe) {
        let mut bufs = Bufs::new(TUN_WRITE_BYTES, TUN_WRITE_PACKETS);
        bufs.pipe = Some(pipe);
        let mut rx = RecvBatch::new(UDP_RECV_SLOTS, MAX_PACKET);
        while !self.stopped.load(Relaxed) {
            match self.udp.recv_batch(&mut rx) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => break,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            bufs.now_s = self.now_s();
            let st = self.state.read();
            for k in 0..rx.len() {
                let from = rx.meta(k).from;
                for d in rx.datagrams(k) {
                    self.counters.rx_datagrams.fetch_add(1, Relaxed);
                    self.inbound(&st, d, from, &mut bufs);
                }
            }
            self.flush_tun(&mut bufs);
        }
    }

    /// One datagram from the socket: WireGuard to its peer, STUN and disco to Python.
    fn inbound(&self, st: &State, d: &[u8], from: SocketAddr, bufs: &mut Bufs) {
        match classify(d) {
            Kind::WireGuard => {
                if !bufs.tun.has_room(d.len()) {
                    self.flush_tun(bufs);
                }
                self.receive_wireguard(st, d, Some(from), None, bufs);
            }
            Kind::Stun | Kind::Disco if d.len() > MAX_STUN_DISCO_LEN => {
                self.counters.dropped_malformed.fetch_add(1, Relaxed);
            }
            Kind::Stun | Kind::Disco => {
                let mut q = self.queues.lock();
                if q.datagrams.len() >= QUEUE_LIMIT
                    || q.datagram_bytes + d.len() > DATAGRAM_QUEUE_BYTES
                {
                    self.counters.dropped_queue_full.fetch_add(1, Relaxed);
                    return;
                }
                let was_empty = q.relay.is_empty() && q.datagrams.is_empty();
                q.datagrams.push_back((d.to_vec(), from));
                q.datagram_bytes += d.len();
                self.counters.to_python.fetch_add(1, Relaxed);
                self.signal_if(was_empty);
            }
            Kind::Other => {
                self.counters.dropped_malformed.fetch_add(1, Relaxed);
            }
        }
    }

    /// A WireGuard datagram from the socket (`from` set) or injected for `via` (from DERP).
    fn receive_wireguard(
        &self,
        st: &State,
        d: &[u8],
        from: Option<SocketAddr>,
        via: Option<&Arc<Peer>>,
        bufs: &mut Bufs,
    ) {
        let c = &self.counters;
        // MAC1 (and, under load, cookie) check before any Diffie-Hellman.
        let packet = match st
            .rate_limiter
            .verify_packet(from.map(|a| a.ip()), d, &mut bufs.dst)
        {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                if let Some(to) = from {
                    if self.udp.send_to(cookie, to).is_ok() {
                        c.tx_datagrams.fetch_add(1, Relaxed);
                    }
                }
                return;
            }
            Err(TunnResult::Err(WireGuardError::InvalidPacket)) => {
                c.dropped_malformed.fetch_add(1, Relaxed);
                return;
            }
            Err(_) => {
                c.dropped_decrypt.fetch_add(1, Relaxed);
                return;
            }
        };
        let peer = match packet {
            Packet::HandshakeInit(ref init) => {
                match parse_handshake_anon(&st.private, &st.public, init) {
                    Ok(half) => match st.peers.get(&half.peer_static_public) {
                        Some(p) => p.clone(),
                        None => {
                            c.dropped_unknown_peer.fetch_add(1, Relaxed);
                            return;
                        }
                    },
                    Err(_) => {
                        c.dropped_decrypt.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
            Packet::HandshakeResponse(ref p) => match st.by_index.get(&(p.receiver_idx >> 8)) {
                Some(p) => p.clone(),
                None => {
                    c.dropped_unknown_peer.fetch_add(1, Relaxed);
                    return;
                }
            },
            Packet::PacketCookieReply(ref p) => match st.by_index.get(&(p.receiver_idx >> 8)) {
                Some(p) => p.clone(),
                None => {
                    c.dropped_unknown_peer.fetch_add(1, Relaxed);
                    return;
                }
            },
            Packet::PacketData(ref p) => match st.by_index.get(&(p.receiver_idx >> 8)) {
                Some(p) => p.clone(),
                None => {
                    c.dropped_unknown_peer.fetch_add(1, Relaxed);
                    self.handshake_for_unknown_index(st, None, from, via, bufs);
                    return;
                }
            },
        };
        if let Some(v) = via {
            // An injected datagram must be from the peer DERP says it is from.
            if !Arc::ptr_eq(v, &peer) {
                c.dropped_unknown_peer.fetch_add(1, Relaxed);
                return;
            }
        }
        let mut tunn = peer.tunn.lock();
        // Decrypt straight into the TUN batch; the packet joins it only if its source is allowed.
        match tunn.decapsulate(from.map(|a| a.ip()), d, bufs.tun.spare()) {
            TunnResult::Done => self.authenticated(&peer, from, d.len()),
            TunnResult::Err(WireGuardError::NoCurrentSession) => {
                // Data for a session of ours that doesn't exist (a previous incarnation of this device
                // that happened to use the same peer index).
                drop(tunn);
                c.dropped_decrypt.fetch_add(1, Relaxed);
                if d[0] == 4 {
                    self.handshake_for_unknown_index(st, Some(&peer), from, via, bufs);
                }
            }
            TunnResult::Err(_) => {
                c.dropped_decrypt.fetch_add(1, Relaxed);
            }
            TunnResult::WriteToNetwork(out) => {
                // The endpoint first: the reply (a handshake response) goes to where the peer is now,
                // and back over DERP too when the message came that way.
                self.authenticated(&peer, from, d.len());
                self.send_to_peer(&peer, out, via.is_some());
                // Flush packets queued while the handshake was in progress.
                while let TunnResult::WriteToNetwork(out) =
                    tunn.decapsulate(None, &[], &mut bufs.dst)
                {
                    self.send_to_peer(&peer, out, false);
                }
            }
            // The packet lives in `bufs.tun`, not in the session: the peer's lock is released before
            // the batch's TUN write, which runs the host's whole receive path (inner TCP, its ACKs back
            // into the TUN) and would otherwise stall this peer's TUN thread waiting to encrypt.
            TunnResult::WriteToTunnelV4(p, src) => {
                let n = p.len();
                drop(tunn);
                self.authenticated(&peer, from, d.len());
                self.deliver(st, &peer, n, src.into(), bufs);
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                let n = p.len();
                drop(tunn);
                self.authenticated(&peer, from, d.len());
                self.deliver(st, &peer, n, src.into(), bufs);
            }
        }
    }

    /// Count an authenticated datagram from `peer`, and follow the peer to its new address (roaming):
    /// only authenticated datagrams can move an endpoint.
    fn authenticated(&self, peer: &Arc<Peer>, from: Option<SocketAddr>, len: usize) {
        peer.rx_packets.fetch_add(1, Relaxed);
        peer.rx_bytes.fetch_add(len as u64, Relaxed);
        if let Some(from) = from {
            if *peer.endpoint.read() != Some(from) {
                self.set_endpoint(peer, from);
            }
        }
    }

    /// Move `peer` to endpoint `to`, keeping `endpoints` in step.
    fn set_endpoint(&self, peer: &Arc<Peer>, to: SocketAddr) {
        let mut eps = self.endpoints.lock();
        let mut ep = peer.endpoint.write();
        if let Some(old) = ep.replace(to) {
            if eps.get(&old).is_some_and(|p| Arc::ptr_eq(p, peer)) {
                eps.remove(&old);
            }
        }
        eps.insert(to, peer.clone());
    }

    /// A data packet for a session this device doesn't have: the peer still holds a session with a
    /// previous incarnation of this device (its daemon restarted with the same key) and would only give up
    /// on it after its own timeouts (10-15 s). If the packet comes from a peer's current endpoint (or over
    /// DERP from that peer: `via`) and there is no session with that peer, initiate a handshake now, at
    /// most once per `REKEY_TIMEOUT` per peer. `known` is the peer the receiver index names, if any. The
    /// packet itself is unauthenticated: at worst a forger with a peer's address makes us send that peer
    /// one handshake initiation every 5 s while we have no session with it anyway.
    fn handshake_for_unknown_index(
        &self,
        st: &State,
        known: Option<&Arc<Peer>>,
        from: Option<SocketAddr>,
        via: Option<&Arc<Peer>>,
        bufs: &mut Bufs,
    ) {
        let peer = match (via, from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match self.endpoints.lock().get(&from) {
                Some(p) if *p.endpoint.read() == Some(from) => p.clone(),
                _ => return,
            },
            (None, None) => return,
        };
        if known.is_some_and(|k| !Arc::ptr_eq(k, &peer))
            || !st
                .peers
                .get(&peer.public_key)
                .is_some_and(|p| Arc::ptr_eq(p, &peer))
        {
            return;
        }
        let now = self.now_ms();
        let last = peer.unknown_index_hs_ms.load(Relaxed);
        if last != NEVER && now.saturating_sub(last) < REKEY_TIMEOUT.as_millis() as u64 {
            return;
        }
        let mut tunn = peer.tunn.lock();
        if tunn.time_since_last_handshake().is_some() {
            return; // A session exists: this is a stray packet, not a peer stuck on an old session.
        }
        if peer
            .unknown_index_hs_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        // Not forced: a handshake already in progress is left to its own retries.
        if let TunnResult::WriteToNetwork(init) =
            tunn.format_handshake_initiation(&mut bufs.dst, false)
        {
            drop(tunn);
            self.counters
                .handshakes_for_unknown_index
                .fetch_add(1, Relaxed);
            self.send_to_peer(&peer, init, false);
        }
    }

    /// Keep the decrypted packet of `len` bytes at the start of `bufs.tun.spare()` for the TUN if its
    /// source is within the sending peer's allowed IPs and the packet filter (if any) admits it.
    fn deliver(&self, st: &State, peer: &Arc<Peer>, len: usize, src: IpAddr, bufs: &mut Bufs) {
        match st.routes.longest_match(src) {
            Some((_, p)) if Arc::ptr_eq(p, peer) => {
                if let Some(f) = &st.filter {
                    let packet = &bufs.tun.spare()[..len];
                    if let Err(why) = f.check_inbound(packet, &self.flows, bufs.now_s) {
                        self.counters.filter_dropped[why as usize].fetch_add(1, Relaxed);
                        return;
                    }
                }
                bufs.tun.commit(len);
            }
            _ => {
                self.counters.dropped_not_allowed.fetch_add(1, Relaxed);
            }
        }
    }

    fn timer_loop(&self, stop: mpsc::Receiver<()>) {
        let mut buf = vec![0u8; BUF_LEN];
        let mut last_reset = Instant::now();
        loop {
            match stop.recv_timeout(TIMER_TICK) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let peers: Vec<Arc<Peer>> = {
                let st = self.state.read();
                if last_reset.elapsed() >= Duration::from_secs(1) {
                    st.rate_limiter.reset_count();
                    last_reset = Instant::now();
                }
                st.peers.values().cloned().collect()
            };
            let now = self.now_ms();
            for peer in peers {
                let mut tunn = peer.tunn.lock();
                if let TunnResult::WriteToNetwork(d) = tunn.update_timers(&mut buf) {
                    drop(tunn);
                    self.send_to_peer(&peer, d, false);
                    continue;
                }
                let ka = peer.keepalive.load(Relaxed);
                if ka > 0 && now.saturating_sub(peer.last_tx_ms.load(Relaxed)) >= ka * 1000 {
                    if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&[], &mut buf) {
                        drop(tunn);
                        self.send_to_peer(&peer, d, false);
                    }
                }
            }
        }
    }
}
