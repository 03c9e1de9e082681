"""Issue 7 in the lab: nodes started without a key are brought up by a browser login.

The control server (``tailpy control serve --oidc-*``) and the test OpenID Connect provider
(tests/_oidc_provider.py: real RS256 ID tokens, PKCE, one-use codes) run on the lab's control host; each node
runs ``tailpy up`` with no auth key, which prints a login URL; headless Chromium (Debian's, through Selenium)
follows it inside the node's namespace and signs in. A user outside the allowed domain is refused with a
clear page and the node stays logged out; signing in with an allowed account then brings it up.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _browser_login import unavailable_reason
from tailpy.lab import Lab, wait_for
from tailpy.lab.procs import read_line, stop_process
from tailpy.lab.tailnet import LabNode, LabTailnet, tailpy_argv

pytestmark = pytest.mark.lab

TESTS = Path(__file__).resolve().parents[1]
PROVIDER_PORT = 5556
USERS = ("alice:pw-alice:alice@example.com:staff", "bob:pw-bob:bob@other.org")
URL = re.compile(r"(https?://\S+/login/\S+)")


@pytest.fixture
def tailnet(lab: Lab) -> LabTailnet:
    return oidc_tailnet(lab, "--oidc-allowed-domain", "example.com")


def oidc_tailnet(lab: Lab, *control_args: str, token_lifetime: int = 3600) -> LabTailnet:
    """The lab's tailnet with the test provider on the control host and ``control serve --oidc-*``; the
    provider's ID tokens last ``token_lifetime`` seconds."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"browser login: {reason}")
    net = LabTailnet(lab)
    ctrl = net.lan.ip(net.control_host)
    issuer = f"http://{ctrl}:{PROVIDER_PORT}"
    secret = net.root / "oidc-secret"
    secret.write_text("lab-client-secret\n")
    plog = open(net.root / "provider.log", "w")  # noqa: SIM115 - handed to the child, closed below
    provider = net.control_host.popen(
        [
            sys.executable,
            str(TESTS / "_oidc_provider.py"),
            "--listen",
            f"0.0.0.0:{PROVIDER_PORT}",
            "--issuer",
            issuer,
            "--client-id",
            "tailpy-lab",
            "--client-secret",
            "lab-client-secret",
            "--redirect-uri",
            f"{net.control_url}/oidc/callback",
            *(a for u in USERS for a in ("--user", u)),
            *("--token-lifetime", str(token_lifetime)),
        ],
        stdout=subprocess.PIPE,
        stderr=plog,
    )
    plog.close()
    assert provider.stdout is not None
    assert read_line(provider.stdout, 30, "the OIDC provider to start") == "ready"
    net.start_control(
        "--oidc-issuer",
        issuer,
        "--oidc-client-id",
        "tailpy-lab",
        "--oidc-client-secret-file",
        str(secret),
        "--server-url",
        net.control_url,
        *control_args,
    )
    return net


class Up:
    """``tailpy up`` with no key on ``node``, in the background; its stderr is read by a thread (the login
    URL and notes go there), so nothing waits on a pipe's buffering."""

    def __init__(self, node: LabNode, *args: str, command: str = "up") -> None:
        """``args``: instead of ``--login-server <the lab's> --hostname <node>``."""
        if not args:
            args = ("--login-server", node.tailnet.control_url, "--hostname", node.name)
        argv = tailpy_argv(command, *args, "--socket", node.socket)
        self.proc = node.host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def url(self) -> str:
        def found() -> str | None:
            return next((m.group(1) for line in self.err if (m := URL.search(line))), None)

        return wait_for(found, timeout=60, what=f"tailpy up to print a login URL ({self.err})", interval=0.1)

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        """Wait for it to exit: (exit status, stdout, stderr)."""
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        assert self.proc.stdout is not None
        return rc, self.proc.stdout.read(), "".join(self.err)


def browse(node: LabNode, url: str, user: str, password: str) -> dict[str, str]:
    out = node.host.run(
        [sys.executable, str(TESTS / "_browser_login.py"), url, user, password], timeout=120
    ).stdout
    page: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    assert "Traceback" not in page["text"]
    return page


