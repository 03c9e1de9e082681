//! Two (or three) devices paired in memory: in-memory TUNs, in-memory UDP (and one test on real
//! loopback sockets).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use tailpy_core::device::{
    parse_endpoint, parse_prefix, DATAGRAM_QUEUE_BYTES, DISCO_MAGIC, MAX_STUN_DISCO_LEN,
    QUEUE_LIMIT, RELAY_QUEUE_BYTES,
};
use tailpy_core::io::LinuxUdp;
use tailpy_core::keys::{generate_private_key, public_key};
use tailpy_core::memory::{MemNet, MemTun, MemTunHost, MemUdp};
use tailpy_core::{Device, Error, Path, PeerConfig};

const WAIT: Duration = Duration::from_secs(5);

struct Node {
    dev: Device,
    host: MemTunHost,
    key: [u8; 32],
    addr: SocketAddr,
}

fn node(net: &MemNet, addr: &str) -> (Node, std::sync::Arc<()>) {
    node_with_key(net, addr, generate_private_key())
}

fn node_with_key(net: &MemNet, addr: &str, priv_key: [u8; 32]) -> (Node, std::sync::Arc<()>) {
    let addr: SocketAddr = addr.parse().unwrap();
    let (tun, host) = MemTun::pair();
    let udp = net.bind(addr);
    let dev = Device::with_io(&priv_key, Box::new(tun), Box::new(udp)).unwrap();
    (
        Node {
            key: public_key(&priv_key),
            dev,
            host,
            addr,
        },
        std::sync::Arc::new(()),
    )
}

fn peer_cfg(ips: &[&str], endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        allowed_ips: ips.iter().map(|s| parse_prefix(s).unwrap()).collect(),
        endpoint,
        ..Default::default()
    }
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(payload);
    p
}

fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..].copy_from_slice(payload);
    p
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Write `pkt` into `from`'s TUN until `to`'s TUN delivers exactly it (the first packet may be queued
/// behind a handshake).
fn expect_delivery(from: &MemTunHost, to: &MemTunHost, pkt: &[u8]) {
    from.write(pkt);
    let got = to.read(WAIT).expect("packet not delivered");
    assert_eq!(got, pkt);
}

fn pair(net: &MemNet) -> (Node, Node) {
    let (a, _) = node(net, "192.0.2.1:41641");
    let (b, _) = node(net, "198.51.100.2:41641");
    configure_a(&a, &b);
    b.dev
        .set_peer(
            &a.key,
            peer_cfg(&["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], Some(a.addr)),
        )
        .unwrap();
    (a, b)
}

/// A's side of `pair`'s configuration.
fn configure_a(a: &Node, b: &Node) {
    a.dev
        .set_peer(
            &b.key,
            peer_cfg(&["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], Some(b.addr)),
        )
        .unwrap();
}

#[test]
fn handshake_and_data_both_ways() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let ab = ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"hello b");
    let ba = ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"hello a");
    expect_delivery(&a.host, &b.host, &ab);
    expect_delivery(&b.host, &a.host, &ba);
    for i in 0..100u8 {
        expect_delivery(
            &a.host,
            &b.host,
            &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), &[i; 1000]),
        );
    }
    let sa = a.dev.stats();
    assert!(sa.handshakes_sent >= 1);
    assert_eq!(sa.dropped_decrypt, 0);
    let pa = &a.dev.peers()[0];
    assert_eq!(pa.public_key, b.key);
    assert!(pa.tx_packets >= 101 && pa.rx_packets >= 1);
    // per peer as for the device: the initiations a sent to b (the device counts every peer's)
    assert!(pa.handshakes_sent >= 1 && pa.handshakes_sent <= sa.handshakes_sent);
    assert!(pa.tx_bytes > 100 * 1000);
    let hs = pa.last_handshake.expect("handshake time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - hs).abs() < 10.0, "{now} {hs}");
    assert_eq!(pa.path, Path::Direct);
    assert_eq!(pa.endpoint, Some(b.addr));
}

#[test]
fn ipv6_inner_and_outer() {
    let net = MemNet::new();
    let (a, _) = node(&net, "[2001:db8::1]:1000");
    let (b, _) = node(&net, "[2001:db8::2]:2000");
    a.dev
        .set_peer(&b.key, peer_cfg(&["fd7a:115c:a1e0::2/128"], Some(b.addr)))
        .unwrap();
    b.dev
        .set_peer(&a.key, peer_cfg(&["fd7a:115c:a1e0::/48"], Some(a.addr)))
        .unwrap();
    let s: Ipv6Addr = "fd7a:115c:a1e0::1".parse().unwrap();
    let d: Ipv6Addr = "fd7a:115c:a1e0::2".parse().unwrap();
    expect_delivery(&a.host, &b.host, &ipv6_packet(s, d, b"six"));
    expect_delivery(&b.host, &a.host, &ipv6_packet(d, s, b"back"));
}

#[test]
fn longest_prefix_match_picks_the_most_specific_peer() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let (b, _) = node(&net, "192.0.2.2:2");
    let (c, _) = node(&net, "192.0.2.3:3");
    a.dev
        .set_peer(&b.key, peer_cfg(&["10.0.0.0/8"], Some(b.addr)))
        .unwrap();
    a.dev
        .set_peer(
            &c.key,
            peer_cfg(&["10.1.0.0/16", "10.1.2.3/32"], Some(c.addr)),
        )
        .unwrap();
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    c.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    let src = v4("100.64.0.1");
    expect_delivery(&a.host, &c.host, &ipv4_packet(src, v4("10.1.2.3"), b"c"));
    expect_delivery(&a.host, &c.host, &ipv4_packet(src, v4("10.1.200.1"), b"c"));
    expect_delivery(&a.host, &b.host, &ipv4_packet(src, v4("10.2.0.1"), b"b"));
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(src, v4("10.255.255.255"), b"b"),
    );
    assert!(c.host.read(Duration::from_millis(100)).is_none());
    a.host.write(&ipv4_packet(src, v4("11.0.0.1"), b"nowhere"));
    a.host.write(&ipv6_packet(
        "::1".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
        b"nowhere",
    ));
    a.host.write(b"\x00not ip");
    wait_for(|| a.dev.stats().dropped_no_route == 3);
    // Stealing a prefix: setting it on B takes it from C, as WireGuard does.
    a.dev
        .set_peer(&b.key, peer_cfg(&["10.0.0.0/8", "10.1.0.0/16"], None))
        .unwrap();
    let c_ips: Vec<String> = a
        .dev
        .peers()
        .iter()
        .find(|p| p.public_key == c.key)
        .unwrap()
        .allowed_ips
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(c_ips, vec!["10.1.2.3/32".to_string()]);
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(src, v4("10.1.200.1"), b"b now"),
    );
}

