"""Strings that nodes, users and API clients chose, printed by the CLI: never read as rich markup, their
control characters (ESC, newline, BEL, the bidi overrides) shown as escapes, and ``--json`` exact."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import nacl.public
import pytest
from click.testing import CliRunner
from rich.console import Console

from tailpy.cli import exit_node, status
from tailpy.cli.control import common
from tailpy.cli.main import cli
from tailpy.cli.safetext import assemble, fields, markup, visible, visible_lines
from tailpy.control import Store
from tailpy.ipnstate import HealthWarning, PeerStatus, SelfStatus, Status
from tailpy.keys import DiscoPublic, MachinePublic, NodePublic

MARKUP = "[/bold] [link=https://evil.example]click[/link]"
ESCAPES = "esc\x1b[31mred\x1b]0;pwned\x07x"
NEWLINE = "linux\nfake row"
BIDI = "\u202eevil"
HOSTILE = (MARKUP, ESCAPES, NEWLINE, BIDI)

SHOWN = {
    MARKUP: MARKUP,
    ESCAPES: "esc\\x1b[31mred\\x1b]0;pwned\\x07x",
    NEWLINE: "linux\\nfake row",
    BIDI: "\\u202eevil",
}

SGR = re.compile(r"\x1b\[[0-9;]*m")  # the styles rich itself writes on a terminal


def _console(out: io.StringIO, width: int = 400) -> Console:
    return Console(file=out, force_terminal=True, color_system="truecolor", width=width)


def _assert_clean(raw: str) -> str:
    """``raw`` (terminal output) holds no escape sequence, bell or bidi control that came from the hostile
    strings; return it without rich's own styles."""
    assert "\x1b[31mred" not in raw and "\x1b]" not in raw and "\x07" not in raw and "\u202e" not in raw
    plain = SGR.sub("", raw)
    assert "\x1b" not in plain
    return plain


def test_visible_escapes_every_control_character() -> None:
    for s, shown in SHOWN.items():
        assert visible(s) == shown
    assert (
        visible("tab\there\rcr\x00nul\x7fdel\x85nel\x9bcsi")
        == "tab\\there\\rcr\\x00nul\\x7fdel\\x85nel\\x9bcsi"
    )
    for cp in [0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]:
        assert visible(chr(cp)) == f"\\u{cp:04x}"
        assert visible_lines(chr(cp)) == f"\\u{cp:04x}"  # (line separators too: only \n keeps its line)
    # Everything else as it is: accents, CJK, emoji, backslashes, brackets.
    assert visible("café 東京 🙂 C:\\path [x]") == "café 東京 🙂 C:\\path [x]"
    assert visible_lines("a\n\tb\x1bc\rd") == "a\n\tb\\x1bc\\rd"
    assert markup(MARKUP) == "\\[/bold] \\[link=https://evil.example]click\\[/link]"


@pytest.mark.parametrize("hostile", HOSTILE)
def test_table_on_a_terminal_shows_hostile_cells_as_text(hostile: str) -> None:
    out = io.StringIO()
    common.table(
        ["ID", "NAME", "OS"], [["1", "alpha", hostile], ["2", hostile, "linux"]], console=_console(out)
    )
    plain = _assert_clean(out.getvalue())
    lines = plain.splitlines()
    assert len(lines) == 6  # top rule, header, rule, two rows, bottom rule: no forged row
    assert SHOWN[hostile] in lines[3] and SHOWN[hostile] in lines[4]
    assert "]8;" not in out.getvalue()  # no hyperlink (OSC 8) made of the [link=...] markup


def test_table_into_a_pipe_keeps_one_line_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "on_terminal", lambda: False)
    r = CliRunner().invoke(_table_command(), [])
    lines = r.output.splitlines()
    assert lines == ["ID\tOS", "1\tlinux\\nfake row", "2\tesc\\x1b[31mred\\x1b]0;pwned\\x07x", "3\ttab\\tin"]


