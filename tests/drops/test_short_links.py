"""Drop links as attribution short links: an SMS carries `/s/{slug}/{recipient}` (the
link made before the message leaves, one per variant and destination, the recipient
under a MAC), a link with the recipient's code stays `/r/{token}`, a forged recipient
part counts nothing, bots get no click id, and the preview and the drop page count the
SMS segments with the short links in place."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from popdrop.attribution.models import ShortLink, ShortLinkClick
from popdrop.core.clock import FrozenClock
from popdrop.drops import render, shortlinks
from popdrop.drops.models import SendRow
from popdrop.drops.pipeline import Sender
from popdrop.outbound.transports import OutboundEmail, OutboundSms, SendResult
from popdrop.web.context import AppContext
from tests.attribution.helpers import IPHONE, flushed
from tests.audience.helpers import add_contact
from tests.audience.test_pages import HTML, login
from tests.conftest import Tenant
from tests.drops.helpers import Recorder, drop_spec, started_drop
from tests.events.helpers import make_shop, post

BODY = "Drop on {{ event.url }} - your code: {{ voucher_url }}"


class LinkChecker(Recorder):
    """An SMS provider that, as each message leaves, looks up every short link in it."""

    def __init__(self, ctx: AppContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.missing: list[str] = []

    async def send(self, message: OutboundEmail | OutboundSms) -> SendResult:
        assert isinstance(message, OutboundSms)
        for slug in re.findall(r"/s/([A-Za-z0-9_-]{11})/", message.body):
            async with self.ctx.db.reader() as session:
                if await session.scalar(select(ShortLink.id).where(ShortLink.slug == slug)) is None:
                    self.missing.append(slug)
        return await super().send(message)


def sms_spec(event_id: int, segment_id: int | None = None, **extra: Any) -> Any:
    return drop_spec(
        channels=["sms"],
        event_id=event_id,
        segment_id=segment_id,
        variants=[{"name": "A", "content": {"sms": {"default": {"body": BODY}}}}],
        **extra,
    )


def sender(ctx: AppContext, tenant: Tenant, sms: Recorder) -> Sender:
    return Sender(
        ctx.db, ctx.signer, ctx.clock, ctx.settings.base_url, sms=sms, org_id=tenant.org_id
    )


def base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


async def rows_of(ctx: AppContext, drop_id: int) -> list[SendRow]:
    async with ctx.db.reader() as session:
        found = await session.scalars(
            select(SendRow).where(SendRow.drop_id == drop_id).order_by(SendRow.id)
        )
        return list(found)


async def test_sms_links_are_short_made_before_sending_and_shared_per_destination(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    segment = await post(
        app_client, tenant, "/api/v1/segments", {"name": "Fans", "rules": {"tags_any": ["fan"]}}
    )
    for n in range(3):
        await add_contact(app_client, tenant, phone=f"+3361111111{n}", tags=["fan"])
    drop_id = await started_drop(ctx, tenant, sms_spec(shop.event_id, segment["id"]))
    provider = LinkChecker(ctx)
    await sender(ctx, tenant, provider).run_until_idle()

    assert len(provider.sent) == 3 and provider.missing == []
    event_links: list[str] = []
    for message in provider.sent:
        assert isinstance(message, OutboundSms)
        short, tracked = re.findall(r"http://\S+", message.body)
        event_links.append(short)
        # The voucher link holds the recipient's own code: never a stored short link.
        assert "/r/" in tracked and "/s/" not in tracked
        assert len(short) <= len("http://127.0.0.1:8000") + len("/s/") + 11 + 1 + 12
    slugs = {urlsplit(link).path.split("/")[2] for link in event_links}
    assert len(slugs) == 1 and len(set(event_links)) == 3  # one link, three recipients

    async with ctx.db.reader() as session:
        [link] = list(await session.scalars(select(ShortLink).where(ShortLink.drop_id == drop_id)))
    assert link.slug in slugs
    assert (link.variant, link.segment_id, link.event_id, link.channel) == (
        "A",
        segment["id"],
        shop.event_id,
        "sms",
    )
    assert link.target_url is not None and link.target_url.startswith(
        f"{ctx.settings.base_url}/e/{shop.event_id}?utm_source=popdrop&utm_medium=sms"
    )

    # Sending again (another run, a retried row) reuses the link.
    async with ctx.db.transaction() as session:
        drop = await session.get(shortlinks.Drop, drop_id)
        assert drop is not None
        again = await shortlinks.drop_link(
            session,
            drop,
            variant="A",
            channel="sms",
            destination=link.target_url,
            now=clock.now(),
        )
    assert again.id == link.id

    # A click: the recipient's row is clicked, an attribution click is counted, and the
    # landing page gets its id with the UTM of the message.
    rows = await rows_of(ctx, drop_id)
    clicked = await app_client.get(path_of(event_links[1]), headers={"User-Agent": IPHONE})
    assert clicked.status_code == 302
    location = clicked.headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["utm_medium"] == ["sms"] and len(query["pd_click"]) == 1
    await flushed(ctx)
    async with ctx.db.reader() as session:
        [click] = list(
            await session.scalars(select(ShortLinkClick).where(ShortLinkClick.link_id == link.id))
        )
        assert (click.click_id, click.link_id, click.channel) == (
            query["pd_click"][0],
            link.id,
            "sms",
        )
    after = await rows_of(ctx, drop_id)
    recipient = int(re.sub(r".{6}$", "", urlsplit(event_links[1]).path.split("/")[3]), 36)
    assert [r.id for r in after if r.clicked_at is not None] == [recipient]
    assert recipient in {r.id for r in rows}


async def test_a_forged_recipient_counts_no_click_for_anyone(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    await add_contact(app_client, tenant, phone="+33611111111")
    await add_contact(app_client, tenant, phone="+33622222222")
    drop_id = await started_drop(ctx, tenant, sms_spec(shop.event_id))
    provider = Recorder()
    await sender(ctx, tenant, provider).run_until_idle()
    mine = re.findall(r"http://\S+/s/\S+", provider.sent[0].body)  # type: ignore[union-attr]
    slug, recipient = urlsplit(mine[0]).path.split("/")[2:4]
    mine_id = int(recipient[:-6], 36)
    [other] = [row.id for row in await rows_of(ctx, drop_id) if row.id != mine_id]
    forged = f"/s/{slug}/{base36(other)}{recipient[-6:]}"  # another row, my MAC

    answer = await app_client.get(forged, headers={"User-Agent": IPHONE})
    assert answer.status_code == 302 and answer.headers["location"] == f"/s/{slug}"
    assert all(row.clicked_at is None for row in await rows_of(ctx, drop_id))
    # The shared link still leads on (a mangled SMS link still lands), counted for no one.
    shared = await app_client.get(f"/s/{slug}", headers={"User-Agent": IPHONE})
    assert shared.status_code == 302 and f"/e/{shop.event_id}" in shared.headers["location"]
    assert all(row.clicked_at is None for row in await rows_of(ctx, drop_id))


async def test_email_clicks_by_bots_count_for_the_drop_but_get_no_click_id(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    await add_contact(app_client, tenant, email="fan@x.io")
    spec = drop_spec(
        event_id=shop.event_id,
        variants=[
            {
                "name": "A",
                "content": {"email": {"default": {"subject": "On", "text": "{{ event.url }}"}}},
            }
        ],
    )
    drop_id = await started_drop(ctx, tenant, spec)
    provider = Recorder()
    await Sender(
        ctx.db, ctx.signer, ctx.clock, ctx.settings.base_url, email=provider, org_id=tenant.org_id
    ).run_until_idle()
    [message] = provider.sent
    assert isinstance(message, OutboundEmail)
    [tracked] = re.findall(r"http://\S+/r/\S+", message.text)

    scanner = "Mozilla/5.0 (compatible; Slackbot-LinkExpanding 1.0)"  # unfurls every link
    bot = await app_client.get(path_of(tracked), headers={"User-Agent": scanner})
    assert bot.status_code == 302 and "pd_click" not in bot.headers["location"]
    person = await app_client.get(path_of(tracked), headers={"User-Agent": IPHONE})
    assert "pd_click=" in person.headers["location"]
    await flushed(ctx)
    async with ctx.db.reader() as session:
        [link] = list(await session.scalars(select(ShortLink).where(ShortLink.drop_id == drop_id)))
        clicks = list(
            await session.scalars(select(ShortLinkClick).where(ShortLinkClick.link_id == link.id))
        )
    assert len(clicks) == 1 and link.bot_hits >= 1 and link.channel == "email"
    assert (await rows_of(ctx, drop_id))[0].clicked_at is not None


async def test_without_the_database_the_sms_keeps_working_tracked_links(
    app_client: httpx.AsyncClient,
    ctx: AppContext,
    tenant: Tenant,
    clock: FrozenClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    await add_contact(app_client, tenant, phone="+33611111111")
    await started_drop(ctx, tenant, sms_spec(shop.event_id))

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("database away")

    monkeypatch.setattr(shortlinks, "drop_link", refused)
    provider = Recorder()
    await sender(ctx, tenant, provider).run_until_idle()
    [message] = provider.sent
    assert isinstance(message, OutboundSms)
    assert "/s/" not in message.body and len(re.findall(r"http://\S+/r/\S+", message.body)) == 2


async def test_preview_and_drop_page_count_sms_segments_with_short_links(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    contact = await add_contact(app_client, tenant, phone="+33611111111")
    body = "Drop on " + "x" * 100 + " {{ event.url }}"
    spec = drop_spec(
        channels=["sms"],
        event_id=shop.event_id,
        variants=[{"name": "A", "content": {"sms": {"default": {"body": body}}}}],
    )
    drop_id = await started_drop(ctx, tenant, spec)
    answer = await app_client.get(
        f"/api/v1/drops/{drop_id}/preview?contact_id={contact['id']}", headers=tenant.headers
    )
    assert answer.status_code == 200, answer.text
    sms = answer.json()["sms"]
    # The link is shown (and counted) in the shape the recipient gets, not as /r/{token}.
    [link] = re.findall(r"http://\S+", sms["body"])
    assert re.fullmatch(r"http://127\.0\.0\.1:8000/s/PREVIEWlink/[0-9a-z]{5}[\w-]{6}", link)
    assert (sms["segments"], sms["encoding"]) == (1, "GSM-7")
    assert sms["segments"] == render.sms_length(sms["body"]).segments

    await login(app_client, ctx, tenant, "owner")
    page = await app_client.get(f"/drops/{drop_id}", headers=HTML)
    assert page.status_code == 200
    label = re.search(r'class="muted small sms-segments">([^<]+)<', page.text)
    assert label is not None
    # 8 + 100 + 1 characters and a ~45-character short link: one segment; the same text
    # with a /r/ token link (~150 characters) would take two.
    assert label.group(1) == "1 segment · GSM-7"


async def test_a_link_too_long_for_a_short_link_still_leads_on(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    await add_contact(app_client, tenant, email="fan@x.io", phone="+33611111111")
    long_url = "https://shop.example/p?q=" + "x" * 2100
    spec = drop_spec(
        channels=["email", "sms"],
        variants=[
            {
                "name": "A",
                "content": {
                    "email": {"default": {"subject": "On", "text": long_url}},
                    "sms": {"default": {"body": "https://shop.example/p?q={{ 'x' * 2100 }}"}},
                },
            }
        ],
    )
    await started_drop(ctx, tenant, spec)
    provider = Recorder()
    await Sender(
        ctx.db,
        ctx.signer,
        ctx.clock,
        ctx.settings.base_url,
        email=provider,
        sms=provider,
        org_id=tenant.org_id,
    ).run_until_idle()
    assert len(provider.sent) == 2
    for message in provider.sent:
        text = message.text if isinstance(message, OutboundEmail) else message.body
        [tracked] = re.findall(r"http://\S+/r/\S+", text)  # no short link for it
        answer = await app_client.get(path_of(tracked), headers={"User-Agent": IPHONE})
        assert answer.status_code == 302
        assert answer.headers["location"].startswith(long_url)
        assert "pd_click" not in answer.headers["location"]


async def test_sms_links_are_printed_on_the_short_host(
    app_client: httpx.AsyncClient, ctx: AppContext, tenant: Tenant, clock: FrozenClock
) -> None:
    shop = await make_shop(app_client, tenant, clock.now())
    await add_contact(app_client, tenant, phone="+33611111111")
    await started_drop(ctx, tenant, sms_spec(shop.event_id))
    provider = Recorder()
    drops_sender = sender(ctx, tenant, provider)
    drops_sender.short_base_url = "https://pd.example"
    await drops_sender.run_until_idle()
    [message] = provider.sent
    assert isinstance(message, OutboundSms)
    [short] = re.findall(r"https://pd\.example/s/\S+", message.body)
    # The short host reaches the same server: the path alone answers.
    answer = await app_client.get(path_of(short), headers={"User-Agent": IPHONE})
    assert answer.status_code == 302 and f"/e/{shop.event_id}?" in answer.headers["location"]
