"""Schemathesis against a real `chiffon orchestrator` with its API token: whatever it sends,
the API answers without a 5xx and as its OpenAPI document says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from tests.auth import API_HEADERS
from tests.procs import orchestrator_process

CHECKS = [schemathesis.checks.not_a_server_error, response_schema_conformance,
          content_type_conformance]  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    with orchestrator_process(data_dir) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_no_5xx_and_every_answer_matches_the_schema(api_schema: schemathesis.BaseSchema) -> None:
    """Every operation, 25 generated requests each (schemathesis' pytest plugin does not run
    under this pytest, so operations are driven through their Hypothesis strategies)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call_and_validate(headers=API_HEADERS, checks=CHECKS)
            statuses.append(response.status_code)

        fuzz()
    # It did talk to the API, and got past auth and validation often enough to matter.
    assert len(statuses) > 5 * len(operations)
    assert statuses.count(200) > 2 * len(operations), sorted(set(statuses))
