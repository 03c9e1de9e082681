"""Interactive login with an OpenID Connect provider: the control server's side.

Flow (OpenID Connect Core 1.0 §3.1, authorization code flow, with PKCE, RFC 7636):

1. A node registers with no auth key and ``"interactive": true``; control answers (sealed)
   ``{"auth_url": "<server>/login/<login id>"}`` and, when the node asks again, holds the request up to
   ``wait`` seconds (a long poll) until the login is done (``{"node": ...}``), waits for approval
   (``{"pending_approval": true, ...}``), or answers the URL again (with ``"login_error"`` when the last
   sign-in was refused). See :meth:`Logins.poll`.
2. ``GET /login/<id>``: a page naming the device, with a "Sign in" button to ``/login/<id>/start``, which
   makes a fresh ``state``, ``nonce`` and PKCE verifier and redirects to the provider's authorization
   endpoint (from its discovery document, ``<issuer>/.well-known/openid-configuration``).
3. ``GET /oidc/callback?code=…&state=…``: the ``state`` is taken (one use: a replayed callback finds none),
   the code exchanged at the token endpoint with the client secret (HTTP Basic, RFC 6749 §2.3.1) and the
   verifier, and the ID token verified with joserfc (Authlib's JOSE): signature against the provider's JWKS
   (re-fetched once for an unknown ``kid``), ``iss`` = the issuer, ``aud`` contains the client id (and
   ``azp`` is it when there are several audiences), ``exp`` in the future and ``iat`` present (60 s leeway),
   ``nonce`` = the one sent. The identity (issuer + ``sub``; ``email``, ``name``, groups) becomes a tailpy
   user (:mod:`tailpy.control.identity`), the policy (:meth:`OIDCConfig.refusal`) decides whether it may
   join, and the node is registered (or parked for approval). Every outcome is a plain page
   (:mod:`tailpy.control.pages`).

Pending logins live in memory: after a server restart a waiting node simply gets a new URL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.common.urls import add_params_to_uri  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from joserfc import errors as jose_errors
from joserfc import jwt
from joserfc.jwk import KeySet

from tailpy.asyncutil import wait_event
from tailpy.control import identity as ident
from tailpy.control import pages
from tailpy.control.store import Store
from tailpy.errors import ConfigError, ControlError
from tailpy.keys import MachinePublic, NodePublic

log = logging.getLogger("tailpy.control.login")

LOGIN_LIFETIME = 900.0
"""Seconds a login URL stays valid without the node asking again (a waiting node renews it by polling)."""
ATTEMPT_LIFETIME = 600.0
"""Seconds between "Sign in" and the provider's callback before the ``state`` is forgotten."""
LEEWAY = 60
"""Seconds of clock difference allowed when checking ``exp`` and ``iat``."""
MAX_WAIT = 60.0
"""Longest long poll, seconds."""
JWKS_REFRESH = 60.0
"""Seconds between JWKS re-fetches caused by unknown key ids."""
MAX_PENDING = 10_000
"""Pending logins (and sign-in attempts) kept at most; past that the oldest are dropped."""


class IdTokenError(ControlError):
    """The provider's token response or ID token failed verification (the sentence says which check)."""


