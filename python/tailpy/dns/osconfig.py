"""Pointing the host's resolver at MagicDNS, and putting it back exactly as it was.

Two ways, chosen by :func:`detect`:

* **systemd-resolved** (``/etc/resolv.conf`` is resolved's stub file and resolved answers): per-link DNS on
  tailpy's TUN with ``resolvectl``: server 100.100.100.100, routing domain ``~<tailnet domain>`` and the
  search domains (``~.`` too when control gives nameservers, so every name goes through MagicDNS). Reverted
  with ``resolvectl revert``; resolved forgets it by itself when the TUN goes away (a crash).
* **resolv.conf**: ``/etc/resolv.conf`` is rewritten in place (never replaced: under ``ip netns exec`` it
  is a bind mount of ``/etc/netns/<ns>/resolv.conf``) to ``nameserver 100.100.100.100`` and the search
  list, with the original's ``options`` kept. Before the first write the original bytes are saved in
  ``<state_dir>/resolv.conf.pre-tailpy`` (atomically); ``restore`` writes them back byte for byte and
  removes the copy. A daemon that crashed finds the copy at its next start (:meth:`ResolvConf.recover`).
  A file someone else changed since tailpy wrote it (no tailpy header) is left alone.

Safety: a process in an ``ip netns`` namespace ``<ns>`` whose ``/etc/resolv.conf`` is not
``/etc/netns/<ns>/resolv.conf`` (the file was missing when it started, so it sees the machine's own) is
refused (:func:`check_not_host_file`): a lab node must never edit the machine's resolver configuration.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from tailpy.dns.config import IPAddress, parse_resolver
from tailpy.errors import ConfigError, ParseError, StorageError
from tailpy.storage import write_atomic

log = logging.getLogger("tailpy.dns")

RESOLV_CONF = Path("/etc/resolv.conf")
BACKUP_NAME = "resolv.conf.pre-tailpy"
HEADER = "# resolv.conf written by tailpy (MagicDNS)"
RESOLVED_STUB_DIR = "/run/systemd/resolve/"
RESOLVED_UPSTREAMS = Path("/run/systemd/resolve/resolv.conf")


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    """(nameservers, search domains, options lines) of resolv.conf ``text``; comments and unknown lines
    are skipped."""
    servers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if not parts:
            continue
        if parts[0] == "nameserver" and len(parts) > 1:
            servers.append(parts[1])
        elif parts[0] in ("search", "domain"):
            search = parts[1:]
        elif parts[0] == "options":
            options.append(" ".join(parts))
    return servers, search, options


def upstreams_from(text: str, exclude: Iterable[IPAddress] = ()) -> list[tuple[IPAddress, int]]:
    """The nameservers of resolv.conf ``text`` as upstreams (port 53), leaving out ``exclude`` (MagicDNS's
    own addresses) and anything that is not an IP address (a zone index on an IPv6 link-local one)."""
    skip = set(exclude)
    out = []
    for s in parse_resolv_conf(text)[0]:
        try:
            ip, port = parse_resolver(s)
        except ParseError:
            continue
        if ip not in skip:
            out.append((ip, port))
    return out


NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")


def named_netns() -> str | None:
    """The name of the ``ip netns`` namespace this process runs in (its ``/run/netns/<name>`` is the same
    namespace as ``/proc/self/ns/net``), or None (the host's own, or an unnamed one)."""
    try:
        own = os.stat("/proc/self/ns/net")
        entries = list(NETNS_RUN.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            st = os.stat(entry)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return entry.name
    return None


def check_not_host_file(path: Path) -> None:
    """Raise ConfigError when this process runs in an ``ip netns`` namespace ``<ns>`` but ``path`` is not
    that namespace's own ``/etc/netns/<ns>/resolv.conf`` (which ``ip netns exec`` mounts over
    /etc/resolv.conf): the file would be the machine's own."""
    ns = named_netns()
    if ns is None:
        return
    own = NETNS_ETC / ns / "resolv.conf"
    try:
        same = os.path.samefile(path, own)
    except OSError:
        same = False
    if not same:
        raise ConfigError(
            f"this tailpyd runs in network namespace {ns} but {path} is not its own {own}: not touching the "
            "host's resolver configuration (create that file, or use --accept-dns=false)"
        )


def render_resolv_conf(nameserver: str, search: Iterable[str], options: Iterable[str]) -> str:
    """The resolv.conf tailpy writes."""
    lines = [HEADER, "# the original is restored by `tailpy down`", f"nameserver {nameserver}"]
    s = [d for d in dict.fromkeys(search) if d]
    if s:
        lines.append("search " + " ".join(s))
    lines += list(options)
    return "\n".join(lines) + "\n"


class ResolvConf:
    """Direct management of resolv.conf ``path``, the original kept in ``state_dir``."""

    def __init__(self, state_dir: Path, path: Path = RESOLV_CONF) -> None:
        self.path = path
        self.backup = Path(state_dir) / BACKUP_NAME
        self.active = False

    def original(self) -> str:
        """The host's own resolv.conf text: the saved copy while tailpy's is in place, else the file."""
        for p in (self.backup, self.path):
            try:
                return p.read_text(errors="replace")
            except OSError:
                continue
        return ""

    def recover(self) -> bool:
        """At start: a copy left by a daemon that did not restore (crash, kill -9) is put back. Returns
        whether there was one."""
        if not self.backup.exists():
            return False
        log.info("restoring %s saved by a previous tailpyd that did not exit cleanly", self.path)
        self.restore()
        return True

    def apply(self, nameserver: str, search: Iterable[str]) -> None:
        """Point the file at ``nameserver`` with ``search`` first in the search list, then the original's
        search domains; its ``options`` kept. Raises ConfigError when it cannot be read or written."""
        check_not_host_file(self.path)
        try:
            current = self.path.read_bytes()
        except FileNotFoundError:
            current = b""
        except OSError as e:
            raise ConfigError(f"cannot read {self.path}: {e.strerror or e}") from None
        if not self.backup.exists():
            if current.startswith(HEADER.encode()):
                raise ConfigError(
                    f"{self.path} was written by tailpy but its original is lost; fix it by hand"
                )
            _write_atomic(self.backup, current)
        _, orig_search, options = parse_resolv_conf(self.original())
        text = render_resolv_conf(nameserver, [*search, *orig_search], options)
        if current != text.encode():
            _write_in_place(self.path, text.encode())
        self.active = True

    def restore(self) -> None:
        """Put the original back, byte for byte, if the file is still tailpy's; then drop the copy."""
        try:
            saved = self.backup.read_bytes()
        except FileNotFoundError:
            self.active = False
            return
        try:
            current = self.path.read_bytes()
        except OSError:
            current = b""
        if current.startswith(HEADER.encode()):
            try:
                check_not_host_file(self.path)
                _write_in_place(self.path, saved)
            except (ConfigError, OSError) as e:
                log.warning("cannot restore %s: %s", self.path, e)
                return
        elif current != saved:
            log.warning("%s was changed by someone else while tailpy ran: leaving it as it is", self.path)
        self.backup.unlink(missing_ok=True)
        self.active = False


def _write_atomic(path: Path, data: bytes) -> None:
    """Raises ConfigError (the host's resolver then stays as it is) when ``path`` cannot be written."""
    try:
        write_atomic(path, data, mode=0o600, what="copy of the original resolv.conf")
    except StorageError as e:
        raise ConfigError(str(e)) from None


def _write_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path``'s content keeping its inode (a bind mount or symlink target stays what it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def resolved_running(path: Path = RESOLV_CONF) -> bool:
    """Whether systemd-resolved manages this host's DNS: resolv.conf links into /run/systemd/resolve/ and
    ``resolvectl`` answers."""
    try:
        target = os.path.realpath(path)
    except OSError:
        return False
    if not target.startswith(RESOLVED_STUB_DIR) or shutil.which("resolvectl") is None:
        return False
    done = subprocess.run(["resolvectl", "status"], capture_output=True, timeout=10, check=False)
    return done.returncode == 0


class Resolved:
    """Per-link DNS on interface ``iface`` through systemd-resolved's ``resolvectl``."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.active = False

    def apply(self, nameserver: str, domain: str, search: Iterable[str], default_route: bool) -> None:
        """Raises ConfigError when resolvectl refuses."""
        domains = [f"~{domain}"] if domain else []
        domains += [d for d in search if d]
        if default_route:
            domains.append("~.")
        for args in (
            ["dns", self.iface, nameserver],
            ["domain", self.iface, *domains],
            ["default-route", self.iface, "yes" if default_route else "no"],
        ):
            done = subprocess.run(
                ["resolvectl", *args], capture_output=True, text=True, timeout=10, check=False
            )
            if done.returncode != 0:
                raise ConfigError(f"`resolvectl {' '.join(args)}` failed: {done.stderr.strip()}")
        self.active = True

    def restore(self) -> None:
        if self.active:
            subprocess.run(["resolvectl", "revert", self.iface], capture_output=True, timeout=10, check=False)
        self.active = False

    @staticmethod
    def upstream_text() -> str:
        """resolved's own upstream list (its resolv.conf of real servers), "" when unreadable."""
        try:
            return RESOLVED_UPSTREAMS.read_text(errors="replace")
        except OSError:
            return ""


__all__ = [
    "BACKUP_NAME",
    "HEADER",
    "RESOLV_CONF",
    "ResolvConf",
    "Resolved",
    "check_not_host_file",
    "named_netns",
    "parse_resolv_conf",
    "render_resolv_conf",
    "resolved_running",
    "upstreams_from",
]
