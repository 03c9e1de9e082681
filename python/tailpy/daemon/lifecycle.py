"""The node's state machine: states, the events that move it, and the table of allowed moves.

Modelled on h11's ``_state.py``: states and events are enums, :data:`TRANSITIONS` lists every allowed
``(state, event) -> new state``, and :func:`transition` raises :class:`IllegalTransition` for any other
pair, so a path through the code that the table does not foresee shows up as an error, not as a node in a
state nobody planned. The states are Tailscale's (``ipn.State``); their values are the strings ``tailpy
status --json`` shows as ``backend_state``.

=============  ===================  ============
state          event                new state
=============  ===================  ============
NoState        START_REGISTERED     Starting
NoState        START_LOGGED_OUT     NeedsLogin
any            REGISTERED           Starting
any            UP_OFFLINE           Starting
any            LOGIN_NEEDED         NeedsLogin
any            LOGOUT               NeedsLogin
any            DOWN                 Stopped
Starting,      NETMAP               Running
Running,
NeedsLogin
Starting,      KEY_EXPIRED          NeedsLogin
Running,
NeedsLogin
Starting,      FORGOTTEN            NeedsLogin
Running,
NeedsLogin
Starting,      LOGIN_FAILED         NeedsLogin
NeedsLogin
=============  ===================  ============
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class BackendState(enum.Enum):
    """Where the node is (``tailpy status``'s ``backend_state``)."""

    NO_STATE = "NoState"
    """Just started; :meth:`tailpy.daemon.backend.Backend.start` has not run yet."""
    NEEDS_LOGIN = "NeedsLogin"
    """Not registered (no login server, logged out, forgotten by control), its key expired, or an
    interactive login waits for the user."""
    STARTING = "Starting"
    """Registered and wanted up, waiting for the first netmap."""
    RUNNING = "Running"
    """Netmap applied, tunnel up."""
    STOPPED = "Stopped"
    """``tailpy down``: registered, tunnel removed."""


class Event(enum.Enum):
    """What happened to the node."""

    START_REGISTERED = "the daemon started with a registration it was up with"
    START_LOGGED_OUT = "the daemon started with nothing to come up with"
    REGISTERED = "control accepted a registration (auth key or a completed login)"
    UP_OFFLINE = "`up` with control unreachable: coming up on the saved registration"
    LOGIN_NEEDED = "control wants the user to sign in"
    LOGIN_FAILED = "a completed login could not be applied (the tunnel's addresses)"
    NETMAP = "a netmap was applied"
    KEY_EXPIRED = "a netmap says this node's key has expired"
    FORGOTTEN = "control no longer knows this machine"
    LOGOUT = "`logout`"
    DOWN = "`down`"


class IllegalTransition(RuntimeError):
    """An event the table does not allow in the current state (a bug in the caller)."""

    def __init__(self, state: BackendState, event: Event) -> None:
        super().__init__(f"event {event.name} ({event.value}) is not allowed in state {state.value}")
        self.state = state
        self.event = event


def _table() -> dict[BackendState, dict[Event, BackendState]]:
    S, E = BackendState, Event
    table: dict[BackendState, dict[Event, BackendState]] = {s: {} for s in S}

    def allow(states: Iterable[BackendState], event: Event, new: BackendState) -> None:
        for s in states:
            table[s][event] = new

    allow([S.NO_STATE], E.START_REGISTERED, S.STARTING)
    allow([S.NO_STATE], E.START_LOGGED_OUT, S.NEEDS_LOGIN)
    allow(S, E.REGISTERED, S.STARTING)
    allow(S, E.UP_OFFLINE, S.STARTING)
    allow(S, E.LOGIN_NEEDED, S.NEEDS_LOGIN)
    allow(S, E.LOGOUT, S.NEEDS_LOGIN)
    allow(S, E.DOWN, S.STOPPED)
    following = [S.STARTING, S.RUNNING, S.NEEDS_LOGIN]  # a session with control may be running
    allow(following, E.NETMAP, S.RUNNING)
    allow(following, E.KEY_EXPIRED, S.NEEDS_LOGIN)
    allow(following, E.FORGOTTEN, S.NEEDS_LOGIN)
    allow([S.STARTING, S.NEEDS_LOGIN], E.LOGIN_FAILED, S.NEEDS_LOGIN)
    return table


TRANSITIONS: Mapping[BackendState, Mapping[Event, BackendState]] = _table()
"""state -> event -> new state; a pair not listed is illegal."""


def transition(state: BackendState, event: Event) -> BackendState:
    """The state after ``event`` in ``state``. Raises IllegalTransition for a pair not in the table."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None


__all__ = ["TRANSITIONS", "BackendState", "Event", "IllegalTransition", "transition"]
