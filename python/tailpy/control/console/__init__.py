"""The web console: the admin operations as server-rendered HTML pages at ``/admin`` on the control server.

Pages (GET, each a plain HTML page readable without JavaScript): ``/admin/machines`` (with machines waiting
for approval and their routes), ``/admin/users``, ``/admin/keys`` (auth keys), ``/admin/policy`` (the policy
editor and its history), ``/admin/dns``; ``/admin/signin``. Actions are HTML forms POSTed to the page's
path (``/admin/machines/<id>/rename``, ``/admin/keys/<id>/expire``, ...) and answered with a redirect back
to the page (POST-redirect-GET) carrying a one-shot notice in a signed cookie. Two actions answer with a page
instead: creating an auth key (the full key is shown once, never stored in a cookie or URL) and a policy that
is refused (the text stays in the editor, the error line is marked). Every action runs the
:class:`tailpy.control.admin.Admin` operation the admin CLI runs, in process, so validation and the changes
sent to nodes are the same.

Sign-in (``/admin/signin``): with an API key (:mod:`tailpy.control.apikeys`, pasted into a form, never in
a URL), or through the OpenID Connect provider of ``--oidc-issuer`` (:meth:`tailpy.control.oidc.Logins.
start_signin`, same redirect URI as node logins) for the identities :class:`ConsoleConfig` names as admins:
an email or login name, or ``group:NAME``, a group of the tailnet policy whose members are admins.

Session: the cookie :data:`COOKIE` (``HttpOnly``, ``SameSite=Lax``, ``Secure`` when served over HTTPS,
``Path=/admin``, :data:`SESSION_LIFETIME`) holds who signed in, how, a random session id and its expiry,
authenticated with HMAC-SHA256 (RFC 2104) under a key derived from the control server's machine private key
(keyed BLAKE2b, RFC 7693, personalised ``tailpy console``): every replica of one database shares that key
(:meth:`tailpy.control.store.Store.server_key`), so each accepts the others' sessions. Signing out records
the session id in the database (``console_revoked``, kept until the session would have expired), which every
request checks, so a copy of the cookie stops working on every replica. Admin rights and an API key's
validity are checked again on every request; a session refused for them sends the browser to the sign-in
page with the reason. CSRF: each form carries
a token (HMAC of the session id under the same key) checked on every POST, and a POST whose ``Origin`` (or,
without it, ``Referer``) is another site is refused (OWASP CSRF Prevention Cheat Sheet: synchronizer token,
origin verification). Unauthenticated page requests redirect to the sign-in page; a POST without a valid
session and token gets 403; a method a console address does not serve gets 405 with ``Allow`` (before
sign-in, as a page). Pages carry a Content-Security-Policy allowing only the console's stylesheet
and its inline scripts by nonce (the copy button, the jump to a policy error line).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import posixpath
import re
import secrets
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

from tailpy.control import acl, apikeys
from tailpy.control import identity as ident
from tailpy.control.admin import Admin
from tailpy.errors import ConfigError, ControlError, StorageError

if TYPE_CHECKING:
    from tailpy.control.server import ControlServer

log = logging.getLogger("tailpy.control.console")

PREFIX = "/admin"
"""Where the console is served (every page and action is below it)."""
COOKIE = "tailpy_console"
"""The session cookie's name."""
FLASH_COOKIE = "tailpy_console_notice"
"""The one-shot notice cookie's name (the outcome of the last action, shown once)."""
SESSION_LIFETIME = 8 * 3600.0
"""Seconds a console session lasts (sign in again after)."""
CSRF_FIELD = "csrf_token"
"""The form field carrying the CSRF token."""
HERE = Path(__file__).parent
_POLICY_AT = re.compile(r"^[^:\n]*:(\d+):(\d+): (.*)$", re.S)
DEFAULT_PAGE = PREFIX + "/machines"
"""Where sign-in lands without a (valid) ``next``."""
FORM_TOKEN_FIELD = "form_token"
"""The field carrying a one-time form's token (the auth-key form: once a key is created, sending the same
form again creates nothing; a refused form keeps its token)."""
SIGNIN_REASONS = {
    "signed-out": "This session was signed out: sign in again.",
    "expired": "Your console session expired: sign in again.",
    "not-admin": "You are no longer an administrator of this tailnet (the --admin list or its policy group "
    "changed): ask an administrator, or sign in with an API key.",
    "api-key": "The API key this session signed in with expired or was deleted: sign in with another one.",
}
"""The sentences the sign-in page shows for ``?why=`` (a fixed set: the page never echoes the query)."""
KEY_FORM_LIFETIME = 90 * 86400.0
"""Seconds an auth key made in the console lasts by default: 90 days, Tailscale's admin console default (the
CLI's ``authkey create`` and the admin API's ``POST /api/v1/authkeys`` default to 1 hour)."""
KEY_FORM_DEFAULTS: Mapping[str, Any] = {
    "user": "",
    "tags": "",
    "expiration": "90d",
    "reusable": False,
    "ephemeral": False,
}
"""The auth-key form's initial values."""


