"""Nodes: one record per machine key, written by registration (auth key or login), read into
:class:`tailpy.netmap.Node`.

A node keeps its record (id) for the life of its machine key, even when deleted; a deleted node gives up its
name at once (see :mod:`tailpy.control.names`) and its addresses after a quarantine, when the pool needs them
(see :mod:`tailpy.control.store.addresses`). Users own
nodes; a node registered with a tagged auth key carries the tags and no user. Node keys expire
``key_lifetime`` seconds after (re-)registration unless expiry is disabled for the node (and, as in
Tailscale, by default for tagged nodes); a logged-out node counts as expired.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tailpy.control import names
from tailpy.control.store import authkeys
from tailpy.control.store import settings as settings_repo
from tailpy.control.store.addresses import BATCH, RELEASED, AddressAllocator
from tailpy.control.store.schema import nodes, users
from tailpy.control.tags import ADMIN, Requester
from tailpy.endpoint import Endpoint, parse_valid
from tailpy.errors import ConfigError, ControlError
from tailpy.keys import DiscoPublic, MachinePublic, NodePublic
from tailpy.netmap import Node

DEFAULT_KEY_LIFETIME = 180 * 86400.0
"""Seconds a node key is valid after (re-)registration (180 days, as Tailscale)."""

TagCheck = Callable[[Sequence[str], Sequence[Requester], Sequence[str]], tuple[str, ...]]
"""Decides a registration's requested tags: (requested, requesters, tags held already) -> the tags granted
(sorted), or raises TagError (see :func:`tailpy.control.tags.check_tags`)."""


def requester(conn: Connection, user_id: int | None) -> Requester:
    """The :class:`Requester` of user ``user_id`` (name and email), or the admin for None (an auth key
    made without a user was made by the admin)."""
    if user_id is None:
        return ADMIN
    r = conn.execute(sa.select(users.c.name, users.c.email).where(users.c.id == user_id)).first()
    return ADMIN if r is None else Requester(str(r.name), str(r.email or ""))


def to_node(row: Any, now: float) -> Node:
    """The :class:`Node` of a row of :func:`query` (``online`` False; ``expired`` as of ``now``)."""
    v4, v6 = row.ipv4, row.ipv6
    tags = tuple(json.loads(row.tags or "[]"))
    return Node(
        id=int(row.id),
        name=row.name,
        hostname=row.hostname,
        node_key=NodePublic.from_text(row.node_key),
        machine_key=MachinePublic.from_text(row.machine_key),
        addresses=(f"{v4}/32", f"{v6}/128"),
        endpoints=parse_valid(json.loads(row.endpoints)),
        online=False,
        last_seen=row.last_seen,
        user="" if tags else (row.user_name or ""),
        tags=tags,
        os=row.os or "",
        key_expiry=row.key_expiry,
        expired=bool(row.logged_out) or (row.key_expiry is not None and row.key_expiry <= now),
        home_derp=int(row.home_derp or 0),
        disco_key=DiscoPublic.from_text(row.disco_key) if row.disco_key else None,
        name_by_admin=bool(row.name_by_admin),
        routable_ips=tuple(json.loads(row.routable_ips or "[]")),
        approved_routes=tuple(json.loads(row.approved_routes or "[]")),
    )


def query() -> sa.Select[Any]:
    """Nodes with their owner's name (``user_name``)."""
    return sa.select(nodes, users.c.name.label("user_name")).select_from(
        nodes.outerjoin(users, nodes.c.user_id == users.c.id)
    )


def read(conn: Connection, node_id: int, now: float) -> Node:
    """Node ``node_id`` (live or deleted), which must exist."""
    return to_node(conn.execute(query().where(nodes.c.id == node_id)).one(), now)


def live(conn: Connection, node_id: int) -> Any:
    """The row of live node ``node_id``. Raises ConfigError when there is none."""
    row = conn.execute(sa.select(nodes).where(nodes.c.id == node_id, nodes.c.deleted.is_(None))).first()
    if row is None:
        raise ConfigError(f"there is no node {node_id}; see `tailpy control nodes list`")
    return row