fn wait_for(mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "condition not met in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

#[test]
fn relay_path_both_ways() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let (b, _) = node(&net, "192.0.2.2:2");
    // No endpoints at all: only the relay can carry anything.
    a.dev
        .set_peer(&b.key, peer_cfg(&["100.64.0.2/32"], None))
        .unwrap();
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], None))
        .unwrap();
    a.dev.set_path(&b.key, Path::Relay, true).unwrap();
    b.dev.set_path(&a.key, Path::Relay, true).unwrap();
    assert!(!readable(a.dev.event_fd()));
    let ab = ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"via derp");
    let ba = ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"and back");
    a.host.write(&ab);
    let pump = |from: &Node, to: &Node| {
        let (dgrams, relay) = from.dev.drain(1024);
        assert!(dgrams.is_empty());
        for (k, d) in relay {
            assert_eq!(k, to.key);
            to.dev.inject(&from.key, &d).unwrap();
        }
    };
    let t = Instant::now();
    let got = loop {
        assert!(t.elapsed() < WAIT);
        if readable(a.dev.event_fd()) || readable(b.dev.event_fd()) {
            pump(&a, &b);
            pump(&b, &a);
        }
        if let Some(p) = b.host.read(Duration::from_millis(5)) {
            break p;
        }
    };
    assert_eq!(got, ab);
    b.host.write(&ba);
    let t = Instant::now();
    let got = loop {
        assert!(t.elapsed() < WAIT);
        pump(&b, &a);
        if let Some(p) = a.host.read(Duration::from_millis(5)) {
            break p;
        }
    };
    assert_eq!(got, ba);
    assert!(!readable(a.dev.event_fd()));
    assert_eq!(a.dev.stats().tx_datagrams, 0, "nothing went out on UDP");
    assert_eq!(a.dev.stats().dropped_no_endpoint, 0);
    // Injecting as the wrong peer is refused: C's datagrams can't be passed off as B's.
    assert!(matches!(
        a.dev.inject(&[9; 32], b"x"),
        Err(Error::Device(_))
    ));
}

