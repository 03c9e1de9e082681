"""The :class:`Store` facade: one object, one method per operation, each one serialized transaction over the
per-concern modules of :mod:`tailpy.control.store` (as headscale's ``hscontrol/db`` wraps its ``tx``
functions in ``HSDatabase`` methods)."""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import sqlalchemy as sa

from tailpy.control.store import (
    apikeys,
    authkeys,
    changes,
    console,
    database,
    nodes,
    pending,
    schema,
    settings,
    users,
)
from tailpy.control.store import policy as policy_repo
from tailpy.control.store import primaries as route_primaries
from tailpy.control.store.addresses import DEFAULT_QUARANTINE, AddressAllocator
from tailpy.control.store.apikeys import ApiKeyInfo
from tailpy.control.store.authkeys import AuthKey
from tailpy.control.store.nodes import DEFAULT_KEY_LIFETIME, TagCheck
from tailpy.control.store.pending import PendingNode
from tailpy.control.store.policy import PolicyRecord
from tailpy.control.store.settings import Settings
from tailpy.control.store.users import User
from tailpy.dns.config import DNSConfig
from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError
from tailpy.keys import DiscoPublic, MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import Node


def now() -> float:
    """The wall clock, unix seconds (the default clock of the server and admin commands)."""
    return time.time()


def _now(t: float | None) -> float:
    return time.time() if t is None else t


