"""tailpyd's health: named warnings, each a sentence with what to do, after Tailscale's ``health`` package
(``health/health.go`` ``Tracker``, ``health/warnings.go``'s ``Warnable`` with a code, a severity and a text).

A :class:`Warnable` is a kind of problem (``control-unreachable``, ``home-derp-unreachable`` ...), declared
once in this module; a :class:`Tracker` holds which of them are unhealthy now, each instance under a key
(``handshake-failing`` has one per peer). The daemon sets and clears them from what it sees
(:meth:`Tracker.set_unhealthy`, :meth:`Tracker.set_healthy`); :meth:`Tracker.warnings` gives them for
``tailpy status`` (JSON: a list of ``{name, severity, text, since}``). A new warning and a cleared one are
logged once, a changed text at most once per :data:`RELOG_AFTER`; never per tick.

:func:`evaluate` sets and clears every warning from one look at the node (:class:`Inputs`, which the
daemon's backend gathers every 2 s). The checks that need state of their own live here too, sans-IO with
``now`` passed in: :class:`HandshakeWatch` (handshake initiations sent to a peer and no handshake completed)
and :func:`clock_skew_text`.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from tailpy.ipnstate import HealthWarning

log = logging.getLogger("tailpy.daemon")

CLOCK_SKEW_MAX = 60.0
"""Seconds this host's clock may differ from control's (its replies' ``Date`` header) before a warning; the
control protocol refuses requests beyond ``tailpy.proto.control.REPLAY_WINDOW`` (120 s)."""
HANDSHAKE_FAIL_AFTER = 15.0
"""Seconds of handshake initiations without a completed handshake before a peer's handshakes count as
failing: three REKEY_TIMEOUTs of 5 s (WireGuard paper section 6.4), well before REKEY_ATTEMPT_TIME's 90 s
after which WireGuard gives up."""
HANDSHAKE_FAIL_MIN = 3
"""Initiations sent in that time before it counts (a peer that was sent one and is quiet is not failing)."""
HANDSHAKE_IDLE_CLEAR = 60.0
"""Seconds without a new initiation after which a failing peer's warning clears (no more traffic to it)."""
RELOG_AFTER = 60.0
"""Seconds before a warning whose text changed (a new error from each reconnect, say) is logged again."""
CONTROL_GRACE = 10.0
"""Seconds without a map stream before ``control-unreachable`` shows (reconnects take about a second)."""


class Severity(enum.Enum):
    """How much a warning matters (``health.Severity``): high breaks connectivity, medium degrades it."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


@dataclass(frozen=True)
class Warnable:
    """A kind of problem: ``code`` (its name in status), ``severity``, and ``text(args)``: one sentence
    saying what is wrong and what to do, from the instance's arguments."""

    code: str
    severity: Severity
    text: Callable[[Mapping[str, str]], str]


CONTROL_UNREACHABLE = Warnable(
    "control-unreachable",
    Severity.MEDIUM,
    lambda a: (
        f"control server {a['url']} unreachable since {a['since']}: {a['error']}; peers keep working on "
        "the last netmap, changes wait (check that control runs and that this host reaches it: "
        f"`curl {a['url']}/key`)"
    ),
)
NO_DERP_MAP = Warnable(
    "no-derp-map",
    Severity.MEDIUM,
    lambda a: (
        "control sent no DERP map: peers that cannot reach each other directly (behind NAT) have no relay; "
        "run control with its embedded relay reachable (`--server-url` or `--derp-hostname`) or give it "
        "`--derp-map FILE`"
    ),
)
HOME_DERP_UNREACHABLE = Warnable(
    "home-derp-unreachable",
    Severity.HIGH,
    lambda a: f"home DERP relay {a['region']} unreachable: {a['error']}; {a['todo']}",
)
HANDSHAKE_FAILING = Warnable(
    "handshake-failing",
    Severity.MEDIUM,
    lambda a: (
        f"handshakes with peer {a['peer']} are failing: {a['sent']} initiations since {a['since']} got no "
        "answer (a wrong or stale node key on either side, or a path that drops UDP); check "
        f"`tailpy ping {a['peer']}` and that {a['peer']} runs `tailpy up` with its current key"
    ),
)
DNS_NOT_APPLIED = Warnable(
    "dns-not-applied",
    Severity.MEDIUM,
    lambda a: (
        f"MagicDNS is not applied to this host's resolver: {a['error']}; names of peers do not resolve "
        "(fix the cause and run `tailpy up` again, or `tailpy up --accept-dns=false` to stop trying)"
    ),
)
EXIT_NODE = Warnable(
    "exit-node",
    Severity.HIGH,
    lambda a: (
        f"{a['problem']}: internet traffic is dropped rather than sent outside the tunnel (choose another "
        "exit node with `tailpy set --exit-node NAME`, see `tailpy exit-node list`, or none with "
        "`tailpy set --exit-node=`)"
    ),
)
"""The chosen exit node cannot carry traffic now (Tailscale's ``exitNodeUnreachable`` warnings); the
problem is :func:`tailpy.daemon.routing.resolve_exit_node`'s sentence."""
MTU = Warnable("mtu", Severity.MEDIUM, lambda a: a["text"])
FIREWALL = Warnable("firewall", Severity.MEDIUM, lambda a: a["text"])
"""The node firewall (:mod:`tailpy.daemon.netfilter`) could not be installed; its own sentence says why."""
ROUTER = Warnable("router", Severity.HIGH, lambda a: a["text"])
"""The host's routing into the TUN does not work (:meth:`tailpy.daemon.router.Router.warnings`: a route or
rule that failed, or strict reverse-path filtering while an exit node is in use, which drops every reply
on the physical interface; Tailscale warns of the latter, ``net/netutil.CheckReversePathFiltering``)."""
CLOCK_SKEW = Warnable(
    "clock-skew",
    Severity.MEDIUM,
    lambda a: (
        f"this host's clock is {a['skew']} control's: control refuses requests more than 120 s off; set "
        "the clock right (NTP: `timedatectl set-ntp true`)"
    ),
)
DERP_TLS_TODO = (
    "trust the CA that signed the relay's certificate: add it to the system store "
    "(/usr/local/share/ca-certificates/ then `update-ca-certificates`) or start tailpyd with SSL_CERT_FILE "
    "naming a bundle that has it, then restart tailpyd"
)
DERP_TODO = "relayed traffic to peers behind NAT fails; check that the relay runs and this host reaches it"


def derp_todo(error: str) -> str:
    """What to do about a DERP connection ``error`` (the client's sentence): trust a CA for a certificate
    that did not verify, else check the relay."""
    low = error.lower()
    if "certificate" in low and ("not trusted" in low or "verify" in low):
        return DERP_TLS_TODO
    return DERP_TODO


def clock_skew_text(skew: float | None) -> str | None:
    """``skew`` = control's time minus ours (seconds, None unknown): "N s behind" / "N s ahead of", or
    None within :data:`CLOCK_SKEW_MAX`."""
    if skew is None or abs(skew) <= CLOCK_SKEW_MAX:
        return None
    return f"{abs(skew):.0f} s behind" if skew > 0 else f"{abs(skew):.0f} s ahead of"


def clock(ts: float) -> str:
    """Unix seconds as local "HH:MM:SS" (how the warnings name a moment)."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


@dataclass
class _State:
    warnable: Warnable
    key: str
    text: str
    since: float
    logged: float  # when it was last logged


class Tracker:
    """The unhealthy warnings now. ``clock()``: unix seconds (each warning's ``since``)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._now: dict[tuple[str, str], _State] = {}

    def set_unhealthy(self, w: Warnable, args: Mapping[str, str] | None = None, *, key: str = "") -> None:
        """``w`` (instance ``key``) is unhealthy with ``args``; logged when it is new, and when its text
        changed at most once per :data:`RELOG_AFTER` seconds (``since`` stays the moment it became
        unhealthy)."""
        text = w.text(args or {})
        cur = self._now.get((w.code, key))
        if cur is not None and cur.text == text:
            return
        now = self.clock()
        if cur is None:
            self._now[(w.code, key)] = _State(w, key, text, now, now)
        else:
            cur.text = text
            if now - cur.logged < RELOG_AFTER:
                log.debug("health: %s: %s", w.code, text)
                return
            cur.logged = now
        log.warning("health: %s: %s", w.code, text)

    def set_healthy(self, w: Warnable, *, key: str = "") -> None:
        """``w`` (instance ``key``) is fine; logged when it was not."""
        if self._now.pop((w.code, key), None) is not None:
            log.info("health: %s%s: ok again", w.code, f" ({key})" if key else "")

    def set(self, w: Warnable, args: Mapping[str, str] | None, *, key: str = "") -> None:
        """:meth:`set_unhealthy` with ``args``, or :meth:`set_healthy` when ``args`` is None."""
        if args is None:
            self.set_healthy(w, key=key)
        else:
            self.set_unhealthy(w, args, key=key)

    def keep_keys(self, w: Warnable, keys: Collection[str]) -> None:
        """Clear the instances of ``w`` whose key is not in ``keys`` (peers that left)."""
        for code, key in list(self._now):
            if code == w.code and key not in keys:
                self.set_healthy(w, key=key)

    def is_unhealthy(self, w: Warnable, *, key: str = "") -> bool:
        return (w.code, key) in self._now

    def warnings(self) -> tuple[HealthWarning, ...]:
        """The warnings now, the most severe first, then oldest first."""
        order = {Severity.HIGH: 0, Severity.MEDIUM: 1, Severity.LOW: 2}
        states = sorted(self._now.values(), key=lambda s: (order[s.warnable.severity], s.since, s.key))
        return tuple(
            HealthWarning(s.warnable.code, s.warnable.severity.value, s.text, s.since) for s in states
        )


@dataclass(frozen=True)
class PeerHandshakes:
    """What the data plane says of one peer: its ``name``, node ``key`` (bytes), ``handshakes_sent``
    (initiations, ``Device.peers()``) and ``last_handshake`` (unix seconds or None)."""

    name: str
    key: bytes
    handshakes_sent: int
    last_handshake: float | None


@dataclass(frozen=True)
class HomeDerp:
    """This node's home DERP side: ``region`` (id, 0 none yet), ``code``, ``connected`` (a live connection
    to it), ``error`` (the connection's last error, or the last latency probe's when there is no home)."""

    region: int
    code: str = ""
    connected: bool = False
    error: str = ""


@dataclass(frozen=True)
class Inputs:
    """One look at the node for :func:`evaluate`. ``now``: unix seconds. ``following``: the session with
    control should be up (registered, wanted running). ``control_down_since``: unix seconds since when it has
    had no map stream (None: connected); ``control_error``: the session's last error. ``netmap_since``: unix
    seconds of the first netmap (None: none yet); ``derp_regions``: regions in its DERP map. ``home``: the
    home DERP side (None: no data plane). ``peers``: per-peer handshakes. ``dns_error``: why MagicDNS is not
    applied to the host's resolver ("" applied or not wanted). ``mtu``: MTU warnings, one sentence each.
    ``firewall``: node firewall warnings, one sentence each. ``router``: the host routing's warnings, one
    sentence each (:meth:`tailpy.daemon.router.PlanRouter.warnings`). ``clock_skew``: control's clock minus
    ours, seconds (None unknown). ``exit_node_error``: why the chosen exit node carries no traffic ("" it
    does, or none is chosen)."""

    now: float
    following: bool = False
    login_server: str = ""
    control_down_since: float | None = None
    control_error: str = ""
    netmap_since: float | None = None
    derp_regions: int = 0
    home: HomeDerp | None = None
    peers: Sequence[PeerHandshakes] = field(default_factory=tuple)
    dns_error: str = ""
    mtu: Sequence[str] = field(default_factory=tuple)
    firewall: Sequence[str] = field(default_factory=tuple)
    router: Sequence[str] = field(default_factory=tuple)
    clock_skew: float | None = None
    exit_node_error: str = ""


DERP_GRACE = 10.0
"""Seconds after the first netmap (with a DERP map) before a missing home region counts: netcheck and the
first connection take a few seconds."""


def evaluate(tracker: Tracker, watch: HandshakeWatch, i: Inputs) -> None:
    """Set and clear every warning of this module in ``tracker`` from one look ``i`` (handshakes through
    ``watch``, which keeps their history)."""
    down = i.control_down_since
    if i.following and down is not None and i.now - down >= CONTROL_GRACE:
        error = i.control_error or "no map stream yet"
        tracker.set_unhealthy(
            CONTROL_UNREACHABLE, {"url": i.login_server, "since": clock(down), "error": error}
        )
    else:
        tracker.set_healthy(CONTROL_UNREACHABLE)
    has_netmap = i.following and i.netmap_since is not None
    tracker.set(NO_DERP_MAP, {} if has_netmap and i.derp_regions == 0 else None)
    home_args: dict[str, str] | None = None
    if has_netmap and i.derp_regions and i.home is not None:
        h = i.home
        if h.region and not h.connected and h.error:
            home_args = {"region": f"{h.region} ({h.code})" if h.code else str(h.region), "error": h.error}
        elif not h.region and i.netmap_since is not None and i.now - i.netmap_since >= DERP_GRACE:
            error = "no DERP region answered" + (f" (last: {h.error})" if h.error else "")
            home_args = {"region": "(none chosen)", "error": error}
        if home_args is not None:
            home_args["todo"] = derp_todo(home_args["error"])
    tracker.set(HOME_DERP_UNREACHABLE, home_args)
    names: set[str] = set()
    for p in i.peers:
        names.add(p.name)
        failing = watch.observe(p.key, p.handshakes_sent, p.last_handshake, i.now)
        args = None
        if failing is not None:
            args = {"peer": p.name, "sent": str(failing[0]), "since": clock(failing[1])}
        tracker.set(HANDSHAKE_FAILING, args, key=p.name)
    watch.keep({p.key for p in i.peers})
    tracker.keep_keys(HANDSHAKE_FAILING, names)
    tracker.set(DNS_NOT_APPLIED, {"error": i.dns_error} if i.dns_error else None)
    tracker.set(MTU, {"text": "; ".join(i.mtu)} if i.mtu else None)
    tracker.set(FIREWALL, {"text": "; ".join(i.firewall)} if i.firewall else None)
    set_router(tracker, i.router)
    skew = clock_skew_text(i.clock_skew)
    tracker.set(CLOCK_SKEW, {"skew": skew} if skew is not None and i.following else None)
    tracker.set(EXIT_NODE, {"problem": i.exit_node_error} if i.exit_node_error else None)


def set_router(tracker: Tracker, warnings: Sequence[str]) -> None:
    """Set or clear :data:`ROUTER` from the host routing's ``warnings`` (one sentence each)."""
    tracker.set(ROUTER, {"text": "; ".join(warnings)} if warnings else None)


@dataclass
class _Handshakes:
    sent: int  # initiations at the last look
    last_handshake: float | None  # the device's last handshake time at the last look
    failing_since: float | None = None  # first initiation without a handshake since
    base: int = 0  # initiations before that one
    last_initiation: float = 0.0


class HandshakeWatch:
    """Per peer: handshake initiations the data plane sent (``Device.peers()`` ``handshakes_sent``) and its
    last completed handshake (``last_handshake``, unix seconds). A peer is failing when initiations went out
    for :data:`HANDSHAKE_FAIL_AFTER` seconds (at least :data:`HANDSHAKE_FAIL_MIN`) and none completed; it
    stops failing at a completed handshake, or after :data:`HANDSHAKE_IDLE_CLEAR` seconds without an
    initiation (nothing is sent to it any more)."""

    def __init__(self) -> None:
        self._peers: dict[bytes, _Handshakes] = {}

    def observe(
        self, key: bytes, sent: int, last_handshake: float | None, now: float
    ) -> tuple[int, float] | None:
        """One look at peer ``key`` at unix time ``now``: ``(initiations unanswered, since)`` when its
        handshakes are failing, else None."""
        st = self._peers.get(key)
        if st is None:
            self._peers[key] = _Handshakes(sent, last_handshake)
            return None
        if last_handshake is not None and last_handshake != st.last_handshake:
            st.failing_since = None  # a handshake completed (answering what was sent since the last look)
        elif sent > st.sent and st.failing_since is None:
            st.failing_since, st.base = now, st.sent
        if sent > st.sent:
            st.last_initiation = now
        st.last_handshake, st.sent = last_handshake, sent
        if st.failing_since is not None and now - st.last_initiation >= HANDSHAKE_IDLE_CLEAR:
            st.failing_since = None
        if st.failing_since is None:
            return None
        unanswered = sent - st.base
        if now - st.failing_since >= HANDSHAKE_FAIL_AFTER and unanswered >= HANDSHAKE_FAIL_MIN:
            return unanswered, st.failing_since
        return None

    def keep(self, keys: set[bytes]) -> None:
        """Forget peers not in ``keys``."""
        for key in set(self._peers) - keys:
            del self._peers[key]


__all__ = [
    "CLOCK_SKEW",
    "CLOCK_SKEW_MAX",
    "CONTROL_UNREACHABLE",
    "DNS_NOT_APPLIED",
    "EXIT_NODE",
    "FIREWALL",
    "HANDSHAKE_FAILING",
    "HOME_DERP_UNREACHABLE",
    "MTU",
    "NO_DERP_MAP",
    "ROUTER",
    "HandshakeWatch",
    "HomeDerp",
    "Inputs",
    "PeerHandshakes",
    "Severity",
    "Tracker",
    "Warnable",
    "clock_skew_text",
    "derp_todo",
    "evaluate",
    "set_router",
]
