"""netcheck (tailpy.magicsock.netcheck): endpoint-dependent mapping detection that does not flap
(tailscale/tailscale#1559) with a fake clock, preferred-region hysteresis,
endpoint carry-over, and a run over a real StunRunner whose transport loses first attempts."""

from __future__ import annotations

import asyncio

import pytest

from tailpy.endpoint import Endpoint
from tailpy.magicsock import netcheck as nc
from tailpy.magicsock.stun import StandaloneStun, StunRunner
from tailpy.netmap import DerpMap, DerpNode, DerpRegion
from tailpy.proto import stun

A = nc.StunTarget(1, "1a", "192.0.2.10", 3478, 4)
B = nc.StunTarget(2, "2a", "198.51.100.10", 3478, 4)
B2 = nc.StunTarget(1, "1a", "192.0.2.10", 3479, 4)  # a second port of A's server


def probe(t: nc.StunTarget, mapped: tuple[str, int] | None, rtt: float | None = 0.02) -> nc.ProbeResult:
    ep = None if mapped is None else Endpoint.from_sockaddr(mapped)
    return nc.ProbeResult(
        t, Endpoint.parse(f"{t.host}:{t.port}"), ep, rtt if mapped else None, None if mapped else "timeout"
    )


def test_mapping_varies_flapping_keeps_previous_verdict() -> None:
    h = nc.Netcheck()
    now = 1_000.0
    # (1) two servers on different IPs see the same ip:port: not varying
    r = h.report([probe(A, ("203.0.113.5", 41641)), probe(B, ("203.0.113.5", 41641))], now=now)
    assert r.mapping_varies_by_dest_ip is False and r.mapping_varies_fresh
    assert str(r.global_v4) == "203.0.113.5:41641"
    # (2) different mapped ports: endpoint-dependent mapping
    r = h.report([probe(A, ("203.0.113.5", 41641)), probe(B, ("203.0.113.5", 50000))], now=now + 25)
    assert r.mapping_varies_by_dest_ip is True and r.mapping_varies_fresh
    # (3) only one answers: this run cannot tell; the previous verdict (True) stands
    r = h.report([probe(A, ("203.0.113.5", 41641)), probe(B, None)], now=now + 50)
    assert r.mapping_varies_by_dest_ip is True and not r.mapping_varies_fresh
    # ...and again with nobody answering
    r = h.report([probe(A, None), probe(B, None)], now=now + 75)
    assert r.mapping_varies_by_dest_ip is True and not r.mapping_varies_fresh
    assert r.udp is False


def test_mapping_varies_unknown_from_the_start_is_none() -> None:
    r = nc.Netcheck().report([probe(A, ("203.0.113.5", 41641)), probe(B, None)], now=0.0)
    assert r.mapping_varies_by_dest_ip is None and not r.mapping_varies_fresh
    assert r.to_json()["mapping_varies_by_dest_ip"] is None


def test_two_ports_of_one_server_count_as_two_destinations() -> None:
    h = nc.Netcheck()
    r = h.report([probe(A, ("203.0.113.5", 1000)), probe(B2, ("203.0.113.5", 1001))], now=0.0)
    assert r.mapping_varies_by_dest_ip is True


def test_endpoints_change_only_when_they_change() -> None:
    h = nc.Netcheck(keep_endpoint_for=300)
    h.report([probe(A, ("203.0.113.5", 41641))], now=0.0)
    assert h.endpoints_changed
    h.report([probe(A, ("203.0.113.5", 41641))], now=20.0)
    assert not h.endpoints_changed
    # a lost round: the endpoint found 20 s ago stands, nothing to tell control
    r = h.report([probe(A, None)], now=40.0)
    assert str(r.global_v4) == "203.0.113.5:41641" and not r.udp and not h.endpoints_changed
    # lost for longer than keep_endpoint_for: gone (a change)
    r = h.report([probe(A, None)], now=400.0)
    assert r.global_v4 is None and h.endpoints_changed
    r = h.report([probe(A, ("203.0.113.5", 50000))], now=420.0)
    assert str(r.global_v4) == "203.0.113.5:50000" and h.endpoints_changed


def test_global_endpoint_is_the_fastest_servers_view() -> None:
    r = nc.Netcheck().report(
        [probe(A, ("203.0.113.5", 1), rtt=0.050), probe(B, ("203.0.113.5", 2), rtt=0.010)], now=0.0
    )
    assert str(r.global_v4) == "203.0.113.5:2"


