"""`tailpy demo` tells its story: two sites behind NATs go direct, the site behind a hard NAT is relayed,
names resolve through MagicDNS, and it ends with `tailpy status` and `tailpy netcheck`."""

from __future__ import annotations

import io
import shutil

import pytest
from rich.console import Console

from tailpy.cli.demo import run_demo

pytestmark = pytest.mark.lab


def test_demo_story() -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed: the demo's NAT routers need it")
    out = io.StringIO()
    result = run_demo(0, Console(file=out, width=200))
    text = out.getvalue()
    assert result["paths"] == {"alpha-beta": "direct", "gamma-alpha": "relay"}, text
    assert all(p["loss_percent"] is not None and p["loss_percent"] < 100 for p in result["pings"]), text
    assert "alpha$ tailpy status" in text and "gamma$ tailpy netcheck" in text
    status = text.split("alpha$ tailpy status", 1)[1].split("gamma$ tailpy netcheck", 1)[0]
    assert "direct " in status and 'relay "' in status, status
    assert "UDP" in text.split("gamma$ tailpy netcheck", 1)[1], text
    assert "cleaned up" in text
