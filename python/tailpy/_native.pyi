"""Typed stub of the Rust extension ``tailpy._native`` (crate ``rust/tailpy-py``).

Built from ``rust/tailpy-py`` over ``rust/tailpy-core``. All keys are raw 32-byte Curve25519 (X25519)
values. Errors are raised as classes of :mod:`tailpy.errors`:
``InvalidKeyError`` for a malformed key, ``PermissionDeniedError`` when creating a TUN without CAP_NET_ADMIN,
``DeviceError`` for other TUN/socket failures and unknown peers, ``ConfigError`` for a malformed address,
prefix or endpoint,
``DialError`` when a TCP connection through a userspace device's network stack cannot be opened.
"""

from typing import Literal, TypedDict

__version__: str

def generate_private_key() -> bytes:
    """A new random X25519 private key, clamped as WireGuard does (32 bytes)."""

def public_key(private_key: bytes) -> bytes:
    """The 32-byte X25519 public key of a 32-byte private key. Raises InvalidKeyError."""

class PeerStats(TypedDict):
    public_key: bytes
    allowed_ips: list[str]
    endpoint: str | None  # "ip:port" or "[ipv6]:port"
    path: Literal["direct", "relay"]
    persistent_keepalive: int | None  # seconds
    tx_bytes: int  # WireGuard datagram bytes sent (ciphertext, including overhead)
    rx_bytes: int
    tx_packets: int
    rx_packets: int
    last_handshake: float | None  # unix time, seconds
    handshakes_sent: int  # handshake initiations sent to this peer (either path)

class OffloadStats(TypedDict):
    """Which offloads the device's TUN and UDP socket use, what they fell back from, and what they did.

    TUN offloads: the TUN carries a virtio-net header (``IFF_VNET_HDR``) and hands the device TCP (TSO4/6)
    and, on Linux >= 6.2, UDP (USO4/6) super-packets of up to 64 KiB, split into packets before
    encryption; decrypted segments of one flow are coalesced (GRO) before each TUN write. UDP: runs of
    same-size datagrams to one endpoint leave as one ``sendmmsg`` message with ``UDP_SEGMENT`` (GSO), and
    the socket receives coalesced datagrams (``UDP_GRO``). Environment knobs: ``TAILPY_TUN_OFFLOAD=0``
    (plain TUN) or ``=tso`` (no USO), ``TAILPY_UDP_GSO=0``, ``TAILPY_UDP_GRO=0``."""

    tun_vnet_hdr: bool
    tun_tso: bool
    tun_uso: bool
    tun_gro: bool  # coalescing before TUN writes (off after the kernel refuses a super-packet)
    udp_gso: bool  # off after the kernel refuses a GSO send (EIO/EINVAL: no checksum offload on the route)
    udp_gro: bool
    # each fallback taken, once, in words, e.g. "udp: GSO refused (Input/output error ...), one datagram
    # per message"; empty when every offload is in use
    fallbacks: list[str]
    tun_super_packets_read: int  # TUN reads that carried a GSO super-packet
    tun_split_packets: int  # packets those were split into
    tun_split_errors: int  # packets from the TUN dropped: header or split malformed
    tun_super_packets_written: int  # coalesced TUN writes
    tun_coalesced_segments: int  # segments appended to their heads in those writes
    tun_write_errors: int  # TUN writes the kernel refused
    udp_gso_sends: int  # GSO messages sent
    udp_gso_datagrams: int  # datagrams they carried
    udp_gro_receives: int  # received slots that held coalesced datagrams
    udp_gro_datagrams: int  # datagrams they held

class FilterStats(TypedDict):
    """The packet filter on decrypted inbound packets (``rust/tailpy-core/src/filter.rs``, after Tailscale's
    ``wgengine/filter/filter.go``) and what it dropped, per reason."""

    rules: int | None  # rules in force; None when no filter is set (everything admitted)
    dropped_no_rule: int  # TCP SYN or ICMP echo request (or other non-reply ICMP) no rule admits
    dropped_not_a_reply: int  # UDP/SCTP no rule admits that is not a reply to a flow this node started
    dropped_protocol: int  # another IP protocol with no all-ports rule listing it
    dropped_malformed: int  # too short for its headers, or a suspicious fragment
    dropped_multicast: int  # to a multicast address
    dropped_link_local: int  # to a link-local address (but 169.254.169.254)
    udp_flows: int  # UDP/SCTP flows this node started whose replies pass (at most 4096, idle 120 s)