@dataclass(frozen=True)
class OIDCConfig:
    """What ``tailpy control serve --oidc-*`` configures.

    ``issuer``: the provider's issuer URL (its discovery document is at
    ``<issuer>/.well-known/openid-configuration``); ``client_id`` and ``client_secret`` of the client
    registered there, with redirect URI ``<server_url>/oidc/callback``; ``server_url``: how browsers reach
    this control server. ``scopes`` requested ("openid" is always added). Who may join: with none of
    ``allowed_domains`` (email domains, the email must be verified), ``allowed_users`` (emails, which must
    be verified, or subjects) and ``allowed_groups`` (from claim ``groups_claim``) set, anyone the provider
    signs in; else anyone matching one of them. ``expiry_from_token``: the node key expires with the ID
    token (``exp``) instead of after the server's key lifetime. ``approval``: new machines wait
    for ``tailpy control nodes approve``.
    """

    issuer: str
    client_id: str
    client_secret: str
    server_url: str
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    allowed_domains: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    groups_claim: str = "groups"
    expiry_from_token: bool = False
    approval: bool = False

    @property
    def redirect_uri(self) -> str:
        return self.server_url.rstrip("/") + "/oidc/callback"

    @property
    def provider_name(self) -> str:
        """The provider as pages name it: the issuer's host."""
        return urllib.parse.urlsplit(self.issuer).netloc or self.issuer

    def refusal(self, who: ident.Identity) -> str | None:
        """None when ``who`` may join, else one sentence saying why not (for the page and the node)."""
        if not (self.allowed_domains or self.allowed_users or self.allowed_groups):
            return None
        email = who.email.lower()
        if self.allowed_users and (
            (email and who.email_verified and email in {u.lower() for u in self.allowed_users})
            or who.subject in self.allowed_users
        ):
            return None
        domain = email.rpartition("@")[2]
        if (
            self.allowed_domains
            and email
            and who.email_verified
            and domain in {d.lower().lstrip("@") for d in self.allowed_domains}
        ):
            return None
        if self.allowed_groups and set(who.groups) & set(self.allowed_groups):
            return None
        return (
            f"the account {who.shown} is not allowed to join this tailnet (it admits "
            + "; ".join(
                part
                for part in (
                    f"verified emails at {', '.join(self.allowed_domains)}" if self.allowed_domains else "",
                    f"the users {', '.join(self.allowed_users)} (by verified email or subject)"
                    if self.allowed_users
                    else "",
                    f"members of {', '.join(self.allowed_groups)}" if self.allowed_groups else "",
                )
                if part
            )
            + ")"
        )


def read_secret(path: Path) -> str:
    """The client secret from file ``path`` (first line, stripped). Raises ConfigError."""
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the OIDC client secret file {path}: {e.strerror or e}") from None
    if not text:
        raise ConfigError(f"the OIDC client secret file {path} is empty")
    return text.splitlines()[0].strip()