_PATH_SAFE = "/:@!$&'()*+,;=-._~"
"""Characters a URI path keeps as they are (RFC 3986 §3.3 ``pchar`` and ``/``, without ``%``)."""
_QUERY_SAFE = _PATH_SAFE + "?%"
"""Characters a URI query keeps (RFC 3986 §3.4), ``%`` too: its escapes stay as they came."""
_LONE_PERCENT = re.compile("%(?![0-9A-Fa-f]{2})")


def _unsafe_char(c: str) -> bool:
    """Control and format characters (C0, DEL, C1, bidi and zero-width marks: Unicode categories Cc, Cf),
    surrogates (Cs) and the line and paragraph separators U+2028/U+2029 (Zl, Zp)."""
    return unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")


def safe_next(target: object) -> str:
    """The page to go back to after sign-in, from a ``next`` parameter (decoded text): a path of the console
    (``/admin`` or below, query kept), normalised (``posixpath.normpath``: no ``..`` out of it) after its
    percent escapes are decoded (UTF-8; a browser reads ``%2e%2e`` as ``..``, WHATWG URL "path state"), not
    the sign-in pages, without control or format characters (:func:`_unsafe_char`), backslashes or a
    ``%`` left in the path; anything else gives :data:`DEFAULT_PAGE` (no open redirect, no header
    injection). The answer is an ASCII URI reference (RFC 3986 §4.2), fit for a ``Location`` header: any
    other character is percent-encoded as UTF-8 (``/admin/é`` -> ``/admin/%C3%A9``), as is a ``%`` of the
    query not starting an escape; it is its own ``safe_next`` (the sign-in page passes it on as ``next``)."""
    if not isinstance(target, str) or not target.startswith("/") or len(target) > 2048:
        return DEFAULT_PAGE
    if "\\" in target or any(_unsafe_char(c) for c in target):
        return DEFAULT_PAGE
    path, _, query = target.partition("#")[0].partition("?")
    try:
        path = urllib.parse.unquote(path, errors="strict")  # (what this function answered comes back)
    except UnicodeDecodeError:
        return DEFAULT_PAGE
    if "%" in path or "\\" in path or path.startswith("//") or any(_unsafe_char(c) for c in path):
        return DEFAULT_PAGE
    norm = posixpath.normpath(path)
    if norm != PREFIX and not norm.startswith(PREFIX + "/"):
        return DEFAULT_PAGE
    if norm.startswith(PREFIX + "/sign"):
        return DEFAULT_PAGE
    out = urllib.parse.quote(norm, safe=_PATH_SAFE)
    if query:
        out += "?" + urllib.parse.quote(_LONE_PERCENT.sub("%25", query), safe=_QUERY_SAFE)
    return out


@dataclass(frozen=True)
class ConsoleConfig:
    """What ``tailpy control serve`` configures for the console: ``admins`` (``--admin``) are emails or
    login names of users who may sign in through OpenID Connect, or ``group:NAME`` for the members of that
    group of the tailnet policy; ``server_url`` (``--server-url``): an ``https://`` one makes the session
    cookie ``Secure`` even behind a TLS-terminating proxy. API keys sign in whatever ``admins`` says."""

    admins: tuple[str, ...] = ()
    server_url: str | None = None


