"""The mapper's unit tests without a server: node records (:func:`node`), and one node's side of a mapper
stream (:class:`Client`), which opens what the stream's writer would send now and applies it as
:class:`tailpy.control.client.ControlClient` does."""

from __future__ import annotations

import dataclasses
from typing import Any

import nacl.public

from tailpy.control.client import MapMessage, MapState, apply_message
from tailpy.control.mapper import Mapper
from tailpy.endpoint import Endpoint
from tailpy.keys import MachinePrivate, MachinePublic, NodePublic
from tailpy.netmap import Node
from tailpy.proto import control as proto


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def node(i: int, user: str = "", tags: tuple[str, ...] = (), **kw: Any) -> Node:
    """Node ``i`` (name ``n<i>``, address 100.64.0.<i>, keys made of byte ``i``), with ``kw`` replacing
    fields (``endpoints`` may be given as strings)."""
    base = Node(
        id=i,
        name=f"n{i}",
        hostname=f"n{i}",
        node_key=NodePublic(bytes([i]) * 32),
        machine_key=MachinePublic(bytes([i + 100]) * 32),
        addresses=(f"100.64.0.{i}/32",),
        user=user,
        tags=tags,
    )
    if "endpoints" in kw:
        kw["endpoints"] = tuple(Endpoint.parse(str(e)) for e in kw["endpoints"])
    return dataclasses.replace(base, **kw)


class Client:
    """A stream of node ``node_id`` on ``mapper`` (``resume`` and ``accept`` as
    :meth:`~tailpy.control.mapper.Mapper.open_stream` takes them); :attr:`state` is what its client holds."""

    def __init__(
        self,
        mapper: Mapper,
        node_id: int,
        resume: tuple[str, int] | tuple[str, int, str | None] | None = None,
        accept: tuple[str, ...] = (),
    ) -> None:
        self.key = mkey()
        self.mapper = mapper
        self.stream = mapper.open_stream(node_id, proto.public_of(self.key), "n" * 32, resume, accept)
        self.opener = proto.StreamOpener(self.key, proto.public_of(mapper.server_key), "n" * 32)
        self.state: MapState | None = None
        self.messages: list[MapMessage] = []

    def drain(self) -> list[MapMessage]:
        """What the stream's writer would send now (a full netmap if due, the resumed stream's first delta,
        else one merged delta), applied to :attr:`state`."""
        s, m, bodies = self.stream, self.mapper, []
        if s.resync:
            s.resync, s.first = False, False
            body = m.full_map_body(s.node_id)
            assert body is not None
            m.full_map_sent(s)  # as the writer does after a full netmap
            bodies.append(body)
        if s.first:
            s.first = False
            first = m.delta_body(s, resumed=True)
            assert first is not None
            bodies.append(first)
        if s.sent < m.version:
            body = m.delta_body(s)
            if s.resync:
                return self.drain()
            if body is not None:
                bodies.append(body)
        out = [MapMessage(self.opener.open(s.sealer.seal(b))) for b in bodies]
        for msg in out:
            self.state = apply_message(self.state, msg)
        self.messages += out
        return out

    def peers(self) -> set[int]:
        assert self.state is not None
        return set(self.state.netmap.peers)

    def in_sync(self) -> bool:
        """Whether its client's netmap is the one a new stream would get now."""
        return self.state is not None and self.state.netmap == self.mapper.netmap(self.stream.node_id)
