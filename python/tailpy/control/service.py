"""The whole control process as a library: the coordination server, its embedded DERP relay and STUN
server, the admin socket and, when configured, OpenID Connect login; what `tailpy control serve` runs, and
what a test or a program can run in its own event loop.

``run_control(ControlConfig(state_dir=...))`` runs until SIGTERM or SIGINT (or a given event); or
``p = ControlProcess(config); await p.start(); ...; await p.stop()``.

The embedded relay is left out of the DERP map (and logged) when nodes could not be told where to reach it
(every address, no ``derp_hostname``) or when it cannot listen; a STUN port that cannot be bound is logged
and left out of the map (STUNPort -1). Control serves regardless. Headscale's embedded DERP server
(``hscontrol/derp/server``) is the model. The embedded relay joins the DERP mesh of its region: the relays
of the other control replicas on the database and ``--mesh-with`` (:mod:`tailpy.control.derpmesh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tailpy.control.admin import SOCKET_NAME, Admin, AdminServer
from tailpy.control.console import ConsoleConfig
from tailpy.control.derpmesh import RelayMesh
from tailpy.control.options import WILDCARDS
from tailpy.control.replicas import HEARTBEAT
from tailpy.control.server import ControlServer, http_url
from tailpy.control.store import DEFAULT_KEY_LIFETIME, Settings, Store, changes
from tailpy.control.store.addresses import DEFAULT_QUARANTINE
from tailpy.derp.mesh import Mesh, mesh_urls, read_mesh_key, start_mesh
from tailpy.derp.metrics import RelayCollector, StunCollector
from tailpy.derp.server import DerpServer, load_or_create_key
from tailpy.derp.stun_server import StunServer
from tailpy.derp.verify import local_admission
from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError, ControlError, ParseError
from tailpy.keys import MachinePrivate
from tailpy.metrics import start_metrics_listener
from tailpy.netmap import DerpMap, DerpNode, DerpRegion
from tailpy.proto.derp import parse_mesh_key

if TYPE_CHECKING:
    from tailpy.control.oidc import OIDCConfig

log = logging.getLogger("tailpy.control")

DERP_PORT = 3340
"""Default port of the embedded DERP relay of `tailpy control serve` (Headscale's default too)."""

DEFAULT_EPHEMERAL_TIMEOUT = 30 * 60.0
"""Seconds an ephemeral node may stay offline before it is removed (`--ephemeral-timeout 30m`)."""


@dataclass(frozen=True)
class ControlConfig:
    """What the control process runs with (the options of `tailpy control serve`, parsed).

    * ``state_dir``: database (SQLite unless ``db``), server key, DERP key and ``admin.sock``; made (mode
      0700) when missing and its parent exists. ``db``: a database URL (see
      :func:`tailpy.control.store.database_url`).
    * ``host``/``port``: where control serves HTTP (``host`` None: every address; port 0 picks one).
    * ``domain``, ``prefix_v4``, ``prefix_v6``: stored tailnet settings (None: keep the stored one).
    * ``key_lifetime``: node key lifetime, seconds (None: keys never expire); ``ephemeral_timeout``: offline
      seconds after which an ephemeral node is removed; ``address_quarantine``: seconds a deleted node's
      addresses stay unused (:mod:`tailpy.control.store.addresses`).
    * ``derp``: run the embedded relay on ``derp_host:derp_port`` (``derp_host`` None: every address),
      told to nodes as ``derp_hostname`` (else ``server_url``'s host, else the first specific one of
      ``derp_host`` and ``host``; :func:`derp_advertised_host`) in
      region ``derp_region_id`` (1..2**31-1) ``derp_region_code``; ``derp_verify_clients``: it admits only
      this tailnet's live, unexpired node keys. ``derp_map``: external relays, sent with (or, without
      ``derp``, instead of) the embedded one; its region ids must differ from ``derp_region_id``;
      ``derp_map_file`` the file it came from (for messages).
    * ``stun``: a STUN server beside the relay on UDP ``stun_port`` (0 picks one).
    * ``oidc``: browser login (:class:`tailpy.control.oidc.OIDCConfig`; None: auth keys only).
    * ``server_url``: the URL nodes reach control at (``--server-url``; None: from ``host``).
    * ``admins``: who may sign in to the web console with ``oidc`` (``--admin``: emails, login names,
      ``group:NAME`` of the policy; :class:`tailpy.control.console.ConsoleConfig`).
    * ``policy_file``: the tailnet policy is this HuJSON file, reloaded when it changes and on SIGHUP (None:
      the policy stored in the database, ``tailpy control policy set``); see :mod:`tailpy.control.acl`.
    * ``mesh_with``: DERP URLs of standalone relays (``tailpy derp serve``, Tailscale's derper) of the
      embedded relay's region to mesh with (``--mesh-with``, :func:`tailpy.derp.mesh.mesh_urls`);
      ``mesh_psk_file``: the region's mesh key (``--mesh-psk-file``; None: with replicas the database's,
      :func:`~tailpy.control.store.changes.shared_mesh_key`; needed for ``mesh_with``). With PostgreSQL the
      embedded relays of the replicas of one region mesh on their own (:mod:`tailpy.control.derpmesh`).
    * ``replica_id``: this process's id among the replicas of its database (``--replica-id``; None: with
      PostgreSQL ``<hostname>:<port>``, stable across restarts; with SQLite none, a single process);
      ``heartbeat``: seconds between its heartbeats (:mod:`tailpy.control.replicas`).
    * ``metrics_listen``: (host, port) of a listener serving ``GET /metrics`` to anyone (``--metrics-listen``;
      None: none; control's own listener serves it to loopback peers: :mod:`tailpy.control.metrics`).
    """

    state_dir: Path
    db: str | None = None
    host: str | None = None
    port: int = 8080
    domain: str | None = None
    prefix_v4: str | None = None
    prefix_v6: str | None = None
    key_lifetime: float | None = DEFAULT_KEY_LIFETIME
    ephemeral_timeout: float = DEFAULT_EPHEMERAL_TIMEOUT
    address_quarantine: float = DEFAULT_QUARANTINE
    derp: bool = True
    derp_host: str | None = None
    derp_port: int = DERP_PORT
    derp_hostname: str | None = None
    derp_region_id: int = 900
    derp_region_code: str = "tailpy"
    derp_map: DerpMap | None = None
    derp_map_file: Path | None = None
    derp_verify_clients: bool = True
    stun: bool = True
    stun_port: int = 3478
    oidc: OIDCConfig | None = None
    server_url: str | None = None
    admins: tuple[str, ...] = ()
    policy_file: Path | None = None
    mesh_with: tuple[str, ...] = ()
    mesh_psk_file: Path | None = None
    replica_id: str | None = None
    heartbeat: float = HEARTBEAT
    metrics_listen: tuple[str | None, int] | None = None

    def check(self) -> None:
        """Raise ConfigError for settings that cannot work together (region id out of range, or taken by
        ``derp_map``)."""
        if not 0 < self.derp_region_id < 1 << 31:
            raise ConfigError(f"--derp-region-id must be a positive integer, not {self.derp_region_id}")
        if self.derp_map is not None and self.derp and self.derp_region_id in self.derp_map.regions:
            source = f" {self.derp_map_file}" if self.derp_map_file is not None else ""
            raise ConfigError(
                f"--derp-map{source} has region {self.derp_region_id}, the embedded relay's: "
                "pass another --derp-region-id"
            )
        if self.mesh_with and self.mesh_psk_file is None:
            raise ConfigError("--mesh-with needs --mesh-psk-file (the region's mesh key)")
        if self.mesh_with and not self.derp:
            raise ConfigError("--mesh-with meshes the embedded DERP relay: it cannot go with --no-derp")


def derp_advertised_host(
    derp_host: str | None, listen_host: str | None, hostname: str | None, server_url: str | None = None
) -> str | None:
    """The host nodes are told to reach the embedded relay at: ``hostname`` (``--derp-hostname``) when
    given, else the host of ``server_url`` (``--server-url``: where nodes already reach control), else the
    relay's listen address when it is a specific one, else control's listen host when that is, else None
    (the relay runs but is not put in the DERP map; `tailpy control serve` refuses to start so)."""
    if hostname:
        return hostname
    if server_url:
        with contextlib.suppress(ValueError):
            host = urllib.parse.urlsplit(server_url).hostname
            if host:
                return host
    for h in (derp_host, listen_host):
        if h is not None and h not in WILDCARDS:
            return h
    return None


def embedded_derp_map(host: str, port: int, region_id: int, region_code: str, stun_port: int = -1) -> DerpMap:
    """The one-region, one-node DERP map of the embedded relay at ``host:port`` (plain HTTP, so
    InsecureForTests) with its STUN server on UDP ``stun_port`` (-1: none). An IP literal also goes into
    IPv4 / IPv6."""
    ipv4 = ipv6 = ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        ipv4, ipv6 = (str(ip), "") if ip.version == 4 else ("", str(ip))
    node = DerpNode(
        name=f"{region_id}a",
        region_id=region_id,
        host_name=host,
        ipv4=ipv4,
        ipv6=ipv6,
        stun_port=stun_port,
        derp_port=port,
        insecure_for_tests=True,
    )
    region = DerpRegion(region_id, region_code, f"tailpy embedded DERP ({region_code})", (node,))
    return DerpMap({region_id: region})


def prepare_state_dir(state_dir: Path) -> None:
    """Make ``state_dir`` (mode 0700) when it is missing. Raises ConfigError when its parent does not exist
    or it cannot be made."""
    if state_dir.exists():
        return
    if not state_dir.parent.is_dir():
        raise ConfigError(f"cannot create state directory {state_dir}: {state_dir.parent} does not exist")
    try:
        state_dir.mkdir(mode=0o700)
    except OSError as e:
        raise ConfigError(f"cannot create state directory {state_dir}: {e.strerror or e}") from None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ControlProcess:
    """The running parts of one control process; :meth:`start`, then :meth:`stop`.

    After :meth:`start`: ``store``, ``server`` (the :class:`~tailpy.control.server.ControlServer`),
    ``admin`` (the admin socket's server), ``relay`` and ``stun_server`` (None when not running), and
    ``derp_map`` (what netmaps carry; None: none).
    """

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.store: Store | None = None
        self.server: ControlServer | None = None
        self.admin: AdminServer | None = None
        self.relay: DerpServer | None = None
        self.stun_server: StunServer | None = None
        self.derp_map: DerpMap | None = config.derp_map
        self.mesh: RelayMesh | None = None
        """The embedded relay in its region's mesh and the DERP map of the live replicas' relays (None: no
        relay)."""
        self._own_region: DerpRegion | None = None  # the embedded relay, when in the DERP map
        self._static_mesh: Mesh | None = None  # --mesh-with of a relay left out of the DERP map
        self._derp_note: tuple[int, str] | None = (
            None  # logged after the "listening" line (read first by tools)
        )
        self._stun_note: tuple[int, str] | None = None
        self._sighup = False
        self.fatal: str | None = None
        """Why the process must stop (its replica id was taken over by another process); None: it runs."""
        self.died = asyncio.Event()
        """Set with :attr:`fatal`."""
        self._reloads: set[asyncio.Task[bool]] = set()  # SIGHUP reloads under way
        self.metrics_runner: web.AppRunner | None = None
        """The ``--metrics-listen`` listener (None: none)."""

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) control serves HTTP on (empty before :meth:`start`)."""
        return self.server.addresses if self.server is not None else []

    async def start(self) -> None:
        """Open the database, start the relay and STUN server (when configured; failures there are logged
        and leave them out), the control server and the admin socket, and log what listens where. Raises
        ConfigError (bad settings, unusable state directory, database or DERP key file, control's port
        taken), having stopped whatever it started."""
        cfg = self.config
        cfg.check()
        prepare_state_dir(cfg.state_dir)
        self.store = Store(cfg.state_dir, db=cfg.db, address_quarantine=cfg.address_quarantine)
        try:
            if cfg.derp:
                await self._start_relay(load_or_create_key(cfg.state_dir))
            settings = await self._start_control()
        except BaseException:
            await self.stop()
            raise
        self._log_started(settings.domain)
        if cfg.policy_file is not None:
            self._watch_sighup()

    def _watch_sighup(self) -> None:
        """SIGHUP reloads the policy file (as it makes many daemons re-read their configuration)."""
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_policy)
        except (RuntimeError, ValueError) as e:  # not the main thread: the file is still watched
            log.warning("cannot handle SIGHUP here (%s): the policy file is reloaded when it changes", e)
            return
        self._sighup = True

    def reload_policy(self) -> None:
        """Reload the policy file now (SIGHUP; checked off the event loop, see
        :meth:`tailpy.control.acl.PolicyKeeper.reload_async`); a bad file is logged and the running policy
        stays."""
        if self.server is not None:
            task = asyncio.get_running_loop().create_task(self.server.policy.reload_async("SIGHUP"))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def _start_relay(self, derp_key: MachinePrivate) -> None:
        cfg = self.config
        relay = DerpServer(derp_key)
        where = f"{cfg.derp_host or '*'}:{cfg.derp_port}"
        try:
            await relay.start(cfg.derp_host, cfg.derp_port)
        except OSError as e:
            await relay.stop()
            why = e.strerror or e
            self._derp_note = (
                logging.WARNING,
                f"embedded DERP relay cannot listen on {where} ({why}): left out",
            )
            return
        self.relay = relay
        stun_port = await self._start_stun() if cfg.stun else -1
        key_text = derp_key.public.text()
        bound = relay.addresses[0][1] if relay.addresses else cfg.derp_port
        advertised = derp_advertised_host(cfg.derp_host, cfg.host, cfg.derp_hostname, cfg.server_url)
        urls = ", ".join(f"{http_url(h, p)}/derp" for h, p in relay.addresses)
        if advertised is None:
            self._derp_note = (
                logging.WARNING,
                f"embedded DERP relay listening on {urls} (key {key_text}) but left out of the DERP map: "
                "pass --derp-hostname (the host or IP nodes reach it at)",
            )
            return
        own = embedded_derp_map(advertised, bound, cfg.derp_region_id, cfg.derp_region_code, stun_port)
        try:
            self.derp_map = own if cfg.derp_map is None else own.merged(cfg.derp_map)
        except ParseError as e:  # (region ids were checked by ControlConfig.check)
            raise ConfigError(str(e)) from None
        self._own_region = own.regions[cfg.derp_region_id]
        at = self._own_region.nodes[0].url()
        self._derp_note = (
            logging.INFO,
            f"embedded DERP relay listening on {urls} (key {key_text}), region "
            f"{cfg.derp_region_id} {cfg.derp_region_code!r} at {at}",
        )

    async def _start_stun(self) -> int:
        """Start the STUN server beside the relay; its bound port, or -1 when it cannot listen."""
        cfg = self.config
        assert self.relay is not None
        stun = StunServer()
        stun_host = None if cfg.derp_host == "0.0.0.0" else cfg.derp_host
        try:
            await stun.start(stun_host, cfg.stun_port)
        except OSError as e:
            self._stun_note = (
                logging.WARNING,
                f"STUN server cannot listen on UDP {stun_host or '*'}:{cfg.stun_port} "
                f"({e.strerror or e}): left out of the DERP map",
            )
            return -1
        self.stun_server = stun
        self.relay.extra_metrics.append(stun.metrics.prometheus)
        self.relay.registry.register(StunCollector(lambda: stun.metrics))
        listening = ", ".join(f"udp {Endpoint.from_sockaddr(a)}" for a in stun.addresses)
        self._stun_note = (logging.INFO, "STUN server listening on " + listening)
        return stun.addresses[0][1]

    async def _start_control(self) -> Settings:
        cfg = self.config
        assert self.store is not None
        settings = self.store.configure(domain=cfg.domain, prefix_v4=cfg.prefix_v4, prefix_v6=cfg.prefix_v6)
        replica_id = cfg.replica_id
        if replica_id is None and self.store.url.startswith("postgresql"):
            replica_id = f"{socket.gethostname()}:{cfg.port}"
        server = ControlServer(
            self.store,
            key_lifetime=cfg.key_lifetime,
            ephemeral_timeout=cfg.ephemeral_timeout,
            derp_map=self.derp_map,
            oidc=cfg.oidc,
            policy_file=cfg.policy_file,
            replica_id=replica_id,
            replica_url=cfg.server_url or http_url(cfg.host or socket.gethostname(), cfg.port),
            heartbeat=cfg.heartbeat,
            console=ConsoleConfig(admins=cfg.admins, server_url=cfg.server_url),
        )
        if self.relay is not None and cfg.derp_verify_clients:
            self.relay.verify_client = local_admission(server.derp_admits)
        if cfg.derp:
            server.extra_health["derp"] = self._derp_health
        if self.relay is not None:
            self._join_mesh(server)
            if self._meshed() is not None:
                server.extra_health["derp_mesh"] = self._mesh_health
        self.admin = AdminServer(
            Admin(self.store, server=server, key_lifetime=cfg.key_lifetime), cfg.state_dir / SOCKET_NAME
        )
        await self.admin.start()
        try:
            await server.start(cfg.host, cfg.port)
        except OSError as e:
            where = f"{_host_port(cfg.host, cfg.port) if cfg.host else f':{cfg.port}'}"
            raise ConfigError(f"cannot listen on {where}: {e.strerror or e}") from None
        server.replicas.on_fatal = self._die
        self.server = server
        if self.relay is not None:
            server.metrics.add(RelayCollector(self.relay.relay))
            server.metrics.add(
                StunCollector(lambda: None if self.stun_server is None else self.stun_server.metrics)
            )
        if cfg.metrics_listen is not None:
            try:
                self.metrics_runner = await start_metrics_listener(
                    server.metrics.registry, *cfg.metrics_listen
                )
            except OSError as e:
                host, port = cfg.metrics_listen
                where = _host_port(host, port) if host else f":{port}"
                raise ConfigError(f"cannot listen on --metrics-listen {where}: {e.strerror or e}") from None
        return settings

    def _die(self, why: str) -> None:
        if self.fatal is None:
            self.fatal = why
        self.died.set()

    def _join_mesh(self, server: ControlServer) -> None:
        """Put the embedded relay in its region's mesh (``--mesh-with`` relays, and with PostgreSQL the
        relays of the other live replicas, followed at each heartbeat) and keep the DERP map in step."""
        cfg = self.config
        assert self.relay is not None and self.store is not None
        mesh_key: bytes | None = None
        if cfg.mesh_psk_file is not None:
            mesh_key = read_mesh_key(cfg.mesh_psk_file)
        if server.replicas.liveness:  # (PostgreSQL, or replica ids given: replicas of one database)
            with self.store.engine.begin() as conn:
                given = None if mesh_key is None else mesh_key.hex()
                kept = parse_mesh_key(changes.shared_mesh_key(conn, given))
            if mesh_key is not None and kept != mesh_key:
                raise ConfigError(
                    f"--mesh-psk-file {cfg.mesh_psk_file} holds another DERP mesh key than the one the "
                    "replicas of this database use (their relays would refuse this one): give every replica "
                    "the same file, or leave --mesh-psk-file out (`tailpy control mesh-key --out FILE` "
                    "writes the database's key for standalone relays)"
                )
            mesh_key = kept
        peers = mesh_urls(cfg.mesh_with, tls=False)
        own = self._own_region
        if own is None:  # (not in the DERP map: nobody to tell where it is; --mesh-with still holds)
            if mesh_key is not None:
                self._static_mesh = start_mesh(self.relay.relay, peers, mesh_key)
            return

        def on_map(derp_map: DerpMap) -> None:
            self.derp_map = derp_map
            server.mapper.set_derp_map(derp_map)

        self.mesh = RelayMesh(
            self.relay.relay,
            server.replicas.id,
            own,
            static_map=cfg.derp_map,
            mesh_key=mesh_key,
            static_peers=peers,
            on_map=on_map,
        )
        if server.replicas.liveness:
            server.replicas.relay = self.mesh.record
            server.replicas.on_relays = self.mesh.update
        if peers:
            log.info("DERP mesh: meshing with %s", ", ".join(peers))

    def _meshed(self) -> Mesh | None:
        """The embedded relay's mesh (None: not meshed)."""
        return self.mesh.mesh if self.mesh is not None and self.mesh.mesh is not None else self._static_mesh

    def _mesh_health(self) -> dict[str, Any]:
        """The embedded relay's mesh in control's ``GET /health``: "warning" (degraded) while a peer of its
        region (another replica's relay, a --mesh-with relay) is not watched (:meth:`Mesh.health`)."""
        mesh = self._meshed()
        return {"status": "ok", "peers": 0} if mesh is None else mesh.health()

    def _derp_health(self) -> dict[str, Any]:
        """The embedded relay's part of control's ``GET /health``: "error" when it does not run, "warning"
        when it runs but nodes were not told where (left out of the DERP map)."""
        if self.relay is None:
            return {"status": "error", "error": self._derp_note[1] if self._derp_note else "not running"}
        doc = self.relay.health()
        region = self.config.derp_region_id
        in_map = self.derp_map is not None and region in self.derp_map.regions
        status = doc["status"] if in_map or doc["status"] == "error" else "warning"
        return {"status": status, "in_derp_map": in_map, **doc["checks"]["relay"]}

    def _log_started(self, domain: str) -> None:
        assert self.server is not None and self.store is not None
        log.info(
            "control server listening on %s (key %s, state %s, domain %s, database %s)",
            " and ".join(http_url(h, p) for h, p in self.server.addresses),
            self.server.public_key.text(),
            self.config.state_dir,
            domain,
            self.store.where,
        )
        if self._derp_note is not None:
            log.log(*self._derp_note)
        pol = self.server.policy.running
        if pol.source == "file":
            log.info("policy from %s (reloaded when it changes and on SIGHUP)", pol.path)
        elif pol.policy is None:
            log.info("policy: none set (every node may reach every other)")
        else:
            log.info("policy: %d from the database, set by %s", pol.id, pol.set_by or "?")
        oidc = self.config.oidc
        if oidc is not None:
            log.info("login with %s enabled; login links start at %s", oidc.issuer, oidc.server_url)
        regions = sorted(self.derp_map.regions) if self.derp_map is not None else []
        log.info("DERP map: %s", ", ".join(map(str, regions)) if regions else "none")
        if self._stun_note is not None:
            log.log(*self._stun_note)
        if self.metrics_runner is not None:
            where = " and ".join(
                f"{http_url(str(a[0]), int(a[1]))}/metrics" for a in self.metrics_runner.addresses
            )
            log.info("metrics served at %s (and to loopback at control's /metrics)", where)

    async def stop(self) -> None:
        """Stop the admin socket, control, the STUN server and the relay, and close the database (each that
        runs; safe to call twice)."""
        if self._sighup:
            self._sighup = False
            with contextlib.suppress(RuntimeError):  # (the loop may be closing)
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._reloads):
            task.cancel()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        if self._static_mesh is not None:
            await self._static_mesh.stop()
            self._static_mesh = None
        if self.stun_server is not None:
            await self.stun_server.stop()
            self.stun_server = None
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        if self.store is not None:
            self.store.close()
            self.store = None