#[test]
fn garbage_of_every_length_is_counted_and_device_still_works() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let attacker = net.bind("203.0.113.66:666".parse().unwrap());
    use tailpy_core::io::Udp;
    let mut sent = 0u64;
    for len in 0..=1500usize {
        let junk: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8 | 0x80).collect();
        attacker.send_to(&junk, a.addr).unwrap();
        sent += 1;
        // Garbage with each WireGuard header too.
        for t in 1..=4u8 {
            if len >= 4 {
                let mut wg = junk.clone();
                wg[..4].copy_from_slice(&[t, 0, 0, 0]);
                attacker.send_to(&wg, a.addr).unwrap();
                sent += 1;
            }
        }
    }
    wait_for(|| a.dev.stats().rx_datagrams == sent);
    let s = a.dev.stats();
    assert_eq!(
        s.dropped_malformed + s.dropped_unknown_peer + s.dropped_decrypt,
        sent,
        "{s:?}"
    );
    assert_eq!(s.to_python, 0);
    assert_eq!(
        s.handshakes_for_unknown_index, 0,
        "not from a peer's endpoint"
    );
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"still fine"),
    );
    expect_delivery(
        &b.host,
        &a.host,
        &ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"still fine"),
    );
}

#[test]
fn handshake_from_unknown_key_is_counted() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let (c, _) = node(&net, "192.0.2.3:3");
    // C knows A; A does not know C.
    c.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    c.host.write(&ipv4_packet(
        v4("100.64.0.3"),
        v4("100.64.0.1"),
        b"let me in",
    ));
    wait_for(|| a.dev.stats().dropped_unknown_peer >= 1);
    assert!(a.host.read(Duration::from_millis(100)).is_none());
}

#[test]
fn source_outside_allowed_ips_is_dropped() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"ok"),
    );
    // A claims a source it was not given.
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], None))
        .unwrap();
    a.host
        .write(&ipv4_packet(v4("100.64.9.9"), v4("100.64.0.2"), b"spoof"));
    wait_for(|| b.dev.stats().dropped_not_allowed == 1);
    assert!(b.host.read(Duration::from_millis(50)).is_none());
}

#[test]
fn peer_removed_mid_transfer() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let pkt = ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), &[1; 1200]);
    expect_delivery(&a.host, &b.host, &pkt);
    let sender = std::thread::spawn({
        let pkt = pkt.clone();
        let host = a.host;
        move || {
            for _ in 0..2000 {
                host.write(&pkt);
            }
            host
        }
    });
    assert!(b.dev.remove_peer(&a.key));
    assert!(!b.dev.remove_peer(&a.key));
    let a_host = sender.join().unwrap();
    wait_for(|| b.dev.stats().dropped_unknown_peer > 0);
    assert!(b.dev.peers().is_empty());
    // And on the sending side: removing the peer makes its traffic unroutable.
    assert!(a.dev.remove_peer(&b.key));
    let before = a.dev.stats().dropped_no_route;
    a_host.write(&pkt);
    wait_for(|| a.dev.stats().dropped_no_route > before);
    // Re-adding works from scratch.
    a.dev
        .set_peer(&b.key, peer_cfg(&["100.64.0.2/32"], Some(b.addr)))
        .unwrap();
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    while b.host.read(Duration::from_millis(50)).is_some() {}
    expect_delivery(
        &a_host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"again"),
    );
}

#[test]
fn roaming_updates_the_endpoint_only_after_authentication() {
    let net = MemNet::new();
    let (tun_b, host_b) = MemTun::pair();
    let udp_b = std::sync::Arc::new(net.bind("198.51.100.2:41641".parse().unwrap()));
    struct Shared(std::sync::Arc<MemUdp>);
    impl tailpy_core::io::Udp for Shared {
        fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
            self.0.recv_from(buf)
        }
        fn send_to(&self, d: &[u8], to: SocketAddr) -> std::io::Result<()> {
            self.0.send_to(d, to)
        }
        fn local_port(&self) -> u16 {
            self.0.local_port()
        }
        fn close(&self) {
            self.0.close()
        }
    }
    use tailpy_core::io::Udp;
    let kb = generate_private_key();
    let b = Device::with_io(&kb, Box::new(tun_b), Box::new(Shared(udp_b.clone()))).unwrap();
    let b_pub = public_key(&kb);
    let (a, _) = node(&net, "192.0.2.1:41641");
    a.dev
        .set_peer(&b_pub, peer_cfg(&["100.64.0.2/32"], Some(udp_b.addr())))
        .unwrap();
    b.set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    expect_delivery(
        &host_b,
        &a.host,
        &ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"hi"),
    );
    // B moves.
    let new_addr: SocketAddr = "203.0.113.7:5555".parse().unwrap();
    udp_b.rebind(new_addr);
    // A forged datagram from yet another address doesn't move A's idea of B.
    let forger = net.bind("203.0.113.99:1".parse().unwrap());
    forger
        .send_to(
            &[
                4, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
                9, 9, 9, 9,
            ],
            a.addr,
        )
        .unwrap();
    wait_for(|| a.dev.stats().rx_datagrams >= 3);
    assert_eq!(
        a.dev.peers()[0].endpoint,
        Some("198.51.100.2:41641".parse().unwrap())
    );
    expect_delivery(
        &host_b,
        &a.host,
        &ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"moved"),
    );
    assert_eq!(a.dev.peers()[0].endpoint, Some(new_addr));
    expect_delivery(
        &a.host,
        &host_b,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"follow"),
    );
}

