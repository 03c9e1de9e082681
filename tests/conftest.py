"""Shared fixtures: ``lab`` yields a :class:`tailpy.lab.Lab` and always closes it.

Tests marked ``lab`` are skipped, with the reason, where network namespaces cannot be made (not root, no
``ip netns``); they never pass silently.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tailpy.lab import Lab, unavailable_reason
from tailpy.lab.tunnels import native_device_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_lab = [item for item in items if item.get_closest_marker("lab")]
    if not needs_lab:
        return
    reason = unavailable_reason()
    if reason:
        for item in needs_lab:
            item.add_marker(pytest.mark.skip(reason=f"lab: {reason}"))


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab (unique namespace prefix), closed after the test, pass or fail."""
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def native_device() -> None:
    """Skip (with the reason) when the Rust Device is not available."""
    reason = native_device_reason()
    if reason:
        pytest.skip(reason)
