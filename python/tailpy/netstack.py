"""asyncio sockets on a userspace data plane: TCP streams, TCP servers and UDP endpoints on the tailnet.

A userspace device (``tailpy._native.Device.userspace``) terminates TCP and UDP for the node's tailnet
addresses inside the process (smoltcp, ``rust/tailpy-core/src/netstack/``): no TUN, no root. Each of its
sockets is bridged to one end of a ``socketpair``; the other end comes to Python as a plain file
descriptor, as libtailscale hands out its connections (``tailscale_dial`` / ``tailscale_accept``). So asyncio
sees an ordinary ``AF_UNIX`` socket and no Python runs per packet:

* a TCP connection: a ``SOCK_STREAM`` end; closing it (or ``shutdown(SHUT_WR)``) sends the stack's FIN;
* a TCP listener: an id, an fd that is readable while connections wait in its backlog
  (``tcp_accept_fd``), and ``tcp_accept`` taking the next one;
* a UDP socket: a ``SOCK_SEQPACKET`` / ``SOCK_DGRAM`` end carrying one message per datagram, a 19-byte
  header (:func:`encode_datagram`) before the payload: the destination on send, the source on receive.

:class:`Netstack` turns these into the asyncio API (``open_connection`` and ``start_server`` as
:mod:`asyncio.streams`, ``create_server`` and ``create_datagram_endpoint`` as the event loop's methods),
resolving names with a caller-given function (the node's netmap: :func:`lookup`). Connections report the
tailnet addresses as ``get_extra_info("peername")`` / ``("sockname")``, not the socketpair's.

Blocking calls (``tcp_dial`` waits for the TCP handshake with the GIL released) run on a thread of their
own that ends with the call, so a closed :class:`Netstack` leaves no thread behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from tailpy import netmap as nm
from tailpy.errors import DialError, ParseError, TailpyError

log = logging.getLogger("tailpy.netstack")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Address = tuple[str, int]

DIAL_TIMEOUT = 30.0
"""Seconds :meth:`Netstack.open_connection` waits for the TCP handshake by default."""
DATAGRAM_HEADER = 19
"""Bytes before each UDP payload on a datagram fd: family (1), address (16), port (2, big-endian)."""
MAX_DATAGRAM = 65535
"""Largest UDP payload, bytes."""
MAX_UDP_IPV4 = 16384 - 28
"""Largest UDP payload to or from an IPv4 tailnet address, bytes: the userspace stack fragments and
reassembles IPv4 packets of up to 16384 bytes (tailpy-core's ``IPV4_MAX_PACKET``; RFC 791 §2.3), less the
IPv4 and UDP headers."""
UDP_IPV6_OVERHEAD = 48
"""Bytes of the IPv6 and UDP headers: an IPv6 UDP payload must fit one packet of the MTU (the userspace
stack, smoltcp 0.14, does not fragment IPv6)."""


def max_udp_payload(ip: IPAddress, mtu: int) -> int:
    """Largest UDP payload (bytes) the userspace stack sends to ``ip`` on a node of ``mtu`` bytes."""
    return MAX_UDP_IPV4 if ip.version == 4 else mtu - UDP_IPV6_OVERHEAD


STREAM_LIMIT = 2**16
"""Default buffer limit of a StreamReader, bytes (as :func:`asyncio.open_connection`)."""

T = TypeVar("T")
P = TypeVar("P", bound=asyncio.BaseProtocol)


class UserspaceDevice(Protocol):
    """What :class:`Netstack` needs of ``tailpy._native.Device.userspace(...)`` (a Protocol, so tests can
    pass their own)."""

    def tcp_dial(self, dst_ip: str, dst_port: int, timeout: float) -> int: ...
    def tcp_listen(self, port: int, backlog: int = 128) -> int: ...
    def tcp_accept_fd(self, listener: int) -> int: ...
    def tcp_accept(self, listener: int) -> tuple[int, str, int] | None: ...
    def tcp_close_listener(self, listener: int) -> None: ...
    def udp_bind(self, port: int) -> int | tuple[int, int]: ...


Resolve = Callable[[str], list[IPAddress]]
"""A name or IP literal -> its tailnet addresses (IPv4 first). Raises DialError(reason="no-name")."""


# -- the datagram header ---------------------------------------------------------------------------------


def encode_datagram(ip: IPAddress, port: int, payload: bytes) -> bytes:
    """One message for a datagram fd: family (4 or 6), the address in 16 bytes (IPv4 in the first 4, the
    rest zero), the port big-endian, then ``payload``. Raises ParseError for a port outside 0-65535 or a
    payload over :data:`MAX_DATAGRAM` bytes."""
    if not 0 <= port <= 0xFFFF:
        raise ParseError(f"UDP port {port} is outside 0-65535")
    if len(payload) > MAX_DATAGRAM:
        raise ParseError(f"a UDP payload of {len(payload)} bytes is over {MAX_DATAGRAM}")
    return struct.pack("!B16sH", ip.version, ip.packed.ljust(16, b"\0"), port) + payload


def decode_datagram(message: bytes) -> tuple[bytes, IPAddress, int]:
    """(payload, address, port) of one message from a datagram fd (:func:`encode_datagram`'s form).
    Raises ParseError for a short message or a family that is neither 4 nor 6."""
    if len(message) < DATAGRAM_HEADER:
        raise ParseError(f"a datagram message of {len(message)} bytes is shorter than its header")
    family, raw, port = struct.unpack_from("!B16sH", message)
    ip: IPAddress
    if family == 4:
        ip = ipaddress.IPv4Address(raw[:4])
    elif family == 6:
        ip = ipaddress.IPv6Address(raw)
    else:
        raise ParseError(f"a datagram message has address family {family}, not 4 or 6")
    return message[DATAGRAM_HEADER:], ip, port


# -- names -------------------------------------------------------------------------------------------------


def lookup(netmap: nm.NetMap | None, host: str) -> list[IPAddress]:
    """The tailnet addresses of ``host`` as MagicDNS answers them from ``netmap``, IPv4 first: an IP literal
    as is; a node's name ("beta"), its FQDN ("beta.tail.example", a final dot allowed) or its OS hostname;
    an extra record of the tailnet's DNS configuration. Names are case-insensitive. Raises DialError
    (reason "no-name") when nothing matches or there is no netmap yet."""
    want = host.strip().rstrip(".").lower()
    try:
        return [ipaddress.ip_address(want.strip("[]"))]
    except ValueError:
        pass
    if netmap is None:
        raise DialError(f"cannot resolve {host!r}: this node has no netmap yet", "no-name")
    domain = netmap.domain.lower()
    nodes = (netmap.self_node, *sorted(netmap.peers.values(), key=lambda n: n.id))
    found: list[IPAddress] = []
    for node in nodes:
        if want in (node.name.lower(), node.fqdn(domain).rstrip(".").lower()):
            found = _addresses(node.addresses)
            break
    if not found and netmap.dns is not None:
        found = [
            ipaddress.ip_address(r.value)
            for r in netmap.dns.extra_records
            if r.name.rstrip(".").lower() == want
        ]
    if not found:
        for node in nodes:
            if node.hostname.lower() == want:
                found = _addresses(node.addresses)
                break
    if not found:
        raise DialError(f"no node {host!r} in this tailnet (see `tailpy status`)", "no-name")
    return sorted(found, key=lambda ip: ip.version)


def check_peer(netmap: nm.NetMap | None, ip: IPAddress) -> None:
    """Raise DialError (reason "unreachable") when ``ip`` is an address of a peer in ``netmap`` whose node
    key has expired (or that logged out): the data plane drops such peers, so without this a dial would
    only learn that no peer's allowed IPs contain ``ip``. Anything else passes."""
    if netmap is None:
        return
    for peer in netmap.peers.values():
        if peer.expired and ip in _addresses(peer.addresses):
            raise DialError(
                f"cannot reach {ip}: peer {peer.name}'s key has expired (it must log in again)", "unreachable"
            )


def _addresses(prefixes: Iterable[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for a in prefixes:
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_interface(a).ip)
    return out


def _dial_error(e: BaseException, ip: IPAddress, port: int) -> DialError:
    """The data plane's refusal or timeout as a DialError with a reason."""
    if isinstance(e, DialError) and e.reason != "unreachable":
        return e
    text = str(e) or type(e).__name__
    low = text.lower()
    if isinstance(e, ConnectionRefusedError) or "refused" in low or "reset" in low:
        reason = "refused"
    elif isinstance(e, TimeoutError) or "timed out" in low or "timeout" in low:
        reason = "timeout"
    else:
        reason = "unreachable"
    if isinstance(e, DialError):  # the data plane's own sentence names the address already
        return DialError(text, reason)
    return DialError(f"cannot connect to {_hostport(ip, port)}: {text}", reason)


def _hostport(ip: IPAddress | str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"


# -- sockets that report tailnet addresses ------------------------------------------------------------------


class _TailnetSocket(socket.socket):
    """A socketpair end that answers ``getpeername``/``getsockname`` with the tailnet addresses of the
    connection it carries (asyncio's transports read them once, into ``get_extra_info``)."""

    def __init__(self, fd: int, peer: Address, local: Address) -> None:
        super().__init__(fileno=fd)
        self.peer, self.local = peer, local

    def getpeername(self) -> Any:
        return self.peer

    def getsockname(self) -> Any:
        return self.local


def _sock(fd: int, peer: Address, local: Address) -> socket.socket:
    try:
        sock = _TailnetSocket(fd, peer, local)
    except OSError:
        with contextlib.suppress(OSError):
            socket.close(fd)
        raise
    sock.setblocking(False)
    return sock


# -- the stack ---------------------------------------------------------------------------------------------


class Netstack:
    """asyncio sockets on the userspace device ``device()`` returns (None: the node has no data plane now,
    and every call raises DialError). ``resolve`` maps names to tailnet addresses (:func:`lookup` over the
    node's netmap); ``local_ip()`` is the node's own address reported as ``sockname``; ``check(ip)`` raises
    DialError before a dial to ``ip`` that cannot work (:func:`check_peer`: an expired peer); ``mtu``: the
    node's MTU, bytes (it bounds IPv6 UDP payloads: :func:`max_udp_payload`).

    Used inside one running event loop; :meth:`close` closes every server, endpoint and connection made here
    and waits for the dial threads to end."""

    def __init__(
        self,
        device: Callable[[], UserspaceDevice | None],
        resolve: Resolve,
        local_ip: Callable[[int], str] = lambda version: "0.0.0.0" if version == 4 else "::",
        check: Callable[[IPAddress], None] = lambda ip: None,
        mtu: int = 1280,
    ) -> None:
        self._device = device
        self._resolve = resolve
        self._check = check
        self.mtu = mtu
        self._local_ip = local_ip
        self._servers: set[TailnetServer] = set()
        self._datagrams: set[TailnetDatagramTransport] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def device(self) -> UserspaceDevice:
        dev = None if self._closed else self._device()
        if dev is None:
            raise DialError("this node is not running (no data plane): start it first", "unreachable")
        return dev

    def resolve(self, host: str) -> list[IPAddress]:
        """``host``'s tailnet addresses, IPv4 first (DialError when there are none)."""
        return self._resolve(host)

    async def _blocking(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread of its own (ending with the call), awaited."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def done(result: T | None, error: BaseException | None) -> None:
            if fut.done():
                if error is None and isinstance(result, int):  # a late fd nobody waits for
                    with contextlib.suppress(OSError):
                        socket.close(result)
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            try:
                result = fn()
            except BaseException as e:  # handed to the awaiting task
                loop.call_soon_threadsafe(done, None, e)
            else:
                try:
                    loop.call_soon_threadsafe(done, result, None)
                except RuntimeError:  # the loop closed meanwhile
                    if isinstance(result, int):
                        socket.close(result)
            finally:
                self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name="tailpy-dial", daemon=True)
        self._threads.add(t)
        t.start()
        return await fut

    # -- TCP out -------------------------------------------------------------------------------------------

    async def dial(self, host: str, port: int, *, timeout: float = DIAL_TIMEOUT) -> socket.socket:
        """A connected, non-blocking socket to ``host``:``port`` over the tailnet (each of ``host``'s
        addresses in turn, IPv4 first). Raises DialError (no such name, refused, timed out)."""
        if not 0 < port <= 0xFFFF:
            raise DialError(f"port {port} is outside 1-65535", "unreachable")
        last: DialError | None = None
        for ip in self.resolve(host):
            dev = self.device()
            try:
                self._check(ip)
                fd = await self._blocking(functools.partial(dev.tcp_dial, str(ip), port, timeout))
            except (TailpyError, OSError) as e:
                last = _dial_error(e, ip, port)
                continue
            return _sock(fd, (str(ip), port), (self._local_ip(ip.version), 0))
        assert last is not None
        raise last

    async def open_connection(
        self, host: str, port: int, *, timeout: float = DIAL_TIMEOUT, limit: int = STREAM_LIMIT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``(reader, writer)`` of a TCP connection to ``host``:``port``, as :func:`asyncio.open_connection`.
        ``host`` is a tailnet name or address (:func:`lookup`); ``timeout``: seconds for the handshake.
        Raises DialError."""
        sock = await self.dial(host, port, timeout=timeout)
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        self._track(writer.transport)
        return reader, writer

    async def create_connection(
        self, protocol_factory: Callable[[], P], host: str, port: int, *, timeout: float = DIAL_TIMEOUT
    ) -> tuple[asyncio.Transport, P]:
        """A TCP connection with a protocol, as ``loop.create_connection``. Raises DialError."""
        sock = await self.dial(host, port, timeout=timeout)
        try:
            transport, protocol = await asyncio.get_running_loop().create_connection(
                protocol_factory, sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self._track(transport)
        return transport, protocol

    def _track(self, transport: asyncio.BaseTransport) -> None:
        self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(transport)

    # -- TCP in --------------------------------------------------------------------------------------------

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], port: int, *, backlog: int = 128
    ) -> TailnetServer:
        """Listen on TCP ``port`` of the node's tailnet addresses (IPv4 and IPv6) and serve each connection
        with a protocol from ``protocol_factory``, as ``loop.create_server``. Serving starts at once.
        Raises DialError when the node is not running, DeviceError when the port is taken."""
        if not 0 < port <= 0xFFFF:
            raise DialError(f"port {port} is outside 1-65535", "unreachable")
        dev = self.device()
        listener = dev.tcp_listen(port, backlog)
        server = TailnetServer(self, dev, listener, port, protocol_factory)
        self._servers.add(server)
        return server

    async def start_server(
        self,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None],
        port: int,
        *,
        backlog: int = 128,
        limit: int = STREAM_LIMIT,
    ) -> TailnetServer:
        """As :func:`asyncio.start_server`: ``client_connected_cb(reader, writer)`` (a coroutine function is
        run as a task) for each connection to TCP ``port``."""
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

        return await self.create_server(factory, port, backlog=backlog)

    # -- UDP -----------------------------------------------------------------------------------------------

    async def create_datagram_endpoint(
        self,
        protocol_factory: Callable[[], P],
        *,
        local_port: int = 0,
        remote_addr: tuple[str, int] | None = None,
    ) -> tuple[TailnetDatagramTransport, P]:
        """A UDP socket on ``local_port`` (0: an ephemeral port) of the node's tailnet addresses, as
        ``loop.create_datagram_endpoint``: ``protocol.datagram_received(data, (ip, port))`` for each datagram,
        ``transport.sendto(data, (host, port))`` (a tailnet name or address) to send. ``remote_addr``: the
        default destination (``sendto(data)``); datagrams from elsewhere are still delivered. Raises
        DialError (node not running, unknown name), DeviceError (port taken)."""
        remote: tuple[IPAddress, int] | None = None
        if remote_addr is not None:
            remote = (self.resolve(remote_addr[0])[0], remote_addr[1])
        dev = self.device()
        got = dev.udp_bind(local_port)
        fd, bound = got if isinstance(got, tuple) else (got, local_port)  # (fd, port) where it is told
        family_ip = self._local_ip(4)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            socket.close(fd)
            raise
        sock.setblocking(False)
        protocol = protocol_factory()
        transport = TailnetDatagramTransport(self, sock, protocol, (family_ip, bound), remote)
        self._datagrams.add(transport)
        return transport, protocol

    # -- the end -------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every server (and its connections), datagram endpoint and connection made here; then wait
        for dials in flight to end (the device's close ends them). Idempotent."""
        self._closed = True
        for server in list(self._servers):
            server.close()
            server._abort_all()
        for d in list(self._datagrams):
            d.abort()
        for t in list(self._transports):
            if not t.is_closing():
                t.close()
            if isinstance(t, asyncio.WriteTransport):
                t.abort()
        self._transports.clear()
        for server in list(self._servers):
            await server.wait_closed()

    async def wait_threads(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` seconds) until every dial thread has ended; call after the device is
        closed, which makes blocked dials return."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(t.is_alive() for t in list(self._threads)) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for t in list(self._threads):
            t.join(timeout=0)


class TailnetServer:
    """A TCP listener on the tailnet (:meth:`Netstack.create_server`), shaped like :class:`asyncio.Server`:
    :meth:`close`, :meth:`wait_closed`, :meth:`serve_forever`, :meth:`is_serving`, ``async with``. ``port``
    is the TCP port it listens on."""

    def __init__(
        self,
        stack: Netstack,
        device: UserspaceDevice,
        listener: int,
        port: int,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._stack = stack
        self._device = device
        self._listener = listener
        self.port = port
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._accept_fd = device.tcp_accept_fd(listener)
        self._serving = True
        self._closed = asyncio.Event()
        self._transports: set[asyncio.BaseTransport] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._loop.add_reader(self._accept_fd, self._on_accept)

    def is_serving(self) -> bool:
        return self._serving

    def _on_accept(self) -> None:
        while self._serving:
            try:
                got = self._device.tcp_accept(self._listener)
            except (TailpyError, OSError) as e:
                log.warning("tailnet server on port %d: accept failed: %s", self.port, e)
                return
            if got is None:
                return
            fd, ip, port = got
            local = (self._stack._local_ip(6 if ":" in ip else 4), self.port)
            try:
                sock = _sock(fd, (ip, port), local)
            except OSError as e:
                log.warning("tailnet server on port %d: %s", self.port, e)
                continue
            task = self._loop.create_task(self._connect(sock), name=f"tailnet-accept-{self.port}")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            transport, _ = await self._loop.connect_accepted_socket(self._factory, sock)
        except Exception as e:
            log.warning("tailnet server on port %d: %s", self.port, e)
            sock.close()
            return
        if not self._serving:
            transport.abort()
            return
        self._transports = {t for t in self._transports if not t.is_closing()}
        self._transports.add(transport)

    def close(self) -> None:
        """Stop listening (the port is free again); connections already accepted stay open, as with
        :meth:`asyncio.Server.close`."""
        if not self._serving:
            return
        self._serving = False
        self._loop.remove_reader(self._accept_fd)
        with contextlib.suppress(TailpyError, OSError):
            self._device.tcp_close_listener(self._listener)
        self._stack._servers.discard(self)
        self._closed.set()

    def _abort_all(self) -> None:
        for task in list(self._pending):
            task.cancel()
        for t in list(self._transports):
            if isinstance(t, asyncio.WriteTransport):
                t.abort()
            else:
                t.close()
        self._transports.clear()

    def close_clients(self) -> None:
        """Close every connection this server accepted (their transports abort)."""
        self._abort_all()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` was called and connections being set up are done."""
        await self._closed.wait()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Serve until cancelled (then close the server) or closed."""
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def __aenter__(self) -> TailnetServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


class TailnetDatagramTransport(asyncio.DatagramTransport):
    """A UDP socket on the tailnet (:meth:`Netstack.create_datagram_endpoint`), shaped like asyncio's
    datagram transport. A datagram that cannot be queued at once (the data plane's queue is full) is
    dropped, as the kernel drops UDP, and counted in ``dropped``; malformed messages from the data plane
    are counted in ``malformed``."""

    def __init__(
        self,
        stack: Netstack,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        sockname: Address,
        remote: tuple[IPAddress, int] | None,
    ) -> None:
        super().__init__(
            extra={
                "socket": sock,
                "sockname": sockname,
                "peername": (str(remote[0]), remote[1]) if remote else None,
            }
        )
        self._stack = stack
        self._sock = sock
        self._protocol = protocol
        self._remote = remote
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self.dropped = 0
        self.malformed = 0
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._loop.call_soon(protocol.connection_made, self)

    def _on_readable(self) -> None:
        for _ in range(256):  # then let the loop run other things
            try:
                message = self._sock.recv(DATAGRAM_HEADER + MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if isinstance(self._protocol, asyncio.DatagramProtocol):
                    self._protocol.error_received(e)
                return
            if not message:  # the data plane closed its end
                self._close(None)
                return
            try:
                payload, ip, port = decode_datagram(message)
            except ParseError:
                self.malformed += 1
                continue
            if isinstance(self._protocol, asyncio.DatagramProtocol):
                self._protocol.datagram_received(payload, (str(ip), port))

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Send ``data`` (bytes-like) to ``addr`` = (tailnet name or address, port), or to ``remote_addr``.
        Raises DialError for an unknown name, ValueError without a destination, OSError (errno EMSGSIZE)
        when ``data`` is larger than :func:`max_udp_payload` (IPv4: 16356 bytes; IPv6: MTU - 48 bytes,
        1232 at the default MTU 1280)."""
        if self._closing:
            return
        if addr is None:
            if self._remote is None:
                raise ValueError("no destination: pass addr or create the endpoint with remote_addr")
            ip, port = self._remote
        else:
            ip, port = self._stack.resolve(str(addr[0]))[0], int(addr[1])
        payload = bytes(data)
        limit = max_udp_payload(ip, self._stack.mtu)
        if len(payload) > limit:
            raise OSError(
                errno.EMSGSIZE,
                f"UDP datagram of {len(payload)} bytes to {ip} is too long: the tailnet carries at most "
                f"{limit} bytes of payload to an IPv{ip.version} address",
            )
        try:
            self._sock.send(encode_datagram(ip, port, payload))
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as e:
            if isinstance(self._protocol, asyncio.DatagramProtocol):
                self._protocol.error_received(e)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._close(None)

    def abort(self) -> None:
        self._close(None)

    def _close(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._stack._datagrams.discard(self)
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_write_buffer_size(self) -> int:
        return 0


__all__ = [
    "DATAGRAM_HEADER",
    "DIAL_TIMEOUT",
    "Netstack",
    "TailnetDatagramTransport",
    "TailnetServer",
    "UserspaceDevice",
    "decode_datagram",
    "encode_datagram",
    "lookup",
]
