//! Two userspace devices (`Device::with_netstack`) paired over in-memory UDP: TCP and UDP through
//! both stacks, IPv4 and IPv6, the listener backlog, refusals, the packet filter.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};
use tailpy_core::device::parse_prefix;
use tailpy_core::keys::{generate_private_key, public_key};
use tailpy_core::memory::MemNet;
use tailpy_core::netstack::UDP_HEADER_LEN;
use tailpy_core::{Device, Error, PeerConfig};

const WAIT: Duration = Duration::from_secs(10);
const A4: &str = "100.64.0.1";
const B4: &str = "100.64.0.2";
const A6: &str = "fd7a:115c:a1e0::1";
const B6: &str = "fd7a:115c:a1e0::2";

fn addrs(v4: &str, v6: &str) -> Vec<String> {
    vec![format!("{v4}/32"), format!("{v6}/128")]
}

/// Devices a (100.64.0.1, fd7a:115c:a1e0::1) and b (.2, ::2), each the other's peer.
fn pair(net: &MemNet) -> (Device, Device) {
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let (ea, eb): (SocketAddr, SocketAddr) = (
        "192.0.2.1:41641".parse().unwrap(),
        "198.51.100.2:41641".parse().unwrap(),
    );
    let a = Device::with_netstack(&ka, Box::new(net.bind(ea)), &addrs(A4, A6), 1280).unwrap();
    let b = Device::with_netstack(&kb, Box::new(net.bind(eb)), &addrs(B4, B6), 1280).unwrap();
    let cfg = |v4: &str, v6: &str, ep| PeerConfig {
        allowed_ips: vec![
            parse_prefix(&format!("{v4}/32")).unwrap(),
            parse_prefix(&format!("{v6}/128")).unwrap(),
        ],
        endpoint: Some(ep),
        ..Default::default()
    };
    a.set_peer(&public_key(&kb), cfg(B4, B6, eb)).unwrap();
    b.set_peer(&public_key(&ka), cfg(A4, A6, ea)).unwrap();
    (a, b)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Wait until `fd` is readable (or `WAIT` passes).
fn wait_readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, WAIT.as_millis() as i32) > 0 }
}

fn accept(dev: &Device, listener: u32) -> (OwnedFd, SocketAddr) {
    let ns = dev.netstack().unwrap();
    let efd = ns.tcp_accept_fd(listener).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(c) = ns.tcp_accept(listener).unwrap() {
            return c;
        }
        assert!(Instant::now() < deadline, "no connection accepted");
        wait_readable(efd);
    }
}

/// A deterministic byte stream (a multiplicative hash of each 8-byte word's index), so the receiver
/// can check every byte and a shifted or repeated chunk shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    for i in 0..len.div_ceil(8) as u64 {
        let w = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// 10 MB each way at once over one connection dialled from a to b; returns MB/s (both directions).
fn tcp_both_ways(a_ip: &str, b_ip: &str) -> f64 {
    const LEN: usize = 10 << 20;
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let l = b.netstack().unwrap().tcp_listen(8080, 16).unwrap();
    let fa = a.tcp_dial(sa(b_ip, 8080), WAIT).unwrap();
    let (fb, remote) = accept(&b, l);
    assert_eq!(remote.ip(), a_ip.parse::<IpAddr>().unwrap());
    let (sa_, sb) = (UnixStream::from(fa), UnixStream::from(fb));
    let (p1, p2) = (
        std::sync::Arc::new(pattern(1, LEN)),
        std::sync::Arc::new(pattern(2, LEN)),
    );
    let start = Instant::now();
    let run = |mut s: UnixStream, out: std::sync::Arc<Vec<u8>>, want: std::sync::Arc<Vec<u8>>| {
        std::thread::spawn(move || {
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                w.write_all(&out).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut got = Vec::with_capacity(LEN);
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.read_to_end(&mut got).unwrap();
            writer.join().unwrap();
            assert_eq!(got.len(), LEN);
            assert!(got == *want, "content differs");
        })
    };
    let ta = run(sa_, p1.clone(), p2.clone());
    let tb = run(sb, p2, p1);
    ta.join().unwrap();
    tb.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let stats = a.netstack().unwrap().stats();
    assert_eq!(stats.tcp_bytes_out, LEN as u64);
    assert_eq!(stats.tcp_bytes_in, LEN as u64);
    (2 * LEN) as f64 / 1e6 / secs
}

