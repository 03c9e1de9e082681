"""tailpy: a mesh VPN in the manner of Tailscale.

``tailpy.Node`` (:mod:`tailpy.node`) runs a tailnet node inside a Python program, without root; it is
imported on first use, so ``import tailpy`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailpy.node import Node


def __getattr__(name: str) -> Any:
    if name == "Node":
        from tailpy.node import Node

        return Node
    raise AttributeError(f"module 'tailpy' has no attribute {name!r}")


__all__ = ["Node"]