def find(conn: Connection, ref: str | int, domain: str) -> int:
    """The id of the live node ``ref`` names: its id (a number), its name, or its FQDN (``<name>.<domain>``,
    a trailing dot allowed). Raises ConfigError when no live node matches."""
    if isinstance(ref, int) or ref.strip().isdigit():
        node_id = int(ref)
        live(conn, node_id)
        return node_id
    name = ref.strip().lower().rstrip(".")
    if name.endswith("." + domain):
        name = name[: -len(domain) - 1]
    row = conn.execute(sa.select(nodes.c.id).where(nodes.c.name == name, nodes.c.deleted.is_(None))).first()
    if row is None:
        raise ConfigError(f"there is no node named {ref!r}; see `tailpy control nodes list`")
    return int(row.id)


def machine_row(conn: Connection, machine_key: MachinePublic) -> Any:
    """The one record of ``machine_key`` (live or deleted), or None."""
    return conn.execute(sa.select(nodes).where(nodes.c.machine_key == machine_key.text())).first()


def check_node_key_free(conn: Connection, machine_key: MachinePublic, node_key: NodePublic) -> None:
    """Raise ControlError when ``node_key`` is another machine's."""
    clash = conn.execute(
        sa.select(nodes.c.id).where(
            nodes.c.node_key == node_key.text(), nodes.c.machine_key != machine_key.text()
        )
    ).first()
    if clash is not None:
        raise ControlError(f"node key {node_key.short()} belongs to another machine; generate a new node key")


def unique_name(conn: Connection, base: str, mine: int | None = None) -> str:
    """``base``, else the first of ``base-1``, ``base-2``, ... no node (other than node ``mine``) has and
    not reserved (:data:`tailpy.control.names.RESERVED`): indexed lookups of the candidates, :data:`BATCH`
    at a time (O(log nodes) per batch; one batch unless the name is common)."""
    n = 0
    while True:
        batch = [base if i == 0 else names.with_suffix(base, i) for i in range(n, n + BATCH)]
        rows = conn.execute(sa.select(nodes.c.id, nodes.c.name).where(nodes.c.name.in_(batch)))
        taken = {r.name for r in rows if r.id != mine} | names.RESERVED
        free = next((c for c in batch if c not in taken), None)
        if free is not None:
            return free
        n += BATCH


def follow_hostname(conn: Connection, row: Any, hostname: str) -> dict[str, Any]:
    """The name change a live node's registration with ``hostname`` makes: when the hostname differs from
    the stored one (as DNS labels) and no admin named the node, ``{"name": <the new hostname's label, made
    unique>}``; else ``{}`` (the name stays)."""
    if row.name_by_admin or names.sanitize(hostname) == names.sanitize(row.hostname):
        return {}
    return {"name": unique_name(conn, names.sanitize(hostname), mine=int(row.id))}


def write(
    conn: Connection,
    addresses: AddressAllocator,
    row: Any,
    machine_key: MachinePublic,
    hostname: str,
    values: dict[str, Any],
    now: float,
) -> int:
    """Write a registration's column ``values`` into the machine's one node record ``row`` (None: make it,
    with addresses and a name); a deleted record comes back under a fresh unique name. Returns its id.
    Raises ControlError when an address pool is exhausted."""
    if row is None:
        cfg = settings_repo.read(conn)
        res = conn.execute(
            nodes.insert().values(
                machine_key=machine_key.text(),
                name=unique_name(conn, names.sanitize(hostname)),
                ipv4=str(addresses.allocate(conn, cfg.prefix_v4, nodes.c.ipv4, now)),
                ipv6=str(addresses.allocate(conn, cfg.prefix_v6, nodes.c.ipv6, now)),
                endpoints="[]",
                created=now,
                **values,
            )
        )
        pk = res.inserted_primary_key
        assert pk is not None
        return int(pk[0])
    if row.deleted is not None:
        values = {
            **values,
            "deleted": None,
            "name": unique_name(conn, names.sanitize(hostname)),
            "name_by_admin": False,
        }
        cfg = settings_repo.read(conn)
        # its old addresses, unless they went back to the pool (then new ones)
        if str(row.ipv4).startswith(RELEASED):
            values["ipv4"] = str(addresses.allocate(conn, cfg.prefix_v4, nodes.c.ipv4, now))
        if str(row.ipv6).startswith(RELEASED):
            values["ipv6"] = str(addresses.allocate(conn, cfg.prefix_v6, nodes.c.ipv6, now))
    else:
        values = {**values, **follow_hostname(conn, row, hostname)}
    conn.execute(nodes.update().where(nodes.c.id == row.id).values(**values))
    return int(row.id)


