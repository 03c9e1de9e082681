"""`tailpy control`: run the coordination server and administer it.

Admin commands (users, nodes, authkey) go through ``<state_dir>/admin.sock`` when `tailpy control serve`
runs on that state dir (the server applies them and tells the nodes at once), and straight to the database
otherwise (see :mod:`tailpy.control.admin`). Nodes can never reach them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tailpy.errors import ConfigError

if TYPE_CHECKING:
    from tailpy.netmap import DerpMap

ENV_STATE_DIR = "TAILPY_CONTROL_STATE_DIR"

_state_dir = click.option(
    "--state-dir",
    envvar=ENV_STATE_DIR,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Directory of the server's database and key (default: ${ENV_STATE_DIR}).",
)

_db = click.option(
    "--db",
    envvar="TAILPY_CONTROL_DB",
    default=None,
    help="Database URL: postgresql://user@host/dbname (default: SQLite control.db in --state-dir).",
)
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table or a sentence.")

ADMIN_NOTE = (
    "Goes through <state-dir>/admin.sock when `tailpy control serve` runs there (nodes hear of changes at "
    "once), else straight to the database."
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_DAYS = 3650
"""Longest duration the options take (10 years): a longer one is a typo, or `never`."""
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw])")


def parse_duration(text: str, flag: str = "--expiration") -> float | None:
    """A positive duration -> seconds: a number and a unit s, m, h, d or w ("90s", "30m", "1.5h", "7d",
    "2w"), or several ("1h30m"); case and surrounding spaces do not matter; "never" -> None. At most
    :data:`MAX_DURATION_DAYS` days.

    Raises ConfigError (a sentence naming ``flag``) for anything else, zero included.
    """
    t = text.strip().lower()
    if t == "never":
        return None
    parts = _PART.findall(t)
    if not parts or "".join(n + u for n, u in parts) != t:
        if re.fullmatch(r"0+(?:\.0*)?", t):
            raise ConfigError(f"{flag} must be a positive duration like 1h, or 'never'; {text!r} is zero")
        raise ConfigError(
            f"{flag} {text!r} is not a duration like 90s, 30m, 1.5h, 7d, 2w or 'never' (a number and a unit)"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{flag} must be a positive duration like 1h, or 'never'; {text!r} is zero")
    if not seconds <= MAX_DURATION_DAYS * 86400:  # (inf from hundreds of digits too)
        raise ConfigError(f"{flag} must be at most {MAX_DURATION_DAYS}d (or 'never'), not {text.strip()!r}")
    return seconds


def _parse_listen(text: str, flag: str = "--listen") -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every address) -> (host or None, port)."""
    usage = f"{flag} {text!r} is not HOST:PORT (for example 0.0.0.0:8080, [::1]:8080 or :8080 for all)"
    t = text.strip()
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
        if not sep or not host or ":" not in host:
            raise ConfigError(usage)
    else:
        host, sep, port = t.rpartition(":")
        if not sep:
            raise ConfigError(usage)
        if ":" in host:
            raise ConfigError(f"{flag} {text!r}: put an IPv6 address in brackets, like [{host}]:{port}")
    if not port.isdigit() or len(port) > 5 or not 0 <= int(port) < 65536:
        raise ConfigError(usage)
    return host or None, int(port)