def test_browser_login_brings_nodes_up_and_refuses_a_disallowed_user(tailnet: LabTailnet) -> None:
    n1 = tailnet.add_node("n1")
    up1 = Up(n1)
    url1 = up1.url()
    st = n1.status()
    assert st["backend_state"] == "NeedsLogin" and st["auth_url"] == url1
    page = browse(n1, url1, "alice", "pw-alice")
    assert page["heading"].startswith("Signed in") and "alice@example.com" in page["text"], page
    rc, out, err = up1.finish()
    assert rc == 0, err
    assert out.startswith("connected: n1 100.64."), out
    st = n1.status()
    assert st["backend_state"] == "Running" and st["self"]["user"] == "alice@example.com"

    # Bob's email domain is not admitted: a clear page, and n2 stays logged out (still waiting).
    n2 = tailnet.add_node("n2")
    up2 = Up(n2)
    url2 = up2.url()
    page = browse(n2, url2, "bob", "pw-bob")
    assert page["heading"] == "This account may not join the tailnet", page
    assert "bob@other.org" in page["text"] and "was not added" in page["text"]
    st = wait_for(lambda: (s := n2.status())["error"] and s, timeout=40, what="n2 to hear of the refusal")
    assert st["backend_state"] == "NeedsLogin" and "not allowed" in st["error"]
    assert up2.proc.poll() is None  # `tailpy up` keeps waiting for a sign-in
    listed = json.loads(tailnet.control("nodes", "list", "--json"))
    assert [n["name"] for n in listed] == ["n1"]

    # Signing in with an allowed account from the same link brings n2 up; the two reach each other.
    page = browse(n2, st["auth_url"], "alice", "pw-alice")
    assert page["heading"].startswith("Signed in"), page
    rc, out, err = up2.finish()
    assert rc == 0 and out.startswith("connected: n2"), err
    assert "not allowed" in err  # the refusal was shown to the user at the terminal
    n1.wait_peers(1)
    n2.wait_peers(1)
    n2.ping(n1.ip(), count=2)
    stop_process(up1.proc)
    stop_process(up2.proc)


def test_approval_in_the_lab(lab: Lab) -> None:
    """With --approve-nodes a node that signed in waits until `tailpy control nodes approve` (through the
    running server's admin socket), then comes up."""
    net = oidc_tailnet(lab, "--approve-nodes")
    n1 = net.add_node("n1")
    up = Up(n1)
    page = browse(n1, up.url(), "bob", "pw-bob")  # no domain restriction here
    assert page["heading"] == "Signed in: waiting for approval", page
    st = wait_for(
        lambda: (s := n1.status())["error"].startswith("signed in; waiting") and s,
        timeout=40,
        what="n1 to hear it waits for approval",
    )
    assert st["backend_state"] == "NeedsLogin" and up.proc.poll() is None
    [pending] = json.loads(net.control("nodes", "pending", "--json"))
    assert pending["hostname"] == "n1" and pending["email"] == "bob@other.org"
    assert json.loads(net.control("nodes", "list", "--json")) == []
    assert "approved: node" in net.control("nodes", "approve", str(pending["id"]))
    rc, out, err = up.finish()
    assert rc == 0 and out.startswith("connected: n1 100.64."), err
    assert n1.status()["self"]["user"] == "bob@other.org"


def test_token_expiry_pending_login_and_messages(lab: Lab) -> None:
    """With --oidc-expiry-from-token and 40 s ID tokens: a plain `tailpy up` after Ctrl-C continues the
    pending login; node key rotation keeps the token's expiry and tailpyd rotates once, not in a loop; at
    expiry the node needs login and `tailpy login` renews it; a deleted node is told to run `tailpy login`."""
    net = oidc_tailnet(lab, "--oidc-expiry-from-token", token_lifetime=40)
    n1 = net.add_node("n1")
    first = Up(n1)
    url = first.url()
    first.proc.send_signal(signal.SIGINT)  # Ctrl-C while waiting: the login stays pending in tailpyd
    first.proc.wait(timeout=30)
    st = n1.status()
    assert st["login_pending"] and st["auth_url"] == url and st["login_server"] == net.control_url, st
    again = Up(n1, "--hostname", "n1")  # no --login-server: continues the pending login
    assert again.url() == url
    page = browse(n1, url, "alice", "pw-alice")
    assert page["heading"].startswith("Signed in"), page
    rc, out, err = again.finish()
    assert rc == 0 and out.startswith("connected: n1"), err

    [node] = json.loads(net.control("nodes", "list", "--json"))
    expiry, key = node["key_expiry"], node["node_key"]
    assert expiry is not None and 0 < expiry - time.time() <= 40
    # tailpyd rotates at half the key's life; control keeps the token's expiry, and tailpyd stops there.
    wait_for(
        lambda: "node key expiry stays" in n1.log.read_text(), timeout=60, what="n1 to rotate its node key"
    )
    [node] = json.loads(net.control("nodes", "list", "--json"))
    assert node["node_key"] != key and node["key_expiry"] == expiry
    st = wait_for(
        lambda: (s := n1.status())["backend_state"] == "NeedsLogin" and s,
        timeout=90,
        what="n1's key to expire",
    )
    assert "tailpy login" in st["error"], st
    assert n1.log.read_text().count("node key rotated") == 1

    renew = Up(n1, command="login")
    page = browse(n1, renew.url(), "alice", "pw-alice")
    assert page["heading"].startswith("Signed in"), page
    rc, out, err = renew.finish()
    assert rc == 0 and out.startswith("connected: n1"), err
    [node] = json.loads(net.control("nodes", "list", "--json"))
    assert node["key_expiry"] > expiry

    net.control("nodes", "delete", str(node["id"]))
    st = wait_for(
        lambda: (s := n1.status())["backend_state"] == "NeedsLogin" and s,
        timeout=60,
        what="n1 to hear it was deleted",
    )
    assert "removed from the tailnet" in st["error"] and "tailpy login" in st["error"], st
