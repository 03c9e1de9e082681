"""``benchmarks/throughput.py --smoke --json`` still runs: every row is either measured (and moved bytes every
way) or skipped with a reason, and the ratios are there when their rows are.

The smoke mode builds nothing: rows whose peer is not built yet (``throughput.py --build-tools``) are skipped,
and that skip must carry its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# One worker runs the module (its tests share one smoke run), and the run is a lab test.
pytestmark = [pytest.mark.lab, pytest.mark.xdist_group("bench_throughput")]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
ROWS = {
    "tailpy",
    "tailpy-filter",
    "tailpy-product",
    "wireguard-go-debian",
    "wireguard-go-newest",
    "boringtun",
    "boringtun-t1",
}
SKIPPED = 77  # no row can run here; the reason is stderr's last line
SECTIONS = {"forward", "reverse", "parallel", "ping_idle", "ping_loaded"}


@pytest.fixture(scope="module")
def smoke() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json"],
        cwd=SCRIPT.parents[1],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode == SKIPPED:
        lines = done.stderr.strip().splitlines()
        pytest.skip(lines[-1] if lines else "throughput.py exited 77 (skipped) without a reason")
    try:
        out: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON (exit {done.returncode}): {done.stderr[-2000:]}")
    errors = [f"{row['name']}: {e}" for row in out["rows"] for e in row["errors"]]
    assert done.returncode == 0 and not errors, errors or done.stderr[-2000:]
    return out


def test_every_row_is_measured_or_skipped_with_a_reason(smoke: dict[str, Any]) -> None:
    assert smoke["settings"]["smoke"] is True and smoke["settings"]["rounds"] == 1
    rows = {row["name"]: row for row in smoke["rows"]}
    assert set(rows) == ROWS
    for name, row in rows.items():
        if row["skipped"] is not None:
            assert isinstance(row["skipped"], str) and row["skipped"].strip(), name
            assert row["samples"] == [], name
            continue
        assert row["errors"] == [], name
        assert len(row["samples"]) == 1, name
        sample = row["samples"][0]
        assert set(sample) >= SECTIONS, name
        for section in ("forward", "reverse", "parallel"):
            assert sample[section]["gbit_s"] > 0, (name, section)
            assert sample[section]["cpu_s_per_gbit"] > 0, (name, section)
            assert sample[section]["retransmits"] >= 0, (name, section)
        assert sample["ping_idle"]["loss_pct"] < 100, name
        assert row["summary"]["forward"]["gbit_s"]["median"] == sample["forward"]["gbit_s"], name


def test_peer_rows_name_the_binary_they_ran(smoke: dict[str, Any]) -> None:
    for row in smoke["rows"]:
        if row["name"].startswith(("wireguard-go", "boringtun")) and row["skipped"] is None:
            assert row["binary"] and row["version"], row["name"]
    rows = {r["name"]: r for r in smoke["rows"]}
    newest, debian = rows["wireguard-go-newest"], rows["wireguard-go-debian"]
    if newest["skipped"] is None:
        assert newest["version"].startswith("wireguard-go "), newest["version"]
        assert newest["binary"] != debian["binary"]


def test_ratios_present_when_their_rows_were_measured(smoke: dict[str, Any]) -> None:
    measured = {r["name"] for r in smoke["rows"] if r["skipped"] is None}
    for num, den in (
        ("tailpy", "wireguard-go-newest"),
        ("tailpy-product", "tailpy"),
        ("tailpy-filter", "tailpy"),
    ):
        key = f"{num} / {den}"
        if {num, den} <= measured:
            ratio = smoke["ratios"][key]
            assert ratio["forward.gbit_s"]["median"] > 0, key
        else:
            assert key not in smoke["ratios"], key
