"""The node's routing, as tailscaled's Linux router (Tailscale ``wgengine/router/router_linux.go``): policy
routing rules and a routing table of tailpy's own, IP forwarding while the node serves routes, and the
forward/masquerade rules of the node firewall (:mod:`tailpy.daemon.netfilter`).

Shape, for IPv4 and IPv6 alike (``ip rule`` / ``ip -6 rule``)::

    5210: from all fwmark 0x80000/0xff0000 lookup main     # tailpyd's own (underlay) traffic: the host's
    5230: from all fwmark 0x80000/0xff0000 lookup default  #   routes, never the tunnel
    5250: from all fwmark 0x80000/0xff0000 unreachable     # ...and if the host has none, nowhere
    5270: from all lookup 52                               # everything else: tailpy's table first

    table 52:  100.64.0.0/10 dev <tun>        fd7a:115c:a1e0::/48 dev <tun>     (the tailnet)
               <accepted subnet routes> dev <tun>
               0.0.0.0/0 dev <tun>           ::/0 dev <tun>                   (an exit node in use)
               throw <LAN prefix>                                             (exit-node-allow-lan-access)

A lookup in table 52 that finds nothing (or a ``throw`` route) falls through to the main table, so the host's
own routes still serve everything tailpy does not route. Every socket tailpyd opens to the underlay (the
data plane's UDP socket, control, DERP, the DNS forwarder's upstreams) carries :data:`BYPASS_MARK`
(:mod:`tailpy.bypass`, ``Device.set_fwmark``) and so takes the main table even while an exit node's
default route is in table 52: the underlay never loops into the tunnel.

Crash safety: every route through the TUN goes with the TUN when the process holding it dies; what stays
(the rules, ``throw`` routes, forwarding sysctls) never blackholes the host, and :func:`cleanup_leftovers`
removes it at the next start, ``tailpyd --cleanup`` or ``tailpy down``.

Needs CAP_NET_ADMIN and iproute2's ``ip``. Userspace nodes never use this module.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tailpy.daemon.netconf import TAILNET_V4, TAILNET_V6, _ip, tun_addresses
from tailpy.daemon.netfilter import Firewall
from tailpy.errors import ConfigError, DeviceError, TailpyError

log = logging.getLogger("tailpy.daemon")

BYPASS_MARK = 0x80000
"""The fwmark on tailpyd's own underlay sockets (tailscaled's ``linuxfw.TailscaleBypassMark``)."""
MARK_MASK = 0xFF0000
"""The bits of the fwmark tailpy owns (tailscaled's ``linuxfw.TailscaleFwmarkMask``)."""
SUBNET_ROUTE_MARK = 0x40000
"""Set on packets forwarded from the TUN, so the masquerade rule can recognise them in postrouting
(tailscaled's ``linuxfw.TailscaleSubnetRouteMark``)."""
ROUTE_TABLE = 52
"""tailpy's routing table (tailscaled's ``tailscaleRouteTable``)."""
RULE_PREFS = (5210, 5230, 5250, 5270)
"""Priorities of tailpy's policy routing rules (tailscaled's ``ipRules``)."""

FORWARDING_SYSCTLS = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
"""The namespace's IP forwarding switches, per IP version."""
FORWARDING_RECORD = "forwarding.json"
"""File (in the state directory) recording the forwarding sysctls' values before the router changed them,
so that the cleanup after a crash can restore them."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RouterConfig:
    """What the host's routing should be for TUN ``tun``.

    ``addresses``: the node's tailnet addresses (CIDR host prefixes); without an IPv6 one (a TUN whose MTU
    is below 1280 bytes carries no IPv6) IPv6 routes are left out. ``routes``: prefixes routed into the
    TUN (the tailnet ranges, accepted subnet routes, 0.0.0.0/0 and ::/0 while an exit node is in use).
    ``local_routes``: LAN prefixes kept out of the tunnel (``throw`` routes: exit-node-allow-lan-access).
    ``subnet_routes``: the routes this node serves (advertised): IP forwarding is on while there is one,
    and forwarded tailnet traffic leaving toward the LAN is masqueraded when ``snat_subnet_routes``.
    Prefixes are CIDR strings ("198.51.100.0/24"); host bits are cleared. Malformed: ConfigError."""

    tun: str
    addresses: tuple[str, ...]
    routes: tuple[str, ...]
    local_routes: tuple[str, ...] = ()
    subnet_routes: tuple[str, ...] = ()
    snat_subnet_routes: bool = True


def tailnet_routes(addresses: Iterable[str]) -> tuple[str, ...]:
    """The tailnet ranges routed into the TUN for a node with ``addresses``: 100.64.0.0/10, and
    fd7a:115c:a1e0::/48 when one of them is IPv6."""
    v6 = any(ipaddress.ip_interface(a).version == 6 for a in addresses)
    return (str(TAILNET_V4), str(TAILNET_V6)) if v6 else (str(TAILNET_V4),)


def _prefixes(values: Iterable[str], what: str) -> set[IPNetwork]:
    out: set[IPNetwork] = set()
    for v in values:
        try:
            out.add(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ConfigError(f"{what} {v!r} is not an IP prefix such as 198.51.100.0/24") from None
    return out


_BATCH_FAILED = re.compile(r"^(?:Error: )?(.*?)\n?Command failed \S*:(\d+)$", re.M)


def _ip_batch(lines: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``ip -force -batch -`` with ``lines`` (every one is run, whatever the others do; each failure
    is reported on stderr as "Command failed -:<line>"). ConfigError when ``ip`` is missing."""
    exe = shutil.which("ip")
    if exe is None:
        raise ConfigError("`ip` not found: install iproute2")
    script = "".join(f"{line}\n" for line in lines)
    return subprocess.run(
        [exe, "-force", "-batch", "-"], input=script, capture_output=True, text=True, timeout=60, check=False
    )