#[test]
fn tcp_10mb_both_ways_ipv4() {
    let mbs = tcp_both_ways(A4, B4);
    eprintln!("netstack TCP over IPv4: {mbs:.1} MB/s (10 MB each way at once)");
}

#[test]
fn tcp_10mb_both_ways_ipv6() {
    let mbs = tcp_both_ways(A6, B6);
    eprintln!("netstack TCP over IPv6: {mbs:.1} MB/s (10 MB each way at once)");
}

/// One UDP exchange: a's ephemeral port to b's port 5353 and back, over `a_ip`/`b_ip`.
fn udp_both_ways(a_ip: &str, b_ip: &str) {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let (fa, pa) = a.netstack().unwrap().udp_bind(0).unwrap();
    let (fb, pb) = b.netstack().unwrap().udp_bind(5353).unwrap();
    assert_eq!(pb, 5353);
    assert!(pa >= 49152);
    let (ua, ub) = (UnixDatagram::from(fa), UnixDatagram::from(fb));
    ua.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    ub.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let header = |ip: &str, port: u16| {
        let mut h = [0u8; UDP_HEADER_LEN];
        match ip.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v) => {
                h[0] = 4;
                h[1..5].copy_from_slice(&v.octets());
            }
            IpAddr::V6(v) => {
                h[0] = 6;
                h[1..17].copy_from_slice(&v.octets());
            }
        }
        h[17..].copy_from_slice(&port.to_be_bytes());
        h
    };
    let mut buf = [0u8; 2048];
    // The first datagrams may wait behind the WireGuard handshake: resend until one arrives.
    let deadline = Instant::now() + WAIT;
    let n = loop {
        assert!(Instant::now() < deadline, "no datagram from a reached b");
        ua.send(&[&header(b_ip, 5353)[..], b"ping"].concat())
            .unwrap();
        if let Ok(n) = ub.recv(&mut buf) {
            break n;
        }
    };
    assert_eq!(&buf[..UDP_HEADER_LEN], &header(a_ip, pa));
    assert_eq!(&buf[UDP_HEADER_LEN..n], b"ping");
    // The reply goes to the source the header names.
    let mut reply = buf[..UDP_HEADER_LEN].to_vec();
    reply.extend_from_slice(&[7u8; 1200]);
    ub.send(&reply).unwrap();
    ua.set_read_timeout(Some(WAIT)).unwrap();
    let n = ua.recv(&mut buf).unwrap();
    assert_eq!(&buf[..UDP_HEADER_LEN], &header(b_ip, 5353));
    assert_eq!(&buf[UDP_HEADER_LEN..n], &[7u8; 1200][..]);
    // A malformed message, and a payload too large (IPv4: over the fragmentation buffer; IPv6: over one
    // packet, as smoltcp does not fragment IPv6), are dropped and counted.
    ua.send(b"short").unwrap();
    let too_large = if a_ip.contains(':') { 1300 } else { 16384 };
    ua.send(&[&header(b_ip, 5353)[..], &vec![0u8; too_large]].concat())
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while a.netstack().unwrap().stats().udp_dropped < 2 {
        assert!(Instant::now() < deadline, "malformed message not counted");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(a.netstack().unwrap().stats().udp_sockets, 1);
}

#[test]
fn udp_both_ways_ipv4() {
    udp_both_ways(A4, B4);
}

