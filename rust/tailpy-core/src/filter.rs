//! The packet filter: which decrypted inbound packets reach the TUN.
//!
//! After Tailscale's `wgengine/filter/filter.go` (`Filter.RunIn`, `runIn4`/`runIn6`, `pre`, `runOut`)
//! and `net/packet/packet.go` (`Parsed.decode4`/`decode6`). Rules arrive in `tailcfg.FilterRule`'s
//! shape ([`RuleSpec`]: source addresses, destination prefixes with port ranges, IP protocols) and are
//! compiled into a [`Filter`]: per address family, per port-carrying protocol (TCP, UDP, SCTP) a table
//! of the port space cut into intervals, each listing the rule entries that cover it, and each rule's
//! sources as one sorted set of address ranges (binary search).
//!
//! An inbound packet is accepted when:
//!
//! * it is a fragment other than the first, at an offset of at least 80 bytes (a first fragment is
//!   checked as a whole packet; its transport header must fit in it);
//! * TCP: it is not a connection-opening SYN (SYN set, ACK clear): other segments belong to a
//!   connection, whose SYN was checked; a SYN must match a rule (source, destination, port, protocol);
//! * UDP and SCTP: a rule matches, or it is a reply to a flow this node started: the [`FlowTable`]
//!   holds the 5-tuples of recent outbound packets (reversed), bounded, oldest evicted;
//! * ICMP and ICMPv6: echo replies and error messages always; anything else (echo requests) when some
//!   rule lets the source reach any port of the destination, whatever its protocols (as Tailscale's
//!   `matchIPsOnly`);
//! * any other IP protocol (IPv6: the first next header other than a fragment header): a rule that lists
//!   the protocol and covers every port (0-65535) of the destination (`matchProtoAndIPsOnlyIfAllPorts`).
//!
//! Packets to multicast or link-local destinations (other than 169.254.169.254) and packets too short
//! for their headers are dropped first, as `filter.go`'s `pre` does. Where tailpy differs from Tailscale:
//! ICMP errors are all of RFC 792's and RFC 4443's error types (Tailscale accepts only destination
//! unreachable and time exceeded, so an ICMPv6 packet-too-big from a peer without a rule is dropped
//! there); and IPv6 fragments are followed as IPv4's are (Tailscale marks every IPv6 packet with a
//! fragment header as unknown).
//!
//! Outbound packets are never filtered; UDP and SCTP ones record their flow. Verdicts are counted per
//! [`DropReason`] by the device.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::{Error, Result};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6_FRAGMENT: u8 = 44;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
/// What an empty protocol list in a rule means (tailcfg.FilterRule.IPProto): TCP, UDP, ICMP, ICMPv6.
pub const DEFAULT_PROTOS: [u8; 4] = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6];

/// A first fragment must carry at least this many bytes past the IP header, and a later fragment must
/// start at least this far in (packet.go's `minFrag`: the largest IP options plus a TCP header), so that
/// no fragment can overwrite the ports another one showed.
const MIN_FRAGMENT_BYTES: usize = 80;

/// Slots of the flow table (a power of two) and slots per bucket.
pub const FLOW_SLOTS: usize = 4096;
const FLOW_WAYS: usize = 4;
/// A recorded flow not refreshed by an outbound packet or a reply for this long is forgotten (seconds).
pub const FLOW_IDLE_SECS: u64 = 120;

/// One rule as control sends it (tailcfg.FilterRule): `src_ips` entries are `"*"`, an address, a CIDR
/// prefix or an inclusive range `"first-last"`; each destination is such an entry with an inclusive port
/// range; `ip_proto` lists IANA protocol numbers (empty: [`DEFAULT_PROTOS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSpec {
    pub src_ips: Vec<String>,
    pub dst_ports: Vec<(String, u16, u16)>,
    pub ip_proto: Vec<u8>,
}

/// Why an inbound packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A TCP SYN, an ICMP echo request (or other non-reply ICMP) no rule admits.
    NoRule = 0,
    /// A UDP or SCTP datagram no rule admits that is not a reply to a flow this node started.
    NotAReply = 1,
    /// Another IP protocol no all-ports rule for that protocol admits.
    Protocol = 2,
    /// Too short for its headers, a truncated header, or a suspicious fragment.
    Malformed = 3,
    /// To a multicast address.
    Multicast = 4,
    /// To a link-local address.
    LinkLocal = 5,
}

impl DropReason {
    pub const COUNT: usize = 6;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::NoRule,
        DropReason::NotAReply,
        DropReason::Protocol,
        DropReason::Malformed,
        DropReason::Multicast,
        DropReason::LinkLocal,
    ];

    /// The name used in stats (`dropped_<name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRule => "no_rule",
            DropReason::NotAReply => "not_a_reply",
            DropReason::Protocol => "protocol",
            DropReason::Malformed => "malformed",
            DropReason::Multicast => "multicast",
            DropReason::LinkLocal => "link_local",
        }
    }
}

// -- address sets -----------------------------------------------------------------------------------

/// An inclusive address range of one family; IPv4 addresses are held in the low 32 bits.
type Range = (u128, u128);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn v4_range(lo: u32, hi: u32) -> (Family, Range) {
    (Family::V4, (u128::from(lo), u128::from(hi)))
}