GC_THRESHOLDS = (50_000, 20, 20)
"""The cyclic garbage collector's thresholds in a control process (CPython's default: 700, 10, 10). A
control server holds millions of long-lived objects (every node's record, every stream's connection); with
the defaults a policy compile or a burst of stream openings triggers collections that scan them all (at
10,000 nodes half the CPU of a policy change went to the collector). Memory is still freed by reference
counting; only cycles wait longer."""


def tune_gc() -> None:
    """Set :data:`GC_THRESHOLDS` (call once, in a process that runs control)."""
    gc.set_threshold(*GC_THRESHOLDS)


async def run_control(config: ControlConfig, stop: asyncio.Event | None = None) -> None:
    """Run the control process until ``stop`` is set (default: until SIGTERM or SIGINT, whose handlers are
    installed before the startup lines are logged, so a reader may signal as soon as it sees them). Raises
    ConfigError as :meth:`ControlProcess.start`."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    process = ControlProcess(config)
    await process.start()
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(process.died.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down")
    finally:
        for w in waits:
            w.cancel()
        await process.stop()
    if process.fatal is not None:
        raise ControlError(process.fatal)


__all__ = [
    "DEFAULT_EPHEMERAL_TIMEOUT",
    "DERP_PORT",
    "GC_THRESHOLDS",
    "ControlConfig",
    "ControlProcess",
    "derp_advertised_host",
    "embedded_derp_map",
    "prepare_state_dir",
    "run_control",
    "tune_gc",
]
