"""Every benchmark still runs: each one's ``--smoke`` mode (seconds, figures meaningless) exits 0.

A benchmark that cannot run here (no network namespaces, a peer tool such as dnsperf or Go missing) exits 77,
automake's "skipped" status, with the reason on stderr: the test skips with that reason. Any other status
fails with the benchmark's output. ``benchmarks/throughput.py`` has a smoke test of its own.

The scripts run as a user runs them, ``python benchmarks/<name>.py`` from the repository root, so the
script's directory is first on ``sys.path``: a benchmark named like a dependency's package (``dns.py``
beside dnspython's ``dns``) would break the imports of all of them, which
:func:`test_no_benchmark_shadows_an_importable_module` guards against.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SKIPPED = 77
TIMEOUT = 600.0  # seconds; a smoke run takes well under a minute once Go tools are built and cached

SMOKE = [
    pytest.param("control_scale", id="control_scale"),  # loopback only
    pytest.param("policy_compile", id="policy_compile"),  # in process
    pytest.param("connect_time", marks=pytest.mark.lab, id="connect_time"),
    pytest.param("derp_relay", marks=pytest.mark.lab, id="derp_relay"),
    pytest.param("magicdns", marks=pytest.mark.lab, id="magicdns"),
    pytest.param("embedded", marks=pytest.mark.lab, id="embedded"),
]


@pytest.mark.parametrize("name", SMOKE)
def test_benchmark_smoke(name: str) -> None:
    _smoke(name)


def test_control_scale_replicas_smoke() -> None:
    """``control_scale.py --replicas 2``: two `control serve` replicas on a throwaway PostgreSQL (skipped
    without one), the last killed at the end, its nodes moving to the first."""
    _smoke("control_scale", "--replicas", "2")


def _smoke(name: str, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--smoke", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if done.returncode == SKIPPED:
        lines = done.stderr.strip().splitlines()
        pytest.skip(lines[-1] if lines else f"{name}.py exited {SKIPPED} (skipped) without a reason")
    assert done.returncode == 0, (
        f"{name}.py --smoke exited {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
        f"stderr:\n{done.stderr[-3000:]}"
    )


def test_every_benchmark_has_a_smoke_test() -> None:
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    covered = {p.values[0] for p in SMOKE} | {"throughput"}
    assert scripts == covered


def _importable(name: str) -> bool:
    """A top-level module ``name`` exists outside benchmarks/: built in, in the standard library or in
    the environment (tailpy's dependencies)."""
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return True
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
    return importlib.machinery.PathFinder.find_spec(name, elsewhere) is not None


def test_no_benchmark_shadows_an_importable_module() -> None:
    assert _importable("dns") and not _importable("magicdns")  # dnspython is there; the check works
    shadowing = [p.name for p in BENCHMARKS.glob("*.py") if _importable(p.stem)]
    assert not shadowing, f"rename these benchmarks: they hide a module of the same name: {shadowing}"
