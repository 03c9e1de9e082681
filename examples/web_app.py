"""An aiohttp web app reachable only on the tailnet, run by an ordinary user (no root, no TUN).

TAILPY_CONTROL_URL=http://192.0.2.1:8080 TAILPY_AUTH_KEY=tskey-... python examples/web_app.py web
# then, from any node of the tailnet:  curl http://web/
"""

import asyncio
import os
import sys

from aiohttp import web

import tailpy


async def main(hostname: str) -> None:
    async with tailpy.Node(
        control_url=os.environ["TAILPY_CONTROL_URL"],
        auth_key=os.environ.get("TAILPY_AUTH_KEY"),
        state_dir=os.environ.get("TAILPY_STATE_DIR", f"{hostname}-state"),
        hostname=hostname,
    ) as node:

        async def hello(request: web.Request) -> web.Response:
            who = await node.whois(request.remote or "")  # the caller, known by its tailnet address
            return web.Response(text=f"hello {who.name if who else request.remote}, this is {hostname}\n")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        assert runner.server is not None
        server = await node.create_server(runner.server, port=80)
        print(f"serving http://{hostname}/ on {node.addresses[0]}", flush=True)
        try:
            await server.serve_forever()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "web"))
