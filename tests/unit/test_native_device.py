"""``tailpy._native.Device``: argument errors (raised before any TUN is made), and one real device inside a
throwaway network namespace (root only; never in the machine's own namespace): peers, queues, the packet
filter's rules and refusals, close."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from tailpy import _native
from tailpy.errors import ConfigError, InvalidKeyError


def test_device_rejects_short_private_key() -> None:
    with pytest.raises(InvalidKeyError, match="private key must be 32 bytes, got 31"):
        _native.Device(b"\x01" * 31)


def test_device_rejects_bad_mtu_and_port() -> None:
    key = _native.generate_private_key()
    with pytest.raises(ConfigError, match="mtu must be between 576 and 65535, got 100"):
        _native.Device(key, mtu=100)
    with pytest.raises(ConfigError, match="listen_port must be between 0 and 65535, got 70000"):
        _native.Device(key, listen_port=70000)


def test_device_rejects_bad_tun_name() -> None:
    with pytest.raises(ConfigError, match="TUN name"):
        _native.Device(_native.generate_private_key(), tun_name="x" * 16)


# Runs inside the namespace: a real TUN and socket, peers, queues, close.
_IN_NETNS = textwrap.dedent(
    """
    import os, select, subprocess
    from tailpy import _native
    from tailpy.errors import ConfigError, DeviceError, InvalidKeyError

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    dev = _native.Device(_native.generate_private_key(), tun_name="tpytest0", mtu=1400)
    link = subprocess.run(["ip", "-o", "link", "show", "tpytest0"], capture_output=True, text=True)
    assert "mtu 1400" in link.stdout, link.stdout
    assert dev.tun_name == "tpytest0" and dev.listen_port > 0 and len(dev.public_key) == 32
    try:
        _native.Device(_native.generate_private_key(), tun_name="tpytest1", listen_port=dev.listen_port)
        raise AssertionError("port reuse not refused")
    except DeviceError as e:
        assert "already in use" in str(e), e

    peer = _native.public_key(_native.generate_private_key())
    dev.set_peer(peer, allowed_ips=["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], endpoint="127.0.0.1:9",
                 persistent_keepalive=25)
    [p] = dev.peers()
    assert p["public_key"] == peer and p["endpoint"] == "127.0.0.1:9" and p["path"] == "direct", p
    assert p["allowed_ips"] == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], p
    assert p["persistent_keepalive"] == 25 and p["last_handshake"] is None, p
    dev.set_path(peer, "relay")
    assert dev.peers()[0]["path"] == "relay"
    for bad, cls in [(lambda: dev.set_peer(b"\\0" * 32, allowed_ips=[]), InvalidKeyError),
                     (lambda: dev.set_peer(peer, allowed_ips=["10.0.0.0/99"]), ConfigError),
                     (lambda: dev.set_peer(peer, allowed_ips=[], endpoint="nowhere"), ConfigError),
                     (lambda: dev.set_path(peer, "carrier pigeon"), ConfigError),
                     (lambda: dev.set_path(b"\\1" * 32, "direct"), DeviceError)]:
        try:
            bad()
            raise AssertionError("not refused")
        except cls:
            pass

    # A STUN binding request sent to ourselves comes back up through the queue.
    stun = bytes([0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42]) + bytes(12)
    dev.send_datagram(stun, f"127.0.0.1:{dev.listen_port}")
    dev.send_datagram(stun, f"[::1]:{dev.listen_port}")
    got = []
    while len(got) < 2:
        r, _, _ = select.select([dev.fileno()], [], [], 5)
        assert r, "eventfd never became readable"
        datagrams, relay = dev.drain()
        got += datagrams
    port = dev.listen_port
    assert {ep for _, ep in got} == {f"127.0.0.1:{port}", f"[::1]:{port}"}, got
    assert all(payload == stun for payload, _ in got)
    assert dev.stats()["to_python"] == 2

    # The tester's flood: disco-looking datagrams too large to be disco are counted, never queued. Sent one
    # at a time (each waits until the device has read the last): a burst of 1.3 MB would overflow the
    # socket's receive buffer and the kernel, not the device, would drop some.
    before = dev.stats()

    def send_and_wait(payload):
        seen = dev.stats()["rx_datagrams"]
        dev.send_datagram(payload, f"127.0.0.1:{dev.listen_port}")
        for _ in range(500):
            if dev.stats()["rx_datagrams"] > seen:
                return
            select.select([], [], [], 0.01)
        raise AssertionError("the device never read a datagram sent to it")

    for _ in range(20):
        send_and_wait(b"TS\\xf0\\x9f\\x92\\xac" + os.urandom(65000))
    send_and_wait(b"TS\\xf0\\x9f\\x92\\xac" + bytes(2042))  # 2048 bytes: fits
    after = dev.stats()
    assert after["dropped_malformed"] - before["dropped_malformed"] == 20, after
    assert after["to_python"] - before["to_python"] == 1, after
    assert [len(p) for p, _ in dev.drain()[0]] == [2048]
    assert after["handshakes_for_unknown_index"] == 0, after

    # The packet filter: none at first, rules in tailcfg.FilterRule's parts, refused ones leave it as it was.
    assert dev.stats()["filter"]["rules"] is None
    dev.set_filter([(["100.64.0.0/10", "*"], [("100.64.0.1/32", 22, 22)], [6]),
                    (["10.0.0.1-10.0.0.9"], [], [])])
    f = dev.stats()["filter"]
    assert f["rules"] == 2 and f["dropped_no_rule"] == 0 and f["udp_flows"] == 0, f
    for rules, cls in [([(["nonsense"], [], [])], ConfigError),
                       ([(["*"], [("*", 9, 1)], [])], ConfigError),
                       ([(["*"], [("*", 0, 70000)], [])], OverflowError),
                       ([(["*"], [], [300])], OverflowError)]:
        try:
            dev.set_filter(rules)
            raise AssertionError(f"{rules} not refused")
        except cls:
            pass
    assert dev.stats()["filter"]["rules"] == 2
    dev.set_filter([])
    assert dev.stats()["filter"]["rules"] == 0
    dev.set_filter(None)
    assert dev.stats()["filter"]["rules"] is None

    assert dev.remove_peer(peer) and not dev.remove_peer(peer)
    dev.close()
    dev.close()
    gone = subprocess.run(["ip", "link", "show", "tpytest0"], capture_output=True)
    assert gone.returncode != 0, "TUN still there after close"
    print("OK")
    """
)


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_real_device_in_a_namespace() -> None:
    ns = f"tpy-r-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _IN_NETNS],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
