"""A whole tailnet in the lab: a control server host and nodes running the real `tailpy` commands.

Used by `tailpy demo`, the integration tests and the benchmarks, so all three exercise the product as a
user runs it: ``tailpy control serve``, ``tailpyd``, ``tailpy up``. :meth:`LabNode.status` reads the JSON
``tailpy status --json`` prints straight from tailpyd's local API socket (``GET /localapi/v0/status``): tests
poll it often, and a CLI process per poll (a Python interpreter importing tailpy, about half a CPU-second)
would keep a 2-core machine busy with nothing else.

Topologies: the control server (with its embedded DERP relay) sits on the lab's "internet" LAN ``lan0``
(192.0.2.0/24 by default). A node added without ``behind`` joins that LAN too (a public host: today's
default, every node on one LAN). ``add_node(name, behind="eim")`` puts it on a LAN of its own behind a new
router of that kind (:mod:`tailpy.lab.nat`); ``behind="double-eim"`` behind two such routers, the outer
one CGNAT-like; ``lan="home"`` puts several nodes on one site's LAN behind one router::

    net = LabTailnet(lab); net.start_control()
    a = net.add_node("a", behind="eim", lan="home")
    b = net.add_node("b", lan="home")           # same LAN as a, same router
    c = net.add_node("c", behind="edm")         # a site of its own
    d = net.add_node("d", behind=("edm", "eim"))  # EIM home router behind an EDM carrier NAT
    e = net.add_node("e")                       # public, on lan0

Site LANs are 198.18.<n>.0/24, the LANs between two routers 198.19.<n>.0/24; sites have no IPv6.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailpy.errors import LabError
from tailpy.ipnstate import Status
from tailpy.lab.dns import give_resolv_conf
from tailpy.lab.nat import NAT_KINDS, NatKind, check_kind
from tailpy.lab.netns import Host, Lab, Lan, Router
from tailpy.lab.procs import stop_process, wait_for

CONTROL_PORT = 8080
WG_PORT = 41641


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket (tailpyd's local API). The socket is a file: it is reachable from any
    network namespace, the lab's own included."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("local-tailpyd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def local_api_status(socket_path: str, timeout: float = 20.0) -> dict[str, Any]:
    """``GET /localapi/v0/status`` from the tailpyd on ``socket_path``, through
    :class:`tailpy.ipnstate.Status` as the CLI reads it: the object ``tailpy status --json`` prints. Raises
    LabError when tailpyd does not answer or answers with an error, ParseError for an answer that is not a
    status."""
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("GET", "/localapi/v0/status")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise LabError(f"tailpyd on {socket_path} did not answer: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise LabError(f"tailpyd on {socket_path} answered HTTP {resp.status}: {body[:300]!r}")
    return Status.from_json(json.loads(body)).to_json()


_PROBE = (
    "import sys, urllib.request\n"
    "try:\n    urllib.request.urlopen(sys.argv[1], timeout=1).read()\nexcept Exception:\n    sys.exit(1)\n"
)


def tailpy_argv(*args: str) -> list[str]:
    """The argv that runs the ``tailpy`` CLI with this interpreter."""
    return [sys.executable, "-m", "tailpy.cli.main", *args]


#: ``behind=`` shorthands: a router kind, "public" (the internet LAN), or "double-<kind>" (two routers).
Behind = str | Sequence[str]


def parse_behind(behind: Behind) -> tuple[NatKind, ...]:
    """Router kinds, outermost first, for a ``behind`` value: ``"public"`` -> ``()``, ``"eim"`` ->
    ``("eim",)``, ``"double-edm"`` -> ``("edm", "edm")``, a sequence of kinds as it is. Raises LabError."""
    if isinstance(behind, str):
        if behind == "public":
            return ()
        if behind.startswith("double-"):
            kind = check_kind(behind.removeprefix("double-"))
            return (kind, kind)
        return (check_kind(behind),)
    kinds = tuple(check_kind(k) for k in behind)
    if not kinds:
        raise LabError("a site needs at least one router kind (or behind='public')")
    return kinds


@dataclass
class LabSite:
    """A LAN behind one or more routers: ``routers`` outermost first, ``router`` the LAN's own gateway."""

    name: str
    lan: Lan
    routers: list[Router]

    @property
    def router(self) -> Router:
        return self.routers[-1]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(r.nat for r in self.routers)