def register(
    conn: Connection,
    addresses: AddressAllocator,
    machine_key: MachinePublic,
    node_key: NodePublic,
    hostname: str,
    auth_key: str | None,
    now: float,
    *,
    os_name: str,
    key_lifetime: float | None,
    request_tags: Sequence[str] = (),
    tag_check: TagCheck | None = None,
    ephemeral: bool = False,
    routable_ips: Sequence[str] | None = None,
) -> Node:
    """Registration with an auth key (see :meth:`Store.register`)."""
    row = machine_row(conn, machine_key)
    if (
        row is not None
        and row.deleted is None
        and row.node_key == node_key.text()
        and not row.logged_out
        and not (row.key_expiry is not None and row.key_expiry <= now)
    ):
        values: dict[str, Any] = {"hostname": hostname, "last_seen": now}
        if routable_ips is not None:
            values["routable_ips"] = json.dumps(list(routable_ips))
        if ephemeral:
            values["ephemeral"] = True
        if os_name:
            values["os"] = os_name
        values.update(follow_hostname(conn, row, hostname))
        held = tuple(json.loads(row.tags or "[]"))
        if request_tags and tag_check is not None:
            owners = [requester(conn, row.user_id)] if row.user_id is not None else []
            granted = tag_check(request_tags, owners, held)
            if granted != held:
                values.update(tags=json.dumps(list(granted)), key_expiry=None, key_expiry_fixed=False)
        conn.execute(nodes.update().where(nodes.c.id == row.id).values(**values))
        return read(conn, int(row.id), now)
    check_node_key_free(conn, machine_key, node_key)
    why = "this machine is not registered"  # (new machine, deleted node, or a new node key)
    if row is not None and row.deleted is None and row.node_key == node_key.text():
        why = "this machine logged out" if row.logged_out else "this machine's node key expired"
    key = authkeys.take(conn, auth_key, now, why)
    tags = tuple(json.loads(key.tags or "[]"))
    if request_tags and tag_check is not None:
        # the key's creator (its user; the admin for a key with no user) is also the node's owner
        tags = tag_check(request_tags, [requester(conn, key.user_id)], tags)
    disabled = bool(row.expiry_disabled) if row is not None else False
    expiry = None if key_lifetime is None or disabled or tags else now + key_lifetime
    values = {
        "node_key": node_key.text(),
        "hostname": hostname,
        "last_seen": now,
        "user_id": key.user_id,
        "tags": json.dumps(list(tags)),
        "ephemeral": bool(key.ephemeral) or ephemeral,
        "key_expiry": expiry,
        "key_expiry_fixed": False,
        "logged_out": False,
    }
    if routable_ips is not None:
        values["routable_ips"] = json.dumps(list(routable_ips))
    if os_name:
        values["os"] = os_name
    node_id = write(conn, addresses, row, machine_key, hostname, values, now)
    authkeys.mark_used(conn, int(key.id), now)
    return read(conn, node_id, now)


def register_for_user(
    conn: Connection,
    addresses: AddressAllocator,
    machine_key: MachinePublic,
    node_key: NodePublic,
    hostname: str,
    os_name: str,
    user_id: int,
    now: float,
    key_expiry: float | None,
    expiry_fixed: bool,
) -> Node:
    """Registration after a login (see :meth:`Store.register_for_user`)."""
    row = machine_row(conn, machine_key)
    check_node_key_free(conn, machine_key, node_key)
    disabled = bool(row.expiry_disabled) if row is not None else False
    values: dict[str, Any] = {
        "node_key": node_key.text(),
        "hostname": hostname,
        "last_seen": now,
        "user_id": user_id,
        "tags": "[]",
        "ephemeral": False,
        "key_expiry": None if disabled else key_expiry,
        "key_expiry_fixed": expiry_fixed and key_expiry is not None,
        "logged_out": False,
    }
    if os_name:
        values["os"] = os_name
    return read(conn, write(conn, addresses, row, machine_key, hostname, values, now), now)


