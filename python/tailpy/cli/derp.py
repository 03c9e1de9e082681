"""`tailpy derp`: run a DERP relay (Tailscale's DERP protocol v2; see :mod:`tailpy.derp.server`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

import click

from tailpy.errors import ConfigError


@click.group("derp")
def command() -> None:
    """Run a DERP relay server."""


@command.command("serve")
@click.option(
    "--state-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the relay's key (derp.key, mode 0600, made on first start).",
)
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT to serve on.")
@click.option("--certfile", type=click.Path(dir_okay=False, path_type=Path), help="TLS certificate (PEM).")
@click.option("--keyfile", type=click.Path(dir_okay=False, path_type=Path), help="TLS private key (PEM).")
def serve(state_dir: Path, listen: str, certfile: Path | None, keyfile: Path | None) -> None:
    """Serve DERP at /derp (plus /derp/probe, /derp/latency-check, /generate_204 and /debug/metrics from
    loopback) until SIGTERM or SIGINT; plain HTTP unless --certfile and --keyfile are given."""
    from tailpy.cli.control import _parse_listen
    from tailpy.derp.server import DerpServer, load_or_create_key

    host, port = _parse_listen(listen)
    if (certfile is None) != (keyfile is None):
        raise ConfigError(
            "--certfile and --keyfile go together: give both for TLS, or neither for plain HTTP"
        )
    ctx: ssl.SSLContext | None = None
    if certfile is not None and keyfile is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or e
            raise ConfigError(
                f"cannot load TLS certificate {certfile} with key {keyfile}: {reason}"
            ) from None
    if not state_dir.exists():
        try:
            state_dir.mkdir(mode=0o700)
        except OSError as e:
            raise ConfigError(f"cannot create state directory {state_dir}: {e.strerror or e}") from None
    key = load_or_create_key(state_dir)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("tailpy.derp")

    async def run() -> None:
        server = DerpServer(key)
        try:
            await server.start(host, port, ctx)
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen}: {e.strerror or e}") from None
        scheme = "https" if ctx else "http"
        where = ", ".join(
            f"{scheme}://{h if ':' not in h else f'[{h}]'}:{p}/derp" for h, p in server.addresses
        )
        log.info("DERP relay listening on %s (key %s)", where, key.public.text())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await server.stop()

    asyncio.run(run())
