//! A userspace TCP/IP stack (smoltcp) in place of the TUN: the node's tailnet addresses terminate TCP
//! and UDP inside the process, and each connection or bound port is one end of a `socketpair(2)` whose
//! other end the caller owns (an ordinary socket any program, and asyncio, can use), as libtailscale
//! hands out socketpair ends from its gVisor netstack.
//!
//! `Netstack` implements `io::Tun`, so the `Device`'s WireGuard, path, relay and filter code is the
//! same as with a TUN: packets the device decrypts (and the filter admits) are handed to the stack with
//! `send_batch`, and packets the stack emits are read by the device's TUN thread with `recv_batch` and
//! encrypted. Both directions move whole `Batch`es, swapped rather than copied where capacities match.
//!
//! One thread (`tailpy-netstack`) polls smoltcp (`Interface::poll`, its timers through `poll_delay`) and
//! waits in `epoll` on the socketpair ends (edge-triggered) and an eventfd that the device and the API
//! calls signal. Bytes move between each smoltcp socket's ring buffer and its socketpair end with one
//! `recv`/`send` straight into or out of the ring, with backpressure both ways: a socketpair end is not
//! read while the smoltcp send buffer is full, and smoltcp's receive buffer is not drained while the
//! socketpair is full (its window closes instead). Nothing is buffered without bound: the queue of
//! decrypted packets holds `INBOUND_BATCHES` batches (then packets are dropped and counted, as a NIC's
//! ring drops), and the stack stops emitting while the device has not taken its last batch.
//!
//! UDP messages on a socketpair (`SOCK_SEQPACKET`) carry a header: 1 byte family (4 or 6), 16 bytes IP
//! (IPv4 in the first 4), 2 bytes port (big-endian), then the payload; the same both ways (sending: the
//! destination; receiving: the source).

mod stack;
mod sys;

use crate::batch::Batch;
use crate::device::{TUN_READ_BYTES, TUN_READ_PACKETS, TUN_WRITE_BYTES, TUN_WRITE_PACKETS};
use crate::error::{Error, Result};
use crate::io::{EventFd, Tun};
use crate::offload::GroTable;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

pub use stack::UDP_HEADER_LEN;

/// Batches of decrypted packets queued for the stack at most (each `TUN_WRITE_BYTES`).
const INBOUND_BATCHES: usize = 4;

/// Counters of the stack (see `_native.pyi` `NetstackStats`).
#[derive(Debug, Default)]
struct Counters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    dropped_rx_queue_full: AtomicU64,
    tcp_bytes_in: AtomicU64,
    tcp_bytes_out: AtomicU64,
    udp_datagrams_in: AtomicU64,
    udp_datagrams_out: AtomicU64,
    udp_dropped: AtomicU64,
}

/// A snapshot of the stack's sockets and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetstackStats {
    pub tcp_connections: u64,
    pub tcp_listeners: u64,
    pub udp_sockets: u64,
    /// IP packets from the device into the stack, and their bytes.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// IP packets the stack emitted, and their bytes.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Decrypted packets dropped because the stack's inbound queue was full.
    pub dropped_rx_queue_full: u64,
    /// Payload bytes received from the tailnet (to socketpairs) and sent to it (from socketpairs).
    pub tcp_bytes_in: u64,
    pub tcp_bytes_out: u64,
    pub udp_datagrams_in: u64,
    pub udp_datagrams_out: u64,
    /// UDP datagrams dropped: malformed header, no route, or the socketpair refused them.
    pub udp_dropped: u64,
}

#[derive(Default)]
struct Inbound {
    full: VecDeque<Batch>,
    empty: Vec<Batch>,
}

struct Outbound {
    ready: Batch,
    /// Packets of `ready` already taken by single-packet `recv`s.
    head: usize,
    /// The stack has packets waiting for `ready` to be taken: wake it when it is.
    want_room: bool,
}

/// What the device and the stack thread share (no reference back to the stack).
struct Pipes {
    inbound: Mutex<Inbound>,
    outbound: Mutex<Outbound>,
    out_ready: Condvar,
    /// Wakes the stack thread (packets in, room out, API calls, close).
    wake: EventFd,
    closed: AtomicBool,
    counters: Counters,
}

