"""Schemathesis over the whole OpenAPI spec of the running service (real HTTP, real Redis and Triton):
no 5xx, and every response matches the spec.

Driven through the library API rather than schemathesis' pytest plugin, whose fixture loader does not
support pytest 9."""

import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import response_schema_conformance

pytestmark = pytest.mark.integration


def test_no_server_errors_and_responses_match_the_spec(app_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{app_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {
        "/v1/recommendations/{user_id}",
        "/v1/events",
        "/v1/segments/{segment}/recommendations",
    }
    statuses: list[int] = []
    cases = [(op, mode) for op in operations for mode in schemathesis.GenerationMode]
    for operation, mode in cases:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(max_examples=30, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
        def exercise(case: schemathesis.Case) -> None:
            response = case.call(timeout=10)
            statuses.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text}"
            case.validate_response(response, checks=[response_schema_conformance])

        try:
            exercise()
        except hypothesis.errors.Unsatisfiable:
            # Operations without parameters or body (healthz, metrics) have no invalid input to make.
            if mode is not schemathesis.GenerationMode.NEGATIVE:
                raise
    # The run really exercised the API, valid and invalid inputs alike.
    assert len(statuses) >= 2 * len(cases)
    assert any(200 <= s < 300 for s in statuses) and any(s == 422 for s in statuses)
