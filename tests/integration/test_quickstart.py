"""The README's quick start ("Using it"), run verbatim in the lab: its command lines are read from the
README's first code block under "## Using it" (keep the two in step), with only the placeholders filled in:
SERVER (the control host's address on the lab internet), the auth key, the peer's name and address.

Control runs on the lab internet; two nodes, each behind its own NAT (endpoint-independent mapping, as home
routers do), come up with `tailpy up`, reach each other directly (`tailpy ping` stops at a direct pong) and
by name through MagicDNS. The `tailpy derp serve` line is skipped: it needs a certificate (the health lab test
runs a TLS relay)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tailpy.lab import Lab
from tailpy.lab.netns import Host
from tailpy.lab.procs import wait_for
from tailpy.lab.tailnet import CONTROL_PORT, LabNode, LabTailnet

pytestmark = pytest.mark.lab

README = Path(__file__).resolve().parents[2] / "README.md"


def quickstart() -> list[list[str]]:
    """The commands of README "Using it"'s first code block: ``export`` and ``tailpy …`` lines, comments
    dropped, split as a shell would."""
    section = README.read_text().split("\n## Using it\n", 1)[1]
    block = section.split("```", 2)[1]
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] in ("tailpy", "export"):
            out.append(words)
    return out


def _fill(words: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for w in words:
        for old, new in subs.items():
            w = w.replace(old, new)
        out.append(w)
    return out


def _tailpy(host: Host, words: list[str], env: dict[str, str], check: bool = True) -> str:
    assert words[0] == "tailpy"
    argv = ["env", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m", "tailpy.cli.main", *words[1:]]
    return host.run(argv, check=check, timeout=120).stdout


def test_readme_quick_start_verbatim(tmp_path: Path) -> None:
    commands = quickstart()
    serve = next(c for c in commands if c[:3] == ["tailpy", "control", "serve"])
    assert f"0.0.0.0:{CONTROL_PORT}" in serve and "--server-url" in serve, serve
    with Lab() as lab:
        net = LabTailnet(lab)
        server = net.lan.ip(net.control_host)
        # `policy set policy.hujson` sets a file the user wrote: here every member may reach every device
        # and tag:server has an owner (the admin), as a first policy would.
        policy = tmp_path / "policy.hujson"
        policy.write_text(
            "{\n  // who may reach what (the policy format of Tailscale)\n"
            '  "tagOwners": {"tag:server": []},\n'
            '  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],\n}\n'
        )
        subs = {"SERVER": server, "policy.hujson": str(policy)}
        control_env: dict[str, str] = {}
        for words in commands:  # `export NAME=value` lines set the control commands' environment
            if words[0] == "export":
                name, _, value = words[1].partition("=")
                control_env[name] = str(tmp_path / "control") if "STATE_DIR" in name else value
        assert "TAILPY_CONTROL_STATE_DIR" in control_env
        (tmp_path / "control").mkdir()

        log = tmp_path / "control.log"
        with log.open("w") as f:
            argv = _fill(serve, subs)[1:]
            proc = net.control_host.python("tailpy.cli.main", *argv, env=control_env, stderr=f)

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()
            probe = [sys.executable, "-c", "import urllib.request, sys; urllib.request.urlopen(sys.argv[1])",
                     f"http://{server}:{CONTROL_PORT}/key"]  # fmt: skip
            return net.control_host.run(probe, check=False, timeout=10).returncode == 0

        wait_for(answers, timeout=30, what="the control server")
        assert "left out of the DERP map" not in log.read_text()

        key = ""
        node_commands: list[list[str]] = []
        for words in commands:
            if words[:2] == ["tailpy", "control"] and words[2] != "serve":
                out = _tailpy(net.control_host, _fill(words, subs), control_env)
                if words[2:4] == ["authkey", "create"] and "--reusable" in words:
                    key = out.strip().splitlines()[-1]
            elif words[:2] not in (["tailpy", "control"], ["tailpy", "derp"]) and words[0] == "tailpy":
                node_commands.append(words)
        assert key.startswith("tskey-auth-"), key
        subs["tskey-auth-…"] = key

        a, b = net.add_node("qa", behind="eim"), net.add_node("qb", behind="eim")
        env = {n.name: {"TAILPY_SOCKET": n.socket} for n in (a, b)}
        up = next(c for c in node_commands if c[:2] == ["tailpy", "up"])
        for n in (a, b):
            _tailpy(n.host, _fill(up, subs), env[n.name])
        for n in (a, b):
            n.wait_peers(1)

        def peer_of(n: LabNode) -> dict[str, str]:
            (p,) = n.status()["peers"]
            return {"name": p["name"], "ip": p["addresses"][0].split("/")[0]}

        for n in (a, b):
            peer = peer_of(n)
            for words in node_commands:
                if words[:2] in (["tailpy", "up"], ["tailpy", "down"], ["tailpy", "logout"]):
                    continue
                if words[:2] == ["tailpy", "ping"]:  # `tailpy ping b`: the other node, by name
                    words = [*words[:2], peer["name"]]
                if words[:2] == ["tailpy", "whois"]:
                    words = [*words[:2], peer["ip"]]
                out = _tailpy(n.host, _fill(words, subs), env[n.name])
                if words[:2] == ["tailpy", "ping"]:
                    assert "via DERP" in out or "via " in out, out
            # names through MagicDNS, with the system's resolver
            n.host.run(["ping", "-c", "2", "-W", "3", peer["name"]], timeout=60)
            status = _tailpy(n.host, ["tailpy", "status"], env[n.name])
            assert "direct " in status and "health:" not in status, status

        for words in node_commands:  # and the way out
            if words[:2] in (["tailpy", "down"], ["tailpy", "logout"]):
                for n in (a, b):
                    _tailpy(n.host, words, env[n.name])
        assert a.status()["backend_state"] in ("Stopped", "NeedsLogin")
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
