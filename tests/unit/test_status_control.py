"""Which control URL a node streams from and how its map streams began: ``Status.control_url`` and
``Status.map_stream_starts`` in the status JSON (and parsed from an older tailpyd without them), the
``control:`` line of `tailpy status` for a node given several control URLs, and tailpyd's
``tailpy_node_control_stream_starts_total{start}``."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from rich.console import Console
from test_control_replicas import Pair, nkey
from test_daemon_lifecycle import DataPlane, until
from test_ipnstate import backend

from _metrics import parse
from tailpy.cli import status
from tailpy.control import ControlServer, Store
from tailpy.daemon.backend import Backend
from tailpy.daemon.metrics import node_registry
from tailpy.daemon.state import StateStore
from tailpy.errors import ParseError
from tailpy.ipnstate import Status

A, B = "http://192.0.2.1:8080", "http://192.0.2.2:8080"


def _render(st: Status) -> list[str]:
    out = io.StringIO()
    status.render(st, Console(file=out, width=200, color_system=None))
    return out.getvalue().splitlines()


async def _failed_over(tmp_path: Path) -> Status:
    """A running node given two control URLs, streaming from the second after one resumed stream."""
    st = (await backend(tmp_path)).status()
    return dataclasses.replace(
        st, login_server=f"{A},{B}", control_url=B, map_stream_starts={"netmap": 1, "delta": 1}
    )


async def test_control_fields_round_trip_through_json(tmp_path: Path) -> None:
    st = await _failed_over(tmp_path)
    doc = json.loads(json.dumps(st.to_json()))
    assert doc["control_url"] == B and doc["map_stream_starts"] == {"netmap": 1, "delta": 1}
    back = Status.from_json(doc)
    assert back == st and back.to_json() == doc


async def test_status_of_an_older_tailpyd_has_no_control_url(tmp_path: Path) -> None:
    doc = (await _failed_over(tmp_path)).to_json()
    del doc["control_url"], doc["map_stream_starts"]
    st = Status.from_json(doc)
    assert st.control_url == "" and st.map_stream_starts == {}
    assert status.control_line(st) == ""  # nothing to say, rather than a wrong URL


@pytest.mark.parametrize("starts", [[1, 2], {"netmap": "1"}, {"delta": True}])
async def test_malformed_stream_starts_are_a_parse_error(tmp_path: Path, starts: object) -> None:
    doc = (await _failed_over(tmp_path)).to_json()
    doc["map_stream_starts"] = starts
    with pytest.raises(ParseError):
        Status.from_json(doc)


async def test_status_names_the_control_url_in_use_among_several(tmp_path: Path) -> None:
    st = await _failed_over(tmp_path)
    assert f"control: {B} (2 of 2 URLs)" in _render(st)
    first = dataclasses.replace(st, control_url=A, control_connected=True)
    assert f"control: {A} (1 of 2 URLs)" in _render(first)


async def test_status_keeps_the_not_connected_warning_with_the_last_url(tmp_path: Path) -> None:
    st = dataclasses.replace(await _failed_over(tmp_path), control_connected=False)
    assert st.backend_state == "Running"
    lines = _render(st)
    assert f"control: {B} (2 of 2 URLs)" in lines
    assert any(line.startswith("control server not connected") for line in lines)


async def test_single_url_node_prints_nothing_new(tmp_path: Path) -> None:
    st = dataclasses.replace(await _failed_over(tmp_path), login_server=A, control_url=A)
    multi = _render(await _failed_over(tmp_path))
    single = _render(st)
    assert not any(line.startswith("control:") for line in single)
    assert len(single) == len(multi) - 1
    before_any = dataclasses.replace(await _failed_over(tmp_path), control_url="")
    assert not any(line.startswith("control:") for line in _render(before_any))


async def test_stream_starts_metric_is_the_status(tmp_path: Path) -> None:
    st = await _failed_over(tmp_path)
    types, samples = parse(generate_latest(node_registry(lambda: st)).decode())
    assert types["tailpy_node_control_stream_starts"] == "counter"  # (the parser drops _total)
    assert samples[("tailpy_node_control_stream_starts_total", (("start", "netmap"),))] == 1
    assert samples[("tailpy_node_control_stream_starts_total", (("start", "delta"),))] == 1
    older = dataclasses.replace(st, map_stream_starts={})  # an older tailpyd's status: both labels, 0
    _, samples = parse(generate_latest(node_registry(lambda: older)).decode())
    assert samples[("tailpy_node_control_stream_starts_total", (("start", "netmap"),))] == 0
    assert samples[("tailpy_node_control_stream_starts_total", (("start", "delta"),))] == 0


async def test_node_reports_the_url_it_streams_from(tmp_path: Path) -> None:
    """A node given an unreachable URL first streams from the second: its status names that one."""
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    url = f"http://{host}:{port}"
    (tmp_path / "node").mkdir()
    node = Backend(StateStore(tmp_path / "node"), DataPlane, configure_os=False)
    try:
        await node.start()
        key = srv.store.create_auth_key(reusable=True, expires=None, now=time.time()).key
        await node.up(f"{dead},{url}", key, "alpha")
        await until(lambda: node.status().control_connected, "the map stream")
        st = node.status()
        assert st.control_url == url and st.map_stream_starts == {"netmap": 1, "delta": 0}
        assert f"control: {url} (2 of 2 URLs)" in _render(st)
    finally:
        await node.close()
        await srv.stop()
        store.close()


async def test_failover_shows_the_other_replica_and_a_delta_start(tmp_path: Path) -> None:
    """Two control servers on one database: when the first stops, the node streams from the second, resumed
    with a delta; its status names the second URL and counts one start of each kind."""
    (tmp_path / "control").mkdir()
    pair = Pair(tmp_path / "control")
    await pair.start()
    (tmp_path / "node").mkdir()
    node = Backend(StateStore(tmp_path / "node"), DataPlane, configure_os=False)
    try:
        await node.start()
        key = pair.stores[0].create_auth_key(reusable=True, expires=None, now=time.time()).key
        await node.up(",".join(pair.urls), key, "alpha")
        await until(lambda: node.status().control_connected, "the map stream")
        first = node.status()
        assert first.control_url == pair.urls[0] and first.map_stream_starts == {"netmap": 1, "delta": 0}
        me = node.state_data.node_id
        assert me is not None  # the second replica has read the feed that far (it can place a resume point):
        await until(lambda: pair.servers[1].replicas.online(me), "the second replica seeing the node online")
        # a peer joins: a delta to the node, carrying a resume point in the change feed
        await pair.client(pair.urls[1]).register(nkey(), "beta", key)
        await until(lambda: node.netmap is not None and len(node.netmap.peers) == 1, "the peer's delta")
        await pair.servers[0].stop()
        await until(lambda: node.status().control_url == pair.urls[1], "the move to the second replica")
        await until(lambda: node.status().control_connected, "the resumed stream")
        st = node.status()
        assert st.map_stream_starts == {"netmap": 1, "delta": 1}
        assert f"control: {pair.urls[1]} (2 of 2 URLs)" in _render(st)
        _, samples = parse(generate_latest(node_registry(node.status)).decode())
        assert samples[("tailpy_node_control_stream_starts_total", (("start", "delta"),))] == 1
    finally:
        await node.close()
        await pair.stop()