#[test]
fn stun_and_disco_go_to_python_and_send_datagram_goes_out() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let other = net.bind("192.0.2.50:3478".parse().unwrap());
    use tailpy_core::io::Udp;
    let mut stun = vec![0u8; 20];
    stun[1] = 1;
    stun[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    let mut disco = DISCO_MAGIC.to_vec();
    disco.extend_from_slice(&[7; 60]);
    other.send_to(&stun, a.addr).unwrap();
    other.send_to(&disco, a.addr).unwrap();
    wait_for(|| a.dev.stats().to_python == 2);
    assert!(readable(a.dev.event_fd()));
    let (d, r) = a.dev.drain(1);
    assert_eq!(d, vec![(stun.clone(), other.addr())]);
    assert!(r.is_empty());
    assert!(readable(a.dev.event_fd()), "one item is left");
    let (d, _) = a.dev.drain(1024);
    assert_eq!(d, vec![(disco, other.addr())]);
    assert!(!readable(a.dev.event_fd()));
    a.dev.send_datagram(b"pong", other.addr()).unwrap();
    let (got, from) = other.recv_timeout(WAIT).unwrap();
    assert_eq!((got.as_slice(), from), (&b"pong"[..], a.addr));
}

#[test]
fn bad_keys_and_config_rejected() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let e = a.dev.set_peer(&[0; 32], PeerConfig::default()).unwrap_err();
    assert_eq!(e, Error::InvalidKey("peer public key is all zeros".into()));
    let mut one = [0u8; 32];
    one[0] = 1;
    assert!(
        matches!(a.dev.set_peer(&one, PeerConfig::default()), Err(Error::InvalidKey(m)) if m.contains("low-order"))
    );
    assert!(matches!(
        a.dev.set_peer(&a.key, PeerConfig::default()),
        Err(Error::InvalidKey(_))
    ));
    assert!(matches!(parse_prefix("10.0.0.0/33"), Err(Error::Config(_))));
    assert!(matches!(parse_prefix("nonsense"), Err(Error::Config(_))));
    assert_eq!(
        parse_prefix("10.1.2.3/8").unwrap().to_string(),
        "10.0.0.0/8"
    );
    assert_eq!(parse_prefix("fd7a::1").unwrap().to_string(), "fd7a::1/128");
    assert!(matches!(parse_endpoint("1.2.3.4"), Err(Error::Config(_))));
    assert_eq!(
        parse_endpoint("[::ffff:1.2.3.4]:5").unwrap(),
        "1.2.3.4:5".parse().unwrap()
    );
    assert_eq!(
        parse_endpoint("[2001:db8::1]:5").unwrap().ip(),
        "2001:db8::1".parse::<IpAddr>().unwrap()
    );
    assert!(matches!(
        a.dev.set_path(&[3; 32], Path::Relay, true),
        Err(Error::Device(_))
    ));
    let (b, _) = node(&net, "192.0.2.2:1");
    a.dev.set_peer(&b.key, PeerConfig::default()).unwrap();
    a.dev.close();
    a.dev.close();
    assert!(a.dev.is_closed());
    assert_eq!(
        a.dev.send_datagram(b"x", b.addr),
        Err(Error::Device("the device is closed".into()))
    );
}

