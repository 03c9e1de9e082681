"""Options and helpers shared by the subcommands that talk to tailpyd."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from tailpy.daemon.client import LocalClient, default_socket, default_state_dir

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange that also refuses nan and inf (which compare False against both bounds and so
    would pass FloatRange): the same usage error, exit 2, "VALUE is not in the range A<=x<=B."."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not in the range {self._describe_range()}.", param, ctx)
        return rv


def socket_option(f: F) -> F:
    return click.option(
        "--socket",
        "socket_path",
        default=default_socket,
        show_default="$TAILPY_SOCKET or /run/tailpy/tailpyd.sock",
        help="tailpyd's local API socket.",
    )(f)


def state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        default=default_state_dir,
        show_default="$TAILPY_STATE_DIR or /var/lib/tailpy",
        help="tailpyd's state directory (used when `up` starts the daemon).",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def local(socket_path: str) -> LocalClient:
    return LocalClient(socket_path)
