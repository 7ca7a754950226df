"""Building blocks for audience tests: contacts through the API, segment counts."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Tenant

WORDING = "Yes, send me drop news and offers by email and SMS."


async def add_contact(
    client: httpx.AsyncClient,
    tenant: Tenant,
    *,
    email: str | None = None,
    phone: str | None = None,
    consents: tuple[str, ...] = ("email", "sms"),
    **fields: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"email": email, "phone": phone, **fields}
    body["consents"] = [
        {"channel": ch, "wording": WORDING, "source": "form", "proof": "signup form"}
        for ch in consents
        if (ch == "email" and email) or (ch == "sms" and phone)
    ]
    response = await client.post("/api/v1/contacts", json=body, headers=tenant.headers)
    assert response.status_code in (200, 201), response.text
    contact: dict[str, Any] = response.json()["contact"]
    return contact


async def preview(client: httpx.AsyncClient, tenant: Tenant, **rules: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/segments/preview", json=rules, headers=tenant.headers)
    assert response.status_code == 200, response.text
    counts: dict[str, Any] = response.json()
    return counts


async def inbound(
    client: httpx.AsyncClient, tenant: Tenant, sender: str, text: str, channel: str = "sms"
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/audience/inbound",
        json={"channel": channel, "sender": sender, "text": text},
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
