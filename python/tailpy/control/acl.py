"""The running tailnet policy of a control server: where it comes from, how a new one is checked, and who is
told when it changes.

A policy comes from one of two places:

* the database (default): ``tailpy control policy set FILE`` stores it with who set it and when
  (:mod:`tailpy.control.store.policy`, a history whose newest row runs). A server notices a policy another
  process stored (a stopped server's admin command, a second server on the same PostgreSQL database) when it
  polls.
* a file (``tailpy control serve --policy FILE``): the file is the policy. It is reloaded when it changes
  (its modification time, size or inode looked at every :data:`FILE_POLL` seconds: no extra dependency, and
  it sees editors that replace the file as well as those that write it in place) and on SIGHUP; ``policy
  set`` is refused then (edit the file).

Every candidate goes through :func:`check`: :meth:`Policy.parse` (HuJSON syntax, undefined groups, tags
without an owner, ...) and the policy's ``tests`` run against the current nodes (:func:`check_tests`). A
candidate that fails is refused with one sentence ``WHERE:LINE:COLUMN: what is wrong`` and the running
policy stays; at start, a bad policy file stops the server from starting. A file edit that is refused is
remembered (:attr:`PolicyKeeper.refused`) until the file loads again: ``policy get`` shows it and control's
``GET /health`` reports the ``policy`` check as ``"warning"``.

A running server checks candidates off its event loop (:meth:`PolicyKeeper.set_async`,
:meth:`PolicyKeeper.reload_async`: the ``tests`` of a large policy against many nodes take a while): the
nodes are read on the loop, :func:`check` runs in a worker thread (``asyncio.to_thread``), and the accepted
policy is stored and handed to ``on_change`` back on the loop. An accepted policy goes to
``on_change`` (the server hands it to the mapper, which recompiles every node's filter and sends deltas).
Semantics of the policy itself are the compiler's (:mod:`tailpy.control.policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailpy.control.policy import Policy, PolicyError, PolicyNode, check_tests, hujson
from tailpy.control.routes import node_served
from tailpy.control.store import Store
from tailpy.control.store.policy import MAX_POLICY_BYTES
from tailpy.errors import ConfigError
from tailpy.netmap import Node

log = logging.getLogger("tailpy.control")

FILE_POLL = 1.0
"""Seconds between two looks at a ``--policy`` file's modification time, size and inode."""

NO_POLICY = "no policy set: every node may reach every other (Tailscale's default)"
"""What ``tailpy control policy get`` says when no policy is set."""


class PolicyRefused(ConfigError):
    """A policy was refused: ``sentence`` is ``WHERE:LINE:COLUMN: message`` (``WHERE: message`` when the
    position is not known); ``errors`` every problem found (failing ``tests`` entries can be several)."""

    def __init__(self, sentence: str, errors: tuple[str, ...] = ()) -> None:
        super().__init__(sentence)
        self.errors = errors or (sentence,)


def policy_nodes(nodes: Iterable[Node], emails: Mapping[str, str]) -> list[PolicyNode]:
    """The compiler's view of ``nodes``: id, addresses, owner's login name and email (from ``emails``, login
    name -> email; "" for a tagged node), tags, and the routes it serves
    (:func:`tailpy.control.routes.node_served`)."""
    out = []
    for n in nodes:
        user = "" if n.tags else n.user
        email = emails.get(user, "") if user else ""
        out.append(PolicyNode(n.id, tuple(n.addresses), user, email, n.tags, node_served(n)))
    return out


def locate(where: str, e: PolicyError) -> str:
    """``WHERE:LINE:COLUMN: message`` for ``e`` (``WHERE: message`` without a position), as compilers
    print errors."""
    if e.line is None:
        return f"{where}: {e.message}"
    return f"{where}:{e.line}:{e.column if e.column is not None else 1}: {e.message}"


def check(text: str, where: str, nodes: Iterable[PolicyNode]) -> Policy:
    """``text`` parsed, with its ``tests`` passing against ``nodes``. ``where`` names the source in messages
    (a file name, ``policy``). Raises PolicyRefused."""
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise PolicyRefused(f"{where}: a policy may have at most {MAX_POLICY_BYTES} bytes")
    try:
        policy = Policy.parse(text)
    except PolicyError as e:
        raise PolicyRefused(locate(where, e)) from None
    failures = check_tests(policy, list(nodes))
    if failures:
        located = tuple(locate(where, f) for f in failures)
        more = f" (and {len(located) - 1} more failing tests)" if len(located) > 1 else ""
        raise PolicyRefused(located[0] + more, located)
    return policy


_WHY = {"changed": "changed", "SIGHUP": "on SIGHUP"}