#[test]
fn real_loopback_udp_v4_and_v6() {
    let (tun_a, host_a) = MemTun::pair();
    let (tun_b, host_b) = MemTun::pair();
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let a = Device::with_io(&ka, Box::new(tun_a), Box::new(LinuxUdp::bind(0).unwrap())).unwrap();
    let b = Device::with_io(&kb, Box::new(tun_b), Box::new(LinuxUdp::bind(0).unwrap())).unwrap();
    let ea: SocketAddr = format!("127.0.0.1:{}", a.listen_port()).parse().unwrap();
    b.set_peer(&public_key(&ka), peer_cfg(&["100.64.0.1/32"], Some(ea)))
        .unwrap();
    a.set_peer(&public_key(&kb), peer_cfg(&["100.64.0.2/32"], None))
        .unwrap();
    expect_delivery(
        &host_b,
        &host_a,
        &ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"over v4"),
    );
    // A learned B's endpoint from the authenticated handshake, reported as plain IPv4.
    let learned = a.peers()[0].endpoint.unwrap();
    assert_eq!(
        learned,
        format!("127.0.0.1:{}", b.listen_port()).parse().unwrap()
    );
    expect_delivery(
        &host_a,
        &host_b,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"reply"),
    );
    // Now over IPv6 loopback, if this machine has it.
    if std::net::UdpSocket::bind("[::1]:0").is_ok() {
        let e6: SocketAddr = format!("[::1]:{}", a.listen_port()).parse().unwrap();
        b.set_peer(&public_key(&ka), peer_cfg(&["100.64.0.1/32"], Some(e6)))
            .unwrap();
        expect_delivery(
            &host_b,
            &host_a,
            &ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"over v6"),
        );
        assert_eq!(
            a.peers()[0].endpoint.unwrap(),
            format!("[::1]:{}", b.listen_port()).parse().unwrap()
        );
    }
}

#[test]
fn persistent_keepalive_sends_without_traffic() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let mut cfg = peer_cfg(&["100.64.0.2/32"], Some(b.addr));
    cfg.persistent_keepalive = 1;
    a.dev.set_peer(&b.key, cfg).unwrap();
    // A initiates a handshake by itself, then keeps sending keepalives.
    wait_for(|| b.dev.peers()[0].rx_packets >= 3);
    assert_eq!(a.dev.peers()[0].persistent_keepalive, Some(1));
    assert!(
        b.host.read(Duration::from_millis(10)).is_none(),
        "keepalives are not delivered"
    );
}

#[test]
fn preshared_key_must_match() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    let mut cfg_a = peer_cfg(&["100.64.0.2/32"], Some(b.addr));
    cfg_a.preshared_key = Some([7; 32]);
    let mut cfg_b = peer_cfg(&["100.64.0.1/32"], Some(a.addr));
    cfg_b.preshared_key = Some([7; 32]);
    a.dev.set_peer(&b.key, cfg_a.clone()).unwrap();
    b.dev.set_peer(&a.key, cfg_b.clone()).unwrap();
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"psk"),
    );
    cfg_b.preshared_key = Some([8; 32]);
    b.dev.set_peer(&a.key, cfg_b).unwrap();
    a.dev.set_peer(&b.key, cfg_a).unwrap();
    a.host.write(&ipv4_packet(
        v4("100.64.0.1"),
        v4("100.64.0.2"),
        b"wrong psk",
    ));
    wait_for(|| a.dev.stats().dropped_decrypt + b.dev.stats().dropped_decrypt >= 1);
    assert!(b.host.read(Duration::from_millis(100)).is_none());
}

#[test]
fn node_key_rotation() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"old key"),
    );
    let new_priv = generate_private_key();
    a.dev.set_private_key(&new_priv).unwrap();
    assert_eq!(a.dev.public_key(), public_key(&new_priv));
    assert!(b.dev.remove_peer(&a.key));
    b.dev
        .set_peer(
            &public_key(&new_priv),
            peer_cfg(&["100.64.0.1/32"], Some(a.addr)),
        )
        .unwrap();
    expect_delivery(
        &b.host,
        &a.host,
        &ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), b"new key"),
    );
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"new key"),
    );
}

fn disco_of_len(len: usize) -> Vec<u8> {
    let mut d = DISCO_MAGIC.to_vec();
    d.resize(len, 0x5a);
    d
}

