"""`tailpy control policy get|set|history|check|test|filter`: the tailnet policy (Tailscale's policy file
format, HuJSON), its checks, and the packet filter it compiles to for a node (:mod:`tailpy.control.acl`)."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Any

import click

from tailpy.cli.control.common import (
    admin,
    control_url,
    db_option,
    json_option,
    print_json,
    remote_options,
    state_dir_option,
    table,
    when,
    with_admin_note,
)
from tailpy.control.policy import hujson
from tailpy.errors import ConfigError, TailpyError

policy_file_argument = click.argument("file", type=click.Path(dir_okay=False, path_type=Path))


@click.group("policy")
def command() -> None:
    """The tailnet policy: who may reach what (Tailscale's policy file format, HuJSON).

    With no policy set every node may reach every other (Tailscale's default). A policy lives in control's
    database with its history (`policy set`), or in a file given to `tailpy control serve --policy FILE`."""


def _read(file: Path) -> str:
    """FILE's text. Raises ConfigError: unreadable, not UTF-8, or larger than a policy may be (checked
    before reading, so a huge file is refused with the same sentence as control's)."""
    from tailpy.control.store.policy import MAX_POLICY_BYTES

    try:
        if file.stat().st_size > MAX_POLICY_BYTES:
            raise ConfigError(f"{file}: a policy may have at most {MAX_POLICY_BYTES} bytes")
        data = file.read_bytes()
        if len(data) > MAX_POLICY_BYTES:  # (grew since the look)
            raise ConfigError(f"{file}: a policy may have at most {MAX_POLICY_BYTES} bytes")
        return hujson.decode(data)
    except hujson.HuJSONError as e:
        raise ConfigError(f"{file}: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {file}: {e.strerror or e}") from None


def _notes(result: dict[str, Any]) -> None:
    for section in result.get("not_enforced") or []:
        click.echo(f"not enforced yet: {section} (accepted, has no effect)")
    for w in result.get("warnings") or []:
        click.echo(f"warning: {w}")


def _clock(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


def _who(result: dict[str, Any]) -> str:
    at = result.get("set_at")
    since = f", {when(at, time.time())}" if isinstance(at, (int, float)) else ""
    if result.get("source") == "file":
        refused = result.get("refused")
        if isinstance(refused, dict):
            loaded = f" loaded at {_clock(at)}" if isinstance(at, (int, float)) else ""
            return (
                f"from file {result.get('path')}: the file's current content was refused at "
                f"{_clock(float(refused.get('at') or 0))}: {refused.get('error')}; running the policy{loaded}"
            )
        return f"from file {result.get('path')} (loaded{since})"
    return f"policy {result.get('id')}, set by {result.get('set_by') or '?'}{since}"


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"


@command.command("get")
@state_dir_option
@db_option
@json_option
def policy_get(state_dir: Path | None, db: str | None, as_json: bool) -> None:
    """Print the running policy (its text as it was given) and who set it when. With `serve --policy FILE`,
    an edit of FILE that was refused is said first (the previous policy keeps running); --json gives it as
    `refused` {at, error}."""
    result = admin(state_dir, db, "policy.get", {})
    if as_json:
        print_json(result)
        return
    if result.get("policy") is None:
        click.echo(result.get("message") or "no policy set")
        return
    click.echo(f"# {_who(result)}")
    click.echo(str(result["policy"]).rstrip("\n"))


@command.command("set")
@state_dir_option
@db_option
@json_option
@policy_file_argument
def policy_set(state_dir: Path | None, db: str | None, as_json: bool, file: Path) -> None:
    """Make FILE the tailnet policy, after checking it: it must parse, define every group, tag and host
    it uses, and pass its `tests` against the current nodes. A refused policy is reported as
    FILE:LINE:COLUMN: what is wrong, and the running policy stays. Refused when control runs with
    `serve --policy FILE` (edit that file instead). To go back to an older policy: `tailpy control policy
    history show ID > old.hujson`, then `tailpy control policy set old.hujson`."""
    result = admin(state_dir, db, "policy.set", {"text": _read(file), "file": str(file), "by": _login_name()})
    if as_json:
        print_json(result)
        return
    click.echo(f"policy set: {_who(result)}")
    _notes(result)


optional_state_dir_option = click.option(
    "--state-dir",
    envvar="TAILPY_CONTROL_STATE_DIR",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the server's database and key (default: $TAILPY_CONTROL_STATE_DIR).",
)


@command.group("history", invoke_without_command=True)
@optional_state_dir_option
@remote_options
@db_option
@json_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="How many.")
@click.pass_context
def policy_history(
    ctx: click.Context, state_dir: Path | None, db: str | None, as_json: bool, limit: int
) -> None:
    """List the policies stored with `policy set`, newest (the running one) first: id, who set it, when,
    and size. `policy history show ID` prints one; to restore it, save that and `policy set` it. (A
    `serve --policy FILE` policy is the file's and is not stored.)"""
    if ctx.invoked_subcommand is not None:
        return
    result = admin(state_dir, db, "policy.history", {"limit": limit})
    if as_json:
        print_json(result)
        return
    now = time.time()
    table(
        ["ID", "SET BY", "SET", "LINES"],
        [
            [str(r["id"]), r["set_by"] or "-", when(r["set_at"], now), str(r["text"].count("\n") + 1)]
            for r in result
        ],
    )


@policy_history.command("show")
@state_dir_option
@db_option
@json_option
@click.argument("policy_id", metavar="ID", type=int)
def policy_history_show(state_dir: Path | None, db: str | None, as_json: bool, policy_id: int) -> None:
    """Print stored policy ID (from `policy history`) as it was set. To make it the running policy again:
    `tailpy control policy history show ID > old.hujson && tailpy control policy set old.hujson`."""
    result = admin(state_dir, db, "policy.show", {"id": policy_id})
    if as_json:
        print_json(result)
        return
    click.echo(str(result["text"]).rstrip("\n"))


def _offline(state_dir: Path | None, db: str | None) -> bool:
    """Whether there is no control to ask: no --db, and no server socket nor SQLite database in
    ``state_dir``."""
    from tailpy.control.admin import SOCKET_NAME

    if db is not None or control_url(state_dir) is not None:
        return False
    if state_dir is None:
        return True
    return not ((state_dir / SOCKET_NAME).exists() or (state_dir / "control.db").exists())


WITHOUT_NODES = (
    "no control database: tests were evaluated without nodes (users, groups and tags by who they are; an "
    "IP address or prefix matches only rules that name addresses)"
)


@command.command("check")
@click.option(
    "--state-dir",
    envvar="TAILPY_CONTROL_STATE_DIR",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the server's database (default: $TAILPY_CONTROL_STATE_DIR). Without a database the "
    "policy is checked alone, its tests without nodes (for CI).",
)
@remote_options
@db_option
@json_option
@policy_file_argument
def policy_check(state_dir: Path | None, db: str | None, as_json: bool, file: Path) -> None:
    """Check FILE as `policy set` would (syntax, definitions, `tests` against the current nodes) and store
    nothing; print the sections accepted but not enforced yet, and warnings. Works without a control
    database too (lint a policy in CI): then the tests run without nodes. --json prints {"ok": true,
    "not_enforced", "warnings", "note"?} or {"ok": false, "errors": [FILE:LINE:COLUMN: ...]} (exit
    status 1)."""
    try:
        text = _read(file)
        if _offline(state_dir, db):
            from tailpy.control import acl
            from tailpy.control.admin import policy_notes

            policy = acl.check(text, str(file), [])
            result: dict[str, Any] = policy_notes(policy)
            if policy.tests:
                result["note"] = WITHOUT_NODES
        else:
            result = admin(state_dir, db, "policy.check", {"text": text, "file": str(file)})
    except TailpyError as e:
        if not as_json:
            raise
        errors = getattr(e, "errors", None) or (str(e),)
        print_json({"ok": False, "errors": list(errors)})
        raise SystemExit(1) from None
    if as_json:
        print_json({"ok": True, **result})
        return
    click.echo(f"{file}: ok")
    if result.get("note"):
        click.echo(f"note: {result['note']}")
    _notes(result)


@command.command("test")
@state_dir_option
@db_option
@json_option
@policy_file_argument
def policy_test(state_dir: Path | None, db: str | None, as_json: bool, file: Path) -> None:
    """Run the `tests` section of FILE against the current nodes and print each test's result, PASS or
    FAIL with FILE:LINE:COLUMN (exit status 1 when one fails); stores nothing."""
    result = admin(state_dir, db, "policy.test", {"text": _read(file), "file": str(file)})
    failures = list(result.get("failures") or [])
    if as_json:
        print_json(result)
    else:
        for r in result.get("results") or []:
            if r.get("ok"):
                click.echo(f"PASS {r.get('at')}: {r.get('test')} (src {r.get('src')})")
            for f in r.get("failures") or []:
                click.echo(f"FAIL {r.get('at')}: {f}")
        total = int(result.get("tests") or 0)
        if total == 0:
            click.echo(f"{file}: has no tests")
        else:
            click.echo(f"{file}: {total - len(failures)} of {total} tests pass")
    if failures:
        raise SystemExit(1)


def _describe(rule: dict[str, Any]) -> str:
    protos = rule.get("IPProto") or []
    names = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
    proto = ",".join(names.get(p, str(p)) for p in protos) or "tcp,udp,icmp"
    dsts = []
    for d in rule.get("DstPorts", []):
        p = d.get("Ports", {})
        first, last = p.get("First", 0), p.get("Last", 65535)
        ports = "*" if (first, last) == (0, 65535) else str(first) if first == last else f"{first}-{last}"
        ip = str(d.get("IP"))
        dsts.append(f"[{ip}]:{ports}" if ":" in ip else f"{ip}:{ports}")
    return f"from {', '.join(rule.get('SrcIPs', []))}\n    to {', '.join(dsts)} ({proto})"


@command.command("filter")
@state_dir_option
@db_option
@json_option
@click.argument("node")
def policy_filter(state_dir: Path | None, db: str | None, as_json: bool, node: str) -> None:
    """Print the packet filter NODE (id, name or FQDN) receives: the rules whose destination is that node.
    --json prints exactly Tailscale's tailcfg.FilterRule list ({"SrcIPs", "DstPorts": [{"IP", "Ports":
    {"First", "Last"}}], "IPProto"?}), as Tailscale renders it (a `*` source becomes the tailnet's ranges)."""
    result = admin(state_dir, db, "policy.filter", {"node": node})
    rules = result.get("rules") or []
    if as_json:
        click.echo(json.dumps(rules, indent=2))
        return
    n = result.get("node") or {}
    if not rules:
        click.echo(f"node {n.get('id')} {n.get('name')}: no rule lets anything in (inbound dropped)")
        return
    click.echo(f"node {n.get('id')} {n.get('name')}: {len(rules)} rule{'' if len(rules) == 1 else 's'}")
    for r in rules:
        click.echo("  " + _describe(r))


with_admin_note(
    [policy_get, policy_set, policy_history, policy_history_show, policy_check, policy_test, policy_filter]
)

__all__ = ["command"]
