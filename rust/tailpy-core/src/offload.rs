//! TUN offloads: the virtio-net header a TUN opened with `IFF_VNET_HDR` puts before every packet, the
//! split of a TCP/UDP super-packet (GSO) into wire-sized packets, and the coalescing of received
//! segments of one flow into a super-packet (GRO) before a TUN write.
//!
//! Layout of the header: `struct virtio_net_hdr` in `include/uapi/linux/virtio_net.h` (10 bytes, host
//! byte order on a TUN without `TUNSETVNETLE`). The algorithms follow the kernel's GSO/GRO for TCP
//! (`tcp_gso_segment`, `tcp_gro_receive`) and UDP (`udp4_ufo_fragment`/`__udp_gso_segment`,
//! `udp_gro_receive`) as wireguard-go's `tun/offload_linux.go` does in userspace: a split copies the
//! IP and transport headers before each `gso_size` chunk of payload and fixes lengths, IPv4 ID and
//! header checksum, TCP sequence numbers and flags, and the transport checksum (RFC 1071, with the
//! pseudo-header of RFC 9293 §3.1 / RFC 768 / RFC 8200 §8.1); coalescing appends segments whose
//! sequence numbers follow each other and whose headers agree, leaving the kernel a partial checksum.
//!
//! Everything here works on caller-owned buffers and never panics on malformed input: a packet that does
//! not match its header is an `OffloadError`.

use crate::batch::Batch;
use std::fmt;

/// Bytes of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum is partial (pseudo-header only) and must be
/// completed over `csum_start..`, stored at `csum_start + csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Most packets one split may produce (a 64 KiB super-packet cut at a small MSS); more is an error.
pub const MAX_SEGMENTS: usize = 128;
/// Most segments coalesced into one super-packet (the kernel's GRO stops at 64, `MAX_GRO_SKBS`).
pub const MAX_GRO_SEGMENTS: u16 = 64;
/// Largest IP packet (IPv4 total length, and what a TUN write of a super-packet may carry).
pub const MAX_IP_PACKET: usize = 65535;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Why a packet could not be split or its checksum completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Fewer than `VNET_HDR_LEN` bytes.
    ShortHeader,
    /// A `gso_type` this code does not split (UFO, or unknown).
    UnsupportedGsoType(u8),
    /// The packet does not match its virtio-net header.
    Malformed(&'static str),
    /// GSO requested with `gso_size` 0.
    ZeroGsoSize,
    /// The split would make more than the caller's room for packets (`MAX_SEGMENTS` at most).
    TooManySegments(usize),
    /// The caller's output buffer is too small for the split packets.
    NoRoom,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadError::ShortHeader => write!(f, "virtio-net header shorter than 10 bytes"),
            OffloadError::UnsupportedGsoType(t) => write!(f, "unsupported GSO type {t:#x}"),
            OffloadError::Malformed(what) => write!(f, "packet does not match its header: {what}"),
            OffloadError::ZeroGsoSize => write!(f, "GSO packet with gso_size 0"),
            OffloadError::TooManySegments(n) => {
                write!(f, "GSO packet would split into {n} packets")
            }
            OffloadError::NoRoom => write!(f, "no room for the split packets"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// `struct virtio_net_hdr`, fields in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Decode the first 10 bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<VnetHdr, OffloadError> {
        if b.len() < VNET_HDR_LEN {
            return Err(OffloadError::ShortHeader);
        }
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The 10 bytes of this header.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// One's complement sum of `data` as big-endian 16-bit words (RFC 1071), folded to 16 bits. Summed 8
/// bytes at a time in little-endian and swapped at the end (RFC 1071 §2(B): the sum is byte-order
/// independent).
fn sum16(data: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let (s, o) = acc.overflowing_add(u64::from_le_bytes(w));
        acc = s + u64::from(o);
    }
    let rem = chunks.remainder();
    let mut w = [0u8; 8];
    w[..rem.len()].copy_from_slice(rem);
    let (s, o) = acc.overflowing_add(u64::from_le_bytes(w));
    acc = s + u64::from(o);
    u64::from(fold(acc).swap_bytes())
}

/// Fold a one's complement sum to 16 bits.
fn fold(mut x: u64) -> u16 {
    while x > 0xffff {
        x = (x & 0xffff) + (x >> 16);
    }
    x as u16
}

/// The folded (not inverted) one's complement sum of `data` plus `initial`.
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    fold(sum16(data) + initial)
}

