"""Names on a running tailnet: ``tailpy up --hostname`` on a registered node renames it (peers see the new
name), a reserved name gets a suffix and the CLI says why, a name an admin gave stays (and the CLI says so),
and admin commands take a node's name as well as its id."""

from __future__ import annotations

import json
import subprocess

import pytest

from tailpy.lab import Lab, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab


def _up(node: LabNode, hostname: str) -> subprocess.CompletedProcess[str]:
    argv = tailpy_argv("up", "--hostname", hostname, "--socket", node.socket)
    done = node.host.run(argv, check=False, timeout=90)
    assert done.returncode == 0, done.stderr
    return done


def _peer_names(node: LabNode) -> list[str]:
    return [p["name"].split(".")[0] for p in node.status()["peers"]]


def test_hostname_rename_reserved_names_and_admin_names(lab: Lab) -> None:
    net = LabTailnet(lab)
    net.start_control()
    a, b = net.connected("a", "b")

    _up(a, "bee")
    assert a.status()["self"]["name"].split(".")[0] == "bee"
    wait_for(lambda: _peer_names(b) == ["bee"], timeout=20, what="b to see a renamed bee")

    done = _up(a, "localhost")
    assert a.status()["self"]["name"].split(".")[0] == "localhost-1"
    assert "localhost is reserved" in done.stderr, done.stderr

    renamed = json.loads(net.control("nodes", "rename", "localhost-1", "builder", "--json"))
    assert renamed["name"] == "builder"
    wait_for(lambda: a.status()["self"]["name"].split(".")[0] == "builder", timeout=20, what="a's new name")
    done = _up(a, "wasp")
    assert a.status()["self"]["name"].split(".")[0] == "builder"
    assert "admin" in done.stderr and "builder" in done.stderr, done.stderr

    shown = json.loads(net.control("nodes", "show", "builder", "--json"))
    assert shown["hostname"] == "wasp"
    expired = json.loads(net.control("nodes", "expire", "b", "--json"))
    assert expired["expired"] is True
