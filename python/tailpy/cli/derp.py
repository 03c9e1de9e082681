"""`tailpy derp`: run a DERP relay (Tailscale's DERP protocol v2; see :mod:`tailpy.derp.server`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

import click

from tailpy.endpoint import Endpoint
from tailpy.errors import ConfigError
from tailpy.httpguard import install_log_guards
from tailpy.rlimits import raise_nofile_limit


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
@click.option(
    "--verify-clients",
    is_flag=True,
    help="Admit only node keys the control server (--control-url) knows and has not expired.",
)
@click.option(
    "--control-url", help="The tailpy control server asked by --verify-clients (http(s)://host:port)."
)
@click.option(
    "--verify-client-url",
    help="Admission controller URL (Tailscale's derper -verify-client-url protocol); fails closed.",
)
@click.option("--stun/--no-stun", default=True, show_default=True, help="Run the STUN server.")
@click.option(
    "--stun-port",
    default=3478,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="UDP port of the STUN server, on --listen's host (0 picks one).",
)
@click.option(
    "--mesh-with",
    default="",
    help="Comma-separated DERP servers of this region to mesh with (HOST[:PORT] or URL; this server's own "
    "address may be listed). Needs --mesh-psk-file.",
)
@click.option(
    "--mesh-psk-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of the region's mesh key (64 hex digits, as derper's): servers with it may watch this one's "
    "clients and forward packets to them.",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Also serve GET /metrics (Prometheus) on HOST:PORT to anyone who reaches it (on --listen it is "
    "served to loopback only).",
)
def serve(
    state_dir: Path,
    listen: str,
    certfile: Path | None,
    keyfile: Path | None,
    verify_clients: bool,
    control_url: str | None,
    verify_client_url: str | None,
    stun: bool,
    stun_port: int,
    mesh_with: str,
    mesh_psk_file: Path | None,
    metrics_listen: str | None,
) -> None:
    """Serve DERP at /derp (plus /derp/probe, /derp/latency-check, /generate_204, and from loopback
    /debug/metrics with derper's names and /metrics with tailpy_derp_* ones) until SIGTERM or SIGINT; plain
    HTTP unless --certfile and --keyfile are given. --metrics-listen serves /metrics to anyone there.

    With --verify-clients (and --control-url) or --verify-client-url, each client's node key is checked at
    login (POST {"NodePublic", "Source"} -> {"Allow"}); refused keys, and every key while the check does not
    answer, are closed with a Health frame saying why.

    Unless --no-stun, a STUN Binding server (RFC 8489) answers on UDP --stun-port (3478) of --listen's host
    (every address, IPv4 and IPv6, when that is 0.0.0.0 or empty), as Tailscale's derper does; its counters
    are in /debug/metrics. A STUN port that cannot be bound is logged, and the relay serves without STUN.

    With --mesh-psk-file (and --mesh-with), several relays form one region as Tailscale's derper does: each
    watches the others' clients over a connection that carries the mesh key, and forwards packets for a
    client connected elsewhere to the relay that has it (one hop). Plain HTTP unless --certfile: the peers
    are dialed with the scheme this relay serves."""
    from tailpy.control.options import parse_listen
    from tailpy.derp.mesh import mesh_urls, read_mesh_key, start_mesh
    from tailpy.derp.metrics import StunCollector
    from tailpy.derp.server import DerpServer, load_or_create_key
    from tailpy.derp.stun_server import StunServer
    from tailpy.derp.verify import AdmissionURL, control_admission_url
    from tailpy.metrics import start_metrics_listener

    host, port = parse_listen(listen)
    metrics_at = parse_listen(metrics_listen, "--metrics-listen") if metrics_listen is not None else None
    if verify_clients and verify_client_url:
        raise ConfigError("give --verify-clients (with --control-url) or --verify-client-url, not both")
    if verify_clients and not control_url:
        raise ConfigError("--verify-clients asks the control server: pass --control-url http(s)://host:port")
    if control_url and not verify_clients:
        raise ConfigError("--control-url is used only with --verify-clients")
    admit_url = control_admission_url(control_url) if verify_clients and control_url else verify_client_url
    if control_url and not control_url.startswith(("http://", "https://")):
        raise ConfigError(f"--control-url {control_url!r} must start with http:// or https://")
    if admit_url is not None and not admit_url.startswith(("http://", "https://")):
        raise ConfigError(f"--verify-client-url {admit_url!r} must start with http:// or https://")
    if (certfile is None) != (keyfile is None):
        raise ConfigError(
            "--certfile and --keyfile go together: give both for TLS, or neither for plain HTTP"
        )
    ctx: ssl.SSLContext | None = None
    if certfile is not None and keyfile is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(certfile, keyfile)
        except ssl.SSLError as e:
            raise ConfigError(_tls_load_error(certfile, keyfile, e)) from None
        except OSError as e:
            reason = getattr(e, "strerror", None) or e
            raise ConfigError(
                f"cannot load TLS certificate {certfile} with key {keyfile}: {reason}"
            ) from None
    if not state_dir.exists():
        try:
            state_dir.mkdir(mode=0o700)
        except OSError as e:
            raise ConfigError(f"cannot create state directory {state_dir}: {e.strerror or e}") from None
    mesh_key = read_mesh_key(mesh_psk_file) if mesh_psk_file is not None else None
    peers = mesh_urls(mesh_with, tls=certfile is not None)
    if peers and mesh_key is None:
        raise ConfigError("--mesh-with needs --mesh-psk-file (the region's mesh key)")
    key = load_or_create_key(state_dir)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    install_log_guards()  # one line per record: control characters from requests escaped
    raise_nofile_limit()  # soft open-files limit up to the hard one, as Go programs do
    log = logging.getLogger("tailpy.derp")

    async def run() -> None:
        verifier = AdmissionURL(admit_url) if admit_url is not None else None
        server = DerpServer(key, verify_client=verifier, mesh_key=mesh_key)
        try:
            await server.start(host, port, ctx)
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen}: {e.strerror or e}") from None
        metrics_runner = None
        if metrics_at is not None:
            try:
                metrics_runner = await start_metrics_listener(server.registry, *metrics_at)
            except OSError as e:
                await server.stop()
                raise ConfigError(
                    f"cannot listen on --metrics-listen {metrics_listen}: {e.strerror or e}"
                ) from None
            log.info(
                "metrics at %s",
                ", ".join(f"http://{Endpoint.from_sockaddr(a)}/metrics" for a in metrics_runner.addresses),
            )
        mesh = start_mesh(server.relay, peers, mesh_key) if mesh_key is not None and peers else None
        if mesh is not None:
            server.extra_health["mesh"] = mesh.health
        if mesh_key is not None:
            log.info("DERP mesh key configured; meshing with %s", ", ".join(peers) or "nobody (yet)")
        if admit_url is not None:
            log.info("DERP clients are verified at %s (refused while it does not answer)", admit_url)
        scheme = "https" if ctx else "http"
        where = ", ".join(f"{scheme}://{Endpoint.from_sockaddr(a)}/derp" for a in server.addresses)
        log.info("DERP relay listening on %s (key %s)", where, key.public.text())
        stun_server: StunServer | None = None
        if stun:
            stun_server = StunServer()
            stun_host = None if host in (None, "0.0.0.0") else host
            try:
                await stun_server.start(stun_host, stun_port)
            except OSError as e:  # (the relay serves on, as derper's does)
                stun_server = None
                log.warning(
                    "STUN server cannot listen on UDP %s:%d (%s): no STUN; pass another --stun-port",
                    stun_host or "*",
                    stun_port,
                    e.strerror or e,
                )
            else:
                server.extra_metrics.append(stun_server.metrics.prometheus)
                stun_metrics = stun_server.metrics
                server.registry.register(StunCollector(lambda: stun_metrics))
                log.info(
                    "STUN server listening on %s",
                    ", ".join(f"udp {Endpoint.from_sockaddr(a)}" for a in stun_server.addresses),
                )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if mesh is not None:
            await mesh.stop()
        if stun_server is not None:
            await stun_server.stop()
        await server.stop()
        if verifier is not None:
            await verifier.aclose()

    asyncio.run(run())


def _tls_load_error(certfile: Path, keyfile: Path, exc: ssl.SSLError) -> str:
    """One sentence naming the file ``load_cert_chain`` failed on (OpenSSL's own text does not)."""
    if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        return f"TLS key {keyfile} does not belong to the certificate {certfile}"
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(certfile))
    except (ssl.SSLError, ValueError):
        return f"--certfile {certfile} is not a valid PEM certificate"
    except OSError as e:
        return f"cannot read --certfile {certfile}: {e.strerror or e}"
    return f"--keyfile {keyfile} is not a valid PEM private key (or does not match {certfile})"
