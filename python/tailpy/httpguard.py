"""What tailpy's HTTP servers do with hostile requests before any handler sees them, and what their logs
keep of them.

* :func:`refuse_encoded_bodies`, an aiohttp middleware: a request whose body carries a ``Content-Encoding``
  other than ``identity`` is answered 415 with ``Accept-Encoding: identity`` (RFC 7694 §3) and a JSON
  ``{"error": sentence}``, before the body is read. tailpy's own clients never compress a request body; the
  servers run with aiohttp's ``auto_decompress=False`` (:data:`RUNNER_OPTIONS`) so that a body that fails to
  inflate (or needs a codec that is not installed) never reaches aiohttp's plain-text error pages.
* :func:`escape_controls`: a string with every control character (C0, DEL, C1, U+2028/U+2029) written as a
  Python escape (``\\n``, ``\\x00``, ``\\x1b``), so that text from a request cannot forge a log line nor
  drive a terminal. :class:`EscapeControls` applies it to every record a handler writes;
  :func:`install_log_guards` puts it on the root logger's handlers (``logging.basicConfig``'s) and
  :class:`QuietBadRequests` on the ``aiohttp.server`` logger.
* :class:`QuietBadRequests`: aiohttp's "Error handling request" for a malformed request (a bad request line,
  a NUL in a header, an over-long header: ``aiohttp.http_exceptions.HttpProcessingError``) becomes one line
  naming the peer and the exception's class, without the traceback nor the header's bytes (an
  ``Authorization`` header's secret, say).
* :func:`came_through_proxy`: a request carrying ``Forwarded`` (RFC 7239), ``X-Forwarded-For`` or
  ``X-Real-IP`` was relayed by a proxy, so its TCP peer says nothing about the client: loopback-only
  endpoints refuse it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
"""Headers (lowercase) a reverse proxy adds naming the client it relays for."""

RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False}
"""Keyword arguments for ``web.AppRunner``: request bodies reach handlers as sent (never inflated)."""

ENCODED_BODY = (
    "request bodies are accepted without a Content-Encoding only (send it uncompressed, or with "
    "Content-Encoding: identity)"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _escape_one(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with each control character as an escape (``"a\\nb"`` -> ``"a\\\\nb"``); other text as is."""
    return _CONTROLS.sub(_escape_one, text)


@web.middleware
async def refuse_encoded_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """415 JSON for a request with a ``Content-Encoding`` other than ``identity``; else ``handler``'s."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding != "identity":
        return web.json_response({"error": ENCODED_BODY}, status=415, headers={"Accept-Encoding": "identity"})
    return await handler(request)


def came_through_proxy(headers: Mapping[str, str]) -> bool:
    """True when ``headers`` (any case of names for a CIMultiDict; lowercase for a plain dict) hold a header a
    reverse proxy adds (:data:`PROXY_HEADERS`)."""
    return any(name in headers for name in PROXY_HEADERS)


MULTILINE = "tailpy_multiline"
"""``extra={MULTILINE: True}`` on a log call keeps its message's line breaks (a stack dump tailpy writes)."""


class EscapeControls(logging.Filter):
    """A handler filter writing each record's message with :func:`escape_controls` (tracebacks untouched;
    a record logged with ``extra={MULTILINE: True}`` too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, MULTILINE, False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as it would
            return True
        escaped = escape_controls(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


class QuietBadRequests(logging.Filter):
    """A filter for the ``aiohttp.server`` logger: a record carrying an
    ``aiohttp.http_exceptions.HttpProcessingError`` becomes "refused a malformed HTTP request from <peer>
    (<class>)" without its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed HTTP request from %s (%s)"
            record.args = (peer, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install_log_guards() -> None:
    """Put :class:`QuietBadRequests` on ``aiohttp.server`` and :class:`EscapeControls` on each of the root
    logger's handlers (call after ``logging.basicConfig``); calling again adds nothing."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietBadRequests) for f in server.filters):
        server.addFilter(QuietBadRequests())
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, EscapeControls) for f in handler.filters):
            handler.addFilter(EscapeControls())


__all__ = [
    "ENCODED_BODY",
    "MULTILINE",
    "PROXY_HEADERS",
    "RUNNER_OPTIONS",
    "EscapeControls",
    "QuietBadRequests",
    "came_through_proxy",
    "escape_controls",
    "install_log_guards",
    "refuse_encoded_bodies",
]