def rotate_key(
    conn: Connection,
    machine_key: MachinePublic,
    old_node_key: NodePublic,
    new_node_key: NodePublic,
    now: float,
    key_lifetime: float | None,
) -> Node:
    """Node key rotation (see :meth:`Store.rotate_node_key`)."""
    row = conn.execute(
        sa.select(nodes).where(nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))
    ).first()
    if row is None or row.node_key != old_node_key.text() or row.logged_out:
        raise ControlError(
            f"node key {old_node_key.short()} is not this machine's current key; log in again "
            "(`tailpy login`, or `tailpy up --auth-key KEY`)"
        )
    clash = conn.execute(
        sa.select(nodes.c.id).where(nodes.c.node_key == new_node_key.text(), nodes.c.id != row.id)
    ).first()
    if clash is not None:
        raise ControlError(f"node key {new_node_key.short()} belongs to another machine")
    tagged = bool(json.loads(row.tags or "[]"))
    expiry = None if key_lifetime is None or row.expiry_disabled or tagged else now + key_lifetime
    if row.key_expiry_fixed and not row.expiry_disabled:
        expiry = row.key_expiry  # set by the identity provider's token: never extended by rotation
    conn.execute(
        nodes.update()
        .where(nodes.c.id == row.id)
        .values(node_key=new_node_key.text(), key_expiry=expiry, last_seen=now)
    )
    return read(conn, int(row.id), now)


def _live_of(machine_key: MachinePublic) -> tuple[Any, ...]:
    return (nodes.c.machine_key == machine_key.text(), nodes.c.deleted.is_(None))


def logout(conn: Connection, machine_key: MachinePublic, now: float) -> Node | None:
    """Log ``machine_key``'s live node out (see :meth:`Store.logout`)."""
    row = conn.execute(sa.select(nodes.c.id).where(*_live_of(machine_key))).first()
    if row is None:
        return None
    conn.execute(
        nodes.update().where(*_live_of(machine_key)).values(logged_out=True, key_expiry=now, last_seen=now)
    )
    return read(conn, int(row.id), now)


def is_ephemeral(conn: Connection, node_id: int) -> bool:
    """True when live node ``node_id`` is ephemeral (its auth key was, or it asked to be)."""
    row = conn.execute(
        sa.select(nodes.c.ephemeral).where(nodes.c.id == node_id, nodes.c.deleted.is_(None))
    ).first()
    return row is not None and bool(row.ephemeral)


def by_id(conn: Connection, node_id: int, now: float) -> Node | None:
    """Live node ``node_id``, or None."""
    row = conn.execute(query().where(nodes.c.id == node_id, nodes.c.deleted.is_(None))).first()
    return None if row is None else to_node(row, now)


def by_machine_key(conn: Connection, machine_key: MachinePublic, now: float) -> Node | None:
    """The live node of ``machine_key``, or None."""
    row = conn.execute(query().where(*_live_of(machine_key))).first()
    return None if row is None else to_node(row, now)


@dataclass(frozen=True)
class NodeReport:
    """What a map request reports of ``machine_key``'s node (the arguments of :meth:`Store.update_node`):
    None leaves a field as it is; ``now`` (unix seconds) becomes its last seen."""

    machine_key: MachinePublic
    now: float
    endpoints: Sequence[Endpoint] | None = None
    hostname: str | None = None
    home_derp: int | None = None
    disco_key: DiscoPublic | None = None
    routable_ips: Sequence[str] | None = None


def update(
    conn: Connection,
    machine_key: MachinePublic,
    *,
    now: float,
    endpoints: Sequence[Endpoint] | None,
    hostname: str | None,
    home_derp: int | None,
    disco_key: DiscoPublic | None,
    routable_ips: Sequence[str] | None = None,
) -> Node | None:
    """A map request's report (see :meth:`Store.update_node`)."""
    values = _report_values(now, endpoints, hostname, home_derp, disco_key, routable_ips)
    conn.execute(nodes.update().where(*_live_of(machine_key)).values(**values))
    return by_machine_key(conn, machine_key, now)


