"""Undo what a tailpyd that did not exit cleanly (kill -9, a crash, a power cut) left on the host: the host's
resolver pointed at MagicDNS, the MagicDNS addresses on ``lo``, a persistent TUN and its routes, the
nftables table of :mod:`tailpy.daemon.netfilter`, and the policy routing rules, routing table 52 and
forwarding sysctls of :mod:`tailpy.daemon.router`.

Run by tailpyd at every start (after taking the lock), by ``tailpyd --cleanup`` (systemd's
``ExecStopPost``), and by ``tailpy down`` when no daemon runs. Only what no running daemon owns is touched:
the caller holds, or has checked, the state directory's lock. A TUN that is not persistent vanishes with the
process that opened it (and its routes with it); one that still exists and is not persistent belongs to a
live process and is left alone, with its nftables table and the MagicDNS addresses.

Several tailpyd may run on one host (other state directories, other TUNs, userspace ones): cleanup undoes
only what the crashed daemon recorded in its lock file (:class:`tailpy.daemon.lock.RunRecord`), and leaves
the MagicDNS addresses and the host's resolver alone while a live process serves on a MagicDNS address
(another tailpyd's MagicDNS: read from ``/proc/net/{udp,tcp}{,6}``, proc(5)).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tailpy.daemon import netfilter, router
from tailpy.daemon.lock import RunRecord
from tailpy.dns.osconfig import RESOLV_CONF, ResolvConf
from tailpy.dns.resolver import MAGICDNS_V4, MAGICDNS_V6

log = logging.getLogger("tailpy.daemon")

USERSPACE_TUN = "userspace-networking"
"""``--tun`` value of a userspace data plane (tailscaled's name for it): no TUN, no host DNS to undo."""


def _ip(*args: str) -> subprocess.CompletedProcess[str] | None:
    exe = shutil.which("ip")
    if exe is None:
        return None
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30, check=False)


def _tun_state(name: str) -> str:
    """ "absent", "persistent" (a TUN no process needs to hold), or "live" (held open by some process, or
    not a TUN at all: not ours to touch)."""
    done = _ip("-d", "-j", "link", "show", "dev", name)
    if done is None or done.returncode != 0 or not done.stdout.strip():
        return "absent"
    with contextlib.suppress(ValueError, IndexError, AttributeError):
        info = json.loads(done.stdout)[0].get("linkinfo", {})
        if info.get("info_kind") == "tun" and info.get("info_data", {}).get("persist"):
            return "persistent"
    return "live"


def _lo_has(address: str) -> bool:
    done = _ip("-j", "addr", "show", "dev", "lo")
    if done is None or done.returncode != 0:
        return False
    with contextlib.suppress(ValueError):
        return any(
            a.get("local") == address for link in json.loads(done.stdout) for a in link.get("addr_info", [])
        )
    return False


def _proc_net_address(field: str) -> str:
    """The address of a ``/proc/net/{udp,tcp}{,6}`` ``local_address`` field ("0100007F:0035"): 32-bit
    words in host byte order."""
    raw = bytes.fromhex(field.split(":", 1)[0])
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def magicdns_in_use() -> bool:
    """Whether some live process (another tailpyd's MagicDNS) has a socket bound to 100.100.100.100 or
    fd7a:115c:a1e0::53 in this network namespace."""
    wanted = {str(MAGICDNS_V4), str(MAGICDNS_V6)}
    for name in ("udp", "udp6", "tcp", "tcp6"):
        try:
            lines = Path("/proc/net", name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            with contextlib.suppress(ValueError, IndexError):
                if _proc_net_address(fields[1]) in wanted:
                    return True
    return False


def cleanup(
    state_dir: str | Path,
    tuns: tuple[str, ...] = ("tailpy0",),
    *,
    resolv_conf: Path = RESOLV_CONF,
    magicdns_addresses: bool = True,
) -> list[str]:
    """Undo a dead tailpyd's changes for TUNs ``tuns`` (names the dead daemon recorded; "" skipped);
    returns what was done, one phrase each ("restored /etc/resolv.conf", ...), empty when there was
    nothing. ``magicdns_addresses``: the dead daemon ran MagicDNS on a TUN (a userspace one never touches
    host DNS). Nothing of the host's DNS is touched while another live process serves MagicDNS. Never
    raises for what it cannot do: each failure is logged."""
    done: list[str] = []
    dns_in_use = magicdns_in_use()
    if dns_in_use:
        log.info(
            "cleanup: another running tailpyd serves MagicDNS: leaving its addresses and %s", resolv_conf
        )
    else:
        try:
            if ResolvConf(Path(state_dir), resolv_conf).recover():
                done.append(f"restored {resolv_conf}")
        except OSError as e:
            log.warning("cannot restore %s: %s", resolv_conf, e)
    states = {tun: _tun_state(tun) for tun in dict.fromkeys(t for t in tuns if t)}
    if magicdns_addresses and states and not dns_in_use and "live" not in states.values():
        for ip, plen in ((MAGICDNS_V4, 32), (MAGICDNS_V6, 128)):
            if _lo_has(str(ip)):
                res = _ip("-6" if ip.version == 6 else "-4", "addr", "del", f"{ip}/{plen}", "dev", "lo")
                if res is not None and res.returncode == 0:
                    done.append(f"removed {ip} from lo")
                else:
                    why = (res.stderr.strip() if res is not None else "") or "ip failed"
                    log.warning("cleanup: cannot remove %s from lo: %s", ip, why)
    for tun, state in states.items():
        if state == "live":
            log.info("cleanup: TUN %s is held by a running process: leaving it and its firewall table", tun)
            continue
        if state == "persistent":
            _ip("link", "del", "dev", tun)
            done.append(f"removed TUN {tun} and its routes")
        if netfilter.delete_table(netfilter.table_name(tun)):
            done.append(f"removed nftables table inet {netfilter.table_name(tun)}")
        done += router.cleanup_leftovers(tun, Path(state_dir) / router.FORWARDING_RECORD)
    for what in done:
        log.info("cleanup: %s", what)
    return done


def cleanup_after(state_dir: str | Path, prev: RunRecord | None) -> list[str]:
    """Undo what the daemon of ``prev`` (the lock file's record of one that did not exit cleanly; None:
    it did) left, and only that: its recorded TUN, firewall table, policy routing, forwarding sysctls and
    MagicDNS (a userspace daemon records no TUN and touched no host DNS). Another tailpyd with its own state
    directory is never touched. What ``tailpyd --cleanup``, the next start and ``tailpy down`` run."""
    tuns = (prev.tun,) if prev is not None and prev.tun and prev.tun != USERSPACE_TUN else ()
    return cleanup(state_dir, tuns, magicdns_addresses=bool(tuns))


__all__ = ["USERSPACE_TUN", "cleanup", "cleanup_after", "magicdns_in_use"]
