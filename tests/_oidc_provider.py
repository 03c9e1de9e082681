"""A small, real OpenID Connect provider for tests: aiohttp + Authlib's PKCE and token helpers + joserfc.

Dex cannot be built here with ``go install`` (the Go module proxy serves only dex v2.13.0+incompatible from
2019: later releases have a go.mod without the /v2 suffix, so no tag can be installed, and branch queries
are refused), so the tests run this provider instead.

What it implements (OpenID Connect Core 1.0, code flow): discovery at ``/.well-known/openid-configuration``,
keys at ``/keys`` (one RSA key, RS256), ``/auth`` (a username/password form; a successful POST redirects to
the registered redirect URI with ``code`` and ``state``), ``/token`` (client secret by HTTP Basic or in the
body, one-use codes bound to client, redirect URI and PKCE S256 challenge, 60 s lifetime; returns an ID
token with ``iss``, ``sub``, ``aud``, ``exp``, ``iat``, ``nonce``, ``email``, ``email_verified``, ``name``,
``groups``).

Test knobs: :attr:`Provider.id_token_mode` makes the next ID tokens ``"expired"``, signed with a
``"wrong_key"`` (a fresh key not in the JWKS, same ``kid``), or with a ``"wrong_nonce"`` /
``"wrong_audience"``, so refusal cases use real signing. Run standalone (in a lab
namespace) with ``python tests/_oidc_provider.py --listen HOST:PORT --issuer URL --client-id ID
--client-secret S --redirect-uri URI --user NAME:PASSWORD:EMAIL[:GROUP,...]``; it prints ``ready`` when it
listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import secrets
import signal
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.common.urls import add_params_to_uri  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey


@dataclass
class User:
    password: str
    email: str
    name: str = ""
    groups: tuple[str, ...] = ()
    email_verified: bool = True


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    username: str
    created: float
    used: bool = False


@dataclass
class Provider:
    """One client (``client_id``/``client_secret``/``redirect_uri``), ``users`` by login name."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    users: dict[str, User] = field(default_factory=dict)
    token_lifetime: int = 3600
    id_token_mode: str = ""  # "", "expired", "wrong_key", "wrong_nonce", "wrong_audience"
    codes: dict[str, _Code] = field(default_factory=dict)
    key: RSAKey = field(
        default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})
    )
    token_requests: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/keys", self._keys)
        app.router.add_get("/auth", self._auth_form)
        app.router.add_post("/auth", self._auth_post)
        app.router.add_post("/token", self._token)
        return app

    async def _discovery(self, _r: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self.issuer + "/auth",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.issuer + "/keys",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "email", "profile", "groups"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def _keys(self, _r: web.Request) -> web.Response:
        return web.json_response(KeySet([self.key]).as_dict(private=False))

    def _check_auth_request(self, q: Any) -> str | None:
        if q.get("client_id") != self.client_id:
            return "unknown client"
        if q.get("redirect_uri") != self.redirect_uri:
            return "redirect_uri is not registered"
        if q.get("response_type") != "code" or "openid" not in q.get("scope", "").split():
            return "only the code flow with scope openid"
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return "PKCE S256 is required"
        return None

    async def _auth_form(self, r: web.Request) -> web.Response:
        err = self._check_auth_request(r.query)
        if err:
            return web.Response(status=400, text=err)
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in r.query.items()
        )
        return web.Response(
            content_type="text/html",
            text=(
                "<!DOCTYPE html><html><head><title>Test provider: sign in</title></head><body>"
                f'<form method="post" action="/auth">{hidden}'
                '<label>User <input id="login" name="login"></label> '
                '<label>Password <input id="password" name="password" type="password"></label> '
                '<button id="submit" type="submit">Sign in</button></form></body></html>'
            ),
        )

    async def _auth_post(self, r: web.Request) -> web.Response:
        form = await r.post()
        q = {k: str(v) for k, v in form.items()}
        err = self._check_auth_request(q)
        if err:
            return web.Response(status=400, text=err)
        user = self.users.get(q.get("login", ""))
        if user is None or not secrets.compare_digest(user.password, q.get("password", "")):
            return web.Response(status=401, text="wrong user or password")
        code = generate_token(40)
        self.codes[code] = _Code(
            self.client_id,
            q["redirect_uri"],
            q["code_challenge"],
            q.get("nonce", ""),
            q["login"],
            time.time(),
        )
        raise web.HTTPFound(
            add_params_to_uri(q["redirect_uri"], [("code", code), ("state", q.get("state", ""))])
        )

    def _client_ok(self, r: web.Request, form: dict[str, str]) -> bool:
        auth = r.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                cid, _, sec = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            cid, sec = urllib.parse.unquote(cid), urllib.parse.unquote(sec)
        else:
            cid, sec = form.get("client_id", ""), form.get("client_secret", "")
        return cid == self.client_id and secrets.compare_digest(sec, self.client_secret)

    async def _token(self, r: web.Request) -> web.Response:
        self.token_requests += 1
        form = {k: str(v) for k, v in (await r.post()).items()}

        def error(code: str, desc: str, status: int = 400) -> web.Response:
            return web.json_response({"error": code, "error_description": desc}, status=status)

        if not self._client_ok(r, form):
            return error("invalid_client", "client authentication failed", 401)
        if form.get("grant_type") != "authorization_code":
            return error("unsupported_grant_type", "only authorization_code")
        c = self.codes.get(form.get("code", ""))
        if c is None or c.used or time.time() - c.created > 60:
            return error("invalid_grant", "the code is unknown, expired or already used")
        c.used = True  # one use (RFC 6749 §4.1.2)
        if form.get("redirect_uri") != c.redirect_uri:
            return error("invalid_grant", "redirect_uri differs")
        if create_s256_code_challenge(form.get("code_verifier", "")) != c.challenge:
            return error("invalid_grant", "PKCE verification failed")
        user = self.users[c.username]
        now = int(time.time())
        exp = now - 3600 if self.id_token_mode == "expired" else now + self.token_lifetime
        claims = {
            "iss": self.issuer,
            "sub": "sub-" + c.username,
            "aud": "another-client" if self.id_token_mode == "wrong_audience" else self.client_id,
            "exp": exp,
            "iat": now if self.id_token_mode != "expired" else now - 7200,
            "nonce": "another-nonce" if self.id_token_mode == "wrong_nonce" else c.nonce,
            "email": user.email,
            "email_verified": user.email_verified,
            "name": user.name or c.username,
            "groups": list(user.groups),
        }
        key = self.key
        if self.id_token_mode == "wrong_key":
            key = RSAKey.generate_key(2048, parameters={"kid": "k1"})  # same kid, another key
        token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
        return web.json_response(
            {
                "access_token": generate_token(30),
                "token_type": "Bearer",
                "expires_in": 3600,
                "id_token": token,
            }
        )


async def _main(args: argparse.Namespace) -> None:
    users = {}
    for spec in args.user:
        name, password, email, *rest = spec.split(":")
        users[name] = User(
            password, email, groups=tuple(g for g in (rest[0] if rest else "").split(",") if g)
        )
    prov = Provider(args.issuer.rstrip("/"), args.client_id, args.client_secret, args.redirect_uri, users)
    prov.token_lifetime = args.token_lifetime
    runner = web.AppRunner(prov.app(), access_log=None)
    await runner.setup()
    host, _, port = args.listen.rpartition(":")
    await web.TCPSite(runner, host or None, int(port)).start()
    print("ready", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--redirect-uri", required=True)
    p.add_argument("--user", action="append", default=[])
    p.add_argument("--token-lifetime", type=int, default=3600, help="ID token lifetime, seconds")
    asyncio.run(_main(p.parse_args()))
    sys.exit(0)
