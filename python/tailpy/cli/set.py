"""`tailpy set`: change preferences of the running node without logging in again (Tailscale's
``tailscale set``), and the route flags it shares with `tailpy up`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from tailpy.cli.common import local, run, socket_option
from tailpy.cli.safetext import visible_lines
from tailpy.daemon.client import LocalClient
from tailpy.ipnstate import Status
from tailpy.routes import parse_routes

F = TypeVar("F", bound=Callable[..., Any])


class Boolean(click.types.BoolParamType):
    """click's boolean (true/false, 1/0, yes/no, on/off, t/f, y/n, any case), whose error names the values
    a person types rather than click's whole set (which lists the empty string)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not a boolean: use true or false (or 1/0, yes/no, on/off)", param, ctx)


def _bool_option(name: str, help_text: str) -> Callable[[F], F]:
    """``--NAME`` (true), ``--NAME=false``; None when not given. A bare flag never takes the next argument
    as its value."""
    return click.option(name, type=Boolean(), default=None, is_flag=False, flag_value=True, help=help_text)


def route_options(f: F) -> F:
    """The route flags of `tailpy up` and `tailpy set` (each None when not given: as before)."""
    for option in reversed(
        (
            click.option(
                "--advertise-routes",
                default=None,
                metavar="PREFIXES",
                help="Offer the LANs behind this node to the tailnet: comma-separated CIDR prefixes "
                "(198.51.100.0/24,2001:db8:1::/64); forwards and masquerades once control approves them; "
                "empty: none.",
            ),
            _bool_option(
                "--advertise-exit-node",
                "Offer this node as an exit node (advertises 0.0.0.0/0 and ::/0); =false stops offering.",
            ),
            _bool_option(
                "--accept-routes",
                "Use the subnet routes other nodes offer (default false, as Tailscale on Linux).",
            ),
            click.option(
                "--exit-node",
                default=None,
                metavar="NAME|IP",
                help="Send all internet traffic through this peer (its name, FQDN or tailnet IP; see "
                "`tailpy exit-node list`); empty: none.",
            ),
            _bool_option(
                "--exit-node-allow-lan-access",
                "With an exit node, reach this host's LANs directly rather than through it (default false).",
            ),
            _bool_option(
                "--snat-subnet-routes",
                "Masquerade tailnet sources onto the advertised subnets (default true); =false keeps their "
                "tailnet addresses (the LAN then needs a route back to the tailnet through this node).",
            ),
        )
    ):
        f = option(f)
    return f


def route_prefs(
    advertise_routes: str | None,
    advertise_exit_node: bool | None,
    accept_routes: bool | None,
    exit_node: str | None,
    exit_node_allow_lan_access: bool | None,
    snat_subnet_routes: bool | None,
) -> dict[str, Any]:
    """The route flags given, as the local API takes them (``up`` and ``set``): keys of those given only.
    ``--advertise-routes`` is parsed here (:func:`tailpy.routes.parse_routes`; a default route is refused:
    ``--advertise-exit-node`` offers one). Raises ConfigError with one sentence."""
    out: dict[str, Any] = {}
    if advertise_routes is not None:
        out["advertise_routes"] = list(parse_routes(advertise_routes, allow_exit=False))
    for key, value in (
        ("advertise_exit_node", advertise_exit_node),
        ("accept_routes", accept_routes),
        ("exit_node", None if exit_node is None else exit_node.strip()),
        ("exit_node_allow_lan_access", exit_node_allow_lan_access),
        ("snat_subnet_routes", snat_subnet_routes),
    ):
        if value is not None:
            out[key] = value
    return out


CONTROL_ROUTES_WAIT = 5.0
"""Seconds `up`/`set` wait for control to take new advertised routes (and approve them by policy, or keep
an earlier approval) before saying which await approval."""


def _control_has_routes(st: Status) -> bool:
    me = st.self_node
    return set(me.control_routes) == set(me.advertised_routes)


async def routes_answered(client: LocalClient, st: Status, timeout: float = CONTROL_ROUTES_WAIT) -> Status:
    """``st``, or a later status of ``client``'s node once control has the advertised routes (its answer,
    :attr:`tailpy.ipnstate.SelfStatus.approved_routes`, then says which it approved: autoApprovers, an
    approval kept from before); after ``timeout`` seconds the last status."""
    deadline = time.monotonic() + timeout
    while not _control_has_routes(st) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        st = await client.status()
    return st


def awaiting_note(st: Status) -> str:
    """A note on advertised routes control has not approved ("" none): ``st`` from
    :func:`routes_answered`."""
    me = st.self_node
    waiting = [r for r in me.advertised_routes if r not in me.approved_routes]
    if not waiting or not me.name:
        return ""
    unconfirmed = "" if _control_has_routes(st) else " (control has not confirmed them yet)"
    return (
        f"note: {', '.join(waiting)} await approval on control{unconfirmed} (an admin runs `tailpy control "
        f"routes approve {me.name} ...`, or the policy's autoApprovers approve them)"
    )


def router_note(st: Status) -> str:
    """The ``router`` health warning of ``st`` (strict reverse-path filtering with an exit node, routes
    that failed), as a line for stderr ("" none)."""
    texts = [w.text for w in st.health if w.name == "router"]
    return f"warning: {'; '.join(texts)}" if texts else ""


@click.command("set")
@click.option("--hostname", default=None, help="Ask control for this name (as `tailpy up --hostname`).")
@_bool_option("--accept-dns", "Point this host's resolver at MagicDNS (=false leaves it alone).")
@click.option(
    "--advertise-tags",
    default=None,
    metavar="TAGS",
    help="Ask control to tag this node (comma-separated tags, as `tailpy up --advertise-tags`).",
)
@route_options
@socket_option
def command(
    hostname: str | None,
    accept_dns: bool | None,
    advertise_tags: str | None,
    advertise_routes: str | None,
    advertise_exit_node: bool | None,
    accept_routes: bool | None,
    exit_node: str | None,
    exit_node_allow_lan_access: bool | None,
    snat_subnet_routes: bool | None,
    socket_path: str,
) -> None:
    """Change preferences of the running node; only the flags given change, the rest stay as they are
    (no new login). An unknown exit node, this node, or a peer that does not offer to be an exit node
    is refused and nothing changes."""
    from tailpy.cli.up import _tags

    prefs = route_prefs(
        advertise_routes,
        advertise_exit_node,
        accept_routes,
        exit_node,
        exit_node_allow_lan_access,
        snat_subnet_routes,
    )
    if hostname is not None:
        prefs["hostname"] = hostname
    if accept_dns is not None:
        prefs["accept_dns"] = accept_dns
    tags = _tags(advertise_tags)
    if tags is not None:
        prefs["advertise_tags"] = tags
    if not prefs:
        raise click.UsageError("give at least one preference to change (see `tailpy set --help`)")
    advertised = "advertise_routes" in prefs or "advertise_exit_node" in prefs
    client = local(socket_path)
    st = run(client.set(prefs))
    if advertised:
        st = run(routes_answered(client, st))
    notes = (
        awaiting_note(st) if advertised else "",
        router_note(st) if prefs.get("exit_node") else "",
    )
    for note in notes:
        if note:
            Console(stderr=True).print(visible_lines(note), highlight=False, markup=False, soft_wrap=True)
