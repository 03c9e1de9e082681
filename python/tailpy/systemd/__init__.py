"""systemd units for tailpy's three services, shipped as package data and written by
``tailpy install-systemd`` (:mod:`tailpy.cli.install_systemd`).

``tailpyd.service`` (``Type=notify``: tailpyd sends READY=1 once the node is up or waits for login, see
:mod:`tailpy.daemon.sdnotify`), ``tailpy-control.service`` and ``tailpy-derp.service`` (each a
``DynamicUser`` with its own ``StateDirectory``). ``@TAILPYD@`` and ``@TAILPY@`` in the templates are
replaced by the commands that run tailpyd and the tailpy CLI (absolute paths, as systemd requires).
"""

from __future__ import annotations

from importlib import resources

UNITS = ("tailpyd.service", "tailpy-control.service", "tailpy-derp.service")


def template(name: str) -> str:
    """The template text of unit ``name`` (one of :data:`UNITS`)."""
    return resources.files(__package__).joinpath(name).read_text()


def render(name: str, tailpyd: str, tailpy: str) -> str:
    """Unit ``name`` with its commands filled in (``tailpyd``, ``tailpy``: absolute command lines)."""
    return template(name).replace("@TAILPYD@", tailpyd).replace("@TAILPY@", tailpy)


__all__ = ["UNITS", "render", "template"]
