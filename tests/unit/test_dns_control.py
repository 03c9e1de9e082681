"""DNS configuration on the control side: its wire form (fuzzed), the store and admin operations, the
`tailpy control dns` commands, and the mapper sending it in full netmaps (again to every stream on a
change)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _mapclient import Client, mkey, node
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.cli.control.dns import parse_record, parse_route
from tailpy.cli.main import cli
from tailpy.control import Store, dnsconfig
from tailpy.control.admin import Admin
from tailpy.control.client import apply_message
from tailpy.control.mapper import Mapper
from tailpy.dns.config import DNSConfig, ExtraRecord, parse_resolver
from tailpy.errors import ConfigError, ParseError
from tailpy.netmap import NetMap


def full_config() -> DNSConfig:
    return DNSConfig(
        magic_dns=True,
        nameservers=("192.0.2.53", "[2001:db8::53]:5353"),
        routes={"corp.example": ("198.51.100.53",)},
        search_domains=("corp.example",),
        extra_records=(ExtraRecord.make("www.ts.test", "A", "100.64.0.9"),),
    )


def test_config_json_round_trip_and_netmap_carries_it() -> None:
    cfg = full_config()
    assert DNSConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    m = NetMap(node(1), {2: node(2)}, "ts.test", None, cfg)
    assert NetMap.from_json(m.to_json()) == m
    assert NetMap.from_json(NetMap(node(1)).to_json()).dns is None


@pytest.mark.parametrize(
    "obj",
    [
        {"magic_dns": "yes"},
        {"nameservers": ["not-an-ip"]},
        {"nameservers": "192.0.2.1"},
        {"routes": {"corp.example": []}},
        {"routes": {"bad domain": ["192.0.2.1"]}},
        {"search_domains": ["-x.example"]},
        {"extra_records": [{"name": "a.b", "type": "MX", "value": "1.2.3.4"}]},
        {"extra_records": [{"name": "a.b", "type": "AAAA", "value": "1.2.3.4"}]},
        [],
    ],
)
def test_malformed_config_is_a_parse_error(obj: Any) -> None:
    with pytest.raises(ParseError):
        DNSConfig.from_json(obj)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*dnsconfig.FIELDS, "other"]), json_values, max_size=6))
def test_fuzz_config_parser_raises_only_parse_error(obj: dict[str, Any]) -> None:
    try:
        cfg = DNSConfig.from_json(obj)
    except ParseError:
        return
    assert DNSConfig.from_json(cfg.to_json()) == cfg


def test_parse_resolver_forms() -> None:
    assert [str(x) for x in parse_resolver("192.0.2.1")] == ["192.0.2.1", "53"]
    assert [str(x) for x in parse_resolver("192.0.2.1:5353")] == ["192.0.2.1", "5353"]
    assert [str(x) for x in parse_resolver("2001:db8::1")] == ["2001:db8::1", "53"]
    assert [str(x) for x in parse_resolver("[2001:db8::1]:54")] == ["2001:db8::1", "54"]
    for bad in ("", "host.example", "192.0.2.1:0", "192.0.2.1:99999", "[2001:db8::1]:x"):
        with pytest.raises(ParseError):
            parse_resolver(bad)


def test_store_and_admin_ops(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        admin = Admin(store)
        assert admin.run("dns.show", {}) == {"domain": "tailnet.internal", **DNSConfig().to_json()}
        assert dnsconfig.for_netmap(store) is None  # the default: netmaps carry no "dns" (as before)
        out = admin.run("dns.set", {"domain": "TS.test", "nameservers": ["192.0.2.53"], "magic_dns": False})
        assert out["domain"] == "ts.test" and out["nameservers"] == ["192.0.2.53"] and not out["magic_dns"]
        out = admin.run("dns.set", {"routes": {"corp.example": ["198.51.100.53:5353"]}})
        assert out["nameservers"] == ["192.0.2.53"]  # fields not given stay
        assert out["routes"] == {"corp.example": ["198.51.100.53:5353"]}
        assert dnsconfig.load(store).routes == {"corp.example": ("198.51.100.53:5353",)}
        assert dnsconfig.for_netmap(store) == dnsconfig.load(store)
        for bad in ({"nameservers": ["nope"]}, {"colour": "blue"}, {"domain": "bad domain"}):
            with pytest.raises(ConfigError):
                admin.run("dns.set", bad)
        assert dnsconfig.load(store).nameservers == ("192.0.2.53",)  # a refused change changes nothing
    finally:
        store.close()


def test_cli_dns_set_and_show(tmp_path: Path) -> None:
    Store(tmp_path).close()
    runner = CliRunner()
    base = ["--state-dir", str(tmp_path)]
    r = runner.invoke(
        cli,
        [
            "control", "dns", "set", *base, "--domain", "ts.test", "--nameserver", "192.0.2.53",
            "--route", "corp.example=198.51.100.53,198.51.100.54", "--search-domain", "corp.example",
            "--record", "www.ts.test A 100.64.0.9", "--json",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["routes"] == {"corp.example": ["198.51.100.53", "198.51.100.54"]}
    assert out["extra_records"] == [{"name": "www.ts.test", "type": "A", "value": "100.64.0.9"}]
    r = runner.invoke(cli, ["control", "dns", "show", *base])
    assert r.exit_code == 0 and "corp.example -> 198.51.100.53 198.51.100.54" in r.output, r.output
    r = runner.invoke(cli, ["control", "dns", "set", *base, "--no-routes", "--no-magic-dns"])
    assert r.exit_code == 0 and "split DNS:    -" in r.output and "MagicDNS:     off" in r.output, r.output
    bad = runner.invoke(cli, ["control", "dns", "set", *base, "--route", "corp.example"])
    assert bad.exit_code == 1 and "DOMAIN=RESOLVER" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(cli, ["control", "dns", "set", *base, "--nameserver", "dns.example"])
    assert bad.exit_code == 1 and "not an IP address" in bad.output
    assert parse_route("a.example=192.0.2.1") == ("a.example", ["192.0.2.1"])
    assert parse_record("x.example,AAAA,2001:db8::1") == {
        "name": "x.example",
        "type": "AAAA",
        "value": "2001:db8::1",
    }


def test_mapper_sends_dns_in_full_netmaps_and_resyncs_every_stream_on_change() -> None:
    m = Mapper(mkey(), "ts.test", dns=DNSConfig(nameservers=("192.0.2.53",)))
    m.load(node(i) for i in range(1, 4))
    a, b = Client(m, 1), Client(m, 2)
    a.drain()
    b.drain()
    assert a.state is not None and a.state.netmap.dns == DNSConfig(nameservers=("192.0.2.53",))
    assert a.state.netmap == m.netmap(1)
    m.publish(node(3, endpoints=("192.0.2.3:1",)))
    a.drain()  # a delta keeps the DNS config
    assert a.state.netmap.dns == m.dns
    assert not m.set_dns(m.dns, "ts.test")
    new = full_config()
    assert m.set_dns(new, "example.test")
    for c in (a, b):
        assert c.stream.resync
        (msg,) = c.drain()
        assert msg.type == "netmap"
        assert c.state is not None and c.state.netmap.dns == new and c.state.netmap.domain == "example.test"
    assert apply_message(a.state, a.messages[-1]).netmap.dns == new


def test_cli_dns_set_refuses_magicdns_as_nameserver_contradictions_and_too_many(tmp_path: Path) -> None:
    Store(tmp_path).close()
    runner = CliRunner()
    base = ["control", "dns", "set", "--state-dir", str(tmp_path)]
    for ns in ("100.100.100.100", "fd7a:115c:a1e0::53", "[fd7a:115c:a1e0::53]:53"):
        bad = runner.invoke(cli, [*base, "--nameserver", "192.0.2.53", "--nameserver", ns])
        assert bad.exit_code == 1 and "MagicDNS itself" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(cli, [*base, "--route", "corp.example=100.100.100.100"])
    assert bad.exit_code == 1 and "MagicDNS itself" in bad.output
    bad = runner.invoke(cli, [*base, "--no-nameservers", "--nameserver", "192.0.2.53"])
    assert bad.exit_code == 1 and "contradict" in bad.output, bad.output
    records = [a for i in range(257) for a in ("--record", f"h{i}.ts.test A 100.64.0.9")]
    bad = runner.invoke(cli, [*base, *records])
    assert bad.exit_code == 1 and "--record" in bad.output and "extra_records" not in bad.output, bad.output
    r = runner.invoke(cli, ["control", "dns", "show", "--state-dir", str(tmp_path), "--json"])
    assert json.loads(r.output)["nameservers"] == []  # nothing refused was stored


def test_node_never_forwards_to_magicdns_itself() -> None:
    from tailpy.dns.resolver import Resolver
    from tailpy.keys import MachinePrivate, NodePrivate
    from tailpy.netmap import Node

    me = Node(
        id=1,
        name="me",
        hostname="me",
        node_key=NodePrivate.generate().public,
        machine_key=MachinePrivate.generate().public,
        addresses=("100.64.0.1/32",),
    )
    r = Resolver()
    cfg = DNSConfig.from_json(
        {
            "nameservers": ["100.100.100.100", "192.0.2.53", "fd7a:115c:a1e0::53"],
            "routes": {"c.example": ["100.100.100.100"]},
        }
    )
    r.update(NetMap(me, {}, "ts.test"), cfg)
    import dns.name

    assert [str(ip) for ip, _ in r.upstreams_for(dns.name.from_text("www.example."))] == ["192.0.2.53"]
    assert r.upstreams_for(dns.name.from_text("x.c.example.")) == ()


def test_up_accept_dns_bare_flag_is_true_and_takes_no_argument() -> None:
    from tailpy.cli import up

    def params(*args: str) -> Any:
        return up.command.make_context("up", list(args)).params

    assert params("--accept-dns", "--hostname", "x")["accept_dns"] is True
    assert params("--accept-dns", "--hostname", "x")["hostname"] == "x"
    assert params("--accept-dns")["accept_dns"] is True
    assert params("--accept-dns=false")["accept_dns"] is False
    assert params()["accept_dns"] is None
