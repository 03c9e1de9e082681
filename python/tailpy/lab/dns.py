"""DNS in the lab: each namespace's own resolv.conf, and real upstream resolvers (Debian's dnsmasq).

``ip netns exec NS`` bind-mounts ``/etc/netns/NS/resolv.conf`` over ``/etc/resolv.conf`` when that file
exists, so every process of a lab host (tailpyd included) reads and writes its own copy, never the machine's.
:func:`give_resolv_conf` makes that file (removed when the lab closes); :class:`Dnsmasq` runs an
authoritative-only dnsmasq (no upstream, no /etc/hosts, queries logged to a file) on a lab address.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tailpy.errors import LabError
from tailpy.lab.netns import Host
from tailpy.lab.procs import wait_for

NETNS_ETC = Path("/etc/netns")


def resolv_conf_path(host: Host) -> Path:
    """``/etc/netns/<netns>/resolv.conf`` of ``host``."""
    return NETNS_ETC / host.netns / "resolv.conf"


def give_resolv_conf(host: Host, text: str) -> Path:
    """Give lab ``host`` its own ``/etc/resolv.conf`` with ``text`` (see the module docstring); the
    directory ``/etc/netns/<netns>`` goes away with the lab. Returns the file's path."""
    if not host.netns.startswith(host.lab.prefix):
        raise LabError(f"{host.netns} is not a namespace of this lab")
    d = NETNS_ETC / host.netns
    fresh = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    if fresh:
        host.lab.track_path(d)
    path = d / "resolv.conf"
    path.write_text(text)
    return path


def dnsmasq_reason() -> str | None:
    """Why no lab resolver can run here (one sentence), or None."""
    if shutil.which("dnsmasq") is None:
        return "dnsmasq not found: install Debian's dnsmasq-base"
    return None


class Dnsmasq:
    """An authoritative-only dnsmasq on ``host`` at ``address`` port 53 (UDP and TCP) answering
    ``records`` (name -> addresses; several addresses give several records) and NXDOMAIN for every other
    name. ``workdir`` holds its hosts file and query log (:meth:`queries`)."""

    def __init__(
        self,
        host: Host,
        address: str,
        records: Mapping[str, Sequence[str]],
        workdir: Path,
        name: str = "dnsmasq",
    ) -> None:
        reason = dnsmasq_reason()
        if reason:
            raise LabError(reason)
        self.host, self.address = host, address
        workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_file = workdir / f"{name}.hosts"
        self.log = workdir / f"{name}.log"
        self.hosts_file.write_text("".join(f"{ip} {n}\n" for n, ips in records.items() for ip in ips))
        self.log.write_text("")
        self.proc: Any = host.popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                f"--listen-address={address}",
                "--port=53",
                "--user=root",
                "--pid-file=",
                f"--addn-hosts={self.hosts_file}",
                "--local=/#/",  # never forward: unknown names are NXDOMAIN
                "--cache-size=0",
                "--log-queries",
                f"--log-facility={self.log}",
            ],
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout=15, what=f"dnsmasq on {host.name} {address} to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise LabError(f"dnsmasq on {self.host.name} exited (status {self.proc.returncode})")
        done = self.host.run(
            ["dig", "+short", "+time=1", "+tries=1", f"@{self.address}", "probe.invalid"],
            check=False,
            timeout=10,
        )
        return done.returncode == 0

    def queries(self) -> list[str]:
        """The names dnsmasq was asked for, in order (from its query log)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split()
            for i, p in enumerate(parts):
                if p.startswith("query[") and i + 1 < len(parts):
                    out.append(parts[i + 1])
        return out


__all__ = ["Dnsmasq", "dnsmasq_reason", "give_resolv_conf", "resolv_conf_path"]