def test_preferred_region_hysteresis() -> None:
    h = nc.Netcheck()
    r = h.report([probe(A, ("203.0.113.5", 1), rtt=0.030), probe(B, ("203.0.113.5", 1), rtt=0.040)], now=0)
    assert r.preferred_derp == 1 and r.region_latency == {1: 0.030, 2: 0.040}
    # region 2 a little faster now (25 vs 30 ms): not clearly faster, region 1 stays
    r = h.report([probe(A, ("203.0.113.5", 1), rtt=0.030), probe(B, ("203.0.113.5", 1), rtt=0.025)], now=1)
    assert r.preferred_derp == 1
    # 15 ms vs 30 ms: at least 10 ms and a third faster: switch
    r = h.report([probe(A, ("203.0.113.5", 1), rtt=0.030), probe(B, ("203.0.113.5", 1), rtt=0.015)], now=2)
    assert r.preferred_derp == 2
    # the preferred region does not answer: the best that does
    r = h.report([probe(A, ("203.0.113.5", 1), rtt=0.030), probe(B, None)], now=3)
    assert r.preferred_derp == 1
    # nobody answers: the previous verdict stays
    r = h.report([probe(A, None), probe(B, None)], now=4)
    assert r.preferred_derp == 1 and r.region_latency == {}


def test_hairpin_unknown_keeps_previous() -> None:
    h = nc.Netcheck()
    assert h.report([], now=0, hairpin=True).hairpinning is True
    r = h.report([], now=1, hairpin=None)
    assert r.hairpinning is True and not r.hairpinning_fresh
    assert h.report([], now=2, hairpin=False).hairpinning is False


def test_stun_targets_from_a_derp_map() -> None:
    dm = DerpMap(
        {
            1: DerpRegion(1, "one", "One", (DerpNode("1a", 1, "192.0.2.10", stun_port=0),)),
            2: DerpRegion(
                2,
                "two",
                "Two",
                (
                    DerpNode(
                        "2a", 2, "derp2.example", ipv4="198.51.100.10", ipv6="2001:db8::10", stun_port=3479
                    ),
                ),
            ),
            3: DerpRegion(3, "three", "Three", (DerpNode("3a", 3, "192.0.2.30", stun_port=-1),)),
        }
    )
    targets = nc.stun_targets(dm, ["[2001:db8::99]:5000"])
    assert [(t.region_id, t.host, t.port, t.family) for t in targets] == [
        (1, "192.0.2.10", 3478, 4),
        (2, "198.51.100.10", 3479, 4),
        (2, "2001:db8::10", 3479, 6),
        (0, "2001:db8::99", 5000, 6),
    ]


async def test_probe_is_retransmitted_before_it_counts_as_lost() -> None:
    """A run over a real StunRunner whose transport drops the first request to each server: the
    retransmission is answered, so both servers count and the verdict is fresh."""
    sent: dict[str, int] = {}
    mapped_for = {"192.0.2.10:3478": ("203.0.113.5", 41641), "198.51.100.10:3478": ("203.0.113.5", 41641)}
    runner: StunRunner

    def send(datagram: bytes, to: Endpoint) -> None:
        dest = str(to)
        sent[dest] = sent.get(dest, 0) + 1
        if sent[dest] == 1 or dest not in mapped_for:
            return  # lost
        req = stun.parse(datagram)
        reply = stun.encode(
            stun.BINDING, stun.MessageClass.SUCCESS, req.txid, [stun.address_attr(mapped_for[dest], req.txid)]
        )
        asyncio.get_running_loop().call_soon(runner.feed, reply, to)

    runner = StunRunner(send, rto=0.05)
    history = nc.Netcheck()
    report = await nc.run(runner, [A, B], history, timeout=5.0, hairpin=False)
    assert sent == {"192.0.2.10:3478": 2, "198.51.100.10:3478": 2}
    assert report.udp and str(report.global_v4) == "203.0.113.5:41641"
    assert report.mapping_varies_by_dest_ip is False and report.mapping_varies_fresh
    assert set(report.region_latency) == {1, 2}


async def test_run_on_loopback_with_two_stun_ports_and_hairpin() -> None:
    from tailpy.derp.stun_server import StunServer

    servers = [StunServer(), StunServer()]
    for s in servers:
        await s.start("127.0.0.1", 0)
    try:
        targets = [
            nc.StunTarget(i + 1, f"{i + 1}a", "127.0.0.1", s.addresses[0][1], 4)
            for i, s in enumerate(servers)
        ]
        async with StandaloneStun(bind="127.0.0.1") as sock:
            report = await nc.run(sock.runner, targets, nc.Netcheck(), timeout=5.0)
            assert report.udp and report.ipv4
            assert str(report.global_v4) == f"127.0.0.1:{sock.port}"
            assert report.mapping_varies_by_dest_ip is False
            assert report.hairpinning is True  # no NAT: our own address reaches us
            assert set(report.region_latency) == {1, 2} and report.preferred_derp in (1, 2)
    finally:
        for s in servers:
            await s.stop()


