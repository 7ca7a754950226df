"""The Stripe sandbox: Stripe's wire format, the hosted page, signed webhooks that
`verify_and_parse` accepts, retries, replays, held and reordered deliveries."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from popdrop.commerce.payments import PaymentRequest, StripeProvider
from popdrop.commerce.stripe_events import StripeEvent, verify_and_parse
from popdrop.commerce.stripe_sandbox import (
    SANDBOX_API_KEY,
    SANDBOX_WEBHOOK_SECRET,
    StripeSandbox,
    decode_form,
    sandbox_settings,
)
from popdrop.core.clock import FrozenClock
from popdrop.core.errors import PopdropError
from tests.browser import CHROMIUM, CHROMIUM_ARGS

REQUEST = PaymentRequest(
    order_id=41,
    org_id=7,
    amount_minor=2500,
    currency="EUR",
    description="Order 41",
    lines=(("Tee", 2, 2000), ("Cap", 1, 500)),
    success_url="http://shop.test/done?session={CHECKOUT_SESSION_ID}",
    cancel_url="http://shop.test/cart",
)


@dataclass
class Receiver:
    """The app's webhook route, as far as the sandbox can tell: verifies like the app."""

    clock: FrozenClock
    secrets: list[str]
    url: str = ""
    fail_next: int = 0
    events: list[StripeEvent] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)

    async def hook(self, request: Request) -> JSONResponse:
        if self.fail_next:
            self.fail_next -= 1
            return JSONResponse({"busy": True}, status_code=503)
        signature = request.headers.get("stripe-signature")
        self.headers.append(signature or "")
        try:
            event = verify_and_parse(
                await request.body(), signature, self.secrets, now=self.clock.now()
            )
        except PopdropError as error:
            self.refusals.append(error.reason)
            return JSONResponse({"reason": error.reason}, status_code=error.status)
        self.events.append(event)
        return JSONResponse({"received": True})

    def types(self) -> list[str]:
        return [event.type for event in self.events]


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 5, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
async def receiver(clock: FrozenClock) -> AsyncIterator[Receiver]:
    hooks = Receiver(clock, [SANDBOX_WEBHOOK_SECRET])
    app = Starlette(routes=[Route("/hook", hooks.hook, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    hooks.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield hooks
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def sandbox(receiver: Receiver, clock: FrozenClock) -> AsyncIterator[StripeSandbox]:
    box = StripeSandbox(webhook_url=receiver.url, clock=clock, retry_delays=(0.01, 0.01))
    async with box.serving():
        yield box


@pytest.fixture
async def http(sandbox: StripeSandbox) -> AsyncIterator[httpx.AsyncClient]:
    assert sandbox.base_url
    async with httpx.AsyncClient(base_url=sandbox.base_url) as client:
        yield client


async def start(sandbox: StripeSandbox, key: str = "order-41") -> str:
    assert sandbox.base_url
    provider = StripeProvider(SANDBOX_API_KEY, sandbox.base_url)
    try:
        return (await provider.start(REQUEST, idempotency_key=key)).provider_ref
    finally:
        await provider.aclose()


async def test_paying_on_the_hosted_page_sends_verified_webhooks_then_redirects(
    sandbox: StripeSandbox, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    page = await http.get(f"/pay/{session_id}")
    assert page.status_code == 200
    assert "25.00 EUR" in page.text and ">Pay<" in page.text and ">Decline<" in page.text
    assert "width=device-width" in page.text
    paid = await http.post(
        f"/pay/{session_id}", data={"action": "pay", "card": "4242 4242 4242 4242"}
    )
    assert paid.status_code == 303
    assert paid.headers["location"] == f"http://shop.test/done?session={session_id}"
    # Delivered before the redirect: the shop already knows when the customer lands.
    assert receiver.types() == ["checkout.session.completed", "payment_intent.succeeded"]
    completed, succeeded = receiver.events
    assert (completed.order_id, completed.org_id, completed.amount_minor) == (41, 7, 2500)
    assert (completed.status, completed.currency, completed.object_id) == (
        "paid",
        "EUR",
        session_id,
    )
    assert completed.payment_intent == succeeded.payment_intent == succeeded.object_id
    assert (succeeded.order_id, succeeded.status) == (41, "succeeded")
    assert completed.created == receiver.clock.now()  # the sandbox runs on the given clock
    assert not receiver.refusals
    after = await http.get(f"/pay/{session_id}")
    assert "Paid." in after.text and "value='pay'" not in after.text


async def test_a_decline_carries_the_failure_code_and_the_page_says_why(
    sandbox: StripeSandbox, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    declined = await http.post(f"/pay/{session_id}", data={"action": "decline"})
    assert declined.status_code == 200
    assert "Your card has insufficient funds." in declined.text
    assert receiver.types() == ["payment_intent.payment_failed"]
    failed = receiver.events[0]
    assert (failed.failure_code, failed.decline_code) == ("card_declined", "insufficient_funds")
    assert (failed.order_id, failed.status) == (41, "requires_payment_method")
    # A decline test card typed in does the same; then a good card pays the same intent.
    lost = await http.post(f"/pay/{session_id}", data={"action": "pay", "card": "4000000000009987"})
    assert "declined" in lost.text
    assert receiver.events[-1].decline_code == "lost_card"
    assert (await http.post(f"/pay/{session_id}", data={"action": "pay"})).status_code == 303
    assert receiver.events[-1].type == "payment_intent.succeeded"
    assert receiver.events[-1].payment_intent == failed.payment_intent


async def test_a_refund_sends_charge_refunded_and_refund_updated(
    sandbox: StripeSandbox, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    await sandbox.pay(session_id)
    intent = sandbox.sessions[session_id]["payment_intent"]
    assert sandbox.base_url
    provider = StripeProvider(SANDBOX_API_KEY, sandbox.base_url)
    refund = await provider.refund(
        payment_intent=intent, amount_minor=900, reason="one cap", idempotency_key="r1"
    )
    await provider.aclose()
    await sandbox.settle()  # API-caused events go out in the background, as in Stripe
    charge_refunded, refund_updated = receiver.events[2:]
    assert (charge_refunded.type, charge_refunded.amount_minor) == ("charge.refunded", 900)
    assert (charge_refunded.payment_intent, charge_refunded.order_id) == (intent, 41)
    assert (refund_updated.type, refund_updated.object_id) == (
        "refund.updated",
        refund.provider_ref,
    )
    assert (refund_updated.amount_minor, refund_updated.status) == (900, "succeeded")


async def test_a_pending_refund_that_fails_gives_the_amount_back(
    sandbox: StripeSandbox, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    await sandbox.pay(session_id)
    await http.post("/_sandbox/config", json={"refund_status": "pending"})
    intent = sandbox.sessions[session_id]["payment_intent"]
    made = await http.post(
        "/v1/refunds",
        data={"payment_intent": intent, "amount": "2500"},
        headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"},
    )
    assert made.json()["status"] == "pending"
    settled = await http.post(
        f"/_sandbox/refunds/{made.json()['id']}/settle",
        json={"status": "failed", "failure_reason": "expired_or_canceled_card"},
    )
    assert settled.status_code == 200
    await sandbox.settle()  # refund webhooks go out in the background: wait for them
    # Stripe sends events in no set order: the pending refund's own update may land after
    # the failure, so look for the failure among them rather than last.
    updates = [e for e in receiver.events if e.type == "refund.updated"]
    failed = [e for e in updates if e.status == "failed"]
    assert failed and failed[0].failure_code == "expired_or_canceled_card"
    charge = sandbox.charges[sandbox.intents[intent]["latest_charge"]]
    assert charge["amount_refunded"] == 0


async def test_webhooks_are_retried_until_the_app_answers_2xx(
    sandbox: StripeSandbox, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    receiver.fail_next = 2
    await sandbox.pay(session_id)
    completed = sandbox.events_of("checkout.session.completed")[0]
    assert [d.status for d in completed.deliveries] == [503, 503, 200]
    assert receiver.types() == ["checkout.session.completed", "payment_intent.succeeded"]


async def test_held_events_can_be_released_out_of_order_and_replayed(
    sandbox: StripeSandbox, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    assert (await http.post("/_sandbox/hold", json={"hold": True})).json() == {"hold": True}
    paid = await http.post(f"/_sandbox/sessions/{session_id}/pay")
    assert [e["held"] for e in paid.json()["events"]] == [True, True]
    assert receiver.events == []
    released = await http.post("/_sandbox/release", json={"reverse": True})
    assert [e["type"] for e in released.json()["events"]] == [
        "payment_intent.succeeded",
        "checkout.session.completed",
    ]
    assert receiver.types() == ["payment_intent.succeeded", "checkout.session.completed"]
    first = receiver.events[0].id
    replayed = await http.post(f"/_sandbox/events/{first}/send")
    assert replayed.json() == {"status": 200}
    assert [event.id for event in receiver.events].count(first) == 2  # a duplicate, as Stripe may
    listing = (await http.get("/_sandbox/events")).json()["events"]
    assert [e["delivered"] for e in listing] == [True, True]
    raw = await http.get(f"/_sandbox/events/{first}")
    assert raw.json()["object"] == "event" and raw.json()["id"] == first


async def test_webhooks_are_signed_with_every_secret_during_rotation(
    sandbox: StripeSandbox, receiver: Receiver
) -> None:
    sandbox.webhook_secrets = ["whsec_old_one", SANDBOX_WEBHOOK_SECRET]
    receiver.secrets = ["whsec_old_one"]  # an app not yet switched still verifies
    session_id = await start(sandbox)
    await sandbox.pay(session_id)
    assert receiver.headers[0].count("v1=") == 2
    assert receiver.types() == ["checkout.session.completed", "payment_intent.succeeded"]


async def test_an_app_with_another_secret_refuses_and_the_sandbox_records_it(
    sandbox: StripeSandbox, receiver: Receiver
) -> None:
    receiver.secrets = ["whsec_not_the_sandbox"]
    await sandbox.pay(await start(sandbox))
    assert receiver.refusals == ["bad_signature"] * 6  # 2 events x 3 attempts
    assert not sandbox.events_of("payment_intent.succeeded")[0].delivered


async def test_a_clock_far_from_the_apps_is_outside_the_tolerance(
    sandbox: StripeSandbox, receiver: Receiver, clock: FrozenClock
) -> None:
    sandbox.clock = FrozenClock(clock.now() - timedelta(minutes=6))
    await sandbox.pay(await start(sandbox))
    assert set(receiver.refusals) == {"timestamp_outside_tolerance"}


async def test_an_expired_session_sends_its_event_and_can_no_longer_be_paid(
    sandbox: StripeSandbox, http: httpx.AsyncClient, receiver: Receiver
) -> None:
    session_id = await start(sandbox)
    auth = {"Authorization": f"Bearer {SANDBOX_API_KEY}"}
    expired = await http.post(f"/v1/checkout/sessions/{session_id}/expire", headers=auth)
    assert expired.json()["status"] == "expired"
    await sandbox.settle()
    assert receiver.types() == ["checkout.session.expired"]
    assert receiver.events[0].order_id == 41 and receiver.events[0].status == "unpaid"
    refused = await http.post(f"/_sandbox/sessions/{session_id}/pay")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "checkout_session_not_open"
    page = await http.get(f"/pay/{session_id}")
    assert "expired" in page.text and "value='pay'" not in page.text


async def test_a_session_past_its_expires_at_expires_by_itself(
    sandbox: StripeSandbox, http: httpx.AsyncClient, receiver: Receiver, clock: FrozenClock
) -> None:
    session_id = await start(sandbox)
    clock.advance(timedelta(hours=24, seconds=1))
    receiver.clock = FrozenClock(clock.now())
    page = await http.get(f"/pay/{session_id}")
    assert "expired" in page.text
    await sandbox.settle()
    assert receiver.types() == ["checkout.session.expired"]


async def test_the_api_speaks_stripes_errors(
    sandbox: StripeSandbox, http: httpx.AsyncClient
) -> None:
    auth = {"Authorization": f"Bearer {SANDBOX_API_KEY}"}
    anonymous = await http.post("/v1/checkout/sessions", data={"mode": "payment"})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "invalid_request_error"
    unknown = await http.post(
        "/v1/checkout/sessions", data={"mode": "payment", "colour": "red"}, headers=auth
    )
    assert unknown.status_code == 400
    error = unknown.json()["error"]
    assert (error["code"], error["param"]) == ("parameter_unknown", "colour")
    no_lines = await http.post(
        "/v1/checkout/sessions", data={"mode": "payment", "success_url": "http://x"}, headers=auth
    )
    assert no_lines.json()["error"]["code"] == "parameter_missing"
    bad_int = await http.post(
        "/v1/checkout/sessions",
        data={
            "mode": "payment",
            "success_url": "http://x",
            "line_items[0][quantity]": "two",
            "line_items[0][price_data][currency]": "eur",
            "line_items[0][price_data][unit_amount]": "100",
            "line_items[0][price_data][product_data][name]": "Tee",
        },
        headers=auth,
    )
    assert bad_int.json()["error"]["code"] == "parameter_invalid_integer"
    missing = await http.get("/v1/checkout/sessions/cs_test_nope", headers=auth)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "resource_missing"
    assert (await http.get("/pay/cs_test_nope")).status_code == 404


async def test_an_idempotent_replay_is_marked_and_a_changed_body_is_refused(
    sandbox: StripeSandbox, http: httpx.AsyncClient
) -> None:
    form = {
        "mode": "payment",
        "success_url": "http://x",
        "line_items[0][quantity]": "1",
        "line_items[0][price_data][currency]": "eur",
        "line_items[0][price_data][unit_amount]": "700",
        "line_items[0][price_data][product_data][name]": "Tote",
    }
    headers = {"Authorization": f"Bearer {SANDBOX_API_KEY}", "Idempotency-Key": "k-1"}
    first = await http.post("/v1/checkout/sessions", data=form, headers=headers)
    again = await http.post("/v1/checkout/sessions", data=form, headers=headers)
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    changed = await http.post(
        "/v1/checkout/sessions", data={**form, "line_items[0][quantity]": "2"}, headers=headers
    )
    assert changed.status_code == 400
    assert changed.json()["error"]["type"] == "idempotency_error"
    assert len(sandbox.sessions) == 1


def test_bracket_notation_decodes_to_nested_objects() -> None:
    body = (
        (
            b"mode=payment&line_items[0][quantity]=2&line_items[0][price_data][currency]=eur"
            b"&line_items[1][quantity]=1&metadata[order_id]=41&expand[]=payment_intent"
        )
        .replace(b"[", b"%5B")
        .replace(b"]", b"%5D")
    )
    assert decode_form(body) == {
        "mode": "payment",
        "line_items": [{"quantity": "2", "price_data": {"currency": "eur"}}, {"quantity": "1"}],
        "metadata": {"order_id": "41"},
        "expand": ["payment_intent"],
    }


def test_the_sandbox_runs_in_a_thread_for_an_app_in_another_process() -> None:
    box = StripeSandbox()
    with box.serving_in_thread() as url:
        created = httpx.post(
            f"{url}/v1/checkout/sessions",
            data={
                "mode": "payment",
                "success_url": "http://x",
                "line_items[0][quantity]": "1",
                "line_items[0][price_data][currency]": "eur",
                "line_items[0][price_data][unit_amount]": "700",
                "line_items[0][price_data][product_data][name]": "Tote",
            },
            headers={"Authorization": f"Bearer {sandbox_settings()['stripe_secret_key']}"},
        )
        session_id = created.json()["id"]
        paid = httpx.post(f"{url}/_sandbox/sessions/{session_id}/pay")
        assert [e["type"] for e in paid.json()["events"]] == [
            "checkout.session.completed",
            "payment_intent.succeeded",
        ]
    assert sandbox_settings()["stripe_webhook_secrets"] == SANDBOX_WEBHOOK_SECRET


async def test_webhooks_can_go_to_an_app_in_process_without_a_server(
    clock: FrozenClock,
) -> None:
    hooks = Receiver(clock, [SANDBOX_WEBHOOK_SECRET])
    app = Starlette(routes=[Route("/hook", hooks.hook, methods=["POST"])])
    box = StripeSandbox(
        webhook_url="http://testserver/hook",
        clock=clock,
        webhook_transport=httpx.ASGITransport(app=app),
    )
    async with box.serving():
        await box.pay(await start(box))
    assert hooks.types() == ["checkout.session.completed", "payment_intent.succeeded"]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")
def test_the_hosted_page_works_on_a_phone_without_javascript(shots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    box = StripeSandbox()
    with box.serving_in_thread() as url:
        created = httpx.post(
            f"{url}/v1/checkout/sessions",
            data={
                "mode": "payment",
                "success_url": f"{url}/_sandbox/events?session={{CHECKOUT_SESSION_ID}}",
                "cancel_url": "http://shop.test/cart",
                "line_items[0][quantity]": "2",
                "line_items[0][price_data][currency]": "eur",
                "line_items[0][price_data][unit_amount]": "1250",
                "line_items[0][price_data][product_data][name]": "Riso print",
            },
            headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"},
        )
        session = created.json()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(
                    viewport={"width": 390, "height": 844},
                    is_mobile=True,
                    java_script_enabled=False,
                )
                page = context.new_page()
                page.goto(session["url"])
                expect(page.locator("#total")).to_have_text("25.00 EUR")
                page.screenshot(path=shots / "stripe-sandbox-01-page.png", full_page=True)
                page.get_by_role("button", name="Decline").click()
                expect(page.get_by_role("alert")).to_have_text("Your card has insufficient funds.")
                page.screenshot(path=shots / "stripe-sandbox-02-declined.png", full_page=True)
                page.get_by_label("Card number").fill("4242 4242 4242 4242")
                page.get_by_role("button", name="Pay").click()
                expect(page).to_have_url(f"{url}/_sandbox/events?session={session['id']}")
                # The page fits the phone: nothing wider than the viewport.
                page.goto(session["url"])
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= 390
            finally:
                browser.close()
        events = httpx.get(f"{url}/_sandbox/events").json()["events"]
    assert [e["type"] for e in events] == [
        "payment_intent.payment_failed",
        "checkout.session.completed",
        "payment_intent.succeeded",
    ]
