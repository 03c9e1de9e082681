"""The local API's answers as types: a node's status, a peer, a ping's answer (Tailscale's
``ipn/ipnstate/ipnstate.go``: ``Status``, ``PeerStatus``, ``PingResult``).

tailpyd builds these (:meth:`tailpy.daemon.backend.Backend.status`, ``whois``, ``ping``) and sends them as
JSON (``to_json``: snake_case keys, unix seconds, null for unknown, the shape README "Status JSON" documents);
the CLI parses them back (``from_json``, raising :class:`tailpy.errors.ParseError`) and reads fields.
``from_json(x.to_json()) == x`` and ``from_json(obj).to_json() == obj`` for what tailpyd sends.

* :class:`Status`: the node (:class:`SelfStatus`), its peers (:class:`PeerStatus`, sorted by name), the DERP
  side (:class:`DerpStatus`), NAT traversal (:class:`TraversalStatus`, with the last netcheck
  :class:`~tailpy.magicsock.netcheck.Report`), the DERP map (:class:`~tailpy.netmap.DerpMap`). Two parts stay
  mappings passed through as the daemon has them: ``device`` (the Rust data plane's counters,
  ``tailpy._native.Device.stats``, which grows with the data plane) and ``dns`` (``DNSManager.status``).
* :class:`PeerStatus`: one node as ``status`` lists a peer and ``whois`` answers.
* :class:`PingReply`: one disco ping's answer (``tailpy ping``), with :class:`PingPeer`, the peer pinged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tailpy.endpoint import Endpoint
from tailpy.errors import ParseError
from tailpy.keys import DiscoPublic, MachinePublic, NodePublic
from tailpy.netmap import DerpMap

if TYPE_CHECKING:  # imported where used: magicsock's modules build these types
    from tailpy.magicsock.netcheck import Report

T = TypeVar("T")

_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError)


def _parse(kind: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except ParseError:
        raise
    except _ERRORS as e:
        raise ParseError(f"malformed {kind} in the local API's answer: {e!r}") from None


def _num(v: Any) -> float:
    """A JSON number as it came (an int stays an int, so it serialises back the same)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {v!r}")
    return v