fn prefix_range(addr: IpAddr, len: u8) -> Option<(Family, Range)> {
    match addr {
        IpAddr::V4(a) => {
            if len > 32 {
                return None;
            }
            let a = u32::from(a);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Some(v4_range(a & mask, (a & mask) | !mask))
        }
        IpAddr::V6(a) => {
            if len > 128 {
                return None;
            }
            let a = u128::from(a);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            Some((Family::V6, (a & mask, (a & mask) | !mask)))
        }
    }
}

/// Parse one address entry: `"*"` (both families, every address), an address, a CIDR prefix (host bits
/// ignored) or an inclusive range `"first-last"` of one family.
fn parse_addrs(s: &str) -> Result<Vec<(Family, Range)>> {
    let bad = |why: &str| Error::Config(format!("malformed filter address {s:?}: {why}"));
    let t = s.trim();
    if t == "*" {
        return Ok(vec![v4_range(0, u32::MAX), (Family::V6, (0, u128::MAX))]);
    }
    if let Some((a, l)) = t.split_once('/') {
        let addr = IpAddr::from_str(a).map_err(|_| bad("not an IP address"))?;
        let len: u8 = l.parse().map_err(|_| bad("bad prefix length"))?;
        return prefix_range(addr, len)
            .map(|r| vec![r])
            .ok_or_else(|| bad("prefix length too long"));
    }
    if let Some((a, b)) = t.split_once('-') {
        let a = IpAddr::from_str(a.trim()).map_err(|_| bad("not an IP address"))?;
        let b = IpAddr::from_str(b.trim()).map_err(|_| bad("not an IP address"))?;
        let (fa, (lo, _)) = prefix_range(a, if a.is_ipv4() { 32 } else { 128 }).expect("host");
        let (fb, (hi, _)) = prefix_range(b, if b.is_ipv4() { 32 } else { 128 }).expect("host");
        if fa != fb {
            return Err(bad("range ends of different families"));
        }
        if lo > hi {
            return Err(bad("range is empty (first after last)"));
        }
        return Ok(vec![(fa, (lo, hi))]);
    }
    let a = IpAddr::from_str(t).map_err(|_| bad("not an IP address, prefix or range"))?;
    Ok(vec![
        prefix_range(a, if a.is_ipv4() { 32 } else { 128 }).expect("host")
    ])
}

/// Sorted, disjoint, non-adjacent ranges.
#[derive(Debug, Clone, Default)]
struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    fn from_ranges(mut v: Vec<Range>) -> Self {
        v.sort_unstable();
        let mut out: Vec<Range> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        RangeSet { ranges: out }
    }

    #[inline]
    fn contains(&self, a: u128) -> bool {
        let i = self.ranges.partition_point(|r| r.1 < a);
        i < self.ranges.len() && self.ranges[i].0 <= a
    }

    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

// -- compiled rules -----------------------------------------------------------------------------------

/// One destination of one rule.
#[derive(Debug, Clone, Copy)]
struct Entry {
    dst: Range,
    ports: (u16, u16),
    /// Index of the rule's source set.
    src: u32,
}

impl Entry {
    #[inline]
    fn admits(&self, srcs: &[RangeSet], src: u128, dst: u128) -> bool {
        self.dst.0 <= dst && dst <= self.dst.1 && srcs[self.src as usize].contains(src)
    }
}

/// The port space cut at every rule's port range ends: `starts[i]..starts[i+1]` is an interval every
/// port of which the same entries cover, `lists[i]`.
#[derive(Debug, Clone, Default)]
struct PortIndex {
    starts: Vec<u16>,
    lists: Vec<Vec<Entry>>,
}

impl PortIndex {
    fn build(entries: &[Entry]) -> Self {
        if entries.is_empty() {
            return PortIndex::default();
        }
        let mut cuts: Vec<u32> = vec![0];
        for e in entries {
            cuts.push(u32::from(e.ports.0));
            cuts.push(u32::from(e.ports.1) + 1);
        }
        cuts.sort_unstable();
        cuts.dedup();
        cuts.retain(|&c| c <= 65535);
        let lists = cuts
            .iter()
            .map(|&start| {
                entries
                    .iter()
                    .filter(|e| u32::from(e.ports.0) <= start && start <= u32::from(e.ports.1))
                    .copied()
                    .collect()
            })
            .collect();
        PortIndex {
            starts: cuts.into_iter().map(|c| c as u16).collect(),
            lists,
        }
    }

    #[inline]
    fn matches(&self, srcs: &[RangeSet], src: u128, dst: u128, port: u16) -> bool {
        if self.starts.is_empty() {
            return false;
        }
        let i = self.starts.partition_point(|&s| s <= port) - 1;
        self.lists[i].iter().any(|e| e.admits(srcs, src, dst))
    }
}

/// One rule's part in one address family: sources, destinations with port ranges, protocols.
type FamilyRule = (Vec<Range>, Vec<(Range, u16, u16)>, Vec<u8>);

/// The rules of one address family.
#[derive(Debug, Clone, Default)]
struct Table {
    /// Each rule's sources in this family.
    srcs: Vec<RangeSet>,
    tcp: PortIndex,
    udp: PortIndex,
    sctp: PortIndex,
    /// Every entry, whatever its protocols and ports (ICMP requests: `matchIPsOnly`).
    any: Vec<Entry>,
    /// Entries covering every port, per protocol other than TCP, UDP and SCTP.
    other: Vec<(u8, Entry)>,
}

