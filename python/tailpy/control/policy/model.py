"""The policy model: Tailscale's tailnet policy file read into typed rules, checked, with positions.

A policy is a HuJSON object (:mod:`tailpy.control.policy.hujson`) with Tailscale's sections. Field names
are matched without regard to case, as Go's ``encoding/json`` (and so Tailscale) matches them: ``"ACLs"``,
``"TagOwners"`` and ``"acls"`` are the same section. A top-level key that is not one of Tailscale's sections,
or a field Tailscale does not know in an entry of ``acls``, ``grants``, ``tests``, ``ssh`` or ``sshTests``
(:data:`ENTRY_FIELDS`), is refused, as Tailscale refuses it: a misspelt field must not widen a rule. Group
and tag names are case-sensitive (``tag:Prod`` and ``tag:prod`` are two tags), as in Tailscale; a tag name
follows :func:`tag_error`. Sections:

* ``groups``: ``{"group:dev": ["alice@example.com", "bob@"]}``: users only (groups do not nest).
* ``hosts``: ``{"db": "100.64.0.5", "office": "192.0.2.0/24"}``: names for an IP address or a prefix.
* ``tagOwners``: ``{"tag:server": ["group:ops", "alice@example.com", "tag:ci", "autogroup:admin"]}``: who
  may give a node the tag (:meth:`Policy.may_own`). Every tag used anywhere must be listed here.
* ``acls``: ``{"action": "accept", "src": [...], "dst": ["target:ports", ...], "proto"?: "tcp"}`` (the
  legacy field names ``users`` and ``ports`` are read too). Only ``accept`` exists (Tailscale refuses
  ``deny``).
* ``grants``: ``{"src": [...], "dst": [...], "ip": ["*", "22", "tcp:80-443", "icmp:*"]}``: the network
  part. ``app`` (capability grants) is ignored with a warning; a grant with ``via`` or ``srcPosture`` is
  not enforced (its rule is left out, so it grants nothing) and reported.
* without ``acls`` and ``grants`` (absent, not empty), every node may reach every port, as Tailscale's
  default policy allows; an empty ``acls`` list allows nothing.
* ``tests``: ``{"src": "alice@example.com", "proto"?: "tcp", "accept": ["tag:server:22"], "deny": [...]}``,
  evaluated by :func:`tailpy.control.policy.compiler.check_tests`.
* ``autoApprovers``: ``{"routes": {"198.51.100.0/24": ["group:x", "tag:r"]}, "exitNode": [...]}``: who
  gets advertised routes and exit nodes approved without an admin (:attr:`Policy.auto_approvers`, applied
  by :func:`tailpy.control.routes.auto_approved`); the groups and tags it names must be defined.
* the other sections (:data:`NOT_ENFORCED_SECTIONS`: ``ssh``, ``sshTests``,
  ``nodeAttrs``, ``postures``, ``ipsets``, ``derpMap``, ``disableIPv4``, ``randomizeClientPort``, ...) are
  accepted and listed in :attr:`Policy.not_enforced`; the groups and tags ``ssh`` names must be defined,
  and ``ssh`` rules are checked as Tailscale checks them.
* targets of kinds tailpy does not enforce yet (``ipset:x``, defined in ``ipsets``; ``svc:x``) are left
  out of their rule with a warning; a rule left with no source or no destination is left out.

Targets (``src``, ``dst`` and the ``tests``): ``*``; a user, written as an email (``alice@example.com``,
matched against a node owner's login name and email) or as ``name@`` (matched against the login name),
optionally prefixed ``user:``, or ``user:*@example.com`` (every user of a domain);
``group:x``; ``tag:x``; a host name; an IP address or CIDR prefix; ``autogroup:member`` (nodes of users,
untagged), ``autogroup:tagged``, ``autogroup:self`` (destination only: the source user's own untagged
nodes), ``autogroup:internet`` (destination only: the internet through exit nodes; it lets the source use
exit nodes, and an exit node's filter accepts the source's packets to every non-private address),
``autogroup:danger-all`` (source only: every address, rendered ``"*"``). Autogroups naming user
roles (``autogroup:admin``, ``autogroup:owner``, ...) match no node: tailpy has no roles. Ports: ``*``,
``22``, ``80-443`` or a comma-separated list of those; a port range starts at 1 or more (``*`` is every
port, 0 included), as Tailscale requires. Protocols (``proto``, and grants' ``ip``): IANA
numbers ``1``-``255`` or the names Tailscale accepts (``tcp``, ``udp``, ``icmp``, ``ipv6-icmp``,
``sctp``, ``igmp``, ``ipv4``/``ip-in-ip``, ``egp``, ``igp``, ``gre``, ``esp``, ``ah``, ``fc``); a protocol
without ports (anything but tcp, udp and sctp) only with port ``*``.

Sources: Tailscale's policy file reference (kb/1337 "ACL syntax", kb/1324 "grants"), and Headscale's
``hscontrol/policy/v2/types.go`` for the corner cases Tailscale's documentation leaves open.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailpy.control.policy import hujson
from tailpy.errors import TailpyError
from tailpy.packetfilter import PortRange

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(TailpyError, ValueError):
    """A policy is malformed or inconsistent, or one of its ``tests`` fails.

    ``line`` / ``column``: 1-based position in the policy text, None when not known; ``message``: what is
    wrong. ``str(e)`` is ``"line 12, column 5: group:dev is not defined"`` (just the message without a
    position)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        self.message = message
        self.line = line
        self.column = column
        super().__init__(message if line is None else f"line {line}, column {column}: {message}")