impl Pipes {
    /// Hand the stack's emitted packets in `local` to the device if it took the previous ones.
    fn flush(&self, local: &mut Batch) {
        if local.is_empty() {
            return;
        }
        let mut q = self.outbound.lock();
        if q.ready.len() == q.head {
            q.ready.clear();
            q.head = 0;
            std::mem::swap(&mut q.ready, local);
            drop(q);
            self.out_ready.notify_one();
        } else {
            q.want_room = true;
        }
    }
}

struct Shared {
    pipes: Arc<Pipes>,
    stack: Mutex<stack::Stack>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle on one userspace stack; clones share it. The `Device` owns one as its `Tun`.
#[derive(Clone)]
pub struct Netstack(Arc<Shared>);

/// Parse the node's addresses: CIDR host prefixes ("100.64.0.1/32", "fd7a:115c:a1e0::1/128") or bare
/// addresses; at most one IPv4 and one IPv6 address.
pub fn parse_addresses(addresses: &[String]) -> Result<Vec<(IpAddr, u8)>> {
    let mut out = Vec::new();
    for s in addresses {
        let bad = || {
            Error::Config(format!(
                "malformed address {s:?}: expected a CIDR host prefix such as 100.64.0.1/32"
            ))
        };
        let (a, l) = match s.trim().split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        if addr.is_unspecified() || addr.is_multicast() {
            return Err(bad());
        }
        out.push((addr, len));
    }
    let v4 = out.iter().filter(|(a, _)| a.is_ipv4()).count();
    if v4 > 1 || out.len() - v4 > 1 {
        return Err(Error::Config(format!(
            "at most one IPv4 and one IPv6 address, got {}",
            addresses.join(", ")
        )));
    }
    Ok(out)
}

fn dev_err(what: &str, e: io::Error) -> Error {
    Error::Device(format!("{what}: {e}"))
}

impl Netstack {
    /// A stack for `addresses` (see `parse_addresses`) with links of `mtu` bytes (576-65535; TCP's
    /// MSS follows from it). Starts the stack thread.
    pub fn new(addresses: &[String], mtu: u32) -> Result<Netstack> {
        if !(576..=65535).contains(&mtu) {
            return Err(Error::Config(format!(
                "MTU must be between 576 and 65535, got {mtu}"
            )));
        }
        let addrs = parse_addresses(addresses)?;
        let inbound = Inbound {
            full: VecDeque::with_capacity(INBOUND_BATCHES),
            empty: (0..INBOUND_BATCHES)
                .map(|_| Batch::new(TUN_WRITE_BYTES, TUN_WRITE_PACKETS))
                .collect(),
        };
        let pipes = Arc::new(Pipes {
            inbound: Mutex::new(inbound),
            outbound: Mutex::new(Outbound {
                ready: Batch::new(TUN_READ_BYTES, TUN_READ_PACKETS),
                head: 0,
                want_room: false,
            }),
            out_ready: Condvar::new(),
            wake: EventFd::new().map_err(|e| dev_err("cannot create an eventfd", e))?,
            closed: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let mut st = stack::Stack::new(pipes.clone(), mtu as usize)
            .map_err(|e| dev_err("cannot start the network stack", e))?;
        st.set_addresses(&addrs);
        let shared = Arc::new(Shared {
            pipes,
            stack: Mutex::new(st),
            thread: Mutex::new(None),
        });
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("tailpy-netstack".into())
            .spawn(move || stack::run(&s.pipes, &s.stack))
            .map_err(|e| dev_err("cannot start a thread", e))?;
        *shared.thread.lock() = Some(t);
        Ok(Netstack(shared))
    }

    fn check_open(&self) -> Result<()> {
        if self.0.pipes.closed.load(Relaxed) {
            return Err(Error::Device("the device is closed".into()));
        }
        Ok(())
    }

    /// Run `f` on the stack, then wake its thread to act on the change.
    fn with_stack<R>(&self, f: impl FnOnce(&mut stack::Stack) -> Result<R>) -> Result<R> {
        self.check_open()?;
        let r = f(&mut self.0.stack.lock());
        self.0.pipes.wake.signal();
        r
    }

    /// Replace the node's addresses (see `parse_addresses`); connections on removed addresses stay
    /// until they fail.
    pub fn set_addresses(&self, addresses: &[String]) -> Result<()> {
        let addrs = parse_addresses(addresses)?;
        self.with_stack(|st| {
            st.set_addresses(&addrs);
            Ok(())
        })
    }

    /// The node's addresses.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.0.stack.lock().addresses()
    }

    /// Open a TCP connection to `dst`, waiting up to `timeout` for the handshake. Returns the
    /// caller's end of a `SOCK_STREAM` socketpair (blocking until the caller changes it).
    /// `Error::Dial` on refusal (RST, or ICMP unreachable), timeout, or no source address.
    pub fn tcp_dial(&self, dst: SocketAddr, timeout: Duration) -> Result<OwnedFd> {
        let (tx, rx) = mpsc::sync_channel(1);
        let id = self.with_stack(|st| st.dial(dst, tx))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => {
                let resolved = self.0.stack.lock().cancel_dial(id);
                // The stack thread answers only while the dial is registered: if it had answered
                // before the cancel, the answer is in the channel now.
                if !resolved {
                    if let Ok(Ok(fd)) = rx.try_recv() {
                        drop(fd);
                    }
                }
                self.0.pipes.wake.signal();
                if self.0.pipes.closed.load(Relaxed) {
                    return Err(Error::Device("the device is closed".into()));
                }
                Err(Error::Dial(format!(
                    "connecting to {dst} timed out after {:.1} s (no answer from the peer)",
                    timeout.as_secs_f64()
                )))
            }
        }
    }

