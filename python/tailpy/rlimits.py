"""Process resource limits raised at start of the long-running commands (``tailpy control serve``,
``tailpy derp serve``, ``tailpyd``)."""

from __future__ import annotations

import logging

log = logging.getLogger("tailpy.rlimits")


def raise_nofile_limit() -> tuple[int, int] | None:
    """Raise the soft ``RLIMIT_NOFILE`` (open files: sockets, map streams, relay clients) to the hard
    limit, as Go's runtime does at start since Go 1.19 (``os/rlimit.go``), so tailscaled and derper get it
    without asking. systemd starts services with soft 1024 and hard 524288 (``DefaultLimitNOFILE``).

    Returns ``(old_soft, new_soft)`` when raised, else None (already at the hard limit, or no ``resource``
    module on this platform). Never raises: a refusal is logged at debug and the limit stays."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == hard:
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        log.debug("open-files limit not raised: %s", e)
        return None
    log.debug("open-files limit raised from %d to %d (the hard limit)", soft, hard)
    return soft, hard


__all__ = ["raise_nofile_limit"]