impl Table {
    fn build(rules: &[FamilyRule]) -> Table {
        let mut t = Table::default();
        let (mut tcp, mut udp, mut sctp) = (Vec::new(), Vec::new(), Vec::new());
        for (srcs, dsts, protos) in rules {
            let set = RangeSet::from_ranges(srcs.clone());
            if set.is_empty() || dsts.is_empty() {
                continue;
            }
            let src = t.srcs.len() as u32;
            t.srcs.push(set);
            for &(dst, first, last) in dsts {
                let e = Entry {
                    dst,
                    ports: (first, last),
                    src,
                };
                t.any.push(e);
                for &p in protos {
                    match p {
                        PROTO_TCP => tcp.push(e),
                        PROTO_UDP => udp.push(e),
                        PROTO_SCTP => sctp.push(e),
                        _ if (first, last) == (0, 65535) => t.other.push((p, e)),
                        _ => {}
                    }
                }
            }
        }
        t.tcp = PortIndex::build(&tcp);
        t.udp = PortIndex::build(&udp);
        t.sctp = PortIndex::build(&sctp);
        t
    }
}

/// A compiled rule set: immutable, shared by the device's threads, swapped whole.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    v4: Table,
    v6: Table,
    rules: usize,
}

impl Filter {
    /// Compile `rules`. Raises `Error::Config` for a malformed address, prefix or range, or a port
    /// range whose first port is after its last.
    pub fn new(rules: &[RuleSpec]) -> Result<Filter> {
        let mut v4: Vec<FamilyRule> = Vec::with_capacity(rules.len());
        let mut v6: Vec<FamilyRule> = Vec::with_capacity(rules.len());
        for r in rules {
            let protos: Vec<u8> = if r.ip_proto.is_empty() {
                DEFAULT_PROTOS.to_vec()
            } else {
                r.ip_proto.clone()
            };
            let (mut s4, mut s6, mut d4, mut d6) = (vec![], vec![], vec![], vec![]);
            for s in &r.src_ips {
                for (f, range) in parse_addrs(s)? {
                    match f {
                        Family::V4 => s4.push(range),
                        Family::V6 => s6.push(range),
                    }
                }
            }
            for (ip, first, last) in &r.dst_ports {
                if first > last {
                    return Err(Error::Config(format!(
                        "malformed filter port range {first}-{last}: first after last"
                    )));
                }
                for (f, range) in parse_addrs(ip)? {
                    match f {
                        Family::V4 => d4.push((range, *first, *last)),
                        Family::V6 => d6.push((range, *first, *last)),
                    }
                }
            }
            v4.push((s4, d4, protos.clone()));
            v6.push((s6, d6, protos));
        }
        Ok(Filter {
            v4: Table::build(&v4),
            v6: Table::build(&v6),
            rules: rules.len(),
        })
    }

    /// How many rules were compiled.
    pub fn rules(&self) -> usize {
        self.rules
    }

    /// The verdict on a decrypted inbound IP packet: `Ok` to write it to the TUN, or why not. `flows`
    /// holds the flows this node started; `now` is seconds on the device's clock.
    #[inline]
    pub fn check_inbound(
        &self,
        packet: &[u8],
        flows: &FlowTable,
        now: u64,
    ) -> std::result::Result<(), DropReason> {
        let p = parse(packet)?;
        if p.dst_multicast() {
            return Err(DropReason::Multicast);
        }
        if p.dst_link_local() {
            return Err(DropReason::LinkLocal);
        }
        let t = if p.v6 { &self.v6 } else { &self.v4 };
        match p.l4 {
            L4::Fragment => Ok(()),
            L4::Tcp { flags, dport } => {
                if flags & (TCP_SYN | TCP_ACK) != TCP_SYN
                    || t.tcp.matches(&t.srcs, p.src, p.dst, dport)
                {
                    Ok(())
                } else {
                    Err(DropReason::NoRule)
                }
            }
            L4::Ports { sport, dport } => {
                let index = if p.proto == PROTO_UDP {
                    &t.udp
                } else {
                    &t.sctp
                };
                if index.matches(&t.srcs, p.src, p.dst, dport)
                    || flows.is_reply(flow_key(&flows.key, &p, sport, dport), now)
                {
                    Ok(())
                } else {
                    Err(DropReason::NotAReply)
                }
            }
            L4::Icmp { kind } => {
                if kind == IcmpKind::ReplyOrError
                    || t.any.iter().any(|e| e.admits(&t.srcs, p.src, p.dst))
                {
                    Ok(())
                } else {
                    Err(DropReason::NoRule)
                }
            }
            L4::Other => {
                if t.other
                    .iter()
                    .any(|(proto, e)| *proto == p.proto && e.admits(&t.srcs, p.src, p.dst))
                {
                    Ok(())
                } else {
                    Err(DropReason::Protocol)
                }
            }
        }
    }
}

