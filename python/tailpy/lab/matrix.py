"""The NAT matrix: pairs of lab topologies and whether two nodes behind them can go direct (RFC 4787 mapping
and filtering behaviours; double NAT and carrier-grade NAT as in RFC 6888). One list for
``tests/integration/test_nat_matrix.py`` (which checks each outcome) and ``benchmarks/connect_time.py`` (which
times each cell), so the two never drift apart."""

from __future__ import annotations

from dataclasses import dataclass

from tailpy.lab.tailnet import Behind


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: nodes ``a`` and ``b`` behind these topologies (``LabTailnet.add_node``'s
    ``behind=`` values), or both on one site LAN (``same_lan``); ``direct`` is the expected outcome."""

    id: str
    a: Behind
    b: Behind
    direct: bool
    same_lan: bool = False


CELLS = [
    Cell("same-lan", "eim", "eim", direct=True, same_lan=True),
    Cell("eim-eim", "eim", "eim", direct=True),
    Cell("eim-public", "eim", "public", direct=True),
    Cell("double-eim-eim", "double-eim", "eim", direct=True),  # double NAT, both layers endpoint-independent
    Cell("eim-full-cone", "eim", "full-cone", direct=True),
    Cell("firewall-firewall", "firewall", "firewall", direct=True),  # simultaneous open, no NAT
    Cell("edm-public", "edm", "public", direct=True),  # direct once the EDM side sends first
    Cell("public-edm", "public", "edm", direct=True),  # the public side asks: CallMeMaybe makes EDM send
    Cell("edm-edm", "edm", "edm", direct=False),
    Cell("edm-eim", "edm", "eim", direct=False),
    Cell(
        "cgnat-edm-eim", ("edm", "eim"), "eim", direct=False
    ),  # carrier-grade NAT: one endpoint-dependent layer
]

__all__ = ["CELLS", "Cell"]
