"""The policy reader's checks that follow Tailscale's: unknown fields and sections refused, targets tailpy
does not enforce left out with a warning, Tailscale's tag rule, ports, host names, references in ``ssh``
and ``autoApprovers``, and the messages for a missing action, a byte order mark and bytes that are not
UTF-8."""

from __future__ import annotations

import pytest

from tailpy.control.policy import Policy, PolicyError, PolicyNode, check_tests, compile_filter
from tailpy.control.policy.hujson import HuJSONError, decode, parse
from tailpy.control.policy.model import ENTRY_FIELDS, NOT_ENFORCED_SECTIONS, tag_error
from tailpy.control.tags import parse_tags
from tailpy.errors import ConfigError


def refused(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        Policy.parse(text)
    return e.value


# --- unknown fields and sections ---


def test_a_misspelt_acl_field_is_refused_with_its_position_and_a_suggestion() -> None:
    e = refused('{"acls":[{"action":"accept","src":["bob@"],"dst":["*:*"],"prot":"tcp"}]}')
    assert e.message == 'acls[0]: unknown field "prot" (did you mean "proto"?)'
    assert (e.line, e.column) == (1, 58)


def test_an_unknown_top_level_section_is_refused_not_read_as_allow_all() -> None:
    e = refused('{\n  "acl": [{"action": "accept", "src": ["bob@"], "dst": ["*:22"]}]\n}')
    assert e.message == 'policy: unknown section "acl" (did you mean "acls"?)'
    assert (e.line, e.column) == (2, 3)


@pytest.mark.parametrize(
    ("entry", "section", "field"),
    [
        ('{"src": "bob@", "accept": ["1.2.3.4:22"], "dst": ["1.2.3.4:22"]}', "tests", "dst"),
        ('{"src": ["*"], "dst": ["*"], "ip": ["*"], "ips": ["*"]}', "grants", "ips"),
        ('{"action": "accept", "src": ["*"], "dst": ["*"], "user": ["root"]}', "ssh", "user"),
        ('{"src": "bob@", "dst": ["1.2.3.4"], "accepts": ["root"]}', "sshTests", "accepts"),
    ],
)
def test_unknown_fields_are_refused_in_every_list_section(entry: str, section: str, field: str) -> None:
    e = refused(f'{{"{section}": [{entry}]}}')
    assert e.message.startswith(f'{section}[0]: unknown field "{field}"')
    assert e.line == 1 and e.column is not None


def test_every_field_tailscale_documents_is_accepted() -> None:
    pol = Policy.parse(
        """{
          "tagOwners": {"tag:srv": ["autogroup:member"]},
          "postures": {"posture:latest": ["node:tsReleaseTrack == 'stable'"]},
          "acls": [{"action": "accept", "src": ["*"], "proto": "tcp", "dst": ["tag:srv:22"]},
                   {"action": "accept", "users": ["*"], "ports": ["tag:srv:80"],
                    "srcPosture": ["posture:latest"]}],
          "grants": [{"src": ["*"], "dst": ["tag:srv"], "ip": ["443"], "app": {}, "via": ["tag:srv"],
                      "srcPosture": ["posture:latest"]}],
          "ssh": [{"action": "check", "src": ["autogroup:member"], "dst": ["tag:srv"], "users": ["root"],
                   "checkPeriod": "12h", "acceptEnv": ["LANG"], "srcPosture": ["posture:latest"],
                   "recorder": ["tag:srv"], "enforceRecorder": false}],
          "sshTests": [{"src": "bob@", "dst": ["tag:srv"], "accept": ["root"], "check": [], "deny": []}],
          "tests": [{"src": "bob@", "proto": "tcp", "accept": ["tag:srv:22"], "deny": ["tag:srv:23"]}],
          "nodeAttrs": [{"target": ["*"], "attr": ["funnel"]}],
          "defaultSrcPosture": [], "ipsets": {}, "derpMap": {}, "disableIPv4": false,
          "OneCGNATRoute": "", "randomizeClientPort": false, "attrConfig": {}, "autoApprovers": {},
        }"""
    )
    assert set(pol.not_enforced) >= {"ssh", "sshTests", "postures", "nodeAttrs", "OneCGNATRoute"}
    assert all(f in ENTRY_FIELDS[s] for s in ("acls", "grants") for f in ("src", "dst", "srcPosture"))


@pytest.mark.parametrize("name", ["ACLs", "Acls", "TAGOWNERS", "tagowners", "AutoApprovers", "SSHTests"])
def test_section_names_match_without_regard_to_case_as_go_does(name: str) -> None:
    value = "[]" if name.lower() in ("acls", "sshtests") else "{}"
    Policy.parse(f'{{"{name}": {value}}}')
    assert "autoApprovers" not in NOT_ENFORCED_SECTIONS  # enforced: it approves routes and exit nodes


def test_field_names_match_without_regard_to_case_but_once() -> None:
    pol = Policy.parse('{"acls": [{"Action": "accept", "SRC": ["*"], "Dst": ["*:22"], "PROTO": "tcp"}]}')
    assert pol.rules[0].protos == (6,)
    e = refused('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "Src": ["*"]}]}')
    assert "given twice" in e.message


# --- targets tailpy does not enforce ---


def test_an_ip_set_source_is_left_out_with_a_warning() -> None:
    pol = Policy.parse(
        '{"ipsets": {"ipset:prod": ["192.0.2.0/24"]},'
        ' "acls": [{"action": "accept", "src": ["ipset:prod"], "dst": ["*:22"]},'
        '          {"action": "accept", "src": ["ipset:prod", "bob@"], "dst": ["*:80"]}]}'
    )
    assert [r.where for r in pol.rules] == ["acls[1]"]  # acls[0] had no source left
    assert [a.name for a in pol.rules[0].srcs] == ["bob@"]
    assert any("ipset:prod" in w and "not enforced" in w for w in pol.warnings)
    assert "ipsets" in pol.not_enforced
    assert (
        "not defined in ipsets"
        in refused('{"acls": [{"action": "accept", "src": ["ipset:x"], "dst": ["*:*"]}]}').message
    )


def test_a_service_destination_is_left_out_with_a_warning() -> None:
    pol = Policy.parse('{"grants": [{"src": ["*"], "dst": ["svc:web"], "ip": ["tcp:443"]}]}')
    assert pol.rules == ()
    assert any("svc:web" in w and "not enforced" in w for w in pol.warnings)
    pol = Policy.parse('{"grants": [{"src": ["*"], "dst": ["svc:web", "192.0.2.1"], "ip": ["tcp:443"]}]}')
    assert [d.alias.name for d in pol.rules[0].dsts] == ["192.0.2.1"]
    node = PolicyNode(1, ("192.0.2.1/32",), user="bob")
    assert compile_filter(pol, 1, [node])  # the enforced target still has its rule


# --- tags ---


@pytest.mark.parametrize("tag", ["tag:prod", "tag:Prod", "tag:web-2", "tag:A"])
def test_tailscale_tag_names_are_valid(tag: str) -> None:
    assert tag_error(tag) is None
    assert parse_tags([tag]) == (tag,)
    Policy.parse(f'{{"tagOwners": {{"{tag}": []}}}}')


@pytest.mark.parametrize(
    ("tag", "why"),
    [
        ("tag:a_b", "may contain only letters"),
        ("tag:a.b", "may contain only letters"),
        ("tag:1abc", "must start with a letter"),
        ("tag:-a", "must start with a letter"),
        ("tag:пром", "must start with a letter"),
        ("tag:aпром", "may contain only letters"),
        ("tag:", "is empty"),
        ("Tag:x", "must start with 'tag:'"),
    ],
)
def test_tags_outside_tailscales_rule_are_refused_by_policy_and_auth_keys_alike(tag: str, why: str) -> None:
    problem = tag_error(tag)
    assert problem is not None and why in problem
    assert why in refused(f'{{"tagOwners": {{"{tag}": []}}}}').message
    if tag.startswith("tag:"):
        with pytest.raises(ConfigError, match=why):
            parse_tags([tag])


def test_tags_and_groups_are_case_sensitive() -> None:
    assert (
        "tag:PROD is not defined"
        in refused(
            '{"tagOwners": {"tag:prod": []},'
            ' "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:PROD:*"]}]}'
        ).message
    )
    assert (
        "group:Dev is not defined"
        in refused(
            '{"groups": {"group:dev": ["bob@"]},'
            ' "acls": [{"action": "accept", "src": ["group:Dev"], "dst": ["*:*"]}]}'
        ).message
    )
    pol = Policy.parse(
        '{"tagOwners": {"tag:Prod": [], "tag:prod": []},'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:Prod:22"]}]}'
    )
    big = PolicyNode(1, ("100.64.0.1/32",), tags=("tag:Prod",))
    small = PolicyNode(2, ("100.64.0.2/32",), tags=("tag:prod",))
    assert compile_filter(pol, 1, [big, small]) and not compile_filter(pol, 2, [big, small])
    assert pol.may_own("tag:prod", "bob") is False


# --- ports, hosts, references ---


@pytest.mark.parametrize("dst", ["*:0", "*:0-10", "*:22,0"])
def test_port_zero_is_refused_as_tailscale_refuses_it(dst: str) -> None:
    e = refused(f'{{"acls": [{{"action": "accept", "src": ["*"], "dst": ["{dst}"]}}]}}')
    assert "first port must be > 0" in e.message


def test_port_zero_in_a_grant_is_refused_and_star_still_means_every_port() -> None:
    assert (
        "first port must be > 0"
        in refused('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:0"]}]}').message
    )
    pol = Policy.parse('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:*", "1-65535"]}]}')
    assert {(p.first, p.last) for r in pol.rules for d in r.dsts for p in d.ports} == {(0, 65535), (1, 65535)}


@pytest.mark.parametrize("name", ["100.64.0.1", "fd7a:115c:a1e0::1", "10.0.0.0/8", "a/b", "a:b"])
def test_host_names_that_are_addresses_or_hold_separators_are_refused(name: str) -> None:
    e = refused(f'{{"hosts": {{"{name}": "192.0.2.1"}}}}')
    assert "host name" in e.message and "is not valid" in e.message
    assert (e.line, e.column) == (1, 12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"ssh": [{"action": "accept", "src": ["group:nope"], "dst": ["autogroup:self"],'
            ' "users": ["root"]}]}',
            "ssh[0].src: group:nope is not defined",
        ),
        (
            '{"ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:nope"],'
            ' "users": ["root"]}]}',
            "ssh[0].dst: tag:nope is not defined in tagOwners",
        ),
        (
            '{"autoApprovers": {"routes": {"10.0.0.0/8": ["group:nope"]}}}',
            "autoApprovers.routes['10.0.0.0/8']: group:nope is not defined",
        ),
        ('{"autoApprovers": {"exitNode": ["tag:nope"]}}', "autoApprovers.exitNode: tag:nope is not defined"),
        ('{"autoApprovers": {"routes": {"not-a-prefix": []}}}', "is not a CIDR prefix"),
    ],
)
def test_undefined_groups_and_tags_in_ssh_and_auto_approvers_are_refused(text: str, message: str) -> None:
    e = refused(text)
    assert message in e.message and e.line == 1


def test_ssh_with_defined_names_is_accepted_and_not_enforced() -> None:
    pol = Policy.parse(
        '{"groups": {"group:ops": ["bob@"]}, "tagOwners": {"tag:srv": ["group:ops"]},'
        ' "autoApprovers": {"routes": {"10.0.0.0/8": ["group:ops"]}, "exitNode": ["tag:srv"]},'
        ' "ssh": [{"action": "accept", "src": ["group:ops"], "dst": ["tag:srv"], "users": ["root"]}]}'
    )
    assert "ssh" in pol.not_enforced and "autoApprovers" not in pol.not_enforced
    assert pol.auto_approvers.exit_node == ("tag:srv",)
    assert [(str(n), a) for n, a in pol.auto_approvers.routes] == [("10.0.0.0/8", ("group:ops",))]


# --- messages ---


def test_a_missing_action_says_so() -> None:
    e = refused('{"acls": [{"src": ["*"], "dst": ["*:*"]}]}')
    assert e.message == 'acls[0]: "action" is missing (only "accept" is supported)'
    assert (
        'action "deny" is not supported'
        in refused('{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}').message
    )


def test_a_leading_byte_order_mark_is_skipped_and_positions_are_as_an_editor_shows() -> None:
    pol = Policy.parse('\ufeff{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    assert len(pol.rules) == 1
    e = refused('\ufeff{"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:22"]}]}')
    assert (e.line, e.column) == (1, 40)
    with pytest.raises(HuJSONError):
        parse('{"a": 1}\ufeff')  # only a leading one


def test_bytes_that_are_not_utf8_are_located() -> None:
    assert decode('{"a": "é"}'.encode()) == '{"a": "é"}'
    with pytest.raises(HuJSONError) as e:
        decode(b'{\n  "acls": [],\n  "h\xc3\xa9\xff": 1\n}')
    assert (e.value.line, e.value.column) == (3, 6)
    assert "invalid UTF-8" in e.value.message


def test_policy_files_not_utf8_are_refused_with_the_position(tmp_path: object) -> None:
    from pathlib import Path

    from tailpy.control.acl import read_policy_file

    assert isinstance(tmp_path, Path)
    path = tmp_path / "policy.hujson"
    path.write_bytes(b"{\n  // caf\xe9\n}")
    with pytest.raises(ConfigError, match=r"line 2, column 9: invalid UTF-8"):
        read_policy_file(path)


def test_tests_entries_with_unenforced_targets_are_left_out() -> None:
    pol = Policy.parse(
        '{"ipsets": {"ipset:x": []}, "acls": [],'
        ' "tests": [{"src": "bob@", "deny": ["ipset:x:22"]}, {"src": "bob@", "deny": ["192.0.2.1:22"]}]}'
    )
    assert [t.where for t in pol.tests] == ["tests[1]"]
    assert check_tests(pol, []) == []


def _ssh(**fields: object) -> str:
    import json

    rule: dict[str, object] = {
        "action": "accept",
        "src": ["autogroup:member"],
        "dst": ["autogroup:self"],
        "users": ["root"],
    }
    rule.update(fields)
    rule = {k: v for k, v in rule.items() if v is not ...}
    return json.dumps({"hosts": {"srv": "192.0.2.1"}, "tagOwners": {"tag:server": []}, "ssh": [rule]})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"action": ...}, "action must be specified"),
        ({"action": ""}, "action must be specified"),
        ({"action": "deny"}, '"deny" is not a valid action'),
        ({"action": "Accept"}, '"Accept" is not a valid action'),
        ({"users": ...}, "users must be specified"),
        ({"users": []}, "users must be specified"),
        ({"users": None}, "users must be specified"),
        ({"users": ["root", ""]}, 'user "" is not valid'),
        ({"users": ["*"]}, 'user "*" is not valid'),
        ({"acceptEnv": ["LANG", ""]}, "acceptEnv values cannot be empty"),
        ({"checkPeriod": "abc"}, "checkPeriod 'abc'"),
        ({"checkPeriod": "-1m"}, "checkPeriod '-1m'"),
        ({"checkPeriod": "168h0m1s"}, "checkPeriod '168h0m1s'"),
        ({"dst": ["srv"]}, 'invalid dst "srv"'),
    ],
)
def test_ssh_rules_are_checked_as_tailscale_checks_them(fields: dict[str, object], message: str) -> None:
    assert message in refused(_ssh(**fields)).message


