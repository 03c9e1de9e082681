"""The store, name, identity and policy tests again, against a real PostgreSQL server started here (initdb
into a temporary directory, unix socket only) and removed afterwards, pass or fail. Skipped, with the reason,
only where PostgreSQL cannot be started (binaries missing)."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _replicas import empty_database
from _replicas import pg_url as pg_url

from tailpy.control import Store
from tailpy.control.store import MIGRATIONS

UNIT = Path(__file__).resolve().parents[1] / "unit"
sys.path.insert(0, str(UNIT))  # (the unit test modules read below import their helpers: _schema)


def _store_tests(module: str) -> dict[str, Any]:
    """The test functions of tests/unit/<module>.py that take the ``store`` fixture."""
    spec = importlib.util.spec_from_file_location(f"pg_{module}", UNIT / f"{module}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {
        f"{name}": fn
        for name, fn in vars(mod).items()
        if name.startswith("test_") and "store" in inspect.signature(fn).parameters
    }


globals().update(_store_tests("test_control_store"))
globals().update(
    {k.replace("test_", "test_names_", 1): v for k, v in _store_tests("test_control_names").items()}
)
globals().update(
    {k.replace("test_", "test_identity_", 1): v for k, v in _store_tests("test_control_identity").items()}
)
globals().update(
    {k.replace("test_", "test_policy_", 1): v for k, v in _store_tests("test_control_policy").items()}
)
globals().update(
    {k.replace("test_", "test_routes_", 1): v for k, v in _store_tests("test_control_routes_admin").items()}
)


@pytest.fixture
def store(pg_url: str, tmp_path: Path) -> Iterator[Store]:
    """A Store on an empty PostgreSQL database (every table dropped first)."""
    s = Store(tmp_path, db=empty_database(pg_url))
    yield s
    s.close()


def test_postgres_migrations_and_newer_schema(pg_url: str, tmp_path: Path, store: Store) -> None:
    assert store.url.startswith("postgresql+psycopg://")
    assert store.migrate() == len(MIGRATIONS)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    from tailpy.errors import ControlError

    with pytest.raises(ControlError, match="newer than this tailpy knows"):
        Store(tmp_path, db=pg_url)


# psycopg warns from a failed connection's __del__
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreachable_postgres_is_one_sentence(tmp_path: Path) -> None:
    from tailpy.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot open control database"):
        Store(tmp_path, db=f"postgresql://nobody@/x?host={tmp_path}&port=1")
    gc.collect()  # the failed connection's warning is raised here, under this test's filter, not later
