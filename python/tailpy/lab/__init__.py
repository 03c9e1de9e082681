"""Network-namespace lab topologies (hosts, LANs, veth links, NAT routers) for `tailpy demo`, tests and
benchmarks. See :mod:`tailpy.lab.netns`."""

from tailpy.lab.netns import ALLOWED_RANGES, Host, Lab, Lan, Router, unavailable_reason
from tailpy.lab.procs import cpu_seconds, read_line, stop_process, wait_for

__all__ = [
    "ALLOWED_RANGES",
    "Host",
    "Lab",
    "Lan",
    "Router",
    "cpu_seconds",
    "read_line",
    "stop_process",
    "unavailable_reason",
    "wait_for",
]