def _fam(version: int) -> str:
    return "-6" if version == 6 else "-4"


def _rule_args(pref: int) -> list[str]:
    """``ip rule`` arguments of the rule at ``pref``."""
    mark = f"{BYPASS_MARK:#x}/{MARK_MASK:#x}"
    return {
        5210: ["pref", "5210", "fwmark", mark, "table", "main"],
        5230: ["pref", "5230", "fwmark", mark, "table", "default"],
        5250: ["pref", "5250", "fwmark", mark, "unreachable"],
        5270: ["pref", "5270", "table", str(ROUTE_TABLE)],
    }[pref]


def _is_ours(rule: dict[str, object]) -> bool:
    """Whether an ``ip -j rule`` entry is one of tailpy's (or tailscaled's: the same shape)."""
    pref = rule.get("priority")
    if pref not in RULE_PREFS:
        return False
    if pref == 5270:
        return str(rule.get("table")) == str(ROUTE_TABLE) and "fwmark" not in rule
    return (
        str(rule.get("fwmark", "")) == f"{BYPASS_MARK:#x}"
        and str(rule.get("fwmask", "")) == f"{MARK_MASK:#x}"
    )


def _rules(version: int) -> list[dict[str, object]] | None:
    """This namespace's ``ip rule`` list for IP ``version``; None when the family is unavailable."""
    try:
        done = _ip(_fam(version), "-j", "rule", "show", check=False)
    except ConfigError:
        return None
    if done.returncode != 0:
        return None
    try:
        rules = json.loads(done.stdout or "[]")
    except ValueError:
        return None
    return [r for r in rules if isinstance(r, dict)]


def _table_routes(version: int) -> list[dict[str, object]]:
    """Routes of table 52 for IP ``version`` (``ip -j route show table 52``)."""
    try:
        done = _ip(_fam(version), "-j", "route", "show", "table", str(ROUTE_TABLE), check=False)
    except ConfigError:
        return []
    if done.returncode != 0 or not done.stdout.strip():
        return []
    try:
        return [r for r in json.loads(done.stdout) if isinstance(r, dict)]
    except ValueError:
        return []