@dataclass
class LabNode:
    """A tailpy node: a lab host running tailpyd with its own state directory and local API socket."""

    tailnet: LabTailnet
    host: Host
    state_dir: Path
    daemon: Any = None  # subprocess.Popen of tailpyd
    daemon_args: tuple[str, ...] = ()  # extra tailpyd flags, e.g. ("--mtu", "1240")
    daemon_env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. SSL_CERT_FILE
    site: LabSite | None = None  # None: on the internet LAN
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.state_dir / "tailpyd.log"

    @property
    def socket(self) -> str:
        return str(self.state_dir / "tailpyd.sock")

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def lan(self) -> Lan:
        """The LAN this node's host is on (its site's, or the internet LAN)."""
        return self.site.lan if self.site is not None else self.tailnet.lan

    def lan_ip(self) -> str:
        """The node's IPv4 address on its LAN (not its tailnet address)."""
        return self.lan.ip(self.host)

    def roam(self, address: str | None = None) -> str:
        """Give the node a new LAN address (``address`` or the next free one) as a laptop moving between
        networks would get; tailpyd is not told. Returns the new address."""
        return self.lan.readdress(self.host, address)

    def move(self, site: LabSite | None) -> str:
        """Move the node's host to another network: ``site``'s LAN, or the internet LAN for None (a laptop
        going from home Wi-Fi to a phone's hotspot). tailpyd keeps running and is not told. Returns the new
        LAN address."""
        new_lan = site.lan if site is not None else self.tailnet.lan
        if new_lan is self.lan:
            raise LabError(f"{self.name} is already on LAN {new_lan.name}")
        self.lan.detach(self.host)
        self.site = site
        return new_lan.attach(self.host)

    def cli(self, *args: str, check: bool = True, timeout: float = 90) -> str:
        """Run ``tailpy <args> --socket <this node's socket>`` inside the node; returns stdout."""
        return self.host.run(tailpy_argv(*args, "--socket", self.socket), check=check, timeout=timeout).stdout

    def start_daemon(self) -> None:
        """Start tailpyd (tracked by the lab) and wait until its local API answers."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "a")  # noqa: SIM115 - the child owns it
        self.daemon = self.host.python(
            "tailpy.daemon",
            "--state-dir",
            str(self.state_dir),
            "--socket",
            self.socket,
            "--port",
            str(WG_PORT),
            *self.daemon_args,
            env=self.daemon_env or None,
            stdout=logf,
            stderr=logf,
        )
        logf.close()
        wait_for(lambda: self._answers(), timeout=20, what=f"tailpyd on {self.name} to answer")

    def _answers(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise LabError(f"tailpyd on {self.name} exited: {self.log_tail()}")
        try:
            local_api_status(self.socket, timeout=20)
        except LabError:
            return False
        return True

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            stop_process(self.daemon)
            self.daemon = None

    def up(self, auth_key: str | None = None, *, flags: Sequence[str] = ()) -> dict[str, Any]:
        """``tailpy up [flags]`` against the lab's control server (``flags`` such as
        ``("--accept-routes",)``); returns ``tailpy status --json``."""
        args = ["up", "--login-server", self.tailnet.control_url, "--hostname", self.name, *flags]
        if auth_key:
            args += ["--auth-key", auth_key]
        self.cli(*args)
        return self.status()

    def kill_daemon(self) -> None:
        """kill -9 tailpyd (a crash: nothing of its own cleanup runs) and wait for it to be gone."""
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(timeout=10)
            self.daemon = None

    def status(self) -> dict[str, Any]:
        """What ``tailpy status --json`` prints, read from the local API (see the module docstring)."""
        return local_api_status(self.socket)

    def ip(self) -> str:
        return self.cli("ip", "-4").strip()

    def ip6(self) -> str:
        return self.cli("ip", "-6").strip()

    def wait_peers(self, count: int, timeout: float = 30) -> dict[str, Any]:
        """Wait until this node's netmap shows ``count`` peers; returns the status."""

        def check() -> dict[str, Any] | None:
            st = self.status()
            return st if st["backend_state"] == "Running" and len(st["peers"]) == count else None

        return wait_for(check, timeout=timeout, what=f"{self.name} to see {count} peers", interval=0.2)

    def pings(self, address: str) -> bool:
        """Whether one ``ping`` from this node to ``address`` is answered within 2 s (never raises)."""
        flag = ["-6"] if ":" in address else []
        return (
            self.host.run(["ping", *flag, "-c", "1", "-W", "2", address], check=False, timeout=30).returncode
            == 0
        )

    def ping(self, address: str, count: int = 3, timeout: float = 30) -> str:
        """``ping`` from this node, each probe waiting up to 2 s; raises LabError if every probe is lost."""
        flag = ["-6"] if ":" in address else []
        return self.host.run(
            ["ping", *flag, "-c", str(count), "-W", "2", "-i", "0.2", address], timeout=timeout
        ).stdout

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LabTailnet:
    """A control server on host ``control`` and nodes on one LAN (``subnet`` and ``subnet6``)."""

    def __init__(self, lab: Lab, subnet: str = "192.0.2.0/24", subnet6: str = "2001:db8:1::/64") -> None:
        self.lab = lab
        self.root = Path(tempfile.mkdtemp(prefix="tailpy-lab-"))
        lab.track_path(self.root)
        self.control_host = lab.host("control")
        self.lan: Lan = lab.lan("lan0", [self.control_host], subnet=subnet, subnet6=subnet6)
        self.control_state = self.root / "control"
        self.control_proc: Any = None
        self.control_args: tuple[str, ...] = ()
        self.nodes: dict[str, LabNode] = {}
        # Each node's own /etc/resolv.conf (tailpyd's MagicDNS edits that copy, never the machine's).
        self.resolv_conf = "# tailpy lab: this namespace's own resolv.conf\n"
        self.sites: dict[str, LabSite] = {}
        self._site_nets = 0  # 198.18.<n>.0/24 for sites
        self._carrier_nets = 0  # 198.19.<n>.0/24 between routers
        self._auto_sites = 0

    @property
    def control_url(self) -> str:
        return f"http://{self.lan.ip(self.control_host)}:{CONTROL_PORT}"

    def start_control(self, *args: str) -> str:
        """Start ``tailpy control serve [args]`` and wait until it answers; returns its URL. The arguments
        are kept for later restarts."""
        self.control_args = args or self.control_args
        self.control_state.mkdir(parents=True, exist_ok=True)
        logf = open(self.root / "control.log", "a")  # noqa: SIM115 - the child owns it
        self.control_proc = self.control_host.python(
            "tailpy.cli.main",
            "control",
            "serve",
            "--state-dir",
            str(self.control_state),
            "--listen",
            f"0.0.0.0:{CONTROL_PORT}",
            # The embedded relay listens on every address; nodes are told to reach it at the LAN address.
            *(
                ()
                if "--derp-hostname" in self.control_args
                else ("--derp-hostname", self.lan.ip(self.control_host))
            ),
            *self.control_args,
            stdout=logf,
            stderr=logf,
        )
        logf.close()

        def answers() -> bool:
            if self.control_proc.poll() is not None:
                tail = (self.root / "control.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise LabError("control server exited: " + " | ".join(tail))
            probe = [sys.executable, "-c", _PROBE, self.control_url + "/key"]
            return self.control_host.run(probe, check=False, timeout=10).returncode == 0

        wait_for(answers, timeout=20, what="the control server to answer", interval=0.2)
        return self.control_url

    def stop_control(self) -> None:
        if self.control_proc is not None:
            stop_process(self.control_proc)
            self.control_proc = None

    def control(self, *args: str, check: bool = True) -> str:
        """Run ``tailpy control <args> --state-dir <the server's>`` on the control host; returns stdout."""
        argv = tailpy_argv("control", *args, "--state-dir", str(self.control_state))
        return self.control_host.run(argv, check=check).stdout

    def authkey(self, reusable: bool = True, expiration: str | None = None) -> str:
        """A new pre-auth key from ``tailpy control authkey create``."""
        args = ["control", "authkey", "create", "--state-dir", str(self.control_state)]
        if reusable:
            args.append("--reusable")
        if expiration:
            args += ["--expiration", expiration]
        return self.control_host.run(tailpy_argv(*args)).stdout.strip().splitlines()[-1]

    def public_host(self, name: str) -> Host:
        """A plain host (no tailpyd) on the internet LAN, beside the control server: a second STUN or DERP
        server, a reflector, an outside peer."""
        host = self.lab.host(name)
        give_resolv_conf(host, self.resolv_conf)
        self.lan.attach(host)
        return host

    def site(
        self, name: str, behind: Behind = "eim", *, hairpin: bool = False, udp_timeout: int | None = None
    ) -> LabSite:
        """A new LAN ``name`` (at most 15 characters, also the interface name) behind routers of the kinds
        ``behind`` names (see :func:`parse_behind`; outermost first), the outermost on the internet LAN.
        ``hairpin`` and ``udp_timeout`` apply to every router of the site (see :meth:`Lab.router`)."""
        kinds = parse_behind(behind)
        if not kinds:
            raise LabError("a public node needs no site: add it without behind= (or behind='public')")
        if name in self.sites or name in self.lab.lans:
            raise LabError(f"the lab already has a LAN named {name!r}")
        if self._site_nets + 1 > 255 or self._carrier_nets + len(kinds) - 1 > 255:
            raise LabError("the lab has no site addresses left (255 sites at most)")
        self._site_nets += 1
        site_subnet = f"198.18.{self._site_nets}.0/24"
        outside = self.lan
        routers: list[Router] = []
        for depth, kind in enumerate(kinds):
            last = depth == len(kinds) - 1
            if last:
                inside = self.lab.lan(name, subnet=site_subnet)
            else:
                self._carrier_nets += 1
                inside = self.lab.lan(f"cg{self._carrier_nets}", subnet=f"198.19.{self._carrier_nets}.0/24")
            router_name = f"{name}-r" if last else f"{name}-cg{depth}"
            routers.append(
                self.lab.router(
                    router_name,
                    inside=inside,
                    outside=outside,
                    nat=kind,
                    hairpin=hairpin and kind != "firewall" and kind != "none",
                    udp_timeout=udp_timeout,
                )
            )
            outside = inside
        site = LabSite(name, outside, routers)
        self.sites[name] = site
        return site

    def add_node(
        self,
        name: str,
        daemon_args: tuple[str, ...] = (),
        *,
        behind: Behind | None = None,
        lan: str | None = None,
    ) -> LabNode:
        """A new host running tailpyd with ``daemon_args`` (not yet up). Without ``behind`` and ``lan`` it
        is on the internet LAN, as every node used to be. ``behind`` (a router kind: ``"eim"``,
        ``"full-cone"``, ``"edm"``, ``"firewall"``, ``"none"``, ``"double-<kind>"``, a sequence of kinds
        outermost first, or ``"public"``) puts it on a new site of its own; ``lan`` names a site to join,
        made (behind ``behind``, by default ``"eim"``) if it does not exist yet. Raises LabError."""
        site: LabSite | None = None
        if lan is not None:
            site = self.sites.get(lan)
            if site is None:
                site = self.site(lan, "eim" if behind is None else behind)
            elif behind is not None and parse_behind(behind) != site.kinds:
                raise LabError(f"site {lan} is behind {'/'.join(site.kinds)}, not {behind}")
        elif behind is not None and parse_behind(behind):
            self._auto_sites += 1
            while f"site{self._auto_sites}" in self.lab.lans:
                self._auto_sites += 1
            site = self.site(f"site{self._auto_sites}", behind)
        host = self.lab.host(name)
        give_resolv_conf(host, self.resolv_conf)
        (site.lan if site is not None else self.lan).attach(host)
        node = LabNode(self, host, self.root / name, daemon_args=daemon_args, site=site)
        node.start_daemon()
        self.nodes[name] = node
        return node

    def connected(
        self, *names: str, daemon_args: tuple[str, ...] = (), behind: Behind | None = None
    ) -> list[LabNode]:
        """New nodes ``names`` (each on a site of its own behind ``behind``, or public), each brought up
        with one reusable key, returned once every node of the tailnet sees all the others. The control
        server must be running."""
        key = self.authkey(reusable=True)
        nodes = [self.add_node(name, daemon_args, behind=behind) for name in names]
        for node in nodes:
            node.up(key)
        for node in nodes:
            node.wait_peers(len(self.nodes) - 1)
        return nodes


__all__ = ["NAT_KINDS", "LabNode", "LabSite", "LabTailnet", "parse_behind", "tailpy_argv"]