def _table_command() -> Any:
    import click

    @click.command()
    def show() -> None:
        common.table(["ID", "OS"], [["1", NEWLINE], ["2", ESCAPES], ["3", "tab\tin"]])

    return show


def _mk() -> MachinePublic:
    return MachinePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def _nk() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


def _hostile_store(state: Path) -> None:
    """A control database with a node whose hostname and OS are hostile, and an API key whose description
    is markup."""
    store = Store(state)
    try:
        key = store.create_auth_key(reusable=True, expires=None, now=time.time())
        store.register(_mk(), _nk(), ESCAPES, key.key, time.time(), os_name=NEWLINE)
        store.register(_mk(), _nk(), "beta", key.key, time.time(), os_name=MARKUP)
        store.register(_mk(), _nk(), "gamma", key.key, time.time(), os_name=BIDI)
        store.add_api_key(
            prefix="0123456789",
            secret="s" * 32,
            description="[/red] oops",
            created_by=ESCAPES,
            now=time.time(),
            expires_at=None,
        )
    finally:
        store.close()


def test_nodes_show_and_json_of_a_hostile_node(tmp_path: Path) -> None:
    _hostile_store(tmp_path)
    runner = CliRunner()
    r = runner.invoke(cli, ["control", "nodes", "show", "1", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    lines = r.output.splitlines()
    assert len(lines) == 12  # one per field: the newline in the OS forged none
    assert f"hostname:     {SHOWN[ESCAPES]}" in lines
    assert f"os:           {SHOWN[NEWLINE]}" in lines
    r = runner.invoke(cli, ["control", "nodes", "show", "1", "--json", "--state-dir", str(tmp_path)])
    shown = json.loads(r.output)
    assert shown["hostname"] == ESCAPES and shown["os"] == NEWLINE  # exact
    assert "\x1b" not in r.output  # (json.dumps writes it as \u001b)


def test_lists_on_a_terminal_with_hostile_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nodes list` and `apikey list` on a terminal (rich's Console, FORCE_COLOR): no MarkupError, nothing
    forged."""
    _hostile_store(tmp_path)
    monkeypatch.setattr(common, "on_terminal", lambda: True)
    env = {"FORCE_COLOR": "1", "COLUMNS": "400", "TAILPY_CONTROL_STATE_DIR": str(tmp_path)}
    runner = CliRunner()
    r = runner.invoke(cli, ["control", "nodes", "list"], env=env)
    assert r.exit_code == 0, r.output
    plain = _assert_clean(r.output)
    for s in (NEWLINE, MARKUP, BIDI):  # (the NAME column holds the hostname made a DNS label)
        assert SHOWN[s] in plain
    assert len(plain.splitlines()) == 3 + 3 + 1
    r = runner.invoke(cli, ["control", "apikey", "list"], env=env)
    assert r.exit_code == 0, r.output
    plain = _assert_clean(r.output)
    assert "[/red] oops" in plain and SHOWN[ESCAPES] in plain


def _peer(i: int, name: str, os_name: str) -> PeerStatus:
    return PeerStatus(
        id=i, name=name, fqdn=f"{name}.tail.example", hostname=name, user=MARKUP, tags=(), os=os_name,
        node_key=NodePublic(bytes([i]) * 32), addresses=(f"100.64.0.{i}/32",), online=True, last_seen=None,
        key_expiry=None, expired=False, home_derp=0, disco_key=None, endpoints=(), endpoint=None,
        path="relay", relay_region=1, relay_region_code=BIDI, last_handshake=None, active=False, tx_bytes=0,
        rx_bytes=0, exit_node_option=True,
    )  # fmt: skip


def _status() -> Status:
    me = SelfStatus(
        id=1, name="n1", fqdn="n1.tail.example", hostname="host1", user="alice@example.com", tags=(),
        os="linux", key_expiry=None, expired=False, node_key=NodePublic(bytes([1]) * 32),
        machine_key=_mk(), disco_key=DiscoPublic(bytes([7]) * 32), addresses=("100.64.0.1/32",),
        listen_port=41641, endpoints=(), tun="tailpy0", home_derp=0, home_derp_code="",
    )  # fmt: skip
    peers = (_peer(2, ESCAPES, NEWLINE), _peer(3, MARKUP, ESCAPES))
    return Status(
        backend_state="Starting", login_server="http://192.0.2.1:8080", control_connected=True,
        error=f"control says {MARKUP}", auth_url="", login_pending=False,
        health=(HealthWarning("derp", "high", f"peer {ESCAPES} {NEWLINE}", 1.0),), now=1000.0, self_node=me,
        domain="tail.example", peers=peers, device=None, derp=None, derp_map=None, traversal=None,
        ignored_datagrams=0, dns=None, exit_node=MARKUP,
    )  # fmt: skip


def test_status_on_a_terminal_with_hostile_peers() -> None:
    out = io.StringIO()
    status.render(_status(), _console(out, width=200))
    plain = _assert_clean(out.getvalue())
    lines = plain.splitlines()
    # state, health, exit node, then self and two peers: one line each
    assert len(lines) == 6, lines
    assert lines[0] == f"Starting: control says {MARKUP}"
    assert lines[1] == f"health: derp: peer {SHOWN[ESCAPES]} {SHOWN[NEWLINE]}"
    assert lines[2] == f"exit node: {MARKUP}"
    assert SHOWN[ESCAPES] in lines[4] and SHOWN[NEWLINE] in lines[4] and SHOWN[BIDI] in lines[4]
    assert MARKUP in lines[5]


def test_exit_node_list_escapes_names_and_assemble_keeps_styles() -> None:
    lines = exit_node.table(exit_node.candidates(_status()))
    assert len(lines) == 3 and SHOWN[ESCAPES] in "".join(lines) and "\x1b" not in "".join(lines)
    text = assemble(("health:", "red"), f" {NEWLINE}")
    assert text.plain == "health: linux\\nfake row" and text.spans[0].style == "red"


def test_fields_as_whois_prints_them(capsys: pytest.CaptureFixture[str]) -> None:
    fields([("  OS", NEWLINE), ("User", MARKUP)], 16, sep="")
    assert capsys.readouterr().out == f"  OS:           {SHOWN[NEWLINE]}\nUser:           {MARKUP}\n"


def test_an_error_quoting_a_hostile_name_stays_one_line(tmp_path: Path) -> None:
    _hostile_store(tmp_path)
    r = CliRunner().invoke(cli, ["control", "nodes", "show", NEWLINE, "--state-dir", str(tmp_path)])
    assert r.exit_code == 1 and r.output.startswith("tailpy: ") and r.output.count("\n") == 1, r.output
    assert SHOWN[NEWLINE] in r.output


def _read_pty(fd: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError as e:  # EIO: the child closed its end
                if e.errno == errno.EIO:
                    break
                raise
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_nodes_list_on_a_real_terminal(tmp_path: Path) -> None:
    """`tailpy control nodes list` as a process whose stdout is a pseudo-terminal, as an admin's shell runs
    it: rich draws the table; a hostile hostname or OS neither crashes it nor reaches the terminal raw."""
    _hostile_store(tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "400", "LINES": "50"}
    for k in ("NO_COLOR", "FORCE_COLOR", "TAILPY_CONTROL_URL"):
        env.pop(k, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailpy.cli.main", "control", "nodes", "list", "--state-dir", str(tmp_path)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    try:
        raw = _read_pty(master, proc).decode()
        assert proc.wait(timeout=30) == 0, raw
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in raw and "MarkupError" not in raw
    assert SGR.search(raw), "rich did not see a terminal"
    plain = _assert_clean(raw).replace("\r\n", "\n")
    lines = plain.splitlines()
    assert len(lines) == 3 + 3 + 1, plain  # rules and header, three nodes, bottom rule
    for s in (NEWLINE, MARKUP, BIDI):  # each OS on its node's row
        assert sum(SHOWN[s] in line for line in lines) == 1, plain