class Store:
    """Synchronous access to the control database. Methods take ``now`` (unix seconds) where time matters.

    ``db``: None for SQLite in ``state_dir``, or a URL (:func:`database_url`); ``state_dir`` holds the server
    key either way. Raises ConfigError when ``state_dir`` does not exist or (``create`` False) holds no
    database, or the database cannot be reached; ControlError when the database is newer than this code.
    Admin mistakes (unknown node, taken name) raise ConfigError with a sentence; AuthKeyError from
    :meth:`register` for a refused auth key.

    ``url`` is the SQLAlchemy URL, ``where`` how messages name the database (a path, or the URL without
    password), ``addresses`` the :class:`AddressAllocator` registrations use, ``engine`` the SQLAlchemy
    engine (for tests and diagnostics: the rest of tailpy uses the methods).
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        create: bool = True,
        db: str | None = None,
        address_quarantine: float = DEFAULT_QUARANTINE,
    ) -> None:
        self.state_dir = Path(state_dir)
        if not self.state_dir.is_dir():
            raise ConfigError(
                f"control state directory {self.state_dir} does not exist; pass the --state-dir that "
                "`tailpy control serve` uses"
            )
        url = database.database_url(db, self.state_dir)
        self.url = url
        self.where = (
            str(self.state_dir / database.DB_NAME) if db is None else sa.make_url(url).render_as_string()
        )
        if db is None and not create and not (self.state_dir / database.DB_NAME).exists():
            raise ConfigError(
                f"no control database in {self.state_dir}; run `tailpy control serve --state-dir "
                f"{self.state_dir}` once, or pass the right --state-dir"
            )
        sqlite_path = database.sqlite_path(url)
        if sqlite_path is not None:
            database.secure_sqlite_files(sqlite_path, create=create)
        self.addresses = AddressAllocator(address_quarantine)
        self.engine = database.create_engine(url)
        old_umask = os.umask(0o077)  # -wal and -shm (SQLite gives them the database file's mode anyway)
        try:
            self.migrate()
        except sa.exc.OperationalError as e:
            self.engine.dispose()
            raise database.open_error(e, self.where, sqlite_path) from None
        except BaseException:
            self.engine.dispose()  # a newer schema, say: no pooled connection may outlive the error
            raise
        finally:
            os.umask(old_umask)

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    # --- schema ---

    def migrate(self) -> int:
        """Run the migrations the database lacks; returns the resulting version (== len(MIGRATIONS))."""
        with self.engine.begin() as conn:
            v = schema.migrate(conn, self.where)
            changes.install(conn)  # the change feed and replica liveness (not a schema version)
            route_primaries.install(conn)  # the primary subnet routers (not a schema version)
            return v

    def schema_version(self) -> int:
        """The database's schema version."""
        with self.engine.begin() as conn:
            return schema.version(conn)

    # --- server key and settings ---

    def server_key(self) -> MachinePrivate:
        """The server's machine private key: from ``control.key`` (created, mode 0600, on first use) with
        SQLite; with PostgreSQL the database's (:func:`~tailpy.control.store.changes.shared_key`: every
        replica of the database answers with one key; the first replica's key file gives it)."""
        key = database.load_or_create_server_key(self.state_dir)
        if not self.url.startswith("postgresql"):
            return key
        with self.engine.begin() as conn:
            return MachinePrivate.from_text(changes.shared_key(conn, key.text()))

    def settings(self) -> Settings:
        """The stored tailnet settings (defaults where none is stored)."""
        with self.engine.begin() as conn:
            return settings.read(conn)

    def configure(
        self, *, domain: str | None = None, prefix_v4: str | None = None, prefix_v6: str | None = None
    ) -> Settings:
        """Store the settings given (the rest stay); returns all. Nodes keep the addresses they have.

        ``prefix_v4`` must lie within 100.64.0.0/10 and ``prefix_v6`` within fd7a:115c:a1e0::/48 (the ranges
        tailpy routes and MagicDNS assume). Raises ConfigError.
        """
        with self.engine.begin() as conn:
            return settings.configure(conn, domain=domain, prefix_v4=prefix_v4, prefix_v6=prefix_v6)

    def dns_config(self) -> DNSConfig:
        """The stored DNS configuration (defaults when none is stored or it cannot be read)."""
        with self.engine.begin() as conn:
            return settings.read_dns(conn)

    def set_dns_config(self, cfg: DNSConfig, *, domain: str | None = None) -> Settings:
        """Store ``cfg`` as the DNS configuration and, when given, the tailnet ``domain``, in one
        transaction; returns the settings. Raises ConfigError for a bad domain (nothing is stored then)."""
        with self.engine.begin() as conn:
            out = settings.configure(conn, domain=domain)
            settings.write_dns(conn, cfg)
            return out

    # --- users ---

    def create_user(self, name: str, now: float) -> User:
        """Create user ``name`` (1-64 of letters, digits, ``.``, ``_``, ``@``, ``+``, ``-``). Raises
        ConfigError for a bad or taken name."""
        with self.engine.begin() as conn:
            return users.create(conn, name, now)

    def list_users(self) -> list[User]:
        """Every user, by id."""
        with self.engine.begin() as conn:
            return users.list_all(conn)

    def delete_user(self, name: str) -> None:
        """Delete user ``name`` and its auth keys. Raises ConfigError when it is unknown or still owns nodes
        (delete those first)."""
        with self.engine.begin() as conn:
            users.delete(conn, name)

    def user_for_login(self, issuer: str, subject: str, email: str, display_name: str, now: float) -> int:
        """The id of the user of an identity provider's ``issuer`` and ``subject`` (OpenID Connect ``iss``
        and ``sub``), created on first login named after ``email`` (``alice@example.com``;
        ``alice@example.com-2`` when the name is another user's); its email and display name refreshed."""
        with self.engine.begin() as conn:
            return users.for_login(conn, issuer, subject, email, display_name, now)

    def user_emails(self) -> dict[str, str]:
        """Login name -> email of every user that has an email (OpenID Connect logins)."""
        with self.engine.begin() as conn:
            return users.emails(conn)

    # --- the tailnet policy ---

    def policy(self) -> PolicyRecord | None:
        """The running policy as stored (the newest of the history), or None: no policy set."""
        with self.engine.begin() as conn:
            return policy_repo.current(conn)

    def policy_id(self) -> int:
        """The id of the running policy (0: none): cheap, for noticing a change another process made."""
        with self.engine.begin() as conn:
            return policy_repo.current_id(conn)

    def add_policy(self, text: str, set_by: str, now: float) -> PolicyRecord:
        """Store ``text`` (already checked: :mod:`tailpy.control.acl`) as the running policy, set by
        ``set_by`` at ``now``; the previous ones stay in the history."""
        with self.engine.begin() as conn:
            return policy_repo.add(conn, text, set_by, now)

    def policy_record(self, policy_id: int) -> PolicyRecord | None:
        """Stored policy ``policy_id`` (from :meth:`policy_history`), or None."""
        with self.engine.begin() as conn:
            return policy_repo.get(conn, policy_id)

    def policy_history(self, limit: int = 20) -> list[PolicyRecord]:
        """The last ``limit`` policies set, newest first."""
        with self.engine.begin() as conn:
            return policy_repo.history(conn, limit)

    # --- auth keys ---

    def create_auth_key(
        self,
        *,
        reusable: bool,
        expires: float | None,
        now: float,
        user: str | None = None,
        tags: Iterable[str] = (),
        ephemeral: bool = False,
    ) -> AuthKey:
        """A new pre-auth key ``tskey-auth-<32 url-safe characters>``; ``expires`` unix seconds or None.

        Nodes it registers belong to ``user`` (which must exist), or carry ``tags`` and no user; with neither,
        to the user "default" (created when missing). ``ephemeral`` nodes are removed after they have been
        offline for the server's ``--ephemeral-timeout``. Raises ConfigError (unknown user, bad tag).
        """
        with self.engine.begin() as conn:
            return authkeys.create(
                conn, reusable=reusable, expires=expires, now=now, user=user, tags=tags, ephemeral=ephemeral
            )

    def list_auth_keys(self) -> list[AuthKey]:
        """Every auth key, by id (``key`` as its visible prefix and "…")."""
        with self.engine.begin() as conn:
            return authkeys.list_all(conn)

    def expire_auth_key(self, key_or_id: str, now: float) -> AuthKey:
        """Make a key (by id, or the full ``tskey-auth-…`` text) expire now. Raises ConfigError if unknown."""
        with self.engine.begin() as conn:
            return authkeys.expire(conn, key_or_id, now)

    # --- admin API keys (the format and public functions: tailpy.control.apikeys) ---

    def add_api_key(
        self,
        *,
        prefix: str,
        secret: str,
        description: str,
        created_by: str,
        now: float,
        expires_at: float | None,
    ) -> ApiKeyInfo | None:
        """Store an admin API key (its secret hashed); None when ``prefix`` is taken."""
        with self.engine.begin() as conn:
            return apikeys.create(
                conn,
                prefix=prefix,
                secret=secret,
                description=description,
                created_by=created_by,
                now=now,
                expires_at=expires_at,
            )

    def check_api_key(self, prefix: str, secret: str, now: float) -> ApiKeyInfo | None:
        """The unexpired key of ``prefix`` and ``secret``, or None (its ``last_used`` refreshed at most once a
        minute)."""
        with self.engine.begin() as conn:
            return apikeys.check(conn, prefix, secret, now)

    def list_api_keys(self) -> list[ApiKeyInfo]:
        """Every admin API key, by id."""
        with self.engine.begin() as conn:
            return apikeys.list_all(conn)

    def expire_api_key(self, ref: str | int, now: float) -> ApiKeyInfo:
        """Make admin API key ``ref`` (id or prefix) expire now. Raises ConfigError when unknown."""
        with self.engine.begin() as conn:
            return apikeys.expire(conn, ref, now)

    # --- web console one-time tokens ---

    def revoke_console_token(self, token: str, expires: float, now: float) -> bool:
        """Revoke console token ``token`` (``session:<id>``, ``form:<token>``) until ``expires`` (unix
        seconds), pruning those expired at ``now``; False when it was already revoked."""
        with self.engine.begin() as conn:
            return console.revoke(conn, token, expires, now)

    def release_console_token(self, token: str) -> None:
        """Give back console token ``token`` revoked by :meth:`revoke_console_token` for an action that was
        refused (nothing done): it may be sent again."""
        with self.engine.begin() as conn:
            console.release(conn, token)

    def console_token_revoked(self, token: str, now: float) -> bool:
        """Whether console token ``token`` is revoked at ``now``."""
        with self.engine.begin() as conn:
            return console.is_revoked(conn, token, now)

    # --- registration ---

    def register(
        self,
        machine_key: MachinePublic,
        node_key: NodePublic,
        hostname: str,
        auth_key: str | None,
        now: float,
        *,
        os_name: str = "",
        key_lifetime: float | None = DEFAULT_KEY_LIFETIME,
        request_tags: Sequence[str] = (),
        tag_check: TagCheck | None = None,
        ephemeral: bool = False,
        routable_ips: Sequence[str] | None = None,
    ) -> Node:
        """Register ``machine_key`` (or re-register it) and return its node (``online`` False).

        A live machine whose node key is unchanged, not expired and not logged out needs no auth key (any
        given is not used: a restart). Otherwise (new machine, new node key, expired or logged-out key,
        deleted node) it needs a valid auth key, which only a successful registration uses up when
        single-use; the machine keeps its one record (id, addresses, and its name unless it was deleted),
        takes owner, tags and ephemerality from the key, and its key expiry is set ``key_lifetime`` seconds
        ahead (None: never; also never when disabled for the node or the node is tagged). ``os_name`` is
        stored ("linux"). Raises AuthKeyError, ControlError (node key of another machine, address pool
        exhausted).

        ``request_tags`` (``tailpy up --advertise-tags``; empty: keep the node's tags) are decided by
        ``tag_check`` (:data:`~tailpy.control.store.nodes.TagCheck`) for the auth key's creator (its user,
        else the admin) or, with no auth key, the node's owner; granted, they replace the node's tags (whose
        key then never expires, as for a tagged key). Raises TagError (nothing registered) when refused.
        ``ephemeral``: the node asked to be ephemeral (tsnet's ``Server.Ephemeral``): it is, whatever the key.
        ``routable_ips``: the routes the node advertises (canonical CIDR text, checked by the caller; None:
        keep the stored ones).
        """
        with self.engine.begin() as conn:
            return nodes.register(
                conn,
                self.addresses,
                machine_key,
                node_key,
                hostname,
                auth_key,
                now,
                os_name=os_name,
                key_lifetime=key_lifetime,
                request_tags=request_tags,
                tag_check=tag_check,
                ephemeral=ephemeral,
                routable_ips=routable_ips,
            )

    def register_for_user(
        self,
        machine_key: MachinePublic,
        node_key: NodePublic,
        hostname: str,
        os_name: str,
        user_id: int,
        now: float,
        key_expiry: float | None,
        *,
        expiry_fixed: bool = False,
    ) -> Node:
        """Register (or re-register) ``machine_key`` with ``node_key`` for user ``user_id`` after a login (no
        auth key: the login was the proof): the same one record per machine as :meth:`register` (id,
        addresses, name kept), owned by the user, no tags, key expiring at ``key_expiry`` (unix seconds;
        None: never, and never when disabled for the node). ``expiry_fixed``: the expiry came from the ID
        token, and node key rotation keeps it. The machine's approval entry, if any, goes. Raises
        ControlError when the node key belongs to another machine or the address pool is exhausted."""
        with self.engine.begin() as conn:
            node = nodes.register_for_user(
                conn,
                self.addresses,
                machine_key,
                node_key,
                hostname,
                os_name,
                user_id,
                now,
                key_expiry,
                expiry_fixed,
            )
            pending.forget_machine(conn, machine_key)
            return node

    # --- machines waiting for approval ---

    def add_pending(
        self,
        machine_key: MachinePublic,
        node_key: NodePublic,
        hostname: str,
        os_name: str,
        user_id: int,
        now: float,
        key_expiry: float | None,
        *,
        expiry_fixed: bool = False,
    ) -> PendingNode:
        """Park ``machine_key`` (signed in as ``user_id``) until an admin approves it; a later login of the
        same machine replaces its entry. Returns it."""
        with self.engine.begin() as conn:
            return pending.add(
                conn, machine_key, node_key, hostname, os_name, user_id, now, key_expiry, expiry_fixed
            )

    def list_pending(self) -> list[PendingNode]:
        """Machines waiting for approval, oldest first."""
        with self.engine.begin() as conn:
            return pending.list_all(conn)

    def pending_for(self, machine_key: MachinePublic) -> PendingNode | None:
        """The approval entry of ``machine_key``, or None."""
        with self.engine.begin() as conn:
            return pending.by_machine_key(conn, machine_key)

    def approve_pending(self, pending_id: int, now: float) -> Node:
        """Register pending machine ``pending_id`` for the user it signed in as (:meth:`register_for_user`).
        Raises ConfigError when there is no such entry, ControlError as :meth:`register_for_user`."""
        with self.engine.begin() as conn:
            p, user_id, expiry_fixed = pending.get(conn, pending_id)
            node = nodes.register_for_user(
                conn,
                self.addresses,
                p.machine_key,
                p.node_key,
                p.hostname,
                p.os,
                user_id,
                now,
                p.key_expiry,
                expiry_fixed,
            )
            pending.forget_machine(conn, p.machine_key)
            return node

    def reject_pending(self, pending_id: int) -> PendingNode:
        """Forget pending machine ``pending_id`` (it may sign in again). Raises ConfigError when unknown."""
        with self.engine.begin() as conn:
            p, _, _ = pending.get(conn, pending_id)
            pending.delete(conn, pending_id)
            return p

    # --- nodes ---

    def rotate_node_key(
        self,
        machine_key: MachinePublic,
        old_node_key: NodePublic,
        new_node_key: NodePublic,
        now: float,
        *,
        key_lifetime: float | None = DEFAULT_KEY_LIFETIME,
    ) -> Node:
        """Replace the live node's current key ``old_node_key`` by ``new_node_key`` (the caller has checked
        the rotation proof) and set a new expiry (kept as it is when it came from a login's ID token:
        ``key_expiry_fixed``); id, addresses and name stay. Raises ControlError when
        ``old_node_key`` is not the machine's current key or the node is logged out, or the new key belongs
        to another machine."""
        with self.engine.begin() as conn:
            return nodes.rotate_key(conn, machine_key, old_node_key, new_node_key, now, key_lifetime)

    def logout(self, machine_key: MachinePublic, now: float) -> Node | None:
        """Log ``machine_key``'s live node out: its key counts as expired from ``now`` and a new
        registration needs an auth key; the record stays (the caller deletes an ephemeral node: see
        :meth:`delete_node`). None if there is no live node."""
        with self.engine.begin() as conn:
            return nodes.logout(conn, machine_key, now)

    def is_ephemeral(self, node_id: int) -> bool:
        """True when live node ``node_id`` is ephemeral: deleted at logout or after its offline timeout."""
        with self.engine.begin() as conn:
            return nodes.is_ephemeral(conn, node_id)

    def node(self, node_id: int, now: float | None = None) -> Node | None:
        """Live node ``node_id`` (``expired`` as of ``now``, default the wall clock), or None."""
        with self.engine.begin() as conn:
            return nodes.by_id(conn, node_id, _now(now))

    def get_node(self, node_id: int, now: float | None = None) -> Node:
        """Live node ``node_id``. Raises ConfigError when there is none (for admin commands)."""
        node = self.node(node_id, now)
        if node is None:
            raise ConfigError(f"there is no node {node_id}; see `tailpy control nodes list`")
        return node

    def node_by_machine_key(self, machine_key: MachinePublic, now: float | None = None) -> Node | None:
        """The live (not deleted) node of ``machine_key``, or None (``now`` decides ``expired``)."""
        with self.engine.begin() as conn:
            return nodes.by_machine_key(conn, machine_key, _now(now))

    def update_node(
        self,
        machine_key: MachinePublic,
        *,
        now: float,
        endpoints: Sequence[Endpoint] | None = None,
        hostname: str | None = None,
        home_derp: int | None = None,
        disco_key: DiscoPublic | None = None,
        routable_ips: Sequence[str] | None = None,
    ) -> Node | None:
        """Set the endpoints, hostname, home DERP region id (0: none), disco public key and/or advertised
        routes (``routable_ips``, canonical CIDR text, checked by the caller) of ``machine_key``'s live node
        and its last_seen; None if there is no such node. (The node's name stays: only an admin rename
        changes it.)"""
        with self.engine.begin() as conn:
            return nodes.update(
                conn,
                machine_key,
                now=now,
                endpoints=endpoints,
                hostname=hostname,
                home_derp=home_derp,
                disco_key=disco_key,
                routable_ips=routable_ips,
            )

    def update_nodes(self, reports: Sequence[nodes.NodeReport]) -> list[Node | None]:
        """:meth:`update_node` for each of ``reports`` in one transaction (one commit: what many map streams
        opening at once report); the nodes as committed, in order (None: no live node of that machine
        key)."""
        with self.engine.begin() as conn:
            return nodes.update_many(conn, reports)

    def approve_routes(self, node_id: int, routes: Iterable[str], now: float | None = None) -> Node:
        """Add ``routes`` (canonical CIDR text) to live node ``node_id``'s approved routes (an approval of a
        route the node does not advertise is kept for when it does); returns the node. Raises ConfigError
        when there is no such node."""
        with self.engine.begin() as conn:
            node = nodes.by_id(conn, node_id, _now(now))
            if node is None:
                nodes.live(conn, node_id)  # raises
                raise AssertionError
            return nodes.set_approved_routes(conn, node_id, [*node.approved_routes, *routes], _now(now))

    def unapprove_routes(self, node_id: int, routes: Iterable[str], now: float | None = None) -> Node:
        """Remove ``routes`` from live node ``node_id``'s approved routes; returns the node. Raises
        ConfigError when there is no such node."""
        gone = set(routes)
        with self.engine.begin() as conn:
            node = nodes.by_id(conn, node_id, _now(now))
            if node is None:
                nodes.live(conn, node_id)  # raises
                raise AssertionError
            kept = [r for r in node.approved_routes if r not in gone]
            return nodes.set_approved_routes(conn, node_id, kept, _now(now))

    def list_nodes(self, now: float | None = None) -> list[Node]:
        """All live nodes, by id (``online`` False: the server knows who is online; ``expired`` as of
        ``now``, default the wall clock)."""
        with self.engine.begin() as conn:
            return nodes.list_live(conn, _now(now))

    def find_node(self, ref: str | int) -> int:
        """The id of the live node ``ref`` names: an id, a name or an FQDN. Raises ConfigError."""
        with self.engine.begin() as conn:
            return nodes.find(conn, ref, settings.read(conn).domain)

    def delete_node(self, node_id: int, now: float) -> bool:
        """Remove node ``node_id`` from the tailnet: its row stays for its machine key (which may rejoin with
        an auth key), its name is freed, and its addresses return to the pool after the address quarantine
        (``address_quarantine`` seconds from ``now``). True if it was live."""
        with self.engine.begin() as conn:
            return nodes.delete(conn, node_id, now)

    def rename_node(self, node_id: int, name: str) -> Node:
        """Give live node ``node_id`` the name ``name`` (a valid DNS label). Raises ConfigError when the node
        does not exist or the name is taken ("name pi is taken by node 3")."""
        with self.engine.begin() as conn:
            return nodes.rename(conn, node_id, name, _now(None))

    def expire_node(self, node_id: int, now: float) -> Node:
        """Expire node ``node_id``'s key now (it must log in again with an auth key). Raises ConfigError."""
        with self.engine.begin() as conn:
            return nodes.expire(conn, node_id, now)

    def set_node_tags(self, node_id: int, tags: Sequence[str], now: float) -> Node:
        """Give live node ``node_id`` exactly ``tags`` (an admin's choice: validated as ``tag:<name>``, at
        least one, no ``tagOwners`` check). Its owner, if any, is kept (a tagged node shows no user); its key
        no longer expires, as for a node of a tagged auth key. Raises ConfigError."""
        with self.engine.begin() as conn:
            return nodes.set_tags(conn, node_id, tags, now)

    def set_key_expiry(
        self, node_id: int, *, disabled: bool, now: float, key_lifetime: float = DEFAULT_KEY_LIFETIME
    ) -> Node:
        """Disable key expiry for node ``node_id`` (its key then never expires; an expired key becomes valid
        again), or enable it (expiring ``key_lifetime`` seconds from ``now``). Raises ConfigError."""
        with self.engine.begin() as conn:
            return nodes.set_key_expiry(conn, node_id, disabled=disabled, now=now, key_lifetime=key_lifetime)

    # --- lifecycle (timers) ---

    def ephemeral_gc(
        self, now: float, timeout: float, online: Collection[int], not_before: float = 0.0
    ) -> list[int]:
        """Delete every live ephemeral node not in ``online`` last seen ``timeout`` seconds or more before
        ``now``; returns their ids. Offline time counts from ``not_before`` at the earliest (the server's
        start: a node connected when the server stopped has a stale ``last_seen``)."""
        with self.engine.begin() as conn:
            rows = nodes.ephemeral(conn)
        gone = [i for i, at in nodes.offline_deadlines(rows, timeout, online, not_before) if at <= now]
        for node_id in gone:
            self.delete_node(node_id, now)
        return gone

    def next_deadline(
        self, now: float, ephemeral_timeout: float, online: Collection[int], not_before: float = 0.0
    ) -> float | None:
        """The earliest moment after ``now`` when something changes by itself: a live node's key expires, or
        an offline ephemeral node's timeout ends (unix seconds; None: nothing pending)."""
        with self.engine.begin() as conn:
            expiry = nodes.next_key_expiry(conn, now)
        with self.engine.begin() as conn:
            rows = nodes.ephemeral(conn)
        times = [expiry] if expiry is not None else []
        times += [at for _, at in nodes.offline_deadlines(rows, ephemeral_timeout, online, not_before)]
        return min(times) if times else None

    def expired_between(self, since: float, now: float) -> list[int]:
        """Ids of live nodes whose key expired in (``since``, ``now``]."""
        with self.engine.begin() as conn:
            return nodes.expired_between(conn, since, now)


__all__ = ["Store", "now"]
