"""`tailpy ping HOST|IP`: disco pings to a peer, each pong printed with its path and round trip, in the
manner of `tailscale ping`: ``pong from b (100.64.0.2) via DERP(tailpy) in 3ms`` while the peer is reached
through the relay, ``pong from b (100.64.0.2) via 198.51.100.7:41641 in 1ms`` once a direct path answers.

With ``--until-direct`` (the default) it stops at the first direct pong, and exits 1 with "direct connection
not established" when none of the ``-c`` pings went direct. The pings are tailpyd's (``POST
/localapi/v0/ping``); they also start path discovery, as traffic does.

``--json`` prints ``{"peer": {name, fqdn, ip}, "pongs": [...], "direct": bool}``, each pong
``{"direct", "via", "rtt" (seconds, null on timeout), "peer_saw", "timeout"}``; ``peer_saw`` is our
"ip:port" as the peer saw it for a direct pong, null for a pong via DERP or a timeout (see
:class:`tailpy.ipnstate.PingReply`).
"""

from __future__ import annotations

import asyncio
import json
import sys

import click

from tailpy.cli.common import FiniteFloatRange, json_option, local, socket_option
from tailpy.cli.safetext import say, say_lines
from tailpy.errors import TailpyError
from tailpy.ipnstate import PingPeer, PingReply

PAUSE = 0.5  # seconds between pings (after a pong; a timeout already waited)


def describe(peer: PingPeer, reply: PingReply) -> str:
    """One output line for a ping ``reply`` (:meth:`tailpy.daemon.backend.Backend.ping`)."""
    who = f"{peer.name} ({peer.ip})" if peer.ip else peer.name
    if reply.timeout or reply.rtt is None:
        return f"timeout waiting for pong from {who}"
    return f"pong from {who} via {reply.via} in {reply.rtt * 1000:.0f}ms"


@click.command("ping")
@click.argument("target", metavar="HOST|IP")
@click.option("-c", "--count", default=10, show_default=True, type=click.IntRange(1, 10000),
              help="Pings to send at most.")  # fmt: skip
@click.option(
    "--until-direct/--no-until-direct",
    default=True,
    show_default=True,
    help="Stop at the first pong over a direct path; exit 1 if none of the pings went direct.",
)
@click.option("--timeout", default=5.0, show_default=True, type=FiniteFloatRange(0.1, 60),
              help="Seconds to wait for each pong.")  # fmt: skip
@json_option
@socket_option
def command(
    target: str, count: int, until_direct: bool, timeout: float, as_json: bool, socket_path: str
) -> None:
    """Ping a peer (its name, short or full, or a tailnet IP) with disco pings and show the path each pong
    took: via DERP(<region>) through the relay, or via <ip:port> directly."""
    client = local(socket_path)

    async def main() -> tuple[list[PingReply], PingPeer | None]:
        replies: list[PingReply] = []
        peer: PingPeer | None = None
        for i in range(count):
            reply = await client.ping(target, timeout)
            peer = reply.peer or PingPeer(target, "", "")
            replies.append(reply)
            if not as_json:
                say(describe(peer, reply))
            if until_direct and reply.direct:
                break
            if i + 1 < count and not reply.timeout:
                await asyncio.sleep(PAUSE)
        return replies, peer

    try:
        replies, peer = asyncio.run(main())
    except TailpyError as e:
        say_lines(f"tailpy: {e}", err=True)
        sys.exit(1)
    name = peer.name if peer else target
    answered = [r for r in replies if not r.timeout]
    direct = any(r.direct for r in answered)
    if as_json:
        pongs = [r.to_json() for r in replies]
        out = {"peer": None if peer is None else peer.to_json(), "pongs": pongs, "direct": direct}
        click.echo(json.dumps(out, indent=2))
    if not answered:
        say(f"tailpy: no pong from {name} in {len(replies)} pings", err=True)
        sys.exit(1)
    if until_direct and not direct:
        last = answered[-1].via
        say(
            f"tailpy: direct connection not established with {name} after {len(replies)} pings (the peer is "
            f"reached via {last})",
            err=True,
        )
        sys.exit(1)
