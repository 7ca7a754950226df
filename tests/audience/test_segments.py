"""Segments: recency buckets exact to the second, the hot/warm/cold partition (property
tests), tag/interest/locale/distance/attendance rules, channels, tenancy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, insert, select

from popdrop.audience.models import Contact
from popdrop.audience.settings import bucket_condition, bucket_of
from popdrop.core.clock import FrozenClock
from popdrop.web.context import AppContext
from tests.audience.helpers import add_contact, preview
from tests.conftest import Tenant, make_tenant
from tests.events.helpers import post

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)


async def _engaged(
    client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock, email: str, at: datetime | None
) -> dict[str, Any]:
    contact = await add_contact(client, tenant, email=email)
    if at is not None:
        clock.set(at)
        response = await client.post(
            "/api/v1/contacts/activity",
            json={"kind": "click", "contact_id": contact["id"]},
            headers=tenant.headers,
        )
        assert response.json()["recorded"] is True
    return contact


async def test_bucket_boundaries_are_exact_to_the_second(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    cases = {
        "now@x.io": T0,
        "seven-days@x.io": T0 - 7 * DAY,  # exactly 7 days: still hot (≤ 7 d)
        "seven-days-one-second@x.io": T0 - 7 * DAY - SECOND,  # warm
        "sixty-days@x.io": T0 - 60 * DAY,  # exactly 60 days: still warm
        "sixty-days-one-second@x.io": T0 - 60 * DAY - SECOND,  # cold
        "never@x.io": None,
    }
    for email, at in cases.items():
        await _engaged(app_client, tenant, clock, email, at)
    clock.set(T0)

    counts = await preview(app_client, tenant, channels=["email"])
    assert counts["by_bucket"] == {"hot": 2, "warm": 2, "cold": 1, "never": 1}
    for bucket, expected in (("hot", 2), ("warm", 2), ("cold", 1), ("never", 1)):
        assert (await preview(app_client, tenant, recency=[bucket]))["total"] == expected

    # One second later every boundary contact moves on.
    clock.set(T0 + SECOND)
    counts = await preview(app_client, tenant, channels=["email"])
    assert counts["by_bucket"] == {"hot": 1, "warm": 2, "cold": 2, "never": 1}
    listed = await app_client.get("/api/v1/contacts?q=seven-days@", headers=tenant.headers)
    assert [c["bucket"] for c in listed.json()["items"]] == ["warm"]


async def test_bucket_boundaries_follow_the_organizations_settings(
    app_client: httpx.AsyncClient, tenant: Tenant, clock: FrozenClock
) -> None:
    await _engaged(app_client, tenant, clock, "a@x.io", T0 - 3 * DAY)
    clock.set(T0)
    assert (await preview(app_client, tenant))["by_bucket"]["hot"] == 1
    response = await app_client.put(
        "/api/v1/audience/settings",
        json={"hot_days": 2, "warm_days": 30},
        headers=tenant.headers,
    )
    assert response.status_code == 200
    assert (await preview(app_client, tenant))["by_bucket"]["warm"] == 1
    bad = await app_client.put(
        "/api/v1/audience/settings", json={"hot_days": 30, "warm_days": 30}, headers=tenant.headers
    )
    assert bad.status_code == 422 and bad.json()["reason"] == "invalid_request"


@settings(max_examples=300, deadline=None)
@given(
    age_seconds=st.integers(min_value=0, max_value=400 * 86400),
    hot=st.integers(min_value=1, max_value=60),
    extra=st.integers(min_value=1, max_value=300),
)
def test_buckets_partition_engaged_contacts(age_seconds: int, hot: int, extra: int) -> None:
    warm = hot + extra
    now = T0
    last = now - timedelta(seconds=age_seconds)
    bucket = bucket_of(last, now, hot, warm)
    assert bucket in ("hot", "warm", "cold")
    assert (bucket == "hot") == (age_seconds <= hot * 86400)
    assert (bucket == "cold") == (age_seconds > warm * 86400)


@settings(max_examples=40, deadline=None)
@given(
    ages=st.lists(
        st.one_of(st.none(), st.integers(min_value=-86400, max_value=200 * 86400)),
        min_size=1,
        max_size=40,
    ),
    hot=st.integers(min_value=1, max_value=30),
    extra=st.integers(min_value=1, max_value=120),
)
def test_sql_buckets_partition_and_agree_with_bucket_of(
    ages: list[int | None], hot: int, extra: int
) -> None:
    """The SQL conditions the segments use put every engaged contact in exactly one of
    hot/warm/cold, the same one `bucket_of` names; never-engaged ones in none of them."""
    warm = hot + extra
    engine = create_engine("sqlite://")
    Contact.__table__.create(engine)  # type: ignore[attr-defined]
    rows = [
        {
            "org_id": 1,
            "consent_email": "granted",
            "consent_sms": "none",
            "consent_chat": "none",
            "frequency": "all",
            "created_at": T0,
            "updated_at": T0,
            "last_engaged_at": None if age is None else T0 - timedelta(seconds=age),
        }
        for age in ages
    ]
    with engine.begin() as conn:
        conn.execute(insert(Contact), rows)
        members: dict[str, set[int]] = {}
        for bucket in ("hot", "warm", "cold"):
            condition = bucket_condition(bucket, T0, hot, warm)  # type: ignore[arg-type]
            members[bucket] = set(conn.scalars(select(Contact.id).where(condition)).all())
        engaged = {
            row.id: row.last_engaged_at
            for row in conn.execute(
                select(Contact.id, Contact.last_engaged_at).where(
                    Contact.last_engaged_at.is_not(None)
                )
            )
        }
        total = conn.scalar(select(func.count()).select_from(Contact))
    assert total == len(ages)
    assert members["hot"] | members["warm"] | members["cold"] == set(engaged)
    assert not (members["hot"] & members["warm"])
    assert not (members["warm"] & members["cold"])
    assert not (members["hot"] & members["cold"])
    for contact_id, last in engaged.items():
        expected = bucket_of(last.replace(tzinfo=UTC), T0, hot, warm)
        assert contact_id in members[expected]


async def test_tags_interests_locales_and_channels(
    app_client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await add_contact(
        app_client,
        tenant,
        email="vip@x.io",
        tags=["VIP", "press"],
        interests=["sneakers"],
        locale="fr-FR",
    )
    await add_contact(app_client, tenant, email="fan@x.io", tags=["fan"], locale="de")
    await add_contact(
        app_client, tenant, phone="+4915112345678", tags=["vip"], locale="de-DE", consents=("sms",)
    )
    await add_contact(app_client, tenant, email="quiet@x.io", tags=["vip"], consents=())

    async def total(**rules: Any) -> int:
        return int((await preview(app_client, tenant, **rules))["total"])

    assert await total() == 3  # quiet@ has no consent: never in a segment
    assert await total(tags_any=["vip"]) == 2
    assert await total(tags_any=["vip"], channels=["email"]) == 1
    assert await total(tags_all=["vip", "press"]) == 1
    assert await total(tags_none=["vip"]) == 1
    assert await total(interests_any=["Sneakers"]) == 1
    assert await total(locales=["de"]) == 2  # "de" matches de and de-DE
    assert await total(locales=["fr-fr"]) == 1
    counts = await preview(app_client, tenant, channels=["email", "sms"])
    assert counts["by_channel"] == {"email": 2, "sms": 1}


async def test_near_the_venue_and_attended(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    now = ctx.clock.now()
    event = await post(
        app_client,
        tenant,
        "/api/v1/events",
        {
            "slug": "depot",
            "title": "Depot",
            "timezone": "Europe/Berlin",
            "venue_name": "Old Tram Depot",
            "latitude": 52.5200,
            "longitude": 13.4050,
            "starts_at": (now - timedelta(days=3)).isoformat(),
            "ends_at": (now - timedelta(days=2)).isoformat(),
        },
    )
    near = await add_contact(app_client, tenant, email="near@x.io", lat=52.55, lon=13.40)
    await add_contact(app_client, tenant, email="far@x.io", lat=48.14, lon=11.58)  # Munich
    await add_contact(app_client, tenant, email="nowhere@x.io")
    rule = {"event_id": event["id"], "km": 10}
    assert (await preview(app_client, tenant, near=rule))["total"] == 1
    assert (await preview(app_client, tenant, near={**rule, "km": 600}))["total"] == 2

    assert (await preview(app_client, tenant, attended={}))["total"] == 0
    response = await app_client.post(
        "/api/v1/contacts/activity",
        json={"kind": "visit", "contact_id": near["id"], "event_id": event["id"]},
        headers=tenant.headers,
    )
    assert response.status_code == 200
    assert (await preview(app_client, tenant, attended={}))["total"] == 1
    assert (await preview(app_client, tenant, attended={"event_ids": [event["id"]]}))["total"] == 1
    assert (await preview(app_client, tenant, attended={"event_ids": [event["id"] + 999]}))[
        "total"
    ] == 0


async def test_saved_segments_and_tenancy(
    app_client: httpx.AsyncClient, tenant: Tenant, ctx: AppContext
) -> None:
    await add_contact(app_client, tenant, email="vip@x.io", tags=["vip"])
    created = await app_client.post(
        "/api/v1/segments",
        json={"name": "VIPs", "rules": {"tags_any": ["vip"], "recency": ["never", "hot"]}},
        headers=tenant.headers,
    )
    assert created.status_code == 201, created.text
    segment_id = created.json()["id"]
    count = await app_client.get(f"/api/v1/segments/{segment_id}/count", headers=tenant.headers)
    assert count.json()["total"] == 1
    duplicate = await app_client.post(
        "/api/v1/segments", json={"name": "VIPs", "rules": {}}, headers=tenant.headers
    )
    assert duplicate.status_code == 409

    other = await make_tenant(ctx)
    for method, url in (
        ("GET", f"/api/v1/segments/{segment_id}"),
        ("GET", f"/api/v1/segments/{segment_id}/count"),
        ("DELETE", f"/api/v1/segments/{segment_id}"),
    ):
        response = await app_client.request(method, url, headers=other.headers)
        assert response.status_code == 404, (method, url)
    assert (await preview(app_client, other))["total"] == 0
    listed = await app_client.get("/api/v1/contacts", headers=other.headers)
    assert listed.json()["items"] == []


@pytest.mark.parametrize(
    "rules",
    [
        {"channels": []},
        {"channels": ["fax"]},
        {"recency": ["lukewarm"]},
        {"near": {"event_id": 1, "km": -1}},
        {"unknown": 1},
    ],
)
async def test_bad_rules_are_refused(
    app_client: httpx.AsyncClient, tenant: Tenant, rules: dict[str, Any]
) -> None:
    response = await app_client.post("/api/v1/segments/preview", json=rules, headers=tenant.headers)
    assert response.status_code == 422 and response.json()["reason"] == "invalid_request"