class DeviceStats(TypedDict):
    rx_datagrams: int  # UDP datagrams received on the socket
    tx_datagrams: int
    to_python: int  # STUN / disco datagrams queued for Python
    # neither WireGuard, STUN nor disco; a STUN/disco datagram over 2048 bytes (MAX_STUN_DISCO_LEN: STUN
    # stays within the path MTU, disco messages are small); or a WireGuard message of the wrong size
    dropped_malformed: int
    dropped_unknown_peer: int  # handshake initiation from an unknown key, or data for an unknown index
    dropped_decrypt: int  # WireGuard message that failed authentication/decryption
    dropped_no_route: int  # packet from the TUN whose destination no peer's allowed IPs cover
    # a queue to Python was full: STUN/disco datagrams (4096 items or 1 MiB of payload), relay datagrams
    # (4096 items or 4 MiB)
    dropped_queue_full: int
    dropped_not_allowed: int  # decrypted packet whose inner source is not in the sending peer's allowed IPs
    dropped_no_endpoint: int  # datagram for a direct-path peer that has no endpoint yet
    dropped_send_error: int  # the UDP socket refused a datagram (e.g. network unreachable)
    handshakes_sent: int  # handshake initiations sent (including those counted below)
    # handshakes initiated because a peer sent data for a session this device doesn't have (it kept one with
    # this device's previous run, e.g. across a daemon restart), from the peer's current endpoint or over
    # DERP from it, while we had no session with it; at most one per peer per 5 s (REKEY_TIMEOUT)
    handshakes_for_unknown_index: int
    filter: FilterStats
    handshakes_retried: int  # pending handshakes sent again at once by retry_handshake
    offload: OffloadStats

class NetstackStats(TypedDict):
    """A userspace device's network stack (``Device.userspace``): its sockets and counters."""

    tcp_connections: int  # TCP connections whose socketpair end is open (dialled or accepted)
    tcp_listeners: int
    udp_sockets: int
    rx_packets: int  # IP packets the device decrypted (and the packet filter admitted) into the stack
    rx_bytes: int
    tx_packets: int  # IP packets the stack emitted for the device to encrypt
    tx_bytes: int
    # decrypted packets dropped because the stack's inbound queue (4 batches of up to 1 MiB / 1024
    # packets) was full; TCP retransmits them
    dropped_rx_queue_full: int
    tcp_bytes_in: int  # TCP payload bytes from the tailnet written to socketpair ends
    tcp_bytes_out: int  # TCP payload bytes read from socketpair ends and sent to the tailnet
    udp_datagrams_in: int
    udp_datagrams_out: int
    # UDP messages dropped: a malformed header (see ``Device.udp_bind``), an address the stack cannot
    # send to, or a datagram the socketpair refused (larger than its buffer)
    udp_dropped: int

