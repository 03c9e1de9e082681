"""tailpyd's state machine (tailpy.daemon.lifecycle): the transition table, an error for any event it does not
allow; and a Backend driven through it against a real control server on 127.0.0.1 with a stand-in data plane
(tests/unit/_conn_device.py): up with an auth key, Running at the first netmap, down, logout, the state
strings status --json shows, and each new packet filter of a netmap or delta handed to the data plane."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from _conn_device import FakeDevice

from tailpy.control import ControlServer, Store
from tailpy.control.client import control_urls
from tailpy.daemon.backend import Backend
from tailpy.daemon.lifecycle import TRANSITIONS, BackendState, Event, IllegalTransition, transition
from tailpy.daemon.pfilter import DeviceRule, device_rules, filter_drops
from tailpy.daemon.state import StateStore
from tailpy.errors import AuthKeyError, ConfigError
from tailpy.netmap import MapDelta, apply_delta
from tailpy.packetfilter import ALLOW_ALL, FilterRule, NetPortRange, PortRange

S, E = BackendState, Event


def test_state_strings_are_tailscales() -> None:
    assert [s.value for s in S] == ["NoState", "NeedsLogin", "Starting", "Running", "Stopped"]


def test_table() -> None:
    assert transition(S.NO_STATE, E.START_REGISTERED) is S.STARTING
    assert transition(S.NO_STATE, E.START_LOGGED_OUT) is S.NEEDS_LOGIN
    for s in S:
        assert transition(s, E.REGISTERED) is S.STARTING
        assert transition(s, E.DOWN) is S.STOPPED
        assert transition(s, E.LOGOUT) is S.NEEDS_LOGIN
        assert transition(s, E.LOGIN_NEEDED) is S.NEEDS_LOGIN
    for s in (S.STARTING, S.RUNNING, S.NEEDS_LOGIN):
        assert transition(s, E.NETMAP) is S.RUNNING
        assert transition(s, E.KEY_EXPIRED) is S.NEEDS_LOGIN
        assert transition(s, E.FORGOTTEN) is S.NEEDS_LOGIN


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.RUNNING, E.START_REGISTERED),  # start happens once, first
        (S.STOPPED, E.START_LOGGED_OUT),
        (S.STOPPED, E.NETMAP),  # no session runs while stopped
        (S.NO_STATE, E.NETMAP),
        (S.STOPPED, E.FORGOTTEN),
        (S.RUNNING, E.LOGIN_FAILED),
    ],
)
def test_illegal_transitions_raise(state: BackendState, event: Event) -> None:
    assert event not in TRANSITIONS[state]
    with pytest.raises(IllegalTransition, match=event.name):
        transition(state, event)


class DataPlane(FakeDevice):
    """The stand-in device plus what the backend itself calls (peers' keys, the node key, counters)."""

    listen_port = 41641
    tun_name = "tailpy-test0"

    def __init__(self, private_key: bytes) -> None:
        super().__init__(strict=False)
        self.private_key = private_key
        self.closed = False
        self.filters: list[list[DeviceRule] | None] = []  # each set_filter call

    def remove_peer(self, public_key: bytes) -> bool:
        return self.paths.pop(public_key, None) is not None

    def set_private_key(self, private_key: bytes) -> None:
        self.private_key = private_key

    def set_filter(self, rules: list[DeviceRule] | None) -> None:
        if rules is not None and any("bad" in src for r in rules for src in r[0]):
            raise ConfigError("malformed filter address 'bad'")  # as the data plane refuses one
        self.filters.append(rules)

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            super().close()


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str]]:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    yield srv, f"http://{host}:{port}"
    await srv.stop()
    store.close()


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_backend_moves_by_the_table(control: tuple[ControlServer, str], tmp_path: Path) -> None:
    srv, url = control
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    devices: list[DataPlane] = []

    def factory(private_key: bytes) -> Any:
        devices.append(DataPlane(private_key))
        return devices[-1]

    (tmp_path / "node").mkdir()
    backend = Backend(StateStore(tmp_path / "node"), factory, configure_os=False)
    try:
        assert backend.status().to_json()["backend_state"] == "NoState"
        await backend.start()
        assert backend.state is S.NEEDS_LOGIN and backend.status().to_json()["backend_state"] == "NeedsLogin"
        with pytest.raises(AuthKeyError):
            await backend.up(url, "not-a-key", "alpha")
        assert backend.state is S.NEEDS_LOGIN and backend.device is None  # nothing changed
        await backend.up(url, key, "alpha")
        assert backend.state in (S.STARTING, S.RUNNING)
        await until(lambda: backend.state is S.RUNNING, "the first netmap")
        st = backend.status()
        assert st.backend_state == "Running" and st.control_connected and st.self_node.name == "alpha"
        assert st.traversal is not None and st.derp is not None
        assert st.control_url == control_urls(url)[0] and st.map_stream_starts == {"netmap": 1, "delta": 0}
        await backend.down()
        assert backend.state is S.STOPPED and devices[0].closed and not backend.status().control_connected
        assert backend.status().control_url == control_urls(url)[0]  # the last stream's, while none is up
        await backend.up("", None, None)  # registered here: no key needed
        await until(lambda: backend.state is S.RUNNING, "running again")
        await backend.logout()
        assert backend.state is S.NEEDS_LOGIN and backend.state_data.node_id is None
    finally:
        await backend.close()


