"""Users from an identity provider and nodes registered by login (:mod:`tailpy.control.oidc`), over
:class:`Store`.

A login with OpenID Connect gives an :class:`Identity` (issuer and subject: who it is for good; email, name
and groups: what it says about itself now). :func:`user_for_identity` finds the tailpy user of that issuer
and subject, or creates one named after the email (``alice@example.com``; ``alice@example.com-2`` when the
name is taken by another user), and keeps email and display name up to date.

:func:`register_for_user` registers a machine for such a user (no auth key: the login was the proof).
When the server asks for manual approval, a machine that has no live node yet is parked instead
(:func:`add_pending`); :func:`approve_pending` registers it, :func:`reject_pending` forgets it. The records
are :mod:`tailpy.control.store.users` and :mod:`tailpy.control.store.pending`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailpy.control.store import PendingNode, Store
from tailpy.keys import MachinePublic, NodePublic
from tailpy.netmap import Node


@dataclass(frozen=True)
class Identity:
    """Who signed in, from a verified ID token: ``issuer`` URL and ``subject`` (the provider's stable id),
    ``email`` ("" when not given), ``email_verified``, ``name`` (display name, may be ""), ``groups`` (from
    the configured groups claim) and ``expires`` (the token's ``exp``, unix seconds)."""

    issuer: str
    subject: str
    email: str = ""
    email_verified: bool = False
    name: str = ""
    groups: tuple[str, ...] = ()
    expires: float | None = None

    @property
    def shown(self) -> str:
        """How pages and logs name this identity: the email, else the subject."""
        return self.email or self.subject


def user_for_identity(store: Store, identity: Identity, now: float) -> int:
    """The id of the user for ``identity`` (issuer + subject), created on first login; its email and display
    name are refreshed from the token."""
    return store.user_for_login(identity.issuer, identity.subject, identity.email, identity.name, now)


def has_live_node(store: Store, machine_key: MachinePublic) -> bool:
    """True when ``machine_key`` has a node in the tailnet (not deleted): a re-login needs no approval."""
    return store.node_by_machine_key(machine_key) is not None


def register_for_user(
    store: Store,
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
    """:meth:`Store.register_for_user`."""
    return store.register_for_user(
        machine_key, node_key, hostname, os_name, user_id, now, key_expiry, expiry_fixed=expiry_fixed
    )


def add_pending(
    store: Store,
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
    """:meth:`Store.add_pending`."""
    return store.add_pending(
        machine_key, node_key, hostname, os_name, user_id, now, key_expiry, expiry_fixed=expiry_fixed
    )


def list_pending(store: Store) -> list[PendingNode]:
    """Machines waiting for approval, oldest first."""
    return store.list_pending()


def pending_for(store: Store, machine_key: MachinePublic) -> PendingNode | None:
    """The approval entry of ``machine_key``, or None."""
    return store.pending_for(machine_key)


def approve_pending(store: Store, pending_id: int, now: float) -> Node:
    """:meth:`Store.approve_pending`."""
    return store.approve_pending(pending_id, now)


def reject_pending(store: Store, pending_id: int) -> PendingNode:
    """:meth:`Store.reject_pending`."""
    return store.reject_pending(pending_id)


__all__ = [
    "Identity",
    "PendingNode",
    "add_pending",
    "approve_pending",
    "has_live_node",
    "list_pending",
    "pending_for",
    "register_for_user",
    "reject_pending",
    "user_for_identity",
]