class Device:
    """One node's data plane: a TUN interface (or, made by ``Device.userspace``, a userspace TCP/IP
    stack), one UDP socket (IPv4 and IPv6), and a table of peers.

    The packet loop runs on Rust threads with the GIL released; timers are driven every ~250 ms.

    A userspace device terminates TCP and UDP for its tailnet addresses in the process (smoltcp, on one
    Rust thread): each connection and bound UDP port is handed out as one end of a Unix ``socketpair``
    (libtailscale's choice), a plain file descriptor that asyncio (``asyncio.open_connection(sock=...)``,
    ``loop.add_reader``) and any other code can use as a socket, with no Python per packet. The caller
    owns each descriptor it receives and closes it; ``close()`` closes the stack's ends, so the caller's
    ends then read end-of-stream. WireGuard, paths, relay (DERP) and the packet filter work as with a TUN.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        tun_name: str = "tailpy0",
        listen_port: int = 0,
        mtu: int = 1280,
    ) -> None:
        """Create the TUN ``tun_name`` with its MTU set (576..65535) but the link left down and unaddressed
        (Python brings it up, sets addresses and routes), and bind UDP ``[::]:listen_port`` dual-stack
        (0 picks a free port; IPv4-only ``0.0.0.0`` where the kernel has no IPv6). Raises
        PermissionDeniedError without CAP_NET_ADMIN, DeviceError if the name or port is taken,
        InvalidKeyError for a bad key, ConfigError for a bad name, port or MTU."""
    @staticmethod
    def userspace(private_key: bytes, listen_port: int, addresses: list[str], mtu: int = 1280) -> Device:
        """A device without a TUN, needing no privilege: a userspace TCP/IP stack for ``addresses``
        (the node's tailnet addresses as CIDR host prefixes, at most one IPv4 and one IPv6, e.g.
        ``["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]``), and UDP ``[::]:listen_port`` (0 picks a free
        port). ``mtu`` (576..65535 bytes) is the tunnel's; TCP's MSS follows from it. ``tun_name`` is
        ``"userspace-networking"``. Raises InvalidKeyError for a bad key, ConfigError for a bad address,
        port or MTU, DeviceError if the port is taken."""
    def set_addresses(self, addresses: list[str]) -> None:
        """Replace the node's addresses (as for ``userspace``; after a key or address change from
        control). Connections on a removed address stay until they fail. Raises ConfigError, and
        DeviceError on a TUN device or after ``close``."""
    def tcp_dial(self, dst_ip: str, dst_port: int, timeout: float) -> int:
        """Open a TCP connection to ``dst_ip``:``dst_port`` (a tailnet IP, v4 or v6) through the stack,
        blocking with the GIL released until the handshake completes (call it from an executor in
        asyncio), at most ``timeout`` seconds. Returns a file descriptor: the caller's end of an
        ``AF_UNIX`` ``SOCK_STREAM`` socketpair, blocking (the caller sets it non-blocking), owned by the
        caller. Shutting down its writing half sends FIN; closing it closes the connection (RST if data
        still arrives). A reset from the peer reads as end-of-stream.

        Raises DialError (one sentence) when no peer's allowed IPs contain ``dst_ip`` (at once), the node
        has no address of that family, the peer refuses (TCP RST: nothing listens on the port), or no
        answer comes within ``timeout``; ConfigError for a malformed IP, port 0 or a timeout that is not
        positive; DeviceError on a TUN device or after ``close``."""
    def tcp_listen(self, port: int, backlog: int = 128) -> int:
        """Listen on TCP ``port`` (1-65535) of every node address; returns a listener id. Up to
        ``backlog`` (1-4096) connections wait (handshake done) to be taken with ``tcp_accept``; while
        that many wait, further connection attempts are refused with a reset. Raises DeviceError if the
        port already listens, ConfigError for a bad port or backlog."""
    def tcp_accept_fd(self, listener: int) -> int:
        """An eventfd, readable while connections wait on ``listener`` (for ``loop.add_reader``); owned by
        the device (do not close it; it closes with ``tcp_close_listener``). Raises DeviceError for an
        unknown listener."""
    def tcp_accept(self, listener: int) -> tuple[int, str, int] | None:
        """Never blocks: ``(fd, remote_ip, remote_port)`` of the next waiting connection, or None if none
        waits. ``fd`` is as ``tcp_dial``'s. Raises DeviceError for an unknown listener."""
    def tcp_close_listener(self, listener: int) -> None:
        """Stop listening; connections not yet accepted are closed. Raises DeviceError for an unknown
        listener."""
    def udp_bind(self, port: int) -> int:
        """Bind UDP ``port`` (0: an ephemeral port, 49152-65535) on every node address. Returns the
        caller's end of an ``AF_UNIX`` ``SOCK_SEQPACKET`` socketpair (blocking, owned by the caller;
        closing it unbinds the port). Each message, both ways, is a 19-byte header then the payload: 1 byte
        family (4 or 6), 16 bytes IP (IPv4 in the first 4), 2 bytes port (big-endian); sending, the
        destination; receiving, the source. A payload must fit one tunnel packet (at most ``mtu`` - 28
        bytes over IPv4, ``mtu`` - 48 over IPv6: the stack does not fragment); malformed or oversized
        messages are dropped and counted (``udp_dropped``). Raises DeviceError if the port is bound,
        ConfigError for a bad port."""
    def netstack_stats(self) -> NetstackStats:
        """The stack's sockets and counters. Raises DeviceError on a TUN device or after ``close``."""
    @property
    def public_key(self) -> bytes: ...
    @property
    def tun_name(self) -> str: ...
    @property
    def listen_port(self) -> int: ...
    def set_fwmark(self, mark: int) -> None:
        """Mark every datagram the device's UDP socket sends (WireGuard, STUN, disco) with fwmark ``mark``
        (``SO_MARK``, socket(7); 0 clears), so policy routing keeps it out of the tunnel
        (:data:`tailpy.daemon.router.BYPASS_MARK`). Needs CAP_NET_ADMIN: PermissionDeniedError without;
        ConfigError for a mark outside 0..0xffffffff; DeviceError once closed."""
    def set_private_key(self, private_key: bytes) -> None:
        """Replace the device's private key (node key rotation); existing sessions are dropped."""
    def set_peer(
        self,
        public_key: bytes,
        *,
        allowed_ips: list[str],
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key: bytes | None = None,
    ) -> None:
        """Add a peer or update it in place (sessions are kept when only allowed IPs, endpoint or keepalive
        change; a preshared key given again starts a new session). ``allowed_ips`` are CIDR prefixes
        (IPv4 or IPv6; host bits are cleared, a bare address means /32 or /128) and replace the peer's
        previous ones; a prefix another peer holds moves to this one, as in WireGuard. ``endpoint`` is
        "ip:port" or "[ipv6]:port"; None keeps the current one (set earlier, or learned from the peer's
        authenticated datagrams: roaming). ``persistent_keepalive`` in seconds (None or 0 = off).
        Raises InvalidKeyError (wrong length, all-zero or low-order key, or the device's own key),
        ConfigError (malformed prefix, endpoint or keepalive)."""
    def set_filter(self, rules: list[tuple[list[str], list[tuple[str, int, int]], list[int]]] | None) -> None:
        """Set the packet filter on decrypted inbound packets, or none (None: everything admitted). Each rule
        is ``(src_ips, dst_ports, ip_protos)`` as tailcfg.FilterRule has them: ``src_ips`` entries are
        ``"*"``, an address, a CIDR prefix or a range ``"first-last"``; ``dst_ports`` are ``(ip, first_port,
        last_port)`` with ``ip`` of the same forms; ``ip_protos`` IANA numbers (empty: TCP, UDP, ICMP,
        ICMPv6). The stateful part is the device's: TCP segments other than a connection-opening SYN pass,
        UDP/SCTP replies to flows this node started pass, ICMP echo replies and errors pass, ICMP echo
        requests pass when the source may reach any port of the destination, other protocols only through
        all-ports rules listing them; outbound packets are never filtered. The rules are compiled first and
        swapped in whole. Raises ConfigError for a malformed address or port range (the filter in force
        stays), OverflowError/TypeError for values out of range (ports 0-65535, protocols 0-255)."""
    def remove_peer(self, public_key: bytes) -> bool:
        """Remove a peer; True if it existed. Packets in flight for it are dropped and counted."""
    def set_path(
        self, public_key: bytes, path: Literal["direct", "relay"], *, confirmed: bool = True
    ) -> None:
        """Choose how a peer's encrypted datagrams leave: "direct" to its endpoint over UDP, or "relay",
        where they are queued for Python (see ``drain``) to send over DERP. On the direct path,
        ``confirmed=False`` (an endpoint nothing has answered on yet) also queues the peer's handshake
        messages for DERP, as Tailscale sends over DERP until a direct path is confirmed; a handshake
        response to an initiation injected from DERP is always queued for DERP too. Raises DeviceError for
        an unknown peer."""
    def retry_handshake(self, public_key: bytes) -> bool:
        """Send a pending handshake again at once on the peer's current path: when an initiation went to
        the peer within the last 90 s (REKEY_ATTEMPT_TIME) and no session exists, a new one is sent now
        (boringtun ``format_handshake_initiation(force_resend=True)``) rather than after REKEY_TIMEOUT
        (5 s); packets queued behind it follow once it completes. Call it when the peer's path is
        confirmed or changes. True if one was sent. Raises DeviceError for an unknown peer or a closed
        device."""
    def inject(self, public_key: bytes, datagram: bytes) -> None:
        """Process a WireGuard datagram as if received from ``public_key`` (a DERP RecvPacket payload).
        Replies it causes (handshake responses) go out on the peer's current path. A datagram that turns
        out to belong to another peer is dropped and counted. Raises DeviceError for an unknown peer."""
    def send_datagram(self, data: bytes, endpoint: str) -> None:
        """Send one UDP datagram (STUN, disco) from the device's socket to "ip:port"."""
    def fileno(self) -> int:
        """An eventfd that becomes readable when ``drain`` has something; for ``loop.add_reader``."""
    def drain(self, max_items: int = 1024) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, bytes]]]:
        """Take queued items and reset the eventfd: (datagrams, relay) where datagrams are
        ``(payload, "ip:port")`` of STUN/disco received on the socket, and relay are
        ``(peer_public_key, wireguard_datagram)`` to be sent over DERP. Never blocks.

        Both queues are bounded, and what arrives while one is full is dropped and counted in
        ``dropped_queue_full``: STUN/disco datagrams (unauthenticated, anyone can send them) at 4096 items
        or 1 MiB of payload, and only datagrams of at most 2048 bytes are queued at all (longer ones count
        as ``dropped_malformed``); relay datagrams at 4096 items or 4 MiB. Drain promptly whenever
        ``fileno()`` is readable."""
    def peers(self) -> list[PeerStats]: ...
    def stats(self) -> DeviceStats: ...
    def close(self) -> None:
        """Stop the threads, close the socket and remove the TUN (a userspace device: close every stack
        socket, listener and the stack's socketpair ends). Idempotent; afterwards ``set_peer``,
        ``inject``, ``send_datagram`` and the stack's methods raise DeviceError."""