def _route_args(r: dict[str, object], version: int) -> list[str]:
    """``ip route del`` arguments naming route ``r`` of table 52."""
    dst = str(r.get("dst", ""))
    if dst == "default":
        dst = "0.0.0.0/0" if version == 4 else "::/0"
    args = [_fam(version), "route", "del"]
    kind = r.get("type")
    if isinstance(kind, str) and kind != "unicast":
        args.append(kind)
    args += [dst, "table", str(ROUTE_TABLE)]
    if r.get("dev"):
        args += ["dev", str(r["dev"])]
    return args


def _del_rules(version: int) -> bool:
    """Delete tailpy's rules of IP ``version`` (5270 first: the table stops being used before the bypass
    rules go); whether there were any."""
    ours = [r.get("priority") for r in _rules(version) or [] if _is_ours(r)]
    for pref in reversed(RULE_PREFS):
        for _ in range(ours.count(pref)):
            _ip(_fam(version), "rule", "del", *_rule_args(pref), check=False)
    return bool(ours)


SYSCTL_CONF = Path("/proc/sys/net/ipv4/conf")
"""Where the IPv4 per-interface sysctls are (``<name>/rp_filter``, proc(5))."""

RP_FILTER_FIX = "sysctl -w net.ipv4.conf.all.rp_filter=2"
"""The command that makes reverse-path filtering loose on every interface: the effective value is the
larger of ``conf.all`` and the interface's own (ip-sysctl.rst), so 2 on ``all`` is enough."""


def rp_filter_warning(strict: list[str]) -> str:
    """The sentence for interfaces ``strict`` (from :func:`strict_rp_filter`) while an exit node is used."""
    return (
        f"strict reverse-path filtering (rp_filter=1) on {', '.join(strict)} drops the replies to this "
        "node's control, DERP and WireGuard traffic while an exit node is in use (nothing reaches this "
        f"host); make it loose: `{RP_FILTER_FIX}` (keep it in /etc/sysctl.d/ across reboots), or stop "
        "using the exit node: `tailpy set --exit-node=`"
    )


def strict_rp_filter(exclude: tuple[str, ...] = (), *, root: Path | None = None) -> list[str]:
    """Interfaces (not ``lo``, not ``exclude``) whose effective IPv4 ``rp_filter`` is 1 (strict): the
    larger of ``conf.all`` and the interface's own (ip-sysctl.rst), read under ``root`` (default
    :data:`SYSCTL_CONF`). Tailscale's ``net/netutil.CheckReversePathFiltering`` checks the same."""
    root = root if root is not None else SYSCTL_CONF
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError:
        return []

    def value(name: str) -> int:
        try:
            return int((root / name / "rp_filter").read_text().strip())
        except (OSError, ValueError):
            return 0

    every = value("all")
    return [n for n in names if n not in ("all", "default", "lo", *exclude) and max(every, value(n)) == 1]


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys", *key.split(".")).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    try:
        Path("/proc/sys", *key.split(".")).write_text(value + "\n")
    except OSError as e:
        raise DeviceError(f"cannot set {key} to {value}: {e.strerror or e}") from None


