"""MagicDNS in tailpyd: the resolver on 100.100.100.100 / fd7a:115c:a1e0::53 port 53, kept in step with
every netmap, and the host's resolver pointed at it while the node is up.

The MagicDNS addresses are added to ``lo`` (so packets for them are delivered locally and never enter the
tunnel: the local routing table wins over the 100.64.0.0/10 route to the TUN) and removed on :meth:`stop`;
the IPv6 one without duplicate address detection (``nodad``), so it can be bound at once. Only this host's
own processes may query MagicDNS: the listening sockets are bound to ``lo`` (SO_BINDTODEVICE), so a LAN
neighbour that routes 100.100.100.100 through the node (Linux accepts packets for a local address on any
interface) or a tailnet peer gets no answer; the kernel drops those packets, nothing to clean up on exit.
An address that cannot be bound yet (EADDRNOTAVAIL) is retried with backoff for :data:`LISTEN_RETRY`
seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tailpy.backoff import reconnect_delays
from tailpy.dns.config import DNSConfig
from tailpy.dns.osconfig import RESOLV_CONF, ResolvConf, Resolved, resolved_running, upstreams_from
from tailpy.dns.resolver import MAGICDNS_V4, MAGICDNS_V6, Resolver
from tailpy.dns.server import DNSServer
from tailpy.errors import ConfigError
from tailpy.netmap import NetMap

log = logging.getLogger("tailpy.dns")

DNS_PORT = 53

LISTEN_RETRY = 30.0
"""Seconds MagicDNS keeps retrying an address it cannot bind yet (not assigned yet, or tentative)."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ip") or "ip"
    return subprocess.run([exe, *args], capture_output=True, text=True, check=False)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DNSManager:
    """Owns the node's resolver (:class:`Resolver` + :class:`DNSServer`) and its OS configuration.

    ``state_dir`` keeps the original resolv.conf; ``listen`` overrides the addresses served (tests);
    ``add_addresses``: put the MagicDNS addresses on ``lo`` first; ``resolv_conf``: the file managed in
    resolv.conf mode. Call :meth:`recover` once at daemon start, :meth:`apply` with every netmap (sync,
    cheap: it updates tables; the listener starts in the background the first time), :meth:`stop` on
    down/exit."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        listen: list[tuple[str, int]] | None = None,
        add_addresses: bool = True,
        resolv_conf: Path = RESOLV_CONF,
    ) -> None:
        self.listen = (
            listen if listen is not None else [(str(MAGICDNS_V4), DNS_PORT), (str(MAGICDNS_V6), DNS_PORT)]
        )
        self.add_addresses = add_addresses
        self.resolv = ResolvConf(Path(state_dir), resolv_conf)
        self._resolved_mode: bool | None = None
        self.resolved: Resolved | None = None
        self.resolver = Resolver()
        self.server: DNSServer | None = None
        self._starting: asyncio.Task[None] | None = None
        self.error = ""  # last listen problem, one sentence
        self.config_error = ""  # why the host's resolver could not be pointed at MagicDNS, one sentence
        self._os_key: tuple[Any, ...] | None = None

    def recover(self) -> None:
        """Put back a resolv.conf a crashed tailpyd left pointed at MagicDNS."""
        try:
            self.resolv.recover()
        except OSError as e:
            log.warning("cannot restore %s: %s", self.resolv.path, e)

    def apply(self, netmap: NetMap, *, accept_dns: bool, tun: str | None = None) -> None:
        """Answer from ``netmap`` from now on; start listening if not yet; point the host's resolver at
        MagicDNS when ``accept_dns`` and control's DNS config asks for it (else put it back)."""
        cfg = netmap.dns if netmap.dns is not None else DNSConfig()
        if not self.resolver.fallback:
            self.resolver.fallback = tuple(self._host_upstreams())
        self.resolver.update(netmap, cfg)
        if self.server is None and self._starting is None:
            with contextlib.suppress(RuntimeError):  # no loop (tests driving the backend): tables only
                self._starting = asyncio.get_running_loop().create_task(self._start(), name="magicdns")
        key = (
            accept_dns and cfg.configures_os,
            netmap.domain,
            cfg.magic_dns,
            cfg.search_domains,
            bool(cfg.nameservers),
            tun,
        )
        if key != self._os_key:
            self._os_key = key
            self._configure_os(netmap.domain, cfg, accept_dns, tun)

    @property
    def os_error(self) -> str:
        """Why the host's resolver does not point at MagicDNS though it should ("" when it does, or when
        ``accept_dns`` or control's DNS config do not ask for it)."""
        if self._os_key is None or not self._os_key[0]:
            return ""
        if self.config_error or self.error:
            return self.config_error or self.error
        if not (self.resolv.active or (self.resolved is not None and self.resolved.active)):
            return "the host's resolver configuration was not changed"
        return ""

    def _host_upstreams(self) -> list[Any]:
        exclude = (MAGICDNS_V4, MAGICDNS_V6)
        if self._use_resolved():
            return upstreams_from(Resolved.upstream_text(), exclude)
        return upstreams_from(self.resolv.original(), exclude)

    def _use_resolved(self) -> bool:
        if self._resolved_mode is None:
            self._resolved_mode = resolved_running(self.resolv.path)
        return self._resolved_mode

    def _configure_os(self, domain: str, cfg: DNSConfig, accept_dns: bool, tun: str | None) -> None:
        want = accept_dns and cfg.configures_os
        search = ([domain] if domain and cfg.magic_dns else []) + list(cfg.search_domains)
        try:
            if not want:
                self._restore_os()
            elif self._use_resolved() and tun:
                self.resolved = self.resolved or Resolved(tun)
                self.resolved.apply(str(MAGICDNS_V4), domain, search, bool(cfg.nameservers))
            else:
                self.resolv.apply(str(MAGICDNS_V4), search)
            self.config_error = ""
        except ConfigError as e:
            self.config_error = str(e)
            log.warning("MagicDNS: %s", e)

    def _restore_os(self) -> None:
        if self.resolved is not None:
            self.resolved.restore()
        self.resolv.restore()

    async def _start(self) -> None:
        try:
            if self.add_addresses:
                self._add_addresses()
            server = DNSServer(self.resolver)
            self.server = server
            errors = await asyncio.gather(*(self._listen(server, h, p) for h, p in self.listen))
            self.error = next((e for e in errors if e), "")
            if server.addresses:
                log.info("MagicDNS listening on %s", ", ".join(_hostport(h, p) for h, p in server.addresses))
        finally:
            self._starting = None

    async def _listen(self, server: DNSServer, host: str, port: int) -> str:
        """Bind ``host`` port ``port``, retrying while the address is not there yet; "" or the error."""
        device = "lo" if self.add_addresses else None
        deadline = time.monotonic() + LISTEN_RETRY
        delays = reconnect_delays(base=0.05, cap=2.0)
        while True:
            try:
                await server.start([(host, port)], device=device)
                return ""
            except OSError as e:
                error = f"MagicDNS cannot listen on {host} port {port}: {e.strerror or e}"
                if e.errno != errno.EADDRNOTAVAIL or time.monotonic() >= deadline:
                    log.warning("%s", error)
                    return error
                self.error = error + " (retrying)"
                await asyncio.sleep(next(delays))

    def _add_addresses(self) -> None:
        for ip in (MAGICDNS_V4, MAGICDNS_V6):
            fam = "-6" if ip.version == 6 else "-4"
            plen = 128 if ip.version == 6 else 32
            extra = ["nodad"] if ip.version == 6 else []  # usable at once, not tentative for a second or two
            done = _ip(fam, "addr", "replace", f"{ip}/{plen}", "dev", "lo", *extra)
            if done.returncode != 0:
                log.warning("cannot add %s to lo: %s", ip, done.stderr.strip())

    def stop(self) -> None:
        """Stop serving, put the host's resolver back, take the addresses off ``lo``. Idempotent."""
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self.server is not None:
            self.server.close()
            self.server = None
            if self.add_addresses:
                for ip in (MAGICDNS_V4, MAGICDNS_V6):
                    plen = 128 if ip.version == 6 else 32
                    _ip("-6" if ip.version == 6 else "-4", "addr", "del", f"{ip}/{plen}", "dev", "lo")
        self._restore_os()
        self._os_key = None

    def status(self) -> dict[str, Any]:
        """For ``tailpy status --json`` (key ``dns``)."""
        r = self.resolver
        return {
            "magic_dns": r.config.magic_dns,
            "listening": [_hostport(h, p) for h, p in self.server.addresses] if self.server else [],
            "os_configured": self.resolv.active or bool(self.resolved and self.resolved.active),
            "mode": "resolved" if self._resolved_mode else "resolv.conf",
            "names": len(r.names()),
            "error": "; ".join(e for e in (self.config_error, self.error) if e),
            "queries": r.queries,
            "forwarded": r.forwarded,
            "servfail": r.servfails,
            "bad": r.bad,
            "dropped": self.server.dropped if self.server else 0,
            "bad_upstream": self.server.bad_upstream if self.server else 0,
        }


__all__ = ["DNS_PORT", "DNSManager"]
