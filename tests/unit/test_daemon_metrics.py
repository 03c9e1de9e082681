"""tailpyd's metrics (:mod:`tailpy.daemon.metrics`): the exposition parses with prometheus-client's parser,
its values are the status's (per-peer bytes, path, handshake age, DERP, disco, drops, the packet filter),
the local API serves it at /metrics, and `tailpy metrics` prints it (or one sentence without a daemon)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
from pathlib import Path

import aiohttp
from click.testing import CliRunner
from prometheus_client import generate_latest
from test_ipnstate import DERP_JSON, TRAVERSAL_JSON, backend

from _metrics import parse
from tailpy.cli.main import cli
from tailpy.cli.metrics import samples_json
from tailpy.daemon.api import make_app, serve
from tailpy.daemon.metrics import node_registry
from tailpy.ipnstate import DerpStatus, Status, TraversalStatus


def with_parts(st: Status) -> Status:
    """``st`` with a DERP connection, disco counters and a device with drops and a packet filter."""
    device = {
        "rx_datagrams": 40,
        "tx_datagrams": 12,
        "handshakes_sent": 3,
        "dropped_decrypt": 2,
        "dropped_no_route": 1,
        "filter": {"rules": 4, "dropped_no_rule": 5, "dropped_not_a_reply": 0, "udp_flows": 9},
        "offload": {"fallbacks": []},
    }
    disco = {**TRAVERSAL_JSON["disco"], "sent_udp": 7, "sent_derp": 2, "unknown_txid": 1}  # type: ignore[dict-item]
    return dataclasses.replace(
        st,
        derp=DerpStatus.from_json(DERP_JSON),
        traversal=TraversalStatus.from_json({**TRAVERSAL_JSON, "disco": disco}),
        device=device,
        now=1010.5,
    )


async def test_node_metrics_are_the_status(tmp_path: Path) -> None:
    b = await backend(tmp_path)
    st = with_parts(b.status())
    types, samples = parse(generate_latest(node_registry(lambda: st)).decode())
    assert types["tailpy_node_peer_sent_bytes"] == "counter"  # (the parser drops _total)
    assert types["tailpy_node_peer_received_bytes"] == "counter"
    assert types["tailpy_node_peer_path"] == "gauge"
    assert types["tailpy_node_peer_handshake_age_seconds"] == "gauge"
    assert types["tailpy_node_derp_connections"] == "gauge"
    assert types["tailpy_node_disco_received"] == "counter"
    assert types["tailpy_node_dropped_packets"] == "counter"
    assert types["tailpy_node_filter_dropped_packets"] == "counter"
    relayed, unanswered, _ = st.peers
    r, u = relayed.name, unanswered.name
    assert samples[("tailpy_node_peer_sent_bytes_total", (("peer", r),))] == relayed.tx_bytes == 10
    assert samples[("tailpy_node_peer_received_bytes_total", (("peer", r),))] == 20
    assert samples[("tailpy_node_peer_path", (("path", "relay"), ("peer", r)))] == 1
    assert samples[("tailpy_node_peer_path", (("path", "direct"), ("peer", r)))] == 0
    assert samples[("tailpy_node_peer_path", (("path", "relay"), ("peer", u)))] == 0  # no path yet
    assert samples[("tailpy_node_peer_handshake_age_seconds", (("peer", r),))] == 10.0
    assert ("tailpy_node_peer_handshake_age_seconds", (("peer", u),)) not in samples
    assert samples[("tailpy_node_peers", ())] == 3
    assert samples[("tailpy_node_state", (("state", "Running"),))] == 1
    assert samples[("tailpy_node_state", (("state", "NeedsLogin"),))] == 0
    assert samples[("tailpy_node_derp_home_region", ())] == 900
    assert samples[("tailpy_node_derp_connections", ())] == 1
    assert samples[("tailpy_node_derp_sent_packets_total", ())] == 5
    assert samples[("tailpy_node_disco_received_total", (("type", "ping"),))] == 1
    assert samples[("tailpy_node_disco_received_total", (("type", "pong"),))] == 1
    assert samples[("tailpy_node_disco_sent_total", (("via", "udp"),))] == 7
    assert samples[("tailpy_node_disco_dropped_total", (("reason", "unknown_txid"),))] == 1
    assert samples[("tailpy_node_dropped_packets_total", (("reason", "decrypt"),))] == 2
    assert samples[("tailpy_node_filter_dropped_packets_total", (("reason", "no_rule"),))] == 5
    assert samples[("tailpy_node_filter_rules", ())] == 4
    assert samples[("tailpy_node_udp_received_datagrams_total", ())] == 40
    await b.close()


async def test_local_api_serves_metrics_and_the_cli_prints_them(tmp_path: Path) -> None:
    b = await backend(tmp_path)
    sock = str(tmp_path / "api.sock")
    runner = await serve(make_app(b), sock)
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http,
            http.get("http://local/metrics") as r,
        ):
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            _, samples = parse(await r.text())
        assert samples[("tailpy_node_peers", ())] == 3
        from tailpy.daemon.client import LocalClient

        text = await LocalClient(sock).metrics()
        assert "tailpy_node_peer_sent_bytes_total" in text
        rows = samples_json(text)
        assert {"name": "tailpy_node_peers", "type": "gauge"}.items() <= next(
            row for row in rows if row["name"] == "tailpy_node_peers"
        ).items()
        assert json.loads(json.dumps(rows)) == rows
    finally:
        await runner.cleanup()
        await b.close()


def test_metrics_without_a_daemon_is_one_sentence(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["metrics", "--socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("tailpy: tailpyd is not running")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_metrics_from_a_socket_answering_garbage_is_one_sentence(tmp_path: Path) -> None:
    """Something other than tailpyd on the socket (a line that is not HTTP): one sentence, no traceback."""
    path = str(tmp_path / "other.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def answer() -> None:
        with contextlib.suppress(OSError):  # (one connection: the command's one request)
            c, _ = srv.accept()
            with c:
                c.recv(4096)
                c.sendall(b"SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        result = CliRunner().invoke(cli, ["metrics", "--socket", path])
        t.join(10)
    finally:
        srv.close()
    assert result.exit_code == 1
    assert result.output.strip().startswith(f"tailpy: what answers on {path} is not tailpyd")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
