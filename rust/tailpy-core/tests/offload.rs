//! GSO split and GRO coalescing against packets built by hand, and both fed arbitrary input.

use tailpy_core::batch::Batch;
use tailpy_core::offload::{
    checksum, coalesce, complete_checksum, pseudo_header_sum, split, GroTable, OffloadError,
    VnetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, MAX_SEGMENTS,
};

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const SYN: u8 = 0x02;

struct Tcp<'a> {
    v6: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    id: u16,
    options: &'a [u8],
    payload: &'a [u8],
}

impl Default for Tcp<'_> {
    fn default() -> Self {
        Tcp {
            v6: false,
            sport: 40000,
            seq: 1000,
            ack: 77,
            flags: ACK,
            id: 9,
            options: &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
            payload: b"",
        }
    }
}

fn l4_sum(p: &[u8], v6: bool, iph: usize, proto: u8) -> u64 {
    let (a, l) = if v6 { (8, 16) } else { (12, 4) };
    pseudo_header_sum(&p[a..a + l], &p[a + l..a + 2 * l], proto, p.len() - iph)
}

/// An IPv4 or IPv6 TCP packet with correct checksums.
fn tcp(t: &Tcp) -> Vec<u8> {
    let iph = if t.v6 { 40 } else { 20 };
    let thl = 20 + t.options.len();
    let len = iph + thl + t.payload.len();
    let mut p = vec![0u8; len];
    if t.v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0x7a, 0x11, 0x5c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0x7a, 0x11, 0x5c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&t.id.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        let c = !checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let h = &mut p[iph..];
    h[0..2].copy_from_slice(&t.sport.to_be_bytes());
    h[2..4].copy_from_slice(&5201u16.to_be_bytes());
    h[4..8].copy_from_slice(&t.seq.to_be_bytes());
    h[8..12].copy_from_slice(&t.ack.to_be_bytes());
    h[12] = ((thl / 4) as u8) << 4;
    h[13] = t.flags;
    h[14..16].copy_from_slice(&512u16.to_be_bytes());
    h[20..thl].copy_from_slice(t.options);
    h[thl..].copy_from_slice(t.payload);
    let c = !checksum(&p[iph..], l4_sum(&p, t.v6, iph, 6));
    p[iph + 16..iph + 18].copy_from_slice(&c.to_be_bytes());
    p
}

fn udp4(sport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 28 + payload.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    let c = !checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&53u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let c = !checksum(&p[20..], l4_sum(&p, false, 20, 17));
    p[26..28].copy_from_slice(&c.to_be_bytes());
    p
}

fn ip_ok(p: &[u8]) -> bool {
    p[0] >> 4 == 6 || checksum(&p[..20], 0) == 0xffff
}

fn l4_ok(p: &[u8]) -> bool {
    let v6 = p[0] >> 4 == 6;
    let iph = if v6 { 40 } else { 20 };
    let proto = if v6 { p[6] } else { p[9] };
    checksum(&p[iph..], l4_sum(p, v6, iph, proto)) == 0xffff
}

/// Turn a packet into what the kernel hands a TUN with TSO: transport checksum partial (pseudo-header
/// only) and the header asking for GSO at `gso_size`.
fn as_gso(mut p: Vec<u8>, gso_type: u8, gso_size: u16) -> (VnetHdr, Vec<u8>) {
    let v6 = p[0] >> 4 == 6;
    let iph = if v6 { 40 } else { 20 };
    let proto = if v6 { p[6] } else { p[9] };
    let off = if proto == 6 { 16 } else { 6 };
    let partial = checksum(&[], l4_sum(&p, v6, iph, proto));
    p[iph + off..iph + off + 2].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: 0, // not trusted: recomputed from the packet
        gso_size,
        csum_start: iph as u16,
        csum_offset: off as u16,
    };
    (hdr, p)
}

