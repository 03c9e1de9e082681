"""Interactive login (OpenID Connect) end to end on 127.0.0.1: a real control server, the real test OpenID
Connect provider (tests/_oidc_provider.py, RS256 keys), the real ControlClient, and an aiohttp session
standing in for the browser. Refusal cases (tampered state, replayed code, expired / wrongly-signed ID token,
wrong nonce or audience, disallowed user) go through the callback with real tokens."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import nacl.public
import pytest
from aiohttp import web
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc.jwk import KeySet, RSAKey
from rich.console import Console

from _oidc_provider import Provider, User
from tailpy.cli.control.common import when
from tailpy.cli.login import show_qr
from tailpy.cli.main import cli
from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control import identity as ident
from tailpy.control.oidc import IdTokenError, OIDCConfig
from tailpy.control.oidc import Provider as OIDCProvider
from tailpy.control.options import oidc_config
from tailpy.errors import AuthKeyError
from tailpy.keys import MachinePrivate, NodePrivate, NodePublic
from tailpy.proto import control as proto

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
    provider: Provider
    url: str
    browser: aiohttp.ClientSession
    client: ControlClient
    node_key: NodePublic


async def _start(tmp_path: Path, **cfg: object) -> AsyncIterator[Env]:
    pport = free_port()
    issuer = f"http://127.0.0.1:{pport}"
    cport = free_port()
    url = f"http://127.0.0.1:{cport}"
    provider = Provider(
        issuer,
        CLIENT_ID,
        SECRET,
        url + "/oidc/callback",
        {
            "alice": User("pw-alice", "alice@example.com", "Alice A", ("staff",)),
            "bob": User("pw-bob", "bob@other.org", "Bob B"),
        },
    )
    prunner = web.AppRunner(provider.app(), access_log=None)
    await prunner.setup()
    await web.TCPSite(prunner, "127.0.0.1", pport).start()
    config = replace(OIDCConfig(issuer, CLIENT_ID, SECRET, url), **cfg)  # type: ignore[arg-type]
    store = Store(tmp_path)
    server = ControlServer(store, keepalive=0.5, poll_interval=0.2, oidc=config)
    await server.start("127.0.0.1", cport)
    browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies of IP hosts too
    client = ControlClient(url, mkey())
    try:
        yield Env(store, server, provider, url, browser, client, nkey())
    finally:
        await client.close()
        await browser.close()
        await server.stop()
        store.close()
        await prunner.cleanup()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in _start(tmp_path, allowed_domains=("example.com",)):
        yield e


async def begin(env: Env) -> str:
    """The login URL the node gets; returns the provider URL the "Sign in" button leads to."""
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    assert answer.node is None and answer.auth_url.startswith(env.url + "/login/")
    async with env.browser.get(answer.auth_url) as r:
        page = await r.text()
        assert r.status == 200 and "laptop" in page and "Sign in" in page
    start = re.search(r'href="([^"]+)"', page)
    assert start is not None
    async with env.browser.get(env.url + start.group(1), allow_redirects=False) as r:
        assert r.status == 302
        return r.headers["Location"]


async def sign_in(env: Env, auth: str, user: str, password: str) -> str:
    """Fill the provider's form; returns the callback URL it redirects to."""
    query = dict(urllib.parse.parse_qsl(auth.split("?", 1)[1]))
    assert query["code_challenge_method"] == "S256" and query["nonce"] and query["state"]
    async with env.browser.post(
        auth.split("?")[0], data={**query, "login": user, "password": password}, allow_redirects=False
    ) as r:
        assert r.status == 302, await r.text()
        return r.headers["Location"]


async def callback(env: Env, url: str) -> tuple[int, str]:
    async with env.browser.get(url, allow_redirects=False) as r:
        text = await r.text()
        assert r.headers["Content-Type"].startswith("text/html")
        assert "Traceback" not in text and 'File "' not in text
        return r.status, text


