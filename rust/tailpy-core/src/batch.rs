//! Caller-owned packet batches: the buffers that carry packets between the transports (`io`) and the
//! device's threads, allocated once per thread and reused for every batch.
//!
//! * `Batch`: packets laid end to end in one buffer (an arena), each an `(offset, len)` entry. Packets
//!   that follow each other in the buffer can leave in one UDP GSO send (the kernel wants the segments
//!   contiguous) or one gathered TUN write (`writev`), so neither the split nor the coalescing copies
//!   more than once.
//! * `RecvBatch`: fixed-size slots for `recvmmsg`, each with its length, source and GRO stride.

use std::net::{Ipv4Addr, SocketAddr};

/// Packets end to end in one buffer. `spare()` is the free room after the last entry; a producer writes
/// there and `commit`s what it wrote.
pub struct Batch {
    buf: Box<[u8]>,
    pkts: Vec<(usize, usize)>,
    used: usize,
    max_packets: usize,
}

impl Batch {
    /// A batch of `bytes` bytes holding at most `max_packets` packets.
    pub fn new(bytes: usize, max_packets: usize) -> Self {
        Batch {
            buf: vec![0u8; bytes].into_boxed_slice(),
            pkts: Vec::with_capacity(max_packets),
            used: 0,
            max_packets,
        }
    }

    /// Forget every packet (the buffer is kept).
    pub fn clear(&mut self) {
        self.pkts.clear();
        self.used = 0;
    }

    pub fn len(&self) -> usize {
        self.pkts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    /// True when no further packet may be added (by count).
    pub fn is_full(&self) -> bool {
        self.pkts.len() >= self.max_packets
    }

    /// How many more packets may be added (by count).
    pub fn packets_left(&self) -> usize {
        self.max_packets.saturating_sub(self.pkts.len())
    }

    /// Bytes and packets this batch holds at most; batches of equal capacity may be swapped.
    pub fn capacity(&self) -> (usize, usize) {
        (self.buf.len(), self.max_packets)
    }

    /// Free bytes after the last packet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.used
    }

    /// True if a packet of `len` bytes still fits (by count and by bytes).
    pub fn has_room(&self, len: usize) -> bool {
        !self.is_full() && self.remaining() >= len
    }

    /// The free room after the last packet, for a producer to write the next packet into.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Offset of `spare()` in the buffer.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Make the first `len` bytes of `spare()` the next packet. `len` is clamped to the room left.
    pub fn commit(&mut self, len: usize) {
        let len = len.min(self.remaining());
        self.pkts.push((self.used, len));
        self.used += len;
    }

    /// Record a packet at `offset..offset + len` of the whole buffer, written there through
    /// `raw_mut` (e.g. after a scratch area), and move the free room past it.
    pub fn commit_at(&mut self, offset: usize, len: usize) {
        let end = (offset + len).min(self.buf.len());
        self.pkts.push((offset.min(end), end - offset.min(end)));
        self.used = self.used.max(end);
    }

    /// Copy `packet` in as the next packet; false (and nothing added) if it doesn't fit.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if !self.has_room(packet.len()) {
            return false;
        }
        self.buf[self.used..self.used + packet.len()].copy_from_slice(packet);
        self.commit(packet.len());
        true
    }

    /// Packet `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        let (o, l) = self.pkts[i];
        &self.buf[o..o + l]
    }

    /// Packet `i`, writable (header fix-ups in place).
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let (o, l) = self.pkts[i];
        &mut self.buf[o..o + l]
    }

    /// `(offset, len)` of packet `i` in the buffer.
    pub fn entry(&self, i: usize) -> (usize, usize) {
        self.pkts[i]
    }

    /// The whole buffer (packets are at their `entry` offsets).
    pub fn raw(&self) -> &[u8] {
        &self.buf
    }

    /// The whole buffer, writable.
    pub fn raw_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The packets in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.pkts.iter().map(|&(o, l)| &self.buf[o..o + l])
    }
}

/// What one received slot holds: `len` bytes from `from`, made of datagrams of `stride` bytes each (the
/// last may be shorter) when the kernel coalesced them (UDP GRO); `stride == len` otherwise.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    pub len: usize,
    pub stride: usize,
    pub from: SocketAddr,
}

/// Fixed-size receive slots for a batched `recvmmsg`.
pub struct RecvBatch {
    buf: Box<[u8]>,
    slot: usize,
    meta: Vec<RecvMeta>,
}

impl RecvBatch {
    /// `slots` slots of `slot_len` bytes each.
    pub fn new(slots: usize, slot_len: usize) -> Self {
        RecvBatch {
            buf: vec![0u8; slots * slot_len].into_boxed_slice(),
            slot: slot_len,
            meta: Vec::with_capacity(slots),
        }
    }

    pub fn slots(&self) -> usize {
        self.buf.len() / self.slot.max(1)
    }

    pub fn slot_len(&self) -> usize {
        self.slot
    }

    /// Slot `i`, whole, for a receiver to fill.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.slot..(i + 1) * self.slot]
    }

    /// All slots, for a receiver that hands them to the kernel at once.
    pub fn slots_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    pub fn clear(&mut self) {
        self.meta.clear();
    }

    /// Record what slot `len()` (the next one) received.
    pub fn push_meta(&mut self, meta: RecvMeta) {
        if self.meta.len() < self.slots() {
            self.meta.push(meta);
        }
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    pub fn meta(&self, i: usize) -> RecvMeta {
        self.meta[i]
    }

    /// The bytes received in slot `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        let m = &self.meta[i];
        &self.buf[i * self.slot..i * self.slot + m.len.min(self.slot)]
    }

    /// The datagrams of slot `i`, cut at its stride (an empty datagram is one empty slice).
    pub fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let stride = self.meta[i].stride.max(1);
        let data = self.get(i);
        let empty = data.is_empty().then_some(data);
        data.chunks(stride).chain(empty)
    }
}

impl Default for RecvMeta {
    fn default() -> Self {
        RecvMeta {
            len: 0,
            stride: 0,
            from: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_keeps_packets_end_to_end() {
        let mut b = Batch::new(100, 3);
        assert!(b.push(b"abc"));
        b.spare()[..2].copy_from_slice(b"de");
        b.commit(2);
        assert_eq!(b.get(0), b"abc");
        assert_eq!(b.get(1), b"de");
        assert_eq!(b.entry(1), (3, 2));
        assert!(b.push(b"f"));
        assert!(b.is_full());
        assert!(!b.push(b"g"));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![&b"abc"[..], b"de", b"f"]);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.remaining(), 100);
        assert!(!b.push(&[0; 101]));
    }

    #[test]
    fn recv_slots_split_at_stride() {
        let mut r = RecvBatch::new(2, 10);
        r.slot_mut(1)[..7].copy_from_slice(b"aaabbbc");
        r.push_meta(RecvMeta::default());
        r.push_meta(RecvMeta {
            len: 7,
            stride: 3,
            ..Default::default()
        });
        assert_eq!(
            r.datagrams(1).collect::<Vec<_>>(),
            vec![&b"aaa"[..], b"bbb", b"c"]
        );
        assert_eq!(r.datagrams(0).collect::<Vec<_>>(), vec![&b""[..]]);
    }
}
