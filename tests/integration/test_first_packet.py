"""The first packets of real traffic get through: two nodes come up at the same moment, and a plain ICMP
``ping`` starts on one the moment its netmap holds the other (no ``tailpy ping``, nothing else to start
path discovery). The first WireGuard handshake goes out while the path is still unknown; it also goes over
DERP, and a pending handshake is sent again as soon as the peer's path or netmap entry changes, so the first
echo requests (queued behind the handshake in the data plane) are answered instead of waiting out WireGuard's
REKEY_TIMEOUT (5 s) for a retry.

The assertion is on the count of lost echo requests: ``ping -c 4 -w 4`` sends one a second and stops at
4 s, less than REKEY_TIMEOUT, so a handshake lost and left to WireGuard's own retry loses all four. At most
the first may be lost (a path still settling). One cell where both nodes go direct across endpoint-independent
NATs, one where they can only meet through DERP.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tailpy.lab import Lab, stop_process, wait_for
from tailpy.lab.matrix import CELLS, Cell
from tailpy.lab.tailnet import LabNode, LabTailnet, local_api_status, tailpy_argv

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        shutil.which("nft") is None, reason="`nft` not found: install the Debian package nftables"
    ),
]

STATS = re.compile(r"(?P<sent>\d+) packets transmitted, (?P<got>\d+) received")
REPLY = re.compile(r"icmp_seq=(?P<seq>\d+) ")
BY_ID = {c.id: c for c in CELLS}


@pytest.fixture(scope="module")
def tailnet() -> Iterator[LabTailnet]:
    with Lab() as lab:
        net = LabTailnet(lab)
        net.start_control()
        yield net


def _peer_ip(a: LabNode, b: LabNode) -> str | None:
    for p in local_api_status(a.socket)["peers"]:
        if p["hostname"] == b.name and p["addresses"]:
            return str(p["addresses"][0]).split("/")[0]
    return None


@pytest.mark.parametrize("cell", [BY_ID["eim-eim"], BY_ID["edm-edm"]], ids=lambda c: c.id)
def test_first_echo_requests_are_answered(tailnet: LabTailnet, cell: Cell) -> None:
    key = tailnet.authkey(reusable=True)
    a = tailnet.add_node(f"fp-{cell.id[:6]}-a", behind=cell.a)
    b = tailnet.add_node(f"fp-{cell.id[:6]}-b", behind=cell.b)
    ups: list[subprocess.Popen[str]] = []
    try:
        for node in (a, b):
            argv = tailpy_argv(
                "up", "--login-server", tailnet.control_url, "--hostname", node.name, "--auth-key", key
            )
            ups.append(node.host.popen([*argv, "--socket", node.socket], stderr=subprocess.PIPE))
        ip = wait_for(lambda: _peer_ip(a, b), timeout=60, what=f"{a.name} to see {b.name}", interval=0.02)
        done = a.host.run(["ping", "-n", "-c", "4", "-w", "4", ip], check=False, timeout=30)
        for up in ups:
            assert up.wait(timeout=60) == 0, up.stderr.read() if up.stderr else ""
        m = STATS.search(done.stdout)
        assert m is not None, done.stdout
        seqs = [int(r["seq"]) for r in REPLY.finditer(done.stdout)]
        lost = int(m["sent"]) - int(m["got"])
        assert seqs and seqs[0] <= 2 and lost <= 1, (
            f"echo requests lost: {lost} of {m['sent']} (replies to {seqs})\n{done.stdout}\n"
            f"{a.name}: {a.log_tail(8)}\n{b.name}: {b.log_tail(8)}"
        )
    finally:
        for up in ups:
            stop_process(up)
        a.stop_daemon()
        b.stop_daemon()
