"""The web console over plain HTTP (an aiohttp client, no browser, no JavaScript): a real control server on
127.0.0.1 and a real SQLite store. Sign-in with API keys (valid, invalid, expired) and through the test
OpenID Connect provider (tests/_oidc_provider.py) for admins only; the session cookie's flags and signature;
redirects and 403s without a session or CSRF token; the listings and actions, each checked in the store."""

from __future__ import annotations

import io
import re
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nacl.public
import pytest
import yarl
from _schema import rewind
from aiohttp import web

from _oidc_provider import Provider, User
from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.apikeys import create_api_key, expire_api_key
from tailpy.control.console import (
    COOKIE,
    CSRF_FIELD,
    ConsoleConfig,
    Session,
    dns_form,
    parse_admins,
    policy_error_position,
    session_key,
    sign,
    verify,
)
from tailpy.control.oidc import OIDCConfig
from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError
from tailpy.keys import MachinePrivate, NodePublic

CLIENT_ID, SECRET = "tailpy", "s3cret-value"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mkey() -> MachinePrivate:
    return MachinePrivate(bytes(nacl.public.PrivateKey.generate()))


def nkey() -> NodePublic:
    return NodePublic(bytes(nacl.public.PrivateKey.generate().public_key))


@dataclass
class Env:
    store: Store
    server: ControlServer
    url: str
    http: aiohttp.ClientSession


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = Store(tmp_path)
    server = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await server.start("127.0.0.1", 0)
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # (cookies of IP hosts too)
    try:
        yield Env(store, server, f"http://{host}:{port}", http)
    finally:
        await http.close()
        await server.stop()
        store.close()


def api_key(env: Env, seconds: float | None = 3600) -> str:
    return create_api_key(env.store, expiration_seconds=seconds, description="console test")[1]


async def sign_in(env: Env, key: str) -> aiohttp.ClientResponse:
    async with env.http.post(env.url + "/admin/signin", data={"api_key": key}, allow_redirects=False) as r:
        await r.read()
        return r


async def csrf(env: Env, page: str = "/admin/machines") -> str:
    async with env.http.get(env.url + page) as r:
        assert r.status == 200, await r.text()
        m = re.search(rf'name="{CSRF_FIELD}" value="([^"]+)"', await r.text())
    assert m is not None
    return m.group(1)


async def test_unauthenticated_pages_redirect_to_sign_in(env: Env) -> None:
    for path in ("/admin", "/admin/", "/admin/machines", "/admin/keys", "/admin/policy", "/admin/nothing"):
        async with env.http.get(env.url + path, allow_redirects=False) as r:
            assert r.status == 302, path
            where = r.headers["Location"]
            if path not in ("/admin", "/admin/"):
                assert urllib.parse.unquote(where) == f"/admin/signin?next={path}", path
    async with env.http.get(env.url + "/admin/machines") as r:  # followed: the sign-in page itself
        page = await r.text()
        assert r.status == 200 and "Sign in" in page and 'name="api_key"' in page
        assert "Sign in with" not in page  # (no OpenID Connect provider configured)
    async with env.http.get(env.url + "/admin/console.css") as r:
        assert r.status == 200 and r.content_type == "text/css"


async def test_posts_without_session_or_csrf_token_are_refused(env: Env) -> None:
    store = env.store
    machine = await _join(env, "laptop")
    # No session at all: 403, nothing renamed.
    async with env.http.post(
        env.url + f"/admin/machines/{machine}/rename", data={"name": "evil"}, allow_redirects=False
    ) as r:
        assert r.status == 403
    await sign_in(env, api_key(env))
    token = await csrf(env)
    for data, headers in (
        ({"name": "evil"}, {}),  # no token
        ({"name": "evil", CSRF_FIELD: "0" * 64}, {}),  # a wrong one
        ({"name": "evil", CSRF_FIELD: token}, {"Origin": "https://attacker.example"}),  # another site
    ):
        async with env.http.post(
            env.url + f"/admin/machines/{machine}/rename", data=data, headers=headers, allow_redirects=False
        ) as r:
            assert r.status == 403, data
    assert store.list_nodes()[0].name == "laptop"
    async with env.http.post(
        env.url + f"/admin/machines/{machine}/rename",
        data={"name": "desk", CSRF_FIELD: token},
        headers={"Origin": env.url},
        allow_redirects=False,
    ) as r:
        assert r.status == 303 and r.headers["Location"] == "/admin/machines"
    assert store.list_nodes()[0].name == "desk"
    async with env.http.get(env.url + "/admin/machines") as r:  # the one-shot notice, then gone
        assert "is now named desk" in await r.text()
    async with env.http.get(env.url + "/admin/machines") as r:
        assert "is now named desk" not in await r.text()