/// The unfolded sum of the TCP/UDP pseudo-header: source and destination address (4 or 16 bytes each),
/// protocol, and transport length.
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    sum16(src) + sum16(dst) + u64::from(proto) + l4_len as u64
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn put16(b: &mut [u8], i: usize, v: u16) {
    b[i..i + 2].copy_from_slice(&v.to_be_bytes());
}

/// Offset and length of the source address (the destination follows it).
fn addr_span(v6: bool) -> (usize, usize) {
    if v6 {
        (8, 16)
    } else {
        (12, 4)
    }
}

/// Complete a partial transport checksum as `hdr` asks (`F_NEEDS_CSUM`); otherwise leave `pkt` alone.
pub fn complete_checksum(hdr: &VnetHdr, pkt: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if start > pkt.len() || at + 2 > pkt.len() {
        return Err(OffloadError::Malformed(
            "checksum offsets outside the packet",
        ));
    }
    // The field holds the pseudo-header sum; summing over it gives the full checksum.
    let c = !checksum(&pkt[start..], 0);
    put16(pkt, at, if c == 0 { 0xffff } else { c });
    Ok(())
}

/// Split `pkt` (what follows the virtio-net header `hdr`) into packets of at most `gso_size` payload
/// each, written end to end into `out`; `segs[k]` receives `(offset, len)` of packet `k` in `out`.
/// Returns how many packets were made. A packet without GSO comes out whole, its checksum completed if
/// asked. TCP (`GSO_TCPV4`/`GSO_TCPV6`) and UDP (`GSO_UDP_L4`) are split; anything else is an error.
pub fn split(
    hdr: &VnetHdr,
    pkt: &mut [u8],
    out: &mut [u8],
    segs: &mut [(usize, usize)],
) -> Result<usize, OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        complete_checksum(hdr, pkt)?;
        if segs.is_empty() {
            return Err(OffloadError::TooManySegments(1));
        }
        if out.len() < pkt.len() {
            return Err(OffloadError::NoRoom);
        }
        out[..pkt.len()].copy_from_slice(pkt);
        segs[0] = (0, pkt.len());
        return Ok(1);
    }
    let tcp = match gso {
        GSO_TCPV4 | GSO_TCPV6 => true,
        GSO_UDP_L4 => false,
        other => return Err(OffloadError::UnsupportedGsoType(other)),
    };
    let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    if pkt.len() > MAX_IP_PACKET {
        return Err(OffloadError::Malformed("longer than an IP packet"));
    }
    let Some(&first) = pkt.first() else {
        return Err(OffloadError::Malformed("empty packet"));
    };
    let v6 = match first >> 4 {
        4 => false,
        6 => true,
        _ => return Err(OffloadError::Malformed("neither IPv4 nor IPv6")),
    };
    if (gso == GSO_TCPV4 && v6) || (gso == GSO_TCPV6 && !v6) {
        return Err(OffloadError::Malformed(
            "GSO type does not match the IP version",
        ));
    }
    let iph = if v6 { 40 } else { usize::from(first & 0xf) * 4 };
    if iph < 20 || pkt.len() < iph {
        return Err(OffloadError::Malformed("short IP header"));
    }
    // The transport header starts at csum_start (past any IPv6 extension headers).
    let l4 = usize::from(hdr.csum_start);
    if l4 < iph || (!v6 && l4 != iph) {
        return Err(OffloadError::Malformed(
            "checksum start is not the transport header",
        ));
    }
    let ip_proto = if v6 { pkt[6] } else { pkt[9] };
    if (!v6 || l4 == iph) && ip_proto != proto {
        return Err(OffloadError::Malformed(
            "IP protocol does not match the GSO type",
        ));
    }
    let l4_hdr = if tcp {
        if pkt.len() < l4 + 20 {
            return Err(OffloadError::Malformed("short TCP header"));
        }
        let d = usize::from(pkt[l4 + 12] >> 4) * 4;
        if d < 20 {
            return Err(OffloadError::Malformed("TCP data offset below 5"));
        }
        d
    } else {
        8
    };
    let hdr_len = l4 + l4_hdr;
    if hdr_len > pkt.len() {
        return Err(OffloadError::Malformed(
            "transport header runs past the packet",
        ));
    }
    let gso_size = usize::from(hdr.gso_size);
    if gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    let payload = pkt.len() - hdr_len;
    let n = payload.div_ceil(gso_size).max(1);
    if n > segs.len() || n > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments(n));
    }
    let (src_at, alen) = addr_span(v6);
    let ip_id = if v6 { 0 } else { be16(pkt, 4) };
    let (seq0, flags0) = if tcp {
        (be32(pkt, l4 + 4), pkt[l4 + 13])
    } else {
        (0, 0)
    };
    let csum_at = l4 + if tcp { 16 } else { 6 };
    let mut o = 0;
    for (i, slot) in segs.iter_mut().enumerate().take(n) {
        let start = hdr_len + i * gso_size;
        let end = (start + gso_size).min(pkt.len());
        let len = hdr_len + (end - start);
        if out.len() - o < len {
            return Err(OffloadError::NoRoom);
        }
        let seg = &mut out[o..o + len];
        seg[..hdr_len].copy_from_slice(&pkt[..hdr_len]);
        seg[hdr_len..].copy_from_slice(&pkt[start..end]);
        if v6 {
            put16(seg, 4, (len - 40) as u16);
        } else {
            put16(seg, 2, len as u16);
            put16(seg, 4, ip_id.wrapping_add(i as u16));
            put16(seg, 10, 0);
            let c = !checksum(&seg[..iph], 0);
            put16(seg, 10, c);
        }
        let l4_len = len - l4;
        if tcp {
            let seq = seq0.wrapping_add((i * gso_size) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut f = flags0;
            if i + 1 != n {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                f &= !TCP_CWR;
            }
            seg[l4 + 13] = f;
        } else {
            put16(seg, l4 + 4, l4_len as u16);
        }
        put16(seg, csum_at, 0);
        let ps = pseudo_header_sum(
            &seg[src_at..src_at + alen],
            &seg[src_at + alen..src_at + 2 * alen],
            proto,
            l4_len,
        );
        let c = !checksum(&seg[l4..], ps);
        put16(seg, csum_at, if c == 0 && !tcp { 0xffff } else { c });
        *slot = (o, len);
        o += len;
    }
    Ok(n)
}