DERP_PORT = 3340
"""Default port of the embedded DERP relay of `tailpy control serve` (Headscale's default too)."""

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def load_derp_map(path: Path) -> DerpMap:
    """A Tailscale-shaped DERP map (``tailcfg.DERPMap`` JSON) from ``path``. Raises ConfigError (one
    sentence naming the file)."""
    from tailpy.errors import ParseError
    from tailpy.netmap import DerpMap

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --derp-map {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--derp-map {path} is not a JSON text file") from None
    try:
        return DerpMap.from_json(json.loads(text))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--derp-map {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ParseError, RecursionError) as e:
        raise ConfigError(f"--derp-map {path} is not a DERP map: {e}") from None


def derp_advertised_host(derp_host: str | None, listen_host: str | None, hostname: str | None) -> str | None:
    """The host nodes are told to reach the embedded relay at: ``--derp-hostname`` when given, else the
    relay's listen address when it is a specific one, else ``--listen``'s host when that is, else None (the
    relay runs but is not put in the DERP map)."""
    if hostname:
        return hostname
    for h in (derp_host, listen_host):
        if h is not None and h not in _WILDCARDS:
            return h
    return None


def embedded_derp_map(host: str, port: int, region_id: int, region_code: str, stun_port: int = -1) -> DerpMap:
    """The one-region, one-node DERP map of the embedded relay at ``host:port`` (plain HTTP, so
    InsecureForTests) with its STUN server on UDP ``stun_port`` (-1: none). An IP literal also goes into
    IPv4 / IPv6."""
    import ipaddress

    from tailpy.netmap import DerpMap, DerpNode, DerpRegion

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


@click.group("control")
def command() -> None:
    """Run and administer the coordination server."""


@command.command("serve")
@_state_dir
@_db
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
@click.option("--derp/--no-derp", default=True, show_default=True, help="Run the embedded DERP relay.")
@click.option(
    "--derp-listen",
    default=None,
    help=f"HOST:PORT of the embedded DERP relay (default: --listen's host, port {DERP_PORT}).",
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
    "--oidc-allowed-user", "oidc_users", multiple=True, help="Admit this email or subject (repeat)."
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
    "--server-url",
    default=None,
    help="URL browsers and nodes reach this server at (login links, OIDC redirect); default from --listen.",
)
def serve(
    state_dir: Path,
    db: str | None,
    listen: str,
    domain: str | None,
    prefix_v4: str | None,
    prefix_v6: str | None,
    key_expiry: str,
    ephemeral_timeout: str,
    derp: bool,
    derp_listen: str | None,
    derp_hostname: str | None,
    derp_region_id: int,
    derp_region_code: str,
    derp_map_file: Path | None,
    derp_verify_clients: bool,
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
    server_url: str | None,
) -> None:
    """Run the coordination server until SIGTERM or SIGINT (logs go to stderr); admin commands reach it
    through <state-dir>/admin.sock (mode 0600).

    Unless --no-derp, a DERP relay runs in the same process (plain HTTP at /derp on --derp-listen; its key in
    <state-dir>/derp.key) and every node's netmap carries a DERP map with its region. Nodes are told to reach
    it at --derp-hostname, else at --derp-listen's host, else at --listen's host; when all of these are
    every address (0.0.0.0, ::) the relay runs but is left out of the map (a warning says so). A relay that
    cannot listen (port taken) is logged and left out too: control serves regardless. --derp-map adds
    external relays (a Tailscale DERPMap JSON file; region ids must differ from the embedded one).

    Unless --no-stun, a STUN server answers on UDP --stun-port (3478) of the relay's host and the map says
    so (STUNPort); a STUN port that cannot be bound is logged and left out of the map (STUNPort -1)."""
    from tailpy.control import ControlServer, Store
    from tailpy.control.admin import SOCKET_NAME, Admin, AdminServer
    from tailpy.control.server import http_url
    from tailpy.derp.server import DerpServer, load_or_create_key
    from tailpy.derp.stun_server import StunServer
    from tailpy.derp.verify import local_admission
    from tailpy.endpoint import Endpoint
    from tailpy.errors import ParseError

    host, port = _parse_listen(listen)
    derp_host, derp_port = host, DERP_PORT
    if derp_listen is not None:
        derp_host, derp_port = _parse_listen(derp_listen, "--derp-listen")
    if not 0 < derp_region_id < 1 << 31:
        raise ConfigError(f"--derp-region-id must be a positive integer, not {derp_region_id}")
    external = load_derp_map(derp_map_file) if derp_map_file is not None else None
    if external is not None and derp and derp_region_id in external.regions:
        raise ConfigError(
            f"--derp-map {derp_map_file} has region {derp_region_id}, the embedded relay's: "
            "pass another --derp-region-id"
        )
    oidc = oidc_config(
        oidc_issuer,
        oidc_client_id,
        oidc_client_secret_file,
        server_url or _default_server_url(listen),
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
    if not state_dir.exists():
        if not state_dir.parent.is_dir():
            raise ConfigError(f"cannot create state directory {state_dir}: {state_dir.parent} does not exist")
        try:
            state_dir.mkdir(mode=0o700)
        except OSError as e:
            raise ConfigError(f"cannot create state directory {state_dir}: {e.strerror or e}") from None
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = Store(state_dir, db=db)
    try:
        derp_key = load_or_create_key(state_dir) if derp else None
    except ConfigError:
        store.close()
        raise
    log = logging.getLogger("tailpy.control")

    async def run() -> None:
        relay: DerpServer | None = None
        stun_server: StunServer | None = None
        derp_note: tuple[int, str] | None = None  # logged after the "listening" line (read first by tools)
        stun_note: tuple[int, str] | None = None
        derp_map = external
        if derp_key is not None:
            relay = DerpServer(derp_key)
            where = f"{derp_host or '*'}:{derp_port}"
            try:
                await relay.start(derp_host, derp_port)
            except OSError as e:
                await relay.stop()
                relay = None
                why = e.strerror or e
                derp_note = (
                    logging.WARNING,
                    f"embedded DERP relay cannot listen on {where} ({why}): left out",
                )
            else:
                advertised_stun = -1
                if stun:
                    stun_server = StunServer()
                    stun_host = None if derp_host == "0.0.0.0" else derp_host
                    try:
                        await stun_server.start(stun_host, stun_port)
                    except OSError as e:
                        stun_server = None
                        stun_note = (
                            logging.WARNING,
                            f"STUN server cannot listen on UDP {stun_host or '*'}:{stun_port} "
                            f"({e.strerror or e}): left out of the DERP map",
                        )
                    else:
                        relay.extra_metrics.append(stun_server.metrics.prometheus)
                        advertised_stun = stun_server.addresses[0][1]
                        stun_note = (
                            logging.INFO,
                            "STUN server listening on "
                            + ", ".join(f"udp {Endpoint.from_sockaddr(a)}" for a in stun_server.addresses),
                        )
                bound = relay.addresses[0][1] if relay.addresses else derp_port
                advertised = derp_advertised_host(derp_host, host, derp_hostname)
                urls = ", ".join(f"{http_url(h, p)}/derp" for h, p in relay.addresses)
                if advertised is None:
                    derp_note = (
                        logging.WARNING,
                        f"embedded DERP relay listening on {urls} (key {derp_key.public.text()}) but left "
                        "out of the DERP map: pass --derp-hostname (the host or IP nodes reach it at)",
                    )
                else:
                    own = embedded_derp_map(
                        advertised, bound, derp_region_id, derp_region_code, advertised_stun
                    )
                    try:
                        derp_map = own if external is None else own.merged(external)
                    except ParseError as e:  # (region ids were checked above)
                        raise ConfigError(str(e)) from None
                    at = own.regions[derp_region_id].nodes[0].url()
                    derp_note = (
                        logging.INFO,
                        f"embedded DERP relay listening on {urls} (key {derp_key.public.text()}), region "
                        f"{derp_region_id} {derp_region_code!r} at {at}",
                    )
        settings = store.configure(domain=domain, prefix_v4=prefix_v4, prefix_v6=prefix_v6)
        server = ControlServer(
            store, key_lifetime=lifetime, ephemeral_timeout=gc_after, derp_map=derp_map, oidc=oidc
        )
        if relay is not None and derp_verify_clients:
            relay.verify_client = local_admission(server.derp_admits)
        admin = AdminServer(Admin(store, server=server, key_lifetime=lifetime), state_dir / SOCKET_NAME)
        await admin.start()
        try:
            await server.start(host, port)
        except OSError as e:
            await admin.stop()
            if stun_server is not None:
                await stun_server.stop()
            if relay is not None:
                await relay.stop()
            raise ConfigError(f"cannot listen on {listen}: {e.strerror or e}") from None
        stop = asyncio.Event()  # (before the log lines: a reader may signal as soon as it sees them)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "control server listening on %s (key %s, state %s, domain %s, database %s)",
            " and ".join(http_url(h, p) for h, p in server.addresses),
            server.public_key.text(),
            state_dir,
            settings.domain,
            store.where,
        )
        if derp_note is not None:
            log.log(*derp_note)
        if oidc is not None:
            log.info("login with %s enabled; login links start at %s", oidc.issuer, oidc.server_url)
        regions = sorted(derp_map.regions) if derp_map is not None else []
        log.info("DERP map: %s", ", ".join(map(str, regions)) if regions else "none")
        if stun_note is not None:
            log.log(*stun_note)
        await stop.wait()
        logging.getLogger("tailpy.control").info("shutting down")
        await admin.stop()
        await server.stop()
        if stun_server is not None:
            await stun_server.stop()
        if relay is not None:
            await relay.stop()

    try:
        asyncio.run(run())
    finally:
        store.close()


def _default_server_url(listen: str) -> str | None:
    host, port = _parse_listen(listen)
    if host in (None, "0.0.0.0", "::"):
        return None
    from tailpy.control.server import http_url

    return http_url(host, port)


_OIDC_ONLY = (
    ("--oidc-scope", "scopes"),
    ("--oidc-allowed-domain", "domains"),
    ("--oidc-allowed-user", "users"),
    ("--oidc-allowed-group", "groups"),
    ("--oidc-groups-claim", "groups_claim"),
    ("--oidc-expiry-from-token", "expiry_from_token"),
    ("--approve-nodes", "approval"),
)
_DOMAIN = re.compile(r"(?i)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+")


def _check_server_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is an http(s) URL with a host (and nothing after the path)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--server-url {url!r} must be an http:// or https:// URL with a host, e.g. "
            "https://control.example.com"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"--server-url {url!r} must not have a query or fragment")


