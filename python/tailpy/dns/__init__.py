"""MagicDNS: the node's resolver (tailnet names, PTR, forwarding, split DNS) and its OS configuration.

Modules: :mod:`.config` (DNS config from control), :mod:`.resolver` (sans-IO answering), :mod:`.server`
(UDP/TCP listeners and forwarding), :mod:`.osconfig` (resolv.conf / systemd-resolved), :mod:`.manager`
(tailpyd's glue). Only :mod:`.config` is imported here (the netmap needs it); import the others directly.
"""

from tailpy.dns.config import DNSConfig, ExtraRecord, parse_resolver

__all__ = ["DNSConfig", "ExtraRecord", "parse_resolver"]
