"""The values of `tailpy control serve`'s and `tailpy derp serve`'s options, parsed and checked: durations
(``--key-expiry 30d``), listen addresses (``--listen [::1]:8080``), a DERP map file (``--derp-map``), the
server URL and the OpenID Connect settings (``--oidc-*``). Each raises ConfigError with one sentence naming
the option, so the CLI, a test or a program embedding the control process report the same mistakes."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailpy.errors import ConfigError, ParseError
from tailpy.netmap import DerpMap

if TYPE_CHECKING:
    from tailpy.control.oidc import OIDCConfig

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_DAYS = 3650
"""Longest duration the options take (10 years): a longer one is a typo, or `never`."""
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw])")
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
"""Listen hosts that mean every address (nobody can be told to connect to them)."""


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


def parse_listen(text: str, flag: str = "--listen") -> tuple[str | None, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every address) -> (host or None, port 0-65535). Raises
    ConfigError naming ``flag``."""
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


def load_derp_map(path: Path) -> DerpMap:
    """A Tailscale-shaped DERP map (``tailcfg.DERPMap`` JSON) from ``path``. Raises ConfigError (one
    sentence naming the file)."""
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


def default_server_url(listen: str) -> str | None:
    """The URL browsers and nodes reach a server listening on ``listen`` (``HOST:PORT``) at: None when the
    host is every address (then ``--server-url`` must say). Raises ConfigError for a bad ``listen``."""
    host, port = parse_listen(listen)
    if host is None or host in WILDCARDS:
        return None
    from tailpy.control.server import http_url

    return http_url(host, port)


def check_server_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is an http(s) URL with a host (and nothing after the path)."""
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


def oidc_config(
    issuer: str | None,
    client_id: str | None,
    secret_file: Path | None,
    server_url: str | None,
    **policy: Any,
) -> OIDCConfig | None:
    """The :class:`tailpy.control.oidc.OIDCConfig` of the --oidc-* options (None without --oidc-issuer).
    ``policy``: ``scopes``, ``domains``, ``users``, ``groups`` (sequences of text), ``groups_claim`` (text),
    ``expiry_from_token`` and ``approval`` (bools). Raises ConfigError naming what is missing."""
    if server_url is not None:
        check_server_url(server_url)
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


__all__ = [
    "MAX_DURATION_DAYS",
    "WILDCARDS",
    "check_server_url",
    "default_server_url",
    "load_derp_map",
    "oidc_config",
    "parse_duration",
    "parse_listen",
]
