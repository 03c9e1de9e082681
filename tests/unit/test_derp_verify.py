"""DERP client admission (tailpy.derp.verify, DerpServer(verify_client=...), control's /derp/admit) on
127.0.0.1: real servers and sockets, tailpy's DerpClient as the node."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nacl.public
import pytest
from aiohttp import web

from tailpy.control import ControlServer, Store
from tailpy.derp.client import DerpClient, DerpClientError
from tailpy.derp.server import REFUSED_PREFIX, DerpServer
from tailpy.derp.verify import (
    AdmissionError,
    AdmissionURL,
    control_admission_url,
    local_admission,
)
from tailpy.keys import MachinePrivate, MachinePublic, NodePrivate, NodePublic
from tailpy.proto import derp as proto


def node() -> NodePrivate:
    return NodePrivate(bytes(nacl.public.PrivateKey.generate()))


async def relay(verify: Callable[[NodePublic, str], Awaitable[bool]] | None) -> tuple[DerpServer, str]:
    server = DerpServer(MachinePrivate(bytes(nacl.public.PrivateKey.generate())), verify_client=verify)
    await server.start("127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.addresses[0][1]}/derp"


async def test_known_key_admitted_unknown_refused_with_a_sentence() -> None:
    known, stranger = node(), node()
    asked: list[tuple[NodePublic, str]] = []

    async def verify(key: NodePublic, source: str) -> bool:
        asked.append((key, source))
        return key == known.public

    server, url = await relay(verify)
    try:
        a = await DerpClient.connect(url, known)
        with pytest.raises(DerpClientError, match="refused: this DERP server admits only known nodes"):
            await DerpClient.connect(url, stranger)
        # the admitted client relays as usual
        b_key = node()
        server.verify_client = local_admission(lambda k: k in (known.public, b_key.public))
        b = await DerpClient.connect(url, b_key)
        await a.send(b_key.public, b"hello")
        got = await asyncio.wait_for(b.recv(), 5)
        assert isinstance(got, proto.RecvPacket) and got.src == known.public and got.data == b"hello"
        await a.close()
        await b.close()
        assert (known.public, "127.0.0.1") in asked
        assert server.metrics.refused["not_admitted"] == 1
        assert server.metrics.refused["verify_failed"] == 0
        text = server.metrics.prometheus()
        assert 'derp_clients_refused_total{reason="not_admitted"}' in text
        assert server.connections(stranger.public) == []
    finally:
        await server.stop()


async def test_verifier_failure_fails_closed() -> None:
    async def broken(key: NodePublic, source: str) -> bool:
        raise AdmissionError("admission controller http://192.0.2.1/ is unreachable: test")

    async def slow(key: NodePublic, source: str) -> bool:
        await asyncio.sleep(30)
        return True

    server, url = await relay(broken)
    try:
        with pytest.raises(DerpClientError, match="could not verify"):
            await DerpClient.connect(url, node())
        server.verify_client = slow
        server.verify_timeout = 0.2
        with pytest.raises(DerpClientError, match="could not verify"):
            await DerpClient.connect(url, node())
        assert server.metrics.refused["verify_failed"] == 2
        assert server.metrics.clients == 0
    finally:
        await server.stop()


@pytest.fixture
async def controller() -> AsyncIterator[tuple[str, dict[str, object]]]:
    """A Tailscale-shaped admission controller: Allow for keys in state["allow"]; state["mode"] can make it
    misbehave; every request body is kept in state["seen"]."""
    state: dict[str, object] = {"allow": set(), "mode": "ok", "seen": []}

    async def admit(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen = state["seen"]
        assert isinstance(seen, list)
        seen.append(body)
        mode = state["mode"]
        if mode == "500":
            return web.Response(status=500, text="boom")
        if mode == "junk":
            return web.Response(text="<html>")
        if mode == "noallow":
            return web.json_response({"allow": True})
        allow = state["allow"]
        assert isinstance(allow, set)
        return web.json_response({"Allow": body["NodePublic"] in allow})

    app = web.Application()
    app.router.add_post("/admit", admit)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/admit", state
    finally:
        await runner.cleanup()


async def test_admission_url_speaks_tailscales_protocol_and_caches(
    controller: tuple[str, dict[str, object]],
) -> None:
    url, state = controller
    k1, k2 = node().public, node().public
    state["allow"] = {k1.text()}
    now = [100.0]
    v = AdmissionURL(url, allow_ttl=30, deny_ttl=5, clock=lambda: now[0])
    try:
        assert await v(k1, "192.0.2.7") is True
        assert state["seen"] == [{"NodePublic": k1.text(), "Source": "192.0.2.7"}]
        assert await v(k2, "192.0.2.8") is False
        assert v.requests == 2
        assert await v(k1, "192.0.2.7") is True and await v(k2, "192.0.2.8") is False
        assert v.requests == 2  # both cached
        now[0] += 6  # the refusal expired, the admission did not
        state["allow"] = {k1.text(), k2.text()}
        assert await v(k2, "192.0.2.8") is True and await v(k1, "192.0.2.7") is True
        assert v.requests == 3
        for mode, match in (("500", "HTTP 500"), ("junk", "not JSON"), ("noallow", '"Allow"')):
            state["mode"] = mode
            with pytest.raises(AdmissionError, match=match):
                await v(node().public, "192.0.2.9")
    finally:
        await v.aclose()


async def test_admission_url_unreachable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    v = AdmissionURL(f"http://127.0.0.1:{port}/admit", timeout=2)
    try:
        with pytest.raises(AdmissionError, match="unreachable"):
            await v(node().public, "127.0.0.1")
    finally:
        await v.aclose()


def _machine() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


async def test_control_admit_endpoint_and_relay_verifying_through_it(tmp_path: Path) -> None:
    """tailpy derp serve --verify-clients, in process: the relay asks the control server's /derp/admit."""
    store = Store(tmp_path)
    control = ControlServer(store)
    await control.start("127.0.0.1", 0)
    host, port = control.addresses[0]
    member, stranger = node(), node()
    auth = store.create_auth_key(reusable=True, expires=None, now=time.time())
    registered = store.register(_machine(), member.public, "member", auth.key, time.time())
    control.publish_node(registered.id)
    verifier = AdmissionURL(control_admission_url(f"http://{host}:{port}"), allow_ttl=0, deny_ttl=0)
    server, url = await relay(verifier)
    try:
        c = await DerpClient.connect(url, member)
        await c.close()
        with pytest.raises(DerpClientError, match=REFUSED_PREFIX.strip()):
            await DerpClient.connect(url, stranger)
        # an expired key is refused from then on (answers are not cached here)
        store.expire_node(registered.id, time.time())
        control.admin_changed(registered.id)
        with pytest.raises(DerpClientError, match="admits only known nodes"):
            await DerpClient.connect(url, member)
        assert server.metrics.refused["not_admitted"] == 2
        # the endpoint itself: Tailscale's request and response shapes; bad requests get 400
        import aiohttp

        async with aiohttp.ClientSession() as s:
            admit = control_admission_url(f"http://{host}:{port}")
            async with s.post(admit, json={"NodePublic": stranger.public.text(), "Source": "::1"}) as r:
                assert r.status == 200 and json.loads(await r.text()) == {"Allow": False}
            async with s.post(admit, data=b"{nope") as r:
                assert r.status == 400
            async with s.post(admit, json={"NodePublic": "nodekey:12"}) as r:
                assert r.status == 400
    finally:
        await server.stop()
        await verifier.aclose()
        await control.stop()
        store.close()
