//! In-memory `Tun` and `Udp` for tests: a TUN is a pair of channels, UDP sockets live on a `MemNet`
//! that routes datagrams by address (and can move a socket to a new address, to test roaming). Batched
//! reads take everything already queued (up to the batch's room), as the Linux transports do.

use crate::batch::{Batch, RecvBatch, RecvMeta};
use crate::io::{Tun, Udp};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(20);

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "closed")
}

/// The device side of an in-memory TUN.
pub struct MemTun {
    outbound: Mutex<Receiver<Vec<u8>>>,
    delivered: Mutex<Sender<Vec<u8>>>,
    closed: AtomicBool,
}

/// The host side of an in-memory TUN: `write` as if an application sent a packet, `read` what the device
/// delivered to the host.
pub struct MemTunHost {
    outbound: Sender<Vec<u8>>,
    delivered: Receiver<Vec<u8>>,
}

impl MemTun {
    pub fn pair() -> (MemTun, MemTunHost) {
        let (out_tx, out_rx) = channel();
        let (del_tx, del_rx) = channel();
        (
            MemTun {
                outbound: Mutex::new(out_rx),
                delivered: Mutex::new(del_tx),
                closed: AtomicBool::new(false),
            },
            MemTunHost {
                outbound: out_tx,
                delivered: del_rx,
            },
        )
    }
}

impl MemTunHost {
    pub fn write(&self, packet: &[u8]) {
        let _ = self.outbound.send(packet.to_vec());
    }

    /// The next packet delivered to the host, waiting up to `timeout`.
    pub fn read(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.delivered.recv_timeout(timeout).ok()
    }
}

impl Tun for MemTun {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let rx = self.outbound.lock();
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return Err(closed());
            }
            match rx.recv_timeout(POLL) {
                Ok(p) => {
                    let n = p.len().min(buf.len());
                    buf[..n].copy_from_slice(&p[..n]);
                    return Ok(n);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(closed()),
            }
        }
    }

    fn send(&self, packet: &[u8]) -> io::Result<()> {
        let _ = self.delivered.lock().send(packet.to_vec());
        Ok(())
    }

    fn recv_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let n = self.recv(batch.spare())?;
        batch.commit(n);
        let rx = self.outbound.lock();
        let mut added = 1;
        // Only while any packet fits, so that none is taken and then dropped.
        while !batch.is_full() && batch.remaining() >= crate::io::MAX_READ {
            let Ok(p) = rx.try_recv() else { break };
            batch.push(&p);
            added += 1;
        }
        Ok(added)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

type Datagram = (Vec<u8>, SocketAddr);

/// A network of in-memory UDP sockets.
#[derive(Clone, Default)]
pub struct MemNet {
    sockets: Arc<Mutex<HashMap<SocketAddr, Sender<Datagram>>>>,
}

impl MemNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// A socket at `addr` on this network.
    pub fn bind(&self, addr: SocketAddr) -> MemUdp {
        let (tx, rx) = channel();
        self.sockets.lock().insert(addr, tx.clone());
        MemUdp {
            net: self.clone(),
            addr: Mutex::new(addr),
            tx,
            rx: Mutex::new(rx),
            closed: AtomicBool::new(false),
        }
    }
}

/// One in-memory UDP socket.
pub struct MemUdp {
    net: MemNet,
    addr: Mutex<SocketAddr>,
    tx: Sender<Datagram>,
    rx: Mutex<Receiver<Datagram>>,
    closed: AtomicBool,
}

impl MemUdp {
    /// Move this socket to a new address (a NAT rebinding, a laptop changing networks).
    pub fn rebind(&self, addr: SocketAddr) {
        let mut cur = self.addr.lock();
        let mut socks = self.net.sockets.lock();
        socks.remove(&*cur);
        socks.insert(addr, self.tx.clone());
        *cur = addr;
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock()
    }

    /// Receive one datagram, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Datagram> {
        self.rx.lock().recv_timeout(timeout).ok()
    }
}

impl Udp for MemUdp {
    fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let rx = self.rx.lock();
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return Err(closed());
            }
            match rx.recv_timeout(POLL) {
                Ok((d, from)) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    return Ok((n, from));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(closed()),
            }
        }
    }

    fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.clear();
        let (n, from) = self.recv_from(batch.slot_mut(0))?;
        batch.push_meta(RecvMeta {
            len: n,
            stride: n,
            from,
        });
        let rx = self.rx.lock();
        while batch.len() < batch.slots() {
            let Ok((d, from)) = rx.try_recv() else { break };
            let i = batch.len();
            let slot = batch.slot_mut(i);
            let n = d.len().min(slot.len());
            slot[..n].copy_from_slice(&d[..n]);
            batch.push_meta(RecvMeta {
                len: n,
                stride: n,
                from,
            });
        }
        Ok(batch.len())
    }

    fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        let from = self.addr();
        let dest = self.net.sockets.lock().get(&to).cloned();
        if let Some(dest) = dest {
            let _ = dest.send((data.to_vec(), from));
        }
        Ok(())
    }

    fn local_port(&self) -> u16 {
        self.addr().port()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}
