"""The control process as a library (tailpy.control.service): one ControlProcess runs control, the embedded
DERP relay, its STUN server and the admin socket in the caller's event loop, and stops them all."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tailpy.control import ControlConfig, ControlProcess, run_control
from tailpy.control.admin import SOCKET_NAME
from tailpy.errors import ConfigError
from tailpy.netmap import DerpMap


def _config(state_dir: Path, **kw: object) -> ControlConfig:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "derp_host": "127.0.0.1",
        "derp_port": 0,
        "stun_port": 0,
    }
    return ControlConfig(state_dir=state_dir, **{**base, **kw})  # type: ignore[arg-type]


async def test_start_runs_every_part_and_stop_ends_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tailpy.control")
    process = ControlProcess(_config(tmp_path / "state", domain="ts.example"))
    await process.start()
    try:
        assert process.addresses and process.addresses[0][0] == "127.0.0.1"
        assert (tmp_path / "state" / SOCKET_NAME).exists()
        assert process.relay is not None and process.stun_server is not None
        dm = process.derp_map
        assert dm is not None and list(dm.regions) == [900]
        (node,) = dm.regions[900].nodes
        assert node.derp_port == process.relay.addresses[0][1]
        assert node.stun_port == process.stun_server.addresses[0][1] and node.ipv4 == "127.0.0.1"
        assert process.store is not None and process.store.settings().domain == "ts.example"
        lines = [r.getMessage() for r in caplog.records]
        assert lines[0].startswith("control server listening on http://127.0.0.1:"), lines
        assert "embedded DERP relay listening on" in lines[1] and "DERP map: 900" in lines
    finally:
        await process.stop()
    assert process.server is None and process.relay is None and process.store is None
    await process.stop()  # twice is fine


async def test_no_derp_serves_the_external_map_only(tmp_path: Path) -> None:
    external = DerpMap.from_json(
        {
            "Regions": {
                "1": {
                    "RegionID": 1,
                    "RegionCode": "x",
                    "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "d.example"}],
                }
            }
        }
    )
    process = ControlProcess(_config(tmp_path, derp=False, derp_map=external))
    await process.start()
    try:
        assert process.relay is None and process.stun_server is None and process.derp_map == external
    finally:
        await process.stop()


async def test_bad_settings_are_one_sentence_and_leave_nothing_running(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--derp-region-id must be a positive integer"):
        await ControlProcess(_config(tmp_path, derp_region_id=0)).start()
    with pytest.raises(ConfigError, match="does not exist"):
        await ControlProcess(_config(tmp_path / "no" / "such")).start()
    process = ControlProcess(_config(tmp_path, prefix_v4="10.0.0.0/8"))
    with pytest.raises(ConfigError, match="must lie within"):
        await process.start()
    assert process.store is None and process.relay is None and process.stun_server is None


async def test_run_control_until_the_stop_event(tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_control(_config(tmp_path), stop))
    for _ in range(200):
        if (tmp_path / SOCKET_NAME).exists():
            break
        await asyncio.sleep(0.05)
    assert (tmp_path / SOCKET_NAME).exists()
    stop.set()
    await asyncio.wait_for(task, 30)