class Provider:
    """One OpenID Connect provider: its discovery document, keys, token endpoint. ``clock``: unix seconds."""

    def __init__(self, config: OIDCConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self._http().get(url) as r:
                if r.status != 200:
                    raise ControlError(
                        f"the identity provider answered HTTP {r.status} for its {what} ({url})"
                    )
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
            raise ControlError(
                f"cannot fetch the identity provider's {what} from {url}: {e or type(e).__name__}"
            ) from None
        if not isinstance(body, dict):
            raise ControlError(f"the identity provider's {what} at {url} is not a JSON object")
        return body

    async def discover(self) -> dict[str, Any]:
        """The discovery document (fetched once). Raises ControlError when it cannot be fetched or names
        another issuer (OpenID Connect Discovery 1.0 §4.3)."""
        if self.metadata is None:
            issuer = self.config.issuer.rstrip("/")
            meta = await self._get_json(issuer + "/.well-known/openid-configuration", "discovery document")
            if str(meta.get("issuer", "")).rstrip("/") != issuer:
                raise ControlError(
                    f"the identity provider's discovery document names issuer {meta.get('issuer')!r}, "
                    f"not {self.config.issuer!r}: check --oidc-issuer"
                )
            for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(meta.get(k), str):
                    raise ControlError(f"the identity provider's discovery document has no {k}")
            self.metadata = meta
        return self.metadata

    def authorization_url(self, state: str, nonce: str, verifier: str) -> str:
        """The provider URL to send a browser to (after :meth:`discover`)."""
        assert self.metadata is not None
        scopes = ["openid", *(s for s in self.config.scopes if s != "openid")]
        params = [
            ("response_type", "code"),
            ("client_id", self.config.client_id),
            ("redirect_uri", self.config.redirect_uri),
            ("scope", " ".join(scopes)),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", create_s256_code_challenge(verifier)),
            ("code_challenge_method", "S256"),
        ]
        return str(add_params_to_uri(self.metadata["authorization_endpoint"], params))

    async def exchange(self, code: str, verifier: str) -> dict[str, Any]:
        """Trade ``code`` for tokens (RFC 6749 §4.1.3, client secret as HTTP Basic, PKCE verifier).
        Raises IdTokenError when the provider refuses, ControlError when it cannot be reached."""
        meta = await self.discover()
        q = urllib.parse.quote
        basic = base64.b64encode(
            f"{q(self.config.client_id, safe='')}:{q(self.config.client_secret, safe='')}".encode()
        )
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_uri,
            "code_verifier": verifier,
        }
        headers = {"Authorization": "Basic " + basic.decode(), "Accept": "application/json"}
        try:
            async with self._http().post(meta["token_endpoint"], data=data, headers=headers) as r:
                body = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise ControlError(
                f"cannot reach the identity provider's token endpoint: {e or type(e).__name__}"
            ) from None
        except ValueError:
            raise IdTokenError("the identity provider's token endpoint did not answer JSON") from None
        if not isinstance(body, dict):
            raise IdTokenError("the identity provider's token response is not a JSON object")
        if status != 200 or "error" in body:
            err = body.get("error_description") or body.get("error") or f"HTTP {status}"
            raise IdTokenError(f"the identity provider refused the authorization code ({err})")
        if not isinstance(body.get("id_token"), str):
            raise IdTokenError("the identity provider's token response has no id_token")
        return body

    async def _keyset(self, kid: str | None) -> KeySet:
        now = self.clock()
        stale = self._keys is None or (
            kid is not None
            and all(k.kid != kid for k in self._keys.keys)
            and now - self._keys_at > JWKS_REFRESH
        )
        if stale:
            meta = await self.discover()
            jwks = await self._get_json(meta["jwks_uri"], "signing keys (JWKS)")
            try:
                self._keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
            except (jose_errors.JoseError, ValueError, TypeError, KeyError) as e:
                raise ControlError(f"the identity provider's signing keys cannot be read: {e}") from None
            self._keys_at = now
        assert self._keys is not None
        return self._keys

    async def verify_id_token(self, id_token: str, nonce: str) -> ident.Identity:
        """Verify ``id_token`` (OpenID Connect Core §3.1.3.7) and return who it names. Raises IdTokenError
        with the check that failed."""
        meta = await self.discover()
        algs = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
        algs = [a for a in algs if isinstance(a, str) and a != "none" and not a.startswith("HS")] or ["RS256"]
        kid = _header_kid(id_token)
        keys = await self._keyset(kid)
        try:
            token = jwt.decode(id_token, keys, algorithms=algs)
        except jose_errors.BadSignatureError:
            raise IdTokenError(
                "the ID token's signature does not match the identity provider's keys"
            ) from None
        except (jose_errors.JoseError, ValueError, TypeError) as e:
            raise IdTokenError(f"the ID token cannot be verified ({e})") from None
        claims = token.claims
        issuer = self.config.issuer.rstrip("/")
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.clock()),
            leeway=LEEWAY,
            iss={"essential": True, "values": [issuer, issuer + "/"]},
            aud={"essential": True, "value": self.config.client_id},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(claims)
        except jose_errors.ExpiredTokenError:
            raise IdTokenError("the ID token has expired") from None
        except jose_errors.JoseError as e:
            raise IdTokenError(f"the ID token was refused: {e}") from None
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.config.client_id:
            raise IdTokenError("the ID token is for several audiences and its azp is not this client")
        groups = claims.get(self.config.groups_claim, [])
        if isinstance(groups, str):
            groups = [groups]
        exp = claims.get("exp")
        return ident.Identity(
            issuer=issuer,
            subject=str(claims["sub"]),
            email=str(claims.get("email") or ""),
            email_verified=claims.get("email_verified") is True,
            name=str(claims.get("name") or claims.get("preferred_username") or ""),
            groups=tuple(str(g) for g in groups if isinstance(g, (str, int)))
            if isinstance(groups, list)
            else (),
            expires=float(exp) if isinstance(exp, (int, float)) else None,
        )


def _header_kid(token: str) -> str | None:
    import json

    try:
        head = token.split(".", 1)[0]
        obj = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise IdTokenError("the ID token is not a JWT") from None
    kid = obj.get("kid") if isinstance(obj, dict) else None
    return kid if isinstance(kid, str) else None


@dataclass
class PendingLogin:
    """A node waiting for its user to sign in."""

    id: str
    machine_key: MachinePublic
    node_key: NodePublic
    hostname: str
    os: str
    expires: float
    event: asyncio.Event = field(default_factory=asyncio.Event)
    error: str = ""
    waiting_approval: bool = False
    outcomes: int = 0  # sign-ins finished (refused or parked): a waiting poll answers at once on a new one

    def fail(self, error: str) -> None:
        """The sign-in was refused with ``error``: tell the waiting node now."""
        self.error = error
        self.outcomes += 1
        self.event.set()


@dataclass(frozen=True)
class _Attempt:
    login_id: str
    nonce: str
    verifier: str
    created: float
    binding: str  # SHA-256 (hex) of the secret in the browser's cookie set at /start
    finish: SignIn | None = None  # a sign-in of another page (the web console), not of a node