/// Source and destination address, ports, and protocol/version: what makes two packets one flow.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    addrs: [u8; 32],
    ports: [u8; 4],
    proto: u8,
    v6: bool,
}

/// A packet's flow, and whether (and how) it may be coalesced.
struct Parsed {
    key: FlowKey,
    /// IP header length (the transport header starts here).
    iph: usize,
    /// Transport header length.
    l4h: usize,
    payload: usize,
    seq: u32,
    ack: u32,
    flags: u8,
    /// Eligible for coalescing (plain data segment with a valid checksum).
    eligible: bool,
}

fn parse(pkt: &[u8], udp_ok: bool) -> Option<Parsed> {
    let v6 = match pkt.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let (iph, proto, plain_ip) = if v6 {
        if pkt.len() < 40 {
            return None;
        }
        (40, pkt[6], usize::from(be16(pkt, 4)) + 40 == pkt.len())
    } else {
        if pkt.len() < 20 {
            return None;
        }
        let ihl = usize::from(pkt[0] & 0xf) * 4;
        (
            ihl,
            pkt[9],
            ihl == 20 && usize::from(be16(pkt, 2)) == pkt.len() && be16(pkt, 6) & 0x3fff == 0,
        )
    };
    if !(proto == PROTO_TCP || proto == PROTO_UDP) || pkt.len() < iph + 8 {
        return None;
    }
    let mut key = FlowKey {
        addrs: [0; 32],
        ports: [0; 4],
        proto,
        v6,
    };
    let (src_at, alen) = addr_span(v6);
    key.addrs[..2 * alen].copy_from_slice(&pkt[src_at..src_at + 2 * alen]);
    key.ports.copy_from_slice(&pkt[iph..iph + 4]);
    let mut p = Parsed {
        key,
        iph,
        l4h: 0,
        payload: 0,
        seq: 0,
        ack: 0,
        flags: 0,
        eligible: false,
    };
    if !plain_ip {
        return Some(p);
    }
    if proto == PROTO_TCP {
        if pkt.len() < iph + 20 {
            return Some(p);
        }
        let thl = usize::from(pkt[iph + 12] >> 4) * 4;
        if thl < 20 || iph + thl > pkt.len() {
            return Some(p);
        }
        p.l4h = thl;
        p.seq = be32(pkt, iph + 4);
        p.ack = be32(pkt, iph + 8);
        p.flags = pkt[iph + 13];
        p.payload = pkt.len() - iph - thl;
        let plain_flags = p.flags & TCP_ACK != 0
            && p.flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR) == 0;
        p.eligible = plain_flags && p.payload > 0;
    } else {
        p.l4h = 8;
        p.payload = pkt.len() - iph - 8;
        let udp_len = usize::from(be16(pkt, iph + 4));
        // A zero checksum (none, IPv4 only) is left alone rather than given one.
        p.eligible =
            udp_ok && udp_len == pkt.len() - iph && p.payload > 0 && be16(pkt, iph + 6) != 0;
    }
    if p.eligible {
        let ps = pseudo_header_sum(
            &pkt[src_at..src_at + alen],
            &pkt[src_at + alen..src_at + 2 * alen],
            proto,
            pkt.len() - iph,
        );
        p.eligible = checksum(&pkt[iph..], ps) == 0xffff;
    }
    Some(p)
}