@dataclass(frozen=True)
class PolicyNode:
    """What the compiler knows of a node.

    ``addresses``: CIDR host prefixes as :attr:`tailpy.netmap.Node.addresses` (``"100.64.0.1/32"``); ``user``:
    the owner's login name (``"alice"`` or ``"alice@example.com"``), ``""`` for a tagged node; ``email``:
    the owner's email, ``""`` when unknown; ``tags``: ``("tag:server",)``; ``routes``: the routes the node
    serves (approved and advertised, CIDR prefixes: :func:`tailpy.control.routes.served_routes`), the exit
    routes ``0.0.0.0/0`` and ``::/0`` included for an exit node."""

    id: int
    addresses: tuple[str, ...]
    user: str = ""
    email: str = ""
    tags: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        return bool(self.tags)


# --- targets ---

PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "ipv4": 4,
    "ip-in-ip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "sctp": 132,
    "fc": 133,
}
"""Protocol names Tailscale's policy file accepts, and their IANA numbers (``icmp`` is ICMPv4 only, as in
Tailscale; ICMPv6 is ``ipv6-icmp`` or ``58``)."""

PORTED_PROTOCOLS = frozenset({6, 17, 132})
"""Protocols with ports: any other protocol may be given with port ``*`` only."""

ROLE_AUTOGROUPS = frozenset(
    {
        "autogroup:admin",
        "autogroup:owner",
        "autogroup:it-admin",
        "autogroup:network-admin",
        "autogroup:billing-admin",
        "autogroup:auditor",
        "autogroup:shared",
    }
)
AUTOGROUPS = frozenset(
    {"autogroup:member", "autogroup:tagged", "autogroup:self", "autogroup:internet", "autogroup:danger-all"}
)


@dataclass(frozen=True)
class Alias:
    """One target: ``kind`` is ``"*"``, ``"user"``, ``"group"``, ``"tag"``, ``"ip"`` (an address, a prefix
    or a host name: ``net`` set, ``name`` as written) or ``"autogroup"`` (``name`` the whole
    ``autogroup:x``)."""

    kind: str
    name: str
    net: Network | None = None

    def rendered(self) -> str:
        """A literal destination as Tailscale renders it in DstPorts: a single address bare, else CIDR."""
        assert self.net is not None
        if self.net.num_addresses == 1:
            return str(self.net.network_address)
        return str(self.net)


STAR = Alias("*", "*")


@dataclass(frozen=True)
class Dst:
    alias: Alias
    ports: tuple[PortRange, ...]


@dataclass(frozen=True)
class Rule:
    """One network rule: traffic from ``srcs`` to ``dsts`` (each with its ports) over ``protos`` (empty:
    Tailscale's default set). ``where``: ``"acls[3]"`` or ``"grants[1]"``, for messages."""

    srcs: tuple[Alias, ...]
    dsts: tuple[Dst, ...]
    protos: tuple[int, ...]
    where: str


@dataclass(frozen=True)
class PolicyTest:
    src: str
    proto: int | None
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    position: tuple[int | None, int | None]
    where: str


@dataclass(frozen=True)
class AutoApprovers:
    """The policy's ``autoApprovers``: ``routes`` (prefix, its approvers as written) in file order;
    ``exit_node``: the approvers of exit nodes. Approvers are ``tag:x``, ``group:x``, users, autogroups."""

    routes: tuple[tuple[Network, tuple[str, ...]], ...] = ()
    exit_node: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Policy:
    """A checked policy. Build it with :meth:`parse`.

    ``text``: the source as given; ``rules``: the network rules in order (grants first, then acls, each in
    file order; a grant gives one rule per protocol of its ``ip``); ``groups`` (name as written -> users,
    lower case), ``hosts`` (name, lower case -> network), ``tag_owners`` (tag as written -> owners: users
    and autogroups lower case, groups and tags as written); ``tests``;
    ``not_enforced``: sections present but not enforced yet; ``warnings``: what was read but ignored
    (``"grants[2]: capability grant ignored (app)"``); ``auto_approvers``: the ``autoApprovers``
    section."""

    text: str
    rules: tuple[Rule, ...]
    groups: Mapping[str, tuple[str, ...]]
    hosts: Mapping[str, Network]
    tag_owners: Mapping[str, tuple[str, ...]]
    tests: tuple[PolicyTest, ...] = ()
    not_enforced: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    _doc: hujson.Document | None = field(default=None, repr=False)
    auto_approvers: AutoApprovers = AutoApprovers()

    @classmethod
    def parse(cls, text: str) -> Policy:
        """Read and check a HuJSON policy. Raises PolicyError with the line and column of the first
        problem: malformed HuJSON, a section or field of the wrong type, an undefined group, host or tag
        (a tag is defined by listing it in ``tagOwners``), a bad port or protocol, ``autogroup:self`` with a
        source other than users, groups, ``autogroup:member`` or ``*``."""
        try:
            doc = hujson.parse(text)
        except hujson.HuJSONError as e:
            raise PolicyError(e.message, e.line, e.column) from None
        return _Reader(doc).read()

    def position(self, path: tuple[Any, ...]) -> tuple[int | None, int | None]:
        """(line, column) of the element at ``path`` in :attr:`text` ((None, None) when unknown)."""
        pos = None if self._doc is None else self._doc.position(path)
        return (None, None) if pos is None else pos

    def may_own(self, tag: str, user: str, email: str = "") -> bool:
        """Whether the user with login name ``user`` (and ``email``, "" when unknown) may give a node
        ``tag``: listed in the tag's ``tagOwners`` directly (by email or ``name@``), through a group, or
        through ``autogroup:member`` (any user). Owners that are tags or role autogroups
        (``autogroup:admin``) admit no user here: tailpy has no roles, so only control's admin API
        assigns such tags. False for a tag not in ``tagOwners``."""
        owners = self.tag_owners.get(tag)
        if owners is None or not (user or email):
            return False
        for owner in owners:
            if owner == "autogroup:member":
                return True
            if owner.startswith("group:"):
                if any(user_matches(m, user, email) for m in self.groups.get(owner, ())):
                    return True
            elif "@" in owner and user_matches(owner, user, email):
                return True
        return False