class Router:
    """The host's routing for one TUN (:class:`RouterConfig`). :meth:`set` applies a configuration,
    changing only what differs from the one in force; :meth:`close` undoes everything. ``firewall``: the
    node firewall, which gets the forward-accept and masquerade rules while routes are served (None: the
    host's nftables untouched, forwarding without them). ``record``: a file where the forwarding sysctls'
    previous values are kept while changed (:data:`FORWARDING_RECORD` in the state directory; None: none),
    for :func:`cleanup_leftovers` after a crash."""

    def __init__(self, tun: str, *, firewall: Firewall | None = None, record: Path | None = None) -> None:
        self.tun = tun
        self.firewall = firewall
        self.record = record
        self._routes: set[IPNetwork] = set()  # in table 52 through the TUN
        self._throw: set[IPNetwork] = set()  # throw routes in table 52
        self._rules: set[int] = set()  # IP versions whose rules this router made sure of
        self._saved: dict[str, str] = {}  # forwarding sysctl -> its value before this router set it
        self._config: RouterConfig | None = None
        self.error = ""  # the last failure of :meth:`set`, one sentence ("" none)
        self.sysctl_conf = SYSCTL_CONF  # where :meth:`warnings` reads rp_filter (a test points it elsewhere)

    @property
    def config(self) -> RouterConfig | None:
        """The configuration in force (None: none, or closed)."""
        return self._config

    def set(self, cfg: RouterConfig) -> None:
        """Make the host's routing match ``cfg``; a no-op when it already does. Whatever can be applied is
        applied; the first failure is then raised as DeviceError (one sentence; the next :meth:`set`
        retries). ConfigError for a malformed prefix or another TUN's configuration."""
        if cfg.tun != self.tun:
            raise ConfigError(f"router for {self.tun} given the configuration of {cfg.tun}")
        v6 = any(ipaddress.ip_interface(a).version == 6 for a in cfg.addresses)
        routes = {p for p in _prefixes(cfg.routes, "route") if v6 or p.version == 4}
        throw = {p for p in _prefixes(cfg.local_routes, "local route") if v6 or p.version == 4}
        served = _prefixes(cfg.subnet_routes, "subnet route")
        errors: list[str] = []

        def attempt(fn: Callable[..., None], *args: object) -> None:
            try:
                fn(*args)
            except TailpyError as e:
                errors.append(str(e))

        for version in (4, 6):  # checked each time: another program (systemd-networkd) may delete them
            if version == 4 or v6:
                attempt(self._add_rules, version)
        errors += self._change_routes(
            [("replace", p, True) for p in sorted(throw - self._throw, key=str)]
            + [("replace", p, False) for p in sorted(routes - self._routes, key=str)]
            + [("del", p, False) for p in sorted(self._routes - routes, key=str)]
            + [("del", p, True) for p in sorted(self._throw - throw, key=str)]
        )
        for version, key in FORWARDING_SYSCTLS.items():
            attempt(self._forwarding, key, any(p.version == version for p in served))
        if self.firewall is not None:
            self.firewall.set_routing(
                forward=bool(served), masquerade=bool(served) and cfg.snat_subnet_routes
            )
        self._config = cfg
        self.error = errors[0] if errors else ""
        if errors:
            raise DeviceError(errors[0])

    def warnings(self) -> list[str]:
        """What keeps the routing in force from working, one sentence each: the last :meth:`set` failure,
        and, while an exit node takes the default route, interfaces with strict reverse-path filtering
        (``rp_filter`` 1, ip-sysctl.rst), which drop the replies to this node's own underlay traffic
        because the reverse lookup (without the bypass mark) finds the tunnel (Tailscale
        ``net/netutil.CheckReversePathFiltering``)."""
        out = [f"routes: {self.error}"] if self.error else []
        cfg = self._config
        if cfg is not None and any(
            p.prefixlen == 0 and p.version == 4 for p in _prefixes(cfg.routes, "route")
        ):
            strict = strict_rp_filter(exclude=(self.tun,), root=self.sysctl_conf)
            if strict:
                out.append(rp_filter_warning(strict))
        return out

    def close(self) -> None:
        """Undo everything this router did: its routes, its rules (left while another router's routes are
        still in table 52), the forwarding sysctls it changed, the firewall's forward and masquerade rules.
        Idempotent; never raises (failures are logged)."""
        if self.firewall is not None:
            self.firewall.set_routing(forward=False, masquerade=False)
        self._change_routes(
            [("del", p, False) for p in sorted(self._routes, key=str)]
            + [("del", p, True) for p in sorted(self._throw, key=str)]
        )
        for key in list(self._saved):
            try:
                self._forwarding(key, False)
            except TailpyError as e:
                log.warning("router: %s", e)
        for version in sorted(self._rules):
            if not _table_routes(version):  # else another live router still uses the rules
                with contextlib.suppress(TailpyError):
                    _del_rules(version)
        self._rules.clear()
        self._config = None

    # -- the parts ------------------------------------------------------------------------------------

    def _add_rules(self, version: int) -> None:
        have = _rules(version)
        if have is None:
            if version == 6:
                log.info("router: no IPv6 policy routing here: IPv6 routes stay in the main table's hands")
                return
            raise DeviceError("`ip rule` does not work here: policy routing is needed for tailpy's routes")
        present = {r.get("priority") for r in have if _is_ours(r)}
        for pref in RULE_PREFS:  # the bypass rules before the rule that sends everything to table 52
            if pref not in present:
                _ip(_fam(version), "rule", "add", *_rule_args(pref))
        self._rules.add(version)

    def _change_routes(self, changes: list[tuple[str, IPNetwork, bool]]) -> list[str]:
        """Apply ``(verb, prefix, throw)`` changes to table 52 ("replace": add or update; "del") in one
        ``ip -force -batch`` (the family follows from each prefix), and record what took effect. A
        route that was already gone counts as deleted. Returns one sentence per route that could not be
        added."""
        if not changes:
            return []
        lines = []
        for verb, p, throw in changes:
            target = f"throw {p}" if throw else f"{p} dev {self.tun}"
            lines.append(f"route {verb} {target} table {ROUTE_TABLE}")
        try:
            done = _ip_batch(lines)
        except ConfigError as e:
            return [str(e)]
        failed = {int(n) - 1: why for why, n in _BATCH_FAILED.findall(done.stderr)}
        if done.returncode != 0 and not failed:  # ip stopped early: nothing is known to have worked
            why = (done.stderr.strip().splitlines() or [f"ip exited with status {done.returncode}"])[-1]
            failed = dict.fromkeys(range(len(changes)), why)
        errors: list[str] = []
        for i, (verb, p, throw) in enumerate(changes):
            kept = self._throw if throw else self._routes
            if verb == "del":
                kept.discard(p)
            elif i in failed:
                errors.append(f"cannot route {p} {'around' if throw else 'into'} {self.tun}: {failed[i]}")
            else:
                kept.add(p)
        return errors

    def _forwarding(self, key: str, on: bool) -> None:
        """Turn forwarding sysctl ``key`` on (remembering what it was), or back to what it was."""
        if on:
            if key in self._saved:
                return
            was = _read_sysctl(key)
            if was is None or was == "1":
                return  # already on (the host's choice): not ours to turn off later
            self._saved[key] = was
            self._write_record()
            _write_sysctl(key, "1")
            log.info("router: %s on while this node serves routes", key)
        elif key in self._saved:
            _write_sysctl(key, self._saved[key])
            del self._saved[key]
            self._write_record()

    def _write_record(self) -> None:
        if self.record is None:
            return
        try:
            if self._saved:
                self.record.write_text(json.dumps(self._saved))
            else:
                self.record.unlink(missing_ok=True)
        except OSError as e:
            log.warning("router: cannot write %s: %s", self.record, e)