/// An open group: a head packet and the segments appended to it.
struct Flow {
    key: FlowKey,
    head: u32,
    tail: u32,
    count: u16,
    gso_size: usize,
    /// IP packet length after coalescing.
    total: usize,
    next_seq: u32,
    ack: u32,
    psh: bool,
    /// Nothing more may join (a short segment, PSH, or a packet of the flow that could not join).
    closed: bool,
}

const NONE: u32 = u32::MAX;

/// Scratch state of coalescing one batch (allocated once, reused).
#[derive(Default)]
pub struct GroTable {
    flows: Vec<Flow>,
    /// Per packet: the next packet of its group, or `NONE`.
    next: Vec<u32>,
    /// Per packet: absorbed into an earlier packet's group (not written on its own).
    absorbed: Vec<bool>,
    /// Per packet: the virtio-net header to write before it.
    hdrs: Vec<VnetHdr>,
    /// Per packet: offset of its payload (where an appended segment's bytes start).
    payload_at: Vec<u32>,
    /// Segments appended to a head in the last `coalesce`.
    pub coalesced: u64,
}

impl GroTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether packet `i` is written (as itself or as the head of a group).
    pub fn is_written(&self, i: usize) -> bool {
        !self.absorbed.get(i).copied().unwrap_or(false)
    }

    /// The virtio-net header to write before packet `i`.
    pub fn header(&self, i: usize) -> VnetHdr {
        self.hdrs.get(i).copied().unwrap_or_default()
    }

    /// The packets appended to head `i`, each with the offset where its payload starts.
    pub fn members(&self, i: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut j = self.next.get(i).copied().unwrap_or(NONE);
        std::iter::from_fn(move || {
            if j == NONE {
                return None;
            }
            let cur = j as usize;
            j = self.next[cur];
            Some((cur, self.payload_at[cur] as usize))
        })
    }
}

/// Plan the TUN writes of the IP packets in `pkts` (in arrival order): TCP segments of one flow that
/// follow each other (same ACK, options, TOS/TTL, each but the last of one size) are appended to the
/// first (and, with `udp`, UDP datagrams of one flow and size likewise). Fixes the head packets' headers
/// in place (lengths, IPv4 header checksum, partial transport checksum) and records in `table` which
/// packets are written, with what header, and which payloads follow each head. Packets of one flow stay
/// in order.
pub fn coalesce(pkts: &mut Batch, table: &mut GroTable, udp: bool) {
    let n = pkts.len();
    table.flows.clear();
    table.next.clear();
    table.next.resize(n, NONE);
    table.absorbed.clear();
    table.absorbed.resize(n, false);
    table.hdrs.clear();
    table.hdrs.resize(n, VnetHdr::default());
    table.payload_at.clear();
    table.payload_at.resize(n, 0);
    table.coalesced = 0;
    for j in 0..n {
        let Some(p) = parse(pkts.get(j), udp) else {
            continue;
        };
        let open = table.flows.iter().position(|f| f.key == p.key);
        if !p.eligible {
            // Whatever else of this flow arrives later must not jump ahead of this packet.
            if let Some(k) = open {
                table.flows[k].closed = true;
            }
            continue;
        }
        table.payload_at[j] = (p.iph + p.l4h) as u32;
        if let Some(k) = open {
            let f = &table.flows[k];
            if !f.closed && can_join(f, &p, pkts.get(f.head as usize), pkts.get(j)) {
                let f = &mut table.flows[k];
                table.next[f.tail as usize] = j as u32;
                table.absorbed[j] = true;
                f.tail = j as u32;
                f.count += 1;
                f.total += p.payload;
                f.next_seq = f.next_seq.wrapping_add(p.payload as u32);
                let psh = p.flags & TCP_PSH != 0;
                f.psh |= psh;
                f.closed = psh || p.payload < f.gso_size || f.count >= MAX_GRO_SEGMENTS;
                table.coalesced += 1;
                continue;
            }
            // This packet starts the flow's next group: the current one is complete.
            finish(pkts, table, k);
        }
        let flow = Flow {
            key: p.key,
            head: j as u32,
            tail: j as u32,
            count: 1,
            gso_size: p.payload,
            total: pkts.get(j).len(),
            next_seq: p.seq.wrapping_add(p.payload as u32),
            ack: p.ack,
            psh: p.flags & TCP_PSH != 0,
            closed: p.flags & TCP_PSH != 0,
        };
        match open {
            Some(k) => table.flows[k] = flow,
            None => table.flows.push(flow),
        }
    }
    for k in 0..table.flows.len() {
        finish(pkts, table, k);
    }
}