@pytest.mark.parametrize("bad", ["192.0.2.1", "192.0.2.1:0", "[2001:db8::1]", "host:3478", "::1:3478"])
def test_bad_extra_stun_endpoint_is_a_config_error(bad: str) -> None:
    from tailpy.errors import ConfigError

    with pytest.raises(ConfigError):
        nc.stun_targets(None, [bad])


async def test_mapped_endpoint_is_reported_before_the_hairpin_check_ends() -> None:
    """on_mapped gets each STUN-mapped address as it arrives, while the run still waits for the hairpin
    check (no hairpinning: about a second of unanswered sends), so tailpyd can publish it at once."""
    runner: StunRunner
    seen: list[tuple[Endpoint, bool]] = []
    done = asyncio.Event()

    def send(datagram: bytes, dest: Endpoint) -> None:
        req = stun.parse(datagram)
        if dest != Endpoint.parse("192.0.2.10:3478"):
            return  # the hairpin probe to our own mapped address never comes back
        reply = stun.encode(
            stun.BINDING,
            stun.MessageClass.SUCCESS,
            req.txid,
            [stun.address_attr(("203.0.113.5", 41641), req.txid)],
        )
        asyncio.get_running_loop().call_soon(runner.feed, reply, dest)

    runner = StunRunner(send, rto=0.05)
    task = asyncio.ensure_future(
        nc.run(runner, [A], nc.Netcheck(), timeout=2.0, on_mapped=lambda ep: seen.append((ep, done.is_set())))
    )
    task.add_done_callback(lambda _: done.set())
    report = await task
    assert seen == [(Endpoint.parse("203.0.113.5:41641"), False)]  # reported while the run was still going
    assert str(report.global_v4) == "203.0.113.5:41641" and report.hairpinning is False


def test_carried_over_endpoint_is_labelled_in_text_and_json() -> None:
    from tailpy.cli.netcheck import format_report

    h = nc.Netcheck(keep_endpoint_for=300)
    r = h.report([probe(A, ("192.0.2.2", 41641))], now=0.0, hairpin=False)
    assert r.global_v4_fresh and r.global_v6_fresh
    text = format_report(r, None)
    assert "\t* IPv4: yes, 192.0.2.2:41641\n" in text and "kept from an earlier run" not in text
    # STUN blocked: UDP false, and the endpoint shown is the earlier run's, saying so (no bare "yes")
    r = h.report([probe(A, None)], now=30.0)
    assert not r.udp and str(r.global_v4) == "192.0.2.2:41641" and not r.global_v4_fresh
    lines = format_report(r, None).splitlines()
    assert "\t* UDP: false" in lines
    assert "\t* IPv4: 192.0.2.2:41641 (kept from an earlier run; this one could not tell)" in lines
    assert "\t* HairPinning: false (kept from an earlier run; this one could not tell)" in lines
    doc = r.to_json()
    assert doc["global_v4"] == "192.0.2.2:41641" and doc["global_v4_fresh"] is False
    assert nc.Report.from_json(doc).global_v4_fresh is False
    # an older daemon's report without the field: fresh, as before
    del doc["global_v4_fresh"]
    assert nc.Report.from_json(doc).global_v4_fresh is True
    # found again: fresh
    r = h.report([probe(A, ("192.0.2.2", 41641))], now=60.0)
    assert r.global_v4_fresh and "\t* IPv4: yes, 192.0.2.2:41641" in format_report(r, None).splitlines()


@pytest.mark.parametrize(
    "args", [["--every", "nan"], ["--every", "inf"], ["--timeout", "nan"], ["--timeout", "inf"]]
)
def test_netcheck_nan_and_inf_options_are_usage_errors(args: list[str]) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tailpy.cli.main", "netcheck", "--stun", "127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"Invalid value for '{args[0]}'" in proc.stderr and "is not in the range" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_extra_stun_server_is_one_sentence_with_a_colon() -> None:
    from tailpy.errors import ConfigError
    from tailpy.magicsock.netcheck import stun_targets
    from tailpy.netmap import DerpMap

    with pytest.raises(ConfigError) as got:
        stun_targets(DerpMap(), ["not-an-endpoint"])
    assert str(got.value).startswith("STUN server: malformed endpoint 'not-an-endpoint'")
