"""A token of one organization never reads or changes another's audience."""

from __future__ import annotations

import httpx
from fastapi.routing import APIRoute

from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, inbound, preview
from tests.conftest import Tenant, make_tenant

PHONE = "+33611223344"


async def test_every_id_addressed_audience_route_answers_404_across_tenants(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    intruder = await make_tenant(ctx)
    contact = await add_contact(app_client, tenant, email="own@x.io", phone=PHONE, tags=["vip"])
    segment = await app_client.post(
        "/api/v1/segments",
        json={"name": "VIP", "rules": {"tags_any": ["vip"]}},
        headers=tenant.headers,
    )
    job = await app_client.post(
        "/api/v1/contact-imports",
        content=b"email\nsomeone@x.io\n",
        headers={**tenant.headers, "Content-Type": "text/csv"},
    )
    assert job.status_code == 202, job.text
    cid, sid, jid = contact["id"], segment.json()["id"], job.json()["id"]
    attempts: dict[tuple[str, str], tuple[str, object]] = {
        ("GET", "/api/v1/contacts/{contact_id}"): (f"/api/v1/contacts/{cid}", None),
        ("PATCH", "/api/v1/contacts/{contact_id}"): (
            f"/api/v1/contacts/{cid}",
            {"add_tags": ["stolen"]},
        ),
        ("POST", "/api/v1/contacts/{contact_id}/consents"): (
            f"/api/v1/contacts/{cid}/consents",
            {"channel": "email", "action": "revoke"},
        ),
        ("GET", "/api/v1/contacts/{contact_id}/consents"): (
            f"/api/v1/contacts/{cid}/consents",
            None,
        ),
        ("GET", "/api/v1/contacts/{contact_id}/export"): (f"/api/v1/contacts/{cid}/export", None),
        ("POST", "/api/v1/contacts/{contact_id}/erase"): (f"/api/v1/contacts/{cid}/erase", None),
        ("GET", "/api/v1/segments/{segment_id}"): (f"/api/v1/segments/{sid}", None),
        ("PUT", "/api/v1/segments/{segment_id}"): (
            f"/api/v1/segments/{sid}",
            {"name": "mine", "rules": {}},
        ),
        ("DELETE", "/api/v1/segments/{segment_id}"): (f"/api/v1/segments/{sid}", None),
        ("GET", "/api/v1/contact-imports/{job_id}"): (f"/api/v1/contact-imports/{jid}", None),
        ("GET", "/api/v1/segments/{segment_id}/count"): (f"/api/v1/segments/{sid}/count", None),
        ("GET", "/api/v1/segments/{segment_id}/export.csv"): (
            f"/api/v1/segments/{sid}/export.csv",
            None,
        ),
    }
    for (method, _template), (url, body) in attempts.items():
        response = await app_client.request(method, url, json=body, headers=intruder.headers)
        assert response.status_code == 404, (method, url, response.text)

    # Activity by id, and a STOP from the owner's contact's number, stay in their own org.
    activity = await app_client.post(
        "/api/v1/contacts/activity",
        json={"kind": "click", "contact_id": cid},
        headers=intruder.headers,
    )
    assert activity.status_code == 404
    assert (await inbound(app_client, intruder, PHONE, "STOP"))["contact_id"] is None
    assert (await preview(app_client, tenant, channels=["sms"]))["total"] == 1
    got = await app_client.get(f"/api/v1/contacts/{cid}", headers=tenant.headers)
    assert got.json()["tags"] == ["vip"] and got.json()["erased_at"] is None

    app = app_client._transport.app  # type: ignore[attr-defined]
    id_routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute) and "audience" in (route.tags or []) and "{" in route.path
        for method in route.methods
    }
    assert id_routes <= set(attempts), id_routes - set(attempts)


async def test_volunteer_and_partner_tokens_cannot_touch_the_audience(
    app_client: httpx.AsyncClient, ctx: AppContext
) -> None:
    # A volunteer's scope, and `reports:read`: partner tokens made before that scope was
    # retired still carry it, and it opens nothing.
    for scopes in ({"checkin"}, {"reports:read"}):
        other = await make_tenant(ctx, scopes=frozenset(scopes))
        for method, url, body in (
            ("GET", "/api/v1/contacts", None),
            ("POST", "/api/v1/contacts", {"email": "x@x.io"}),
            ("POST", "/api/v1/segments/preview", {}),
            ("POST", "/api/v1/audience/inbound", {"channel": "sms", "sender": PHONE, "text": "hi"}),
        ):
            response = await app_client.request(method, url, json=body, headers=other.headers)
            assert (response.status_code, response.json()["reason"]) == (403, "forbidden"), url
