"""Disco wire compatibility with Tailscale's own code: datagrams sealed by tailscale.com/disco (v1.102.3)
open in tailpy, and tailpy's open in Tailscale's. The Go side is ``disco_interop.go`` beside this file, built
once with ``go build`` against the pinned module and cached; without a Go toolchain (or if the build fails)
the tests skip saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailpy.keys import DiscoPrivate, NodePrivate
from tailpy.magicsock.disco import DiscoNode, PeerInfo, SendUDP
from tailpy.proto import disco
from tailpy.proto.disco import CallMeMaybe, Endpoint, Ping, Pong

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tailscale_go import TAILSCALE_VERSION, _last_error_line, build_lock, cache_dir

pytestmark = pytest.mark.interop

SOURCE = Path(__file__).with_name("disco_interop.go")
BUILD_TIMEOUT = 900.0


def build() -> Path | str:
    """The disco_interop binary (built or cached), or a reason to skip."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + TAILSCALE_VERSION.encode()).hexdigest()[:16]
    out = cache_dir().parent / f"disco-interop-{tag}"
    binary = out / "disco-interop"
    with build_lock(out):  # parallel test workers build it once
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        go = shutil.which("go")
        if go is None:
            return "no Go toolchain ('go' is not on PATH) to build the disco interop helper"
        return _build(go, src, out, binary)


def _build(go: str, src: bytes, out: Path, binary: Path) -> Path | str:
    (out / "main.go").write_bytes(src)
    (out / "go.mod").write_text(
        f"module tailpy.test/discointerop\n\ngo 1.26.6\n\nrequire tailscale.com {TAILSCALE_VERSION}\n"
    )
    env = dict(os.environ, GOFLAGS="-mod=mod", GOTOOLCHAIN="local", CGO_ENABLED="0")
    for cmd in ([go, "mod", "tidy"], [go, "build", "-o", str(binary), "."]):
        try:
            proc = subprocess.run(
                cmd,
                cwd=out,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"'{' '.join(cmd[1:3])}' of the disco interop helper took over {BUILD_TIMEOUT:g} s"
        if proc.returncode != 0:
            return f"building the disco interop helper failed: {_last_error_line(proc.stderr)}"
    return binary


class GoDisco:
    """The Go helper as a subprocess: one JSON line in, one out. Killed by pid at the end."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def call(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the Go helper exited"
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def go() -> Iterator[GoDisco]:
    b = build()
    if isinstance(b, str):
        pytest.skip(b)
    g = GoDisco(b)
    try:
        yield g
    finally:
        g.close()


TS = DiscoPrivate.generate()  # the Tailscale (Go) side's disco key
PY = DiscoPrivate.generate()  # tailpy's
NODE = NodePrivate.generate().public
TXID = bytes(range(100, 112))


def go_seal(go: GoDisco, **msg: Any) -> bytes:
    r = go.call(op="seal", priv=TS.raw.hex(), peer=PY.public.raw.hex(), **msg)
    assert "error" not in r, r
    return bytes.fromhex(r["datagram"])


def go_open(go: GoDisco, datagram: bytes) -> dict[str, Any]:
    return go.call(op="open", priv=TS.raw.hex(), datagram=datagram.hex())


def test_go_sealed_messages_open_in_tailpy(go: GoDisco) -> None:
    d = go_seal(go, type="ping", txid=TXID.hex(), nodekey=NODE.raw.hex(), padding=7)
    assert disco.open_datagram(PY, d) == (TS.public, Ping(TXID, NODE, 7))
    d = go_seal(go, type="ping", txid=TXID.hex())
    assert disco.open_datagram(PY, d) == (TS.public, Ping(TXID, None, 0))
    d = go_seal(go, type="pong", txid=TXID.hex(), src="198.51.100.4:41641")
    assert disco.open_datagram(PY, d)[1] == Pong(TXID, Endpoint.parse("198.51.100.4:41641"))
    d = go_seal(go, type="pong", txid=TXID.hex(), src="[2001:db8::9]:5")
    assert disco.open_datagram(PY, d)[1] == Pong(TXID, Endpoint.parse("[2001:db8::9]:5"))
    eps = ["192.0.2.1:41641", "[2001:db8::1]:41641", "198.18.0.7:1"]
    d = go_seal(go, type="cmm", eps=eps)
    assert disco.open_datagram(PY, d)[1] == CallMeMaybe(tuple(Endpoint.parse(e) for e in eps))
    assert disco.open_datagram(PY, go_seal(go, type="cmm", eps=[]))[1] == CallMeMaybe(())


def test_tailpy_sealed_messages_open_in_go(go: GoDisco) -> None:
    r = go_open(go, disco.seal(PY, TS.public, Ping(TXID, NODE, 3)))
    assert r == {
        "sender": PY.public.raw.hex(),
        "type": "ping",
        "txid": TXID.hex(),
        "nodekey": NODE.raw.hex(),
        "padding": 3,
    }
    r = go_open(go, disco.seal(PY, TS.public, Pong(TXID, Endpoint.parse("[2001:db8::2]:41641"))))
    assert (r["type"], r["txid"], r["src"]) == ("pong", TXID.hex(), "[2001:db8::2]:41641")
    r = go_open(go, disco.seal(PY, TS.public, Pong(TXID, Endpoint.parse("203.0.113.9:65535"))))
    assert r["src"] == "203.0.113.9:65535"  # IPv4-mapped on the wire, plain IPv4 after Go's Unmap
    eps = ("192.0.2.1:41641", "[2001:db8::1]:41641")
    r = go_open(go, disco.seal(PY, TS.public, CallMeMaybe(tuple(Endpoint.parse(e) for e in eps))))
    assert (r["type"], r["eps"]) == ("cmm", list(eps))
    # A datagram sealed to someone else does not open in Go either.
    r = go_open(go, disco.seal(PY, DiscoPrivate.generate().public, Ping(TXID, NODE)))
    assert r == {"error": "box does not open"}


def test_disco_node_answers_a_tailscale_ping(go: GoDisco) -> None:
    node = DiscoNode(PY, NodePrivate.generate().public)
    node.on_netmap([PeerInfo(NODE, TS.public, (Endpoint.parse("192.0.2.50:41641"),))], 0.0)
    ping = go_seal(go, type="ping", txid=TXID.hex(), nodekey=NODE.raw.hex())
    (reply,) = node.feed(ping, Endpoint.parse("192.0.2.50:41641"), 1.0)
    assert isinstance(reply, SendUDP) and str(reply.endpoint) == "192.0.2.50:41641"
    r = go_open(go, reply.datagram)
    want = ("pong", TXID.hex(), "192.0.2.50:41641", PY.public.raw.hex())
    assert (r["type"], r["txid"], r["src"], r["sender"]) == want
