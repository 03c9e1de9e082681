"""A program embedding tailpy.Node, run by tests/integration/test_embedded_node.py as user nobody inside a
lab namespace. It prints one JSON object per line on stdout (``{"event": ...}``) so the test can follow it.

    _embedded_node.py serve   NAME PORT            # HTTP on PORT; prints "ready"; runs until killed
    _embedded_node.py dial    NAME HOST PORT       # GET / from HOST:PORT; prints "body" (+ "status")
    _embedded_node.py pair    NAME1 NAME2          # two nodes in this process; prints "pair" with the echo
    _embedded_node.py release NAME HOST PORT       # fds, threads and tasks before start and after close

Environment: TAILPY_CONTROL_URL, TAILPY_AUTH_KEY, TAILPY_STATE_ROOT (a directory nobody may write).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import tailpy
from tailpy.errors import DialError


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def node(name: str) -> tailpy.Node:
    return tailpy.Node(
        control_url=os.environ["TAILPY_CONTROL_URL"],
        auth_key=os.environ["TAILPY_AUTH_KEY"],
        state_dir=Path(os.environ["TAILPY_STATE_ROOT"]) / name,
        hostname=name,
        start_timeout=60,
    )


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    peer = writer.get_extra_info("peername")
    body = f"hello from {os.getuid()} at {peer[0]}: {head.split(b' ')[1].decode()}\n".encode()
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()


async def get(n: tailpy.Node, host: str, port: int) -> str:
    reader, writer = await n.open_connection(host, port, timeout=20)
    writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.partition(b"\r\n\r\n")[2].decode(errors="replace")


def peer_paths(status: Any) -> dict[str, str | None]:
    return {p.name: p.path for p in status.peers}


async def serve(name: str, port: int) -> None:
    async with node(name) as n:
        server = await n.start_server(http_handler, port=port)
        emit("ready", addresses=[str(a) for a in n.addresses], uid=os.getuid())
        await server.serve_forever()


async def dial(name: str, host: str, port: int) -> None:
    async with node(name) as n:
        body = ""
        for _ in range(10):  # the first packets may go while paths are being found
            try:
                body = await get(n, host, port)
                break
            except DialError as e:
                emit("retry", error=str(e))
                await asyncio.sleep(1)
        emit("body", body=body, uid=os.getuid())
        for _ in range(20):  # let disco settle, then report each peer's path
            await asyncio.sleep(0.5)
        emit("status", paths=peer_paths(await n.status()))


async def pair(a_name: str, b_name: str) -> None:
    async with node(a_name) as a, node(b_name) as b:
        got: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

        class Collect(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                got.put_nowait((data, addr))

        await b.start_server(http_handler, port=80)
        body = ""
        for _ in range(20):
            try:
                body = await get(a, b_name, 80)
                break
            except DialError as e:
                emit("retry", error=str(e))
                await asyncio.sleep(1)
        await b.create_datagram_endpoint(Collect, local_port=5000)
        t_a, _ = await a.create_datagram_endpoint(asyncio.DatagramProtocol)
        udp: list[Any] = []
        for _ in range(20):
            t_a.sendto(b"datagram", (b_name, 5000))
            try:
                udp = list(await asyncio.wait_for(got.get(), 1))
                break
            except TimeoutError:
                continue
        emit(
            "pair",
            body=body,
            udp=udp[0].decode() if udp else None,
            udp_from=udp[1][0] if udp else None,
            a=[str(x) for x in a.addresses],
        )


def _fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # the directory's own fd, closed by now
            continue
    return sorted(out)


def snapshot() -> dict[str, Any]:
    return {
        "fds": _fds(),
        "threads": sorted(t.name for t in threading.enumerate()),
        "tasks": len(os.listdir("/proc/self/task")),  # Rust threads too
    }


async def release(name: str, host: str, port: int) -> None:
    before = snapshot()
    n = node(name)
    await n.start()
    server = await n.start_server(http_handler, port=8080)
    body = await get(n, host, port)
    _, held = await n.open_connection(host, port)  # left open: close() must release it
    await n.create_datagram_endpoint(asyncio.DatagramProtocol, local_port=5001)
    during = snapshot()
    await n.close()
    del server, held
    await asyncio.sleep(0.5)
    emit("release", body=body, before=before, during=during, after=snapshot())


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "serve":
        asyncio.run(serve(args[0], int(args[1])))
    elif cmd == "dial":
        asyncio.run(dial(args[0], args[1], int(args[2])))
    elif cmd == "pair":
        asyncio.run(pair(args[0], args[1]))
    elif cmd == "release":
        asyncio.run(release(args[0], args[1], int(args[2])))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
