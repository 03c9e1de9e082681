"""Who may give a node a tag: the decision control makes when a tag is requested (an auth key created with
``--tags``, a node registering with ``tailpy up --advertise-tags``).

A tag is granted when one of the requesters may own it: the auth key's creator (the key's user; for a key
with no user, which is every tagged key, the admin who created it) or the node's owner. Tags a node already
holds stay granted whatever the policy says now: as in Tailscale, a later policy never takes a tag away
(only an admin, ``tailpy control nodes tag``, or a new registration changes a node's tags).

The rules, after Tailscale's "Group devices with tags" (https://tailscale.com/kb/1068/tags: "Tags are
defined in the tailnet policy file in the tagOwners section"; "Owner, Admin, or Network admin can apply any
tag, even if they don't own the tag"):

* With a policy: a tag must be defined in the policy's ``tagOwners``; the admin may apply any defined tag,
  a user only those :meth:`tailpy.control.policy.Policy.may_own` grants them.
* Tags owned by tags: a tag whose ``tagOwners`` lists a tag the node holds may be requested by that node
  (``"tag:web": ["tag:dev"]`` lets a ``tag:dev`` node ask for ``tag:web``), as Tailscale allows (its
  Kubernetes operator, tagged ``tag:k8s-operator``, tags the proxies it starts ``tag:k8s``).
* With no policy: nobody owns any tag (there is no ``tagOwners``), so a user's request for a tag is refused,
  as Tailscale refuses a tag its policy does not define. The admin may still apply any well-formed tag: a
  tailnet without a policy is Tailscale's default ("every node may reach every other"), whose tags only an
  admin can have made, and tailpy's admin could tag auth keys before policies existed; refusing them would
  break every tagged key in use for nothing a policy protects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tailpy.control.policy.model import tag_error
from tailpy.errors import ConfigError, TagError

if TYPE_CHECKING:
    from tailpy.control.policy import Policy


def parse_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validate tags (``tag:`` is added when missing) by Tailscale's rule,
    :func:`tailpy.control.policy.model.tag_error`: ``tag:`` then an ASCII letter, then ASCII letters, digits
    and hyphens; tags are case-sensitive. Sorted, without duplicates. Raises ConfigError."""
    out = set()
    for t in tags:
        t = t.strip()
        if not t:
            continue
        if not t.startswith("tag:"):
            t = "tag:" + t
        problem = tag_error(t)
        if problem is not None:
            raise ConfigError(problem)
        out.add(t)
    return tuple(sorted(out))


@dataclass(frozen=True)
class Requester:
    """Someone a tag is asked for on behalf of: a user (login ``name``, ``email``, "" when unknown) or the
    admin (``admin`` True: whoever can reach control's admin socket or database)."""

    name: str
    email: str = ""
    admin: bool = False

    def describe(self) -> str:
        return "the admin" if self.admin else f"user {self.name}"


ADMIN = Requester("admin", admin=True)
"""The admin (`tailpy control ...`): the creator of every auth key made without a user."""


def check_tags(
    policy: Policy | None,
    tags: Iterable[str],
    requesters: Sequence[Requester],
    held: Iterable[str] = (),
) -> tuple[str, ...]:
    """The tags ``tags`` validated (``tag:<name>``, sorted, no duplicates) when every one is ``held``
    already, may be owned by one of ``requesters``, or is owned by a ``held`` tag under ``policy`` (None:
    no policy set; see the module docstring). Raises TagError with one sentence naming the first refused
    tag and who asked."""
    try:
        wanted = parse_tags(tags)
    except ConfigError as e:
        raise TagError(str(e)) from None
    have = set(held)
    for tag in wanted:
        if tag in have:
            continue
        if policy is None:
            if any(r.admin for r in requesters):
                continue
            raise TagError(
                f"{tag} is not permitted: no policy is set, so no user owns any tag (define it in a "
                "policy's tagOwners with `tailpy control policy set`, or use an auth key the admin made "
                "with --tags)"
            )
        if tag not in policy.tag_owners:
            raise TagError(f"{tag} is not permitted: the policy's tagOwners does not define it")
        if any(r.admin or policy.may_own(tag, r.name, r.email) for r in requesters):
            continue
        if have and any(owner in have for owner in policy.tag_owners[tag]):
            continue  # owned by a tag the node holds
        if have:
            raise TagError(
                f"{tag} is not permitted: {tag}'s owners do not include this node's tags "
                f"({', '.join(sorted(have))})"
            )
        if not requesters:
            raise TagError(
                f"{tag} is not permitted: this node has no owner who could own it (its tags came from an "
                "auth key); register with an auth key that carries the tag, or ask an admin (`tailpy "
                "control nodes tag`)"
            )
        who = " or ".join(r.describe() for r in requesters)
        raise TagError(f"{tag} is not permitted: the policy's tagOwners does not let {who} own it")
    return wanted


__all__ = ["ADMIN", "Requester", "check_tags", "parse_tags"]