async def test_login_registers_node_for_the_signed_in_user(env: Env) -> None:
    cb = await sign_in(env, await begin(env), "alice", "pw-alice")
    # The node long-polls meanwhile: it gets its node the moment the callback completes.
    poll = asyncio.create_task(env.client.login_poll(env.node_key, "laptop", wait=20))
    await asyncio.sleep(0.2)
    status, page = await callback(env, cb)
    assert status == 200 and "alice@example.com" in page and "joined the tailnet" in page
    answer = await asyncio.wait_for(poll, 30)
    assert answer.node is not None and answer.node.node_key == env.node_key
    assert answer.node.user == "alice@example.com" and not answer.node.expired
    users = {u.name for u in env.store.list_users()}
    assert "alice@example.com" in users
    # A later poll (a restart) answers the node at once; the same identity maps to the same user.
    again = await env.client.login_poll(env.node_key, "laptop", wait=0)
    assert again.node is not None and again.node.id == answer.node.id


async def test_disallowed_user_is_refused_and_node_stays_logged_out(env: Env) -> None:
    cb = await sign_in(env, await begin(env), "bob", "pw-bob")
    status, page = await callback(env, cb)
    assert status == 403 and "bob@other.org" in page and "not allowed" in page and "was not added" in page
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    assert answer.node is None and answer.auth_url and "not allowed" in answer.error
    assert env.store.list_nodes() == []


async def test_tampered_state_is_refused_before_the_code_is_used(env: Env) -> None:
    cb = await sign_in(env, await begin(env), "alice", "pw-alice")
    tampered = re.sub(r"state=[^&]+", "state=" + "A" * 43, cb)
    status, page = await callback(env, tampered)
    assert status == 400 and "does not match a sign-in started here" in page
    assert env.provider.token_requests == 0 and env.store.list_nodes() == []


async def test_replayed_callback_and_replayed_code_are_refused(env: Env) -> None:
    cb = await sign_in(env, await begin(env), "alice", "pw-alice")
    assert (await callback(env, cb))[0] == 200
    # The same callback again: its state was used up.
    status, _ = await callback(env, cb)
    assert status == 400
    # The old code with a fresh, valid state (a new login of another node key): the provider refuses the
    # code, which it gave out once already.
    env.node_key = nkey()
    fresh = await begin(env)
    state = dict(urllib.parse.parse_qsl(fresh.split("?", 1)[1]))["state"]
    replay = re.sub(r"state=[^&]+", "state=" + state, cb)
    status, page = await callback(env, replay)
    assert status == 401 and "refused the authorization code" in page


async def test_callback_from_another_browser_is_refused(env: Env) -> None:
    """S4: someone fetches the device's /start (the provider URL) and has another person sign in with it:
    that browser lacks the cookie set at /start, so the device is not added."""
    auth = await begin(env)  # env.browser plays the attacker: it holds the binding cookie
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as victim:
        query = dict(urllib.parse.parse_qsl(auth.split("?", 1)[1]))
        async with victim.post(
            auth.split("?")[0],
            data={**query, "login": "alice", "password": "pw-alice"},
            allow_redirects=False,
        ) as r:
            cb = r.headers["Location"]
        async with victim.get(cb, allow_redirects=False) as r:
            status, page = r.status, await r.text()
    assert status == 400 and "started in another browser" in page and "Traceback" not in page
    assert env.provider.token_requests == 0 and env.store.list_nodes() == []
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    assert answer.node is None


async def test_start_sets_a_narrow_binding_cookie(env: Env) -> None:
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    async with env.browser.get(answer.auth_url + "/start", allow_redirects=False) as r:
        assert r.status == 302
        [cookie] = r.cookies.values()
    assert cookie.key.startswith("tailpy_signin_") and len(cookie.value) >= 32
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/oidc/callback"
    assert not cookie["secure"]  # plain http here; https server URLs get Secure
    # The browser that started it still signs in (the flow of the other tests), once per cookie.
    cb = await sign_in(env, r.headers["Location"], "alice", "pw-alice")
    status, _ = await callback(env, cb)
    assert status == 200
    # Behind https (the server URL browsers use), the cookie is Secure.
    logins = env.server.logins
    assert logins is not None
    logins.config = replace(logins.config, server_url="https://control.example")
    env.node_key = nkey()
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    path = urllib.parse.urlsplit(answer.auth_url).path
    async with env.browser.get(env.url + path + "/start", allow_redirects=False) as r:
        assert r.status == 302
        assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]


