"""raise_nofile_limit: the soft open-files limit goes up to the hard one (run in a child process so the test
runner's own limit is untouched)."""

from __future__ import annotations

import subprocess
import sys

import pytest

resource = pytest.importorskip("resource", reason="no resource module on this platform")

_CHILD = """
import resource
from tailpy.rlimits import raise_nofile_limit
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
first = raise_nofile_limit()
print(first, resource.getrlimit(resource.RLIMIT_NOFILE), raise_nofile_limit())
"""


def test_soft_limit_raised_to_hard_once() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard <= 256:
        pytest.skip(f"the hard open-files limit {hard} leaves nothing to raise")
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"(256, {hard}) ({hard}, {hard}) None"
