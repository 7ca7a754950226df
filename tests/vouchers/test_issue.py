"""Issuing through the HTTP API: one request carries at most API_MAX_QUANTITY codes (its
answer holds every plaintext code); bigger batches stay possible through the CLI/service."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from popdrop.vouchers.schemas import (
    API_MAX_QUANTITY,
    MAX_QUANTITY,
    BatchCreate,
    BatchIssueRequest,
)
from tests.conftest import Tenant

ISSUE = "/api/v1/voucher-batches"


async def advertised_quantity(client: httpx.AsyncClient) -> dict[str, object]:
    """The `quantity` property of the issue body, as the OpenAPI spec gives it."""
    spec = (await client.get("/api/openapi.json")).json()
    body = spec["paths"][ISSUE]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    quantity: dict[str, object] = spec["components"]["schemas"][name]["properties"]["quantity"]
    return quantity


@pytest.mark.parametrize("quantity", [API_MAX_QUANTITY + 1, MAX_QUANTITY, MAX_QUANTITY + 1])
async def test_the_api_refuses_more_codes_than_one_answer_carries(
    app_client: httpx.AsyncClient, tenant: Tenant, quantity: int
) -> None:
    # Checked first: without the cap, this test would issue up to a million codes.
    assert (await advertised_quantity(app_client))["maximum"] == API_MAX_QUANTITY
    response = await app_client.post(
        ISSUE, json={"name": "too big", "quantity": quantity}, headers=tenant.headers
    )
    assert response.status_code == 422
    body = response.json()
    assert body["reason"] == "invalid_request"
    assert body["errors"][0]["loc"] == ["body", "quantity"]
    assert f"at most {API_MAX_QUANTITY:,} codes" in body["message"]
    assert "popdrop vouchers issue" in body["message"]  # where bigger batches go
    listed = await app_client.get(ISSUE, headers=tenant.headers)
    assert listed.json() == []  # refused before anything was written


async def test_the_cap_is_in_the_openapi_spec(app_client: httpx.AsyncClient) -> None:
    quantity = await advertised_quantity(app_client)
    assert (quantity["minimum"], quantity["maximum"]) == (1, API_MAX_QUANTITY)


def test_the_cap_is_the_apis_alone() -> None:
    assert BatchIssueRequest(name="api", quantity=API_MAX_QUANTITY).quantity == API_MAX_QUANTITY
    # The service and `popdrop vouchers issue` build a BatchCreate: up to MAX_QUANTITY.
    assert BatchCreate(name="bulk", quantity=MAX_QUANTITY).quantity == MAX_QUANTITY
    with pytest.raises(ValidationError):
        BatchCreate(name="bulk", quantity=MAX_QUANTITY + 1)


@pytest.mark.parametrize(
    ("field", "when"),
    [("valid_from", "0001-01-01T00:30:00+01:00"), ("valid_until", "9999-12-31T23:30:00-01:00")],
)
async def test_a_window_past_the_calendar_in_utc_is_refused(
    app_client: httpx.AsyncClient, tenant: Tenant, field: str, when: str
) -> None:
    # A fuzzing find: valid in its own offset, out of datetime's range once in UTC
    # (how it is stored), which was a 500.
    response = await app_client.post(
        ISSUE, json={"name": "edge", "quantity": 1, field: when}, headers=tenant.headers
    )
    assert response.status_code == 422
    assert response.json()["reason"] == "invalid_request"
    assert f"{field} is out of range" in response.json()["message"]