#[test]
fn stun_disco_queue_is_bounded_by_bytes_and_oversize_datagrams_are_malformed() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let other = net.bind("203.0.113.9:9".parse().unwrap());
    use tailpy_core::io::Udp;
    // The tester's attack: large disco-looking datagrams. None is queued.
    for _ in 0..50 {
        other.send_to(&disco_of_len(65000), a.addr).unwrap();
    }
    let mut stun = vec![0u8; MAX_STUN_DISCO_LEN + 1];
    stun[1] = 1;
    stun[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    other.send_to(&stun, a.addr).unwrap();
    wait_for(|| a.dev.stats().rx_datagrams == 51);
    let s = a.dev.stats();
    assert_eq!((s.dropped_malformed, s.to_python), (51, 0), "{s:?}");
    assert!(!readable(a.dev.event_fd()));
    // Datagrams of the largest size allowed fill the queue by bytes long before its item limit.
    let fits = DATAGRAM_QUEUE_BYTES / MAX_STUN_DISCO_LEN;
    assert!(fits < QUEUE_LIMIT);
    let sent = fits + 100;
    for _ in 0..sent {
        other
            .send_to(&disco_of_len(MAX_STUN_DISCO_LEN), a.addr)
            .unwrap();
    }
    wait_for(|| a.dev.stats().rx_datagrams == 51 + sent as u64);
    let s = a.dev.stats();
    assert_eq!(s.to_python, fits as u64, "{s:?}");
    assert_eq!(s.dropped_queue_full, 100, "{s:?}");
    let (d, r) = a.dev.drain(usize::MAX);
    assert!(r.is_empty());
    assert_eq!(d.len(), fits);
    assert!(d.iter().map(|(p, _)| p.len()).sum::<usize>() <= DATAGRAM_QUEUE_BYTES);
    assert!(!readable(a.dev.event_fd()));
    // Draining frees the bytes: small datagrams are queued again, up to the item limit.
    for _ in 0..QUEUE_LIMIT + 10 {
        other.send_to(&disco_of_len(64), a.addr).unwrap();
    }
    wait_for(|| a.dev.stats().rx_datagrams == (51 + sent + QUEUE_LIMIT + 10) as u64);
    let s = a.dev.stats();
    assert_eq!(s.to_python, (fits + QUEUE_LIMIT) as u64, "{s:?}");
    assert_eq!(s.dropped_queue_full, 110, "{s:?}");
    assert_eq!(a.dev.drain(usize::MAX).0.len(), QUEUE_LIMIT);
}

#[test]
fn relay_queue_is_bounded_by_bytes() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"session"),
    );
    a.dev.set_path(&b.key, Path::Relay, true).unwrap();
    // Jumbo packets (a TUN with a large MTU): each relay datagram is the packet plus 32 bytes.
    let pkt = ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), &[3; 60000]);
    let fits = RELAY_QUEUE_BYTES / (pkt.len() + 32);
    assert!(fits < QUEUE_LIMIT);
    let tx0 = a.dev.peers()[0].tx_packets;
    let sent = fits + 20;
    for _ in 0..sent {
        a.host.write(&pkt);
    }
    wait_for(|| {
        a.dev.stats().dropped_queue_full + a.dev.peers()[0].tx_packets - tx0 >= sent as u64
    });
    assert_eq!(a.dev.stats().dropped_queue_full, 20);
    let (d, relay) = a.dev.drain(usize::MAX);
    assert!(d.is_empty());
    assert_eq!(relay.len(), fits);
    assert!(relay.iter().map(|(_, p)| p.len()).sum::<usize>() <= RELAY_QUEUE_BYTES);
    // What was queued is intact: B decrypts and delivers it.
    for (k, dgram) in &relay[..3] {
        assert_eq!(*k, b.key);
        b.dev.inject(&a.key, dgram).unwrap();
        assert_eq!(b.host.read(WAIT).unwrap(), pkt);
    }
}

#[test]
fn restarted_node_heals_the_session_with_its_own_handshake() {
    let net = MemNet::new();
    let ka = generate_private_key();
    let (a, _) = node_with_key(&net, "192.0.2.1:41641", ka);
    let (b, _) = node(&net, "198.51.100.2:41641");
    configure_a(&a, &b);
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    let ab = |m: &[u8]| ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), m);
    let ba = |m: &[u8]| ipv4_packet(v4("100.64.0.2"), v4("100.64.0.1"), m);
    expect_delivery(&a.host, &b.host, &ab(b"before"));
    expect_delivery(&b.host, &a.host, &ba(b"before"));
    // A's daemon restarts: a fresh device, same key, same address, same peer configuration. B keeps its
    // session with the old A.
    drop(a);
    let (a, _) = node_with_key(&net, "192.0.2.1:41641", ka);
    configure_a(&a, &b);
    let b_sent = b.dev.stats().handshakes_sent;
    let b_rx = b.dev.peers()[0].rx_packets;
    // B sends a burst on its stale session: A can't read it, but answers with one handshake initiation.
    for _ in 0..5 {
        b.host.write(&ba(b"stale"));
    }
    wait_for(|| {
        let s = a.dev.stats();
        s.dropped_unknown_peer + s.dropped_decrypt >= 5
    });
    assert_eq!(a.dev.stats().handshakes_for_unknown_index, 1);
    // One round trip: B responds to A's initiation, A confirms with a keepalive on the new session.
    wait_for(|| b.dev.peers()[0].rx_packets >= b_rx + 2);
    assert!(a.host.read(Duration::from_millis(20)).is_none());
    expect_delivery(&b.host, &a.host, &ba(b"after"));
    expect_delivery(&a.host, &b.host, &ab(b"after"));
    let (sa, sb) = (a.dev.stats(), b.dev.stats());
    assert_eq!(sa.handshakes_for_unknown_index, 1, "{sa:?}");
    assert_eq!(sa.handshakes_sent, 1, "{sa:?}");
    assert_eq!(
        sb.handshakes_sent, b_sent,
        "B never had to initiate: {sb:?}"
    );
    assert_eq!(sb.dropped_decrypt, 0, "{sb:?}");
}