fn do_split(hdr: &VnetHdr, pkt: &mut [u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
    let mut out = vec![0u8; 200_000];
    let mut segs = [(0usize, 0usize); MAX_SEGMENTS];
    let n = split(hdr, pkt, &mut out, &mut segs)?;
    Ok(segs[..n]
        .iter()
        .map(|&(o, l)| out[o..o + l].to_vec())
        .collect())
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn tcp4_super_packet_splits_into_segments_with_right_checksums() {
    let data = payload(3500);
    let (hdr, mut p) = as_gso(
        tcp(&Tcp {
            flags: ACK | PSH,
            payload: &data,
            ..Default::default()
        }),
        GSO_TCPV4,
        1400,
    );
    let segs = do_split(&hdr, &mut p).unwrap();
    assert_eq!(segs.len(), 3);
    for (i, s) in segs.iter().enumerate() {
        let chunk = &data[i * 1400..((i + 1) * 1400).min(data.len())];
        let want = tcp(&Tcp {
            seq: 1000 + (i as u32) * 1400,
            id: 9 + i as u16,
            flags: if i == 2 { ACK | PSH } else { ACK },
            payload: chunk,
            ..Default::default()
        });
        assert!(ip_ok(s) && l4_ok(s), "segment {i} checksums");
        assert_eq!(s, &want, "segment {i}");
    }
}

#[test]
fn tcp6_and_udp_super_packets_split() {
    let data = payload(2000);
    let (hdr, mut p) = as_gso(
        tcp(&Tcp {
            v6: true,
            payload: &data,
            ..Default::default()
        }),
        GSO_TCPV6,
        1000,
    );
    let segs = do_split(&hdr, &mut p).unwrap();
    assert_eq!(segs.len(), 2);
    for (i, s) in segs.iter().enumerate() {
        let want = tcp(&Tcp {
            v6: true,
            seq: 1000 + (i as u32) * 1000,
            payload: &data[i * 1000..(i + 1) * 1000],
            ..Default::default()
        });
        assert_eq!(s, &want);
    }
    let (hdr, mut p) = as_gso(udp4(5000, &data), GSO_UDP_L4, 900);
    let segs = do_split(&hdr, &mut p).unwrap();
    assert_eq!(segs.len(), 3);
    for (i, s) in segs.iter().enumerate() {
        let mut want = udp4(5000, &data[i * 900..((i + 1) * 900).min(2000)]);
        want[4..6].copy_from_slice(&(i as u16).to_be_bytes());
        let c = !checksum(
            &{
                let mut h = want[..20].to_vec();
                h[10] = 0;
                h[11] = 0;
                h
            },
            0,
        );
        want[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(ip_ok(s) && l4_ok(s));
        assert_eq!(s, &want);
    }
}

#[test]
fn packet_without_gso_gets_its_checksum_completed() {
    let want = tcp(&Tcp {
        payload: b"hello",
        ..Default::default()
    });
    let (mut hdr, mut p) = as_gso(want.clone(), GSO_NONE, 0);
    hdr.gso_type = GSO_NONE;
    assert_ne!(p, want);
    complete_checksum(&hdr, &mut p).unwrap();
    assert_eq!(p, want);
    let (mut hdr, mut p) = as_gso(want.clone(), GSO_NONE, 0);
    hdr.gso_type = GSO_NONE;
    assert_eq!(do_split(&hdr, &mut p).unwrap(), vec![want]);
}

#[test]
fn malformed_super_packets_are_named_errors() {
    let data = payload(3000);
    let (hdr, p) = as_gso(
        tcp(&Tcp {
            payload: &data,
            ..Default::default()
        }),
        GSO_TCPV4,
        1400,
    );
    let mut q = p.clone();
    assert_eq!(
        do_split(&VnetHdr { gso_size: 0, ..hdr }, &mut q),
        Err(OffloadError::ZeroGsoSize)
    );
    assert_eq!(
        do_split(&VnetHdr { gso_size: 1, ..hdr }, &mut q),
        Err(OffloadError::TooManySegments(3000))
    );
    assert!(matches!(
        do_split(
            &VnetHdr {
                gso_type: GSO_TCPV6,
                ..hdr
            },
            &mut q
        ),
        Err(OffloadError::Malformed(_))
    ));
    assert_eq!(
        do_split(&VnetHdr { gso_type: 3, ..hdr }, &mut q),
        Err(OffloadError::UnsupportedGsoType(3))
    );
    assert!(matches!(
        do_split(
            &VnetHdr {
                csum_start: 60000,
                ..hdr
            },
            &mut q
        ),
        Err(OffloadError::Malformed(_))
    ));
    let mut short = p[..30].to_vec();
    assert!(matches!(
        do_split(&hdr, &mut short),
        Err(OffloadError::Malformed(_))
    ));
    assert_eq!(VnetHdr::parse(&[0; 9]), Err(OffloadError::ShortHeader));
    let mut small = vec![0u8; 100];
    let mut segs = [(0, 0); 4];
    assert_eq!(
        split(&hdr, &mut q, &mut small, &mut segs),
        Err(OffloadError::NoRoom)
    );
}

fn batch_of(pkts: &[Vec<u8>]) -> Batch {
    let mut b = Batch::new(1 << 20, 256);
    for p in pkts {
        assert!(b.push(p));
    }
    b
}

/// What the kernel receives for each written packet: the header and the bytes (head + member payloads).
fn written(b: &Batch, t: &GroTable) -> Vec<(VnetHdr, Vec<u8>)> {
    (0..b.len())
        .filter(|&i| t.is_written(i))
        .map(|i| {
            let mut bytes = b.get(i).to_vec();
            for (j, at) in t.members(i) {
                bytes.extend_from_slice(&b.get(j)[at..]);
            }
            (t.header(i), bytes)
        })
        .collect()
}

fn stream(v6: bool, n: usize, mss: usize, last: usize, sport: u16) -> Vec<Vec<u8>> {
    let data = payload(mss * n);
    (0..n)
        .map(|i| {
            let len = if i + 1 == n { last } else { mss };
            tcp(&Tcp {
                v6,
                sport,
                seq: 1000 + (i * mss) as u32,
                id: 9 + i as u16,
                flags: if i + 1 == n { ACK | PSH } else { ACK },
                payload: &data[i * mss..i * mss + len],
                ..Default::default()
            })
        })
        .collect()
}

#[test]
fn consecutive_tcp_segments_coalesce_and_split_back() {
    for v6 in [false, true] {
        let pkts = stream(v6, 5, 1300, 700, 40000);
        let mut b = batch_of(&pkts);
        let mut t = GroTable::new();
        coalesce(&mut b, &mut t, false);
        let w = written(&b, &t);
        assert_eq!(w.len(), 1, "one super-packet");
        let (hdr, mut sp) = w[0].clone();
        assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(hdr.gso_size, 1300);
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert!(ip_ok(&sp));
        // The kernel's view: completing the partial checksum gives a valid super-packet.
        let mut full = sp.clone();
        complete_checksum(&hdr, &mut full).unwrap();
        assert!(l4_ok(&full));
        // Splitting it again (TSO on the far side) gives back the segments.
        let segs = do_split(&hdr, &mut sp).unwrap();
        assert_eq!(segs, pkts);
    }
}

#[test]
fn segments_that_do_not_follow_stay_apart() {
    let mut pkts = stream(false, 3, 1000, 1000, 40000);
    // A gap in the sequence numbers.
    pkts.push(tcp(&Tcp {
        seq: 1000 + 3000 + 5,
        payload: &[1; 1000],
        ..Default::default()
    }));
    // Another ACK number.
    pkts.push(tcp(&Tcp {
        seq: 1000 + 4005,
        ack: 78,
        payload: &[1; 1000],
        ..Default::default()
    }));
    // A SYN, and a bad checksum.
    pkts.push(tcp(&Tcp {
        sport: 1,
        flags: SYN,
        payload: &[1; 10],
        ..Default::default()
    }));
    let mut bad = tcp(&Tcp {
        sport: 2,
        payload: &[1; 10],
        ..Default::default()
    });
    bad[45] ^= 1;
    pkts.push(bad.clone());
    pkts.push(bad);
    let mut b = batch_of(&pkts);
    let mut t = GroTable::new();
    coalesce(&mut b, &mut t, false);
    let w = written(&b, &t);
    // The first three ended with PSH (the stream's last segment) so they make one group of three.
    assert_eq!(w.len(), 1 + 5);
    assert_eq!(w[0].0.gso_size, 1000);
    for (hdr, p) in &w[1..] {
        assert_eq!(hdr.gso_type, GSO_NONE);
        assert!(pkts.contains(p));
    }
}

#[test]
fn interleaved_flows_each_coalesce_in_order() {
    let a = stream(false, 4, 1200, 1200, 1111);
    let c = stream(false, 4, 1200, 500, 2222);
    let mut pkts = Vec::new();
    for i in 0..4 {
        pkts.push(a[i].clone());
        pkts.push(c[i].clone());
    }
    // A pure ACK of flow a in the middle: later data of a must not be moved before it.
    pkts.insert(
        3,
        tcp(&Tcp {
            sport: 1111,
            seq: 1000 + 2400,
            ..Default::default()
        }),
    );
    let mut b = batch_of(&pkts);
    let mut t = GroTable::new();
    coalesce(&mut b, &mut t, false);
    let w = written(&b, &t);
    let mut got_a = Vec::new();
    let mut got_c = Vec::new();
    for (hdr, mut p) in w {
        let segs = if hdr.gso_type == GSO_NONE {
            vec![p]
        } else {
            do_split(&hdr, &mut p).unwrap()
        };
        for s in segs {
            if s[21] == (1111u16 & 0xff) as u8 {
                got_a.push(s);
            } else {
                got_c.push(s);
            }
        }
    }
    let mut want_a = a.clone();
    want_a.insert(
        2,
        tcp(&Tcp {
            sport: 1111,
            seq: 1000 + 2400,
            ..Default::default()
        }),
    );
    assert_eq!(got_a, want_a);
    assert_eq!(got_c, c);
}

#[test]
fn udp_datagrams_coalesce_only_when_asked() {
    let pkts: Vec<Vec<u8>> = (0..4).map(|i| udp4(7, &[i as u8; 1000])).collect();
    let mut b = batch_of(&pkts);
    let mut t = GroTable::new();
    coalesce(&mut b, &mut t, false);
    assert_eq!(written(&b, &t).len(), 4);
    let mut b = batch_of(&pkts);
    coalesce(&mut b, &mut t, true);
    let w = written(&b, &t);
    assert_eq!(w.len(), 1);
    let (hdr, mut sp) = w[0].clone();
    assert_eq!(hdr.gso_type, GSO_UDP_L4);
    let segs = do_split(&hdr, &mut sp).unwrap();
    assert_eq!(segs.len(), 4);
    for (s, p) in segs.iter().zip(&pkts) {
        assert_eq!(&s[20..], &p[20..]);
        assert!(l4_ok(s));
    }
}

/// xorshift64*: reproducible arbitrary bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Arbitrary headers and packets, and valid ones with a few bytes changed: the split returns packets
/// or a named error, the coalescing plans writes, neither panics.
#[test]
fn fuzz_header_split_and_coalesce() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let data = payload(4000);
    let seeds: Vec<(VnetHdr, Vec<u8>)> = vec![
        as_gso(
            tcp(&Tcp {
                payload: &data,
                ..Default::default()
            }),
            GSO_TCPV4,
            1400,
        ),
        as_gso(
            tcp(&Tcp {
                v6: true,
                payload: &data,
                ..Default::default()
            }),
            GSO_TCPV6,
            1300,
        ),
        as_gso(udp4(9, &data), GSO_UDP_L4, 1200),
    ];
    let mut out = vec![0u8; 100_000];
    let mut segs = [(0usize, 0usize); MAX_SEGMENTS];
    let mut t = GroTable::new();
    for round in 0..20_000 {
        let (hdr, mut pkt) = if round % 2 == 0 {
            let n = VNET_LEN + rng.below(200);
            let raw = rng.bytes(n);
            let hdr = match VnetHdr::parse(&raw) {
                Ok(h) => h,
                Err(e) => panic!("{e}"),
            };
            let mut h = hdr;
            h.gso_type = [0, 1, 3, 4, 5, 0x81, 0xff][rng.below(7)];
            h.csum_start %= 80;
            (h, raw[VNET_LEN..].to_vec())
        } else {
            let (mut h, mut p) = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(p.len());
                p[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                p.truncate(rng.below(p.len() + 1));
            }
            match rng.below(6) {
                0 => h.gso_size = rng.next() as u16,
                1 => h.csum_start = rng.next() as u16 % 100,
                2 => h.csum_offset = rng.next() as u16,
                3 => h.flags = rng.next() as u8,
                _ => {}
            }
            (h, p)
        };
        let cap = rng.below(out.len() + 1);
        if let Ok(n) = split(&hdr, &mut pkt, &mut out[..cap], &mut segs) {
            assert!((1..=MAX_SEGMENTS).contains(&n));
            let mut b = Batch::new(200_000, 256);
            for &(o, l) in &segs[..n] {
                assert!(b.push(&out[o..o + l]));
            }
            // Valid segments with some of them damaged: coalescing must not panic either.
            for _ in 0..rng.below(3) {
                let i = rng.below(b.len());
                let p = b.get_mut(i);
                if !p.is_empty() {
                    let k = rng.below(p.len());
                    p[k] = rng.next() as u8;
                }
            }
            coalesce(&mut b, &mut t, rng.below(2) == 0);
            let _ = written(&b, &t);
        }
        let mut b = Batch::new(10_000, 16);
        for _ in 0..rng.below(8) {
            let n = rng.below(120);
            let mut p = rng.bytes(n);
            if n > 0 {
                p[0] = [0x45, 0x60, 0x46, 0x00][rng.below(4)];
            }
            if n > 9 {
                p[9] = [6, 17][rng.below(2)];
                p[6] = [6, 17][rng.below(2)];
            }
            b.push(&p);
        }
        coalesce(&mut b, &mut t, true);
        let _ = written(&b, &t);
    }
}

const VNET_LEN: usize = 10;