def user_matches(alias: str, user: str, email: str) -> bool:
    """Whether the user alias ``alias`` (``"alice@example.com"`` or ``"alice@"``, lower case) names the
    owner with login name ``user`` and ``email``: an email alias matches the login name or the email, a
    ``name@`` alias the login name ``name`` (or ``name@``)."""
    u = user.lower()
    if alias.startswith("*@"):  # every user of a domain
        return u.endswith(alias[1:]) or (bool(email) and email.lower().endswith(alias[1:]))
    if alias.endswith("@"):
        return u == alias[:-1] or u == alias
    return u == alias or (bool(email) and email.lower() == alias)


# --- reading ---

ENFORCED_SECTIONS = ("acls", "grants", "groups", "hosts", "tagOwners", "tests", "autoApprovers")
NOT_ENFORCED_SECTIONS = (
    "ssh",
    "sshTests",
    "nodeAttrs",
    "postures",
    "defaultSrcPosture",
    "ipsets",
    "derpMap",
    "disableIPv4",
    "randomizeClientPort",
    "OneCGNATRoute",
    "attrConfig",
    "services",
)
"""Top-level sections of Tailscale's policy file that tailpy accepts without enforcing them (Tailscale's
"Syntax reference for the tailnet policy file", kb/1337; Headscale's ``Policy`` struct in
``hscontrol/policy/v2/types.go``). Any other top-level key is refused, as Tailscale refuses it."""

ENTRY_FIELDS: dict[str, tuple[str, ...]] = {
    "acls": ("action", "src", "dst", "proto", "users", "ports", "srcPosture"),
    "grants": ("src", "dst", "ip", "app", "via", "srcPosture"),
    "tests": ("src", "srcPostureAttrs", "proto", "accept", "deny"),
    "sshTests": ("src", "dst", "accept", "check", "deny", "srcPostureAttrs"),
    "ssh": (
        "action",
        "src",
        "dst",
        "users",
        "checkPeriod",
        "acceptEnv",
        "srcPosture",
        "recorder",
        "enforceRecorder",
    ),
}
"""The fields an entry of each list section may have (Tailscale's kb/1337 and kb/1324; Headscale's ``ACL``,
``Grant``, ``PolicyTest``, ``SSHPolicyTest`` and ``SSH`` structs). Tailscale refuses any other field
(``json: unknown field``): a misspelt ``proto`` would otherwise widen a rule to every protocol."""


def tag_error(tag: str) -> str | None:
    """Why ``tag`` is not a valid tag, or None when it is. Tailscale's rule (``tailcfg.CheckTag``): ``tag:``
    (lower case) then a name that starts with an ASCII letter and has only ASCII letters, digits and
    hyphens (``tag:prod``, ``tag:Web-2``; not ``tag:a_b``, ``tag:1abc``, ``tag:ключ``). The policy file,
    auth keys and ``tailpy up --advertise-tags`` all use this rule."""
    name = tag.removeprefix("tag:")
    if name == tag:
        return f"tag {tag!r} must start with 'tag:'"
    if not name:
        return f"tag {tag!r}: the name after 'tag:' is empty"
    if not (name[0].isascii() and name[0].isalpha()):
        return f"tag {tag!r}: a tag name must start with a letter (a-z, A-Z) after 'tag:'"
    if not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
        return f"tag {tag!r}: a tag name may contain only letters (a-z, A-Z), digits and hyphens"
    return None


def _unknown_field(where: str, name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1)
    hint = ""
    if close:
        hint = " (did you mean " + next(f'"{k}"' for k in known if k.lower() == close[0]) + "?)"
    return f'{where}: unknown field "{name}"{hint}'


def _fold(obj: Mapping[str, Any]) -> dict[str, str]:
    """lower-case field name -> the name as written."""
    return {k.lower(): k for k in obj}