async def test_backend_gives_the_data_plane_each_new_packet_filter(
    control: tuple[ControlServer, str], tmp_path: Path
) -> None:
    srv, url = control
    key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    devices: list[DataPlane] = []

    def factory(private_key: bytes) -> Any:
        devices.append(DataPlane(private_key))
        return devices[-1]

    (tmp_path / "node").mkdir()
    backend = Backend(StateStore(tmp_path / "node"), factory, configure_os=False)
    ssh = FilterRule(("100.64.0.1/32",), (NetPortRange("100.64.0.2/32", PortRange(22, 22)),), (6,))
    try:
        await backend.start()
        await backend.up(url, key, "alpha")
        await until(lambda: backend.state is S.RUNNING, "the first netmap")
        dev = devices[0]
        allow_all: list[tuple[list[str], list[tuple[str, int, int]], list[int]]] = [
            (["*"], [("*", 0, 65535)], [])
        ]
        assert dev.filters == [allow_all]  # control without a policy: everyone may reach everything
        base = backend.netmap
        assert base is not None and base.packet_filter == ALLOW_ALL
        backend.apply_netmap(dataclasses.replace(base, packet_filter=(ssh,)))
        assert dev.filters[-1] == [(["100.64.0.1/32"], [("100.64.0.2/32", 22, 22)], [6])]
        backend.apply_netmap(dataclasses.replace(base, packet_filter=(ssh,)))  # unchanged: not set again
        assert len(dev.filters) == 2
        # A delta carrying a filter replaces the whole filter.
        nm = backend.netmap
        assert nm is not None
        backend.apply_netmap(apply_delta(nm, MapDelta(packet_filter=ALLOW_ALL)))
        assert dev.filters[-1] == allow_all and len(dev.filters) == 3
        # One the data plane refuses leaves the one in force (and is tried again with the next netmap).
        bad = FilterRule(("bad",), (NetPortRange("*"),))
        backend.apply_netmap(dataclasses.replace(base, packet_filter=(bad,)))
        assert len(dev.filters) == 3
        backend.apply_netmap(dataclasses.replace(base, packet_filter=None, packet_filters=None))
        assert dev.filters[-1] is None
    finally:
        await backend.close()


def test_filter_drops_in_status_words() -> None:
    assert filter_drops(None) == {}
    stats = {"filter": {"rules": 3, "dropped_no_rule": 2, "dropped_malformed": 0}}
    assert filter_drops(stats) == {"no_rule": 2}
    assert device_rules(None) is None
