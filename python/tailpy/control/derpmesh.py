"""The embedded DERP relays of control replicas as one DERP region: a mesh that follows the live replicas, and
the DERP map that lists them.

Each replica records its relay in its row of the ``replicas`` table (a one-node
:class:`~tailpy.netmap.DerpRegion`, JSON; :mod:`tailpy.control.replicas`). After every heartbeat
:meth:`RelayMesh.update` gets the relays of the live replicas and

* meshes this relay with every other relay of its region (:class:`tailpy.derp.mesh.Mesh`, derper's protocol:
  WatchConns, PeerPresent/PeerGone, ForwardPacket), adding the ones that came and dropping the ones whose
  replica stopped beating; the mesh key is the database's (:func:`~tailpy.control.store.changes.
  shared_mesh_key`, made once) or ``--mesh-psk-file``'s. Relays given with ``--mesh-with`` (standalone
  ``tailpy derp serve`` or Tailscale's derper) stay peers throughout.
* makes the DERP map control serves (:func:`replicas_derp_map`): every live replica's relay is a node of its
  region, this replica's own first (its nodes use its relay, the others are the fallbacks magicsock dials
  when that one fails, as derphttp's ``dialRegion`` walks a region's nodes), so nodes spread over the relays
  as they spread over the replicas, and the mesh carries packets between relays.

Tailscale runs several meshed derper servers per region the same way (``cmd/derper --mesh-with``); its
control plane lists them as the region's nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import string
from collections.abc import Callable, Mapping, Sequence

from tailpy.derp.mesh import Mesh, start_mesh
from tailpy.derp.relay import Relay
from tailpy.errors import ParseError
from tailpy.netmap import DerpMap, DerpRegion

log = logging.getLogger("tailpy.control")


def relay_record(region: DerpRegion) -> str:
    """The JSON a replica records for its relay (``region``: one region, its relay as the one node)."""
    return json.dumps(region.to_json(), sort_keys=True, separators=(",", ":"))


def parse_record(text: str) -> DerpRegion | None:
    """The region a replica recorded (:func:`relay_record`); None when it does not parse or has no node."""
    try:
        region = DerpRegion.from_json(json.loads(text))
    except (ValueError, TypeError, KeyError, ParseError):
        return None
    return region if region.nodes else None


def _node_name(region_id: int, index: int) -> str:
    """``900a``, ``900b``, ... ``900z``, then ``900-27``, ...: Tailscale's node naming."""
    return f"{region_id}{string.ascii_lowercase[index]}" if index < 26 else f"{region_id}-{index + 1}"


def replicas_derp_map(
    own_id: str, relays: Mapping[str, str], static: DerpMap | None = None
) -> tuple[DerpMap, list[str]]:
    """The DERP map of the live replicas' relays (``relays``: replica id -> recorded region; ``own_id``'s
    must be among them) merged with ``static`` (``--derp-map``), and the URLs of the other relays in
    ``own_id``'s region (the mesh peers). Each region lists its relays ordered this replica's first, then
    by replica id; node names (``900a``, ``900b``...) follow the replica ids' order, so every replica names a
    relay alike. A region a replica took from ``static`` is left out (``static`` wins)."""
    parsed = {rid: r for rid, r in ((rid, parse_record(text)) for rid, text in relays.items()) if r}
    own = parsed[own_id]
    by_region: dict[int, list[tuple[str, DerpRegion]]] = {}
    for rid in sorted(parsed):
        r = parsed[rid]
        if static is not None and r.region_id in static.regions:
            continue
        by_region.setdefault(r.region_id, []).append((rid, r))
    regions: dict[int, DerpRegion] = {}
    peers: list[str] = []
    for region_id, members in by_region.items():
        named = [
            (rid, dataclasses.replace(r.nodes[0], name=_node_name(region_id, i), region_id=region_id))
            for i, (rid, r) in enumerate(members)
        ]
        named.sort(key=lambda m: m[0] != own_id)  # (stable: this replica's first, then by id)
        head = own if own.region_id == region_id else members[0][1]
        nodes = tuple(n for _, n in named)
        regions[region_id] = DerpRegion(region_id, head.region_code, head.region_name, nodes)
        if region_id == own.region_id:
            peers = [n.url() for rid, n in named if rid != own_id]
    derp_map = DerpMap(regions)
    return (derp_map.merged(static) if static is not None else derp_map), peers


class RelayMesh:
    """A control replica's embedded relay in the mesh of its region and in the DERP map (see the module
    docstring).

    ``relay``: the running relay; ``replica_id``, ``own``: this replica and its relay's one-node region;
    ``static_map``: external relays (``--derp-map``); ``mesh_key``: 32 bytes (None: no mesh: a single
    process without ``--mesh-psk-file``); ``static_peers``: DERP URLs always meshed with (``--mesh-with``);
    ``on_map``: called with the new DERP map when it changes. :attr:`derp_map` is the current one."""

    def __init__(
        self,
        relay: Relay,
        replica_id: str,
        own: DerpRegion,
        *,
        static_map: DerpMap | None,
        mesh_key: bytes | None,
        static_peers: Sequence[str] = (),
        on_map: Callable[[DerpMap], None] | None = None,
        base: float = 0.5,
        cap: float = 5.0,
    ) -> None:
        self.relay = relay
        self.replica_id = replica_id
        self.own = own
        self.record = relay_record(own)
        self.static_map = static_map
        self.static_peers = list(static_peers)
        self.on_map = on_map
        self.derp_map, _ = replicas_derp_map(replica_id, {replica_id: self.record}, static_map)
        self.mesh: Mesh | None = None
        if mesh_key is not None:
            self.mesh = start_mesh(relay, self.static_peers, mesh_key, base=base, cap=cap)
        self._removals: set[asyncio.Task[bool]] = set()

    def update(self, relays: Mapping[str, str]) -> None:
        """The live replicas' relays now (replica id -> recorded region; this replica's is added when
        missing): mesh with the other relays of this region, drop the gone ones, and publish a changed
        DERP map."""
        relays = {**relays, self.replica_id: self.record}
        derp_map, peers = replicas_derp_map(self.replica_id, relays, self.static_map)
        if self.mesh is not None:
            want = [*self.static_peers, *(u for u in peers if u not in self.static_peers)]
            for url in want:
                if url not in self.mesh.urls:
                    log.info("DERP mesh: joining the relay of a control replica at %s", url)
                    self.mesh.add(url)
            for url in self.mesh.urls:
                if url not in want:
                    log.info("DERP mesh: the relay at %s left (its control replica stopped)", url)
                    task = asyncio.get_running_loop().create_task(self.mesh.remove(url))
                    self._removals.add(task)
                    task.add_done_callback(self._removals.discard)
        if derp_map != self.derp_map:
            self.derp_map = derp_map
            region = derp_map.regions.get(self.own.region_id)
            log.info(
                "DERP map: region %d has %d relays (%s)",
                self.own.region_id,
                len(region.nodes) if region else 0,
                ", ".join(n.url() for n in region.nodes) if region else "",
            )
            if self.on_map is not None:
                self.on_map(derp_map)

    async def stop(self) -> None:
        """Leave the mesh (every watch connection ends)."""
        for task in list(self._removals):
            task.cancel()
        if self._removals:
            await asyncio.wait(self._removals)
        if self.mesh is not None:
            await self.mesh.stop()


__all__ = ["RelayMesh", "parse_record", "relay_record", "replicas_derp_map"]