def oidc_config(
    issuer: str | None,
    client_id: str | None,
    secret_file: Path | None,
    server_url: str | None,
    **policy: Any,
) -> Any:
    """The :class:`tailpy.control.oidc.OIDCConfig` of the --oidc-* options (None without --oidc-issuer).
    Raises ConfigError naming what is missing."""
    if server_url is not None:
        _check_server_url(server_url)
    if issuer is None:
        if client_id or secret_file:
            raise ConfigError("--oidc-client-id and --oidc-client-secret-file need --oidc-issuer")
        given = [
            flag
            for flag, key in _OIDC_ONLY
            if policy.get(key) and (key != "groups_claim" or policy[key] != "groups")
        ]
        if given:
            one = len(given) == 1
            raise ConfigError(
                f"{', '.join(given)} only appl{'ies' if one else 'y'} to browser login: "
                f"{'it needs' if one else 'they need'} --oidc-issuer"
            )
        return None
    from tailpy.control.oidc import OIDCConfig, read_secret

    for d in policy["domains"]:
        if not _DOMAIN.fullmatch(d):
            raise ConfigError(
                f"--oidc-allowed-domain {d!r} is not an email domain: give it like example.com (no @, no "
                "scheme)"
            )
    for sc in policy["scopes"]:
        if not sc or any(c.isspace() for c in sc):
            raise ConfigError(f"--oidc-scope {sc!r} is not a scope: give one word per --oidc-scope")

    if not issuer.startswith(("https://", "http://")):
        raise ConfigError(f"--oidc-issuer {issuer!r} must be an https:// (or, for tests, http://) URL")
    if not client_id or secret_file is None:
        raise ConfigError("--oidc-issuer needs --oidc-client-id and --oidc-client-secret-file")
    if server_url is None:
        raise ConfigError(
            "pass --server-url (how browsers reach this server, e.g. https://control.example.com): --listen "
            "is every address"
        )
    # OpenID Connect needs "openid" (without it the provider sends no ID token): always asked for.
    scopes = tuple(policy.pop("scopes")) or ("openid", "email", "profile")
    scopes = ("openid", *(sc for sc in dict.fromkeys(scopes) if sc != "openid"))
    return OIDCConfig(
        issuer.rstrip("/"),
        client_id,
        read_secret(secret_file),
        server_url.rstrip("/"),
        scopes=scopes,
        allowed_domains=tuple(policy.pop("domains")),
        allowed_users=tuple(policy.pop("users")),
        allowed_groups=tuple(policy.pop("groups")),
        **policy,
    )


