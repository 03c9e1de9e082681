"""`tailpy metrics`: tailpyd's Prometheus metrics, as ``tailscale metrics print`` prints them."""

from __future__ import annotations

import json

import click
from prometheus_client.parser import text_string_to_metric_families

from tailpy.cli.common import json_option, local, run, socket_option
from tailpy.errors import ParseError


def samples_json(text: str) -> list[dict[str, object]]:
    """The samples of a Prometheus text exposition as ``[{"name", "type", "help", "labels", "value"}]``
    (``name`` the sample's, ``_total`` included; ``type`` and ``help`` its family's). Raises ParseError."""
    try:
        return [
            {
                "name": s.name,
                "type": fam.type,
                "help": fam.documentation,
                "labels": s.labels,
                "value": s.value,
            }
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        ]
    except ValueError as e:
        raise ParseError(f"tailpyd's metrics are not in the Prometheus text format: {e}") from None


@click.command("metrics")
@json_option
@socket_option
def command(as_json: bool, socket_path: str) -> None:
    """Print this node's metrics in the Prometheus text format (what tailpyd serves at GET /metrics on its
    socket, and on `tailpyd --metrics-listen`): per-peer bytes, path and handshake age, DERP, disco, drops.
    --json prints the samples as a JSON list for scripts."""
    text = run(local(socket_path).metrics())
    if as_json:
        click.echo(json.dumps(samples_json(text), indent=2))
    else:
        click.echo(text, nl=False)
