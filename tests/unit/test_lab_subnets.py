"""The lab's ping-loop counting (tailpy.lab.subnets): probes sent, answered, the longest outage."""

from __future__ import annotations

from tailpy.lab.subnets import PingStats, ping_stats

#: iputils ``ping -n -O -i 0.2`` output: probes 3-5 unanswered (reported), 8 never reported at all.
OUTPUT = """PING 198.51.100.100 (198.51.100.100) 56(84) bytes of data.
64 bytes from 198.51.100.100: icmp_seq=1 ttl=63 time=0.411 ms
64 bytes from 198.51.100.100: icmp_seq=2 ttl=63 time=0.380 ms
no answer yet for icmp_seq=3
no answer yet for icmp_seq=4
no answer yet for icmp_seq=5
64 bytes from 198.51.100.100: icmp_seq=6 ttl=63 time=0.402 ms
64 bytes from 198.51.100.100: icmp_seq=7 ttl=63 time=0.398 ms
64 bytes from 198.51.100.100: icmp_seq=9 ttl=63 time=0.390 ms
From 198.51.100.1 icmp_seq=10 Destination Host Unreachable
64 bytes from 198.51.100.100: icmp_seq=11 ttl=63 time=0.401 ms

--- 198.51.100.100 ping statistics ---
11 packets transmitted, 6 received, +1 errors, 45.4545% packet loss, time 2000ms
"""


def test_ping_stats_counts_losses_and_the_longest_outage() -> None:
    stats = ping_stats(OUTPUT, 0.2)
    assert stats == PingStats(sent=11, received=6, longest_gap=3, interval=0.2)
    assert stats.lost == 5
    assert abs(stats.longest_gap_seconds - 0.6) < 1e-9
    assert stats.longest_silence == 0.0  # no -D timestamps
    assert "11 sent, 6 received, 5 lost" in str(stats)


STAMPED = """[1796584759.365385] 64 bytes from 198.51.100.100: icmp_seq=21 ttl=63 time=0.249 ms
[1796584759.421466] 64 bytes from 198.51.100.100: icmp_seq=22 ttl=63 time=0.265 ms
[1796584759.527988] no answer yet for icmp_seq=23
[1796584759.531227] 64 bytes from 198.51.100.100: icmp_seq=24 ttl=63 time=3.16 ms
[1796584759.586735] 64 bytes from 198.51.100.100: icmp_seq=25 ttl=63 time=5.53 ms
"""


def test_ping_stats_longest_silence_from_timestamps() -> None:
    stats = ping_stats(STAMPED, 0.05)
    assert (stats.sent, stats.received, stats.longest_gap) == (25, 4, 20)
    assert abs(stats.longest_silence - (1796584759.531227 - 1796584759.421466)) < 1e-6


def test_ping_stats_of_no_output() -> None:
    assert ping_stats("", 0.2) == PingStats(0, 0, 0, 0.2)
