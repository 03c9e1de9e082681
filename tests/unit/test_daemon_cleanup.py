"""Crash cleanup touches only what its own dead daemon recorded, and tailpyd never takes over a socket
another daemon answers on."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tailpy.daemon import cleanup as cl
from tailpy.daemon import netfilter, router
from tailpy.daemon.api import serve
from tailpy.daemon.lock import RunRecord
from tailpy.errors import ConfigError


class FakeIp:
    """``ip`` as cleanup runs it: MagicDNS addresses on lo, no TUNs; records every command."""

    def __init__(self, del_rc: int = 0) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.del_rc = del_rc
        self.routers: list[tuple[str, Path | None]] = []  # router.cleanup_leftovers calls: (tun, record)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[:3] == ("-j", "addr", "show"):
            out = '[{"addr_info": [{"local": "100.100.100.100"}, {"local": "fd7a:115c:a1e0::53"}]}]'
            return subprocess.CompletedProcess(args, 0, out, "")
        if "del" in args and "addr" in args:
            return subprocess.CompletedProcess(
                args, self.del_rc, "", "RTNETLINK answers: Operation not permitted"
            )
        return subprocess.CompletedProcess(args, 1, "", "Device does not exist")

    def deleted(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if "addr" in c and "del" in c]


@pytest.fixture
def fake_ip(monkeypatch: pytest.MonkeyPatch) -> FakeIp:
    ip = FakeIp()
    monkeypatch.setattr(cl, "_ip", ip)
    monkeypatch.setattr(netfilter, "delete_table", lambda table: False)

    def leftovers(tun: str, record: Path | None = None) -> list[str]:
        ip.routers.append((tun, record))
        return [f"removed {tun}'s policy routing rules"]

    monkeypatch.setattr(router, "cleanup_leftovers", leftovers)  # this test's namespace is the machine's
    return ip


def test_start_after_clean_exit_leaves_another_daemons_magicdns(
    fake_ip: FakeIp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second daemon (its own state dir, another TUN or userspace) starting while a TUN daemon serves
    MagicDNS removes nothing: its previous run exited cleanly (no record), so there is nothing of its own."""
    monkeypatch.setattr(cl, "magicdns_in_use", lambda: False)
    assert cl.cleanup_after(str(tmp_path), None) == []
    assert cl.cleanup_after(str(tmp_path), RunRecord(pid=42, tun="")) == []  # a userspace one
    assert fake_ip.deleted() == []


def test_crashed_daemons_cleanup_spares_magicdns_another_daemon_serves(
    fake_ip: FakeIp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cl, "magicdns_in_use", lambda: True)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 100.100.100.100\n")
    done = cl.cleanup(tmp_path, ("tailpy9",), resolv_conf=resolv)
    assert fake_ip.deleted() == [] and not any("lo" in d for d in done)
    assert resolv.read_text() == "nameserver 100.100.100.100\n"


def test_crashed_daemons_magicdns_is_removed_when_no_one_serves_it(
    fake_ip: FakeIp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cl, "magicdns_in_use", lambda: False)
    done = cl.cleanup_after(str(tmp_path), RunRecord(pid=42, tun="tailpy9"))
    assert len(fake_ip.deleted()) == 2
    assert "removed 100.100.100.100 from lo" in done
    # The dead daemon's routing goes too (its rules, table 52, the forwarding sysctls it recorded).
    assert fake_ip.routers == [("tailpy9", tmp_path / router.FORWARDING_RECORD)]
    assert "removed tailpy9's policy routing rules" in done


def test_failed_address_removal_is_not_reported_as_done(
    fake_ip: FakeIp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cl, "magicdns_in_use", lambda: False)
    fake_ip.del_rc = 2
    done = cl.cleanup(tmp_path, ("tailpy9",), resolv_conf=tmp_path / "resolv.conf")
    assert len(fake_ip.deleted()) == 2 and not any("removed" in d and "lo" in d for d in done)


def test_magicdns_in_use_sees_a_bound_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/proc/net/udp's local_address (little-endian words on x86) decodes to the MagicDNS address."""
    net = tmp_path / "net"
    net.mkdir()
    header = "  sl  local_address rem_address   st\n"
    (net / "udp").write_text(header + "   0: 0100007F:0035 00000000:0000 07\n")
    real_path = Path

    def fake_path(*parts: Any) -> Path:
        if parts and parts[0] == "/proc/net":
            return net.joinpath(*parts[1:])
        return real_path(*parts)

    monkeypatch.setattr(cl, "Path", fake_path)
    assert not cl.magicdns_in_use()
    word = (
        socket.inet_aton("100.100.100.100")[::-1].hex().upper() if sys.byteorder == "little" else "64646464"
    )
    (net / "udp").write_text(header + f"   0: {word}:0035 00000000:0000 07\n")
    assert cl.magicdns_in_use()


async def test_serve_refuses_a_socket_another_daemon_answers_on(tmp_path: Path) -> None:
    path = str(tmp_path / "tailpyd.sock")
    first = await serve(web.Application(), path)
    try:
        with pytest.raises(ConfigError, match="another tailpyd is listening on"):
            await serve(web.Application(), path)
        _, writer = await asyncio.open_unix_connection(path)  # the first one still answers
        writer.close()
        await writer.wait_closed()
    finally:
        await first.cleanup()
    # a stale socket file (nothing listening) is replaced
    second = await serve(web.Application(), path)
    await second.cleanup()


def test_down_after_a_crash_finds_the_state_dir_beside_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tailpy down --socket S` (no --state-dir) after kill -9 of the tailpyd that served on S runs the
    same cleanup as `tailpyd --cleanup` for that daemon's state directory, and says what it removed."""
    from click.testing import CliRunner

    from tailpy.cli import down as down_cli
    from tailpy.daemon.lock import LOCK_FILE, state_dir_of_socket, write_state_dir_pointer

    state, sock = tmp_path / "node-state", str(tmp_path / "run" / "tailpyd.sock")
    state.mkdir()
    (state / LOCK_FILE).write_text(json.dumps({"pid": 4242, "tun": "tailpy7", "socket": sock}))
    write_state_dir_pointer(sock, state)  # what tailpyd writes when it starts
    assert state_dir_of_socket(sock) == str(state)
    calls: list[tuple[str, RunRecord | None]] = []

    def fake_cleanup(state_dir: str, prev: RunRecord | None) -> list[str]:
        calls.append((state_dir, prev))
        return ["restored /etc/resolv.conf", "removed tailpy7's policy routing rules"]

    monkeypatch.setattr(down_cli, "cleanup_after", fake_cleanup)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("TAILPY_STATE_DIR", str(tmp_path / "default-state"))
    out = CliRunner().invoke(down_cli.command, ["--socket", sock])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == (
        "tailpyd is not running: cleaned up after it: restored /etc/resolv.conf; "
        "removed tailpy7's policy routing rules"
    )
    assert calls == [(str(state), RunRecord(pid=4242, tun="tailpy7", socket=sock))]

    # Not root: says so instead of "nothing to stop".
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = CliRunner().invoke(down_cli.command, ["--socket", sock])
    assert out.exit_code != 0 and "did not exit cleanly: run `tailpy down` as root" in str(out.exception)
    # An explicit --state-dir wins over the record beside the socket.
    out = CliRunner().invoke(down_cli.command, ["--socket", sock, "--state-dir", str(tmp_path / "other")])
    assert out.exit_code == 0 and out.output.strip().endswith("nothing to stop")