def _opt_float(v: Any) -> float | None:
    return None if v is None else _num(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_endpoint(v: Any) -> Endpoint | None:
    return None if v is None else Endpoint.parse(v)


def _strs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return tuple(str(x) for x in v)


def _endpoints(v: Any) -> tuple[Endpoint, ...]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list of endpoints, got {type(v).__name__}")
    return tuple(Endpoint.parse(x) for x in v)


def _mapping(v: Any) -> Mapping[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise TypeError(f"expected an object, got {type(v).__name__}")
    return v


def _counts(v: Any) -> dict[str, int]:
    """A JSON object of counts: ``{"name": n, ...}``."""
    if not isinstance(v, dict):
        raise TypeError(f"expected an object of counts, got {type(v).__name__}")
    out: dict[str, int] = {}
    for k, n in v.items():
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"expected a count, got {n!r}")
        out[str(k)] = n
    return out


# --- nodes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerStatus:
    """One node of the netmap as ``status`` shows a peer (and ``whois`` any node).

    From the netmap: ``id``, ``name`` (DNS label), ``fqdn``, ``hostname``, ``user`` (owner's login name, ""
    for a tagged node), ``tags``, ``os``, ``node_key``, ``addresses`` (CIDR host prefixes), ``online``,
    ``last_seen`` / ``key_expiry`` (unix seconds or None), ``expired``, ``home_derp`` (region id, 0 none),
    ``disco_key`` (None: the node runs no disco), ``endpoints`` (where it says it can be reached).
    From the data plane: ``path`` ("direct" for an endpoint that answered: a disco Pong, or a handshake for
    a peer without disco; "relay"; None for no path yet or a peer not in the data plane), ``endpoint`` (the
    direct path's endpoint; None unless ``path`` is "direct"), ``relay_region`` /
    ``relay_region_code`` (the DERP region relayed through, 0 / "" when direct), ``last_handshake`` (unix
    seconds or None), ``active`` (a handshake within the last 180 s), ``tx_bytes`` / ``rx_bytes``.
    Routes (CIDR prefixes, :mod:`tailpy.routes`): ``primary_routes`` (the subnet routes it is the primary
    router for, ``tailcfg.Node.PrimaryRoutes``), ``allowed_ips`` (what this node may send to it, as control
    says: ``tailcfg.Node.AllowedIPs``), ``exit_node_option`` (it offers to be this node's exit node),
    ``exit_node`` (it is this node's exit node now)."""

    id: int
    name: str
    fqdn: str
    hostname: str
    user: str
    tags: tuple[str, ...]
    os: str
    node_key: NodePublic
    addresses: tuple[str, ...]
    online: bool
    last_seen: float | None
    key_expiry: float | None
    expired: bool
    home_derp: int
    disco_key: DiscoPublic | None
    endpoints: tuple[Endpoint, ...]
    endpoint: Endpoint | None
    path: str | None
    relay_region: int
    relay_region_code: str
    last_handshake: float | None
    active: bool
    tx_bytes: int
    rx_bytes: int
    primary_routes: tuple[str, ...] = ()
    allowed_ips: tuple[str, ...] = ()
    exit_node_option: bool = False
    exit_node: bool = False

    @property
    def first_ip(self) -> str:
        """The first tailnet address without its prefix length, "-" when there is none."""
        return self.addresses[0].split("/")[0] if self.addresses else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "fqdn": self.fqdn,
            "hostname": self.hostname,
            "user": self.user,
            "tags": list(self.tags),
            "os": self.os,
            "node_key": self.node_key.text(),
            "addresses": list(self.addresses),
            "online": self.online,
            "last_seen": self.last_seen,
            "key_expiry": self.key_expiry,
            "expired": self.expired,
            "home_derp": self.home_derp,
            "disco_key": None if self.disco_key is None else self.disco_key.text(),
            "endpoints": [str(e) for e in self.endpoints],
            "endpoint": None if self.endpoint is None else str(self.endpoint),
            "path": self.path,
            "relay_region": self.relay_region,
            "relay_region_code": self.relay_region_code,
            "last_handshake": self.last_handshake,
            "active": self.active,
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "primary_routes": list(self.primary_routes),
            "allowed_ips": list(self.allowed_ips),
            "exit_node_option": self.exit_node_option,
            "exit_node": self.exit_node,
        }

    @classmethod
    def from_json(cls, obj: Any) -> PeerStatus:
        """Raises ParseError."""
        return _parse(
            "peer status",
            lambda: cls(
                id=int(obj["id"]),
                name=str(obj["name"]),
                fqdn=str(obj["fqdn"]),
                hostname=str(obj["hostname"]),
                user=str(obj["user"]),
                tags=_strs(obj["tags"]),
                os=str(obj["os"]),
                node_key=NodePublic.from_text(str(obj["node_key"])),
                addresses=_strs(obj["addresses"]),
                online=bool(obj["online"]),
                last_seen=_opt_float(obj["last_seen"]),
                key_expiry=_opt_float(obj["key_expiry"]),
                expired=bool(obj["expired"]),
                home_derp=int(obj["home_derp"]),
                disco_key=None if obj["disco_key"] is None else DiscoPublic.from_text(str(obj["disco_key"])),
                endpoints=_endpoints(obj["endpoints"]),
                endpoint=_opt_endpoint(obj["endpoint"]),
                path=_opt_str(obj["path"]),
                relay_region=int(obj["relay_region"]),
                relay_region_code=str(obj["relay_region_code"]),
                last_handshake=_opt_float(obj["last_handshake"]),
                active=bool(obj["active"]),
                tx_bytes=int(obj["tx_bytes"]),
                rx_bytes=int(obj["rx_bytes"]),
                primary_routes=_strs(obj.get("primary_routes", [])),
                allowed_ips=_strs(obj.get("allowed_ips", [])),
                exit_node_option=bool(obj.get("exit_node_option", False)),
                exit_node=bool(obj.get("exit_node", False)),
            ),
        )


