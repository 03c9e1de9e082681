//! Closing a userspace device releases every thread and file descriptor. A file of its own: it
//! counts the process's threads and descriptors, which other tests running at once would change.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tailpy_core::device::parse_prefix;
use tailpy_core::keys::{generate_private_key, public_key};
use tailpy_core::{Device, PeerConfig};

const WAIT: Duration = Duration::from_secs(10);

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn close_leaves_no_thread_or_descriptor() {
    let fds0 = count("/proc/self/fd");
    let threads0 = count("/proc/self/task");
    let (ka, kb) = (generate_private_key(), generate_private_key());
    let a = Device::userspace(&ka, 0, &["100.64.0.1/32".into()], 1280).unwrap();
    let b = Device::userspace(&kb, 0, &["100.64.0.2/32".into()], 1280).unwrap();
    let ep = |d: &Device| SocketAddr::from(([127, 0, 0, 1], d.listen_port()));
    let peer = |ip: &str, ep| PeerConfig {
        allowed_ips: vec![parse_prefix(ip).unwrap()],
        endpoint: Some(ep),
        ..Default::default()
    };
    a.set_peer(&public_key(&kb), peer("100.64.0.2/32", ep(&b)))
        .unwrap();
    b.set_peer(&public_key(&ka), peer("100.64.0.1/32", ep(&a)))
        .unwrap();
    // A connection (accepted and not), a listener, a UDP socket: all open when the devices close.
    let nb = b.netstack().unwrap();
    let l = nb.tcp_listen(80, 8).unwrap();
    let mut c = UnixStream::from(a.tcp_dial("100.64.0.2:80".parse().unwrap(), WAIT).unwrap());
    let _pending = a.tcp_dial("100.64.0.2:80".parse().unwrap(), WAIT).unwrap();
    let deadline = Instant::now() + WAIT;
    let (s, _) = loop {
        if let Some(x) = nb.tcp_accept(l).unwrap() {
            break x;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut s = UnixStream::from(s);
    c.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.read_exact(&mut one).unwrap();
    let _udp = a.netstack().unwrap().udp_bind(0).unwrap();
    assert!(count("/proc/self/task") >= threads0 + 10);
    a.close();
    b.close();
    // Every thread has ended; the callers' socketpair ends see end-of-stream.
    assert_eq!(count("/proc/self/task"), threads0);
    c.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(c.read(&mut one).unwrap(), 0);
    assert!(a.netstack().is_err());
    drop((c, s, _pending, _udp));
    // Left until the devices are dropped: three eventfds each (the device's, its socket's wakeup and
    // its stack's wakeup); every socket, socketpair end and epoll instance is closed.
    let left: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|t| !t.to_string_lossy().contains("eventfd"))
        .collect();
    assert_eq!(left.len(), fds0, "{left:?}");
    assert_eq!(count("/proc/self/fd"), fds0 + 6);
    drop((a, b));
    assert_eq!(count("/proc/self/fd"), fds0);
}
