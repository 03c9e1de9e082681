"""`tailpy control serve`: parse the options into a :class:`tailpy.control.service.ControlConfig` and run
:func:`tailpy.control.service.run_control` (the control server, embedded DERP relay and STUN server, admin
socket) until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from tailpy.cli.control.common import db_option, server_state_dir_option
from tailpy.control.store.addresses import DEFAULT_QUARANTINE
from tailpy.errors import ConfigError
from tailpy.httpguard import install_log_guards
from tailpy.rlimits import raise_nofile_limit


@click.command("serve")
@server_state_dir_option
@db_option
@click.option("--listen", default="0.0.0.0:8080", show_default=True, help="HOST:PORT to serve HTTP on.")
@click.option("--domain", default=None, help="Tailnet DNS domain, stored (default: tailnet.internal).")
@click.option("--prefix-v4", default=None, help="IPv4 pool within 100.64.0.0/10, stored (default: all).")
@click.option("--prefix-v6", default=None, help="IPv6 pool in fd7a:115c:a1e0::/48, stored (default: all).")
@click.option("--key-expiry", default="180d", show_default=True, help="Node key lifetime (30d, never).")
@click.option(
    "--ephemeral-timeout",
    default="30m",
    show_default=True,
    help="Offline time after which an ephemeral node is removed.",
)
@click.option(
    "--address-quarantine",
    default=DEFAULT_QUARANTINE,
    show_default=True,
    type=click.FloatRange(min=0, max=10 * 365 * 86400),
    metavar="SECONDS",
    help="Seconds a deleted (or gone ephemeral) node's addresses stay unused before they are given again.",
)
@click.option("--derp/--no-derp", default=True, show_default=True, help="Run the embedded DERP relay.")
@click.option(
    "--derp-listen",
    default=None,
    help="HOST:PORT of the embedded DERP relay (default: --listen's host, port 3340).",
)
@click.option(
    "--derp-hostname",
    default=None,
    help="Host or IP nodes reach the embedded relay at (needed when both listen on every address).",
)
@click.option("--derp-region-id", default=900, show_default=True, type=int, help="Embedded relay's region.")
@click.option("--derp-region-code", default="tailpy", show_default=True, help="Embedded region's code.")
@click.option(
    "--derp-map",
    "derp_map_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Tailscale-shaped DERP map JSON of external relays, sent with (or, with --no-derp, instead of) "
    "the embedded one.",
)
@click.option(
    "--derp-verify-clients/--no-derp-verify-clients",
    default=True,
    show_default=True,
    help="The embedded relay admits only this tailnet's nodes (live, unexpired node keys).",
)
@click.option(
    "--mesh-with",
    default="",
    help="Comma-separated standalone DERP servers of the embedded relay's region to mesh with (HOST[:PORT], "
    "dialed over plain HTTP as the embedded relay serves, or a http(s):// URL: `tailpy derp serve`, "
    "Tailscale's derper). Needs --mesh-psk-file.",
)
@click.option(
    "--mesh-psk-file",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False),
    help="File of the region's DERP mesh key (64 hex digits, as derper's). Default with PostgreSQL: a key "
    "kept in the database, shared by the replicas' relays.",
)
@click.option(
    "--stun/--no-stun",
    default=True,
    show_default=True,
    help="Run a STUN server beside the embedded relay (UDP, on its host) and put it in the DERP map.",
)
@click.option(
    "--stun-port",
    default=3478,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="UDP port of that STUN server (0 picks one).",
)
@click.option(
    "--oidc-issuer", default=None, help="OpenID Connect provider's issuer URL: enables browser login."
)
@click.option("--oidc-client-id", default=None, help="Client id registered at the provider.")
@click.option(
    "--oidc-client-secret-file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the client secret (first line).",
)
@click.option(
    "--oidc-scope",
    "oidc_scopes",
    multiple=True,
    help="Scope to request (repeat; default openid email profile).",
)
@click.option(
    "--oidc-allowed-domain",
    "oidc_domains",
    multiple=True,
    help="Admit verified emails at this domain (repeat).",
)
@click.option(
    "--oidc-allowed-user",
    "oidc_users",
    multiple=True,
    help="Admit this email (once the provider has verified it) or subject (repeat).",
)
@click.option(
    "--oidc-allowed-group", "oidc_groups", multiple=True, help="Admit members of this group (repeat)."
)
@click.option(
    "--oidc-groups-claim", default="groups", show_default=True, help="ID token claim listing groups."
)
@click.option("--oidc-expiry-from-token", is_flag=True, help="Node keys expire with the login's ID token.")
@click.option("--approve-nodes", is_flag=True, help="New machines that log in wait for `nodes approve`.")
@click.option(
    "--policy",
    "policy_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Tailnet policy file (Tailscale's HuJSON format): the policy is this file's, reloaded when it "
    "changes and on SIGHUP; `policy set` is then refused. Default: the policy stored in the database.",
)
@click.option(
    "--server-url",
    default=None,
    help="URL browsers and nodes reach this server at (login links, OIDC redirect); default from --listen.",
)
@click.option(
    "--admin",
    "admins",
    multiple=True,
    help="May sign in to the web console at /admin with the OIDC provider: an email or login name, or "
    "group:NAME for the members of that tailnet policy group (repeat). API keys sign in regardless.",
)
@click.option(
    "--replica-id",
    default=None,
    help="This server's id among several serving one PostgreSQL database (default: HOSTNAME:PORT). "
    "Replicas share the tailnet, its nodes and server key; each runs its own listener and relay.",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Also serve GET /metrics (Prometheus) on HOST:PORT to anyone who reaches it (on --listen it is "
    "served to loopback clients only).",
)
def command(
    state_dir: Path,
    db: str | None,
    listen: str,
    domain: str | None,
    prefix_v4: str | None,
    prefix_v6: str | None,
    key_expiry: str,
    ephemeral_timeout: str,
    address_quarantine: float,
    derp: bool,
    derp_listen: str | None,
    derp_hostname: str | None,
    derp_region_id: int,
    derp_region_code: str,
    derp_map_file: Path | None,
    derp_verify_clients: bool,
    mesh_with: str,
    mesh_psk_file: Path | None,
    stun: bool,
    stun_port: int,
    oidc_issuer: str | None,
    oidc_client_id: str | None,
    oidc_client_secret_file: Path | None,
    oidc_scopes: tuple[str, ...],
    oidc_domains: tuple[str, ...],
    oidc_users: tuple[str, ...],
    oidc_groups: tuple[str, ...],
    oidc_groups_claim: str,
    oidc_expiry_from_token: bool,
    approve_nodes: bool,
    policy_file: Path | None,
    server_url: str | None,
    admins: tuple[str, ...],
    replica_id: str | None,
    metrics_listen: str | None,
) -> None:
    """Run the coordination server until SIGTERM or SIGINT (logs go to stderr); admin commands reach it
    through <state-dir>/admin.sock (mode 0600).

    Unless --no-derp, a DERP relay runs in the same process (plain HTTP at /derp on --derp-listen; its key in
    <state-dir>/derp.key) and every node's netmap carries a DERP map with its region. Nodes are told to reach
    it at --derp-hostname, else at --server-url's host, else at --derp-listen's host, else at --listen's
    host; when none of these names a host (0.0.0.0, ::) serve refuses to start and says which flag to add.
    A relay that cannot listen (port taken) is logged and left out of the map: control serves regardless.
    --derp-map adds external relays (a Tailscale DERPMap JSON file; region ids must differ from the
    embedded one). GET /health on control and on the relay answers JSON {"status", "checks"} (200 or 503;
    control says "degraded", still 200, while a --policy file's edit is refused and the previous policy
    runs).

    Unless --no-stun, a STUN server answers on UDP --stun-port (3478) of the relay's host and the map says
    so (STUNPort); a STUN port that cannot be bound is logged and left out of the map (STUNPort -1).

    With --policy FILE the tailnet policy is that file: a bad one stops the server from starting (the
    sentence gives FILE:LINE:COLUMN); later, a bad edit is logged and the running policy stays.

    Several `serve` processes with one --db postgresql://... serve one tailnet together (replicas): any of
    them takes registrations, map streams and admin commands, a change made on one reaches the nodes of all,
    and when one stops beating (3 heartbeats of 2 s) the others mark its nodes offline. Give nodes every
    replica's URL: `tailpy up --login-server http://a:8080,http://b:8080`. The embedded relays of replicas
    with one --derp-region-id form a DERP mesh (derper's protocol; the key kept in the database, or given by
    --mesh-psk-file) and the DERP map lists each live replica's relay as a node of that region.
    --mesh-with adds standalone relays (derper) to the mesh.

    The web console is at /admin: sign in with an API key (`tailpy control apikey create`), or with the
    OIDC provider as one of the --admin accounts.

    GET /metrics serves Prometheus metrics (tailpy_control_*, and the embedded relay's tailpy_derp_*) to
    loopback clients; --metrics-listen HOST:PORT serves them to anyone who reaches that address."""
    from tailpy.control.console import parse_admins
    from tailpy.control.options import (
        check_server_url,
        default_server_url,
        load_derp_map,
        oidc_config,
        parse_duration,
        parse_listen,
    )
    from tailpy.control.service import DERP_PORT, ControlConfig, derp_advertised_host, run_control, tune_gc
    from tailpy.derp.mesh import mesh_urls

    host, port = parse_listen(listen)
    metrics_at = parse_listen(metrics_listen, "--metrics-listen") if metrics_listen is not None else None
    derp_host, derp_port = host, DERP_PORT
    if derp_listen is not None:
        derp_host, derp_port = parse_listen(derp_listen, "--derp-listen")
    if server_url is not None:
        check_server_url(server_url)
    oidc = oidc_config(
        oidc_issuer,
        oidc_client_id,
        oidc_client_secret_file,
        server_url or default_server_url(listen),
        scopes=oidc_scopes,
        domains=oidc_domains,
        users=oidc_users,
        groups=oidc_groups,
        groups_claim=oidc_groups_claim,
        expiry_from_token=oidc_expiry_from_token,
        approval=approve_nodes,
    )
    lifetime = parse_duration(key_expiry, "--key-expiry")
    gc_after = parse_duration(ephemeral_timeout, "--ephemeral-timeout")
    if gc_after is None:
        raise ConfigError("--ephemeral-timeout must be a duration like 30m (ephemeral nodes are removed)")
    if derp and derp_advertised_host(derp_host, host, derp_hostname, server_url) is None:
        raise ConfigError(
            f"--listen {listen} is every address, so nodes cannot be told where to reach the embedded DERP "
            f"relay: add --server-url http://HOST:{port} (the address nodes log in at) or --derp-hostname "
            "HOST (or --no-derp)"
        )
    config = ControlConfig(
        state_dir=state_dir,
        db=db,
        host=host,
        port=port,
        domain=domain,
        prefix_v4=prefix_v4,
        prefix_v6=prefix_v6,
        key_lifetime=lifetime,
        ephemeral_timeout=gc_after,
        address_quarantine=address_quarantine,
        derp=derp,
        derp_host=derp_host,
        derp_port=derp_port,
        derp_hostname=derp_hostname,
        derp_region_id=derp_region_id,
        derp_region_code=derp_region_code,
        derp_map=load_derp_map(derp_map_file) if derp_map_file is not None else None,
        derp_map_file=derp_map_file,
        derp_verify_clients=derp_verify_clients,
        mesh_with=tuple(mesh_urls(mesh_with, tls=False)),
        mesh_psk_file=mesh_psk_file,
        stun=stun,
        stun_port=stun_port,
        oidc=oidc,
        policy_file=policy_file,
        server_url=server_url,
        admins=parse_admins(admins),
        replica_id=replica_id,
        metrics_listen=metrics_at,
    )
    config.check()  # (before any output: a usage mistake is one sentence)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    install_log_guards()  # one line per record: control characters from requests escaped
    raise_nofile_limit()  # soft open-files limit up to the hard one, as Go programs do
    tune_gc()
    asyncio.run(run_control(config))


__all__ = ["command"]