async def test_refusal_reaches_the_waiting_node_at_once(env: Env) -> None:
    """M3: the long poll answers the moment a sign-in is refused, not at the end of its wait."""
    cb = await sign_in(env, await begin(env), "bob", "pw-bob")
    poll = asyncio.create_task(env.client.login_poll(env.node_key, "laptop", wait=60))
    await asyncio.sleep(0.3)
    assert (await callback(env, cb))[0] == 403
    answer = await asyncio.wait_for(poll, 30)  # well before the 60 s the poll may wait
    assert answer.node is None and "not allowed" in answer.error
    # The refusal is told once: the next poll waits again (no busy loop on an old error).
    again = asyncio.create_task(env.client.login_poll(env.node_key, "laptop", wait=3))
    await asyncio.sleep(1.0)
    assert not again.done()
    assert "not allowed" in (await asyncio.wait_for(again, 30)).error


@pytest.mark.parametrize("approval", [False, True])
async def test_rotation_keeps_an_expiry_that_came_from_the_token(tmp_path: Path, approval: bool) -> None:
    """S5: with --oidc-expiry-from-token, node key rotation must not give the node the server's key
    lifetime: the expiry stays the ID token's."""
    async for env in _start(tmp_path, expiry_from_token=True, approval=approval):
        env.provider.token_lifetime = 300
        old = NodePrivate.generate()
        env.node_key = old.public
        assert (await callback(env, await sign_in(env, await begin(env), "alice", "pw-alice")))[0] == 200
        if approval:
            [pending] = env.store.list_pending()
            env.store.approve_pending(pending.id, time.time())
        answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
        assert answer.node is not None and answer.node.key_expiry is not None
        expiry = answer.node.key_expiry
        assert 200 < expiry - time.time() <= 300
        new = NodePrivate.generate()
        proof = proto.seal_rotation_proof(old, await env.client.server_key(), new.public, time.time())
        rotated = await env.client.register(
            new.public, "laptop", None, old_node_key=old.public, old_node_proof=proof
        )
        assert rotated.node_key == new.public and rotated.key_expiry == expiry
        # A node that joined with an auth key still gets a fresh lifetime at rotation.
        key = env.store.create_auth_key(reusable=False, expires=None, now=time.time())
        other, c2 = NodePrivate.generate(), ControlClient(env.url, mkey())
        try:
            n = await c2.register(other.public, "server", key.key)
            new2 = NodePrivate.generate()
            proof = proto.seal_rotation_proof(other, await c2.server_key(), new2.public, time.time() + 1)
            r2 = await c2.register(
                new2.public, "server", None, old_node_key=other.public, old_node_proof=proof
            )
            assert n.key_expiry is not None and r2.key_expiry is not None and r2.key_expiry > n.key_expiry
        finally:
            await c2.close()


async def test_access_log_keeps_no_login_secrets(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """M11: login link ids and the callback's code and state stay out of the access log."""
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    login_id = answer.auth_url.rsplit("/", 1)[1]
    cb = await sign_in(env, await begin(env), "alice", "pw-alice")
    assert (await callback(env, cb))[0] == 200
    query = dict(urllib.parse.parse_qsl(cb.split("?", 1)[1]))
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("/oidc/callback?…" in line for line in lines) and any(
        "/login/…/start" in line for line in lines
    )
    for line in lines:
        assert login_id not in line and query["code"] not in line and query["state"] not in line


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("expired", "expired"),
        ("wrong_key", "signature"),
        ("wrong_nonce", "nonce"),
        ("wrong_audience", "aud"),
    ],
)
async def test_bad_id_tokens_are_refused(env: Env, mode: str, words: str) -> None:
    env.provider.id_token_mode = mode
    cb = await sign_in(env, await begin(env), "alice", "pw-alice")
    status, page = await callback(env, cb)
    assert status == 401 and "could not be verified" in page and words in page, page
    assert env.store.list_nodes() == []
    answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
    assert answer.node is None and answer.auth_url and "could not be verified" in answer.error


