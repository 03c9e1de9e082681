"""tailpy.Node in real processes run as user nobody (``setpriv --reuid nobody``) inside lab namespaces, on the
userspace data plane, beside tailpyd nodes on TUNs:

* an embedded node serves HTTP (examples/web_app.py) and a TUN node fetches from it with curl by MagicDNS
  name; examples/fetch.py, as nobody on another host, fetches the same page;
* an embedded node dials a TUN node's TCP server by name;
* two embedded nodes in one process talk TCP and UDP;
* an embedded node behind an endpoint-independent-mapping NAT goes direct; behind an endpoint-dependent one
  (the TUN peer too) it works through DERP;
* the packet filter from control applies to it (when control has ``tailpy control policy set``);
* closing it releases every file descriptor, thread (Python and Rust) it took;
* ``tailpyd --tun userspace-networking`` as nobody, with ``tailpy up/status/ping`` against it, and curl
  through its SOCKS5 (``--socks5-hostname``) and HTTP (``--proxy``, ``--proxytunnel``) proxies.

Needs root (namespaces), curl, setpriv, and a tailpy._native built with the userspace data plane
(``Device.userspace``); skips naming what is missing.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailpy.lab import Lab
from tailpy.lab.netns import Host
from tailpy.lab.procs import read_line, wait_for
from tailpy.lab.tailnet import LabNode, LabTailnet

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_embedded_node.py")
EXAMPLES = ROOT / "examples"
NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def _userspace_reason() -> str | None:
    try:
        from tailpy._native import Device
    except ImportError as e:
        return f"tailpy._native cannot be imported ({e})"
    if not hasattr(Device, "userspace"):
        return "tailpy._native has no userspace data plane (Device.userspace): build the netstack"
    return None


@functools.cache
def nobody_python() -> tuple[str, str] | str:
    """(interpreter, PYTHONPATH) user nobody can run tailpy with, or why there is none. The venv's own
    interpreter may live where nobody cannot reach (/root/.pyenv): then a system python3 of the same
    version with the venv's site-packages on the path."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return "needs root and setpriv to run as nobody"
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no user nobody"
    path = os.pathsep.join([str(ROOT / "python"), sysconfig.get_paths()["purelib"]])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, f"/usr/bin/python{version}", "/usr/bin/python3"):
        probe = [*NOBODY, "env", f"PYTHONPATH={path}", exe, "-c", "import tailpy._native, aiohttp, nacl"]
        done = subprocess.run(probe, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode == 0:
            return exe, path
    return f"user nobody cannot run a Python {version} that imports tailpy"


@pytest.fixture
def embedded_ok() -> None:
    why = _userspace_reason()
    if why:
        pytest.skip(why)
    found = nobody_python()
    if isinstance(found, str):
        pytest.skip(found)
    if shutil.which("curl") is None:
        pytest.skip("needs curl")


@pytest.fixture
def tailnet(lab: Lab, embedded_ok: None) -> Iterator[LabTailnet]:
    t = LabTailnet(lab)
    t.start_control()
    yield t


def state_root(lab: Lab) -> Path:
    """A directory nobody may write, removed with the lab."""
    root = Path(tempfile.mkdtemp(prefix="tailpy-embedded-"))
    lab.track_path(root)
    nobody = pwd.getpwnam("nobody")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    return root


class Embedded:
    """A process embedding tailpy.Node, as nobody on ``host``; its JSON events read from stdout."""

    def __init__(self, tailnet: LabTailnet, host: Host, argv: list[str], key: str) -> None:
        found = nobody_python()
        assert not isinstance(found, str)
        exe, path = found
        self.root = state_root(tailnet.lab)
        env = {
            "PYTHONPATH": path,
            "PYTHONUNBUFFERED": "1",
            "TAILPY_CONTROL_URL": tailnet.control_url,
            "TAILPY_AUTH_KEY": key,
            "TAILPY_STATE_ROOT": str(self.root),
            "TAILPY_STATE_DIR": str(self.root / "state"),
            "HOME": str(self.root),
        }
        self.stderr = self.root / "stderr.log"
        with open(self.stderr, "w") as err:
            self.proc = host.popen(
                [*NOBODY, "env", *(f"{k}={v}" for k, v in env.items()), exe, *argv],
                stdout=subprocess.PIPE,
                stderr=err,
            )

    def event(self, name: str, timeout: float = 90) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            try:
                line = read_line(self.proc.stdout, timeout, f"the embedded node's {name!r}")
            except Exception:
                raise AssertionError(f"no {name!r}; stderr: {self.stderr.read_text()[-2000:]}") from None
            if not line.startswith("{"):
                continue
            ev: dict[str, Any] = json.loads(line)
            if ev["event"] == name:
                return ev

    def line(self, timeout: float = 90) -> str:
        assert self.proc.stdout is not None
        return read_line(self.proc.stdout, timeout, "the example's output")

    def wait(self, timeout: float = 120) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}: {self.stderr.read_text()[-2000:]}"
        return str(out)