class _Reader:
    def __init__(self, doc: hujson.Document) -> None:
        self.doc = doc
        self.warnings: list[str] = []
        self.not_enforced: list[str] = []
        self.groups: dict[str, tuple[str, ...]] = {}
        self.hosts: dict[str, Network] = {}
        self.tag_owners: dict[str, tuple[str, ...]] = {}
        self.ipsets: set[str] = set()
        self.auto_approvers = AutoApprovers()

    def fail(self, path: tuple[Any, ...], message: str) -> PolicyError:
        pos = self.doc.position(path)
        return PolicyError(message, *(pos if pos is not None else (None, None)))

    def key_fail(self, path: tuple[Any, ...], key: str, message: str) -> PolicyError:
        return self.fail((*path, hujson.KEY, key), message)

    def want(self, v: Any, typ: type | tuple[type, ...], path: tuple[Any, ...], what: str) -> Any:
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
            raise self.fail(path, f"{what} must be {_typename(typ)}, not {_jsontype(v)}")
        return v

    def fields(self, v: Any, path: tuple[Any, ...], where: str, section: str) -> dict[str, str]:
        """Check that object ``v`` (an entry of ``section``) has only the fields Tailscale knows there
        (matched without regard to case, each at most once); lower-case name -> name as written."""
        self.want(v, dict, path, where)
        known = ENTRY_FIELDS[section]
        lows = {k.lower() for k in known}
        seen: dict[str, str] = {}
        for k in v:
            if k.lower() not in lows:
                raise self.key_fail(path, k, _unknown_field(where, k, known))
            if k.lower() in seen:
                raise self.key_fail(
                    path, k, f"{where}: field {k!r} is given twice (names are not case-sensitive)"
                )
            seen[k.lower()] = k
        return seen

    def refs(self, v: Any, path: tuple[Any, ...], what: str) -> None:
        """Check the groups and tags named in a not-enforced section (``ssh``, ``autoApprovers``) are
        defined, as Tailscale checks them."""
        for i, s in enumerate(self.strings(v, path, what)):
            s = s.strip()  # Tailscale accepts "tag:server " here
            if s.startswith("group:") and s not in self.groups:
                raise self.fail((*path, i), f"{what}: {s} is not defined")
            if s.startswith("tag:") and s not in self.tag_owners:
                raise self.fail((*path, i), f"{what}: {s} is not defined in tagOwners")

    def read_ssh(self, v: Any, path: tuple[Any, ...], section: str) -> None:
        """``ssh`` and ``sshTests``: not enforced, but their fields and the groups and tags they name are
        checked."""
        for i, e in enumerate(self.want(v, list, path, section)):
            where = f"{section}[{i}]"
            f = self.fields(e, (*path, i), where, section)
            if section == "ssh":
                self.check_ssh_rule(e, f, (*path, i), where)
            elif "dst" in f:  # sshTests: hosts to log in to, by tag, user, host name or single address
                dpath = (*path, i, f["dst"])
                self.refs(e[f["dst"]], dpath, f"{where}.dst")
                for j, d in enumerate(e[f["dst"]]):
                    net = _network(d)
                    if d.startswith("autogroup:internet") or (net is not None and "/" in d):
                        raise self.fail(
                            (*dpath, j), f'{where}: SSH tests dst contains disallowed element "{d}"'
                        )

    def check_ssh_rule(
        self, e: dict[str, Any], f: Mapping[str, str], path: tuple[Any, ...], where: str
    ) -> None:
        """What Tailscale checks in an ``ssh`` rule although tailpy does not enforce it: ``action`` is
        ``accept`` or ``check`` (exactly), ``users`` is not empty and has no ``""`` or ``*``,
        ``acceptEnv`` has no empty value, ``checkPeriod`` is a Go duration in [0, 168h] or ``always``,
        groups and tags named are defined, and ``dst`` names no host (Tailscale: ``invalid dst "srv"``)."""
        action = e.get(f.get("action", "action"))
        if action in (None, ""):
            raise self.fail(path, f"{where}: action must be specified (accept or check)")
        if not isinstance(action, str) or action.strip() not in ("accept", "check"):  # " accept" passes
            raise self.fail((*path, f["action"]), f"{where}: {json.dumps(action)} is not a valid action")
        users = e.get(f.get("users", "users"))
        if not users:
            raise self.fail(path, f"{where}: users must be specified")
        for j, u in enumerate(self.strings(users, (*path, f["users"]), f"{where}.users")):
            if u in ("", "*"):
                raise self.fail((*path, f["users"], j), f"{where}: user {json.dumps(u)} is not valid")
        if "acceptenv" in f and e[f["acceptenv"]] is not None:
            env = self.strings(e[f["acceptenv"]], (*path, f["acceptenv"]), f"{where}.acceptEnv")
            if any(not x for x in env):
                raise self.fail((*path, f["acceptenv"]), f"{where}: acceptEnv values cannot be empty")
        if "checkperiod" in f and e[f["checkperiod"]] is not None:
            period = self.want(e[f["checkperiod"]], str, (*path, f["checkperiod"]), f"{where}.checkPeriod")
            seconds = _go_duration(period)
            if period != "always" and (seconds is None or not 0 <= seconds <= 168 * 3600):
                raise self.fail(
                    (*path, f["checkperiod"]),
                    f"{where}: checkPeriod {period!r} must be a duration from 0 to 168h (or always)",
                )
        for k in ("src", "dst"):
            if k in f:
                self.refs(e[f[k]], (*path, f[k]), f"{where}.{k}")
        if "dst" in f:
            for j, d in enumerate(e[f["dst"]]):
                if d.strip().lower() in self.hosts:
                    raise self.fail(
                        (*path, f["dst"], j),
                        f'{where}: invalid dst "{d}" (a host cannot be an SSH destination)',
                    )

    def read_auto_approvers(self, v: Any, path: tuple[Any, ...]) -> None:
        self.want(v, dict, path, "autoApprovers")
        f = _fold(v)
        routes_out: list[tuple[Network, tuple[str, ...]]] = []
        exit_out: tuple[str, ...] = ()
        if "routes" in f:
            rpath = (*path, f["routes"])
            routes = self.want(v[f["routes"]], dict, rpath, "autoApprovers.routes")
            for prefix, approvers in routes.items():
                net = _network(prefix)
                if net is None:
                    raise self.key_fail(
                        rpath, prefix, f"autoApprovers.routes: {prefix!r} is not a CIDR prefix"
                    )
                self.refs(approvers, (*rpath, prefix), f"autoApprovers.routes[{prefix!r}]")
                routes_out.append((net, tuple(a.strip() for a in approvers)))
        if "exitnode" in f:
            self.refs(v[f["exitnode"]], (*path, f["exitnode"]), "autoApprovers.exitNode")
            exit_out = tuple(a.strip() for a in v[f["exitnode"]])
        self.auto_approvers = AutoApprovers(tuple(routes_out), exit_out)

    def strings(self, v: Any, path: tuple[Any, ...], what: str) -> list[str]:
        self.want(v, list, path, what)
        for i, s in enumerate(v):
            self.want(s, str, (*path, i), f"{what}[{i}]")
        return list(v)

    def read(self) -> Policy:
        top = self.doc.value
        if not isinstance(top, dict):
            raise self.fail((), f"a policy must be a JSON object, not {_jsontype(top)}")
        names = _fold(top)
        for low, k in names.items():
            if k != low and k in top and low in top:
                raise self.key_fail((), k, f"section {k!r} is given twice (names are not case-sensitive)")
        sections = {s.lower() for s in ENFORCED_SECTIONS}
        known = {s.lower(): s for s in NOT_ENFORCED_SECTIONS}
        for low, k in names.items():
            if low not in sections and low not in known:
                every = (*ENFORCED_SECTIONS, *NOT_ENFORCED_SECTIONS)
                raise self.key_fail((), k, _unknown_field("policy", k, every).replace("field", "section", 1))
        for low in names:
            if low not in sections:
                self.not_enforced.append(known[low])
        # Definitions first: rules refer to them.
        if "groups" in names:
            self.read_groups(top[names["groups"]], (names["groups"],))
        if "hosts" in names:
            self.read_hosts(top[names["hosts"]], (names["hosts"],))
        if "tagowners" in names:
            self.read_tag_owners(top[names["tagowners"]], (names["tagowners"],))
        if "ipsets" in names:
            self.ipsets = {k for k in self.want(top[names["ipsets"]], dict, (names["ipsets"],), "ipsets")}
        for low, section in (("ssh", "ssh"), ("sshtests", "sshTests")):
            if low in names:
                self.read_ssh(top[names[low]], (names[low],), section)
        if "autoapprovers" in names:
            self.read_auto_approvers(top[names["autoapprovers"]], (names["autoapprovers"],))
        if "nodeattrs" in names:  # not enforced; the tags and groups it targets must be defined
            k = names["nodeattrs"]
            for i, e in enumerate(self.want(top[k], list, (k,), k)):
                self.want(e, dict, (k, i), f"nodeAttrs[{i}]")
                ef = _fold(e)
                if "target" in ef:
                    self.refs(e[ef["target"]], (k, i, ef["target"]), f"nodeAttrs[{i}].target")
        rules: list[Rule] = []  # grants first: Tailscale lists their rules before the acls' ones
        if "grants" in names:
            k = names["grants"]
            for i, g in enumerate(self.want(top[k], list, (k,), k)):
                rules.extend(self.read_grant(g, (k, i), f"grants[{i}]"))
        if "acls" in names:
            k = names["acls"]
            for i, a in enumerate(self.want(top[k], list, (k,), k)):
                rules.extend(self.read_acl(a, (k, i), f"acls[{i}]"))
        if "acls" not in names and "grants" not in names:  # Tailscale's default: everyone reaches everything
            rules.append(Rule((STAR,), (Dst(STAR, (PortRange(0, 65535),)),), (), "default"))
        tests: list[PolicyTest] = []
        if "tests" in names:
            k = names["tests"]
            for i, t in enumerate(self.want(top[k], list, (k,), k)):
                test = self.read_test(t, (k, i), f"tests[{i}]")
                if test is not None:
                    tests.append(test)
        return Policy(
            self.doc.text,
            tuple(rules),
            self.groups,
            self.hosts,
            self.tag_owners,
            tuple(tests),
            tuple(self.not_enforced),
            tuple(self.warnings),
            self.doc,
            self.auto_approvers,
        )

    # definitions

    def read_groups(self, v: Any, path: tuple[Any, ...]) -> None:
        self.want(v, dict, path, "groups")
        for name, members in v.items():
            if not name.startswith("group:") or len(name) == len("group:"):
                raise self.key_fail(path, name, f"group name {name!r} must start with 'group:'")
            mpath = (*path, name)
            out = []
            for j, m in enumerate(self.strings(members, mpath, name)):
                if m.startswith("group:"):
                    raise self.fail((*mpath, j), f"{name}: groups cannot contain other groups ({m})")
                if "@" not in m:
                    raise self.fail(
                        (*mpath, j), f"{name}: {m!r} is not a user (write alice@example.com or alice@)"
                    )
                out.append(m.lower())
            self.groups[name] = tuple(out)

    def read_hosts(self, v: Any, path: tuple[Any, ...]) -> None:
        self.want(v, dict, path, "hosts")
        for name, addr in v.items():
            if not name or any(c in name for c in ":/@") or name == "*" or _network(name) is not None:
                raise self.key_fail(
                    path,
                    name,
                    f"host name {name!r} is not valid (a name, not an IP address; no ':', '/' or '@')",
                )
            self.want(addr, str, (*path, name), f"hosts[{name!r}]")
            net = _network(addr)
            if net is None:
                raise self.fail((*path, name), f"host {name}: {addr!r} is not an IP address or CIDR prefix")
            self.hosts[name.lower()] = net

    def read_tag_owners(self, v: Any, path: tuple[Any, ...]) -> None:
        self.want(v, dict, path, "tagOwners")
        for tag in v:
            problem = tag_error(tag)
            if problem is not None:
                raise self.key_fail(path, tag, f"tagOwners: {problem}")
            self.tag_owners[tag] = ()
        for tag, owners in v.items():
            opath = (*path, tag)
            out = []
            for j, o in enumerate(self.strings(owners, opath, tag)):
                lo = o.lower()
                if o.startswith("group:"):
                    if o not in self.groups:
                        raise self.fail((*opath, j), f"{o} is not defined")
                    lo = o
                elif o.startswith("tag:"):
                    if o not in self.tag_owners:
                        raise self.fail((*opath, j), f"{o} is not defined in tagOwners")
                    lo = o
                elif lo.startswith("autogroup:"):
                    if lo not in ROLE_AUTOGROUPS and lo != "autogroup:member":
                        raise self.fail((*opath, j), f"{o} cannot own tags")
                elif "@" not in lo:
                    raise self.fail(
                        (*opath, j), f"tag owner {o!r} must be a user, a group, a tag or an autogroup"
                    )
                out.append(lo)
            self.tag_owners[tag] = tuple(out)

    # targets

    def alias(self, s: str, path: tuple[Any, ...], *, side: str, where: str = "") -> Alias | None:
        """The target ``s``; None for a target of a kind tailpy does not enforce yet (``ipset:``, ``svc:``):
        it is left out of its rule, with a warning."""
        lo = s.lower()
        if s == "*":
            return STAR
        if s.startswith("group:"):
            if s not in self.groups:
                raise self.fail(path, f"{s} is not defined")
            return Alias("group", s)
        if s.startswith("tag:"):
            if s not in self.tag_owners:
                raise self.fail(path, f"{s} is not defined in tagOwners (a tag needs an owner)")
            return Alias("tag", s)
        if s.startswith("ipset:"):
            if s not in self.ipsets:
                raise self.fail(path, f"{s} is not defined in ipsets")
            self.warn(f"{where or s}: {s}: IP sets are not enforced yet: the target is left out")
            return None
        if s.startswith("svc:"):
            if side != "dst":
                raise self.fail(path, f"{s}: a service is only valid as a destination")
            self.warn(f"{where or s}: {s}: services are not enforced yet: the target is left out")
            return None
        if lo.startswith("autogroup:"):
            if lo in ROLE_AUTOGROUPS:
                self.warn(f"{s} matches no node: tailpy has no user roles")
                return Alias("autogroup", lo)
            if lo not in AUTOGROUPS:
                raise self.fail(path, f"{s} is not a known autogroup")
            if lo == "autogroup:self" and side != "dst":
                raise self.fail(path, f'"autogroup:self" is not valid on the {side} side of a rule')
            if lo == "autogroup:internet" and side != "dst":
                raise self.fail(path, f'"autogroup:internet" is not valid on the {side} side of a rule')
            if lo == "autogroup:danger-all" and side != "src":
                raise self.fail(path, '"autogroup:danger-all" is only valid as a source')
            return Alias("autogroup", lo)
        if lo.startswith("user:"):  # user:alice@example.com, user:*@example.com
            lo = lo[len("user:") :]
            if "@" not in lo:
                raise self.fail(path, f"{s!r} is not a user (write user:alice@example.com)")
        if "@" in lo:
            return Alias("user", lo)
        if lo in self.hosts:
            return Alias("ip", lo, self.hosts[lo])
        net = _network(s)
        if net is None:
            raise self.fail(
                path, f"{s!r} is not defined (not a host, user, group, tag, IP address or prefix)"
            )
        if net.prefixlen == 0 and side == "dst":
            raise self.fail(path, f'dst "{s}": to allow all IP addresses, use "*" or "autogroup:internet"')
        return Alias("ip", s, net)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def srcs(self, v: Any, path: tuple[Any, ...], what: str) -> tuple[tuple[Alias, ...], bool]:
        """(the sources, whether any was left out as not enforced)."""
        got = [
            self.alias(s, (*path, i), side="src", where=what)
            for i, s in enumerate(self.strings(v, path, what))
        ]
        out = tuple(a for a in got if a is not None)
        return out, len(out) != len(got)

    def ports(self, spec: str, path: tuple[Any, ...], what: str) -> tuple[PortRange, ...]:
        if spec == "*":
            return (PortRange(0, 65535),)
        out = []
        for part in spec.split(","):
            first, sep, last = part.partition("-")
            if not _digits(first) or (sep and not _digits(last)):
                raise self.fail(path, f"{what}: bad port {part!r} (a port is 1-65535, a range 80-443, or *)")
            lo, hi = int(first), int(last) if sep else int(first)
            if hi > 65535 or lo > 65535:
                raise self.fail(path, f"{what}: port {part!r} is out of range 1-65535")
            if lo == 0:  # Tailscale: 'port range "0": first port must be >0, or use '*' for wildcard'
                raise self.fail(
                    path, f"{what}: port range {part!r}: the first port must be > 0 (or use * for all ports)"
                )
            if lo > hi:
                raise self.fail(path, f"{what}: port range {part!r} is empty")
            out.append(PortRange(lo, hi))
        return tuple(out)

    def dst(self, s: str, path: tuple[Any, ...], what: str) -> Dst | None:
        if s.startswith("["):  # [ipv6]:ports
            host, sep, ports = s[1:].partition("]:")
        else:
            host, sep, ports = s.rpartition(":")
        if not sep or not host:
            raise self.fail(path, f"{what}: destination {s!r} needs ports (write {s}:* for all ports)")
        alias = self.alias(host, path, side="dst", where=what)
        ports_ = self.ports(ports, path, what)
        return None if alias is None else Dst(alias, ports_)

    def protocol(self, v: Any, path: tuple[Any, ...], what: str) -> int:
        self.want(v, str, path, what)
        lo = v.lower()
        if lo in PROTOCOLS:
            return PROTOCOLS[lo]
        if _digits(lo) and not (lo.startswith("0")) and int(lo) <= 255:
            return int(lo)
        raise self.fail(
            path, f"{what}: unknown protocol {v!r} (a name such as tcp, udp, icmp, or a number 1-255)"
        )

    def check_self(
        self, srcs: tuple[Alias, ...], dsts: Iterable[Alias], src_path: tuple[Any, ...], *, star: bool = True
    ) -> None:
        """autogroup:self takes users, groups and autogroup:member as sources (and ``*`` in acls, not in
        grants, as Tailscale checks)."""
        if any(d.kind == "autogroup" and d.name == "autogroup:self" for d in dsts):
            for i, a in enumerate(srcs):
                if not (
                    a.kind in ("user", "group") or a.name == "autogroup:member" or (star and a.kind == "*")
                ):
                    raise self.fail(
                        (*src_path, i),
                        "autogroup:self can only be used with users, groups, or supported autogroups "
                        f"({a.name})",
                    )

    # rules

    def read_acl(self, v: Any, path: tuple[Any, ...], where: str) -> list[Rule]:
        f = self.fields(v, path, where, "acls")
        if "action" not in f:
            raise self.fail(path, f'{where}: "action" is missing (only "accept" is supported)')
        action = v[f["action"]]
        if action != "accept":
            raise self.fail(
                (*path, f["action"]),
                f'{where}: action {json.dumps(action)} is not supported (only "accept")',
            )
        if ("src" in f and "users" in f) or ("dst" in f and "ports" in f):
            raise self.fail(path, f"{where}: give src or users, dst or ports, not both")
        srck = f.get("src", f.get("users"))
        dstk = f.get("dst", f.get("ports"))
        if srck is None or dstk is None:
            raise self.fail(path, f"{where}: a rule needs 'src' and 'dst'")
        srcs, src_left = self.srcs(v[srck], (*path, srck), f"{where}.src")
        got = [
            self.dst(s, (*path, dstk, i), f"{where}.dst")
            for i, s in enumerate(self.strings(v[dstk], (*path, dstk), f"{where}.dst"))
        ]
        dsts = tuple(d for d in got if d is not None)
        self.check_self(srcs, (d.alias for d in dsts), (*path, srck))
        protos: tuple[int, ...] = ()
        if "proto" in f and v[f["proto"]] not in ("", None):
            proto = self.protocol(v[f["proto"]], (*path, f["proto"]), f"{where}.proto")
            if proto not in PORTED_PROTOCOLS and any(d.ports != (PortRange(0, 65535),) for d in dsts):
                raise self.fail(
                    (*path, f["proto"]), f"{where}: protocol {v[f['proto']]} has no ports: use port *"
                )
            protos = (proto,)
        if "srcposture" in f:
            self.warn(f"{where}: srcPosture is not enforced yet: the rule is left out")
            return []
        if (src_left and not srcs) or (len(dsts) != len(got) and not dsts):
            self.warn(f"{where}: every target on one side is not enforced yet: the rule is left out")
            return []
        return [Rule(srcs, dsts, protos, where)]

    def read_grant(self, v: Any, path: tuple[Any, ...], where: str) -> list[Rule]:
        f = self.fields(v, path, where, "grants")
        if "src" not in f or "dst" not in f:
            raise self.fail(path, f"{where}: a grant needs 'src' and 'dst'")
        srcs, src_left = self.srcs(v[f["src"]], (*path, f["src"]), f"{where}.src")
        dpath = (*path, f["dst"])
        got = [
            self.alias(s, (*dpath, i), side="dst", where=f"{where}.dst")
            for i, s in enumerate(self.strings(v[f["dst"]], dpath, f"{where}.dst"))
        ]
        dsts = tuple(d for d in got if d is not None)
        self.check_self(srcs, dsts, (*path, f["src"]), star=False)
        if "app" in f:
            self.warn(f"{where}: capability grant ignored (app)")
        has_app = bool(v[f["app"]]) if "app" in f else False
        if has_app:
            apath = (*path, f["app"])
            for cap in self.want(v[f["app"]], dict, apath, f"{where}.app"):
                domain, slash, rest = cap.partition("/")
                if not slash or not domain or not rest or ":" in domain:
                    raise self.key_fail(
                        apath, cap, f"{where}: capability name {cap!r} must have the form {{domain}}/{{path}}"
                    )
            if any(d.kind == "autogroup" and d.name == "autogroup:internet" for d in dsts):
                raise self.fail(apath, f"{where}: cannot use app grants with autogroup:internet")
        if "ip" not in f:
            if not has_app:
                raise self.fail(path, f"{where}: ip and app cannot both be empty")
            return []
        ipk = f["ip"]
        entries: list[tuple[tuple[int, ...], tuple[PortRange, ...]]] = []
        for i, e in enumerate(self.strings(v[ipk], (*path, ipk), f"{where}.ip")):
            epath = (*path, ipk, i)
            if e == "*":
                entries.append(((), (PortRange(0, 65535),)))
                continue
            proto_s, sep, ports_s = e.rpartition(":")
            if not sep:
                entries.append(((), self.ports(e, epath, f"{where}.ip")))
                continue
            proto = self.protocol(proto_s, epath, f"{where}.ip")
            ports = self.ports(ports_s, epath, f"{where}.ip")
            if proto not in PORTED_PROTOCOLS and ports != (PortRange(0, 65535),):
                raise self.fail(epath, f"{where}: protocol {proto_s} has no ports: use {proto_s}:*")
            entries.append(((proto,), ports))
        if not entries and not has_app:
            raise self.fail((*path, ipk), f"{where}: ip and app cannot both be empty")
        for t in self.strings(v[f["via"]], (*path, f["via"]), f"{where}.via") if "via" in f else ():
            if t not in self.tag_owners:
                raise self.fail((*path, f["via"]), f"{where}: via {t} is not defined in tagOwners")
        for k, what in (("via", "via"), ("srcposture", "srcPosture")):
            if k in f:
                self.warn(f"{where}: {what} is not enforced yet: the grant is left out")
                return []
        if (src_left and not srcs) or (len(dsts) != len(got) and not dsts):
            self.warn(f"{where}: every target on one side is not enforced yet: the grant is left out")
            return []
        by_proto: dict[tuple[int, ...], list[PortRange]] = {}  # one rule per protocol, as Tailscale writes
        for protos, ports in entries:
            by_proto.setdefault(protos, []).extend(ports)
        return [Rule(srcs, tuple(Dst(d, tuple(p)) for d in dsts), pr, where) for pr, p in by_proto.items()]

    def read_test(self, v: Any, path: tuple[Any, ...], where: str) -> PolicyTest | None:
        f = self.fields(v, path, where, "tests")
        if "src" not in f:
            raise self.fail(path, f"{where}: a test needs 'src'")
        src = self.want(v[f["src"]], str, (*path, f["src"]), f"{where}.src")
        a = self.alias(src, (*path, f["src"]), side="src", where=f"{where}.src")
        if a is None:
            self.warn(f"{where}: its src is not enforced yet: the test is left out")
            return None
        if a.kind == "*" or a.kind == "autogroup":
            raise self.fail(
                (*path, f["src"]), f"{where}: a test's src must be a user, group, tag, host or IP"
            )
        proto = None
        if "proto" in f and v[f["proto"]] not in ("", None):
            proto = self.protocol(v[f["proto"]], (*path, f["proto"]), f"{where}.proto")
            if proto not in PORTED_PROTOCOLS:
                raise self.fail((*path, f["proto"]), f"{where}: a test's proto must be tcp, udp or sctp")
        lists: dict[str, tuple[str, ...]] = {}
        for k in ("accept", "deny"):
            if k in f:
                items = self.strings(v[f[k]], (*path, f[k]), f"{where}.{k}")
                for i, d in enumerate(items):
                    dd = self.dst(d, (*path, f[k], i), f"{where}.{k}")
                    if dd is None:
                        self.warn(f"{where}.{k}: {d} is not enforced yet: the test is left out")
                        return None
                    if len(dd.ports) != 1 or dd.ports[0].first != dd.ports[0].last:
                        raise self.fail((*path, f[k], i), f"{where}.{k}: {d!r} must name one port")
                    if dd.alias.kind == "*" or dd.alias.kind == "autogroup":
                        raise self.fail(
                            (*path, f[k], i), f"{where}.{k}: {d!r} must name a user, tag, host or IP"
                        )
                    if (dd.alias.net is not None and dd.alias.net.num_addresses > 1) or "/" in d:
                        raise self.fail(
                            (*path, f[k], i), f"{where}.{k}: {d!r} must name a single host, not a prefix"
                        )
                lists[k] = tuple(items)
        if "srcpostureattrs" in f:
            self.warn(f"{where}: srcPostureAttrs is not enforced yet: the test is left out")
            return None
        if not lists.get("accept") and not lists.get("deny"):
            raise self.fail(path, f"{where}: a test needs 'accept' or 'deny'")
        return PolicyTest(
            src,
            proto,
            lists.get("accept", ()),
            lists.get("deny", ()),
            self.doc.position(path) or (None, None),
            where,
        )


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration(s: str) -> float | None:
    """Seconds in Go's ``time.ParseDuration`` form (``"12h"``, ``"1h30m"``, ``"-1m"``), None if malformed."""
    body = s.removeprefix("-").removeprefix("+")
    if not body:
        return None
    if body == "0":
        return 0.0
    total, at = 0.0, 0
    for m in _DURATION.finditer(body):
        if m.start() != at:
            return None
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        at = m.end()
    if at != len(body):
        return None
    return -total if s.startswith("-") else total


def _digits(s: str) -> bool:
    return bool(s) and s.isascii() and s.isdigit() and len(s) <= 6


def _network(s: str) -> Network | None:
    try:
        if "/" in s:
            return ipaddress.ip_network(s, strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(s))
    except ValueError:
        return None


def _typename(typ: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _jsontype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(v), "?"
    )


__all__ = [
    "PROTOCOLS",
    "Alias",
    "AutoApprovers",
    "Dst",
    "Policy",
    "PolicyError",
    "PolicyNode",
    "PolicyTest",
    "Rule",
    "tag_error",
    "user_matches",
]