def _admin(state_dir: Path, db: str | None, op: str, args: dict[str, Any]) -> Any:
    from tailpy.control import admin

    return admin.run(state_dir, db, op, args)


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal; when stdout is not one (a pipe, a file), tab-separated lines: a header line,
    then one line per row, nothing cut short whatever the width."""
    if not sys.stdout.isatty():
        for r in [headers, *rows]:
            click.echo("\t".join(c.replace("\t", " ").replace("\n", " ") for c in r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def _out(as_json: bool, result: Any, sentence: str) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else sentence)


# --- users ---


@command.group("users")
def users() -> None:
    """Users own nodes (through the auth keys they register with)."""


@users.command("create")
@_state_dir
@_db
@_json
@click.argument("name")
def users_create(state_dir: Path, db: str | None, as_json: bool, name: str) -> None:
    """Create user NAME (alice, alice@example.com)."""
    _out(as_json, _admin(state_dir, db, "users.create", {"name": name}), f"created user {name}")


@users.command("list")
@_state_dir
@_db
@_json
def users_list(state_dir: Path, db: str | None, as_json: bool) -> None:
    """List users."""
    result = _admin(state_dir, db, "users.list", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    now = time.time()
    _table(["ID", "NAME", "CREATED"], [[str(u["id"]), u["name"], _when(u["created"], now)] for u in result])


@users.command("delete")
@_state_dir
@_db
@_json
@click.argument("name")
def users_delete(state_dir: Path, db: str | None, as_json: bool, name: str) -> None:
    """Delete user NAME and its auth keys (refused while it owns nodes)."""
    _out(as_json, _admin(state_dir, db, "users.delete", {"name": name}), f"deleted user {name}")


# --- auth keys ---


@command.group("authkey")
def authkey() -> None:
    """Pre-auth keys that let machines join."""


@authkey.command("create")
@_state_dir
@_db
@_json
@click.option("--user", default=None, help="Owner of the nodes it registers (default: user 'default').")
@click.option("--tags", default="", help="Comma-separated tags (tag:server,...): tagged nodes, no user.")
@click.option("--reusable", is_flag=True, help="Let the key register any number of machines.")
@click.option("--ephemeral", is_flag=True, help="Its nodes are removed after --ephemeral-timeout offline.")
@click.option("--expiration", default="1h", show_default=True, help="Lifetime: 90s, 30m, 1h, 7d or never.")
def authkey_create(
    state_dir: Path,
    db: str | None,
    as_json: bool,
    user: str | None,
    tags: str,
    reusable: bool,
    ephemeral: bool,
    expiration: str,
) -> None:
    """Print a new pre-auth key (tskey-auth-...) for `tailpy up --auth-key`."""
    args = {
        "user": user,
        "tags": [t for t in tags.split(",") if t.strip()],
        "reusable": reusable,
        "ephemeral": ephemeral,
        "expiration": parse_duration(expiration),
    }
    result = _admin(state_dir, db, "authkey.create", args)
    _out(as_json, result, result["key"])


@authkey.command("list")
@_state_dir
@_db
@_json
def authkey_list(state_dir: Path, db: str | None, as_json: bool) -> None:
    """List pre-auth keys (prefix only): owner or tags, reusable, ephemeral, uses, last use, expiry."""
    result = _admin(state_dir, db, "authkey.list", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    now = time.time()
    yn = {True: "yes", False: "no"}
    _table(
        ["ID", "KEY", "USER/TAGS", "REUSABLE", "EPHEMERAL", "USED", "LAST USED", "EXPIRES"],
        [
            [
                str(k["id"]),
                k["key"],
                k["user"] or ",".join(k["tags"]),
                yn[k["reusable"]],
                yn[k["ephemeral"]],
                _uses(k),
                "-" if k.get("last_used") is None else _when(k["last_used"], now),
                "never" if k["expires"] is None else _when(k["expires"], now),
            ]
            for k in result
        ],
    )


@authkey.command("expire")
@_state_dir
@_db
@_json
@click.argument("key")
def authkey_expire(state_dir: Path, db: str | None, as_json: bool, key: str) -> None:
    """Make auth key KEY (its ID from `authkey list`, or the full key) expire now."""
    _out(as_json, _admin(state_dir, db, "authkey.expire", {"key": key}), f"expired auth key {key}")


# --- nodes ---


@command.group("nodes")
def nodes() -> None:
    """Machines registered with this server."""


@nodes.command("list")
@_state_dir
@_db
@_json
def nodes_list(state_dir: Path, db: str | None, as_json: bool) -> None:
    """List nodes: id, name, owner, addresses, online, key expiry, last seen."""
    result = _admin(state_dir, db, "nodes.list", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    now = time.time()
    _table(
        ["ID", "NAME", "USER/TAGS", "IPV4", "IPV6", "OS", "ONLINE", "KEY EXPIRES", "LAST SEEN", "NODE KEY"],
        [
            [
                str(n["id"]),
                n["name"],
                n["user"] or ",".join(n["tags"]),
                _addr(n, 4),
                _addr(n, 6),
                n["os"],
                "yes" if n["online"] else "no",
                _expiry(n, now),
                "-" if n["last_seen"] is None else _when(n["last_seen"], now),
                n["node_key"][:16] + "…",
            ]
            for n in result
        ],
    )


@nodes.command("pending")
@_state_dir
@_db
@_json
def nodes_pending(state_dir: Path, db: str | None, as_json: bool) -> None:
    """List machines that signed in and wait for approval (serve --approve-nodes)."""
    result = _admin(state_dir, db, "nodes.pending", {})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    now = time.time()
    _table(
        ["ID", "HOSTNAME", "USER", "EMAIL", "OS", "SIGNED IN", "MACHINE KEY"],
        [
            [
                str(p["id"]),
                p["hostname"],
                p["user"],
                p["email"],
                p["os"],
                _when(p["created"], now),
                p["machine_key"][:16] + "…",
            ]
            for p in result
        ],
    )


@nodes.command("approve")
@_state_dir
@_db
@_json
@click.argument("pending_id", type=int)
def nodes_approve(state_dir: Path, db: str | None, as_json: bool, pending_id: int) -> None:
    """Let pending machine PENDING_ID (see `nodes pending`) join the tailnet."""
    n = _admin(state_dir, db, "nodes.approve", {"id": pending_id})
    _out(as_json, n, f"approved: node {n['id']} {n['name']} {_addr(n, 4)} ({n['user']})")


@nodes.command("reject")
@_state_dir
@_db
@_json
@click.argument("pending_id", type=int)
def nodes_reject(state_dir: Path, db: str | None, as_json: bool, pending_id: int) -> None:
    """Refuse pending machine PENDING_ID; it may sign in again."""
    p = _admin(state_dir, db, "nodes.reject", {"id": pending_id})
    _out(as_json, p, f"rejected: {p['hostname']} ({p['user']})")


def _uses(k: dict[str, Any]) -> str:
    """USED of `authkey list`: yes/no for a single-use key; how many registrations for a reusable one."""
    uses = int(k.get("uses") or (1 if k["used"] else 0))
    if not k["reusable"]:
        return "yes" if uses else "no"
    return "no" if not uses else "1 time" if uses == 1 else f"{uses} times"


def _addr(n: dict[str, Any], version: int) -> str:
    for a in n["addresses"]:
        if (":" in a) == (version == 6):
            return str(a).split("/")[0]
    return ""


def _expiry(n: dict[str, Any], now: float) -> str:
    if n["expired"]:
        return "expired"
    return "never" if n["key_expiry"] is None else _when(n["key_expiry"], now)


@nodes.command("show")
@_state_dir
@_db
@_json
@click.argument("node_id", type=int)
def nodes_show(state_dir: Path, db: str | None, as_json: bool, node_id: int) -> None:
    """Show node NODE_ID in full."""
    n = _admin(state_dir, db, "nodes.show", {"id": node_id})
    if as_json:
        click.echo(json.dumps(n, indent=2))
        return
    now = time.time()
    for k, v in [
        ("id", n["id"]),
        ("name", n["fqdn"]),
        ("hostname", n["hostname"]),
        ("user", n["user"] or "-"),
        ("tags", ",".join(n["tags"]) or "-"),
        ("os", n["os"] or "-"),
        ("addresses", " ".join(n["addresses"])),
        ("endpoints", " ".join(n["endpoints"]) or "-"),
        ("online", "yes" if n["online"] else "no"),
        ("key expiry", _expiry(n, now)),
        ("node key", n["node_key"]),
        ("machine key", n["machine_key"]),
    ]:
        click.echo(f"{k + ':':13} {v}")


@nodes.command("rename")
@_state_dir
@_db
@_json
@click.argument("node_id", type=int)
@click.argument("name")
def nodes_rename(state_dir: Path, db: str | None, as_json: bool, node_id: int, name: str) -> None:
    """Rename node NODE_ID to NAME (a DNS label; refused when another node has it)."""
    n = _admin(state_dir, db, "nodes.rename", {"id": node_id, "name": name})
    _out(as_json, n, f"node {node_id} is now {n['fqdn']}")


@nodes.command("expire")
@_state_dir
@_db
@_json
@click.argument("node_id", type=int)
def nodes_expire(state_dir: Path, db: str | None, as_json: bool, node_id: int) -> None:
    """Expire node NODE_ID's key now: peers stop talking to it until it logs in again with an auth key."""
    n = _admin(state_dir, db, "nodes.expire", {"id": node_id})
    _out(as_json, n, f"expired the key of node {node_id} ({n['name']})")


