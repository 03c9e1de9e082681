"""Control's ``GET /metrics``: the exposition parses with prometheus-client's parser, and its values follow
the tailnet (nodes by state, map streams, registrations and failures, delta latency, database statements,
policy compiles, requests by route); non-loopback peers are refused on the main listener and served on
``--metrics-listen``'s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nacl.public
import pytest

from _metrics import Samples, parse, value
from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.metrics import LOOPBACK_ONLY
from tailpy.errors import AuthKeyError
from tailpy.keys import MachinePrivate, NodePublic
from tailpy.metrics import is_loopback, start_metrics_listener

STEP = 5.0


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, Store, str]]:
    store = Store(tmp_path)
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    yield srv, store, f"http://{host}:{port}"
    await srv.stop()
    store.close()


async def scrape(url: str) -> tuple[dict[str, str], Samples]:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


async def test_metrics_follow_the_tailnet(server: tuple[ControlServer, Store, str]) -> None:
    srv, store, url = server
    types, samples = await scrape(url)
    assert types["tailpy_control_nodes"] == "gauge"
    assert types["tailpy_control_map_streams"] == "gauge"
    assert types["tailpy_control_registrations"] == "counter"  # (the parser drops the _total suffix)
    assert types["tailpy_control_registration_failures"] == "counter"
    assert types["tailpy_control_delta_latency_seconds"] == "histogram"
    assert types["tailpy_control_db_operation_duration_seconds"] == "histogram"
    assert types["tailpy_control_policy_compile_seconds"] == "histogram"
    assert types["tailpy_control_http_requests"] == "counter"
    for state in ("online", "offline", "expired", "pending"):
        assert (("tailpy_control_nodes", (("state", state),))) in samples
    assert value(samples, "tailpy_control_map_streams") == 0

    a, b = ControlClient(url, mkey()), ControlClient(url, mkey())
    streams: list[AsyncIterator[Any]] = []
    try:
        key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
        na = await a.register(nkey(), "alpha", key)
        nb = await b.register(nkey(), "beta", key)
        c = ControlClient(url, mkey())
        try:
            with pytest.raises(AuthKeyError):
                await c.register(nkey(), "gamma", "tskey-wrong")
            with pytest.raises(AuthKeyError):  # (no key at all, no interactive login)
                await c.register(nkey(), "delta", None)
        finally:
            await c.close()
        _, samples = await scrape(url)
        assert value(samples, "tailpy_control_registrations_total") == 2
        assert value(samples, "tailpy_control_registration_failures_total", reason="auth_key") == 1
        assert value(samples, "tailpy_control_registration_failures_total", reason="unauthenticated") == 1
        assert not any(name.endswith("_created") for name, _ in samples)
        assert value(samples, "tailpy_control_nodes", state="offline") == 2
        assert value(samples, "tailpy_control_nodes", state="online") == 0

        sa = a.stream_map(na.node_key, [], "alpha")
        sb = b.stream_map(nb.node_key, [], "beta")
        streams += [sa, sb]
        await asyncio.wait_for(sa.__anext__(), STEP)
        await asyncio.wait_for(sb.__anext__(), STEP)
        await asyncio.wait_for(sa.__anext__(), STEP)  # (b online: a delta written to a's stream)
        _, samples = await scrape(url)
        assert value(samples, "tailpy_control_map_streams") == 2
        assert value(samples, "tailpy_control_nodes", state="online") == 2
        assert value(samples, "tailpy_control_delta_latency_seconds_count") >= 1

        store.expire_node(nb.id, time.time())
        srv.admin_changed(nb.id)
        _, samples = await scrape(url)
        assert value(samples, "tailpy_control_nodes", state="expired") == 1

        srv.policy.set('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}', "test")
        _, samples = await scrape(url)
        assert value(samples, "tailpy_control_policy_compile_seconds_count") >= 1
        assert value(samples, "tailpy_control_db_operation_duration_seconds_count", operation="select") > 0
        assert value(samples, "tailpy_control_db_operation_duration_seconds_count", operation="insert") > 0
        ok = value(
            samples,
            "tailpy_control_http_requests_total",
            route="/machine/register",
            method="POST",
            status="200",
        )
        assert ok == 2
        assert value(
            samples, "tailpy_control_http_requests_total", route="/metrics", method="GET", status="200"
        )
    finally:
        for st in streams:
            await st.aclose()  # type: ignore[attr-defined]
        await a.close()
        await b.close()

    async with aiohttp.ClientSession() as http, http.get(url + "/no/such/path") as r:
        assert r.status == 404
    _, samples = await scrape(url)
    assert (
        value(samples, "tailpy_control_http_requests_total", route="unmatched", method="GET", status="404")
        == 1
    )
    assert not any("/no/such" in str(k) for k in samples)  # (raw paths never become labels)
    for method in ("PROPFIND", "BREW", "get"):  # unknown methods (and case variants) are one "other"
        async with aiohttp.ClientSession() as http, http.request(method, url + "/health") as r:
            await r.read()
    _, samples = await scrape(url)
    methods = {dict(k[1]).get("method") for k in samples if k[0] == "tailpy_control_http_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods


async def test_metrics_refused_to_a_remote_peer_on_the_main_listener() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.7") and not is_loopback("2001:db8::1") and not is_loopback(None)
    assert not is_loopback("not-an-address")
    assert "--metrics-listen" in LOOPBACK_ONLY and LOOPBACK_ONLY.count(".") <= 1


async def test_metrics_through_a_reverse_proxy_refused(server: tuple[ControlServer, Store, str]) -> None:
    """A proxy on the same host connects from loopback: its forwarding headers say the client is elsewhere."""
    _, _, url = server
    async with aiohttp.ClientSession() as http:
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            async with http.get(url + "/metrics", headers={header: "192.0.2.7"}) as r:
                assert r.status == 403
                assert await r.text() == LOOPBACK_ONLY


async def test_metrics_listen_serves_anyone(server: tuple[ControlServer, Store, str]) -> None:
    srv, _, _ = server
    runner = await start_metrics_listener(srv.metrics.registry, "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        types, _ = await scrape(f"http://127.0.0.1:{port}")
        assert "tailpy_control_nodes" in types
    finally:
        await runner.cleanup()


async def test_two_servers_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sa, sb = Store(tmp_path / "a"), Store(tmp_path / "b")
    try:
        a, b = ControlServer(sa), ControlServer(sb)
        a.metrics.registrations.inc()
        assert b"tailpy_control_registrations_total 1.0" in a.metrics.exposition()
        assert b"tailpy_control_registrations_total 0.0" in b.metrics.exposition()
    finally:
        sa.close()
        sb.close()
