"""Access control: Tailscale's policy file (HuJSON), checked and compiled into per-node packet filters.

    from tailpy.control.policy import Policy, PolicyError, PolicyNode, check_tests, compile_filter

:class:`Policy` (:mod:`.model`) reads and checks a policy; :func:`compile_filter` and :class:`Compiled`
(:mod:`.compiler`) turn it into each node's ``tailcfg.FilterRule`` list and decide which peers a node sees;
:func:`check_tests` evaluates its ``tests``. The HuJSON reader is :mod:`.hujson`.
"""

from tailpy.control.policy.compiler import Changes, Compiled, check_tests, compile_filter
from tailpy.control.policy.model import Policy, PolicyError, PolicyNode

__all__ = ["Changes", "Compiled", "Policy", "PolicyError", "PolicyNode", "check_tests", "compile_filter"]