/// A 4000-byte UDP datagram each way over IPv4: fragmented to the MTU by the sender's stack and
/// reassembled by the receiver's (RFC 791 §2.3).
#[test]
fn udp_4000_bytes_both_ways_ipv4_fragmented() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let (fa, pa) = a.netstack().unwrap().udp_bind(0).unwrap();
    let (fb, _) = b.netstack().unwrap().udp_bind(5353).unwrap();
    let (ua, ub) = (UnixDatagram::from(fa), UnixDatagram::from(fb));
    ub.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let header = |ip: &str, port: u16| {
        let mut h = [0u8; UDP_HEADER_LEN];
        h[0] = 4;
        h[1..5].copy_from_slice(&ip.parse::<std::net::Ipv4Addr>().unwrap().octets());
        h[17..].copy_from_slice(&port.to_be_bytes());
        h
    };
    let big: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; 8192];
    let deadline = Instant::now() + WAIT;
    let n = loop {
        assert!(
            Instant::now() < deadline,
            "no 4000-byte datagram from a reached b"
        );
        ua.send(&[&header(B4, 5353)[..], &big].concat()).unwrap();
        if let Ok(n) = ub.recv(&mut buf) {
            break n;
        }
    };
    assert_eq!(&buf[..UDP_HEADER_LEN], &header(A4, pa));
    assert_eq!(&buf[UDP_HEADER_LEN..n], &big[..]);
    let reply: Vec<u8> = big.iter().rev().copied().collect();
    ub.send(&[&header(A4, pa)[..], &reply].concat()).unwrap();
    ua.set_read_timeout(Some(WAIT)).unwrap();
    let n = loop {
        let n = ua.recv(&mut buf).unwrap();
        if buf[UDP_HEADER_LEN..n] == reply[..] {
            break n;
        }
    };
    assert_eq!(&buf[..UDP_HEADER_LEN], &header(B4, 5353));
    assert_eq!(n - UDP_HEADER_LEN, 4000);
}

#[test]
fn udp_both_ways_ipv6() {
    udp_both_ways(A6, B6);
}