/// A WireGuard data message for receiver index `idx` (not decryptable).
fn stale_data(idx: u32) -> Vec<u8> {
    let mut d = vec![4, 0, 0, 0];
    d.extend_from_slice(&idx.to_le_bytes());
    d.extend_from_slice(&[0; 8]);
    d.extend_from_slice(&[0x77; 32]);
    d
}

#[test]
fn unknown_index_handshake_only_for_a_peer_without_session_and_rate_limited() {
    let net = MemNet::new();
    let (a, b) = pair(&net);
    use tailpy_core::io::Udp;
    // From an address that is no peer's endpoint: dropped, no handshake.
    let stranger = net.bind("203.0.113.5:5".parse().unwrap());
    for i in 0..10 {
        stranger
            .send_to(&stale_data(0xdead_0000 + i), a.addr)
            .unwrap();
    }
    wait_for(|| a.dev.stats().dropped_unknown_peer + a.dev.stats().dropped_decrypt == 10);
    assert_eq!(a.dev.stats().handshakes_for_unknown_index, 0);
    assert_eq!(a.dev.stats().handshakes_sent, 0);
    // Over DERP from B (no session yet): one handshake, then none for REKEY_TIMEOUT however many come.
    for i in 0..10 {
        a.dev.inject(&b.key, &stale_data(0xbeef_0000 + i)).unwrap();
    }
    assert_eq!(a.dev.stats().handshakes_for_unknown_index, 1);
    // B (direct path, A's endpoint known) answers: the session is up.
    wait_for(|| a.dev.peers()[0].last_handshake.is_some());
    assert_eq!(a.dev.stats().handshakes_sent, 1);
    // With a session, stale data from B's own endpoint starts nothing.
    let before = a.dev.stats();
    a.dev.inject(&b.key, &stale_data(0xbeef_1000)).unwrap();
    let after = a.dev.stats();
    assert_eq!(
        after.handshakes_for_unknown_index,
        before.handshakes_for_unknown_index
    );
    assert_eq!(after.handshakes_sent, before.handshakes_sent);
    expect_delivery(
        &a.host,
        &b.host,
        &ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"fine"),
    );
}

/// A UDP datagram (ports, 4 payload bytes) in an IPv4 packet.
fn udp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 12];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&12u16.to_be_bytes());
    ipv4_packet(v4(src), v4(dst), &u)
}

#[test]
fn packet_filter_drops_unsolicited_udp_and_admits_replies() {
    use tailpy_core::{DropReason, RuleSpec};
    let net = MemNet::new();
    let (a, b) = pair(&net);
    // Before any filter: everything passes, and the session is up.
    expect_delivery(&a.host, &b.host, &udp4("100.64.0.1", 1, "100.64.0.2", 9999));
    // B admits only UDP 53 from A.
    let rules = [RuleSpec {
        src_ips: vec!["100.64.0.1".into()],
        dst_ports: vec![("100.64.0.2/32".into(), 53, 53)],
        ip_proto: vec![17],
    }];
    b.dev.set_filter(Some(&rules)).unwrap();
    assert_eq!(b.dev.stats().filter_rules, Some(1));
    expect_delivery(
        &a.host,
        &b.host,
        &udp4("100.64.0.1", 40000, "100.64.0.2", 53),
    );
    a.host.write(&udp4("100.64.0.1", 40000, "100.64.0.2", 54));
    wait_for(|| b.dev.stats().filter_dropped[DropReason::NotAReply as usize] == 1);
    assert!(b.host.read(Duration::from_millis(100)).is_none());
    // B starts a flow to A's port 5000: A's reply from 5000 passes.
    expect_delivery(
        &b.host,
        &a.host,
        &udp4("100.64.0.2", 33000, "100.64.0.1", 5000),
    );
    expect_delivery(
        &a.host,
        &b.host,
        &udp4("100.64.0.1", 5000, "100.64.0.2", 33000),
    );
    assert!(b.dev.stats().filter_flows >= 1);
    // A malformed rule is refused and the filter in force stays.
    let bad = [RuleSpec {
        src_ips: vec!["nonsense".into()],
        ..Default::default()
    }];
    assert!(matches!(
        b.dev.set_filter(Some(&bad)),
        Err(Error::Config(_))
    ));
    assert_eq!(b.dev.stats().filter_rules, Some(1));
    // No filter: everything again.
    b.dev.set_filter(None).unwrap();
    assert_eq!(b.dev.stats().filter_rules, None);
    expect_delivery(
        &a.host,
        &b.host,
        &udp4("100.64.0.1", 40000, "100.64.0.2", 54),
    );
}

