"""resolv.conf management on a file of the test's own (never /etc/resolv.conf): pointed at MagicDNS, restored
byte for byte, recovered after a crash, left alone when someone else changed it; the host-file guard."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tailpy.dns.osconfig import (
    BACKUP_NAME,
    HEADER,
    ResolvConf,
    check_not_host_file,
    parse_resolv_conf,
    upstreams_from,
)

ORIGINAL = (
    b"# managed by the host\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch corp.example\n"
    b"options edns0 trust-ad\n"
)


@pytest.fixture(autouse=True)
def host_resolv_conf_untouched() -> Iterator[None]:
    """Guard: the machine's own /etc/resolv.conf is the same before and after every test here."""
    path = Path("/etc/resolv.conf")
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    yield
    after = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    assert before == after, "a test modified the machine's /etc/resolv.conf"


def setup(tmp_path: Path) -> tuple[ResolvConf, Path, Path]:
    conf = tmp_path / "resolv.conf"
    conf.write_bytes(ORIGINAL)
    state = tmp_path / "state"
    state.mkdir()
    return ResolvConf(state, conf), conf, state


def test_apply_points_at_magicdns_and_restore_is_exact(tmp_path: Path) -> None:
    rc, conf, state = setup(tmp_path)
    inode = os.stat(conf).st_ino
    rc.apply("100.100.100.100", ["ts.test"])
    text = conf.read_text()
    assert text.startswith(HEADER)
    servers, search, options = parse_resolv_conf(text)
    assert servers == ["100.100.100.100"]
    assert search == ["ts.test", "corp.example"]  # the host's own search domains kept after the tailnet's
    assert options == ["options edns0 trust-ad"]
    assert (state / BACKUP_NAME).read_bytes() == ORIGINAL
    assert os.stat(conf).st_ino == inode  # written in place (a bind mount stays a bind mount)
    rc.apply("100.100.100.100", ["ts.test", "x.example"])  # a new netmap: the copy is not overwritten
    assert (state / BACKUP_NAME).read_bytes() == ORIGINAL
    assert [str(ip) for ip, _ in upstreams_from(rc.original())] == ["192.0.2.53", "2001:db8::53"]
    rc.restore()
    assert conf.read_bytes() == ORIGINAL
    assert not (state / BACKUP_NAME).exists()
    rc.restore()  # idempotent
    assert conf.read_bytes() == ORIGINAL


def test_recover_after_crash(tmp_path: Path) -> None:
    rc, conf, state = setup(tmp_path)
    rc.apply("100.100.100.100", ["ts.test"])
    # The daemon dies here (kill -9): a new one, with a new ResolvConf, finds the copy at start.
    fresh = ResolvConf(state, conf)
    assert fresh.recover()
    assert conf.read_bytes() == ORIGINAL
    assert not fresh.recover()


def test_someone_elses_change_is_left_alone(tmp_path: Path) -> None:
    rc, conf, state = setup(tmp_path)
    rc.apply("100.100.100.100", ["ts.test"])
    conf.write_text("nameserver 198.51.100.1\n")  # e.g. a DHCP client rewrote it meanwhile
    rc.restore()
    assert conf.read_text() == "nameserver 198.51.100.1\n"
    assert not (state / BACKUP_NAME).exists()


def test_upstreams_leave_out_magicdns_and_junk() -> None:
    text = "nameserver 100.100.100.100\nnameserver resolver.example\nnameserver 192.0.2.1 # comment\nbogus\n"
    ups = upstreams_from(text, exclude=[ipaddress.ip_address("100.100.100.100")])
    assert [(str(ip), port) for ip, port in ups] == [("192.0.2.1", 53)]


def test_guard_allows_own_namespace_files(tmp_path: Path) -> None:
    # In the machine's own network namespace nothing is refused (production); a file of our own is never the
    # host's. (The refusing case is exercised in the lab: tests/integration/test_magicdns.py.)
    check_not_host_file(tmp_path / "resolv.conf")