@dataclass(frozen=True)
class SelfStatus:
    """This node: ``id`` (None before the first registration), ``name``, ``fqdn``, ``hostname``, ``user``,
    ``tags``, ``os``, ``key_expiry`` (unix seconds or None), ``expired`` (from the netmap; empty before the
    first one), its keys, ``addresses`` (CIDR host prefixes), ``listen_port`` and ``tun`` (None without a
    data plane), ``endpoints`` (as last sent to control), ``home_derp`` (region id, 0 none) and
    ``home_derp_code``. Routes (CIDR prefixes): ``advertised_routes`` (what it offers, ``tailpy up
    --advertise-routes``, exit routes included with ``--advertise-exit-node``), ``approved_routes`` (those
    control approved), ``primary_routes`` (the subnet routes it serves now as primary router),
    ``control_routes`` (the advertised routes control has: its netmap's self node ``routable_ips``; once they
    equal ``advertised_routes``, ``approved_routes`` is control's answer to them); an advertised route not
    approved awaits an admin's approval."""

    id: int | None
    name: str
    fqdn: str
    hostname: str
    user: str
    tags: tuple[str, ...]
    os: str
    key_expiry: float | None
    expired: bool
    node_key: NodePublic
    machine_key: MachinePublic
    disco_key: DiscoPublic
    addresses: tuple[str, ...]
    listen_port: int | None
    endpoints: tuple[Endpoint, ...]
    tun: str | None
    home_derp: int
    home_derp_code: str
    name_by_admin: bool = False  # control says an admin gave this node its name (a new hostname keeps it)
    name_pending: bool = False  # control has not yet taken the hostname asked for (it was not reachable)
    advertised_routes: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()
    primary_routes: tuple[str, ...] = ()
    control_routes: tuple[str, ...] = ()

    @property
    def first_ip(self) -> str:
        """The first tailnet address without its prefix length, "-" when there is none."""
        return self.addresses[0].split("/")[0] if self.addresses else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "fqdn": self.fqdn,
            "hostname": self.hostname,
            "user": self.user,
            "tags": list(self.tags),
            "os": self.os,
            "key_expiry": self.key_expiry,
            "expired": self.expired,
            "node_key": self.node_key.text(),
            "machine_key": self.machine_key.text(),
            "disco_key": self.disco_key.text(),
            "addresses": list(self.addresses),
            "listen_port": self.listen_port,
            "endpoints": [str(e) for e in self.endpoints],
            "tun": self.tun,
            "home_derp": self.home_derp,
            "home_derp_code": self.home_derp_code,
            "name_by_admin": self.name_by_admin,
            "name_pending": self.name_pending,
            "advertised_routes": list(self.advertised_routes),
            "approved_routes": list(self.approved_routes),
            "primary_routes": list(self.primary_routes),
            "control_routes": list(self.control_routes),
        }

    @classmethod
    def from_json(cls, obj: Any) -> SelfStatus:
        """Raises ParseError."""
        return _parse(
            "self status",
            lambda: cls(
                id=_opt_int(obj["id"]),
                name=str(obj["name"]),
                fqdn=str(obj["fqdn"]),
                hostname=str(obj["hostname"]),
                user=str(obj["user"]),
                tags=_strs(obj["tags"]),
                os=str(obj["os"]),
                key_expiry=_opt_float(obj["key_expiry"]),
                expired=bool(obj["expired"]),
                node_key=NodePublic.from_text(str(obj["node_key"])),
                machine_key=MachinePublic.from_text(str(obj["machine_key"])),
                disco_key=DiscoPublic.from_text(str(obj["disco_key"])),
                addresses=_strs(obj["addresses"]),
                listen_port=_opt_int(obj["listen_port"]),
                endpoints=_endpoints(obj["endpoints"]),
                tun=_opt_str(obj["tun"]),
                home_derp=int(obj["home_derp"]),
                home_derp_code=str(obj["home_derp_code"]),
                name_by_admin=bool(obj.get("name_by_admin", False)),
                name_pending=bool(obj.get("name_pending", False)),
                advertised_routes=_strs(obj.get("advertised_routes", [])),
                approved_routes=_strs(obj.get("approved_routes", [])),
                primary_routes=_strs(obj.get("primary_routes", [])),
                control_routes=_strs(obj.get("control_routes", [])),
            ),
        )


# --- DERP and NAT traversal ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerpConnStatus:
    """One open DERP region connection: ``region_id``, ``region_code``, ``home`` (this node's home region),
    ``connected``, ``url``, counters ``sent`` / ``received`` / ``dropped`` / ``peer_gone``, ``last_error``
    (None since the last successful connect), ``health`` (the server's last Health problem, "" none)."""

    region_id: int
    region_code: str
    home: bool
    connected: bool
    url: str
    sent: int
    received: int
    dropped: int
    peer_gone: int
    last_error: str | None
    health: str

    def to_json(self) -> dict[str, Any]:
        return {
            "region_id": self.region_id,
            "region_code": self.region_code,
            "home": self.home,
            "connected": self.connected,
            "url": self.url,
            "sent": self.sent,
            "received": self.received,
            "dropped": self.dropped,
            "peer_gone": self.peer_gone,
            "last_error": self.last_error,
            "health": self.health,
        }

    @classmethod
    def from_json(cls, obj: Any) -> DerpConnStatus:
        """Raises ParseError."""
        return _parse(
            "DERP connection status",
            lambda: cls(
                region_id=int(obj["region_id"]),
                region_code=str(obj["region_code"]),
                home=bool(obj["home"]),
                connected=bool(obj["connected"]),
                url=str(obj["url"]),
                sent=int(obj["sent"]),
                received=int(obj["received"]),
                dropped=int(obj["dropped"]),
                peer_gone=int(obj["peer_gone"]),
                last_error=_opt_str(obj["last_error"]),
                health=str(obj["health"]),
            ),
        )


