"""STAND-IN for the policy compiler (the ``policy`` branch owns this package and replaces this file).

Only the names control's policy surfaces use (:class:`Policy`, :class:`PolicyError`, :class:`PolicyNode`,
:func:`check_tests`, :func:`compile_filter`), with just enough behaviour for them to run: HuJSON read as JSON
after stripping ``//`` and ``/* */`` comments and trailing commas; ``tagOwners`` and ``groups`` for
:meth:`Policy.may_own`; a filter that allows everything when some ACL goes from ``*`` to ``*:*`` and nothing
otherwise. No ``tests`` are evaluated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tailpy.errors import TailpyError
from tailpy.packetfilter import ALLOW_ALL, FilterRule

_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)
_TRAILING = re.compile(r'"(?:\\.|[^"\\])*"|,(\s*[}\]])', re.S)
_KNOWN = {"groups", "hosts", "tagOwners", "acls", "grants", "tests"}


class PolicyError(TailpyError):
    """A policy is malformed or inconsistent; ``line``/``column`` 1-based (None when not known)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        self.message, self.line, self.column = message, line, column
        super().__init__(message if line is None else f"line {line}, column {column}: {message}")


@dataclass(frozen=True)
class PolicyNode:
    """What the compiler knows of a node."""

    id: int
    addresses: tuple[str, ...]
    user: str
    email: str
    tags: tuple[str, ...]


def _blank(m: re.Match[str]) -> str:
    s = m.group(0)
    return s if s.startswith('"') else re.sub(r"[^\n]", " ", s)


class Policy:
    """A parsed policy (stand-in)."""

    def __init__(self, text: str, obj: dict[str, Any]) -> None:
        self.text = text
        self._obj = obj
        self.not_enforced = tuple(sorted(k for k in obj if k not in _KNOWN))
        self.warnings: tuple[str, ...] = ()
        self.tag_owners: dict[str, list[str]] = dict(obj.get("tagOwners") or {})

    @classmethod
    def parse(cls, text: str) -> Policy:
        """Raises PolicyError with the line and column of a syntax error or an undefined group."""
        clean = _COMMENT.sub(_blank, text)
        clean = _TRAILING.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " " + m.group(1), clean)
        try:
            obj = json.loads(clean)
        except json.JSONDecodeError as e:
            raise PolicyError(e.msg, e.lineno, e.colno) from None
        if not isinstance(obj, dict):
            raise PolicyError("a policy is a JSON object", 1, 1)
        groups = obj.get("groups") or {}
        for owners in (obj.get("tagOwners") or {}).values():
            for o in owners:
                if isinstance(o, str) and o.startswith("group:") and o not in groups:
                    at = text.find(f'"{o}"')
                    line = text.count("\n", 0, at) + 1
                    col = at - (text.rfind("\n", 0, at) + 1) + 1
                    raise PolicyError(f"{o} is not defined", line, col)
        return cls(text, obj)

    def may_own(self, tag: str, user: str, email: str) -> bool:
        owners = (self._obj.get("tagOwners") or {}).get(tag)
        if owners is None:
            return False
        me = {user, email, user.split("@")[0] + "@"} - {"", "@"}
        for o in owners:
            members = (self._obj.get("groups") or {}).get(o, []) if o.startswith("group:") else [o]
            if me & set(members):
                return True
        return False


def check_tests(policy: Policy, nodes: Iterable[PolicyNode]) -> list[PolicyError]:
    """Stand-in: no tests are evaluated."""
    return []


def compile_filter(
    policy: Policy | None, node_id: int, nodes: Iterable[PolicyNode]
) -> tuple[FilterRule, ...]:
    """Stand-in: allow all without a policy or with an ACL from ``*`` to ``*:*``; else nothing."""
    if policy is None:
        return ALLOW_ALL
    for acl in policy._obj.get("acls") or []:
        if "*" in acl.get("src", ()) and "*:*" in acl.get("dst", ()):
            return ALLOW_ALL
    return ()


__all__ = ["Policy", "PolicyError", "PolicyNode", "check_tests", "compile_filter"]