def log_notes(policy: Policy, where: str) -> None:
    """Log what an accepted policy leaves out: its ``warnings`` (ignored grants, ...) and the sections not
    enforced yet."""
    for w in policy.warnings:
        log.warning("%s: %s", where, w)
    if policy.not_enforced:
        log.info("%s: not enforced yet: %s", where, ", ".join(policy.not_enforced))


def read_policy_file(path: Path) -> str:
    """The text of policy file ``path``. Raises ConfigError (one sentence naming it)."""
    try:
        return hujson.decode(path.read_bytes())
    except hujson.HuJSONError as e:
        raise ConfigError(f"policy file {path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read policy file {path}: {e.strerror or e}") from None


async def check_async(text: str, where: str, nodes: Iterable[PolicyNode]) -> Policy:
    """:func:`check` in a worker thread, so that the event loop keeps serving (``nodes`` are taken as a
    list here, on the caller's thread). Raises PolicyRefused."""
    return await asyncio.to_thread(check, text, where, list(nodes))


@dataclass(frozen=True)
class Refused:
    """A policy file's content that was refused: ``at`` (unix seconds), ``error`` (the sentence)."""

    at: float
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "error": self.error}


@dataclass(frozen=True)
class Running:
    """The running policy: ``policy`` (None: no policy), where it came from (``source``: "database" or
    "file", ``path`` for a file), ``id`` (its database row; 0 for none or a file), ``set_by`` and ``set_at``
    (unix seconds; a file's: ``file:<path>`` and when it was loaded)."""

    policy: Policy | None
    source: str = "database"
    path: str = ""
    id: int = 0
    set_by: str = ""
    set_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """What ``policy get --json`` prints: ``{"policy": text | null, "source", "path"?, "id", "set_by",
        "set_at", "message"?}``."""
        out: dict[str, Any] = {
            "policy": self.policy.text if self.policy is not None else None,
            "source": self.source,
            "id": self.id,
            "set_by": self.set_by,
            "set_at": self.set_at,
        }
        if self.path:
            out["path"] = self.path
        if self.policy is None:
            out["message"] = NO_POLICY
        return out


def stored(store: Store) -> Running:
    """The policy stored in ``store`` (parsed, not re-tested). Raises ConfigError when it no longer parses
    (stored by another tailpy version): the sentence says how to replace it."""
    rec = store.policy()
    if rec is None:
        return Running(None)
    try:
        policy = Policy.parse(rec.text)
    except PolicyError as e:
        raise ConfigError(
            f"the stored policy (id {rec.id}) does not parse: {locate('policy', e)}; store a fixed one with "
            "`tailpy control policy set FILE`"
        ) from None
    return Running(policy, "database", "", rec.id, rec.set_by, rec.set_at)