@dataclass(frozen=True)
class DerpStatus:
    """The DERP side of the node: ``home_derp`` (region id, 0 none) and ``home_derp_code``, ``latency_ms``
    (region id -> milliseconds of the last report; JSON keys are the ids as text), ``connections``, and the
    counters ``relay_sent`` / ``relay_dropped`` (WireGuard datagrams to DERP), ``derp_received`` /
    ``derp_dropped`` (from DERP), ``disco_dropped``; ``not_here`` (PeerGone "not here" answers: a peer
    not connected to the region it was sent through) and ``not_here_peers`` (node keys, as text, of the peers
    not sent to through that region until their netmap entry changes)."""

    home_derp: int
    home_derp_code: str
    latency_ms: dict[int, float]
    connections: tuple[DerpConnStatus, ...]
    relay_sent: int
    relay_dropped: int
    derp_received: int
    derp_dropped: int
    disco_dropped: int
    not_here: int = 0
    not_here_peers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "home_derp": self.home_derp,
            "home_derp_code": self.home_derp_code,
            "latency_ms": {str(r): ms for r, ms in sorted(self.latency_ms.items())},
            "connections": [c.to_json() for c in self.connections],
            "relay_sent": self.relay_sent,
            "relay_dropped": self.relay_dropped,
            "derp_received": self.derp_received,
            "derp_dropped": self.derp_dropped,
            "disco_dropped": self.disco_dropped,
            "not_here": self.not_here,
            "not_here_peers": list(self.not_here_peers),
        }

    @classmethod
    def from_json(cls, obj: Any) -> DerpStatus:
        """Raises ParseError."""
        return _parse(
            "DERP status",
            lambda: cls(
                home_derp=int(obj["home_derp"]),
                home_derp_code=str(obj["home_derp_code"]),
                latency_ms={int(r): _num(ms) for r, ms in obj["latency_ms"].items()},
                connections=tuple(DerpConnStatus.from_json(c) for c in obj["connections"]),
                relay_sent=int(obj["relay_sent"]),
                relay_dropped=int(obj["relay_dropped"]),
                derp_received=int(obj["derp_received"]),
                derp_dropped=int(obj["derp_dropped"]),
                disco_dropped=int(obj["disco_dropped"]),
                not_here=int(obj.get("not_here", 0)),
                not_here_peers=_strs(obj.get("not_here_peers", [])),
            ),
        )


@dataclass(frozen=True)
class DiscoPeerStatus:
    """Disco's view of one peer: ``path`` (the direct endpoint in use, None: relay), ``latency_ms`` (the
    path's last round trip, None unknown), ``active`` (traffic lately, so disco keeps the path fresh)."""

    path: Endpoint | None
    latency_ms: float | None
    active: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "path": None if self.path is None else str(self.path),
            "latency_ms": self.latency_ms,
            "active": self.active,
        }

    @classmethod
    def from_json(cls, obj: Any) -> DiscoPeerStatus:
        """Raises ParseError."""
        return _parse(
            "disco peer status",
            lambda: cls(_opt_endpoint(obj["path"]), _opt_float(obj["latency_ms"]), bool(obj["active"])),
        )