@dataclass(frozen=True)
class Session:
    """A signed-in admin: ``who`` (an email, login name or ``apikey:<prefix>``, as the admin API records
    changes), ``via`` ("oidc" or "api key"), ``key_id`` (the API key's id, or None), ``expires`` (unix
    seconds), ``sid`` (random: names the session for its CSRF token and its sign-out)."""

    who: str
    via: str
    key_id: int | None
    expires: float
    sid: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> Session | None:
        if not isinstance(obj, dict):
            return None
        try:
            key_id = obj.get("key_id")
            return cls(
                who=str(obj["who"]),
                via=str(obj["via"]),
                key_id=None if key_id is None else int(key_id),
                expires=float(obj["expires"]),
                sid=str(obj["sid"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


_ADMIN = re.compile(r"(?i)group:[a-z0-9._@+-]{1,128}|[a-z0-9._@+-]{1,254}")


def parse_admins(entries: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The ``--admin`` entries checked: each an email or login name (``alice@example.com``, ``alice``) or a
    policy group (``group:admins``). Raises ConfigError naming a malformed one."""
    out = []
    for entry in entries:
        e = entry.strip()
        if not _ADMIN.fullmatch(e):
            raise ConfigError(
                f"--admin {entry!r} must be an email or login name (alice@example.com) or a policy group "
                "(group:admins)"
            )
        out.append(e)
    return tuple(dict.fromkeys(out))


def session_key(server_private: bytes) -> bytes:
    """The 32-byte HMAC key of console cookies, derived from the control server's machine private key
    (``server_private``, 32 bytes) with keyed BLAKE2b (RFC 7693), personalised so it serves nothing else."""
    return hashlib.blake2b(
        b"session cookies", key=server_private, person=b"tailpy console", digest_size=32
    ).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, purpose: str, obj: Mapping[str, Any]) -> str:
    """``base64url(JSON).base64url(HMAC-SHA256(key, purpose || JSON))``: a cookie value only this key
    verifies, for one ``purpose`` ("session", "notice")."""
    body = json.dumps(dict(obj), separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(key, purpose.encode() + b"\0" + body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}"


def verify(key: bytes, purpose: str, value: str) -> Any:
    """The object :func:`sign` signed into ``value`` for ``purpose``, or None (malformed, another key or
    purpose, tampered)."""
    body_text, dot, mac_text = value.partition(".")
    if not dot or len(value) > 8192:
        return None
    try:
        body, mac = _unb64(body_text), _unb64(mac_text)
    except ValueError:
        return None
    want = hmac.new(key, purpose.encode() + b"\0" + body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def policy_error_position(sentence: str) -> tuple[int, int, str] | None:
    """``(line, column, message)`` of a refused policy's ``WHERE:LINE:COLUMN: message``
    (:func:`tailpy.control.acl.locate`), or None when it has no position."""
    m = _POLICY_AT.match(sentence)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3)


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return ""
    return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _ago(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "never"
    d = now - float(ts)
    future = d < 0
    d = abs(d)
    if d < 60:
        text = "less than a minute"
    elif d < 3600:
        text = f"{int(d // 60)} min"
    elif d < 86400:
        text = f"{int(d // 3600)} h"
    else:
        text = f"{int(d // 86400)} days"
    return f"in {text}" if future else f"{text} ago"


Handler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


@functools.cache
def _environment() -> jinja2.Environment:
    """The templates (every value escaped; a missing variable is an error), loaded once per process."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    return env


@functools.cache
def _stylesheet() -> bytes:
    return (HERE / "static" / "console.css").read_bytes()


class Console:
    """The console of ``server`` (a :class:`tailpy.control.server.ControlServer`): :meth:`install` adds its
    routes to the server's aiohttp app."""

    def __init__(self, server: ControlServer, config: ConsoleConfig | None = None) -> None:
        self.server = server
        self.config = config or ConsoleConfig()
        self.admin = Admin(server.store, server=server, clock=server.clock, key_lifetime=server.key_lifetime)
        self._key = session_key(server.key.raw)
        self.env = _environment()
        self._css = _stylesheet()
        self._resources: list[web.AbstractResource] = []  # (the console's routes: see _unrouted)
        self._guarded_not_found = self._guard(self._not_found)

    # --- routes ---

    def install(self, app: web.Application) -> None:
        """Add the console's routes to ``app`` (before it starts)."""
        r = app.router
        before = len(r.resources())
        r.add_route("*", PREFIX, self._bare_prefix)  # (a wrong method: the console's 405, not aiohttp's)
        r.add_get(PREFIX + "/", self._root)
        r.add_get(PREFIX + "/console.css", self._stylesheet)
        r.add_get(PREFIX + "/signin", self._signin_page)
        r.add_post(PREFIX + "/signin", self._signin_key)
        r.add_get(PREFIX + "/signin/oidc", self._signin_oidc)
        r.add_post(PREFIX + "/signout", self._guard(self._signout))
        r.add_get(PREFIX + "/machines", self._guard(self._machines))
        r.add_post(PREFIX + "/machines/{id}/{action}", self._guard(self._machine_action))
        r.add_post(PREFIX + "/pending/{id}/{action}", self._guard(self._pending_action))
        r.add_get(PREFIX + "/users", self._guard(self._users))
        r.add_post(PREFIX + "/users", self._guard(self._user_create))
        r.add_post(PREFIX + "/users/{name}/delete", self._guard(self._user_delete))
        r.add_get(PREFIX + "/keys", self._guard(self._keys))
        r.add_post(PREFIX + "/keys", self._guard(self._key_create))
        r.add_post(PREFIX + "/keys/{id}/expire", self._guard(self._key_expire))
        r.add_get(PREFIX + "/policy", self._guard(self._policy))
        r.add_post(PREFIX + "/policy", self._guard(self._policy_post))
        r.add_get(PREFIX + "/dns", self._guard(self._dns))
        r.add_post(PREFIX + "/dns", self._guard(self._dns_post))
        self._resources = list(r.resources())[before:]
        r.add_route("*", PREFIX + "/{tail:.*}", self._unrouted)

    # --- sessions ---

    @property
    def _https(self) -> bool:
        return (self.config.server_url or "").lower().startswith("https:")

    def _secure(self, request: web.Request) -> bool:
        return self._https or request.secure

    def csrf_token(self, session: Session) -> str:
        """The CSRF token of ``session``'s forms (HMAC of its id)."""
        return hmac.new(self._key, b"csrf\0" + session.sid.encode(), hashlib.sha256).hexdigest()

    def session_of(self, request: web.Request) -> Session | None:
        """The valid session of ``request``'s cookie, or None (none, forged, expired, signed out, its admin
        no longer one, its API key expired or deleted)."""
        return self._session_and_why(request)[0]

    def _session_and_why(self, request: web.Request) -> tuple[Session | None, str]:
        """``(session, "")``, or ``(None, why)``: ``why`` a key of :data:`SIGNIN_REASONS` when the cookie is
        genuine but no longer valid, "" when there is none (or it is forged)."""
        value = request.cookies.get(COOKIE)
        if not value:
            return None, ""
        session = Session.from_json(verify(self._key, "session", value))
        if session is None:
            return None, ""
        now = self.server.clock()
        if session.expires <= now:
            return None, "expired"
        if self.server.store.console_token_revoked("session:" + session.sid, now):
            return None, "signed-out"
        if session.via == "api key":
            if session.key_id is None or not self._api_key_live(session.key_id):
                return None, "api-key"
        elif session.via != "oidc":
            return None, ""
        elif not self.is_admin_name(session.who):
            return None, "not-admin"
        return session, ""

    def _start_session(
        self, request: web.Request, who: str, via: str, key_id: int | None, target: str
    ) -> web.Response:
        """A redirect to ``target`` setting the new session's cookie."""
        session = Session(who, via, key_id, self.server.clock() + SESSION_LIFETIME, secrets.token_urlsafe(18))
        found = _redirect(302, safe_next(target))
        found.set_cookie(
            COOKIE,
            sign(self._key, "session", session.to_json()),
            max_age=int(SESSION_LIFETIME),
            path=PREFIX,
            httponly=True,
            samesite="Lax",
            secure=self._secure(request),
        )
        found.headers["Cache-Control"] = "no-store"
        log.info("console: %s signed in (%s) from %s", who, via, request.remote)
        return found

    def _insecure_origin(self, request: web.Request) -> str | None:
        """The https sign-in URL when the session cookie must be ``Secure`` (``server_url`` is https) but
        the browser sent this POST from a plain-http page (its ``Origin``, else ``Referer``): a browser drops
        a Secure cookie set over http, so signing in would loop. None otherwise."""
        if not self._https or request.secure:
            return None
        source = request.headers.get("Origin") or request.headers.get("Referer") or ""
        if urllib.parse.urlsplit(source).scheme.lower() != "http":
            return None
        return (self.config.server_url or "").rstrip("/") + PREFIX + "/signin"

    def _same_origin(self, request: web.Request) -> bool:
        """Whether a POST comes from the console's own origin: its ``Origin`` (else ``Referer``) names this
        host (or ``server_url``'s); neither header (an old client) passes, the CSRF token decides."""
        source = request.headers.get("Origin") or request.headers.get("Referer")
        if source is None:
            return True
        netloc = urllib.parse.urlsplit(source).netloc.lower()
        hosts = {request.host.lower()}
        if self.config.server_url:
            hosts.add(urllib.parse.urlsplit(self.config.server_url).netloc.lower())
        return bool(netloc) and netloc in hosts

    def _guard(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``handler`` for signed-in admins only: a GET without a session redirects to the sign-in page, a
        POST without a session, with a wrong CSRF token or from another origin gets 403. Admin mistakes
        (ConfigError, a refused policy) come back as notices; anything else is logged and a plain 500 page."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            session, why = self._session_and_why(request)
            if request.method == "POST":
                if not self._same_origin(request):
                    return self._forbidden(
                        "This request came from another site (its Origin or Referer is not the console's "
                        "own): it was refused. Use the console's own pages."
                    )
                if session is None:
                    return self._forbidden(
                        SIGNIN_REASONS.get(why, "Sign in again: this request has no valid console session.")
                    )
                try:
                    form = await request.post()
                except web.HTTPRequestEntityTooLarge:
                    return self._back(
                        request,
                        "The form is larger than the control server accepts (1 MiB): use the admin CLI "
                        "(`tailpy control policy set FILE`) for a policy that large.",
                        ok=False,
                    )
                token = form.get(CSRF_FIELD)
                if not isinstance(token, str) or not hmac.compare_digest(token, self.csrf_token(session)):
                    return self._forbidden("This form is stale or did not come from the console: reload it.")
            elif session is None:
                query = {"next": request.path_qs, **({"why": why} if why else {})}
                raise web.HTTPFound(f"{PREFIX}/signin?{urllib.parse.urlencode(query)}")
            try:
                return await handler(request, session)
            except web.HTTPException:
                raise
            except StorageError as e:
                return self._back(request, f"The database refused the change: {e}", ok=False)
            except (ConfigError, ControlError) as e:
                return self._back(request, str(e), ok=False)
            except Exception:
                log.exception("console page %s failed", request.path)
                return self._page(
                    request, session, "error.html", status=500, title="Something went wrong", message=""
                )

        return guarded

    def _forbidden(self, why: str) -> web.Response:
        return self._respond(self.env.get_template("forbidden.html").render(why=why, nonce=""), 403, "")

    # --- responses ---

    def _respond(self, text: str, status: int, nonce: str) -> web.Response:
        script = f"'nonce-{nonce}'" if nonce else "'none'"
        return web.Response(
            text=text,
            status=status,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "same-origin",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": (
                    f"default-src 'none'; style-src 'self'; script-src {script}; img-src 'self'; "
                    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
                ),
            },
        )

    def _page(
        self,
        request: web.Request,
        session: Session | None,
        template: str,
        *,
        status: int = 200,
        refused: str = "",
        **ctx: Any,
    ) -> web.Response:
        """``template`` rendered for ``session``, with the one-shot notice, or ``refused`` (an action refused
        and answered with its page, the form keeping what was typed) as a bad notice."""
        nonce = secrets.token_urlsafe(12)
        taken = self._take_notice(request)
        notice = {"text": refused, "ok": False} if refused else taken
        text = self.env.get_template(template).render(
            session=session,
            csrf=self.csrf_token(session) if session is not None else "",
            csrf_field=CSRF_FIELD,
            prefix=PREFIX,
            path=request.path,
            notice=notice,
            nonce=nonce,
            now=self.server.clock(),
            ago=lambda ts: _ago(ts, self.server.clock()),
            **ctx,
        )
        resp = self._respond(text, status, nonce)
        if taken is not None:
            resp.del_cookie(FLASH_COOKIE, path=PREFIX)
        return resp

    def _take_notice(self, request: web.Request) -> dict[str, Any] | None:
        value = request.cookies.get(FLASH_COOKIE)
        got = verify(self._key, "notice", value) if value else None
        if isinstance(got, dict) and isinstance(got.get("text"), str):
            return {"text": got["text"], "ok": bool(got.get("ok"))}
        return None

    def _back(
        self, request: web.Request, text: str, *, ok: bool = True, to: str | None = None
    ) -> web.Response:
        """Redirect (303, POST-redirect-GET) to ``to`` (default: the page the action belongs to) with
        ``text`` as a one-shot notice."""
        found = _redirect(303, to or self._page_of(request.path))
        found.set_cookie(
            FLASH_COOKIE,
            sign(self._key, "notice", {"text": text[:2000], "ok": ok}),
            max_age=120,
            path=PREFIX,
            httponly=True,
            samesite="Lax",
            secure=self._secure(request),
        )
        return found

    @staticmethod
    def _page_of(path: str) -> str:
        parts = path[len(PREFIX) :].strip("/").split("/")
        section = {"pending": "machines"}.get(parts[0], parts[0]) if parts and parts[0] else "machines"
        return f"{PREFIX}/{section}"

    # --- admins ---

    def is_admin_name(self, name: str) -> bool:
        """Whether ``name`` (an email or login name, any case) is an admin: listed in
        :attr:`ConsoleConfig.admins` itself, or a member of a policy group listed there."""
        want = name.strip().lower()
        if not want:
            return False
        groups = []
        for entry in self.config.admins:
            e = entry.strip().lower()
            if e.startswith("group:"):
                groups.append(entry.strip())
            elif e == want:
                return True
        policy = self.server.policy.policy
        if policy is None or not groups:
            return False
        return any(want in (m.lower() for m in policy.groups.get(g, ())) for g in groups)

    def _identity_admin(self, who: ident.Identity) -> str | None:
        """The name an OpenID Connect identity is an admin as, or None: its email when the provider verified
        it, else the login name of the tailpy user with that verified email (a user seen before)."""
        if not who.email or not who.email_verified:
            return None
        if self.is_admin_name(who.email):
            return who.email
        for login, email in self.server.store.user_emails().items():
            if email.lower() == who.email.lower() and self.is_admin_name(login):
                return login
        return None

    # --- API keys ---

    def _check_api_key(self, secret: str) -> tuple[int, str] | None:
        """(id, how pages name it) of the valid API key ``secret``, or None (unknown, expired, malformed)."""
        info = apikeys.check_api_key(self.server.store, secret, now=self.server.clock())
        if info is None:
            return None
        return info.id, f"apikey:{info.prefix}"  # (as the admin API records its changes)

    def _api_key_live(self, key_id: int) -> bool:
        """Whether API key ``key_id`` still exists and has not expired (a session ends with its key)."""
        now = self.server.clock()
        return any(k.id == key_id and not k.expired(now) for k in apikeys.list_api_keys(self.server.store))

    # --- sign-in ---

    async def _root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(DEFAULT_PAGE)

    async def _bare_prefix(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return self._method_not_allowed(request, {"GET", "HEAD"})
        return await self._root(request)

    async def _stylesheet(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self._css, content_type="text/css", headers={"Cache-Control": "max-age=3600"}
        )

    def _signin(
        self, request: web.Request, *, error: str = "", status: int = 200, https_url: str = ""
    ) -> web.Response:
        logins = self.server.logins
        nxt = safe_next(request.query.get("next", ""))
        return self._page(
            request,
            None,
            "signin.html",
            status=status,
            error=error or SIGNIN_REASONS.get(request.query.get("why", ""), ""),
            oidc=logins.config.provider_name if logins is not None else "",
            next=nxt,
            https_url=https_url,
        )

    async def _signin_page(self, request: web.Request) -> web.StreamResponse:
        if self.session_of(request) is not None:
            raise web.HTTPFound(safe_next(request.query.get("next", "")))
        return self._signin(request)

    async def _signin_key(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            return self._forbidden(
                "This sign-in came from another site (its Origin or Referer is not the console's own page)."
            )
        https_url = self._insecure_origin(request)
        if https_url is not None:
            log.warning("console: sign-in over plain http refused (the session cookie is Secure)")
            return self._signin(
                request,
                error="This page was opened over plain http, but this control server's console sessions "
                "need HTTPS (its --server-url is https://): the browser would drop the session cookie. "
                "Open the console at its https address.",
                status=400,
                https_url=https_url,
            )
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            return self._signin(
                request, error="This sign-in form is larger than the control server accepts.", status=413
            )
        secret = form.get("api_key")
        found = self._check_api_key(secret.strip()) if isinstance(secret, str) and secret.strip() else None
        if found is None:
            log.warning("console: sign-in with an invalid or expired API key from %s", request.remote)
            return self._signin(
                request, error="That API key is not valid (unknown, expired or revoked).", status=401
            )
        key_id, name = found
        return self._start_session(request, name, "api key", key_id, safe_next(request.query.get("next", "")))

    async def _signin_oidc(self, request: web.Request) -> web.StreamResponse:
        logins = self.server.logins
        if logins is None:
            return self._signin(
                request, error="This control server has no OpenID Connect provider.", status=404
            )
        nxt = safe_next(request.query.get("next", ""))

        async def finish(callback: web.Request, who: ident.Identity) -> web.StreamResponse:
            name = self._identity_admin(who)
            if name is None:
                log.warning("console: %s signed in but is not an admin", who.shown)
                return self._forbidden(
                    f"You signed in as {who.shown}, who is not an administrator of this tailnet "
                    "(see `tailpy control serve --admin`)."
                )
            return self._start_session(callback, name, "oidc", None, nxt)

        return await logins.start_signin(finish)

    async def _signout(self, request: web.Request, session: Session) -> web.StreamResponse:
        # Recorded in the database until the session would have expired: a copy of the cookie is refused
        # from now on, by every replica.
        now = self.server.clock()
        self.server.store.revoke_console_token("session:" + session.sid, max(session.expires, now), now)
        found = _redirect(303, PREFIX + "/signin")
        found.del_cookie(COOKIE, path=PREFIX)
        log.info("console: %s signed out", session.who)
        return found

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        """A request no other console route took: 405 with ``Allow`` (RFC 9110 §15.5.6) when a console page
        or action has this path but not this method (``PUT /admin/machines``), answered before sign-in as
        aiohttp answers elsewhere; else the signed-in admin's 404 page."""
        allowed: set[str] = set()
        for resource in self._resources:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
        if not allowed:
            return await self._guarded_not_found(request)
        return self._method_not_allowed(request, allowed)

    def _method_not_allowed(self, request: web.Request, allowed: set[str]) -> web.Response:
        allow = ", ".join(sorted(allowed))
        resp = self._page(
            request,
            None,
            "error.html",
            status=405,
            title="Method not allowed",
            message=f"This console address answers {allow} only, not {request.method}.",
        )
        resp.headers["Allow"] = allow
        return resp

    async def _not_found(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._page(
            request,
            session,
            "error.html",
            status=404,
            title="Not found",
            message="There is no such console page.",
        )

    # --- machines ---

    async def _machines(self, request: web.Request, session: Session) -> web.StreamResponse:
        nodes = self.admin.run("nodes.list", {})
        routers = {r["id"]: r for r in self.admin.run("routes.list", {})}
        pending = self.admin.run("nodes.pending", {})
        emails = self.server.store.user_emails()
        derp_map = self.server.mapper.derp_map
        regions = (
            {}
            if derp_map is None
            else {i: r.region_name or r.region_code for i, r in derp_map.regions.items()}
        )
        return self._page(
            request,
            session,
            "machines.html",
            nodes=nodes,
            routers=routers,
            pending=pending,
            emails=emails,
            regions=regions,
        )

    async def _machine_action(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        action = request.match_info["action"]
        node_id = _int(request.match_info["id"])
        if action == "rename":
            node = self.admin.run("nodes.rename", {"id": node_id, "name": _field(form, "name")})
            return self._back(request, f"Machine {node_id} is now named {node['name']}.")
        if action == "expire":
            node = self.admin.run("nodes.expire", {"id": node_id})
            return self._back(request, f"The key of {node['name']} expired: it must log in again.")
        if action == "delete":
            self.admin.run("nodes.delete", {"id": node_id})
            return self._back(request, f"Machine {node_id} was deleted.")
        if action in ("approve-routes", "unapprove-routes"):
            op = "routes.approve" if action == "approve-routes" else "routes.unapprove"
            routes = [r for r in form.getall("route", []) if isinstance(r, str) and r]
            args: dict[str, Any] = {"id": node_id, "routes": routes}
            if form.get("exit_node"):
                args["exit_node"] = True
            out = self.admin.run(op, args)
            what = ", ".join(routes) + (" and the exit node" if form.get("exit_node") and routes else "")
            what = what or "the exit node"
            verb = "approved" if op == "routes.approve" else "no longer approved"
            return self._back(request, f"{out['name']}: {what} {verb}.")
        raise web.HTTPNotFound()

    async def _pending_action(self, request: web.Request, session: Session) -> web.StreamResponse:
        action = request.match_info["action"]
        pending_id = _int(request.match_info["id"])
        if action == "approve":
            node = self.admin.run("nodes.approve", {"id": pending_id})
            return self._back(request, f"{node['name']} was approved and joined the tailnet.")
        if action == "reject":
            p = self.admin.run("nodes.reject", {"id": pending_id})
            return self._back(request, f"The login of {p['hostname']} was rejected.")
        raise web.HTTPNotFound()

    # --- users ---

    async def _users(self, request: web.Request, session: Session) -> web.StreamResponse:
        users = self.admin.run("users.list", {})
        emails = self.server.store.user_emails()
        counts: dict[str, int] = {}
        for n in self.admin.run("nodes.list", {}):
            if not n.get("tags"):
                counts[n["user"]] = counts.get(n["user"], 0) + 1
        return self._page(request, session, "users.html", users=users, emails=emails, counts=counts)

    async def _user_create(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        user = self.admin.run("users.create", {"name": _field(form, "name")})
        return self._back(request, f"User {user['name']} was created.")

    async def _user_delete(self, request: web.Request, session: Session) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in {u["name"] for u in self.admin.run("users.list", {})}:
            return self._back(request, f"There is no user {name!r}.", ok=False, to=PREFIX + "/users")
        self.admin.run("users.delete", {"name": name})
        return self._back(request, f"User {name} was deleted.", to=PREFIX + "/users")

    # --- auth keys ---

    def _keys_page(
        self,
        request: web.Request,
        session: Session,
        *,
        created: dict[str, Any] | None = None,
        typed: Mapping[str, Any] | None = None,
        refused: str = "",
        status: int = 200,
    ) -> web.Response:
        """The auth keys page: ``created`` the key just made (shown once), ``typed`` the create form's
        values to show again (its defaults otherwise). The form carries a fresh one-time token."""
        keys = self.admin.run("authkey.list", {})
        users = self.admin.run("users.list", {})
        server_url = self.config.server_url or f"{request.scheme}://{request.host}"
        return self._page(
            request,
            session,
            "keys.html",
            status=status,
            refused=refused,
            keys=keys,
            users=users,
            created=created,
            typed=typed or KEY_FORM_DEFAULTS,
            form_token=secrets.token_urlsafe(18),
            form_token_field=FORM_TOKEN_FIELD,
            server_url=server_url.rstrip("/"),
        )

    async def _keys(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._keys_page(request, session)

    async def _key_create(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        typed: dict[str, Any] = {
            "user": str(form.get("user", "")).strip(),
            "tags": str(form.get("tags", "")).strip(),
            "expiration": str(form.get("expiration", "")).strip(),
            "reusable": bool(form.get("reusable")),
            "ephemeral": bool(form.get("ephemeral")),
        }
        token = form.get(FORM_TOKEN_FIELD)
        if not isinstance(token, str) or not 16 <= len(token) <= 64:
            return self._keys_page(
                request, session, typed=typed, status=400, refused="This form is stale: nothing was created."
            )
        tags = [t.strip() for t in str(typed["tags"]).replace(",", " ").split() if t.strip()]
        expiration = str(typed["expiration"])
        seconds: float | None
        try:
            if expiration in ("", "never"):
                seconds = None if expiration == "never" else KEY_FORM_LIFETIME
            else:
                from tailpy.control.options import parse_duration

                seconds = parse_duration(expiration, "expiration")
        except ConfigError as e:
            return self._keys_page(request, session, typed=typed, status=400, refused=str(e))
        now = self.server.clock()
        # The token is spent in the database (every replica sees it) before the key is made, so that two
        # sends of one form (a reload of the answer page, a double click) make one key at most; a form
        # that is then refused (nothing created) gets its token back and may be corrected and sent again.
        spent = "form:" + token
        if not self.server.store.revoke_console_token(spent, now + SESSION_LIFETIME, now):
            log.info("console: %s sent the auth key form again; nothing created", session.who)
            return self._keys_page(
                request,
                session,
                typed=typed,
                status=409,
                refused="This form was already sent (the page was reloaded or sent again): its key was "
                "shown once, when it was created, and is not shown again. Nothing new was created: create "
                "another key below if you need one.",
            )
        try:
            key = self.admin.run(
                "authkey.create",
                {
                    "user": typed["user"] or None,
                    "tags": tags,
                    "reusable": typed["reusable"],
                    "ephemeral": typed["ephemeral"],
                    "expiration": seconds,
                },
            )
        except (ConfigError, ControlError, StorageError) as e:
            self.server.store.release_console_token(spent)
            if isinstance(e, StorageError):
                raise
            return self._keys_page(request, session, typed=typed, status=400, refused=str(e))
        log.info("console: %s created auth key %s", session.who, key["id"])
        # The full key is shown in this answer only (not stored in a cookie or URL for a redirect).
        return self._keys_page(request, session, created=key)

    async def _key_expire(self, request: web.Request, session: Session) -> web.StreamResponse:
        key = self.admin.run("authkey.expire", {"key": str(_int(request.match_info["id"]))})
        return self._back(request, f"Auth key {key['key']} expired.", to=PREFIX + "/keys")

    # --- policy ---

    def _policy_page(
        self,
        request: web.Request,
        session: Session,
        *,
        text: str | None = None,
        errors: tuple[str, ...] = (),
        checked: dict[str, Any] | None = None,
        status: int = 200,
    ) -> web.Response:
        current = self.admin.run("policy.get", {})
        history = self.admin.run("policy.history", {"limit": 20})
        version = request.query.get("version")
        shown_version = None
        if text is None and version is not None:
            rec = self.admin.run("policy.show", {"id": _int(version)})
            text, shown_version = rec["text"], rec["id"]
        if text is None:
            text = current.get("policy") or ""
        located: list[dict[str, Any]] = []
        mark: int | None = None
        for e in errors:
            pos = policy_error_position(e)
            located.append(
                {"sentence": e, "line": pos[0] if pos else None, "column": pos[1] if pos else None}
            )
            if mark is None and pos is not None:
                mark = pos[0]
        lines = text.split("\n")
        excerpt = []
        if mark is not None:
            lo, hi = max(1, mark - 3), min(len(lines), mark + 3)
            excerpt = [{"n": n, "text": lines[n - 1], "mark": n == mark} for n in range(lo, hi + 1)]
        return self._page(
            request,
            session,
            "policy.html",
            status=status,
            current=current,
            history=history,
            text=text,
            errors=located,
            mark=mark,
            excerpt=excerpt,
            checked=checked,
            shown_version=shown_version,
        )

    async def _policy(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._policy_page(request, session)

    async def _policy_post(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        text = form.get("text")
        if not isinstance(text, str):
            raise ConfigError("the form has no policy text")
        text = text.replace("\r\n", "\n")  # (browsers send textarea lines with CRLF: HTML's form encoding)
        save = form.get("action") == "save"
        try:
            if save:
                out = await self.admin.run_async("policy.set", {"text": text, "by": session.who})
            else:
                out = await self.admin.run_async("policy.check", {"text": text})
        except acl.PolicyRefused as e:
            return self._policy_page(request, session, text=text, errors=e.errors, status=400)
        if save:
            log.info("console: %s saved policy %s", session.who, out.get("id"))
            notes = "; ".join(out.get("warnings") or [])
            return self._back(
                request,
                "The policy was saved and sent to the nodes." + (f" Warnings: {notes}" if notes else ""),
            )
        return self._policy_page(request, session, text=text, checked=out)

    # --- DNS ---

    async def _dns(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._page(request, session, "dns.html", dns=_dns_typed(self.admin.run("dns.show", {})))

    async def _dns_post(self, request: web.Request, session: Session) -> web.StreamResponse:
        form = await request.post()
        try:
            self.admin.run("dns.set", dns_form(form))
        except (ConfigError, ControlError) as e:
            # Refused: the form comes back with what was typed (not the stored settings) and the reason.
            typed = {
                "domain": str(form.get("domain", "")).strip(),
                "magic_dns": bool(form.get("magic_dns")),
                **{
                    f: str(form.get(f, "")).replace("\r\n", "\n")
                    for f in ("nameservers", "search_domains", "routes", "extra_records")
                },
            }
            return self._page(request, session, "dns.html", status=400, refused=str(e), dns=typed)
        return self._back(request, "The DNS settings were saved and sent to the nodes.")


def _dns_typed(shown: Mapping[str, Any]) -> dict[str, Any]:
    """The DNS form's fields (``domain``, ``magic_dns``, and the text of each textarea) from ``dns.show``'s
    answer ``shown``: what the page shows before anything is typed."""
    return {
        "domain": shown.get("domain") or "",
        "magic_dns": bool(shown.get("magic_dns")),
        "nameservers": "\n".join(shown.get("nameservers") or []),
        "search_domains": "\n".join(shown.get("search_domains") or []),
        "routes": "".join(f"{d} {' '.join(rs)}\n" for d, rs in (shown.get("routes") or {}).items()),
        "extra_records": "".join(
            f"{r['name']} {r['type']} {r['value']}\n" for r in shown.get("extra_records") or []
        ),
    }


def dns_form(form: Mapping[str, Any]) -> dict[str, Any]:
    """The ``dns.set`` arguments of the DNS form: ``domain``; ``magic_dns`` (a checkbox); ``nameservers`` and
    ``search_domains`` one per line; ``routes`` lines ``DOMAIN RESOLVER [RESOLVER...]``; ``extra_records``
    lines ``NAME TYPE VALUE``. Raises ConfigError for a malformed line."""

    def lines(name: str) -> list[str]:
        return [ln.strip() for ln in str(form.get(name, "")).splitlines() if ln.strip()]

    routes: dict[str, list[str]] = {}
    for ln in lines("routes"):
        parts = ln.replace(",", " ").split()
        if len(parts) < 2:
            raise ConfigError(
                f"split DNS route {ln!r} must be a domain and its resolvers, like corp.example 192.0.2.53"
            )
        routes[parts[0]] = parts[1:]
    records = []
    for ln in lines("extra_records"):
        parts = ln.split()
        if len(parts) != 3:
            raise ConfigError(
                f"extra record {ln!r} must be NAME TYPE VALUE, like db.tailnet.internal A 100.64.0.9"
            )
        records.append({"name": parts[0], "type": parts[1], "value": parts[2]})
    args: dict[str, Any] = {
        "magic_dns": bool(form.get("magic_dns")),
        "nameservers": lines("nameservers"),
        "search_domains": lines("search_domains"),
        "routes": routes,
        "extra_records": records,
    }
    domain = str(form.get("domain", "")).strip()
    if domain:
        args["domain"] = domain
    return args


def _redirect(status: int, location: str) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})


def _int(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise web.HTTPNotFound()
    return int(text)


def _field(form: Mapping[str, Any], name: str) -> str:
    v = form.get(name)
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{name} must not be empty")
    return v.strip()


__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "PREFIX",
    "SESSION_LIFETIME",
    "Console",
    "ConsoleConfig",
    "Session",
    "dns_form",
    "parse_admins",
    "policy_error_position",
    "session_key",
    "sign",
    "verify",
]
