"""MagicDNS's sans-IO core: local answers (A, AAAA, PTR, NODATA, NXDOMAIN, case), routing of other names,
truncation at record boundaries (RFC 1035 §4.2.1, RFC 6891 §6.2.5), and a fuzzed query parser."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tailpy.dns.config import DNSConfig, ExtraRecord
from tailpy.dns.resolver import (
    Forward,
    Reply,
    Resolver,
    parse_query,
    question_end,
    render,
    reverse_name,
    udp_limit,
    well_formed,
)
from tailpy.errors import ParseError
from tailpy.keys import MachinePrivate, NodePrivate
from tailpy.netmap import NetMap, Node

DOMAIN = "ts.test"


def node(i: int, name: str) -> Node:
    return Node(
        id=i,
        name=name,
        hostname=name,
        node_key=NodePrivate.generate().public,
        machine_key=MachinePrivate.generate().public,
        addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"),
    )


def netmap(*peers: Node, me: Node | None = None) -> NetMap:
    return NetMap(me or node(1, "laptop"), {p.id: p for p in peers}, DOMAIN)


def resolver(cfg: DNSConfig | None = None, fallback: tuple[str, ...] = ()) -> Resolver:
    r = Resolver([(ipaddress.ip_address(f), 53) for f in fallback])
    r.update(netmap(node(2, "foo-bar"), node(5, "pi")), cfg)
    return r


def ask(r: Resolver, name: str, rdtype: str = "A", *, tcp: bool = False, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    out = r.handle(q.to_wire(), tcp=tcp)
    assert isinstance(out, Reply), out
    resp = dns.message.from_wire(out.wire)
    assert resp.id == q.id and resp.flags & dns.flags.QR
    return resp


def addresses(resp: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in resp.answer for rd in rrset)


def test_fqdn_and_short_name_answer_a_and_aaaa() -> None:
    r = resolver()
    for name in ("pi.ts.test", "pi.ts.test.", "pi", "pi."):
        a = ask(r, name, "A")
        assert a.rcode() == dns.rcode.NOERROR and addresses(a) == ["100.64.0.5"], name
        assert a.flags & dns.flags.AA
        aaaa = ask(r, name, "AAAA")
        assert addresses(aaaa) == ["fd7a:115c:a1e0::5"]
    own = ask(r, "laptop.ts.test")
    assert addresses(own) == ["100.64.0.1"]


def test_case_insensitive_and_question_case_echoed() -> None:
    r = Resolver()
    r.update(netmap(node(2, "foo-bar")))
    for asked in ("foo-bar.ts.test.", "FOO-BAR.ts.test.", "fOo-BaR.Ts.TeSt."):
        resp = ask(r, asked)
        assert addresses(resp) == ["100.64.0.2"], asked
        assert resp.answer[0].name.to_text() == asked  # the case used in the question
        assert resp.question[0].name.to_text() == asked
    assert r.names() == ["foo-bar.ts.test.", "laptop.ts.test."]


def test_nodata_for_known_name_and_missing_type_nxdomain_for_unknown() -> None:
    r = resolver()
    mx = ask(r, "pi.ts.test", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and not mx.answer
    assert mx.authority and mx.authority[0].rdtype == dns.rdatatype.SOA
    assert mx.authority[0].name == dns.name.from_text("ts.test.")
    nx = ask(r, "nosuch.ts.test")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
    deep = ask(r, "a.pi.ts.test")
    assert deep.rcode() == dns.rcode.NXDOMAIN
    apex = ask(r, "ts.test", "SOA")
    assert apex.answer[0].rdtype == dns.rdatatype.SOA


def test_ptr_answered_locally_and_never_forwarded() -> None:
    r = resolver(fallback=("192.0.2.53",))
    ptr = ask(r, "5.0.64.100.in-addr.arpa.", "PTR")
    assert [rd.to_text() for rd in ptr.answer[0]] == ["pi.ts.test."]
    v6 = ask(r, reverse_name(ipaddress.ip_address("fd7a:115c:a1e0::5")).to_text(), "PTR")
    assert [rd.to_text() for rd in v6.answer[0]] == ["pi.ts.test."]
    unknown = ask(r, "9.9.64.100.in-addr.arpa.", "PTR")
    assert unknown.rcode() == dns.rcode.NXDOMAIN
    # An address outside the tailnet range is somebody else's: forwarded.
    q = dns.message.make_query("1.2.0.192.in-addr.arpa.", "PTR")
    assert isinstance(r.handle(q.to_wire()), Forward)


def test_routing_split_dns_search_and_servfail() -> None:
    cfg = DNSConfig(routes={"corp.example": ("10.0.0.53",)}, nameservers=("1.1.1.1",))
    r = resolver(cfg)
    split = r.handle(dns.message.make_query("x.corp.example", "A").to_wire())
    assert isinstance(split, Forward) and [str(ip) for ip, _ in split.upstreams] == ["10.0.0.53"]
    other = r.handle(dns.message.make_query("www.example.org", "A").to_wire())
    assert isinstance(other, Forward) and [str(ip) for ip, _ in other.upstreams] == ["1.1.1.1"]
    # An unknown single label never becomes <label>.corp.example: it goes to the default upstream as is.
    single = r.handle(dns.message.make_query("unknownhost", "A").to_wire())
    assert isinstance(single, Forward) and [str(ip) for ip, _ in single.upstreams] == ["1.1.1.1"]
    assert single.query.question[0].name == dns.name.from_text("unknownhost.")
    # No upstream at all: SERVFAIL, not NXDOMAIN.
    lonely = resolver()
    assert ask(lonely, "www.example.org").rcode() == dns.rcode.SERVFAIL
    assert lonely.servfails == 1
    # Host fallback when control gives no nameservers.
    fb = resolver(fallback=("192.0.2.53",))
    out = fb.handle(dns.message.make_query("www.example.org", "A").to_wire())
    assert isinstance(out, Forward) and str(out.upstreams[0][0]) == "192.0.2.53"


def test_update_follows_join_rename_leave_and_magic_off() -> None:
    r = Resolver()
    r.update(netmap(node(2, "a")))
    assert ask(r, "b.ts.test").rcode() == dns.rcode.NXDOMAIN
    r.update(netmap(node(2, "a"), node(3, "b")))
    assert addresses(ask(r, "b.ts.test")) == ["100.64.0.3"]
    r.update(netmap(node(2, "a"), node(3, "c")))  # renamed
    assert ask(r, "b.ts.test").rcode() == dns.rcode.NXDOMAIN
    assert addresses(ask(r, "c")) == ["100.64.0.3"]
    r.update(netmap(node(2, "a")))  # left
    assert ask(r, "c.ts.test").rcode() == dns.rcode.NXDOMAIN
    r.update(netmap(node(2, "a")), DNSConfig(magic_dns=False))
    assert ask(r, "a.ts.test").rcode() == dns.rcode.SERVFAIL  # not ours any more, and no upstream


def test_extra_records() -> None:
    cfg = DNSConfig(
        extra_records=(
            ExtraRecord.make("www.ts.test", "A", "100.64.0.9"),
            ExtraRecord.make("db.corp", "A", "10.1.1.1"),
        )
    )
    r = resolver(cfg)
    assert addresses(ask(r, "WWW.ts.test")) == ["100.64.0.9"]
    assert addresses(ask(r, "db.corp")) == ["10.1.1.1"]
    nodata = ask(r, "db.corp", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer


def big_response(n: int = 200) -> dns.message.Message:
    q = dns.message.make_query("big.example", "A")
    resp = dns.message.make_response(q)
    rr = dns.rrset.RRset(dns.name.from_text("big.example."), dns.rdataclass.IN, dns.rdatatype.A)
    for i in range(n):
        rr.add(
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, f"198.18.{i // 250}.{i % 250 + 1}"), 60
        )
    resp.answer.append(rr)
    return resp


@pytest.mark.parametrize("edns,limit", [(None, 512), (1232, 1232), (4096, 4096)])
def test_udp_truncated_at_record_boundary_within_limit(edns: int | None, limit: int) -> None:
    query = dns.message.make_query("big.example", "A", use_edns=edns is not None, payload=edns or 1232)
    q = dns.message.from_wire(query.to_wire())
    assert udp_limit(q) == limit
    r = Resolver()
    wire = r.relay(q, big_response(), udp_limit(q))
    assert len(wire) <= limit
    resp = dns.message.from_wire(wire)  # never malformed
    n = sum(len(rr) for rr in resp.answer)
    if limit < 4096:
        assert resp.flags & dns.flags.TC and 0 < n < 200
    else:  # 200 A records take about 3.2 KB: they fit
        assert not resp.flags & dns.flags.TC and n == 200
    assert (resp.edns >= 0) == (edns is not None)
    full = dns.message.from_wire(r.relay(q, big_response(), 65535))
    assert sum(len(rr) for rr in full.answer) == 200 and not full.flags & dns.flags.TC


def test_render_small_message_untouched() -> None:
    q = dns.message.make_query("x.example", "A")
    resp = dns.message.make_response(q)
    assert not dns.message.from_wire(render(resp, 512)).flags & dns.flags.TC


def test_malformed_queries_get_formerr_or_are_dropped() -> None:
    r = Resolver()
    assert r.handle(b"\x01\x02") is None  # no header: dropped
    garbage = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x05abc"
    out = r.handle(garbage)
    assert isinstance(out, Reply)
    resp = dns.message.from_wire(out.wire)
    assert resp.id == 0x1234 and resp.rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("x.", "A")).to_wire()
    assert r.handle(response) is None  # a response is never answered (no loops)
    assert r.bad == 3
    with pytest.raises(ParseError):
        parse_query(garbage)


def test_edns_version_1_gets_badvers() -> None:
    q = dns.message.make_query("pi.ts.test", "A", use_edns=1)
    out = resolver().handle(q.to_wire())
    assert isinstance(out, Reply)
    assert dns.message.from_wire(out.wire).rcode() == dns.rcode.BADVERS


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_handle_never_raises(data: bytes) -> None:
    r = resolver(fallback=("192.0.2.53",))
    out = r.handle(data)
    assert out is None or isinstance(out, (Reply, Forward))
    if isinstance(out, Reply):
        dns.message.from_wire(out.wire)  # whatever we send parses


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=300), st.integers(0, 65535))
def test_fuzz_mutated_valid_queries(tail: bytes, pos: int) -> None:
    base = bytearray(dns.message.make_query("pi.ts.test", "AAAA", use_edns=0).to_wire())
    i = pos % len(base)
    mutated = bytes(base[:i]) + tail[: len(base) - i]
    r = resolver()
    out = r.handle(mutated)
    assert out is None or isinstance(out, (Reply, Forward))
    with contextlib.suppress(ParseError):  # the only exception the parser may raise
        parse_query(mutated)


def test_local_answer_cache_keeps_ids_and_case_and_follows_netmaps() -> None:
    r = Resolver()
    r.update(netmap(node(2, "pi")))
    q1 = dns.message.make_query("Pi.ts.test", "A")
    q2 = dns.message.make_query("Pi.ts.test", "A")
    q2.id = (q1.id + 1) % 65536
    a1, a2 = (r.handle(q.to_wire()) for q in (q1, q2))
    assert isinstance(a1, Reply) and isinstance(a2, Reply)
    assert dns.message.from_wire(a2.wire).id == q2.id and a1.wire[2:] == a2.wire[2:]
    other_case = ask(r, "PI.TS.TEST")
    assert other_case.answer[0].name.to_text() == "PI.TS.TEST."
    r.update(netmap(node(2, "pi"), node(5, "x")))  # a new netmap: answers are computed again
    r.update(netmap(node(7, "pi")))  # pi now has another address
    assert addresses(ask(r, "Pi.ts.test")) == ["100.64.0.7"]
    assert r.local == 4


def test_question_end() -> None:
    wire = dns.message.make_query("pi.ts.test", "A", use_edns=0).to_wire()
    end = question_end(wire)
    assert end == 12 + len(b"\x02pi\x02ts\x04test\x00") + 4
    assert question_end(wire[: end - 1]) is None
    assert question_end(wire[:12]) is None
    compressed = wire[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    assert question_end(compressed) is None


@pytest.mark.parametrize("opcode", [dns.opcode.UPDATE, dns.opcode.NOTIFY, dns.opcode.STATUS])
def test_other_opcodes_get_notimp(opcode: dns.opcode.Opcode) -> None:
    q = dns.message.make_query("pi.ts.test", "A")
    q.set_opcode(opcode)
    out = resolver().handle(q.to_wire())
    assert isinstance(out, Reply)
    resp = dns.message.from_wire(out.wire)
    assert resp.rcode() == dns.rcode.NOTIMP and resp.id == q.id and resp.opcode() == opcode


def _answer(name: str = "www.example", n: int = 3) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=0)
    resp = dns.message.make_response(q)
    rr = dns.rrset.RRset(dns.name.from_text(name), dns.rdataclass.IN, dns.rdatatype.A)
    for i in range(n):
        rr.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, f"198.51.100.{i + 1}"), 60)
    resp.answer.append(rr)
    resp.authority.append(dns.rrset.from_text(name + ".", 60, "IN", "MX", f"10 mail.{name}."))
    return resp.to_wire()


def test_well_formed_accepts_real_answers_and_rejects_cut_or_padded_ones() -> None:
    wire = _answer()
    assert well_formed(wire)
    assert all(not well_formed(wire[:i]) for i in range(len(wire)))  # cut anywhere
    assert not well_formed(wire + b"\0")  # trailing bytes
    q = dns.message.make_query("www.example", "A").to_wire()
    i = question_end(q)
    assert i is not None
    head = q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    cut = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01"  # the reviewer's badup.py answer
    assert not well_formed(head + q[12:i] + cut)
    short_a = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x01\x01"  # A record with 1 byte of data
    assert not well_formed(head + q[12:i] + short_a)
    loop = head[:6] + b"\x00\x00" + head[8:] + b"\xc0\xff\x00\x01\x00\x01"  # pointer out of the message
    assert not well_formed(loop)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300), st.integers(min_value=0, max_value=400), st.integers(min_value=1, max_value=5)
)
def test_fuzz_well_formed_never_raises_and_accepts_what_dnspython_reads(
    junk: bytes, pos: int, n: int
) -> None:
    wire = _answer("x.example", n)
    for blob in (junk, wire[:pos] + junk[:8] + wire[pos + 8 :]):
        ok = well_formed(blob)  # never raises
        try:
            dns.message.from_wire(blob)
        except Exception:  # dnspython refuses it: well_formed may or may not
            continue
        assert ok, blob.hex()  # whatever dnspython reads is well-formed