class RoutePlan(Protocol):
    """The parts of a :class:`RouterConfig` beyond its TUN and addresses (the daemon's route plan)."""

    @property
    def routes(self) -> tuple[str, ...]: ...
    @property
    def local_routes(self) -> tuple[str, ...]: ...
    @property
    def subnet_routes(self) -> tuple[str, ...]: ...
    @property
    def snat_subnet_routes(self) -> bool: ...


class PlanRouter:
    """A :class:`Router` driven by the node's addresses and a :class:`RoutePlan`, for a TUN of ``mtu``
    bytes (below 1280 it carries no IPv6, and IPv6 routes are left out: :func:`tailpy.daemon.netconf.
    tun_addresses`). ``apply`` is idempotent (DeviceError, one sentence); what keeps the routing from
    working (:meth:`Router.warnings`) is logged when it changes. ``firewall`` and ``record`` as
    :class:`Router`."""

    def __init__(
        self, tun: str, *, mtu: int, firewall: Firewall | None = None, record: Path | None = None
    ) -> None:
        self.router = Router(tun, firewall=firewall, record=record)
        self.mtu = mtu
        self._warned: list[str] = []

    def apply(self, addresses: tuple[str, ...], plan: RoutePlan) -> None:
        cfg = RouterConfig(
            tun=self.router.tun,
            addresses=tuple(tun_addresses(list(addresses), self.mtu)),
            routes=tuple(plan.routes),
            local_routes=tuple(plan.local_routes),
            subnet_routes=tuple(plan.subnet_routes),
            snat_subnet_routes=plan.snat_subnet_routes,
        )
        try:
            self.router.set(cfg)
        finally:
            warnings = self.router.warnings()
            for w in warnings:
                if w not in self._warned:
                    log.warning("router: %s", w)
            self._warned = warnings

    def warnings(self) -> list[str]:
        return self.router.warnings()

    def close(self) -> None:
        self.router.close()
        self._warned = []