@pytest.mark.parametrize(
    "fields",
    [
        {"action": "check", "checkPeriod": "12h"},
        {"checkPeriod": "168h"},
        {"checkPeriod": "0s"},
        {"checkPeriod": "1h30m"},
        {"checkPeriod": "always"},
        {"checkPeriod": None},
        {"dst": ["tag:server "]},  # Tailscale accepts the trailing space here
        {"action": " accept"},  # and spaces around the action
        {"acceptEnv": None},
        {"users": ["root", "autogroup:nonroot", "localpart:*@example.com"], "acceptEnv": ["GIT_*"]},
    ],
)
def test_ssh_rules_tailscale_accepts_are_accepted(fields: dict[str, object]) -> None:
    assert "ssh" in Policy.parse(_ssh(**fields)).not_enforced


@pytest.mark.parametrize(
    ("dst", "message"),
    [
        ("autogroup:internet", "disallowed element"),
        ("100.64.0.0/24", "disallowed element"),
        ("tag:server:22", "tag:server:22 is not defined"),
    ],
)
def test_ssh_tests_destinations_are_checked(dst: str, message: str) -> None:
    def policy(d: str) -> str:
        return (
            '{"tagOwners": {"tag:server": []},'
            f' "sshTests": [{{"src": "bob@", "dst": ["{d}"], "accept": ["root"]}}]}}'
        )

    assert message in refused(policy(dst)).message
    Policy.parse(policy("tag:server"))