/// Fix up the head of group `k` if it has members.
fn finish(pkts: &mut Batch, table: &mut GroTable, k: usize) {
    let f = &table.flows[k];
    if f.count < 2 {
        return;
    }
    let head = f.head as usize;
    let (total, gso_size, psh) = (f.total, f.gso_size, f.psh);
    finish_head(
        pkts.get_mut(head),
        total,
        gso_size,
        psh,
        &mut table.hdrs[head],
    );
}

fn can_join(f: &Flow, p: &Parsed, head: &[u8], pkt: &[u8]) -> bool {
    if p.payload > f.gso_size || f.total + p.payload > MAX_IP_PACKET {
        return false;
    }
    let same_ip = if p.key.v6 {
        // Traffic class, flow label and hop limit.
        head[..4] == pkt[..4] && head[7] == pkt[7]
    } else {
        // TOS, DF, TTL.
        head[1] == pkt[1] && head[6] & 0x40 == pkt[6] & 0x40 && head[8] == pkt[8]
    };
    if !same_ip {
        return false;
    }
    if p.key.proto == PROTO_UDP {
        return true;
    }
    let hl = p.iph + p.l4h;
    p.seq == f.next_seq
        && p.ack == f.ack
        && head.len() >= hl
        && usize::from(head[p.iph + 12] >> 4) * 4 == p.l4h
        // Same TCP options (timestamps and all).
        && head[p.iph + 20..hl] == pkt[p.iph + 20..hl]
}

/// Make `head` the first part of a super-packet of `total` bytes: IP length, IPv4 header checksum,
/// transport length, PSH, and the partial checksum the kernel completes; and its virtio-net header.
fn finish_head(head: &mut [u8], total: usize, gso_size: usize, psh: bool, hdr: &mut VnetHdr) {
    let v6 = head[0] >> 4 == 6;
    let iph = if v6 { 40 } else { 20 };
    let proto = if v6 { head[6] } else { head[9] };
    if v6 {
        put16(head, 4, (total - 40) as u16);
    } else {
        put16(head, 2, total as u16);
        put16(head, 10, 0);
        let c = !checksum(&head[..20], 0);
        put16(head, 10, c);
    }
    let l4_len = total - iph;
    let (src_at, alen) = addr_span(v6);
    let ps = pseudo_header_sum(
        &head[src_at..src_at + alen],
        &head[src_at + alen..src_at + 2 * alen],
        proto,
        l4_len,
    );
    let partial = checksum(&[], ps);
    let (gso_type, csum_offset, l4h) = if proto == PROTO_TCP {
        if psh {
            head[iph + 13] |= TCP_PSH;
        }
        (
            if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            16,
            usize::from(head[iph + 12] >> 4) * 4,
        )
    } else {
        put16(head, iph + 4, l4_len as u16);
        (GSO_UDP_L4, 6, 8)
    };
    put16(head, iph + usize::from(csum_offset), partial);
    *hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: (iph + l4h) as u16,
        gso_size: gso_size as u16,
        csum_start: iph as u16,
        csum_offset,
    };
}
