"""The control server's HTML pages (login, success, error): plain, readable, no scripts, every value escaped.

Each page says what happened and what happens next. No traceback or exception text from tailpy's internals
reaches a browser: :func:`error_middleware` turns any unexpected exception on a page route into a plain 500
page (the details go to the server's log).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from tailpy.httpguard import escape_controls

log = logging.getLogger("tailpy.control.login")

PAGE_PREFIXES = ("/login", "/oidc")
"""Paths served as HTML pages (the rest of the control server speaks sealed JSON)."""

_STYLE = (
    "body{font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em;line-height:1.5;color:#222}"
    "h1{font-size:1.4em}.box{border:1px solid #ccc;border-radius:6px;padding:1em}"
    "a.button{display:inline-block;padding:.6em 1.2em;background:#2456a4;color:#fff;text-decoration:none;"
    "border-radius:4px}code{background:#f3f3f3;padding:0 .2em}"
)


def render(title: str, paragraphs: list[str], *, link: tuple[str, str] | None = None) -> str:
    """An HTML page: ``title`` as heading, each paragraph escaped, and an optional (href, text) button."""
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    if link is not None:
        body += (
            f'<p><a class="button" id="continue" href="{html.escape(link[0])}">{html.escape(link[1])}</a></p>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} - tailpy</title><style>{_STYLE}</style></head>"
        f'<body><h1>{html.escape(title)}</h1><div class="box">{body}</div></body></html>\n'
    )


def page(
    status: int, title: str, paragraphs: list[str], *, link: tuple[str, str] | None = None
) -> web.Response:
    """An HTML response with ``status`` (never cached: login pages hold one-time links)."""
    return web.Response(
        status=status,
        text=render(title, paragraphs, link=link),
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def login_page(hostname: str, provider: str, start_url: str, os_name: str = "") -> web.Response:
    system = f" ({os_name})" if os_name else ""
    return page(
        200,
        "Add a device to your tailnet",
        [
            f"The device {hostname!r}{system} asks to join this tailnet with your account.",
            f"Only continue if you started this yourself on that device, just now (with `tailpy up` or "
            f"`tailpy login`), and it printed this link; if someone sent you this link, close this page. "
            f"Sign in with your account at {provider} to add the device.",
        ],
        link=(start_url, "Sign in"),
    )


def success_page(who: str, hostname: str, name: str, address: str) -> web.Response:
    return page(
        200,
        "Signed in: the device is connected",
        [
            f"You are signed in as {who}.",
            f"The device {hostname!r} joined the tailnet as {name} ({address}); `tailpy up` on it finishes "
            "within a few seconds.",
            "You can close this page.",
        ],
    )


def approval_page(who: str, hostname: str) -> web.Response:
    return page(
        200,
        "Signed in: waiting for approval",
        [
            f"You are signed in as {who}.",
            f"The device {hostname!r} joins the tailnet once an administrator approves it "
            "(`tailpy control nodes approve`). `tailpy up` on the device keeps waiting until then.",
            "You can close this page.",
        ],
    )


def error_page(status: int, title: str, why: str, next_step: str) -> web.Response:
    return page(status, title, [why, next_step])


def not_found() -> web.Response:
    return error_page(
        404,
        "Page not found",
        "This control server has no such page.",
        "Use the link that `tailpy up` or `tailpy login` printed on the device.",
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For page routes: HTTP errors as plain pages, any other exception logged and shown as a plain 500
    page. Other routes pass through untouched."""
    if not request.path.startswith(PAGE_PREFIXES):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return not_found()
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects
        return error_page(e.status, "Request refused", f"The request was refused ({e.reason}).", _AGAIN)
    except Exception:
        log.exception("login page %s failed", request.path)
        return error_page(
            500,
            "Something went wrong",
            "The control server failed to handle this sign-in; the details are in its log.",
            _AGAIN,
        )


_AGAIN = "Run `tailpy login` on the device again to get a new sign-in link."


def redact_path(path: str, query: str) -> str:
    """``path`` as access logs show it: login link ids (``/login/<id>``) replaced by ``…`` and any query
    string (the OIDC callback's ``code`` and ``state``) dropped, shown as ``?…``; these are one-time
    secrets that logs must not keep."""
    if path.startswith("/login/"):
        rest = path[len("/login/") :]
        _, sep, tail = rest.partition("/")
        path = "/login/…" + (sep + tail if sep else "")
    return path + ("?…" if query else "")


class AccessLogger(AbstractAccessLogger):
    """The control server's access log (logger ``aiohttp.access``): client, request line with
    :func:`redact_path`, status, size, seconds, user agent, each control character in them escaped
    (:func:`tailpy.httpguard.escape_controls`: a request cannot forge a log line). No Referer: a provider's
    page may put the sign-in's parameters in it."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s"',
            request.remote,
            escape_controls(request.method),
            escape_controls(redact_path(request.path, request.query_string)),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
            escape_controls(request.headers.get("User-Agent", "-")),
        )


__all__ = [
    "PAGE_PREFIXES",
    "AccessLogger",
    "approval_page",
    "error_middleware",
    "error_page",
    "login_page",
    "not_found",
    "page",
    "redact_path",
    "render",
    "success_page",
]