def update_many(conn: Connection, reports: Sequence[NodeReport]) -> list[Node | None]:
    """:func:`update` for each of ``reports``, in a few statements: one executemany per set of fields
    reported (the driver sends its rows in one round trip where it can: psycopg's pipeline), then the nodes
    read back by machine key in chunks. The nodes in order (None: no live node of that machine key; a
    machine key reported twice gets its last report)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in reports:
        values = _report_values(r.now, r.endpoints, r.hostname, r.home_derp, r.disco_key, r.routable_ips)
        values["b_machine_key"] = r.machine_key.text()
        groups.setdefault(tuple(sorted(values)), []).append(values)
    for keys, rows in groups.items():
        stmt = (
            nodes.update()
            .where(nodes.c.machine_key == sa.bindparam("b_machine_key"), nodes.c.deleted.is_(None))
            .values({k: sa.bindparam(k) for k in keys if k != "b_machine_key"})
        )
        conn.execute(stmt, rows)
    texts = sorted({r.machine_key.text() for r in reports})
    found: dict[str, Any] = {}
    for i in range(0, len(texts), 500):
        q = query().where(nodes.c.machine_key.in_(texts[i : i + 500]), nodes.c.deleted.is_(None))
        found.update((row.machine_key, row) for row in conn.execute(q))
    out: list[Node | None] = []
    for r in reports:
        row = found.get(r.machine_key.text())
        out.append(None if row is None else to_node(row, r.now))
    return out


def _report_values(
    now: float,
    endpoints: Sequence[Endpoint] | None,
    hostname: str | None,
    home_derp: int | None,
    disco_key: DiscoPublic | None,
    routable_ips: Sequence[str] | None,
) -> dict[str, Any]:
    """The ``nodes`` columns a map request's report sets (``last_seen`` always)."""
    values: dict[str, Any] = {"last_seen": now}
    if routable_ips is not None:
        values["routable_ips"] = json.dumps(list(routable_ips))
    if disco_key is not None:
        values["disco_key"] = disco_key.text()
    if endpoints is not None:
        values["endpoints"] = json.dumps([str(e) for e in endpoints])
    if home_derp is not None:
        values["home_derp"] = home_derp
    if hostname is not None:
        values["hostname"] = hostname
    return values


def set_approved_routes(conn: Connection, node_id: int, routes: Sequence[str], now: float) -> Node:
    """Make ``routes`` (canonical CIDR text) live node ``node_id``'s approved routes, sorted (IPv4 first,
    then by address and length). Raises ConfigError when there is no such node."""
    live(conn, node_id)
    conn.execute(
        nodes.update().where(nodes.c.id == node_id).values(approved_routes=json.dumps(sort_routes(routes)))
    )
    return read(conn, node_id, now)


def sort_routes(routes: Iterable[str]) -> list[str]:
    """``routes`` (canonical CIDR text) without duplicates, IPv4 first, then by address and length."""

    def key(r: str) -> tuple[int, int, int]:
        net = ipaddress.ip_network(r)
        return (net.version, int(net.network_address), net.prefixlen)

    return sorted(set(routes), key=key)


def list_live(conn: Connection, now: float) -> list[Node]:
    """All live nodes, by id."""
    rows = conn.execute(query().where(nodes.c.deleted.is_(None)).order_by(nodes.c.id)).all()
    return [to_node(r, now) for r in rows]


def delete(conn: Connection, node_id: int, now: float) -> bool:
    """Mark node ``node_id`` deleted and free its name (see :meth:`Store.delete_node`); True if it was
    live."""
    res = conn.execute(
        nodes.update()
        .where(nodes.c.id == node_id, nodes.c.deleted.is_(None))
        .values(deleted=now, name=f"~deleted-{node_id}")  # not a DNS label: never collides
    )
    return bool(res.rowcount)


