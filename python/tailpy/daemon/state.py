"""The node's state file: its keys and what it last knew, kept across restarts.

File ``<state_dir>/tailpyd.state``, JSON, mode 0600, written atomically (:func:`tailpy.storage.write_atomic`:
a temporary file, fsync, rename; on a full or read-only disk the old file stays and StorageError says so).
The machine key lasts for the device's life; the node key until it expires or rotates; the disco
key is never stored (new at each start).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailpy.errors import ConfigError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.storage import write_atomic

STATE_FILE = "tailpyd.state"


@dataclass
class NodeState:
    """What tailpyd keeps on disk. ``login_server`` is the control URL last used ("" before first login);
    ``node_id`` and ``addresses`` are what control last gave (for display before the first netmap)."""

    machine_key: MachinePrivate
    node_key: NodePrivate
    login_server: str = ""
    hostname: str = ""
    node_id: int | None = None
    addresses: tuple[str, ...] = ()
    want_running: bool = False
    node_key_issued: float | None = None  # unix seconds the control server accepted node_key
    # A rotation in flight: the new key is saved before control hears of it, so a crash between control
    # accepting it and this file recording it cannot strand the node (the next start tries it first).
    pending_node_key: NodePrivate | None = None
    accept_dns: bool = True  # point the host's resolver at MagicDNS (`tailpy up --accept-dns`)
    advertise_tags: tuple[
        str, ...
    ] = ()  # tags asked of control at registration (`tailpy up --advertise-tags`)
    # Routes (:mod:`tailpy.routes`), as `tailpy up` / `tailpy set` gave them:
    advertise_routes: tuple[str, ...] = ()  # canonical CIDR, exit routes included with --advertise-exit-node
    accept_routes: bool = False  # install peers' subnet routes (off by default, as Tailscale on Linux)
    exit_node: str = ""  # the exit node as the user named it (name, FQDN or tailnet IP); "" none
    exit_node_allow_lan_access: bool = False  # with an exit node: the host's LANs stay out of the tunnel
    snat_subnet_routes: bool = True  # masquerade tailnet sources onto the advertised subnets

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "machine_key": self.machine_key.text(),
            "node_key": self.node_key.text(),
            "login_server": self.login_server,
            "hostname": self.hostname,
            "node_id": self.node_id,
            "addresses": list(self.addresses),
            "want_running": self.want_running,
            "node_key_issued": self.node_key_issued,
            "pending_node_key": self.pending_node_key.text() if self.pending_node_key else None,
            "accept_dns": self.accept_dns,
            "advertise_tags": list(self.advertise_tags),
            "advertise_routes": list(self.advertise_routes),
            "accept_routes": self.accept_routes,
            "exit_node": self.exit_node,
            "exit_node_allow_lan_access": self.exit_node_allow_lan_access,
            "snat_subnet_routes": self.snat_subnet_routes,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> NodeState:
        return cls(
            machine_key=MachinePrivate.from_text(obj["machine_key"]),
            node_key=NodePrivate.from_text(obj["node_key"]),
            login_server=str(obj.get("login_server", "")),
            hostname=str(obj.get("hostname", "")),
            node_id=obj.get("node_id"),
            addresses=tuple(obj.get("addresses", ())),
            want_running=bool(obj.get("want_running", False)),
            node_key_issued=obj.get("node_key_issued"),
            pending_node_key=NodePrivate.from_text(obj["pending_node_key"])
            if obj.get("pending_node_key")
            else None,
            accept_dns=bool(obj.get("accept_dns", True)),
            advertise_tags=tuple(str(t) for t in obj.get("advertise_tags") or ()),
            advertise_routes=tuple(str(r) for r in obj.get("advertise_routes") or ()),
            accept_routes=bool(obj.get("accept_routes", False)),
            exit_node=str(obj.get("exit_node") or ""),
            exit_node_allow_lan_access=bool(obj.get("exit_node_allow_lan_access", False)),
            snat_subnet_routes=bool(obj.get("snat_subnet_routes", True)),
        )


class StateStore:
    """Loads and saves :class:`NodeState` in ``state_dir`` (created with mode 0700 if missing)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def load_or_create(self) -> NodeState:
        """Read the state file, or create new machine and node keys if there is none.

        Raises ConfigError if the file exists but cannot be read as a tailpy state file."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create state directory {self.dir}: {e.strerror}") from None
        if self.path.exists():
            try:
                return NodeState.from_json(json.loads(self.path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"state file {self.path} is unreadable ({e}); move it away to start as a new node"
                ) from None
        state = NodeState(MachinePrivate.generate(), NodePrivate.generate())
        self.save(state)
        return state

    def save(self, state: NodeState) -> None:
        """Write ``state`` atomically (:func:`tailpy.storage.write_atomic`). Raises StorageError with one
        sentence (disk full, read-only, permission); the file on disk then stays as it was."""
        data = json.dumps(state.to_json(), indent=1).encode()
        write_atomic(self.path, data, mode=0o600, what="state file")
