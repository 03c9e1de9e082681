"""Reading a Prometheus text exposition in tests, with prometheus-client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted (label, value) pairs) -> value."""


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, samples) of the exposition ``text``."""
    types: dict[str, str] = {}
    found: Samples = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, found


def samples(text: str) -> Samples:
    """The samples of the exposition ``text``."""
    return parse(text)[1]


def value(found: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0.0 when absent)."""
    return found.get((name, tuple(sorted(labels.items()))), 0.0)