def script(*args: str) -> list[str]:
    return [str(SCRIPT), *args]


def http_server(node: LabNode, port: int) -> None:
    """A plain HTTP server on the TUN node (serving a directory with hello.txt)."""
    www = Path(tempfile.mkdtemp(prefix="tailpy-www-"))
    node.tailnet.lab.track_path(www)
    (www / "hello.txt").write_text("hello from the TUN node\n")
    node.host.python("http.server", str(port), "--bind", "::", "--directory", str(www))
    wait_for(
        lambda: (
            node.host.run(["curl", "-sS", f"http://127.0.0.1:{port}/hello.txt"], check=False).returncode == 0
        ),
        timeout=20,
        what="the TUN node's HTTP server",
    )


def curl(host: Host, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return host.run(["curl", "-sS", "--max-time", "20", *args], check=False, timeout=timeout)


def test_embedded_serves_http_and_fetch_example(tailnet: LabTailnet) -> None:
    key = tailnet.authkey()
    (tun,) = tailnet.connected("tun1")
    web = Embedded(tailnet, tailnet.public_host("web"), [str(EXAMPLES / "web_app.py"), "web"], key)
    assert web.line().startswith("serving http://web/")
    tun.wait_peers(1)
    got = wait_for(
        lambda: (r := curl(tun.host, "http://web/")).returncode == 0 and r.stdout,
        timeout=60,
        what="curl http://web/ from the TUN node",
    )
    assert got == "hello tun1, this is web\n"
    fetch = Embedded(
        tailnet, tailnet.public_host("fetcher"), [str(EXAMPLES / "fetch.py"), "http://web/"], key
    )
    assert fetch.wait() == "hello fetch, this is web\n"


def test_embedded_dials_tun_node(tailnet: LabTailnet) -> None:
    key = tailnet.authkey()
    (tun,) = tailnet.connected("tun1")
    http_server(tun, 8000)
    emb = Embedded(tailnet, tailnet.public_host("emb"), script("dial", "emb", "tun1", "8000"), key)
    ev = emb.event("body")
    assert "hello.txt" in ev["body"] and ev["uid"] == pwd.getpwnam("nobody").pw_uid


def test_two_embedded_nodes_in_one_process(tailnet: LabTailnet) -> None:
    key = tailnet.authkey()
    emb = Embedded(tailnet, tailnet.public_host("emb"), script("pair", "one", "two"), key)
    ev = emb.event("pair")
    assert ev["body"].startswith("hello from") and ev["a"][0] in ev["body"]
    assert ev["udp"] == "datagram" and ev["udp_from"] == ev["a"][0]


@pytest.mark.parametrize(("behind", "path"), [("eim", "direct"), ("edm", "relay")])
def test_embedded_behind_nat(tailnet: LabTailnet, behind: str, path: str) -> None:
    key = tailnet.authkey()
    # Behind EIM the TUN peer is public: direct. Behind EDM, with the peer behind EDM as well: DERP.
    tun = tailnet.add_node("tun1", behind="edm" if behind == "edm" else None)
    tun.up(key)
    http_server(tun, 8000)
    site = tailnet.site("emb-site", behind)
    host = tailnet.lab.host("emb")
    site.lan.attach(host)
    emb = Embedded(tailnet, host, script("dial", "emb", "tun1", "8000"), key)
    assert "hello.txt" in emb.event("body")["body"]
    assert emb.event("status")["paths"]["tun1"] == path


def test_policy_filter_applies(tailnet: LabTailnet) -> None:
    policy = Path(tailnet.root) / "policy.hujson"
    policy.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:8000"]}]}\n')
    tailnet.control("policy", "set", str(policy))
    key = tailnet.authkey()
    (tun,) = tailnet.connected("tun1")
    emb = Embedded(tailnet, tailnet.public_host("web"), script("serve", "web", "8000"), key)
    emb.event("ready")
    tun.wait_peers(1)
    wait_for(lambda: curl(tun.host, "http://web:8000/").returncode == 0, timeout=60, what="port 8000")
    emb2 = Embedded(tailnet, tailnet.public_host("web2"), script("serve", "web2", "8001"), key)
    emb2.event("ready")
    tun.wait_peers(2)
    assert curl(tun.host, "--max-time", "5", "http://web2:8001/").returncode != 0  # not in the policy


def test_close_releases_everything(tailnet: LabTailnet) -> None:
    key = tailnet.authkey()
    (tun,) = tailnet.connected("tun1")
    http_server(tun, 8000)
    emb = Embedded(tailnet, tailnet.public_host("emb"), script("release", "emb", "tun1", "8000"), key)
    ev = emb.event("release")
    assert "hello.txt" in ev["body"]
    assert ev["during"]["tasks"] > ev["before"]["tasks"]  # the data plane's threads ran
    left = sorted(set(ev["after"]["fds"]) - set(ev["before"]["fds"]))
    assert not left, f"left open after close: {left}"
    assert ev["after"]["threads"] == ev["before"]["threads"]
    assert ev["after"]["tasks"] == ev["before"]["tasks"]


def test_tailpyd_userspace_with_proxies(tailnet: LabTailnet) -> None:
    found = nobody_python()
    assert not isinstance(found, str)
    exe, path = found
    key = tailnet.authkey()
    (tun,) = tailnet.connected("tun1")
    http_server(tun, 8000)
    host = tailnet.public_host("px")
    root = state_root(tailnet.lab)
    sock = str(root / "tailpyd.sock")
    env = [f"PYTHONPATH={path}", f"HOME={root}"]
    log = open(root / "tailpyd.log", "w")  # noqa: SIM115 - the child owns it
    host.popen(
        [*NOBODY, "env", *env, exe, "-m", "tailpy.daemon", "--tun", "userspace-networking",
         "--state-dir", str(root / "state"), "--socket", sock, "--port", "0",
         "--socks5-server", "127.0.0.1:1080", "--outbound-http-proxy-listen", "127.0.0.1:8080"],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    log.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return host.run(
            [*NOBODY, "env", *env, exe, "-m", "tailpy.cli.main", *args, "--socket", sock], check=False
        )

    wait_for(lambda: os.path.exists(sock), timeout=20, what="tailpyd's socket")
    up = cli("up", "--login-server", tailnet.control_url, "--auth-key", key, "--hostname", "px")
    assert up.returncode == 0, up.stderr
    status = json.loads(cli("status", "--json").stdout)
    assert status["backend_state"] == "Running" and status["self"]["tun"] == "userspace-networking"
    assert [p["name"] for p in status["peers"]] == ["tun1"]
    assert cli("ping", "tun1").returncode == 0
    got = curl(host, "--socks5-hostname", "127.0.0.1:1080", "http://tun1:8000/hello.txt")
    assert got.stdout == "hello from the TUN node\n", got.stderr
    got = curl(host, "--proxy", "http://127.0.0.1:8080", "http://tun1:8000/hello.txt")
    assert got.stdout == "hello from the TUN node\n", got.stderr
    got = curl(host, "--proxy", "http://127.0.0.1:8080", "--proxytunnel", "http://tun1:8000/hello.txt")
    assert got.stdout == "hello from the TUN node\n", got.stderr
    # Nothing of the host changed: no TUN, no tailnet route.
    assert "tailpy" not in host.run(["ip", "-o", "link"]).stdout
    assert "100.64" not in host.run(["ip", "route"]).stdout


def test_readme_first_python_example_as_nobody(tailnet: LabTailnet) -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n") + len("```python\n")
    key = tailnet.authkey()
    tailnet.connected("tun1")
    root = state_root(tailnet.lab)
    (root / "hello.py").write_text(text[start : text.index("```", start)])
    os.chown(root / "hello.py", pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    run = f"import os, runpy; os.chdir({str(root)!r}); runpy.run_path('hello.py', run_name='__main__')"
    out = Embedded(tailnet, tailnet.public_host("hello"), ["-c", run], key).wait()
    assert out.startswith("tailnet addresses: 100.64.") and "peer: tun1 100.64." in out