#[test]
fn closed_port_is_refused_with_reset() {
    let net = MemNet::new();
    let (a, _b) = pair(&net);
    match a.tcp_dial(sa(B4, 81), WAIT) {
        Err(Error::Dial(m)) => assert!(m.contains("refused"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    match a.tcp_dial(sa(B6, 81), WAIT) {
        Err(Error::Dial(m)) => assert!(m.contains("refused"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn dial_without_a_peer_fails_at_once() {
    let net = MemNet::new();
    let (a, _b) = pair(&net);
    match a.tcp_dial(sa("100.64.0.9", 80), WAIT) {
        Err(Error::Dial(m)) => assert!(m.contains("allowed IPs"), "{m}"),
        other => panic!("expected a dial error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn dial_times_out_when_the_peer_is_unreachable() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    b.close();
    match a.tcp_dial(sa(B4, 80), Duration::from_millis(300)) {
        Err(Error::Dial(m)) => assert!(m.contains("timed out"), "{m}"),
        other => panic!("expected a timeout, got {:?}", other.map(|_| ())),
    }
    assert_eq!(a.netstack().unwrap().stats().tcp_connections, 0);
}

#[test]
fn listener_backlog_holds_then_refuses() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let ns = b.netstack().unwrap();
    let l = ns.tcp_listen(22, 2).unwrap();
    let c1 = a.tcp_dial(sa(B4, 22), WAIT).unwrap();
    let c2 = a.tcp_dial(sa(B6, 22), WAIT).unwrap();
    // Both wait in the backlog; a third is refused while they do.
    match a.tcp_dial(sa(B4, 22), WAIT) {
        Err(Error::Dial(m)) => assert!(m.contains("refused"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let (s1, r1) = accept(&b, l);
    let (_s2, r2) = accept(&b, l);
    assert_eq!(r1.ip(), A4.parse::<IpAddr>().unwrap());
    assert_eq!(r2.ip(), A6.parse::<IpAddr>().unwrap());
    assert!(ns.tcp_accept(l).unwrap().is_none());
    // Room again: a new connection is accepted, and data flows on an accepted one.
    let _c3 = a.tcp_dial(sa(B4, 22), WAIT).unwrap();
    let _ = accept(&b, l);
    let mut w = UnixStream::from(c1);
    w.write_all(b"hello").unwrap();
    let mut r = UnixStream::from(s1);
    let mut got = [0u8; 5];
    r.set_read_timeout(Some(WAIT)).unwrap();
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // Closing the listener refuses new connections.
    ns.tcp_close_listener(l).unwrap();
    assert!(matches!(a.tcp_dial(sa(B4, 22), WAIT), Err(Error::Dial(_))));
    assert!(ns.tcp_accept(l).is_err());
    drop(c2);
}

#[test]
fn close_half_and_reset() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let l = b.netstack().unwrap().tcp_listen(7, 4).unwrap();
    let fa = a.tcp_dial(sa(B4, 7), WAIT).unwrap();
    let (fb, _) = accept(&b, l);
    let (mut ca, mut cb) = (UnixStream::from(fa), UnixStream::from(fb));
    ca.set_read_timeout(Some(WAIT)).unwrap();
    cb.set_read_timeout(Some(WAIT)).unwrap();
    // a shuts its writing half: b reads the data then end-of-stream, and can still answer.
    ca.write_all(b"request").unwrap();
    ca.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    cb.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    cb.write_all(b"response").unwrap();
    drop(cb);
    let mut got = Vec::new();
    ca.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"response");
    // Both ends closed: the sockets go away.
    drop(ca);
    let deadline = Instant::now() + WAIT;
    while a.netstack().unwrap().stats().tcp_connections > 0
        || b.netstack().unwrap().stats().tcp_connections > 0
    {
        assert!(Instant::now() < deadline, "connections not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn addresses_are_checked_and_settable() {
    let net = MemNet::new();
    let k = generate_private_key();
    let bad = Device::with_netstack(
        &k,
        Box::new(net.bind("192.0.2.9:1".parse().unwrap())),
        &["100.64.0.1/33".to_string()],
        1280,
    );
    assert!(matches!(bad, Err(Error::Config(_))));
    let two_v4 = vec!["100.64.0.1/32".to_string(), "100.64.0.2/32".to_string()];
    let dev = Device::with_netstack(
        &k,
        Box::new(net.bind("192.0.2.9:2".parse().unwrap())),
        &addrs(A4, A6),
        1280,
    )
    .unwrap();
    let ns = dev.netstack().unwrap();
    assert!(matches!(ns.set_addresses(&two_v4), Err(Error::Config(_))));
    ns.set_addresses(&["100.64.0.7/32".to_string()]).unwrap();
    assert_eq!(
        ns.addresses(),
        vec!["100.64.0.7".parse::<IpAddr>().unwrap()]
    );
    // No IPv6 address now: dialling IPv6 fails at once.
    assert!(matches!(
        ns.tcp_dial(sa(B6, 80), WAIT),
        Err(Error::Dial(m)) if m.contains("IPv6")
    ));
    let _ = dev.netstack().unwrap().udp_bind(0).unwrap().0.as_raw_fd();
}

/// A figure, not a check: 200 MB from a to b over one connection (`cargo test --release --test
/// netstack -- --ignored --nocapture`).
#[test]
#[ignore]
fn tcp_one_way_throughput() {
    const LEN: usize = 200 << 20;
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let l = b.netstack().unwrap().tcp_listen(9, 16).unwrap();
    let fa = a.tcp_dial(sa(B4, 9), WAIT).unwrap();
    let (fb, _) = accept(&b, l);
    let (mut w, mut r) = (UnixStream::from(fa), UnixStream::from(fb));
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..LEN / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < LEN {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0);
        got += n;
    }
    writer.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "netstack TCP one way: {:.1} MB/s ({} MB)",
        LEN as f64 / 1e6 / secs,
        LEN >> 20
    );
}

/// The Internet checksum (RFC 1071) of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn a_tun_peer_pings_the_stack() {
    use tailpy_core::memory::MemTun;
    let net = MemNet::new();
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let (ea, eb): (SocketAddr, SocketAddr) = (
        "192.0.2.1:41641".parse().unwrap(),
        "198.51.100.2:41641".parse().unwrap(),
    );
    let (tun, host) = MemTun::pair();
    let a = Device::with_io(&ka, Box::new(tun), Box::new(net.bind(ea))).unwrap();
    let b = Device::with_netstack(&kb, Box::new(net.bind(eb)), &addrs(B4, B6), 1280).unwrap();
    let cfg = |ip: &str, ep| PeerConfig {
        allowed_ips: vec![parse_prefix(ip).unwrap()],
        endpoint: Some(ep),
        ..Default::default()
    };
    a.set_peer(&public_key(&kb), cfg("100.64.0.2/32", eb))
        .unwrap();
    b.set_peer(&public_key(&ka), cfg("100.64.0.1/32", ea))
        .unwrap();
    // ICMP echo request 100.64.0.1 -> 100.64.0.2 (RFC 792), as the TUN host's ping sends it.
    let mut icmp = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(b"tailpy ping");
    let c = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    let c = inet_checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&icmp);
    // The first request may wait behind the handshake: repeat until the reply comes.
    let deadline = Instant::now() + WAIT;
    let reply = loop {
        assert!(Instant::now() < deadline, "no echo reply");
        host.write(&p);
        if let Some(r) = host.read(Duration::from_millis(300)) {
            break r;
        }
    };
    assert_eq!(&reply[12..16], &[100, 64, 0, 2]);
    assert_eq!(&reply[16..20], &[100, 64, 0, 1]);
    assert_eq!(reply[20], 0, "an echo reply");
    assert_eq!(&reply[24..], &icmp[4..]);
}

/// The 19-byte address header of the stack's UDP sockets for `ip:port`.
fn udp_header(ip: &str, port: u16) -> [u8; UDP_HEADER_LEN] {
    let mut h = [0u8; UDP_HEADER_LEN];
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v) => {
            h[0] = 4;
            h[1..5].copy_from_slice(&v.octets());
        }
        IpAddr::V6(v) => {
            h[0] = 6;
            h[1..17].copy_from_slice(&v.octets());
        }
    }
    h[17..].copy_from_slice(&port.to_be_bytes());
    h
}

/// The packet filter runs for a userspace node as for a TUN one: a reply to a UDP flow the stack started
/// passes a filter with no rule for it, an unsolicited datagram does not.
#[test]
fn packet_filter_admits_replies_to_the_stacks_own_udp_flows() {
    use tailpy_core::DropReason;
    let net = MemNet::new();
    let (a, b) = pair(&net);
    a.set_filter(Some(&[])).unwrap(); // a admits no one
    let (fa, pa) = a.netstack().unwrap().udp_bind(0).unwrap();
    let (fb, _) = b.netstack().unwrap().udp_bind(53).unwrap();
    let (fc, _) = b.netstack().unwrap().udp_bind(0).unwrap();
    let (ua, ub, uc) = (
        UnixDatagram::from(fa),
        UnixDatagram::from(fb),
        UnixDatagram::from(fc),
    );
    for u in [&ua, &ub] {
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    let mut buf = [0u8; 2048];
    // a's query to b's port 53 (resent while the handshake completes), b's answer back to it.
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "a's query never reached b");
        ua.send(&[&udp_header(B4, 53)[..], b"query"].concat())
            .unwrap();
        if ub.recv(&mut buf).is_ok() {
            break;
        }
    }
    assert_eq!(&buf[..UDP_HEADER_LEN], &udp_header(A4, pa));
    let mut answer = buf[..UDP_HEADER_LEN].to_vec();
    answer.extend_from_slice(b"answer");
    ub.send(&answer).unwrap();
    ua.set_read_timeout(Some(WAIT)).unwrap();
    let n = ua.recv(&mut buf).unwrap();
    assert_eq!(&buf[UDP_HEADER_LEN..n], b"answer");
    // From another port of b: not a reply to anything a sent.
    uc.send(&[&udp_header(A4, pa)[..], b"unsolicited"].concat())
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while a.stats().filter_dropped[DropReason::NotAReply as usize] == 0 {
        assert!(
            Instant::now() < deadline,
            "the unsolicited datagram was not dropped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ua.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        ua.recv(&mut buf).is_err(),
        "the unsolicited datagram arrived"
    );
    assert!(a.stats().filter_flows >= 1);
}
