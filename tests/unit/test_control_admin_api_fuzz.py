"""Schemathesis runs the admin API's OpenAPI document against a real control server with a valid API key:
no request, valid or not, gets a 5xx; each answer's status is one the document declares, with the
content type and (for 2xx) the shape it declares. Derandomized and with a bounded number of examples per
operation, so the run is the same each time and short."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the dev extra)")

from _admin_api import ThreadedControl, threaded_control  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import Case  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tailpy.control.adminapi import openapi_document  # noqa: E402
from tailpy.control.apikeys import check_api_key, create_api_key  # noqa: E402

EXAMPLES = 12
"""Examples per operation (about 30 operations; the whole run stays well under a minute)."""

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedControl]:
    state: Path = tmp_path_factory.mktemp("control")
    with threaded_control(state) as c:
        c.add_node("alpha", routes=("198.51.100.0/24",))
        c.add_node("beta")
        yield c


def _live_key(control: ThreadedControl) -> str:
    """The fuzzing key, replaced when the fuzzer expired it (``POST /apikeys/{id}/expire`` is fair game)."""
    if control.on_loop(lambda: check_api_key(control.db, control.key)) is None:
        control.key = control.on_loop(lambda: create_api_key(control.db, expiration_seconds=3600))[1]
    return control.key


@schema.parametrize()  # type: ignore[untyped-decorator]
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_admin_api_has_no_server_errors(case: Case[Any], control: ThreadedControl) -> None:
    case.call_and_validate(
        base_url=control.url,
        headers={"Authorization": f"Bearer {_live_key(control)}"},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            unsupported_method,  # (a 405 with Allow for a method the document does not list)
        ],
        timeout=30,
    )