async def test_pages_are_plain_and_never_show_a_traceback(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    for path in (
        "/login/nope",
        "/login/nope/start",
        "/oidc/callback",
        "/oidc/callback?state=x&code=y",
        "/login/",
    ):
        status, page = await callback(env, env.url + path)
        assert status in (400, 404) and "<h1>" in page, (path, status)
    assert (await callback(env, env.url + "/oidc/callback?error=access_denied&state=x"))[0] == 400
    # An unexpected failure inside the flow: a plain 500 page, the details only in the log.
    cb = await sign_in(env, await begin(env), "alice", "pw-alice")

    async def broken(*_a: object) -> None:
        raise RuntimeError("internal detail that must not reach a browser")

    monkeypatch.setattr(env.server.logins.provider, "exchange", broken)  # type: ignore[union-attr]
    status, page = await callback(env, cb)
    assert status == 500 and "internal detail" not in page and "Something went wrong" in page


async def test_manual_approval(tmp_path: Path) -> None:
    async for env in _start(tmp_path, approval=True, expiry_from_token=True):
        cb = await sign_in(env, await begin(env), "alice", "pw-alice")
        status, page = await callback(env, cb)
        assert status == 200 and "approves" in page
        answer = await env.client.login_poll(env.node_key, "laptop", wait=0)
        assert answer.pending_approval and answer.node is None
        [pending] = env.store.list_pending()
        assert pending.email == "alice@example.com" and pending.hostname == "laptop"
        assert env.store.list_nodes() == []
        poll = asyncio.create_task(env.client.login_poll(env.node_key, "laptop", wait=20))
        await asyncio.sleep(0.3)
        node = env.store.approve_pending(pending.id, time.time())  # as another process would
        answer = await asyncio.wait_for(poll, 30)
        assert answer.node is not None and answer.node.id == node.id
        assert env.store.list_pending() == []
        # The key expires with the ID token (the provider gives one hour).
        assert answer.node.key_expiry is not None and 3000 < answer.node.key_expiry - time.time() <= 3600


async def test_without_oidc_a_keyless_register_still_asks_for_an_auth_key(tmp_path: Path) -> None:
    store = Store(tmp_path)
    server = ControlServer(store)
    host, port = await server.start("127.0.0.1", 0)
    client = ControlClient(f"http://{host}:{port}", mkey())
    try:
        with pytest.raises(AuthKeyError, match="auth key"):
            await client.login_poll(nkey(), "laptop", wait=0)
    finally:
        await client.close()
        await server.stop()
        store.close()


def test_policy() -> None:
    base = OIDCConfig("https://idp.example", "c", "s", "http://control")
    alice = ident.Identity("https://idp.example", "1", "alice@example.com", True, groups=("staff",))
    assert base.refusal(alice) is None  # no restriction: anyone the provider signs in
    assert replace(base, allowed_domains=("example.com",)).refusal(alice) is None
    unverified = replace(alice, email_verified=False)
    assert replace(base, allowed_domains=("example.com",)).refusal(unverified) is not None
    assert replace(base, allowed_users=("ALICE@example.com",)).refusal(alice) is None
    # an allowed user's email admits only once the provider verified it (as the domain rule); a subject does
    refused = replace(base, allowed_users=("alice@example.com",)).refusal(unverified)
    assert refused is not None and "verified" in refused
    assert replace(base, allowed_users=("1",)).refusal(unverified) is None
    assert replace(base, allowed_groups=("staff",)).refusal(alice) is None
    refused = replace(base, allowed_groups=("admins",)).refusal(alice)
    assert refused is not None and "alice@example.com" in refused and "admins" in refused


_FUZZ_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})


def _fuzz_provider() -> OIDCProvider:
    p = OIDCProvider(OIDCConfig("https://idp.example", "c", "s", "http://control"))
    p.metadata = {"issuer": "https://idp.example", "id_token_signing_alg_values_supported": ["RS256"]}
    p._keys, p._keys_at = KeySet([_FUZZ_KEY]), time.time()
    return p


def _segment(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda h, c, sig: f"{_segment(h)}.{_segment(c)}.{sig}",
            st.dictionaries(
                st.sampled_from(["alg", "kid", "typ", "crit"]), st.text(max_size=8) | st.integers()
            ),
            st.dictionaries(
                st.sampled_from(["iss", "aud", "sub", "exp", "iat", "nonce", "groups"]),
                st.text(max_size=8) | st.integers() | st.lists(st.text(max_size=4), max_size=3),
            ),
            st.text(alphabet="ABCxyz-_0", max_size=40),
        ),
    )
)
def test_id_token_verification_raises_only_id_token_error(token: str) -> None:
    """Whatever a provider sends as an ID token, verification refuses it with IdTokenError (one sentence)."""
    with pytest.raises(IdTokenError):
        asyncio.run(_fuzz_provider().verify_id_token(token, "nonce"))


