"""MagicSock's fallback path policy leaves the peers disco drives (MagicSock.disco_peers) alone and still
applies to peers without a disco key (older nodes): a real MagicSock and its policy loop, a recording
stand-in for the data plane."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from tailpy.errors import DeviceError
from tailpy.keys import DiscoPrivate, MachinePrivate, NodePrivate
from tailpy.magicsock import MagicSock
from tailpy.netmap import DerpMap, DerpNode, DerpRegion, NetMap, Node


class Device:
    def __init__(self) -> None:
        self.paths: dict[bytes, str] = {}

    def set_path(self, public_key: bytes, path: Literal["direct", "relay"]) -> None:
        if public_key not in self.paths:
            raise DeviceError("unknown peer")
        self.paths[public_key] = path

    def inject(self, public_key: bytes, datagram: bytes) -> None:
        pass

    def set_peer(
        self, public_key: bytes, *, allowed_ips: list[str], endpoint: str | None = None, **_: Any
    ) -> None:
        pass

    def stats(self) -> dict[str, int]:
        return {"dropped_send_error": 0}

    def peers(self) -> list[dict[str, Any]]:
        return [
            {
                "public_key": k,
                "path": p,
                "endpoint": None,
                "tx_packets": 0,
                "rx_packets": 0,
                "last_handshake": None,
            }
            for k, p in self.paths.items()
        ]


def _node(i: int, key: NodePrivate, disco: bool) -> Node:
    return Node(
        i,
        f"n{i}",
        f"n{i}",
        key.public,
        MachinePrivate.generate().public,
        (f"100.64.0.{i}/32",),
        home_derp=900,
        disco_key=DiscoPrivate.generate().public if disco else None,
    )


async def test_fallback_policy_skips_disco_peers() -> None:
    n = DerpNode(
        "900a", 900, "127.0.0.1", ipv4="127.0.0.1", derp_port=9, stun_port=-1, insecure_for_tests=True
    )
    dm = DerpMap({900: DerpRegion(900, "r900", "", (n,))})
    me, old, new = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    dev = Device()
    dev.paths = {old.public.raw: "direct", new.public.raw: "direct"}  # neither has an endpoint
    ms = MagicSock(dev, me, probe_interval=(3600.0, 3600.0))
    ms.disco_peers = {new.public.raw}
    ms.set_netmap(NetMap(_node(1, me, True), {2: _node(2, old, False), 3: _node(3, new, True)}, derp_map=dm))
    ms.start()
    try:
        for _ in range(300):
            if dev.paths[old.public.raw] == "relay":
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # at least one more policy round
        assert dev.paths[old.public.raw] == "relay"  # no endpoint, no disco: the policy relays it
        assert dev.paths[new.public.raw] == "direct"  # disco decides this one; the policy did not touch it
    finally:
        await ms.close()