def cleanup_leftovers(tun: str, record: Path | None = None) -> list[str]:
    """Undo what the router of a dead tailpyd with TUN ``tun`` left: table 52's routes through ``tun``
    (there when the TUN was persistent), then, once no route of table 52 goes through any interface (no
    other live router), table 52's remaining ``throw`` routes and tailpy's policy routing rules; and the
    forwarding sysctls ``record`` (:data:`FORWARDING_RECORD`) says it changed. Returns what was done, one
    phrase each. Never raises."""
    done: list[str] = []
    try:
        for version in (4, 6):
            routes = _table_routes(version)
            gone = [r for r in routes if r.get("dev") == tun]
            for r in gone:
                _ip(*_route_args(r, version), check=False)
            rest = [r for r in routes if r not in gone]
            if any(r.get("dev") for r in rest):
                continue  # another live router's table
            for r in rest:
                _ip(*_route_args(r, version), check=False)
            if gone or rest:
                done.append(f"removed routing table {ROUTE_TABLE}'s IPv{version} routes")
            if _del_rules(version):
                done.append(f"removed the IPv{version} policy routing rules {RULE_PREFS[0]}-{RULE_PREFS[-1]}")
    except TailpyError as e:
        log.warning("cleanup: %s", e)
    if record is not None and record.exists():
        try:
            saved = json.loads(record.read_text())
            for key, value in saved.items() if isinstance(saved, dict) else ():
                if key in FORWARDING_SYSCTLS.values() and str(value) in ("0", "1", "2"):
                    _write_sysctl(key, str(value))
                    done.append(f"restored {key} = {value}")
            record.unlink(missing_ok=True)
        except (OSError, ValueError, TailpyError) as e:
            log.warning("cleanup: cannot restore the forwarding sysctls from %s: %s", record, e)
    return done


__all__ = [
    "BYPASS_MARK",
    "FORWARDING_RECORD",
    "FORWARDING_SYSCTLS",
    "MARK_MASK",
    "ROUTE_TABLE",
    "RP_FILTER_FIX",
    "RULE_PREFS",
    "SUBNET_ROUTE_MARK",
    "SYSCTL_CONF",
    "PlanRouter",
    "RoutePlan",
    "Router",
    "RouterConfig",
    "cleanup_leftovers",
    "rp_filter_warning",
    "strict_rp_filter",
    "tailnet_routes",
]
