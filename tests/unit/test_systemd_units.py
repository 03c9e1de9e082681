"""`tailpy install-systemd`: the units it writes (into a temporary directory only) and `systemd-analyze
verify` on them where systemd-analyze is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tailpy.cli.install_systemd import command, commands
from tailpy.systemd import UNITS


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_install_writes_the_three_units_with_absolute_commands(tmp_path: Path) -> None:
    done = CliRunner().invoke(command, ["--dest", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(UNITS)
    tailpyd, tailpy = commands()
    assert tailpyd.startswith("/") and tailpy.startswith("/")
    node = _directives((tmp_path / "tailpyd.service").read_text())
    assert (
        node["Type"] == ["notify"]
        and node["Restart"] == ["on-failure"]
        and node["StateDirectory"] == ["tailpy"]
    )
    assert node["ExecStart"][0].startswith(f"{tailpyd} --state-dir=/var/lib/tailpy ")
    assert node["ExecStopPost"] == [f"{tailpyd} --cleanup --state-dir=/var/lib/tailpy"]
    assert set(node["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_NET_BIND_SERVICE",
    }
    for name, caps in (("tailpy-control.service", ""), ("tailpy-derp.service", "CAP_NET_BIND_SERVICE")):
        unit = _directives((tmp_path / name).read_text())
        assert (
            unit["DynamicUser"] == ["yes"]
            and unit["StateDirectory"]
            and unit["ExecStart"][0].startswith(tailpy)
        )
        assert unit["CapabilityBoundingSet"] == [caps] and unit["ProtectSystem"] == ["strict"]
    for name in UNITS:
        unit = _directives((tmp_path / name).read_text())
        assert (
            unit["NoNewPrivileges"] == ["yes"]
            and unit["ProtectHome"] == ["yes"]
            and unit["PrivateTmp"] == ["yes"]
        )
        assert "@" not in "".join(unit["ExecStart"])


def test_warns_when_the_sandbox_hides_the_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tailpy.cli import install_systemd

    monkeypatch.setattr(
        install_systemd, "commands", lambda: ("/root/venv/bin/tailpyd", "/root/venv/bin/tailpy")
    )
    done = CliRunner().invoke(command, ["--dest", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "/root/venv/bin/tailpyd" in done.stderr and "/opt/tailpy" in done.stderr
    assert "systemctl daemon-reload" not in done.stdout  # not the default directory: no enable hint
    assert install_systemd.hidden_path(["/opt/tailpy/bin/tailpyd", "/usr/bin/python3"]) is None
    for hidden in ("/tmp/x/bin/tailpy", "/var/tmp/tailpy", "/home/u/.local/bin/tailpy", "/root/t"):
        assert install_systemd.hidden_path(["/usr/bin/python3", hidden]) == Path(hidden)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    done = CliRunner().invoke(command, ["--dest", str(tmp_path / "units"), "--dry-run"])
    assert done.exit_code == 0 and "Type=notify" in done.output
    assert not (tmp_path / "units").exists()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    assert CliRunner().invoke(command, ["--dest", str(tmp_path)]).exit_code == 0
    done = subprocess.run(
        [exe, "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
