"""tailpy's one exception hierarchy.

Every expected failure is a :class:`TailpyError` whose message is one sentence saying what went wrong and,
where there is one, what to do. The Rust extension raises these same classes (see ``rust/tailpy-py``).
"""

from __future__ import annotations


class TailpyError(Exception):
    """Base class of every error tailpy raises on purpose."""


class InvalidKeyError(TailpyError, ValueError):
    """A key is malformed: wrong length, wrong prefix, bad base64/hex, or a low-order point."""


class ParseError(TailpyError, ValueError):
    """Bytes from the network could not be parsed (a malformed STUN, disco, DERP or control message)."""


class EndpointError(ParseError):
    """A UDP endpoint is malformed (:class:`tailpy.endpoint.Endpoint`): text that is not ``ip:port``,
    ``[ipv6]:port`` or ``[ipv6%zone]:port``, a port outside 0-65535, a bad zone, or a disco form that is not
    18 bytes."""


class PermissionDeniedError(TailpyError, PermissionError):
    """An operation needs a privilege the process lacks (CAP_NET_ADMIN to create a TUN device)."""


class DeviceError(TailpyError, OSError):
    """The data plane could not do what was asked (TUN or UDP socket failure, unknown peer)."""


class DialError(TailpyError, ConnectionError):
    """A connection over the tailnet could not be made: the name is not in the node's netmap, the peer
    refused it (TCP RST), no answer came in time, or no peer's allowed IPs contain the destination (raised
    by the userspace device's ``tcp_dial`` too). ``reason`` is ``"no-name"``, ``"refused"``, ``"timeout"``
    or ``"unreachable"`` (what a SOCKS5 reply code or an HTTP proxy's 502 is chosen from)."""

    def __init__(self, message: str, reason: str = "unreachable") -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(TailpyError, ValueError):
    """A setting or argument is wrong; the message says which and what is expected."""


class ControlError(TailpyError):
    """The coordination server refused a request or could not be reached."""


class AuthKeyError(ControlError):
    """An auth key is unknown, expired or already used."""


class NotRegisteredError(ControlError):
    """The control server does not know this machine (never registered, or deleted by an admin)."""


class DaemonNotRunningError(TailpyError):
    """No tailpyd answers on the local API socket."""


class DaemonRunningError(TailpyError):
    """Another tailpyd holds the state directory's lock (one daemon per state directory)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        super().__init__(f"tailpyd is already running (pid {pid if pid is not None else 'unknown'})")


class StorageError(TailpyError, OSError):
    """A file tailpy keeps (state file, lock, database, saved resolv.conf) cannot be written: the disk is
    full, the filesystem is read-only, or permission is denied. The message says which and what to do; the
    file as it was before stays."""


class LabError(TailpyError):
    """A lab topology (network namespaces, veth links, NAT rules) could not be built."""


__all__ = [
    "AuthKeyError",
    "ConfigError",
    "ControlError",
    "DaemonNotRunningError",
    "DaemonRunningError",
    "DeviceError",
    "DialError",
    "EndpointError",
    "InvalidKeyError",
    "LabError",
    "NotRegisteredError",
    "ParseError",
    "PermissionDeniedError",
    "StorageError",
    "TailpyError",
]
