"""`tailpy ping` (tailpy.cli.ping) as a user runs it: the real CLI in a subprocess against a local API on a
real unix socket that answers like tailpyd (scripted pongs), and against no daemon at all."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

PEER = {"name": "b", "fqdn": "b.tailnet.internal", "ip": "100.64.0.2"}


def derp(rtt: float = 0.003) -> dict[str, Any]:
    return {
        "peer": PEER,
        "direct": False,
        "via": "DERP(tailpy)",
        "rtt": rtt,
        "peer_saw": None,
        "timeout": False,
    }


def direct(rtt: float = 0.001) -> dict[str, Any]:
    return {
        "peer": PEER,
        "direct": True,
        "via": "198.51.100.7:41641",
        "rtt": rtt,
        "peer_saw": "203.0.113.5:41641",
        "timeout": False,
    }


def timeout() -> dict[str, Any]:
    return {"peer": PEER, "direct": False, "via": "", "rtt": None, "peer_saw": None, "timeout": True}


Script = list[Callable[[], dict[str, Any]]]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, Script, list[dict[str, Any]]]]:
    script: Script = []
    asked: list[dict[str, Any]] = []

    async def ping(request: web.Request) -> web.Response:
        body = await request.json()
        asked.append(body)
        if body["target"] == "nosuch":
            return web.json_response(
                {"error": "no peer 'nosuch' in this tailnet (see `tailpy status`)"}, status=404
            )
        return web.json_response(script.pop(0)() if script else timeout())

    app = web.Application()
    app.router.add_post("/localapi/v0/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "tailpyd.sock")
    await web.UnixSite(runner, sock).start()
    yield sock, script, asked
    await runner.cleanup()


async def tailpy(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tailpy.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_until_direct_stops_at_the_first_direct_pong(
    api: tuple[str, Script, list[dict[str, Any]]],
) -> None:
    sock, script, asked = api
    script += [derp, derp, direct, derp]
    code, out, err = await tailpy("ping", "b", "-c", "10", "--timeout", "2", "--socket", sock)
    assert code == 0, err
    assert out.splitlines() == [
        "pong from b (100.64.0.2) via DERP(tailpy) in 3ms",
        "pong from b (100.64.0.2) via DERP(tailpy) in 3ms",
        "pong from b (100.64.0.2) via 198.51.100.7:41641 in 1ms",
    ]
    assert len(asked) == 3 and asked[0] == {"target": "b", "timeout": 2.0}


async def test_never_direct_is_one_sentence_and_exit_1(api: tuple[str, Script, list[dict[str, Any]]]) -> None:
    sock, script, _ = api
    script += [derp, timeout, derp]
    code, out, err = await tailpy("ping", "100.64.0.2", "-c", "3", "--socket", sock)
    assert code == 1
    assert "timeout waiting for pong from b (100.64.0.2)" in out and out.count("via DERP(tailpy)") == 2
    assert err.startswith("tailpy: direct connection not established with b after 3 pings")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_no_until_direct_counts_every_pong_and_json(
    api: tuple[str, Script, list[dict[str, Any]]],
) -> None:
    sock, script, asked = api
    script += [direct, direct]
    code, out, err = await tailpy("ping", "b", "-c", "2", "--no-until-direct", "--json", "--socket", sock)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["direct"] is True and len(doc["pongs"]) == 2 and doc["peer"] == PEER
    assert doc["pongs"] == [direct(), direct()]  # each pong as tailpyd answered it
    assert len(asked) == 2


async def test_no_reply_and_unknown_peer_and_no_daemon(
    api: tuple[str, Script, list[dict[str, Any]]], tmp_path: Path
) -> None:
    sock, _, _ = api
    code, _, err = await tailpy("ping", "b", "-c", "2", "--timeout", "0.5", "--socket", sock)
    assert code == 1 and "no pong from b in 2 pings" in err
    code, _, err = await tailpy("ping", "nosuch", "--socket", sock)
    assert code == 1 and "no peer 'nosuch'" in err and "Traceback" not in err
    code, _, err = await tailpy("ping", "b", "--socket", str(tmp_path / "none.sock"))
    assert code == 1 and "tailpyd is not running" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "0.05", "61"])
async def test_timeout_out_of_range_nan_and_inf_are_click_usage_errors(value: str, tmp_path: Path) -> None:
    code, out, err = await tailpy("ping", "b", "--timeout", value, "--socket", str(tmp_path / "none.sock"))
    assert code == 2 and out == ""
    assert "Invalid value for '--timeout'" in err and "is not in the range 0.1<=x<=60." in err
    assert "Traceback" not in err
