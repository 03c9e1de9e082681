"""MagicDNS's sans-IO core: parse a query, answer tailnet names locally, or say where to forward it.

Messages are dnspython's (RFC 1035 and friends). What is answered here, never forwarded:

* ``<name>.<tailnet domain>`` and the single label ``<name>`` (what a stub sends after its search list, or a
  bare ``dig name``): A and AAAA from the netmap; another type of a known name is NODATA (NOERROR, no
  answer, the zone's SOA in authority); an unknown name under the tailnet domain is NXDOMAIN (with SOA).
* PTR for tailnet addresses (names under ``64.100.in-addr.arpa`` ... ``127.100.in-addr.arpa`` and the
  ip6.arpa zone of fd7a:115c:a1e0::/48): the node's FQDN, NXDOMAIN for an address no node has.
* control's extra records, under any name.

Names match case-insensitively; answers carry the question's name as it was asked (its case). Everything
else goes to an upstream: the longest split DNS route that matches, else control's nameservers, else the
resolvers the host used before tailpy (:attr:`Resolver.fallback`); single-label names never go to a split
DNS route. No upstream: SERVFAIL.

UDP answers are cut at a record boundary to fit the client's EDNS payload size (512 bytes without EDNS),
with TC set; over TCP nothing is cut (65535 bytes at most).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tailpy.dns.config import DNSConfig, IPAddress, parse_resolver
from tailpy.errors import ParseError
from tailpy.netmap import NetMap

TTL = 60
"""Seconds tailnet answers may be cached (short: a renamed or removed node must stop resolving soon)."""

NEGATIVE_TTL = 1
"""Seconds NXDOMAIN / NODATA may be cached (the SOA minimum): a node that joins resolves at once."""

UDP_MIN = 512
"""Bytes a UDP answer may always be (RFC 1035 §4.2.1); also the limit without EDNS."""

OUR_PAYLOAD = 1232
"""EDNS UDP payload size tailpy advertises and asks upstreams for (the DNS flag day 2020 value)."""

TCP_MAX = 65535

CACHE_MAX = 4096
"""Local answers kept rendered (keyed by the query's bytes after its id); emptied by every netmap."""

MAGICDNS_V4 = ipaddress.IPv4Address("100.100.100.100")
MAGICDNS_V6 = ipaddress.IPv6Address("fd7a:115c:a1e0::53")
TAILNET_V4 = ipaddress.IPv4Network("100.64.0.0/10")
TAILNET_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")

_REVERSE_V4 = tuple(dns.name.from_text(f"{o}.100.in-addr.arpa.") for o in range(64, 128))
_REVERSE_V6 = dns.name.from_text("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.")

Upstream = tuple[IPAddress, int]


@dataclass(frozen=True)
class Reply:
    """Send ``wire`` back to the client."""

    wire: bytes


@dataclass(frozen=True)
class Forward:
    """Forward ``query`` (the client's parsed query; ``wire`` its bytes) to ``upstreams`` in order; answer
    with :meth:`Resolver.relay` (or :meth:`Resolver.servfail` when none answers). ``max_size``: the
    client's limit in bytes."""

    query: dns.message.Message
    upstreams: tuple[Upstream, ...]
    max_size: int
    wire: bytes = b""


Outcome = Reply | Forward | None  # None: drop the datagram silently


def parse_query(wire: bytes) -> dns.message.Message:
    """A DNS query from ``wire``. Raises ParseError for anything dnspython cannot read or that is not a
    query (QR set), and for more than one question."""
    try:
        msg = dns.message.from_wire(wire, ignore_trailing=False)
    except Exception as e:  # dnspython raises many types (FormError, ValueError, ...) for bad input
        raise ParseError(f"malformed DNS message: {type(e).__name__}") from None
    if msg.flags & dns.flags.QR:
        raise ParseError("DNS message is a response, not a query")
    if msg.opcode() == dns.opcode.QUERY and len(msg.question) != 1:
        raise ParseError(f"DNS query has {len(msg.question)} questions, not 1")
    return msg


def error_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare header-only answer with ``rcode`` (FORMERR, NOTIMP) to the query in ``wire``, echoing its id,
    opcode and RD; None when ``wire`` has no full header, or is itself a response (never answered)."""
    if len(wire) < 12:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None
    out = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | int(rcode)
    return struct.pack("!HHHHHH", qid, out, 0, 0, 0, 0)


def udp_limit(query: dns.message.Message) -> int:
    """Bytes a UDP answer to ``query`` may take: its EDNS payload size (at least 512, at most 65535), or 512
    without EDNS."""
    if query.edns < 0:
        return UDP_MIN
    return max(UDP_MIN, min(int(query.payload), TCP_MAX))


def render(msg: dns.message.Message, max_size: int) -> bytes:
    """``msg`` on the wire in at most ``max_size`` bytes: records that do not fit are left out, cut at a
    record boundary (not only between RRsets), with TC set when an answer or authority record was left out
    (RFC 2181 §9)."""
    for section in (msg.answer, msg.authority, msg.additional):
        if any(len(rrset) > 1 for rrset in section):
            split = [_one(rrset, rd) for rrset in section for rd in rrset]
            section.clear()
            section.extend(split)
    return msg.to_wire(max_size=max_size, prefer_truncation=True)


def _one(rrset: dns.rrset.RRset, rd: dns.rdata.Rdata) -> dns.rrset.RRset:
    single = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype, rrset.covers)
    single.add(rd, rrset.ttl)
    return single


def question_end(wire: bytes) -> int | None:
    """Offset just past the first question of message ``wire`` (header, name, type, class), or None when it
    has no question or its name is compressed or cut short."""
    if len(wire) < 12 or wire[4:6] == b"\0\0":
        return None
    i = 12
    while i < len(wire):
        n = wire[i]
        if n == 0:
            return i + 5 if i + 5 <= len(wire) else None
        if n & 0xC0:
            return None
        i += n + 1
    return None


def _skip_name(wire: bytes, i: int) -> int:
    """Offset just past the (possibly compressed) name at ``i``; -1 when it runs past the end, has a bad
    label type, a pointer outside the message, or more than 255 bytes before a pointer."""
    n = len(wire)
    start = i
    while i < n:
        b = wire[i]
        if b == 0:
            return i + 1
        if b & 0xC0 == 0xC0:
            if i + 2 > n or ((b & 0x3F) << 8 | wire[i + 1]) >= n:
                return -1
            return i + 2
        if b & 0xC0:
            return -1  # extended label types (RFC 6891 §5) are not used
        i += b + 1
        if i - start > 255:
            return -1
    return -1


def well_formed(wire: bytes) -> bool:
    """Whether ``wire`` is structurally a DNS message: a header, exactly as many questions and records as
    it counts, every name, record and RDATA length inside the message, A and AAAA data of 4 and 16 bytes,
    nothing after the last record. Cheap (no objects): checks an upstream's answer before it is relayed as
    it is. Never raises."""
    n = len(wire)
    if n < 12:
        return False
    qd, an, ns, ar = struct.unpack_from("!HHHH", wire, 4)
    i = 12
    for _ in range(qd):
        i = _skip_name(wire, i)
        if i < 0 or i + 4 > n:
            return False
        i += 4
    for _ in range(an + ns + ar):
        i = _skip_name(wire, i)
        if i < 0 or i + 10 > n:
            return False
        rdtype, _, _, rdlen = struct.unpack_from("!HHIH", wire, i)
        i += 10 + rdlen
        if i > n or (rdtype == 1 and rdlen != 4) or (rdtype == 28 and rdlen != 16):
            return False
    return i == n


def is_magicdns(ip: IPAddress) -> bool:
    """Whether ``ip`` is a MagicDNS address (100.100.100.100, fd7a:115c:a1e0::53): never an upstream, since
    forwarding to it would loop."""
    return ip in (MAGICDNS_V4, MAGICDNS_V6)


def _not_self(upstreams: Iterable[Upstream]) -> tuple[Upstream, ...]:
    return tuple(u for u in upstreams if not is_magicdns(u[0]))


def reverse_name(ip: IPAddress) -> dns.name.Name:
    """The in-addr.arpa / ip6.arpa name of ``ip``."""
    return dns.name.from_text(ip.reverse_pointer + ".")


class Resolver:
    """The tables MagicDNS answers from, rebuilt from each netmap (:meth:`update`; O(nodes)), and the
    decision for each query (:meth:`handle`). ``fallback``: upstreams used when control gives none (the
    host's resolvers before tailpy). Counters: ``queries``, ``local``, ``forwarded``, ``bad`` (malformed
    input, answered FORMERR or dropped), ``servfails``."""

    def __init__(self, fallback: Iterable[Upstream] = ()) -> None:
        self.fallback: tuple[Upstream, ...] = _not_self(fallback)
        self.config = DNSConfig()
        self.domain: dns.name.Name | None = None
        self._hosts: dict[dns.name.Name, tuple[list[IPAddress], list[IPAddress]]] = {}
        self._short: dict[dns.name.Name, tuple[list[IPAddress], list[IPAddress]]] = {}
        self._ptr: dict[dns.name.Name, dns.name.Name] = {}
        self._extra: dict[dns.name.Name, dict[int, list[IPAddress]]] = {}
        self._nameservers: tuple[Upstream, ...] = ()
        self._routes: list[tuple[dns.name.Name, tuple[Upstream, ...]]] = []
        self.queries = self.local = self.forwarded = self.bad = self.servfails = 0
        self._cache: dict[tuple[bytes, bool], bytes] = {}

    # -- tables ------------------------------------------------------------------------------------------

    def update(self, netmap: NetMap, config: DNSConfig | None = None) -> None:
        """Take names, addresses and DNS config from ``netmap`` (``config`` None: the defaults)."""
        cfg = config if config is not None else DNSConfig()
        domain = dns.name.from_text(netmap.domain.lower() + ".") if netmap.domain else None
        hosts: dict[dns.name.Name, tuple[list[IPAddress], list[IPAddress]]] = {}
        short: dict[dns.name.Name, tuple[list[IPAddress], list[IPAddress]]] = {}
        ptr: dict[dns.name.Name, dns.name.Name] = {}
        if cfg.magic_dns:
            for node in (netmap.self_node, *netmap.peers.values()):
                if not node.name or node.name.startswith("~"):
                    continue
                try:
                    label = dns.name.Name([node.name.lower().encode()])
                except (dns.exception.DNSException, ValueError):
                    continue
                v4: list[IPAddress] = []
                v6: list[IPAddress] = []
                for a in node.addresses:
                    try:
                        ip = ipaddress.ip_interface(a).ip
                    except ValueError:
                        continue
                    (v4 if ip.version == 4 else v6).append(ip)
                fqdn = label.concatenate(domain) if domain is not None else label.concatenate(dns.name.root)
                hosts[fqdn] = (v4, v6)
                short[label.concatenate(dns.name.root)] = (v4, v6)
                for ip in (*v4, *v6):
                    ptr[reverse_name(ip)] = fqdn
        extra: dict[dns.name.Name, dict[int, list[IPAddress]]] = {}
        for r in cfg.extra_records:
            rdtype = dns.rdatatype.A if r.type == "A" else dns.rdatatype.AAAA
            name = dns.name.from_text(r.name + ".")
            extra.setdefault(name, {}).setdefault(rdtype, []).append(ipaddress.ip_address(r.value))
        self.config, self.domain = cfg, domain
        self._cache = {}
        self._hosts, self._short, self._ptr, self._extra = hosts, short, ptr, extra
        self._nameservers = _not_self(parse_resolver(s) for s in cfg.nameservers)
        routes = [
            (dns.name.from_text(d + "."), _not_self(parse_resolver(s) for s in rs))
            for d, rs in cfg.routes.items()
        ]
        self._routes = sorted(routes, key=lambda r: -len(r[0]))  # longest suffix first

    def names(self) -> list[str]:
        """Every tailnet FQDN answered (lowercase, trailing dot), for status output."""
        return sorted(n.to_text() for n in self._hosts)

    # -- queries -----------------------------------------------------------------------------------------

    def handle(self, wire: bytes, *, tcp: bool = False) -> Outcome:
        """What to do with one query datagram / TCP message: a reply, a forward, or None (drop).

        Malformed input never raises: it is counted in ``bad`` and answered FORMERR when it has a header.
        A local answer is rendered once per netmap: the same query bytes (after the 2-byte id) get the same
        answer bytes with the query's id."""
        self.queries += 1
        cached = self._cache.get((wire[2:], tcp)) if len(wire) >= 12 else None
        if cached is not None:
            self.local += 1
            return Reply(wire[:2] + cached)
        if len(wire) >= 12 and not wire[2] & 0x80 and (wire[2] >> 3) & 0x0F != dns.opcode.QUERY:
            # Another opcode (UPDATE, NOTIFY, ...): NOTIMP whatever its sections hold (RFC 1035 §4.1.1).
            err = error_reply(wire, dns.rcode.NOTIMP)
            return None if err is None else Reply(err)
        try:
            query = parse_query(wire)
        except ParseError:
            self.bad += 1
            err = error_reply(wire, dns.rcode.FORMERR)
            return None if err is None else Reply(err)
        max_size = TCP_MAX if tcp else udp_limit(query)
        if query.edns > 0:  # RFC 6891 §6.1.3: only version 0
            bad = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
            bad.use_edns(0, payload=OUR_PAYLOAD)
            bad.set_rcode(dns.rcode.BADVERS)
            return Reply(render(bad, max_size))
        q = query.question[0]
        resp = self.answer_locally(query)
        if resp is not None:
            self.local += 1
            out = render(resp, max_size)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[(wire[2:], tcp)] = out[2:]
            return Reply(out)
        if q.rdclass != dns.rdataclass.IN:
            return Reply(render(self._rcode(query, dns.rcode.REFUSED), max_size))
        upstreams = self.upstreams_for(q.name)
        if not upstreams:
            self.servfails += 1
            return Reply(render(self._rcode(query, dns.rcode.SERVFAIL), max_size))
        self.forwarded += 1
        return Forward(query, upstreams, max_size, wire)

    def upstreams_for(self, qname: dns.name.Name) -> tuple[Upstream, ...]:
        """Where a name not answered locally goes: the longest matching split DNS route (never for a
        single-label name), else control's nameservers, else :attr:`fallback`."""
        if len(qname) > 2:  # more than one label plus the root
            for domain, upstreams in self._routes:
                if qname.is_subdomain(domain):
                    return upstreams
        return self._nameservers or self.fallback

    def answer_locally(self, query: dns.message.Message) -> dns.message.Message | None:
        """The local answer to ``query`` (see the module docstring), or None when it must be forwarded."""
        q = query.question[0]
        qname, qtype = q.name, q.rdtype
        if q.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            return None
        extra = self._extra.get(qname)
        if extra is not None:
            return self._addresses(
                query, self._zone_of(qname), extra.get(dns.rdatatype.A, []), extra.get(dns.rdatatype.AAAA, [])
            )
        zone = self._reverse_zone(qname)
        if zone is not None:
            target = self._ptr.get(qname)
            if target is None:
                return self._negative(query, zone, nxdomain=qname != zone)
            if qtype in (dns.rdatatype.PTR, dns.rdatatype.ANY):
                resp = self._response(query)
                rr = dns.rrset.from_text(qname, TTL, "IN", "PTR", target.to_text())
                resp.answer.append(rr)
                return resp
            return self._negative(query, zone, nxdomain=False)
        if self.domain is not None and self.config.magic_dns and qname.is_subdomain(self.domain):
            if qname == self.domain:
                if qtype == dns.rdatatype.SOA:
                    resp = self._response(query)
                    resp.answer.append(self._soa(self.domain, qname))
                    return resp
                return self._negative(query, self.domain, nxdomain=False)
            found = self._hosts.get(qname)
            if found is None:
                return self._negative(query, self.domain, nxdomain=True)
            return self._addresses(query, self.domain, *found)
        if len(qname) == 2 and self.config.magic_dns:  # a single label: a node's short name?
            found = self._short.get(qname)
            if found is not None:
                return self._addresses(query, self.domain or dns.name.root, *found)
        return None

    def relay(self, query: dns.message.Message, upstream: dns.message.Message, max_size: int) -> bytes:
        """The client's answer from an upstream's ``upstream`` response: its rcode, flags and records, with
        the client's id and question (case as asked), cut to ``max_size`` bytes."""
        resp = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
        resp.flags = (resp.flags & ~0x0FFF) | (upstream.flags & 0x07B0) | dns.flags.RA  # AA TC RD RA AD CD
        resp.flags &= ~dns.flags.TC
        resp.flags |= query.flags & dns.flags.RD
        resp.set_rcode(upstream.rcode())
        resp.answer = list(upstream.answer)
        resp.authority = list(upstream.authority)
        resp.additional = [r for r in upstream.additional if r.rdtype != dns.rdatatype.OPT]
        return render(resp, max_size)

    def servfail(self, query: dns.message.Message, max_size: int) -> bytes:
        """SERVFAIL for ``query`` (no upstream answered)."""
        self.servfails += 1
        return render(self._rcode(query, dns.rcode.SERVFAIL), max_size)

    @staticmethod
    def upstream_query(query: dns.message.Message) -> dns.message.Message:
        """The query sent upstream for the client's ``query``: same question (and case), RD and CD, EDNS0
        with our payload size (the DO bit kept), a fresh random id."""
        q = query.question[0]
        up = dns.message.make_query(
            q.name,
            q.rdtype,
            q.rdclass,
            use_edns=0,
            payload=OUR_PAYLOAD,
            want_dnssec=bool(query.ednsflags & dns.flags.DO),
        )
        up.id = random.SystemRandom().randrange(65536)
        up.flags = dns.flags.RD | (query.flags & (dns.flags.CD | dns.flags.AD))
        return up

    # -- building answers ----------------------------------------------------------------------------------

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
        resp.flags |= dns.flags.AA | dns.flags.RA
        return resp

    def _rcode(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        resp = dns.message.make_response(query, our_payload=OUR_PAYLOAD)
        resp.flags |= dns.flags.RA
        resp.set_rcode(rcode)
        return resp

    def _soa(self, zone: dns.name.Name, owner: dns.name.Name | None = None) -> dns.rrset.RRset:
        ns = self.domain if self.domain is not None else dns.name.from_text("magicdns.invalid.")
        text = f"ns.{ns.to_text()} hostmaster.{ns.to_text()} 1 3600 600 86400 {NEGATIVE_TTL}"
        return dns.rrset.from_text(owner if owner is not None else zone, NEGATIVE_TTL, "IN", "SOA", text)

    def _negative(
        self, query: dns.message.Message, zone: dns.name.Name, *, nxdomain: bool
    ) -> dns.message.Message:
        resp = self._response(query)
        if nxdomain:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        resp.authority.append(self._soa(zone))
        return resp

    def _addresses(
        self, query: dns.message.Message, zone: dns.name.Name, v4: list[IPAddress], v6: list[IPAddress]
    ) -> dns.message.Message:
        q = query.question[0]
        resp = self._response(query)
        for rdtype, ips in ((dns.rdatatype.A, v4), (dns.rdatatype.AAAA, v6)):
            if ips and q.rdtype in (rdtype, dns.rdatatype.ANY):
                rr = dns.rrset.RRset(q.name, dns.rdataclass.IN, rdtype)
                for ip in ips:
                    rr.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(ip)), TTL)
                resp.answer.append(rr)
        if not resp.answer:
            resp.authority.append(self._soa(zone))
        return resp

    def _zone_of(self, qname: dns.name.Name) -> dns.name.Name:
        if self.domain is not None and qname.is_subdomain(self.domain):
            return self.domain
        return qname.parent() if len(qname) > 1 else dns.name.root

    @staticmethod
    def _reverse_zone(qname: dns.name.Name) -> dns.name.Name | None:
        if qname.is_subdomain(_REVERSE_V6):
            return _REVERSE_V6
        if len(qname) >= 5 and qname.is_subdomain(_REVERSE_V4[0].parent()):
            zone = qname.split(5)[1]  # "<octet>.100.in-addr.arpa."
            if zone in _REVERSE_V4:
                return zone
        return None


__all__ = [
    "MAGICDNS_V4",
    "MAGICDNS_V6",
    "NEGATIVE_TTL",
    "OUR_PAYLOAD",
    "TTL",
    "Forward",
    "Outcome",
    "Reply",
    "Resolver",
    "error_reply",
    "is_magicdns",
    "parse_query",
    "question_end",
    "render",
    "reverse_name",
    "udp_limit",
    "well_formed",
]