@dataclass(frozen=True)
class TraversalStatus:
    """NAT traversal (disco, STUN, netcheck): ``endpoints`` (this node's, local and STUN-mapped), ``disco``
    (counter name -> count, :class:`tailpy.magicsock.disco.DiscoCounters`), ``send_errors`` (datagrams the
    kernel refused), ``copied`` (relayed handshakes also sent straight to a best-guess endpoint),
    ``link_changes``, ``ignored`` (datagrams neither disco nor STUN), ``stun_unmatched``, ``netcheck`` (the
    last report, without its probes; None before the first), ``peers`` (disco's view per peer)."""

    endpoints: tuple[Endpoint, ...]
    disco: dict[str, int]
    send_errors: int
    copied: int
    link_changes: int
    ignored: int
    stun_unmatched: int
    netcheck: Report | None
    peers: dict[NodePublic, DiscoPeerStatus] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        nc = None
        if self.netcheck is not None:
            nc = self.netcheck.to_json()
            nc.pop("probes", None)
        return {
            "endpoints": [str(e) for e in self.endpoints],
            "disco": dict(self.disco),
            "send_errors": self.send_errors,
            "copied": self.copied,
            "link_changes": self.link_changes,
            "ignored": self.ignored,
            "stun_unmatched": self.stun_unmatched,
            "netcheck": nc,
            "peers": {k.text(): p.to_json() for k, p in self.peers.items()},
        }

    @classmethod
    def from_json(cls, obj: Any) -> TraversalStatus:
        """Raises ParseError."""
        from tailpy.magicsock.netcheck import Report

        return _parse(
            "traversal status",
            lambda: cls(
                endpoints=_endpoints(obj["endpoints"]),
                disco={str(k): int(v) for k, v in obj["disco"].items()},
                send_errors=int(obj["send_errors"]),
                copied=int(obj["copied"]),
                link_changes=int(obj["link_changes"]),
                ignored=int(obj["ignored"]),
                stun_unmatched=int(obj["stun_unmatched"]),
                netcheck=None if obj["netcheck"] is None else Report.from_json(obj["netcheck"]),
                peers={
                    NodePublic.from_text(str(k)): DiscoPeerStatus.from_json(v)
                    for k, v in obj["peers"].items()
                },
            ),
        )


# --- the whole status ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthWarning:
    """One unhealthy warning of :class:`tailpy.daemon.health.Tracker` (Tailscale's ``health.UnhealthyState``):
    ``name`` (the warnable's code, e.g. "home-derp-unreachable"), ``severity`` ("high", "medium", "low"),
    ``text`` (one sentence: what is wrong and what to do), ``since`` (unix seconds it became unhealthy)."""

    name: str
    severity: str
    text: str
    since: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "severity": self.severity, "text": self.text, "since": self.since}

    @classmethod
    def from_json(cls, obj: Any) -> HealthWarning:
        """Raises ParseError."""
        return _parse(
            "health warning",
            lambda: cls(str(obj["name"]), str(obj["severity"]), str(obj["text"]), _num(obj["since"])),
        )


@dataclass(frozen=True)
class Status:
    """``GET /localapi/v0/status``, what ``tailpy status --json`` prints.

    ``backend_state``: "NoState", "NeedsLogin", "Starting", "Running" or "Stopped"; ``login_server``;
    ``control_connected``; ``control_url`` (the URL of the current map stream, one of ``login_server``'s
    comma-separated URLs, or of the last stream while none is up; "" before any); ``map_stream_starts``
    (``{"netmap": n, "delta": n}``: how this node's map streams began, with a full netmap or resumed with a
    delta, ``tailpy.control.client.ControlClient.stream_starts``; {} from an older tailpyd); ``error`` (the
    last problem, "" none); ``auth_url`` (where to sign in while an interactive login waits, "" otherwise) and
    ``login_pending``; ``health`` (:class:`HealthWarning`, the most severe first); ``now`` (unix seconds, the
    daemon's clock when it answered); ``self_node`` (JSON ``self``); ``domain`` (the tailnet's DNS domain);
    ``peers`` sorted by name; ``device``, ``derp``, ``derp_map`` and ``traversal`` (None without a data plane,
    or before a netmap for ``derp_map``); ``ignored_datagrams``; ``dns`` (None without MagicDNS);
    ``exit_node`` (the exit node this node sends its internet traffic through: the peer's name, or the
    preference as given when no peer matches it; None when it uses none)."""

    backend_state: str
    login_server: str
    control_connected: bool
    error: str
    auth_url: str
    login_pending: bool
    health: tuple[HealthWarning, ...]
    now: float
    self_node: SelfStatus
    domain: str
    peers: tuple[PeerStatus, ...]
    device: Mapping[str, Any] | None
    derp: DerpStatus | None
    derp_map: DerpMap | None
    traversal: TraversalStatus | None
    ignored_datagrams: int
    dns: Mapping[str, Any] | None
    exit_node: str | None = None
    control_url: str = ""
    map_stream_starts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend_state": self.backend_state,
            "login_server": self.login_server,
            "control_connected": self.control_connected,
            "control_url": self.control_url,
            "map_stream_starts": dict(self.map_stream_starts),
            "error": self.error,
            "auth_url": self.auth_url,
            "login_pending": self.login_pending,
            "health": [w.to_json() for w in self.health],
            "now": self.now,
            "self": self.self_node.to_json(),
            "domain": self.domain,
            "peers": [p.to_json() for p in self.peers],
            "device": None if self.device is None else dict(self.device),
            "derp": None if self.derp is None else self.derp.to_json(),
            "derp_map": None if self.derp_map is None else self.derp_map.to_json(),
            "traversal": None if self.traversal is None else self.traversal.to_json(),
            "ignored_datagrams": self.ignored_datagrams,
            "dns": None if self.dns is None else dict(self.dns),
            "exit_node": self.exit_node,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Status:
        """Raises ParseError."""
        return _parse(
            "status",
            lambda: cls(
                backend_state=str(obj["backend_state"]),
                login_server=str(obj["login_server"]),
                control_connected=bool(obj["control_connected"]),
                error=str(obj["error"]),
                auth_url=str(obj["auth_url"]),
                login_pending=bool(obj["login_pending"]),
                health=tuple(HealthWarning.from_json(w) for w in obj["health"]),
                now=_num(obj["now"]),
                self_node=SelfStatus.from_json(obj["self"]),
                domain=str(obj["domain"]),
                peers=tuple(PeerStatus.from_json(p) for p in obj["peers"]),
                device=_mapping(obj["device"]),
                derp=None if obj["derp"] is None else DerpStatus.from_json(obj["derp"]),
                derp_map=None if obj["derp_map"] is None else DerpMap.from_json(obj["derp_map"]),
                traversal=None if obj["traversal"] is None else TraversalStatus.from_json(obj["traversal"]),
                ignored_datagrams=int(obj["ignored_datagrams"]),
                dns=_mapping(obj["dns"]),
                exit_node=_opt_str(obj.get("exit_node")),
                control_url=str(obj.get("control_url", "")),
                map_stream_starts=_counts(obj.get("map_stream_starts", {})),
            ),
        )