    /// Listen on TCP `port` (1-65535) of every node address; up to `backlog` (1-4096) connections
    /// wait to be accepted, further ones are refused (RST). Returns a listener id.
    pub fn tcp_listen(&self, port: u16, backlog: usize) -> Result<u32> {
        if port == 0 {
            return Err(Error::Config(
                "TCP listen port must be 1-65535, got 0".into(),
            ));
        }
        if !(1..=4096).contains(&backlog) {
            return Err(Error::Config(format!(
                "backlog must be between 1 and 4096, got {backlog}"
            )));
        }
        self.with_stack(|st| st.listen(port, backlog))
    }

    /// An eventfd readable while connections wait on `listener`.
    pub fn tcp_accept_fd(&self, listener: u32) -> Result<i32> {
        self.check_open()?;
        self.0.stack.lock().accept_fd(listener)
    }

    /// The next waiting connection on `listener`: the caller's socketpair end and the remote
    /// endpoint; `None` if none waits.
    pub fn tcp_accept(&self, listener: u32) -> Result<Option<(OwnedFd, SocketAddr)>> {
        self.with_stack(|st| st.accept(listener))
    }

    /// Stop listening; connections not yet accepted are closed.
    pub fn tcp_close_listener(&self, listener: u32) -> Result<()> {
        self.with_stack(|st| st.close_listener(listener))
    }

    /// Bind UDP `port` (0: an ephemeral port) on every node address. Returns the caller's end of a
    /// `SOCK_SEQPACKET` socketpair carrying header + payload messages, and the bound port.
    pub fn udp_bind(&self, port: u16) -> Result<(OwnedFd, u16)> {
        self.with_stack(|st| st.udp_bind(port))
    }

    pub fn stats(&self) -> NetstackStats {
        let (tcp_connections, tcp_listeners, udp_sockets) = self.0.stack.lock().socket_counts();
        let c = &self.0.pipes.counters;
        NetstackStats {
            tcp_connections,
            tcp_listeners,
            udp_sockets,
            rx_packets: c.rx_packets.load(Relaxed),
            rx_bytes: c.rx_bytes.load(Relaxed),
            tx_packets: c.tx_packets.load(Relaxed),
            tx_bytes: c.tx_bytes.load(Relaxed),
            dropped_rx_queue_full: c.dropped_rx_queue_full.load(Relaxed),
            tcp_bytes_in: c.tcp_bytes_in.load(Relaxed),
            tcp_bytes_out: c.tcp_bytes_out.load(Relaxed),
            udp_datagrams_in: c.udp_datagrams_in.load(Relaxed),
            udp_datagrams_out: c.udp_datagrams_out.load(Relaxed),
            udp_dropped: c.udp_dropped.load(Relaxed),
        }
    }