class PolicyKeeper:
    """The running policy of one control server over ``store``; ``path``: ``--policy FILE`` (None: the
    database). ``on_change(policy)`` runs for the first policy (:meth:`load`) and each accepted change;
    ``nodes()`` gives the current nodes for the ``tests`` section. ``clock``: unix seconds."""

    def __init__(
        self,
        store: Store,
        *,
        path: Path | None,
        on_change: Callable[[Policy | None], None],
        nodes: Callable[[], list[PolicyNode]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.path = path
        self.on_change = on_change
        self.nodes = nodes
        self.clock = clock
        self.running = Running(None)
        self._stat: tuple[int, int, int] | None = None
        self._refused_id = -1  # a stored policy that did not parse (logged once)
        self._watcher: asyncio.Task[None] | None = None
        self._reloading: asyncio.Lock | None = None
        self.refused: Refused | None = None
        """The policy file's current content, refused (None when it is the running policy)."""

    @property
    def policy(self) -> Policy | None:
        return self.running.policy

    def _file_stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> None:
        """Load the policy at start (the file's, else the database's) and hand it to ``on_change``. Raises
        ConfigError (PolicyRefused for a bad policy file: the server must not start with it)."""
        if self.path is not None:
            self._stat = self._file_stat()
            text = read_policy_file(self.path)
            policy = check(text, str(self.path), self.nodes())
            self.running = Running(policy, "file", str(self.path), 0, f"file:{self.path}", self.clock())
            log_notes(policy, str(self.path))
        else:
            self.running = stored(self.store)
        self.on_change(self.running.policy)

    def set(self, text: str, set_by: str, where: str = "policy") -> Running:
        """Check ``text`` (named ``where`` in messages), store it as set by ``set_by`` and run it. Raises
        PolicyRefused (the running policy stays), ConfigError when the server runs on a policy file."""
        self._database_mode()
        return self._store_and_run(check(text, where, self.nodes()), set_by)

    async def set_async(self, text: str, set_by: str, where: str = "policy") -> Running:
        """:meth:`set` with the check in a worker thread (:func:`check_async`); stored and run back on the
        calling (event loop) thread."""
        self._database_mode()
        return self._store_and_run(await check_async(text, where, self.nodes()), set_by)

    def _database_mode(self) -> None:
        if self.path is not None:
            raise ConfigError(
                f"this control server takes its policy from {self.path} (serve --policy): edit that file; "
                "it is reloaded when it changes"
            )

    def _store_and_run(self, policy: Policy, set_by: str) -> Running:
        rec = self.store.add_policy(policy.text, set_by, self.clock())
        self.running = Running(policy, "database", "", rec.id, rec.set_by, rec.set_at)
        log.info("policy %d set by %s", rec.id, set_by or "?")
        log_notes(policy, f"policy {rec.id}")
        self.on_change(policy)
        return self.running

    def reload(self, why: str = "changed") -> bool:
        """Re-read the policy file (or look for a newer policy in the database); run it when it differs and
        passes :func:`check`, else log the sentence, remember it (:attr:`refused`) and keep the running
        policy. ``why``: ``"changed"`` or ``"SIGHUP"``, for the log. True when it changed."""
        if self.path is None:
            return self._reload_database()
        text = self._read_changed(why)
        if text is None:
            return False
        try:
            policy = check(text, str(self.path), self.nodes())
        except ConfigError as e:
            return self._refuse(why, e)
        return self._run_file(policy, why)

    async def reload_async(self, why: str = "changed") -> bool:
        """:meth:`reload` with the file read and checked in a worker thread; one reload at a time, the
        result run back on the event loop."""
        if self.path is None:
            return self._reload_database()
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            text = self._read_changed(why)
            if text is None:
                return False
            try:
                policy = await check_async(text, str(self.path), self.nodes())
            except ConfigError as e:
                return self._refuse(why, e)
            return self._run_file(policy, why)

    def _read_changed(self, why: str) -> str | None:
        """The file's text when it differs from the running policy's; None when not (or unreadable: logged
        and remembered)."""
        assert self.path is not None
        self._stat = self._file_stat()
        try:
            text = read_policy_file(self.path)
        except ConfigError as e:
            self._refuse(why, e)
            return None
        if self.running.policy is not None and text == self.running.policy.text:
            self.refused = None  # back to the running policy's text
            return None
        return text

    def _refuse(self, why: str, e: ConfigError) -> bool:
        self.refused = Refused(self.clock(), str(e))
        log.warning("policy file %s: not loaded: %s; keeping the running policy", _WHY.get(why, why), e)
        return False

    def _run_file(self, policy: Policy, why: str) -> bool:
        self.running = Running(policy, "file", str(self.path), 0, f"file:{self.path}", self.clock())
        self.refused = None
        log.info("policy file %s loaded (%s)", self.path, _WHY.get(why, why))
        log_notes(policy, str(self.path))
        self.on_change(policy)
        return True

    def health(self) -> dict[str, Any]:
        """The ``policy`` check of control's ``GET /health``: ``"ok"``, or ``"warning"`` with ``error`` and
        ``at`` while the policy file's content is refused (the previous policy runs)."""
        if self.refused is None:
            return {"status": "ok", "source": self.running.source}
        return {
            "status": "warning",
            "source": self.running.source,
            "error": f"the policy file's content was refused: {self.refused.error}; the previous policy runs",
            "at": self.refused.at,
        }

    def _reload_database(self) -> bool:
        newest = self.store.policy_id()
        if newest in (self.running.id, self._refused_id):
            return False
        try:
            running = stored(self.store)
        except ConfigError as e:
            self._refused_id = newest  # said once, not at every poll
            log.warning("%s; keeping the running policy", e)
            return False
        self.running = running
        log.info("policy %d (set by %s) loaded from the database", running.id, running.set_by or "?")
        self.on_change(running.policy)
        return True

    def poll_file(self) -> None:
        """Reload the file when its modification time, size or inode changed since the last look."""
        if self.path is not None and self._file_stat() != self._stat:
            self.reload("changed")

    async def poll_file_async(self) -> None:
        """:meth:`poll_file` with the check off the event loop (:meth:`reload_async`)."""
        if self.path is not None and self._file_stat() != self._stat:
            await self.reload_async("changed")

    def start_watching(self, interval: float | None = None) -> None:
        """Look at the policy file every ``interval`` seconds (default :data:`FILE_POLL`; file mode only)
        until :meth:`stop`."""
        if self.path is None or self._watcher is not None:
            return
        every = FILE_POLL if interval is None else interval

        async def watch() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.poll_file_async()
                except Exception:  # a bug here must not stop the watching: log it, look again
                    log.exception("policy file watch")

        self._watcher = asyncio.create_task(watch(), name="policy-file")

    async def stop(self) -> None:
        task, self._watcher = self._watcher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = [
    "FILE_POLL",
    "NO_POLICY",
    "PolicyKeeper",
    "PolicyRefused",
    "Refused",
    "Running",
    "check",
    "check_async",
    "locate",
    "log_notes",
    "policy_nodes",
    "read_policy_file",
    "stored",
]
