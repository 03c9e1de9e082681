"""Every error of tailpy's HTTP APIs as JSON: ``{"error": "<one sentence>"}`` with a status code, never
aiohttp's plain-text or HTML error page nor a traceback.

:func:`json_errors` is an aiohttp middleware (``web.Application(middlewares=[json_errors])``) for the
control server's node API, its admin socket and tailpyd's local API. A handler's ``web.HTTPException`` (404
for an unknown path, 405 for a wrong method, 413 for a body too large) keeps its status with its reason as
the sentence, and its ``Allow``, ``WWW-Authenticate`` and ``Retry-After`` headers; a body that cannot be
read (``aiohttp.web.RequestPayloadError``) is 400; a :class:`~tailpy.errors.StorageError` is 507
Insufficient Storage (RFC 4918 §11.5); another TailpyError is 500 with its sentence; any other exception is
logged with its traceback and answered 500 with a sentence pointing at the log. Redirects and non-error
statuses pass through; paths in ``skip`` (prefixes: browser pages with their own error pages) pass
untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from tailpy.errors import StorageError, TailpyError

log = logging.getLogger("tailpy.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")
"""Headers of a handler's ``web.HTTPException`` the JSON answer keeps."""


def error_response(status: int, sentence: str) -> web.Response:
    return web.json_response({"error": sentence}, status=status)


def make_json_errors(
    skip: tuple[str, ...] = (), translate: Callable[[Exception], TailpyError | None] | None = None
) -> Middleware:  # aiohttp's middleware protocol
    """The middleware, leaving paths that start with one of ``skip`` alone; ``translate`` may turn another
    library's exception into a TailpyError (a database's "disk is full" into a StorageError)."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if skip and request.path.startswith(skip):
            return await handler(request)
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            text = e.text or ""
            resp = error_response(
                e.status, text if text and not text.startswith(f"{e.status}:") else e.reason
            )
            for name in _KEPT_HEADERS:  # (a 405's Allow: RFC 9110 §15.5.6)
                if name in e.headers:
                    resp.headers[name] = e.headers[name]
            return resp
        except RequestPayloadError as e:  # a body cut short or malformed in its framing
            log.info("%s %s: unreadable request body (%s)", request.method, request.path, e)
            return error_response(400, "the request body could not be read")
        except StorageError as e:
            log.warning("%s %s: %s", request.method, request.path, e)
            return error_response(507, str(e))
        except TailpyError as e:
            log.warning("%s %s: %s", request.method, request.path, e)
            return error_response(500, str(e))
        except Exception as e:
            known = translate(e) if translate is not None else None
            if known is not None:
                log.warning("%s %s: %s", request.method, request.path, known)
                return error_response(507 if isinstance(known, StorageError) else 500, str(known))
            log.exception("%s %s failed", request.method, request.path)
            return error_response(
                500, f"internal error ({type(e).__name__}); the server's log has the details"
            )

    return json_errors


json_errors = make_json_errors()

__all__ = ["error_response", "json_errors", "make_json_errors"]