SignIn = Callable[[web.Request, ident.Identity], Awaitable[web.StreamResponse]]
"""What finishes a browser sign-in started by :meth:`Logins.start_signin`: the callback request and the
verified identity -> the response (a page, a redirect)."""


BINDING_COOKIE = "tailpy_signin_"
"""Prefix of the cookie that binds a sign-in to the browser that started it (name: prefix + 16 hex
digits of SHA-256 of the state, so several sign-ins in one browser do not overwrite each other)."""


def _cookie_name(state: str) -> str:
    return BINDING_COOKIE + hashlib.sha256(state.encode()).hexdigest()[:16]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Logins:
    """Pending logins and the login pages of one control server.

    ``on_node(node_id)`` is called after a login registered (or re-registered) a node, so the server
    publishes it; ``key_lifetime`` seconds (None: never) is the node key lifetime unless the config takes it
    from the token.
    """

    def __init__(
        self,
        config: OIDCConfig,
        store: Store,
        *,
        on_node: Callable[[int], None],
        key_lifetime: float | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.on_node = on_node
        self.key_lifetime = key_lifetime
        self.clock = clock
        self.provider = Provider(config, clock=clock)
        self.pending: dict[str, PendingLogin] = {}
        self._by_machine: dict[bytes, str] = {}
        self.attempts: dict[str, _Attempt] = {}

    def install(self, app: web.Application) -> None:
        """Add the page routes and their error middleware to ``app`` (before it starts)."""
        app.middlewares.append(pages.error_middleware)
        app.router.add_get("/login/{login_id}", self._login_page)
        app.router.add_get("/login/{login_id}/start", self._start)
        app.router.add_get("/oidc/callback", self._callback)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, _app: web.Application) -> None:
        await self.provider.close()

    # --- the node's side: long poll ---

    def _prune(self, now: float) -> None:
        for lid in [lid for lid, p in self.pending.items() if p.expires <= now]:
            p = self.pending.pop(lid)
            if self._by_machine.get(p.machine_key.raw) == lid:
                del self._by_machine[p.machine_key.raw]
        for st in [st for st, a in self.attempts.items() if a.created + ATTEMPT_LIFETIME <= now]:
            del self.attempts[st]

    def begin(
        self, machine_key: MachinePublic, node_key: NodePublic, hostname: str, os_name: str
    ) -> PendingLogin:
        """The pending login of ``machine_key`` for ``node_key`` (renewed), or a new one."""
        now = self.clock()
        self._prune(now)
        lid = self._by_machine.get(machine_key.raw)
        p = self.pending.get(lid) if lid is not None else None
        if p is None or p.node_key != node_key:
            if p is not None:
                del self.pending[p.id]
            p = PendingLogin(generate_token(32), machine_key, node_key, hostname, os_name, 0.0)
            while len(self.pending) >= MAX_PENDING:  # many machine keys asking at once: drop the oldest
                self._done(next(iter(self.pending.values())))
            self.pending[p.id] = p
            self._by_machine[machine_key.raw] = p.id
        p.hostname, p.os = hostname, os_name
        p.expires = now + LOGIN_LIFETIME
        return p

    def auth_url(self, login: PendingLogin) -> str:
        return f"{self.config.server_url.rstrip('/')}/login/{login.id}"

    async def poll(
        self, machine_key: MachinePublic, node_key: NodePublic, hostname: str, os_name: str, wait: float
    ) -> dict[str, Any]:
        """The register answer for a machine that needs login: waits up to ``wait`` seconds (capped at
        :data:`MAX_WAIT`) for the login (or the approval) to finish. Returns ``{"node": Node JSON}``,
        ``{"pending_approval": true, "message": …}`` or ``{"auth_url": …, "login_error"?: …}``."""
        login = self.begin(machine_key, node_key, hostname, os_name)
        deadline = self.clock() + max(0.0, min(wait, MAX_WAIT))
        outcomes = login.outcomes
        while True:
            node = self.store.node_by_machine_key(machine_key, self.clock())
            if node is not None and node.node_key == node_key and not node.expired:
                self._done(login)
                return {"node": node.to_json()}
            pending = self.store.pending_for(machine_key)
            if pending is not None and pending.node_key == node_key:
                login.waiting_approval = True
            elif login.waiting_approval:  # rejected by an admin: sign in again
                login.waiting_approval = False
                login.error = "an administrator rejected this device; sign in again or ask them"
            left = deadline - self.clock()
            if left <= 0 or login.outcomes != outcomes:  # a refusal (or approval wait) is told at once
                break
            login.event.clear()
            await wait_event(login.event, min(left, 1.0))  # 1 s ticks: approvals come from other processes
        if login.waiting_approval:
            return {
                "pending_approval": True,
                "message": "signed in; waiting for an administrator to approve this device "
                "(`tailpy control nodes approve`)",
            }
        answer: dict[str, Any] = {"auth_url": self.auth_url(login)}
        if login.error:
            answer["login_error"] = login.error
        return answer

    def _done(self, login: PendingLogin) -> None:
        self.pending.pop(login.id, None)
        if self._by_machine.get(login.machine_key.raw) == login.id:
            del self._by_machine[login.machine_key.raw]

    # --- the browser's side ---

    def _login_for(self, login_id: str) -> PendingLogin | None:
        self._prune(self.clock())
        return self.pending.get(login_id)

    @staticmethod
    def _stale() -> web.Response:
        return pages.error_page(
            404,
            "This sign-in link is no longer valid",
            "The link has expired, was already used, or the control server restarted since it was printed.",
            "Run `tailpy login` (or `tailpy up`) on the device again and open the new link it prints.",
        )

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        login = self._login_for(request.match_info["login_id"])
        if login is None:
            return self._stale()
        return pages.login_page(
            login.hostname, self.config.provider_name, f"/login/{login.id}/start", login.os
        )

    async def _start(self, request: web.Request) -> web.StreamResponse:
        login = self._login_for(request.match_info["login_id"])
        if login is None:
            return self._stale()
        return await self._redirect(login.id, None)

    async def start_signin(self, finish: SignIn) -> web.StreamResponse:
        """Send a browser to the provider to sign in for another page than a node's login (the web console,
        :mod:`tailpy.control.console`): the same ``state``, nonce, PKCE and browser binding as a node's
        sign-in, through the same redirect URI (``<server_url>/oidc/callback``, the one registered at the
        provider); the verified identity goes to ``finish`` instead of registering a node."""
        return await self._redirect("", finish)

    async def _redirect(self, login_id: str, finish: SignIn | None) -> web.StreamResponse:
        try:
            await self.provider.discover()
        except ControlError as e:
            log.warning("login: %s", e)
            return pages.error_page(
                502,
                "The identity provider cannot be reached",
                f"The control server could not reach {self.config.provider_name} to start the sign-in.",
                "Try again in a minute; if it persists, tell the tailnet's administrator.",
            )
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        secret = generate_token(32)
        while len(self.attempts) >= MAX_PENDING:
            del self.attempts[next(iter(self.attempts))]
        self.attempts[state] = _Attempt(login_id, nonce, verifier, self.clock(), _digest(secret), finish)
        # The callback is accepted only from the browser holding this cookie: someone who fetched /start
        # and hands the provider URL to another person cannot have that person sign their device in.
        found = web.HTTPFound(self.provider.authorization_url(state, nonce, verifier))
        found.set_cookie(
            _cookie_name(state),
            secret,
            max_age=int(ATTEMPT_LIFETIME),
            path="/oidc/callback",
            httponly=True,
            samesite="Lax",
            secure=self.config.server_url.lower().startswith("https:"),
        )
        found.headers["Cache-Control"] = "no-store"
        raise found

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        state = q.get("state", "")
        self._prune(self.clock())
        attempt = self.attempts.pop(state, None)  # one use: a replayed callback finds nothing
        if "error" in q:
            why = q.get("error_description") or q.get("error") or "no reason given"
            return pages.error_page(
                400,
                "Sign-in was not completed",
                f"{self.config.provider_name} did not sign you in: {why[:200]}.",
                "Open the link on the device again to retry.",
            )
        if attempt is None:
            log.warning("login callback with an unknown or used state from %s", request.remote)
            return pages.error_page(
                400,
                "This sign-in cannot be completed",
                "The sign-in answer does not match a sign-in started here (it is from another browser, was "
                "already used, or is too old).",
                "Open the link that `tailpy login` printed on the device again.",
            )
        secret = request.cookies.get(_cookie_name(state), "")
        if not hmac.compare_digest(_digest(secret), attempt.binding):
            log.warning("login callback without the browser binding cookie from %s", request.remote)
            return pages.error_page(
                400,
                "This sign-in was started in another browser",
                "The sign-in answer reached a browser that did not open the device's sign-in link, so the "
                "device was not added. (If someone sent you a sign-in address, do not use it: they may be "
                "trying to add their device to your account.)",
                "Open the link that `tailpy login` printed on your device in this browser and sign in "
                "from there.",
            )
        if attempt.finish is not None:
            return await self._finish_signin(q.get("code", ""), attempt, attempt.finish, request)
        login = self.pending.get(attempt.login_id)
        if login is None:
            return self._stale()
        code = q.get("code", "")
        if not code or len(code) > 2048:
            return pages.error_page(
                400, "Sign-in answer incomplete", "The provider's answer has no code.", pages._AGAIN
            )
        try:
            tokens = await self.provider.exchange(code, attempt.verifier)
            who = await self.provider.verify_id_token(tokens["id_token"], attempt.nonce)
        except IdTokenError as e:
            log.warning("login for %s refused: %s", login.hostname, e)
            login.fail(f"the sign-in could not be verified ({e}); open the link again")
            return pages.error_page(
                401,
                "Sign-in could not be verified",
                f"The control server did not accept the provider's answer: {e}.",
                "Open the link on the device again to retry; if it keeps failing, tell the administrator.",
            )
        except ControlError as e:
            log.warning("login for %s: %s", login.hostname, e)
            return pages.error_page(
                502,
                "The identity provider cannot be reached",
                f"The control server could not finish the sign-in with {self.config.provider_name}.",
                "Open the link on the device again in a minute.",
            )
        return self._admit(login, who)

    async def _finish_signin(
        self, code: str, attempt: _Attempt, finish: SignIn, request: web.Request
    ) -> web.StreamResponse:
        """The callback of a :meth:`start_signin` sign-in: the code exchanged, the ID token verified, the
        identity handed to ``finish``."""
        if not code or len(code) > 2048:
            return pages.error_page(
                400, "Sign-in answer incomplete", "The provider's answer has no code.", "Sign in again."
            )
        try:
            tokens = await self.provider.exchange(code, attempt.verifier)
            who = await self.provider.verify_id_token(tokens["id_token"], attempt.nonce)
        except IdTokenError as e:
            log.warning("sign-in refused: %s", e)
            return pages.error_page(
                401,
                "Sign-in could not be verified",
                f"The control server did not accept the provider's answer: {e}.",
                "Sign in again; if it keeps failing, tell the administrator.",
            )
        except ControlError as e:
            log.warning("sign-in: %s", e)
            return pages.error_page(
                502,
                "The identity provider cannot be reached",
                f"The control server could not finish the sign-in with {self.config.provider_name}.",
                "Sign in again in a minute.",
            )
        return await finish(request, who)

    def _admit(self, login: PendingLogin, who: ident.Identity) -> web.Response:
        refusal = self.config.refusal(who)
        if refusal is not None:
            log.warning("login for %s refused: %s", login.hostname, refusal)
            login.fail(refusal)
            return pages.error_page(
                403,
                "This account may not join the tailnet",
                f"You signed in, but {refusal}. The device {login.hostname!r} was not added.",
                "Sign in with another account from the device's link, or ask the administrator for access.",
            )
        now = self.clock()
        fixed = self.config.expiry_from_token and who.expires is not None
        if fixed:
            expiry: float | None = who.expires
        else:
            expiry = None if self.key_lifetime is None else now + self.key_lifetime
        user_id = ident.user_for_identity(self.store, who, now)
        login.error = ""
        if self.config.approval and self.store.node_by_machine_key(login.machine_key) is None:
            self.store.add_pending(
                login.machine_key,
                login.node_key,
                login.hostname,
                login.os,
                user_id,
                now,
                expiry,
                expiry_fixed=fixed,
            )
            login.waiting_approval = True
            login.outcomes += 1
            login.event.set()
            log.info("login: %s signed in %s; waiting for approval", who.shown, login.hostname)
            return pages.approval_page(who.shown, login.hostname)
        try:
            node = self.store.register_for_user(
                login.machine_key,
                login.node_key,
                login.hostname,
                login.os,
                user_id,
                now,
                expiry,
                expiry_fixed=fixed,
            )
        except ControlError as e:
            login.fail(str(e))
            return pages.error_page(409, "The device could not be added", f"{e}.", pages._AGAIN)
        log.info("login: %s signed in %s, node %d %s", who.shown, login.hostname, node.id, node.name)
        self.on_node(node.id)
        login.event.set()
        return pages.success_page(who.shown, login.hostname, node.name, node.ipv4 or "")


__all__ = ["IdTokenError", "Logins", "OIDCConfig", "PendingLogin", "Provider", "SignIn", "read_secret"]