@nodes.command("expiry")
@_state_dir
@_db
@_json
@click.argument("node_id", type=int)
@click.option("--disable/--enable", "disable", required=True, help="Turn key expiry off or back on.")
def nodes_expiry(state_dir: Path, db: str | None, as_json: bool, node_id: int, disable: bool) -> None:
    """Disable key expiry for node NODE_ID (its key never expires), or enable it again (from now)."""
    n = _admin(state_dir, db, "nodes.expiry", {"id": node_id, "disabled": disable})
    _out(as_json, n, f"key expiry of node {node_id} ({n['name']}): {_expiry(n, time.time())}")


@nodes.command("delete")
@_state_dir
@_db
@_json
@click.argument("node_id", type=int)
def nodes_delete(state_dir: Path, db: str | None, as_json: bool, node_id: int) -> None:
    """Remove node NODE_ID from the tailnet (its machine may rejoin, same address, with `tailpy login`
    where control has a login provider, or with an auth key)."""
    _out(as_json, _admin(state_dir, db, "nodes.delete", {"id": node_id}), f"deleted node {node_id}")


def _add_dns() -> None:
    from tailpy.cli import control_dns

    command.add_command(control_dns.command)


_add_dns()

for _cmd in (
    users_create,
    users_list,
    users_delete,
    authkey_create,
    authkey_list,
    authkey_expire,
    nodes_list,
    nodes_show,
    nodes_rename,
    nodes_expire,
    nodes_expiry,
    nodes_delete,
):
    _cmd.help = f"{_cmd.help}\n\n{ADMIN_NOTE}"


def _span(seconds: float) -> str:
    """A duration for people: "45s", "12m", "3h 5m", "2d 4h", "180d"."""
    s = round(abs(seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h and d < 10 else f"{d}d"


def _when(t: float, now: float) -> str:
    d = t - now
    return f"in {_span(d)}" if d > 0 else f"{_span(d)} ago"


__all__ = [
    "DERP_PORT",
    "command",
    "derp_advertised_host",
    "embedded_derp_map",
    "load_derp_map",
    "parse_duration",
]
