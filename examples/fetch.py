"""Fetch a page from a tailnet name, as an ordinary user: an ephemeral node joins, fetches, and leaves.

TAILPY_CONTROL_URL=http://192.0.2.1:8080 TAILPY_AUTH_KEY=tskey-... python examples/fetch.py http://web/
"""

import asyncio
import os
import sys
import urllib.parse

import tailpy


async def fetch(url: str) -> bytes:
    u = urllib.parse.urlsplit(url)
    async with tailpy.Node(
        control_url=os.environ["TAILPY_CONTROL_URL"],
        auth_key=os.environ.get("TAILPY_AUTH_KEY"),
        hostname=os.environ.get("TAILPY_HOSTNAME", "fetch"),
        ephemeral=True,  # no state kept; control deletes the node when it closes
    ) as node:
        reader, writer = await node.open_connection(u.hostname or "", u.port or 80)  # a MagicDNS name
        writer.write(f"GET {u.path or '/'} HTTP/1.0\r\nHost: {u.netloc}\r\n\r\n".encode())
        response = await reader.read()
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head.split()[1] != b"200":
        raise SystemExit(f"fetch: {head.splitlines()[0].decode(errors='replace') if head else 'no answer'}")
    return body


if __name__ == "__main__":
    sys.stdout.write(asyncio.run(fetch(sys.argv[1])).decode(errors="replace"))