// -- packets --------------------------------------------------------------------------------------------

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IcmpKind {
    /// Echo reply or an error message: always admitted.
    ReplyOrError,
    /// Echo request and anything else.
    Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum L4 {
    Tcp {
        flags: u8,
        dport: u16,
    },
    /// UDP or SCTP.
    Ports {
        sport: u16,
        dport: u16,
    },
    Icmp {
        kind: IcmpKind,
    },
    /// A fragment after the first.
    Fragment,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Parsed {
    v6: bool,
    proto: u8,
    src: u128,
    dst: u128,
    l4: L4,
}

impl Parsed {
    fn dst_multicast(&self) -> bool {
        if self.v6 {
            self.dst >> 120 == 0xff
        } else {
            self.dst >> 28 == 0xe
        }
    }

    fn dst_link_local(&self) -> bool {
        if self.v6 {
            self.dst >> 118 == 0xfe80 >> 6
        } else {
            self.dst >> 16 == 0xa9fe && self.dst != 0xa9fe_a9fe // 169.254.169.254 (cloud metadata)
        }
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parse an IP packet's addresses and transport header (packet.go's `decode4`/`decode6`).
#[inline]
fn parse(b: &[u8]) -> std::result::Result<Parsed, DropReason> {
    let bad = DropReason::Malformed;
    match b.first().map(|v| v >> 4) {
        Some(4) => {
            if b.len() < 20 {
                return Err(bad);
            }
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let total = usize::from(be16(b, 2));
            if ihl < 20 || total < ihl || total > b.len() {
                return Err(bad);
            }
            let src = u128::from(u32::from_be_bytes([b[12], b[13], b[14], b[15]]));
            let dst = u128::from(u32::from_be_bytes([b[16], b[17], b[18], b[19]]));
            let frag = be16(b, 6);
            let (more, offset) = (frag & 0x2000 != 0, usize::from(frag & 0x1fff) * 8);
            let proto = b[9];
            let sub = &b[ihl..total];
            let l4 = transport(proto, sub, more, offset, false)?;
            Ok(Parsed {
                v6: false,
                proto,
                src,
                dst,
                l4,
            })
        }
        Some(6) => {
            if b.len() < 40 {
                return Err(bad);
            }
            let total = 40 + usize::from(be16(b, 4));
            if total > b.len() {
                return Err(bad);
            }
            let addr = |at: usize| u128::from_be_bytes(b[at..at + 16].try_into().expect("16"));
            let (src, dst) = (addr(8), addr(24));
            let mut proto = b[6];
            let mut sub = &b[40..total];
            let (mut more, mut offset) = (false, 0);
            if proto == PROTO_IPV6_FRAGMENT {
                // RFC 8200 §4.5: next header, reserved, offset (13 bits, in 8-byte units) and M flag,
                // identification.
                if sub.len() < 8 {
                    return Err(bad);
                }
                proto = sub[0];
                let f = be16(sub, 2);
                offset = usize::from(f >> 3) * 8;
                more = f & 1 != 0;
                sub = &sub[8..];
            }
            let l4 = transport(proto, sub, more, offset, true)?;
            Ok(Parsed {
                v6: true,
                proto,
                src,
                dst,
                l4,
            })
        }
        _ => Err(bad),
    }
}

#[inline]
fn transport(
    proto: u8,
    sub: &[u8],
    more: bool,
    offset: usize,
    v6: bool,
) -> std::result::Result<L4, DropReason> {
    let bad = DropReason::Malformed;
    if offset != 0 {
        return if offset < MIN_FRAGMENT_BYTES {
            Err(bad)
        } else {
            Ok(L4::Fragment)
        };
    }
    if more && sub.len() < MIN_FRAGMENT_BYTES {
        return Err(bad);
    }
    match proto {
        PROTO_TCP => {
            if sub.len() < 20 {
                return Err(bad);
            }
            Ok(L4::Tcp {
                flags: sub[13] & 0x3f,
                dport: be16(sub, 2),
            })
        }
        PROTO_UDP | PROTO_SCTP => {
            if sub.len() < if proto == PROTO_UDP { 8 } else { 12 } {
                return Err(bad);
            }
            Ok(L4::Ports {
                sport: be16(sub, 0),
                dport: be16(sub, 2),
            })
        }
        PROTO_ICMP if !v6 => {
            if sub.len() < 4 {
                return Err(bad);
            }
            // RFC 792: echo reply 0; errors: destination unreachable 3, source quench 4, redirect 5,
            // time exceeded 11, parameter problem 12.
            let kind = match sub[0] {
                0 | 3 | 4 | 5 | 11 | 12 => IcmpKind::ReplyOrError,
                _ => IcmpKind::Request,
            };
            Ok(L4::Icmp { kind })
        }
        PROTO_ICMPV6 if v6 => {
            if sub.len() < 4 {
                return Err(bad);
            }
            // RFC 4443 §2.1: types 0-127 are errors; 129 is echo reply.
            let kind = if sub[0] < 128 || sub[0] == 129 {
                IcmpKind::ReplyOrError
            } else {
                IcmpKind::Request
            };
            Ok(L4::Icmp { kind })
        }
        _ => Ok(L4::Other),
    }
}

// -- flows ----------------------------------------------------------------------------------------------

/// The UDP and SCTP flows this node started, for their replies: a fixed-size, set-associative table of
/// keyed 64-bit hashes of 5-tuples (`FLOW_WAYS` slots per bucket, the least recently seen one evicted)
/// with the time each was last seen. Lock-free: outbound packets (one thread) write, inbound ones read.
/// A reply is recognised by its hash under a per-table random key; slots whose flow was idle for
/// `FLOW_IDLE_SECS` count as free.
pub struct FlowTable {
    /// The hash's secret key, random per table.
    key: [u64; 6],
    /// `(key hash | 1, last seen + 1)` per slot; 0 = empty.
    slots: Box<[(AtomicU64, AtomicU64)]>,
}

impl Default for FlowTable {
    fn default() -> Self {
        FlowTable::new()
    }
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable").finish_non_exhaustive()
    }
}

/// The folded 128-bit product of `a` and `b` (the mixing step of foldhash and wyhash).
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    r as u64 ^ (r >> 64) as u64
}

/// A keyed 64-bit hash of a 5-tuple (and the family), never 0. Every input word is masked with a secret
/// key word before it is multiplied, so a peer choosing its ports cannot aim at another flow's slot or
/// fingerprint without the key.
#[inline]
fn flow_key(k: &[u64; 6], p: &Parsed, sport: u16, dport: u16) -> u64 {
    let ports = u64::from(sport) << 16
        | u64::from(dport)
        | u64::from(p.proto) << 32
        | u64::from(p.v6) << 40;
    let a = fold(p.src as u64 ^ k[0], (p.src >> 64) as u64 ^ k[1]);
    let b = fold(p.dst as u64 ^ k[2], (p.dst >> 64) as u64 ^ k[3]);
    fold(a ^ ports ^ k[4], b ^ k[5]) | 1
}

impl FlowTable {
    pub fn new() -> Self {
        FlowTable {
            key: std::array::from_fn(|i| {
                let mut h = RandomState::new().build_hasher();
                h.write_usize(i);
                h.finish()
            }),
            slots: (0..FLOW_SLOTS)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
        }
    }

    fn bucket(&self, key: u64) -> &[(AtomicU64, AtomicU64)] {
        let b = (key >> 32) as usize % (FLOW_SLOTS / FLOW_WAYS);
        &self.slots[b * FLOW_WAYS..(b + 1) * FLOW_WAYS]
    }

    fn live(seen: u64, now: u64) -> bool {
        seen != 0 && now + 1 - seen.min(now + 1) < FLOW_IDLE_SECS
    }

    /// Record the flow of an outbound packet (UDP or SCTP; others are ignored), so that replies to it
    /// pass the filter. `now`: seconds on the device's clock.
    #[inline]
    pub fn record_outbound(&self, packet: &[u8], now: u64) {
        // Cheap test first: most traffic is TCP.
        let proto = match packet.first().map(|v| v >> 4) {
            Some(4) if packet.len() >= 20 => packet[9],
            Some(6) if packet.len() >= 40 => packet[6],
            _ => return,
        };
        if !matches!(proto, PROTO_UDP | PROTO_SCTP | PROTO_IPV6_FRAGMENT) {
            return;
        }
        let Ok(p) = parse(packet) else { return };
        let L4::Ports { sport, dport } = p.l4 else {
            return;
        };
        // The reply's 5-tuple: source and destination swapped.
        let reply = Parsed {
            src: p.dst,
            dst: p.src,
            ..p
        };
        self.insert(flow_key(&self.key, &reply, dport, sport), now);
    }

    fn insert(&self, key: u64, now: u64) {
        let stamp = now + 1;
        let bucket = self.bucket(key);
        let mut victim = 0;
        let mut oldest = u64::MAX;
        for (i, (k, seen)) in bucket.iter().enumerate() {
            let s = seen.load(Relaxed);
            if k.load(Relaxed) == key {
                if s != stamp {
                    seen.store(stamp, Relaxed);
                }
                return;
            }
            let s = if Self::live(s, now) { s } else { 0 };
            if s < oldest {
                oldest = s;
                victim = i;
            }
        }
        let (k, seen) = &bucket[victim];
        seen.store(stamp, Relaxed);
        k.store(key, Relaxed);
    }

    /// True if `key` is a live recorded flow (and refresh it).
    fn is_reply(&self, key: u64, now: u64) -> bool {
        for (k, seen) in self.bucket(key) {
            if k.load(Relaxed) == key {
                let s = seen.load(Relaxed);
                if !Self::live(s, now) {
                    return false;
                }
                if s != now + 1 {
                    seen.store(now + 1, Relaxed);
                }
                return true;
            }
        }
        false
    }

    /// How many flows are live at `now`.
    pub fn live_flows(&self, now: u64) -> usize {
        self.slots
            .iter()
            .filter(|(k, s)| k.load(Relaxed) != 0 && Self::live(s.load(Relaxed), now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn rule(src: &[&str], dst: &[(&str, u16, u16)], proto: &[u8]) -> RuleSpec {
        RuleSpec {
            src_ips: src.iter().map(|s| s.to_string()).collect(),
            dst_ports: dst
                .iter()
                .map(|(a, f, l)| (a.to_string(), *f, *l))
                .collect(),
            ip_proto: proto.to_vec(),
        }
    }

    /// An IPv4 packet: `proto`, then `l4` as its payload.
    fn v4(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
        p[16..20].copy_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
        p[20..].copy_from_slice(l4);
        p
    }

    fn v6(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + l4.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        p[6] = proto;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p[40..].copy_from_slice(l4);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 12];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&12u16.to_be_bytes());
        u
    }

    fn icmp(ty: u8) -> Vec<u8> {
        vec![ty, 0, 0, 0, 0, 1, 0, 1]
    }

    const A4: &str = "100.64.0.1";
    const B4: &str = "100.64.0.2";
    const C4: &str = "100.64.0.3";
    const A6: &str = "fd7a:115c:a1e0::1";
    const B6: &str = "fd7a:115c:a1e0::2";
    const C6: &str = "fd7a:115c:a1e0::3";

    /// A may reach B on TCP 22 (v4 and v6), and UDP 53 from anyone; the whole tailnet may ping B.
    fn ssh_filter() -> Filter {
        Filter::new(&[
            rule(
                &["100.64.0.1/32", A6],
                &[("100.64.0.2/32", 22, 22), ("fd7a:115c:a1e0::2/128", 22, 22)],
                &[PROTO_TCP],
            ),
            rule(&["*"], &[(B4, 53, 53), (B6, 53, 53)], &[PROTO_UDP]),
        ])
        .unwrap()
    }

    fn check(f: &Filter, p: &[u8]) -> std::result::Result<(), DropReason> {
        f.check_inbound(p, &FlowTable::new(), 0)
    }

    #[test]
    fn tcp_syn_needs_a_rule_other_segments_pass() {
        let f = ssh_filter();
        for (a, b, c) in [(A4, B4, C4), (A6, B6, C6)] {
            let mk = |src: &str, dst: &str, seg: Vec<u8>| {
                if a.contains(':') {
                    v6(src, dst, PROTO_TCP, &seg)
                } else {
                    v4(src, dst, PROTO_TCP, &seg)
                }
            };
            assert_eq!(check(&f, &mk(a, b, tcp(40000, 22, TCP_SYN))), Ok(()));
            assert_eq!(
                check(&f, &mk(a, b, tcp(40000, 80, TCP_SYN))),
                Err(DropReason::NoRule)
            );
            assert_eq!(
                check(&f, &mk(c, b, tcp(40000, 22, TCP_SYN))),
                Err(DropReason::NoRule)
            );
            // A SYN-ACK (a reply to our SYN), an ACK, a RST, data: part of a connection.
            for flags in [TCP_SYN | TCP_ACK, TCP_ACK, 0x04, 0x18] {
                assert_eq!(check(&f, &mk(c, b, tcp(80, 40000, flags))), Ok(()));
            }
        }
    }

    #[test]
    fn port_ranges_and_late_rules() {
        let mut rules: Vec<RuleSpec> = (0..100)
            .map(|i| {
                rule(
                    &[&format!("10.{i}.0.0/16")],
                    &[(B4, 1000 + i, 1000 + i)],
                    &[],
                )
            })
            .collect();
        rules.push(rule(&[A4], &[(B4, 8000, 8099)], &[PROTO_TCP]));
        rules.push(rule(&["100.64.0.10-100.64.0.20"], &[("*", 0, 65535)], &[]));
        let f = Filter::new(&rules).unwrap();
        let syn = |src: &str, port: u16| v4(src, B4, PROTO_TCP, &tcp(1, port, TCP_SYN));
        assert_eq!(check(&f, &syn(A4, 8000)), Ok(()));
        assert_eq!(check(&f, &syn(A4, 8050)), Ok(()));
        assert_eq!(check(&f, &syn(A4, 8099)), Ok(()));
        assert_eq!(check(&f, &syn(A4, 8100)), Err(DropReason::NoRule));
        assert_eq!(check(&f, &syn(A4, 7999)), Err(DropReason::NoRule));
        assert_eq!(check(&f, &syn("10.42.3.4", 1042)), Ok(()));
        assert_eq!(check(&f, &syn("10.42.3.4", 1043)), Err(DropReason::NoRule));
        // Ranges of sources, every port.
        assert_eq!(check(&f, &syn("100.64.0.10", 1)), Ok(()));
        assert_eq!(check(&f, &syn("100.64.0.20", 65535)), Ok(()));
        assert_eq!(check(&f, &syn("100.64.0.21", 1)), Err(DropReason::NoRule));
        assert_eq!(f.rules(), 102);
    }

    #[test]
    fn udp_by_rule_or_as_a_reply_to_an_outbound_flow() {
        let f = ssh_filter();
        let flows = FlowTable::new();
        // A rule: anyone to B:53.
        assert_eq!(
            f.check_inbound(&v4(C4, B4, PROTO_UDP, &udp(5353, 53)), &flows, 10),
            Ok(())
        );
        // Unsolicited: dropped.
        let reply = v4(A4, B4, PROTO_UDP, &udp(53, 40000));
        assert_eq!(
            f.check_inbound(&reply, &flows, 10),
            Err(DropReason::NotAReply)
        );
        // B queried A: A's answer is a reply.
        flows.record_outbound(&v4(B4, A4, PROTO_UDP, &udp(40000, 53)), 10);
        assert_eq!(f.check_inbound(&reply, &flows, 11), Ok(()));
        assert_eq!(flows.live_flows(11), 1);
        // Another source port, another peer, another protocol: not that flow.
        for other in [
            v4(A4, B4, PROTO_UDP, &udp(54, 40000)),
            v4(C4, B4, PROTO_UDP, &udp(53, 40000)),
            v4(A4, B4, PROTO_SCTP, &udp(53, 40000)),
        ] {
            assert_eq!(
                f.check_inbound(&other, &flows, 11),
                Err(DropReason::NotAReply)
            );
        }
        // Idle flows are forgotten.
        assert_eq!(
            f.check_inbound(&reply, &flows, 11 + FLOW_IDLE_SECS + 1),
            Err(DropReason::NotAReply)
        );
        // IPv6 too.
        flows.record_outbound(&v6(B6, A6, PROTO_UDP, &udp(40000, 53)), 20);
        assert_eq!(
            f.check_inbound(&v6(A6, B6, PROTO_UDP, &udp(53, 40000)), &flows, 20),
            Ok(())
        );
        assert_eq!(
            f.check_inbound(&v6(C6, B6, PROTO_UDP, &udp(53, 40000)), &flows, 20),
            Err(DropReason::NotAReply)
        );
    }

    #[test]
    fn flow_table_is_bounded() {
        let flows = FlowTable::new();
        for port in 0..(3 * FLOW_SLOTS as u16) {
            flows.record_outbound(&v4(B4, A4, PROTO_UDP, &udp(port, 53)), 1);
        }
        assert!(flows.live_flows(1) <= FLOW_SLOTS);
        // The newest flow is kept.
        let f = Filter::new(&[]).unwrap();
        let last = 3 * FLOW_SLOTS as u16 - 1;
        assert_eq!(
            f.check_inbound(&v4(A4, B4, PROTO_UDP, &udp(53, last)), &flows, 1),
            Ok(())
        );
    }

    #[test]
    fn icmp_echo_needs_reach_replies_and_errors_pass() {
        let f = ssh_filter();
        // A may reach B (TCP 22): A may ping B, whatever protocols the rule names.
        assert_eq!(check(&f, &v4(A4, B4, PROTO_ICMP, &icmp(8))), Ok(()));
        assert_eq!(check(&f, &v6(A6, B6, PROTO_ICMPV6, &icmp(128))), Ok(()));
        // Anyone may reach B's UDP 53 ("*"): C may ping B too. A filter without that rule drops it.
        assert_eq!(check(&f, &v4(C4, B4, PROTO_ICMP, &icmp(8))), Ok(()));
        let only_a = Filter::new(&[rule(&[A4, A6], &[(B4, 22, 22), (B6, 22, 22)], &[])]).unwrap();
        assert_eq!(
            check(&only_a, &v4(C4, B4, PROTO_ICMP, &icmp(8))),
            Err(DropReason::NoRule)
        );
        assert_eq!(
            check(&only_a, &v6(C6, B6, PROTO_ICMPV6, &icmp(128))),
            Err(DropReason::NoRule)
        );
        // Echo replies and errors always.
        for ty in [0, 3, 11] {
            assert_eq!(check(&only_a, &v4(C4, B4, PROTO_ICMP, &icmp(ty))), Ok(()));
        }
        for ty in [1, 2, 3, 129] {
            assert_eq!(check(&only_a, &v6(C6, B6, PROTO_ICMPV6, &icmp(ty))), Ok(()));
        }
        // Too short for its header.
        assert_eq!(
            check(&only_a, &v4(C4, B4, PROTO_ICMP, &[8, 0])),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn other_protocols_only_through_all_port_rules_that_list_them() {
        const GRE: u8 = 47;
        let f = Filter::new(&[
            rule(&[A4, A6], &[(B4, 0, 65535), (B6, 0, 65535)], &[GRE]),
            rule(&[C4], &[(B4, 1, 100)], &[GRE]),
            rule(&["*"], &[("*", 0, 65535)], &[]),
        ])
        .unwrap();
        assert_eq!(check(&f, &v4(A4, B4, GRE, &[0; 8])), Ok(()));
        assert_eq!(check(&f, &v6(A6, B6, GRE, &[0; 8])), Ok(()));
        // A rule with a port range does not open a portless protocol; the default set does not either.
        assert_eq!(
            check(&f, &v4(C4, B4, GRE, &[0; 8])),
            Err(DropReason::Protocol)
        );
        assert_eq!(
            check(&f, &v4(A4, B4, 50, &[0; 8])),
            Err(DropReason::Protocol)
        );
    }

    #[test]
    fn fragments() {
        let f = ssh_filter();
        // First fragment of a TCP SYN to port 80 with more to come: checked as a whole packet.
        let mut first = v4(
            A4,
            B4,
            PROTO_TCP,
            &[tcp(1, 80, TCP_SYN), vec![0; 80]].concat(),
        );
        first[6] = 0x20; // MF
        assert_eq!(check(&f, &first), Err(DropReason::NoRule));
        // A short first fragment, a later fragment too close to the start: malformed.
        let mut short = v4(A4, B4, PROTO_UDP, &udp(53, 1));
        short[6] = 0x20;
        assert_eq!(check(&f, &short), Err(DropReason::Malformed));
        let mut near = v4(C4, B4, PROTO_UDP, &[0; 40]);
        near[7] = 1; // offset 8 bytes
        assert_eq!(check(&f, &near), Err(DropReason::Malformed));
        // Later fragments pass (their first was checked).
        let mut later = v4(C4, B4, PROTO_UDP, &[0; 40]);
        later[7] = 185; // offset 1480 bytes
        assert_eq!(check(&f, &later), Ok(()));
        // IPv6: a fragment header (next header 44) before the transport header.
        let frag6 = |offset_units: u16, more: bool, payload: &[u8]| {
            let mut h = vec![PROTO_UDP, 0];
            h.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 7]);
            h.extend_from_slice(payload);
            v6(C6, B6, PROTO_IPV6_FRAGMENT, &h)
        };
        let big = [udp(1, 9999), vec![0; 100]].concat();
        assert_eq!(check(&f, &frag6(0, true, &big)), Err(DropReason::NotAReply));
        let big53 = [udp(1, 53), vec![0; 100]].concat();
        assert_eq!(check(&f, &frag6(0, true, &big53)), Ok(()));
        assert_eq!(check(&f, &frag6(185, false, &[0; 40])), Ok(()));
        assert_eq!(
            check(&f, &frag6(1, false, &[0; 40])),
            Err(DropReason::Malformed)
        );
        // An atomic fragment (offset 0, no more) is a whole packet.
        assert_eq!(check(&f, &frag6(0, false, &udp(1, 53))), Ok(()));
    }

    #[test]
    fn malformed_multicast_and_link_local() {
        let f = ssh_filter();
        assert_eq!(check(&f, &[]), Err(DropReason::Malformed));
        assert_eq!(check(&f, &[0x45; 19]), Err(DropReason::Malformed));
        assert_eq!(check(&f, &[0x70; 60]), Err(DropReason::Malformed));
        let mut long = v4(A4, B4, PROTO_TCP, &tcp(1, 22, TCP_SYN));
        long[2..4].copy_from_slice(&1000u16.to_be_bytes()); // total length past the end
        assert_eq!(check(&f, &long), Err(DropReason::Malformed));
        assert_eq!(
            check(&f, &v4(A4, B4, PROTO_TCP, &tcp(1, 22, TCP_SYN)[..12])),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            check(&f, &v4(A4, "224.0.0.251", PROTO_UDP, &udp(5353, 5353))),
            Err(DropReason::Multicast)
        );
        assert_eq!(
            check(&f, &v6(A6, "ff02::1", PROTO_UDP, &udp(5353, 5353))),
            Err(DropReason::Multicast)
        );
        assert_eq!(
            check(&f, &v4(A4, "169.254.1.1", PROTO_UDP, &udp(1, 53))),
            Err(DropReason::LinkLocal)
        );
        assert_eq!(
            check(&f, &v6(A6, "fe80::1", PROTO_UDP, &udp(1, 53))),
            Err(DropReason::LinkLocal)
        );
    }

    /// Nanoseconds per verdict on a filter of 100 rules whose last admits the flow (run with
    /// `cargo test --release -p tailpy-core --lib filter_cost -- --ignored --nocapture`). Prints figures;
    /// asserts nothing of time.
    #[test]
    #[ignore]
    fn filter_cost() {
        let mut rules: Vec<RuleSpec> = (0..99u16)
            .map(|i| {
                rule(
                    &[
                        &format!("10.{i}.0.0/24"),
                        &format!("100.65.{i}.1-100.65.{i}.200"),
                    ],
                    &[(B4, 1000 + 7 * i, 1000 + 7 * i + i % 5)],
                    &[],
                )
            })
            .collect();
        rules.push(rule(&[A4], &[(B4, 5201, 5201)], &[PROTO_TCP, PROTO_UDP]));
        let f = Filter::new(&rules).unwrap();
        let flows = FlowTable::new();
        flows.record_outbound(&v4(B4, A4, PROTO_UDP, &udp(40000, 53)), 1);
        let cases = [
            (
                "tcp segment",
                v4(A4, B4, PROTO_TCP, &tcp(5201, 40000, TCP_ACK)),
            ),
            (
                "tcp syn, last rule",
                v4(A4, B4, PROTO_TCP, &tcp(40000, 5201, TCP_SYN)),
            ),
            ("udp, last rule", v4(A4, B4, PROTO_UDP, &udp(40000, 5201))),
            ("udp reply (flow)", v4(A4, B4, PROTO_UDP, &udp(53, 40000))),
            ("udp dropped", v4(C4, B4, PROTO_UDP, &udp(1, 9))),
        ];
        const N: u32 = 2_000_000;
        for (name, p) in &cases {
            let t = std::time::Instant::now();
            let mut ok = 0u32;
            for _ in 0..N {
                ok += u32::from(f.check_inbound(std::hint::black_box(p), &flows, 1).is_ok());
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(N);
            println!("{name}: {ns:.1} ns/packet ({ok} admitted)");
        }
        let out = v4(B4, A4, PROTO_UDP, &udp(40000, 53));
        let t = std::time::Instant::now();
        for _ in 0..N {
            flows.record_outbound(std::hint::black_box(&out), 1);
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(N);
        println!("outbound udp, flow recorded: {ns:.1} ns/packet");
    }

    #[test]
    fn rule_parsing() {
        assert!(Filter::new(&[rule(&["100.64.0.0/10"], &[("*", 0, 65535)], &[])]).is_ok());
        for bad in [
            "100.64.0.1/33",
            "nonsense",
            "10.0.0.2-10.0.0.1",
            "10.0.0.1-fd00::1",
            "::/129",
        ] {
            let e = Filter::new(&[rule(&[bad], &[("*", 0, 65535)], &[])]).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e:?}");
        }
        assert!(Filter::new(&[rule(&["*"], &[("*", 10, 9)], &[])]).is_err());
        // No rules: nothing is admitted but replies.
        let none = Filter::new(&[]).unwrap();
        assert_eq!(
            check(&none, &v4(A4, B4, PROTO_TCP, &tcp(1, 22, TCP_SYN))),
            Err(DropReason::NoRule)
        );
        // A rule with a v4 source admits nothing from v6 and the other way round.
        let f = Filter::new(&[rule(&[A4], &[("*", 0, 65535)], &[])]).unwrap();
        assert_eq!(
            check(&f, &v6(A6, B6, PROTO_TCP, &tcp(1, 22, TCP_SYN))),
            Err(DropReason::NoRule)
        );
    }
}