async def test_invalid_and_expired_api_keys_are_refused_at_sign_in(env: Env) -> None:
    info, key = create_api_key(env.store, expiration_seconds=3600, description="x")
    expire_api_key(env.store, info.id)
    for bad in (key, "tpyapi-0123456789-" + "A" * 43, "not a key", ""):
        r = await sign_in(env, bad)
        assert r.status == 401 if bad else r.status in (400, 401), bad
        assert COOKIE not in r.cookies
    async with env.http.get(env.url + "/admin/machines", allow_redirects=False) as r:
        assert r.status == 302
    # A session ends when its API key is expired.
    info2, key2 = create_api_key(env.store, expiration_seconds=3600, description="y")
    assert (await sign_in(env, key2)).status == 302
    async with env.http.get(env.url + "/admin/users", allow_redirects=False) as r:
        assert r.status == 200
    expire_api_key(env.store, info2.id)
    async with env.http.get(env.url + "/admin/users", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"].startswith("/admin/signin")


async def test_session_cookie_flags_and_signature(env: Env, tmp_path: Path) -> None:
    r = await sign_in(env, api_key(env))
    assert r.status == 302 and r.headers["Location"] == "/admin/machines"
    morsel = r.cookies[COOKIE]
    assert morsel["httponly"] is True and morsel["samesite"] == "Lax" and morsel["path"] == "/admin"
    assert not morsel["secure"]  # (plain HTTP here; see below for HTTPS)
    assert 0 < int(morsel["max-age"]) <= 12 * 3600
    key = session_key(env.server.key.raw)
    payload = verify(key, "session", morsel.value)
    assert payload["via"] == "api key" and payload["who"].startswith("apikey:")
    assert verify(session_key(bytes(32)), "session", morsel.value) is None  # another server's key
    assert verify(key, "notice", morsel.value) is None  # another purpose
    # A forged session (signed with another key, or an edited payload) is not accepted.
    forged = sign(session_key(bytes(32)), "session", payload)
    tampered = sign(key, "session", {**payload, "expires": time.time() - 1})
    for value in (forged, tampered, morsel.value[:-2] + "AA"):
        async with (
            aiohttp.ClientSession() as other,
            other.get(
                env.url + "/admin/machines", headers={"Cookie": f"{COOKIE}={value}"}, allow_redirects=False
            ) as resp,
        ):
            assert resp.status == 302
    # A second server on the same database (a replica: the same machine key) accepts the session.
    replica = ControlServer(env.store, keepalive=0.5, poll_interval=0.2)
    host, port = await replica.start("127.0.0.1", 0)
    try:
        async with (
            aiohttp.ClientSession() as other,
            other.get(
                f"http://{host}:{port}/admin/users", headers={"Cookie": f"{COOKIE}={morsel.value}"}
            ) as resp,
        ):
            assert resp.status == 200 and "Users" in await resp.text()
    finally:
        await replica.stop()
    # Served over HTTPS (server_url https://, a TLS proxy in front): the cookie is Secure.
    secure = ControlServer(env.store, console=ConsoleConfig(server_url="https://control.example"))
    host, port = await secure.start("127.0.0.1", 0)
    try:
        async with (
            aiohttp.ClientSession() as other,
            other.post(
                f"http://{host}:{port}/admin/signin", data={"api_key": api_key(env)}, allow_redirects=False
            ) as resp,
        ):
            assert resp.status == 302 and resp.cookies[COOKIE]["secure"] is True
        # The browser on a plain-http page (its Origin says so) would drop that Secure cookie and loop back
        # to the sign-in page: the sign-in is refused with the reason and a link to the https address.
        async with (
            aiohttp.ClientSession() as other,
            other.post(
                f"http://{host}:{port}/admin/signin?next=/admin/users",
                data={"api_key": api_key(env)},
                headers={"Origin": f"http://{host}:{port}"},
                allow_redirects=False,
            ) as resp,
        ):
            text = await resp.text()
            assert resp.status == 400 and COOKIE not in resp.cookies
            assert "plain http" in text and "https://control.example/admin/signin?next=/admin/users" in (
                text.replace("%2F", "/")
            )
    finally:
        await secure.stop()


async def test_listings_are_readable_without_javascript(env: Env) -> None:
    env.store.create_user("alice@example.com", time.time())
    machine = await _join(env, "router-1", routes=["198.51.100.0/24"])
    router = env.store.list_nodes()[0]
    eps = [Endpoint.parse("198.51.100.7:41641"), Endpoint.parse("[2001:db8::7]:41641")]
    env.store.update_node(router.machine_key, now=time.time(), endpoints=eps, home_derp=900)
    await _join(env, "quiet-1")
    await sign_in(env, api_key(env))
    pages = {}
    for path in ("machines", "users", "keys", "policy", "dns"):
        async with env.http.get(env.url + "/admin/" + path) as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert (
                r.headers["Cache-Control"] == "no-store"
                and "frame-ancestors 'none'" in (r.headers["Content-Security-Policy"])
            )
            pages[path] = await r.text()
            assert "<script" not in pages[path], path  # listings need no script
    node = env.store.list_nodes()[0]
    assert f'id="node-{machine}"' in pages["machines"] and "router-1" in pages["machines"]
    paths = re.findall(r'<div class="hint path">\s*(.*?)\s*</div>', pages["machines"], re.S)
    assert [" ".join(p.split()) for p in paths] == [
        "relay 900, 2 direct endpoints",  # (no DERP map here: the region's id)
        "no home relay, no direct endpoint",
    ]
    assert str(node.ipv4) in pages["machines"] and "198.51.100.0/24" in pages["machines"]
    assert "awaiting approval" in pages["machines"]
    assert "alice@example.com" in pages["users"]
    assert "tailnet.internal" in pages["dns"]


async def test_actions_change_the_store(env: Env) -> None:
    machine = await _join(env, "router-1", routes=["198.51.100.0/24"])
    await sign_in(env, api_key(env))
    token = await csrf(env)

    async def post(path: str, data: dict[str, str], status: int = 303) -> str:
        async with env.http.post(
            env.url + path, data={**data, CSRF_FIELD: token}, allow_redirects=False
        ) as r:
            text = await r.text()
            assert r.status == status, text
            return text

    await post(f"/admin/machines/{machine}/approve-routes", {"route": "198.51.100.0/24"})
    assert env.store.list_nodes()[0].approved_routes == ("198.51.100.0/24",)
    await post(f"/admin/machines/{machine}/unapprove-routes", {"route": "198.51.100.0/24"})
    assert env.store.list_nodes()[0].approved_routes == ()
    exit_node = await _join(env, "exit-1", routes=["0.0.0.0/0", "::/0"])
    async with env.http.get(env.url + "/admin/machines") as r:
        assert f'id="exit-{exit_node}"' in await r.text()
    await post(f"/admin/machines/{exit_node}/approve-routes", {"exit_node": "1"})
    by_id = {n.id: n for n in env.store.list_nodes()}
    assert set(by_id[exit_node].approved_routes) == {"0.0.0.0/0", "::/0"}
    await post(f"/admin/machines/{exit_node}/delete", {})
    # A mistake comes back as a notice, nothing changed.
    await post(f"/admin/machines/{machine}/rename", {"name": "Not A Name!"})
    async with env.http.get(env.url + "/admin/machines") as r:
        assert 'class="notice bad"' in await r.text()
    assert env.store.list_nodes()[0].name == "router-1"
    # Auth keys: the new key shown once in the answer (not a redirect), usable.
    form = {"user": "", "tags": "", "expiration": "1h", "reusable": "1", "form_token": await form_token(env)}
    page = await post("/admin/keys", form, 200)
    m = re.search(r'id="new-key"[^>]*value="([^"]+)"', page)
    assert m is not None and len(env.store.list_auth_keys()) == 3
    assert f"tailpy up --login-server {env.url} --auth-key" in page
    async with env.http.get(env.url + "/admin/keys") as r:
        assert m.group(1) not in await r.text()  # a listing shows only its prefix
    key_id = max(k.id for k in env.store.list_auth_keys())
    await post(f"/admin/keys/{key_id}/expire", {})
    assert next(k for k in env.store.list_auth_keys() if k.id == key_id).expires is not None
    # Policy: a bad one refused with its line, a good one saved.
    bad = (
        '{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:*"]},\n'
        '    {"action": "nope"}\n  ]\n}'
    )
    page = await post("/admin/policy", {"text": bad, "action": "save"}, 400)
    assert "line 4, column" in page and 'class="mark"' in page and 'data-line="4"' in page
    assert env.store.policy_history(5) == []
    good = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    page = await post("/admin/policy", {"text": good, "action": "check"}, 200)
    assert "The policy is valid" in page and env.store.policy_history(5) == []
    await post("/admin/policy", {"text": good, "action": "save"})
    (rec,) = env.store.policy_history(5)
    assert rec.text == good and rec.set_by.startswith("apikey:")  # (as the admin API names a key)
    # DNS.
    await post(
        "/admin/dns",
        {
            "domain": "ts.example",
            "magic_dns": "1",
            "nameservers": "192.0.2.53\n",
            "routes": "corp.example 192.0.2.54",
        },
    )
    shown = env.server.console.admin.run("dns.show", {})
    assert shown["domain"] == "ts.example" and shown["nameservers"] == ["192.0.2.53"]
    assert shown["routes"] == {"corp.example": ["192.0.2.54"]}
    # Users, then expire and delete the machine.
    await post("/admin/users", {"name": "carol"})
    assert "carol" in {u.name for u in env.store.list_users()}
    await post(f"/admin/machines/{machine}/expire", {})
    assert env.store.list_nodes()[0].expired
    await post(f"/admin/machines/{machine}/delete", {})
    assert env.store.list_nodes() == []
    # Signing out ends the session.
    await post("/admin/signout", {})
    async with env.http.get(env.url + "/admin/machines", allow_redirects=False) as r:
        assert r.status == 302


async def form_token(env: Env) -> str:
    async with env.http.get(env.url + "/admin/keys") as r:
        m = re.search(r'name="form_token" value="([^"]+)"', await r.text())
    assert m is not None
    return m.group(1)


async def test_sign_out_revokes_the_session_on_every_replica(env: Env) -> None:
    r = await sign_in(env, api_key(env))
    copy = r.cookies[COOKIE].value
    replica = ControlServer(env.store, keepalive=0.5, poll_interval=0.2)
    host, port = await replica.start("127.0.0.1", 0)
    try:
        for base in (env.url, f"http://{host}:{port}"):
            async with (
                aiohttp.ClientSession() as other,
                other.get(base + "/admin/users", headers={"Cookie": f"{COOKIE}={copy}"}) as resp,
            ):
                assert resp.status == 200
        token = await csrf(env)
        async with env.http.post(
            env.url + "/admin/signout", data={CSRF_FIELD: token}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        # A copy of the cookie (another browser, a stolen one) is refused after sign-out: here and on a
        # second server on the same database; a POST with it changes nothing.
        machine = await _join(env, "laptop")
        for base in (env.url, f"http://{host}:{port}"):
            async with (
                aiohttp.ClientSession() as other,
                other.get(
                    base + "/admin/users", headers={"Cookie": f"{COOKIE}={copy}"}, allow_redirects=False
                ) as resp,
            ):
                assert resp.status == 302
                assert "why=signed-out" in resp.headers["Location"], base
            async with (
                aiohttp.ClientSession() as other,
                other.post(
                    base + f"/admin/machines/{machine}/rename",
                    data={"name": "evil", CSRF_FIELD: token},
                    headers={"Cookie": f"{COOKIE}={copy}"},
                    allow_redirects=False,
                ) as resp,
            ):
                assert resp.status == 403 and "signed out" in await resp.text()
        assert env.store.list_nodes()[0].name == "laptop"
        async with env.http.get(env.url + "/admin/signin?why=signed-out") as resp:
            assert "This session was signed out" in await resp.text()
    finally:
        await replica.stop()


@pytest.mark.parametrize(
    ("given", "lands"),
    [
        ("/admin/users", "/admin/users"),
        ("/admin/policy?version=2", "/admin/policy?version=2"),
        ("/admin/%0d%0aX:1", "/admin/machines"),
        ("/admin/\r\nX-Injected:%201", "/admin/machines"),
        ("/admin/../../health", "/admin/machines"),
        ("/admin/./users", "/admin/users"),
        ("/admin/%2e%2e/health", "/admin/machines"),
        ("//evil.example/admin/", "/admin/machines"),
        ("https://evil.example/admin/", "/admin/machines"),
        ("/admin/signin", "/admin/machines"),
        ("/administrator", "/admin/machines"),
        ("/admin/%C2%85", "/admin/machines"),  # (C1 control NEL)
        ("/admin/\u2028x", "/admin/machines"),  # (line separator)
        ("/admin/\u202eusers", "/admin/machines"),  # (bidi override)
        ("/admin/machin\u00e9s", "/admin/machin%C3%A9s"),  # (percent-encoded: Location is ASCII)
        ("/admin/machin%25C3%25A9s", "/admin/machin%C3%A9s"),  # (what the sign-in page passes on)
        ("/admin/policy?q=\u00e9 x", "/admin/policy?q=%C3%A9%20x"),
    ],
)
async def test_next_is_a_console_path_on_get_and_post(env: Env, given: str, lands: str) -> None:
    quoted = urllib.parse.quote(given, safe="/?=:%")  # (a %0d%0a stays an escape: CR LF once decoded)
    async with env.http.post(
        env.url + "/admin/signin?next=" + quoted, data={"api_key": api_key(env)}, allow_redirects=False
    ) as r:
        assert r.status == 302 and r.headers["Location"] == lands, given
    async with env.http.get(env.url + "/admin/signin?next=" + quoted, allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == lands, given  # (signed in: straight there)


async def test_auth_key_form_is_one_time_and_refused_forms_keep_input(env: Env) -> None:
    await sign_in(env, api_key(env))
    token = await csrf(env)
    form = {
        "user": "",
        "tags": "",
        "expiration": "2h",
        "reusable": "1",
        "form_token": await form_token(env),
        CSRF_FIELD: token,
    }
    async with env.http.post(env.url + "/admin/keys", data=form) as r:
        assert r.status == 200 and 'id="new-key"' in await r.text()
    assert len(env.store.list_auth_keys()) == 1
    # The answer page reloaded (the same form sent again): nothing created, the key is not shown again.
    async with env.http.post(env.url + "/admin/keys", data=form) as r:
        page = await r.text()
        assert r.status == 409 and 'id="new-key"' not in page
        assert "shown once" in page and "create another" in page
    assert len(env.store.list_auth_keys()) == 1
    # A refused form comes back with what was typed, and keeps its token: nothing was created.
    retry = await form_token(env)
    bad = {**form, "tags": "tag:web", "expiration": "9999d", "form_token": retry}
    async with env.http.post(env.url + "/admin/keys", data=bad) as r:
        page = await r.text()
        assert r.status == 400 and 'class="notice bad"' in page
        assert 'value="tag:web"' in page and 'value="9999d"' in page
        assert re.search(r'id="key-reusable" value="1"\s*checked', page)
    bad = {**form, "expiration": "soon", "form_token": retry}
    async with env.http.post(env.url + "/admin/keys", data=bad) as r:
        page = await r.text()
        assert r.status == 400 and 'value="soon"' in page
    assert len(env.store.list_auth_keys()) == 1
    # The same form corrected and sent again (the browser's Back, say) creates its key, once.
    fixed = {**form, "expiration": "3h", "form_token": retry}
    async with env.http.post(env.url + "/admin/keys", data=fixed) as r:
        assert r.status == 200 and 'id="new-key"' in await r.text()
    async with env.http.post(env.url + "/admin/keys", data=fixed) as r:
        assert r.status == 409 and 'id="new-key"' not in await r.text()
    assert len(env.store.list_auth_keys()) == 2
    # The DNS form, refused, keeps every field as typed (not the stored settings).
    dns = {
        "domain": "ts.example",
        "nameservers": "192.0.2.53\n192.0.2.54",
        "routes": "lonely.example",
        CSRF_FIELD: token,
    }
    async with env.http.post(env.url + "/admin/dns", data=dns) as r:
        page = await r.text()
        assert r.status == 400 and "split DNS route" in page
        assert 'value="ts.example"' in page and "192.0.2.53\n192.0.2.54</textarea>" in page
        assert ">lonely.example</textarea>" in page
    assert env.server.console.admin.run("dns.show", {})["nameservers"] == []


async def test_refusals_say_why(env: Env, tmp_path: Path) -> None:
    await sign_in(env, api_key(env))
    token = await csrf(env)
    # A cross-origin POST with a valid session: the message names the other site, not the session.
    async with env.http.post(
        env.url + "/admin/users",
        data={"name": "mallory", CSRF_FIELD: token},
        headers={"Origin": "https://attacker.example"},
    ) as r:
        text = await r.text()
        assert r.status == 403 and "another site" in text and "session" not in text
    # Deleting a user that does not exist (a name no user may have) suggests no command with it.
    async with env.http.post(env.url + "/admin/users/%3Cscript%3E/delete", data={CSRF_FIELD: token}) as r:
        text = await r.text()
        assert "There is no user" in text and "users create" not in text
    # An admin by policy group removed from the group: the sign-in page says why.
    env.store.add_policy('{"groups": {"group:admins": ["carol@example.com"]}}', "test", time.time())
    server = ControlServer(env.store, console=ConsoleConfig(admins=("group:admins",)))
    host, port = await server.start("127.0.0.1", 0)
    base = f"http://{host}:{port}"
    value = sign(
        session_key(server.key.raw),
        "session",
        Session("carol@example.com", "oidc", None, time.time() + 3600, "s" * 24).to_json(),
    )
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            browser.cookie_jar.update_cookies({COOKIE: value}, response_url=yarl.URL(base + "/admin/"))
            async with browser.get(base + "/admin/users") as r:
                assert r.status == 200
            await server.console.admin.run_async(
                "policy.set", {"text": '{"groups": {"group:admins": []}}', "by": "test"}
            )
            async with browser.get(base + "/admin/users") as r:
                text = await r.text()
                assert "/admin/signin" in str(r.url) and "no longer an administrator" in text
    finally:
        await server.stop()


async def _join(env: Env, hostname: str, routes: list[str] | None = None) -> int:
    key = env.store.create_auth_key(reusable=False, expires=None, now=time.time()).key
    client = ControlClient(env.url, mkey())
    try:
        node = await client.register(nkey(), hostname, key, os="linux", routable_ips=routes)
    finally:
        await client.close()
    return node.id


async def test_wrong_methods_and_oversized_forms_get_console_pages(env: Env) -> None:
    for method, path, allow in [
        ("PUT", "/admin/machines", "GET, HEAD"),
        ("POST", "/admin", "GET, HEAD"),
        ("POST", "/admin/", "GET, HEAD"),
        ("DELETE", "/admin/machines", "GET, HEAD"),
        ("PATCH", "/admin/keys", "GET, HEAD, POST"),
        ("OPTIONS", "/admin/signin", "GET, HEAD, POST"),
        ("GET", "/admin/machines/3/rename", "POST"),
    ]:
        async with env.http.request(method, env.url + path, allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 405 and r.headers["Allow"] == allow, (method, path)
            assert r.content_type == "text/html" and f"answers {allow} only" in text
    # Not a console address: still sign-in first, then the console's 404 page.
    async with env.http.get(env.url + "/admin/nowhere", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"].startswith("/admin/signin?")
    big = io.BytesIO(b"api_key=" + b"x" * 3_000_000)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with env.http.post(env.url + "/admin/signin", data=big, headers=form) as r:
        text = await r.text()
        assert r.status == 413 and r.content_type == "text/html" and "larger than" in text
    await sign_in(env, api_key(env))
    async with env.http.delete(env.url + "/admin/nowhere") as r:
        assert r.status == 404 and "There is no such console page." in await r.text()


def test_revoked_console_tokens_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.close()
    rewind(tmp_path / "control.db", 11)  # before the migration that adds console_revoked
    store = Store(tmp_path)
    try:
        assert store.revoke_console_token("form:a", expires=100.0, now=10.0)
        assert not store.revoke_console_token("form:a", expires=100.0, now=20.0)  # a one-time token: once
        assert store.console_token_revoked("form:a", now=50.0)
        assert not store.console_token_revoked("form:b", now=50.0)
        assert not store.console_token_revoked("form:a", now=100.0)  # expired: the session would be too
        assert store.revoke_console_token("form:c", expires=100.0, now=30.0)
        store.release_console_token("form:c")  # (a refused form: its token may be sent again)
        assert not store.console_token_revoked("form:c", now=50.0)
        assert store.revoke_console_token("form:c", expires=100.0, now=60.0)
        assert store.revoke_console_token("session:x", expires=300.0, now=200.0)  # (prunes form:a, form:c)
        with store.engine.begin() as conn:
            assert conn.exec_driver_sql("SELECT token FROM console_revoked").scalars().all() == ["session:x"]
    finally:
        store.close()


def test_helpers() -> None:
    assert policy_error_position("policy:12:5: unknown action") == (12, 5, "unknown action")
    assert policy_error_position("policy: too big") is None
    assert parse_admins(("alice@example.com", " group:admins ", "bob")) == (
        "alice@example.com",
        "group:admins",
        "bob",
    )
    with pytest.raises(ConfigError, match="--admin"):
        parse_admins(("a b",))
    assert dns_form({"routes": "a.example 192.0.2.1, 192.0.2.2", "extra_records": "x.ts A 100.64.0.9"}) == {
        "magic_dns": False,
        "nameservers": [],
        "search_domains": [],
        "routes": {"a.example": ["192.0.2.1", "192.0.2.2"]},
        "extra_records": [{"name": "x.ts", "type": "A", "value": "100.64.0.9"}],
    }
    with pytest.raises(ConfigError, match="split DNS route"):
        dns_form({"routes": "lonely.example"})


async def test_oidc_sign_in_admits_admins_only(tmp_path: Path) -> None:
    pport, cport = free_port(), free_port()
    issuer, url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{cport}"
    provider = Provider(
        issuer,
        CLIENT_ID,
        SECRET,
        url + "/oidc/callback",
        {
            "alice": User("pw-alice", "alice@example.com", "Alice A"),
            "bob": User("pw-bob", "bob@example.com", "Bob B"),
            "carol": User("pw-carol", "carol@example.com", "Carol C"),
        },
    )
    prunner = web.AppRunner(provider.app(), access_log=None)
    await prunner.setup()
    await web.TCPSite(prunner, "127.0.0.1", pport).start()
    store = Store(tmp_path)
    store.add_policy('{"groups": {"group:admins": ["carol@example.com"]}}', "test", time.time())
    server = ControlServer(
        store,
        oidc=OIDCConfig(issuer, CLIENT_ID, SECRET, url),
        console=ConsoleConfig(admins=("alice@example.com", "group:admins"), server_url=url),
    )
    await server.start("127.0.0.1", cport)
    try:
        for user, admitted in (("alice", True), ("carol", True), ("bob", False)):
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
                async with browser.get(url + "/admin/signin?next=/admin/users") as r:
                    assert "Sign in with 127.0.0.1" in await r.text()
                async with browser.get(
                    url + "/admin/signin/oidc?next=/admin/users", allow_redirects=False
                ) as r:
                    assert r.status == 302
                    auth = r.headers["Location"]
                query = dict(urllib.parse.parse_qsl(auth.split("?", 1)[1]))
                async with browser.post(
                    auth.split("?")[0],
                    data={**query, "login": user, "password": f"pw-{user}"},
                    allow_redirects=False,
                ) as r:
                    assert r.status == 302
                    cb = r.headers["Location"]
                async with browser.get(cb, allow_redirects=False) as r:
                    text = await r.text()
                    if admitted:
                        assert r.status == 302 and r.headers["Location"] == "/admin/users", text
                        assert r.cookies[COOKIE]["httponly"] is True
                    else:
                        assert r.status == 403 and "not an administrator" in text
                        assert COOKIE not in r.cookies
                async with browser.get(url + "/admin/users", allow_redirects=False) as r:
                    assert r.status == (200 if admitted else 302), user
                    if admitted:
                        assert f"{user}@example.com" in await r.text()
    finally:
        await server.stop()
        store.close()
        await prunner.cleanup()