@pytest.mark.parametrize(
    ("grant", "message"),
    [
        (
            '"dst": ["*"], "app": {"https://tailscale.com/cap/ingress": [{}]}',
            "must have the form {domain}/{path}",
        ),
        ('"dst": ["*"], "app": {"nodomain": [{}]}', "must have the form {domain}/{path}"),
        ('"dst": ["autogroup:internet"], "app": {"example.com/cap/x": [{}]}', "cannot use app grants with"),
    ],
)
def test_capability_grants_are_checked_though_ignored(grant: str, message: str) -> None:
    assert message in refused(f'{{"grants": [{{"src": ["*"], {grant}}}]}}').message
    pol = Policy.parse('{"grants": [{"src": ["*"], "dst": ["*"], "app": {"example.com/cap/x": [{}]}}]}')
    assert pol.rules == () and any("capability grant ignored" in w for w in pol.warnings)


def test_node_attribute_targets_must_be_defined() -> None:
    assert (
        "tag:nope is not defined"
        in refused('{"nodeAttrs": [{"target": ["tag:nope"], "attr": ["funnel"]}]}').message
    )
    Policy.parse(
        '{"tagOwners": {"tag:a": []}, "nodeAttrs": [{"target": ["tag:a", "*"], "attr": ["funnel"]}]}'
    )
