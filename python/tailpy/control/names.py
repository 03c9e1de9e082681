"""Node names: hostnames made into DNS labels, made unique in the tailnet, and checked for renames.

A node's name is given at its first registration (or when a deleted node comes back), and stored; it never
changes because another node comes or goes. The node asking for a new hostname (``tailpy up --hostname``)
changes it, as Tailscale's control follows a node's Hostinfo.Hostname, unless an admin renamed the node
(then the admin's name stays). Its FQDN is ``<name>.<tailnet domain>``.

Names a resolver or a host treats specially are never given as they are (:data:`RESERVED`: ``localhost``
and the other names of /etc/hosts' loopback and multicast lines, ``broadcasthost``, ``wpad`` (proxy
auto-discovery, which a tailnet name must not answer for), and ``magicdns``, the MagicDNS resolver's own
name): a node asking for one gets the first free ``<name>-1``, ``<name>-2``, ..., and an admin cannot
rename a node to one. An all-digit name would read as a node id (``tailpy control nodes show 6``): a node
asking for hostname "7" is named ``node-7``, and an admin cannot rename a node to digits only.
"""

from __future__ import annotations

import re
from collections.abc import Container

from tailpy.errors import ConfigError

MAX_LABEL = 63
DEFAULT_NAME = "node"
DEFAULT_DOMAIN = "tailnet.internal"
LOCAL_SUFFIXES = (".localdomain", ".local", ".lan")

RESERVED = frozenset(
    {
        "localhost",
        "localhost6",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-mcastprefix",
        "broadcasthost",
        "localdomain",
        "wpad",
        "magicdns",
    }
)
"""Labels never given to a node as they are (see the module docstring)."""

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def sanitize(hostname: str) -> str:
    """``hostname`` as a DNS label (RFC 1123): lowercase; a trailing ``.local``, ``.localdomain`` or
    ``.lan`` stripped; spaces, dots, ``@`` and ``_`` become ``-``; other characters outside a-z0-9- dropped;
    leading and trailing hyphens trimmed; at most 63 characters; "node" when nothing is left,
    ``node-<digits>`` when only digits are (a name never reads as a node id).

    >>> sanitize("Bob's MacBook.local")
    'bobs-macbook'
    """
    h = hostname.strip().lower().rstrip(".")
    for suffix in LOCAL_SUFFIXES:
        if h.endswith(suffix):
            h = h[: -len(suffix)]
            break
    h = re.sub(r"[ .@_]", "-", h)
    h = re.sub(r"[^a-z0-9-]", "", h)
    h = h.strip("-")[:MAX_LABEL].strip("-")
    if h.isdigit():
        h = f"{DEFAULT_NAME}-{h}"[:MAX_LABEL]
    return h or DEFAULT_NAME


def with_suffix(base: str, n: int) -> str:
    """``base`` with ``-n`` (n >= 1) appended, ``base`` shortened so the result stays within 63 characters."""
    suffix = f"-{n}"
    return base[: MAX_LABEL - len(suffix)].rstrip("-") + suffix


def unique(base: str, taken: Container[str]) -> str:
    """``base`` if it is not in ``taken`` nor :data:`RESERVED`, else the first free ``base-1``, ``base-2``,
    ..."""
    name, n = base, 0
    while name in taken or name in RESERVED:
        n += 1
        name = with_suffix(base, n)
    return name


def check_label(name: str) -> str:
    """``name`` if it is already a valid DNS label (what ``nodes rename`` accepts); raises ConfigError."""
    if not _LABEL.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a valid node name: use 1-63 lowercase letters, digits and inner hyphens "
            f"(for example {sanitize(name)!r})"
        )
    if name.isdigit():
        raise ConfigError(
            f"{name!r} would read as a node id: choose a node name with a letter "
            f"(for example {sanitize(name)!r})"
        )
    if name in RESERVED:
        raise ConfigError(f"{name!r} is reserved (resolvers treat it specially): choose another node name")
    return name


def check_domain(domain: str) -> str:
    """``domain`` lowercased if it is a DNS name of valid labels ("tailnet.internal"). Raises ConfigError."""
    d = domain.strip().lower().rstrip(".")
    if not d or len(d) > 200 or not all(_LABEL.fullmatch(p) for p in d.split(".")):
        raise ConfigError(f"the tailnet domain {domain!r} is not a DNS name like tailnet.internal")
    return d


__all__ = ["DEFAULT_DOMAIN", "RESERVED", "check_domain", "check_label", "sanitize", "unique", "with_suffix"]