def rename(conn: Connection, node_id: int, name: str, now: float) -> Node:
    """Give live node ``node_id`` the name ``name`` (see :meth:`Store.rename_node`)."""
    names.check_label(name)
    live(conn, node_id)
    other = conn.execute(sa.select(nodes.c.id).where(nodes.c.name == name)).first()
    if other is not None and int(other.id) != node_id:
        raise ConfigError(f"name {name} is taken by node {other.id}")
    conn.execute(nodes.update().where(nodes.c.id == node_id).values(name=name, name_by_admin=True))
    return read(conn, node_id, now)


def expire(conn: Connection, node_id: int, now: float) -> Node:
    """Expire live node ``node_id``'s key now. Raises ConfigError."""
    live(conn, node_id)
    conn.execute(nodes.update().where(nodes.c.id == node_id).values(key_expiry=now, expiry_disabled=False))
    return read(conn, node_id, now)


def set_tags(conn: Connection, node_id: int, tags: Sequence[str], now: float) -> Node:
    """Give live node ``node_id`` exactly ``tags`` (validated ``tag:<name>``, at least one; see
    :meth:`Store.set_node_tags`). Raises ConfigError."""
    live(conn, node_id)
    wanted = authkeys.parse_tags(tags)
    if not wanted:
        raise ConfigError("give at least one tag, like tag:server (a tagged node cannot lose all its tags)")
    conn.execute(
        nodes.update()
        .where(nodes.c.id == node_id)
        .values(tags=json.dumps(list(wanted)), key_expiry=None, key_expiry_fixed=False)
    )
    return read(conn, node_id, now)


def set_key_expiry(
    conn: Connection, node_id: int, *, disabled: bool, now: float, key_lifetime: float
) -> Node:
    """Disable or enable key expiry for live node ``node_id`` (see :meth:`Store.set_key_expiry`)."""
    row = live(conn, node_id)
    if row.logged_out and disabled:
        raise ConfigError(f"node {node_id} is logged out; it must log in again first")
    conn.execute(
        nodes.update()
        .where(nodes.c.id == node_id)
        .values(expiry_disabled=disabled, key_expiry=None if disabled else now + key_lifetime)
    )
    return read(conn, node_id, now)


def ephemeral(conn: Connection) -> list[Any]:
    """(``id``, ``last_seen``) of every live ephemeral node."""
    return list(
        conn.execute(
            sa.select(nodes.c.id, nodes.c.last_seen).where(
                nodes.c.ephemeral.is_(True), nodes.c.deleted.is_(None)
            )
        ).all()
    )


def offline_deadlines(
    rows: Sequence[Any], timeout: float, online: Collection[int], not_before: float
) -> list[tuple[int, float]]:
    """(id, moment its ephemeral timeout ends) for each of the ephemeral ``rows`` not ``online``: offline
    time counts from ``last_seen``, and from ``not_before`` at the earliest."""
    return [(int(r.id), max(r.last_seen or 0.0, not_before) + timeout) for r in rows if r.id not in online]


def next_key_expiry(conn: Connection, now: float) -> float | None:
    """The earliest key expiry of a live node after ``now`` (None: none)."""
    expiry = conn.execute(
        sa.select(sa.func.min(nodes.c.key_expiry)).where(nodes.c.deleted.is_(None), nodes.c.key_expiry > now)
    ).scalar()
    return None if expiry is None else float(expiry)


def expired_between(conn: Connection, since: float, now: float) -> list[int]:
    """Ids of live nodes whose key expired in (``since``, ``now``]."""
    rows = conn.execute(
        sa.select(nodes.c.id).where(
            nodes.c.deleted.is_(None), nodes.c.key_expiry > since, nodes.c.key_expiry <= now
        )
    ).all()
    return [int(r.id) for r in rows]


__all__ = [
    "DEFAULT_KEY_LIFETIME",
    "by_id",
    "by_machine_key",
    "check_node_key_free",
    "delete",
    "ephemeral",
    "expire",
    "expired_between",
    "find",
    "follow_hostname",
    "list_live",
    "live",
    "logout",
    "machine_row",
    "next_key_expiry",
    "offline_deadlines",
    "query",
    "read",
    "register",
    "register_for_user",
    "rename",
    "rotate_key",
    "set_approved_routes",
    "set_key_expiry",
    "sort_routes",
    "to_node",
    "unique_name",
    "update",
    "write",
]
