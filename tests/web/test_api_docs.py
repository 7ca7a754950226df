"""The API as a third-party client meets it (issue 15): an OpenAPI document that
`openapi-spec-validator` accepts, with a bearer security scheme on every route that
takes a token; the drop preview's `contact_id` in the query; `/favicon.ico`; and
`/api/docs` (in a real browser: test_api_docs_browser.py)."""

from __future__ import annotations

import re

import httpx
from openapi_spec_validator import validate

from tests.audience.helpers import add_contact
from tests.conftest import Tenant
from tests.drops.helpers import drop_spec


async def test_the_openapi_document_is_valid_and_declares_the_bearer_scheme(
    app_client: httpx.AsyncClient,
) -> None:
    spec = (await app_client.get("/api/openapi.json")).json()
    validate(spec)  # raises on an invalid document
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    redeem = spec["paths"]["/api/v1/vouchers/redeem"]["post"]
    assert redeem["security"] == [{"bearer": []}]
    me = spec["paths"]["/api/v1/me"]["get"]
    assert me["security"] == [{"bearer": []}]
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            params = operation.get("parameters", [])
            in_path = {p["name"] for p in params if p["in"] == "path"}
            assert in_path == set(_placeholders(path)), (path, in_path)


def _placeholders(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)  # also inside a segment: /qr.{fmt}


async def test_the_drop_preview_takes_contact_id_from_the_query(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    contact = await add_contact(app_client, tenant, email="ana@example.com", first_name="Ana")
    body = drop_spec().model_dump(mode="json", exclude_none=True)
    created = await app_client.post("/api/v1/drops", json=body, headers=tenant.headers)
    assert created.status_code == 201, created.text
    url = f"/api/v1/drops/{created.json()['id']}/preview?contact_id={contact['id']}"
    preview = await app_client.get(url, headers=tenant.headers)
    assert preview.status_code == 200, preview.text
    assert preview.json()["email"]["subject"] == "Hi Ana, the drop is on"
    spec = (await app_client.get("/api/openapi.json")).json()
    params = spec["paths"]["/api/v1/drops/{drop_id}/preview"]["get"]["parameters"]
    assert {"name": "contact_id", "in": "query"}.items() <= next(
        p for p in params if p["name"] == "contact_id"
    ).items()


async def test_the_favicon_answers(app_client: httpx.AsyncClient) -> None:
    icon = await app_client.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO header