#[test]
fn unconfirmed_direct_path_sends_handshakes_over_the_relay_too() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let (b, _) = node(&net, "192.0.2.2:2");
    // A's only guess for B is an endpoint nothing answers on; B has no endpoint for A at all.
    let nowhere: SocketAddr = "203.0.113.9:9".parse().unwrap();
    a.dev
        .set_peer(&b.key, peer_cfg(&["100.64.0.2/32"], Some(nowhere)))
        .unwrap();
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], None))
        .unwrap();
    a.dev.set_path(&b.key, Path::Direct, false).unwrap();
    b.dev.set_path(&a.key, Path::Direct, false).unwrap();
    a.host.write(&ipv4_packet(
        v4("100.64.0.1"),
        v4("100.64.0.2"),
        b"first packet",
    ));
    // The initiation goes to the guess and to the relay queue, B's response (no endpoint for A) back
    // over the relay: the session forms on the first initiation. Only handshake messages are relayed.
    let t = Instant::now();
    while a.dev.peers()[0].last_handshake.is_none() {
        assert!(t.elapsed() < WAIT, "no session over the relay");
        for (from, to) in [(&a, &b), (&b, &a)] {
            for (k, d) in from.dev.drain(1024).1 {
                assert_eq!(k, to.key);
                assert!(d[0] == 1 || d[0] == 2, "only handshakes: type {}", d[0]);
                to.dev.inject(&from.key, &d).unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(a.dev.stats().handshakes_sent, 1, "no retry was needed");
    assert_eq!(
        b.dev.stats().dropped_no_endpoint,
        1,
        "B's direct copy had nowhere to go"
    );
    // Once confirmed, the direct path carries handshakes alone.
    a.dev.set_path(&b.key, Path::Direct, true).unwrap();
    assert!(!a.dev.retry_handshake(&b.key).unwrap(), "a session exists");
}

#[test]
fn retry_handshake_resends_a_lost_initiation_at_once() {
    let net = MemNet::new();
    let (a, _) = node(&net, "192.0.2.1:1");
    let (b, _) = node(&net, "192.0.2.2:2");
    let nowhere: SocketAddr = "203.0.113.9:9".parse().unwrap();
    a.dev
        .set_peer(&b.key, peer_cfg(&["100.64.0.2/32"], Some(nowhere)))
        .unwrap();
    b.dev
        .set_peer(&a.key, peer_cfg(&["100.64.0.1/32"], Some(a.addr)))
        .unwrap();
    // Nothing pending yet: nothing to retry.
    assert!(!a.dev.retry_handshake(&b.key).unwrap());
    let ab = ipv4_packet(v4("100.64.0.1"), v4("100.64.0.2"), b"queued");
    a.host.write(&ab);
    wait_for(|| a.dev.stats().handshakes_sent == 1);
    assert!(b.host.read(Duration::from_millis(50)).is_none());
    // The path to B is found: the pending handshake goes again now, not after REKEY_TIMEOUT, and the
    // packet queued behind it follows.
    a.dev
        .set_peer(&b.key, peer_cfg(&["100.64.0.2/32"], Some(b.addr)))
        .unwrap();
    assert!(a.dev.retry_handshake(&b.key).unwrap());
    assert_eq!(b.host.read(Duration::from_secs(2)), Some(ab));
    let s = a.dev.stats();
    assert_eq!((s.handshakes_sent, s.handshakes_retried), (2, 1));
    // With a session there is nothing pending.
    assert!(!a.dev.retry_handshake(&b.key).unwrap());
    assert!(matches!(
        a.dev.retry_handshake(&[9; 32]),
        Err(Error::Device(_))
    ));
}
