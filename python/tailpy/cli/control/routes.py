"""`tailpy control routes list|approve|unapprove`: the subnet routes and exit nodes nodes advertise, and
their approval (:mod:`tailpy.control.routes`; the policy's ``autoApprovers`` approve some by themselves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tailpy.cli.control.common import (
    admin,
    db_option,
    json_option,
    print_json,
    state_dir_option,
    table,
    with_admin_note,
)


@click.group("routes")
def command() -> None:
    """Subnet routes and exit nodes: what nodes advertise, what is approved, which router is primary.

    A node advertises routes with `tailpy up --advertise-routes` (and `--advertise-exit-node`); peers use
    them only once approved here or by the policy's autoApprovers, and only as the policy lets them."""


def _routes_text(r: dict[str, Any]) -> str:
    return ", ".join(f"{x['prefix']} ({x['state']})" for x in r["routes"]) or "-"


@command.command("list")
@state_dir_option
@db_option
@json_option
def routes_list(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """List the nodes that advertise routes or have routes approved: each route with its state (primary,
    standby, offline, awaiting approval, not advertised, exit node)."""
    result = admin(state_dir, db, "routes.list", {})
    if as_json:
        print_json(result)
        return
    table(
        ["ID", "NAME", "ONLINE", "EXIT NODE", "ROUTES"],
        [
            [str(r["id"]), r["name"], "yes" if r["online"] else "no", r["exit_node"] or "-", _routes_text(r)]
            for r in result
        ],
    )


def _args(node: str, prefixes: str | None, exit_node: bool) -> dict[str, Any]:
    return {
        "id": node,
        "routes": [p for p in (prefixes or "").split(",") if p.strip()],
        "exit_node": exit_node,
    }


exit_node_option = click.option(
    "--exit-node", "exit_node", is_flag=True, help="The exit routes 0.0.0.0/0 and ::/0 (an exit node)."
)


@command.command("approve")
@state_dir_option
@db_option
@json_option
@exit_node_option
@click.argument("node")
@click.argument("prefixes", required=False)
def routes_approve(
    state_dir: Path | None, db: str | None, as_json: bool, exit_node: bool, node: str, prefixes: str | None
) -> None:
    """Approve routes PREFIXES (comma-separated CIDR prefixes) of node NODE (id, name or FQDN), or with
    --exit-node its exit routes. A route the node does not advertise yet may be approved ahead."""
    r = admin(state_dir, db, "routes.approve", _args(node, prefixes, exit_node))
    if as_json:
        print_json(r)
        return
    click.echo(f"node {r['id']} ({r['name']}): {_routes_text(r)}")
    if r.get("not_advertised"):
        click.echo(f"note: node {r['name']} does not advertise {', '.join(r['not_advertised'])} (yet)")
    if r.get("exit_route_missing"):
        click.echo(
            f"note: {', '.join(r['exit_route_missing'])} is not approved: node {r['name']} is an exit node "
            f"only with both 0.0.0.0/0 and ::/0 approved (`tailpy control routes approve {r['name']} "
            "--exit-node`)"
        )


@command.command("unapprove")
@state_dir_option
@db_option
@json_option
@exit_node_option
@click.argument("node")
@click.argument("prefixes", required=False)
def routes_unapprove(
    state_dir: Path | None, db: str | None, as_json: bool, exit_node: bool, node: str, prefixes: str | None
) -> None:
    """Take back the approval of routes PREFIXES (comma-separated) of node NODE, or with --exit-node of its
    exit routes: peers stop using them at once. Fails (exit 1) when none of them was approved."""
    r = admin(state_dir, db, "routes.unapprove", _args(node, prefixes, exit_node))
    if as_json:
        print_json(r)
        return
    click.echo(f"node {r['id']} ({r['name']}): {_routes_text(r)}")
    if r.get("not_approved"):
        click.echo(f"note: {', '.join(r['not_approved'])} of node {r['name']} was not approved (unchanged)")


with_admin_note([routes_list, routes_approve, routes_unapprove])

__all__ = ["command"]