# --- ping -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PingPeer:
    """The peer a ping went to: ``name``, ``fqdn``, ``ip`` (its first tailnet address, "" none)."""

    name: str
    fqdn: str
    ip: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "fqdn": self.fqdn, "ip": self.ip}

    @classmethod
    def from_json(cls, obj: Any) -> PingPeer:
        """Raises ParseError."""
        return _parse("ping peer", lambda: cls(str(obj["name"]), str(obj["fqdn"]), str(obj["ip"])))


@dataclass(frozen=True)
class PingReply:
    """One ``tailpy ping`` answer (``POST /localapi/v0/ping``): ``via`` ``"DERP(<region code>)"`` or the
    direct endpoint's text ``"ip:port"``, ``rtt`` seconds, ``peer_saw`` our source as the peer saw it for
    a Pong that came directly, None (JSON null) for one that came via DERP (the peer saw only the DERP
    placeholder ``127.3.3.40:<region>``, not an address of ours); ``timeout`` True (``via`` empty, ``rtt``
    and ``peer_saw`` None) when no Pong came in time. ``peer``: the peer pinged (None where a reply is
    made, before the daemon names the peer; always set in the local API's answer)."""

    direct: bool
    via: str
    rtt: float | None
    peer_saw: Endpoint | None = None
    timeout: bool = False
    peer: PingPeer | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"peer"?, "direct", "via", "rtt", "peer_saw", "timeout"}`` (``peer`` only when set)."""
        out: dict[str, Any] = {} if self.peer is None else {"peer": self.peer.to_json()}
        out.update(
            {
                "direct": self.direct,
                "via": self.via,
                "rtt": self.rtt,
                "peer_saw": None if self.peer_saw is None else str(self.peer_saw),
                "timeout": self.timeout,
            }
        )
        return out

    @classmethod
    def from_json(cls, obj: Any) -> PingReply:
        """Raises ParseError."""
        return _parse(
            "ping reply",
            lambda: cls(
                direct=bool(obj["direct"]),
                via=str(obj["via"]),
                rtt=_opt_float(obj["rtt"]),
                peer_saw=_opt_endpoint(obj["peer_saw"]),
                timeout=bool(obj["timeout"]),
                peer=None if obj.get("peer") is None else PingPeer.from_json(obj["peer"]),
            ),
        )


__all__ = [
    "DerpConnStatus",
    "DerpStatus",
    "DiscoPeerStatus",
    "HealthWarning",
    "PeerStatus",
    "PingPeer",
    "PingReply",
    "SelfStatus",
    "Status",
    "TraversalStatus",
]
