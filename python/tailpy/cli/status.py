"""`tailpy status`: this node and its peers, one row each, in the manner of `tailscale status`
(`--json` for scripts; fields in README "Home DERP and relay fallback"). A peer's JSON ``endpoint`` is
its direct path's "ip:port" and null while ``path`` is "relay", as the text shows ``relay "<region>"``."""

from __future__ import annotations

import json
import time

import click
from rich.console import Console

from tailpy.cli.common import json_option, local, run, socket_option
from tailpy.cli.safetext import assemble, cell, visible
from tailpy.control.client import control_urls
from tailpy.daemon.pfilter import filter_drops
from tailpy.ipnstate import PeerStatus, SelfStatus, Status
from tailpy.routes import EXIT_ROUTES, has_exit_routes


def ago(ts: float | None, now: float) -> str:
    """ "12s ago", "5m ago", "3h ago", "2d ago" or "never"."""
    if not ts:
        return "never"
    s = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def peer_state(p: PeerStatus, now: float) -> str:
    """The status column: expired; offline with last seen (as control says, at once: a recent handshake
    does not make a peer whose daemon is gone look alive); active/idle with the path (``direct <ip:port>``
    for an endpoint that answered, ``relay "<DERP region code>"``, or ``no path yet``) and traffic."""
    if p.expired:
        return "expired"
    if not p.online:
        return f"offline, last seen {ago(p.last_seen, now)}"
    if p.path == "relay":
        code = p.relay_region_code
        path = f'relay "{code}"' if code else "relay"
    elif p.endpoint is not None:
        path = f"direct {p.endpoint}"
    else:
        path = "no path yet"
    if not p.active:
        return f"idle; {path}"
    return f"active; {path}, tx {human_bytes(p.tx_bytes)} rx {human_bytes(p.rx_bytes)}"


def peer_routes(p: PeerStatus) -> str:
    """What a peer routes, after its state: "; routes A, B" (the subnet routes it is primary for), and
    "; exit node" when it offers to be this node's exit node ("exit node (in use)" when it is)."""
    out = ""
    if p.primary_routes:
        out += f"; routes {', '.join(p.primary_routes)}"
    if p.exit_node:
        out += "; exit node (in use)"
    elif p.exit_node_option:
        out += "; exit node"
    return out


def self_routes(me: SelfStatus) -> str:
    """The routes this node advertises: "; advertises A (primary), B (approved, standby), C (awaiting
    approval)", and "exit node" for the exit routes ("" when it advertises none)."""
    parts = []
    subnets = [r for r in me.advertised_routes if r not in EXIT_ROUTES]
    for r in subnets:
        if r not in me.approved_routes:
            parts.append(f"{r} (awaiting approval)")
        elif r in me.primary_routes:
            parts.append(f"{r} (primary)")
        else:
            parts.append(f"{r} (approved, standby)")
    if has_exit_routes(me.advertised_routes):
        approved = has_exit_routes(me.approved_routes)
        parts.append("exit node" + ("" if approved else " (awaiting approval)"))
    return f"; advertises {', '.join(parts)}" if parts else ""


def control_line(st: Status) -> str:
    """The control URL in use when the login server lists several (replicas of one control database):
    "control: http://b:8080 (2 of 2 URLs)", "(not in the login server's URLs)" for one that is not in the
    list; "" for a single URL or before any map stream (``control_url`` "")."""
    urls = control_urls(st.login_server) if st.login_server else ()
    if len(urls) < 2 or not st.control_url:
        return ""
    if st.control_url in urls:
        return f"control: {st.control_url} ({urls.index(st.control_url) + 1} of {len(urls)} URLs)"
    return f"control: {st.control_url} (not in the login server's URLs)"


def _owner(n: PeerStatus | SelfStatus) -> str:
    return n.user or ", ".join(n.tags) or "-"


def render(st: Status, console: Console) -> None:
    me = st.self_node
    now = st.now or time.time()
    state = st.backend_state
    if state != "Running":
        console.print(assemble((state, "yellow"), f": {st.error}" if st.error else ""))
    for w in st.health:  # at the top, the most severe first
        color = "red" if w.severity == "high" else "yellow"
        console.print(assemble(("health:", color), f" {w.name}: {w.text}"))
    if state == "Running" and st.error and not any(st.error in w.text for w in st.health):
        console.print(assemble((st.error, "red")))
    if st.exit_node:
        console.print(cell(f"exit node: {st.exit_node}"))
    names = {w.name for w in st.health}
    line = control_line(st)
    if line:
        console.print(cell(line))
    if not st.control_connected and state == "Running" and "control-unreachable" not in names:
        console.print("[yellow]control server not connected: peers keep working, changes wait[/]")
    # The data plane works without an offload it fell back from, at a higher CPU cost per packet.
    offload = (st.device or {}).get("offload") or {}
    for fallback in offload.get("fallbacks", []):
        console.print(assemble(("data plane:", "yellow"), f" {fallback}"))
    # Inbound packets the packet filter dropped (the policy, or unsolicited UDP), by reason.
    drops = filter_drops(st.device)
    if drops:
        reasons = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in drops.items())
        total = sum(drops.values())
        console.print(cell(f"packet filter: dropped {total} inbound packets ({reasons})"))

    rows: list[tuple[str, ...]] = []
    if me.addresses:
        code = me.home_derp_code or (str(me.home_derp) if me.home_derp else "")
        home = f'home DERP "{code}"' if code else "-"
        home += self_routes(me)
        rows.append((me.first_ip, me.name or me.hostname, _owner(me), me.os or "-", home))
    for p in st.peers:
        rows.append((p.first_ip, p.name, _owner(p), p.os or "-", peer_state(p, now) + peer_routes(p)))
    # What peers and control chose (names, OS, tags, region codes), one line per node whatever they hold.
    rows = [tuple(visible(c) for c in r) for r in rows]
    # Plain aligned columns, never wrapped or cut, whatever the terminal width (as `tailscale status`).
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    for r in rows:
        console.print(
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4],
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@click.command("status")
@json_option
@socket_option
def command(as_json: bool, socket_path: str) -> None:
    """Show this node (with its home DERP region and the routes it advertises) and its peers: address, name,
    owner, OS, and active/idle with the path (direct ip:port, or relay "region" through DERP), offline with
    last seen, or expired; then the subnet routes a peer serves and whether it is an exit node (in use)."""
    st = run(local(socket_path).status())
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=2))
    else:
        render(st, Console(width=200))
