"""PostgreSQL's driver is the optional ``tailpy[postgres]`` extra: without psycopg, asking for a
``postgresql://`` database fails with a sentence naming the extra, and SQLite still works."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tailpy.control import Store
from tailpy.errors import ConfigError


def test_postgresql_url_without_psycopg_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'tailpy\[postgres\]'"):
        Store(tmp_path, db="postgresql://tailpy@/tailpy?host=/nonexistent")
    Store(tmp_path).close()  # the default SQLite store needs no extra
