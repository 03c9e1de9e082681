"""Users from an identity provider and nodes registered by login (:mod:`tailpy.control.oidc`), over
:class:`Store`.

A login with OpenID Connect gives an :class:`Identity` (issuer and subject: who it is for good; email, name
and groups: what it says about itself now). :func:`user_for_identity` finds the tailpy user of that issuer
and subject, or creates one named after the email (``alice@example.com``; ``alice@example.com-2`` when the
name is taken by another user), and keeps email and display name up to date.

:meth:`Store.register_for_user` registers a machine for such a user (no auth key: the login was the
proof). When the server asks for manual approval, a machine that has no live node yet is parked instead
(:meth:`Store.add_pending`); :meth:`Store.approve_pending` registers it, :meth:`Store.reject_pending`
forgets it. The records are :mod:`tailpy.control.store.users` and :mod:`tailpy.control.store.pending`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailpy.control.store import PendingNode, Store


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


__all__ = [
    "Identity",
    "PendingNode",
    "user_for_identity",
]
