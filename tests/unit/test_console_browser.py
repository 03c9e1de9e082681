"""The web console in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium; no
browser download), against a real control server on 127.0.0.1: sign in with an API key, create an auth key
and read it from the page, a node joins with it advertising a route, the machine appears, is renamed, a bad
policy is refused with its line marked, a good one saved, the route approved. Each step is checked in the
store, not only on the page. A screenshot of each page is saved (PNG) under the test's tmp path and copied
to ``test-output/console/`` at the repository root, for review.

Skips with the reason when chromium, chromedriver or selenium is missing (``make deps`` installs them)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nacl.public
import pytest

from _browser_login import headless_chromium, unavailable_reason
from tailpy.control import ControlClient, ControlServer, Store
from tailpy.control.apikeys import create_api_key
from tailpy.keys import MachinePrivate, NodePublic

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output" / "console"
ROUTE = "198.51.100.0/24"
BAD_POLICY = (
    '{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:*"]},\n    {"action": "nope"}\n  ]\n}'
)
GOOD_POLICY = '{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:*"]}\n  ]\n}'
T = TypeVar("T")


@pytest.fixture
def driver() -> Iterator[Any]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with headless_chromium("--window-size=1400,1000") as d:
        yield d


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[Store, ControlServer, str]]:
    (tmp_path / "control").mkdir()
    store = Store(tmp_path / "control")
    server = ControlServer(store, keepalive=0.5, poll_interval=0.2)
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield store, server, f"http://{host}:{port}"
    finally:
        await server.stop()
        store.close()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """A blocking WebDriver call, off the event loop (the control server runs on it)."""
    return await asyncio.to_thread(fn, *args)


async def test_console_flow_in_chromium(
    driver: Any, control: tuple[Store, ControlServer, str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    store, _server, url = control
    shots = tmp_path / "screenshots"
    shots.mkdir()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    taken: list[Path] = []
    wait = WebDriverWait(driver, 20)

    async def shot(name: str) -> None:
        path = shots / f"{len(taken) + 1:02d}-{name}.png"
        assert await in_thread(driver.save_screenshot, str(path))
        shutil.copy(path, OUTPUT / path.name)
        taken.append(path)
        print(f"console screenshot: {path} (copy: {OUTPUT / path.name})")

    async def find_id(element_id: str) -> Any:
        return await in_thread(wait.until, ec.presence_of_element_located((By.ID, element_id)))

    async def click(element_id: str) -> None:
        el = await in_thread(wait.until, ec.element_to_be_clickable((By.ID, element_id)))
        await in_thread(el.click)

    async def notice() -> str:
        return str((await find_id("notice")).text)

    # Sign in: the console sends an unauthenticated browser to the sign-in page.
    _, api_key = create_api_key(store, expiration_seconds=3600, description="browser test")
    await in_thread(driver.get, url + "/admin/keys")
    await find_id("api_key")
    assert "/admin/signin" in driver.current_url
    await shot("signin")
    await in_thread((await find_id("api_key")).send_keys, api_key)
    await click("signin-key")
    await find_id("create-key")
    assert driver.current_url.endswith("/admin/keys")  # back where the browser was going

    # Create an auth key; the page shows it once, with a working copy button.
    await in_thread((await find_id("key-expiration")).clear)
    await in_thread((await find_id("key-expiration")).send_keys, "1h")
    await click("create-key")
    auth_key = str((await find_id("new-key")).get_attribute("value"))
    assert store.list_auth_keys()[0].key.rstrip("…") in auth_key
    await click("copy")  # (shown by the page's script: the CSP nonce let it run)
    await in_thread(wait.until, ec.text_to_be_present_in_element((By.ID, "copy"), "Copied"))
    await shot("auth-key-created")
    assert len(store.list_auth_keys()) == 1

    # A node joins with that key, advertising a route.
    client = ControlClient(url, MachinePrivate(bytes(nacl.public.PrivateKey.generate())))
    try:
        node = await client.register(
            NodePublic(bytes(nacl.public.PrivateKey.generate().public_key)),
            "web-server",
            auth_key,
            os="linux",
            routable_ips=[ROUTE],
        )
    finally:
        await client.close()
    assert store.list_auth_keys()[0].uses == 1

    # The machine appears, with its address and its route awaiting approval.
    await in_thread(driver.get, url + "/admin/machines")
    row = await find_id(f"node-{node.id}")
    assert "web-server" in row.text and str(node.ipv4) in row.text and ROUTE in row.text
    assert "awaiting approval" in row.text
    await shot("machines")

    # Rename it.
    field = await find_id(f"rename-{node.id}")
    await in_thread(field.clear)
    await in_thread(field.send_keys, "web-1")
    await click(f"rename-button-{node.id}")
    assert "now named web-1" in await notice()
    assert store.list_nodes()[0].name == "web-1"
    assert "web-1" in (await find_id(f"node-{node.id}")).text
    await shot("machine-renamed")

    # A refused long name is echoed in the notice, which wraps inside its box instead of overflowing.
    field = await find_id(f"rename-{node.id}")
    await in_thread(field.clear)
    await in_thread(field.send_keys, "x" * 300)
    shown = await find_id("notice")  # (the rename's notice: wait for the next page to replace it)
    await click(f"rename-button-{node.id}")
    await in_thread(wait.until, ec.staleness_of(shown))
    assert "x" * 300 in await notice()
    widths = await in_thread(
        driver.execute_script,
        "var n = document.getElementById('notice'); return [n.scrollWidth, n.clientWidth];",
    )
    assert widths[0] <= widths[1], widths
    assert store.list_nodes()[0].name == "web-1"

    # A bad policy is refused: the error names line 4, the line is marked and selected in the editor.
    await in_thread(driver.get, url + "/admin/policy")
    editor = await find_id("policy-text")
    await in_thread(editor.clear)
    await in_thread(editor.send_keys, BAD_POLICY)
    await click("policy-save")
    errors = await find_id("policy-errors")
    assert "line 4, column" in errors.text and "nope" in errors.text
    marked = driver.find_element(By.CSS_SELECTOR, ".excerpt .mark")
    assert '{"action": "nope"}' in marked.text
    start = await in_thread(
        driver.execute_script, "return document.getElementById('policy-text').selectionStart"
    )
    assert start == len("\n".join(BAD_POLICY.split("\n")[:3])) + 1  # the start of line 4
    await shot("policy-refused")
    assert store.policy_history(5) == []

    # A good one is saved.
    editor = await find_id("policy-text")
    await in_thread(editor.clear)
    await in_thread(editor.send_keys, GOOD_POLICY)
    await click("policy-save")
    assert "saved" in await notice()
    (saved,) = store.policy_history(5)
    assert saved.text == GOOD_POLICY and saved.set_by.startswith("apikey:")
    await shot("policy-saved")

    # Approve the route.
    await in_thread(driver.get, url + "/admin/machines")
    await click(f"approve-{node.id}-{ROUTE.replace('/', '_')}")
    assert "approved" in await notice()
    assert store.list_nodes()[0].approved_routes == (ROUTE,)
    await shot("route-approved")

    # The other pages, for review.
    for page in ("users", "dns"):
        await in_thread(driver.get, url + f"/admin/{page}")
        await find_id("dns-form" if page == "dns" else "users")
        await shot(page)
    assert all(p.stat().st_size > 1000 for p in taken)
