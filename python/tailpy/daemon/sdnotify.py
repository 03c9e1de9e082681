"""systemd's readiness protocol, sender side (``sd_notify(3)``; the protocol in systemd's
``docs/NOTIFY_SOCKET.md``): newline-separated ``KEY=VALUE`` assignments in one datagram to the
``AF_UNIX`` ``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). With no ``$NOTIFY_SOCKET`` (not started by systemd as ``Type=notify``) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("tailpy.daemon")


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=Running"``, ``"STOPPING=1"``); whether a
    datagram went out. A socket that refuses is logged, never raised."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or not assignments:
        return False
    addr = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(assignments).encode())
    except OSError as e:
        log.warning("cannot notify systemd on %s: %s", target, e)
        return False
    return True


__all__ = ["notify"]