def test_admin_cli_pending_approve_reject(tmp_path: Path) -> None:
    store = Store(tmp_path)
    uid = ident.user_for_identity(
        store, ident.Identity("https://idp.example", "s1", "ann@example.com", True), 1.0
    )
    first = store.add_pending(mkey().public, nkey(), "ann-laptop", "linux", uid, time.time(), None)
    second = store.add_pending(mkey().public, nkey(), "ann-phone", "linux", uid, time.time(), None)
    store.close()
    runner = CliRunner()
    env = {"TAILPY_CONTROL_STATE_DIR": str(tmp_path)}
    r = runner.invoke(cli, ["control", "nodes", "pending"], env=env)
    assert r.exit_code == 0 and "ann-laptop" in r.output and "ann@example.com" in r.output, r.output
    r = runner.invoke(cli, ["control", "nodes", "approve", str(first.id)], env=env)
    assert r.exit_code == 0 and "approved: node 1 ann-laptop 100.64.0.1 (ann@example.com)" in r.output, (
        r.output
    )
    r = runner.invoke(cli, ["control", "nodes", "reject", str(second.id)], env=env)
    assert r.exit_code == 0 and "rejected: ann-phone" in r.output
    r = runner.invoke(cli, ["control", "nodes", "pending", "--json"], env=env)
    assert json.loads(r.output) == []
    r = runner.invoke(cli, ["control", "nodes", "approve", "99"], env=env)
    assert r.exit_code == 1 and "no pending node 99" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--oidc-issuer", "https://idp.example"], "needs --oidc-client-id"),
        (["--oidc-client-id", "x"], "need --oidc-issuer"),
        (["--oidc-issuer", "idp.example", "--oidc-client-id", "x"], "https://"),
        (["--server-url", "ftp://x"], "must be an http:// or https:// URL"),
        (["--server-url", "http://"], "must be an http:// or https:// URL"),
        (["--approve-nodes"], "--approve-nodes only applies to browser login: it needs --oidc-issuer"),
        (
            ["--oidc-expiry-from-token", "--oidc-allowed-domain", "example.com"],
            "--oidc-allowed-domain, --oidc-expiry-from-token only apply to browser login: they need",
        ),
        (["--oidc-allowed-domain", "@example.com", *"OIDC"], "'@example.com' is not an email domain"),
        (["--oidc-scope", "", *"OIDC"], "'' is not a scope"),
        (["--oidc-scope", "email profile", *"OIDC"], "one word per --oidc-scope"),
    ],
)
def test_serve_oidc_options_are_checked(tmp_path: Path, args: list[str], words: str) -> None:
    if args[-4:] == list("OIDC"):  # with a complete provider configuration
        (tmp_path / "secret").write_text("s\n")
        args = [
            *args[:-4],
            *("--oidc-issuer", "https://idp.example", "--oidc-client-id", "x"),
            *("--oidc-client-secret-file", str(tmp_path / "secret"), "--server-url", "https://c.example"),
        ]
    r = CliRunner().invoke(
        cli, ["control", "serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--no-derp", *args]
    )
    assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output


def test_qr_code_is_drawn_with_block_characters() -> None:
    out = io.StringIO()
    show_qr("http://192.0.2.1:8080/login/abc", Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    assert len(lines) > 10 and any("█" in line or "▀" in line for line in lines)


def test_scopes_always_ask_for_openid(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s\n")
    config = oidc_config(
        "https://idp.example",
        "x",
        tmp_path / "secret",
        "https://c.example",
        scopes=("email", "groups", "email"),
        domains=(),
        users=(),
        groups=(),
        groups_claim="groups",
        expiry_from_token=False,
        approval=False,
    )
    assert config is not None and config.scopes == ("openid", "email", "groups")


@pytest.mark.parametrize(
    ("delta", "shown"),
    [
        (180 * 86400 + 5, "in 180d"),
        (3 * 3600 + 5 * 60 + 2, "in 3h 5m"),
        (2 * 3600, "in 2h"),
        (45, "in 45s"),
        (30 * 60, "in 30m"),
        (2 * 86400 + 4 * 3600, "in 2d 4h"),
        (-(3 * 86400 + 60), "3d ago"),
        (30 * 86400 - 3, "in 30d"),
        (3 * 86400 - 3, "in 3d"),
        (3600 - 2, "in 1h"),
    ],
)
def test_expiry_times_are_humanised(delta: float, shown: str) -> None:
    now = 1_800_000_000.0
    assert when(now + delta, now) == shown