    /// Queue decrypted packets for the stack: appended (copied) to the last queued batch while it has
    /// room for all of them (small batches, interactive traffic), else the whole batch is swapped in
    /// where capacities match (the caller gets an empty one back) or copied; what finds no room is
    /// dropped and counted.
    fn push_inbound(&self, batch: &mut Batch) {
        let p = &self.0.pipes;
        let mut q = p.inbound.lock();
        let was_empty = q.full.is_empty();
        let bytes: usize = batch.iter().map(<[u8]>::len).sum();
        let fits = |b: &Batch| b.packets_left() >= batch.len() && b.remaining() >= bytes;
        let mut dropped = 0;
        if q.full.back().is_some_and(fits) {
            let last = q.full.back_mut().expect("checked");
            for pk in batch.iter() {
                last.push(pk);
            }
        } else {
            match q.empty.pop() {
                Some(mut e) if e.capacity() == batch.capacity() => {
                    std::mem::swap(&mut e, batch);
                    q.full.push_back(e);
                }
                Some(mut e) => {
                    dropped += batch.iter().filter(|pk| !e.push(pk)).count();
                    q.full.push_back(e);
                }
                None => match q.full.back_mut() {
                    Some(last) => dropped += batch.iter().filter(|pk| !last.push(pk)).count(),
                    None => dropped += batch.len(),
                },
            }
        }
        drop(q);
        if dropped > 0 {
            p.counters
                .dropped_rx_queue_full
                .fetch_add(dropped as u64, Relaxed);
        }
        if was_empty {
            p.wake.signal();
        }
    }

    /// Stop the thread and close every socket and socketpair end the stack holds. Idempotent.
    fn shutdown(&self) {
        self.close_pipes();
        if let Some(t) = self.0.thread.lock().take() {
            let _ = t.join();
        }
        self.0.stack.lock().release();
    }

    fn close_pipes(&self) {
        let p = &self.0.pipes;
        p.closed.store(true, Relaxed);
        p.wake.signal();
        let _q = p.outbound.lock();
        p.out_ready.notify_all();
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "closed")
}

impl Tun for Netstack {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let p = &self.0.pipes;
        let mut q = p.outbound.lock();
        loop {
            if p.closed.load(Relaxed) {
                return Err(closed());
            }
            if q.head < q.ready.len() {
                break;
            }
            p.out_ready.wait(&mut q);
        }
        let pk = q.ready.get(q.head);
        let n = pk.len().min(buf.len());
        buf[..n].copy_from_slice(&pk[..n]);
        q.head += 1;
        let wake = q.head == q.ready.len() && std::mem::take(&mut q.want_room);
        drop(q);
        if wake {
            p.wake.signal();
        }
        Ok(n)
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        let p = &self.0.pipes;
        let mut q = p.inbound.lock();
        let was_empty = q.full.is_empty();
        let mut queued = q.full.back_mut().is_some_and(|last| last.push(packet));
        if !queued {
            if let Some(mut e) = q.empty.pop() {
                queued = e.push(packet);
                q.full.push_back(e);
            }
        }
        drop(q);
        if !queued {
            p.counters.dropped_rx_queue_full.fetch_add(1, Relaxed);
        }
        if was_empty {
            p.wake.signal();
        }
        Ok(())
    }

    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let p = &self.0.pipes;
        let mut q = p.outbound.lock();
        loop {
            if p.closed.load(Relaxed) {
                return Err(closed());
            }
            if q.head < q.ready.len() {
                break;
            }
            p.out_ready.wait(&mut q);
        }
        let n = q.ready.len() - q.head;
        if q.head == 0 && batch.is_empty() && batch.capacity() == q.ready.capacity() {
            std::mem::swap(&mut q.ready, batch);
        } else {
            for i in q.head..q.ready.len() {
                if !batch.push(q.ready.get(i)) {
                    break;
                }
            }
        }
        q.ready.clear();
        q.head = 0;
        let wake = std::mem::take(&mut q.want_room);
        drop(q);
        if wake {
            p.wake.signal();
        }
        Ok(n)
    }

    fn send_batch(&self, batch: &mut Batch, _gro: &mut GroTable) -> usize {
        if !batch.is_empty() {
            self.push_inbound(batch);
        }
        0
    }

    fn close(&self) {
        self.close_pipes();
    }

    fn release(&self) {
        self.shutdown();
    }
}
