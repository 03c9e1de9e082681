"""tailpyd on a state disk that cannot be written, and a rename control cannot take yet: a re-login or a
rename whose state file cannot be saved changes nothing (control never hears of it), a save failing inside
the session with control never ends it, and a new hostname control could not take is applied at the next
map request, while `tailpy up` says it is pending rather than guessing an admin named the node."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon_lifecycle import DataPlane, until

from tailpy.cli.up import name_note
from tailpy.control import ControlServer, Store
from tailpy.daemon import backend as backend_module
from tailpy.daemon.backend import Backend
from tailpy.daemon.lifecycle import BackendState as S
from tailpy.daemon.state import NodeState, StateStore
from tailpy.errors import ControlError, NotRegisteredError, StorageError

FULL = "cannot write state file tailpyd.state: no space left on device (the previous copy is kept)"


class FullableStore(StateStore):
    """A state store whose disk fills up on demand (``full``): save then raises StorageError."""

    full = False

    def save(self, state: NodeState) -> None:
        if self.full:
            raise StorageError(FULL)
        super().save(state)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str, Backend, FullableStore]]:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    srv = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await srv.start("127.0.0.1", 0)
    url = f"http://{host}:{port}"
    (tmp_path / "node").mkdir()
    state = FullableStore(tmp_path / "node")

    def factory(private_key: bytes) -> Any:
        return DataPlane(private_key)

    backend = Backend(state, factory, configure_os=False)
    await backend.start()
    key = store.create_auth_key(reusable=True, expires=None, now=time.time()).key
    await backend.up(url, key, "alpha")
    await until(lambda: backend.state is S.RUNNING, "the first netmap")
    try:
        yield srv, key, backend, state
    finally:
        await backend.close()
        await srv.stop()
        store.close()


async def test_relogin_on_a_full_disk_changes_nothing(
    node: tuple[ControlServer, str, Backend, FullableStore],
) -> None:
    srv, key, backend, state = node
    node_id = backend.state_data.node_id
    assert node_id is not None
    old = backend.state_data.node_key
    state.full = True
    with pytest.raises(StorageError, match="no space left"):
        await backend.up("", key, None, force_reauth=True)
    # Control never heard of a new key: the node goes on with its session and key.
    assert srv.store.get_node(node_id).node_key == old.public
    assert backend.state_data.node_key is old and backend.state_data.pending_node_key is None
    assert backend.state is S.RUNNING and backend.session.running
    state.full = False
    await backend.up("", key, None, force_reauth=True)  # the disk freed: the re-login goes through
    new = backend.state_data.node_key
    assert new != old and srv.store.get_node(node_id).node_key == new.public
    assert backend.state_data.pending_node_key is None
    assert StateStore(state.dir).load_or_create().node_key.public == new.public
    await until(lambda: backend.state is S.RUNNING and backend.control_connected, "the new key in use")


async def test_rename_on_a_full_disk_changes_nothing(
    node: tuple[ControlServer, str, Backend, FullableStore],
) -> None:
    srv, _, backend, state = node
    node_id = backend.state_data.node_id
    assert node_id is not None
    state.full = True
    with pytest.raises(StorageError, match="no space left"):
        await backend.up("", None, "full2")
    assert srv.store.get_node(node_id).name == "alpha"  # control was not asked
    assert backend.state_data.hostname == "alpha" and backend.status().self_node.name == "alpha"
    assert backend.state is S.RUNNING and backend.session.running


async def test_a_save_failing_in_the_session_callbacks_never_ends_it(
    node: tuple[ControlServer, str, Backend, FullableStore], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, backend, state = node
    state.full = True
    me = backend.netmap.self_node if backend.netmap else None
    assert me is not None
    backend._apply_self(me.__class__(**{**me.__dict__, "addresses": ("100.64.9.9/32",)}))
    assert "no space left" in backend.last_error and backend.state is S.RUNNING
    backend._forgotten(NotRegisteredError("node not found"))  # must not raise
    assert backend.backend_state == "NeedsLogin" and "no space left" in backend.last_error


async def test_a_rename_control_cannot_take_is_pending_then_applied(
    node: tuple[ControlServer, str, Backend, FullableStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, _, backend, _ = node
    node_id = backend.state_data.node_id
    assert node_id is not None

    async def database_full(*args: Any, **kwargs: Any) -> Any:
        raise ControlError("control server error 507: its database is full")

    with monkeypatch.context() as m:
        m.setattr(backend_module, "register", database_full)
        await backend.up("", None, "beta")
    st = backend.status()
    assert st.self_node.name == "alpha" and st.self_node.name_pending and not st.self_node.name_by_admin
    note = name_note("beta", st)
    assert "pending" in note and "admin" not in note
    await backend.session.restart()  # the next map request carries the hostname asked for
    await until(lambda: srv.store.get_node(node_id).name == "beta", "control to take the new name")
    await until(lambda: backend.status().self_node.name == "beta", "the netmap with the new name")
    assert not backend.status().self_node.name_pending and name_note("beta", backend.status()) == ""
    assert StateStore(backend.store.dir).load_or_create().hostname == "beta"


async def test_the_admin_note_comes_from_control(
    node: tuple[ControlServer, str, Backend, FullableStore],
) -> None:
    srv, _, backend, _ = node
    node_id = backend.state_data.node_id
    assert node_id is not None
    srv.store.rename_node(node_id, "boss")
    await backend.up("", None, "gamma")
    # (the name may show before control has answered the hostname: the note waits for that answer)
    await until(
        lambda: backend.status().self_node.name == "boss" and not backend.status().self_node.name_pending,
        "the netmap with the admin's name, and control's answer to the hostname",
    )
    st = backend.status()
    assert st.self_node.name_by_admin
    assert name_note("gamma", st).startswith("note: this node keeps its name boss: an admin named it")
