"""StripeProvider through the official `stripe` library against the sandbox on loopback:
one session per idempotency key, exact Checkout params, refunds, Stripe's errors mapped
to ProviderError with Stripe's code."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from popdrop.commerce.payments import (
    PaymentRequest,
    ProviderError,
    StripeProvider,
    provider_from_settings,
)
from popdrop.commerce.stripe_sandbox import SANDBOX_API_KEY, StripeSandbox
from popdrop.core.config import Settings

REQUEST = PaymentRequest(
    order_id=41,
    org_id=7,
    amount_minor=2500,
    currency="EUR",
    description="Order 41 at the Riverside pop-up",
    lines=(("Tee", 2, 2000), ("Cap", 1, 500)),
    success_url="https://shop.example/checkout/tok/done?session={CHECKOUT_SESSION_ID}",
    cancel_url="https://shop.example/checkout/tok",
    customer_email="ana@example.com",
)


@pytest.fixture
async def sandbox() -> AsyncIterator[StripeSandbox]:
    box = StripeSandbox(retry_delays=())
    async with box.serving():
        yield box


@pytest.fixture
async def provider(sandbox: StripeSandbox) -> AsyncIterator[StripeProvider]:
    assert sandbox.base_url
    stripe_provider = StripeProvider(SANDBOX_API_KEY, sandbox.base_url)
    yield stripe_provider
    await stripe_provider.aclose()


async def paid_intent(sandbox: StripeSandbox, provider: StripeProvider) -> str:
    start = await provider.start(REQUEST, idempotency_key="order-41")
    await sandbox.pay(start.provider_ref)
    intent = sandbox.sessions[start.provider_ref]["payment_intent"]
    assert isinstance(intent, str)
    return intent


async def test_the_same_idempotency_key_makes_one_session(
    sandbox: StripeSandbox, provider: StripeProvider
) -> None:
    first = await provider.start(REQUEST, idempotency_key="order-41-attempt-1")
    again = await provider.start(REQUEST, idempotency_key="order-41-attempt-1")
    assert first == again
    assert list(sandbox.sessions) == [first.provider_ref]
    assert first.provider_ref.startswith("cs_test_")
    assert first.redirect_url == f"{sandbox.base_url}/pay/{first.provider_ref}"
    other = await provider.start(REQUEST, idempotency_key="order-41-attempt-2")
    assert other.provider_ref != first.provider_ref
    assert len(sandbox.sessions) == 2


async def test_a_reused_key_with_other_params_is_refused(provider: StripeProvider) -> None:
    await provider.start(REQUEST, idempotency_key="order-41")
    with pytest.raises(ProviderError) as caught:
        await provider.start(
            replace(REQUEST, amount_minor=2400, lines=()), idempotency_key="order-41"
        )
    assert caught.value.code == "idempotency_error"


async def test_the_session_carries_lines_amount_metadata_and_urls(
    sandbox: StripeSandbox, provider: StripeProvider
) -> None:
    start = await provider.start(REQUEST, idempotency_key="order-41")
    session = sandbox.sessions[start.provider_ref]
    assert (session["amount_total"], session["currency"], session["mode"]) == (
        2500,
        "eur",
        "payment",
    )
    assert session["metadata"] == {"order_id": "41", "org_id": "7"}
    assert session["client_reference_id"] == "41"
    assert session["customer_email"] == "ana@example.com"
    assert session["success_url"] == REQUEST.success_url
    assert session["payment_intent"] is None  # made when the customer pays, as in Stripe
    lines = [
        (li["description"], li["quantity"], li["price"]["unit_amount"])
        for li in sandbox.line_items[start.provider_ref]
    ]
    assert lines == [("Tee", 2, 1000), ("Cap", 1, 500)]
    assert sandbox.intent_data[start.provider_ref]["metadata"] == {"order_id": "41", "org_id": "7"}


async def test_a_line_total_that_does_not_divide_is_sent_as_one_unit(
    sandbox: StripeSandbox, provider: StripeProvider
) -> None:
    # 3 tees for 1000 after a discount: no whole unit price, the total must still match.
    request = replace(REQUEST, amount_minor=1000, lines=(("Tee", 3, 1000),))
    start = await provider.start(request, idempotency_key="odd")
    items = sandbox.line_items[start.provider_ref]
    assert [(li["description"], li["quantity"], li["amount_total"]) for li in items] == [
        ("Tee x 3", 1, 1000)
    ]


async def test_lines_that_do_not_add_up_become_one_line_for_the_amount(
    sandbox: StripeSandbox, provider: StripeProvider
) -> None:
    request = replace(REQUEST, amount_minor=2300)  # an order-level discount of 200
    start = await provider.start(request, idempotency_key="order-level")
    assert sandbox.sessions[start.provider_ref]["amount_total"] == 2300
    assert [li["description"] for li in sandbox.line_items[start.provider_ref]] == [
        REQUEST.description
    ]


async def test_refunds_partly_then_the_rest_then_nothing_more(
    sandbox: StripeSandbox, provider: StripeProvider
) -> None:
    intent = await paid_intent(sandbox, provider)
    first = await provider.refund(
        payment_intent=intent, amount_minor=1000, reason="one tee returned", idempotency_key="r1"
    )
    assert first.status == "succeeded" and first.provider_ref.startswith("re_")
    again = await provider.refund(
        payment_intent=intent, amount_minor=1000, reason="one tee returned", idempotency_key="r1"
    )
    assert again == first  # a retried refund is not a second refund
    assert sandbox.refunds[first.provider_ref]["metadata"]["reason"] == "one tee returned"
    with pytest.raises(ProviderError) as too_much:
        await provider.refund(
            payment_intent=intent, amount_minor=1501, reason="oops", idempotency_key="r2"
        )
    assert (too_much.value.code, too_much.value.reason) == (
        "amount_too_large",
        "payment_provider_error",
    )
    assert too_much.value.status == 502
    assert too_much.value.to_dict()["provider_code"] == "amount_too_large"
    rest = await provider.refund(
        payment_intent=intent,
        amount_minor=1500,
        reason="requested_by_customer",
        idempotency_key="r3",
    )
    assert sandbox.refunds[rest.provider_ref]["reason"] == "requested_by_customer"
    with pytest.raises(ProviderError) as nothing_left:
        await provider.refund(
            payment_intent=intent, amount_minor=1, reason="again", idempotency_key="r4"
        )
    assert nothing_left.value.code == "charge_already_refunded"
    charge = sandbox.charges[sandbox.intents[intent]["latest_charge"]]
    assert (charge["amount_refunded"], charge["refunded"]) == (2500, True)


async def test_a_pending_refund_is_reported_pending(
    sandbox: StripeSandbox, provider: StripeProvider
) -> None:
    intent = await paid_intent(sandbox, provider)
    sandbox.refund_status = "pending"
    result = await provider.refund(
        payment_intent=intent, amount_minor=500, reason="late", idempotency_key="rp"
    )
    assert result.status == "pending"


async def test_refunding_an_unknown_intent_says_resource_missing(provider: StripeProvider) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider.refund(
            payment_intent="pi_nope", amount_minor=100, reason="x", idempotency_key="rx"
        )
    assert caught.value.code == "resource_missing"


async def test_a_wrong_secret_key_is_a_provider_error(sandbox: StripeSandbox) -> None:
    assert sandbox.base_url
    wrong = StripeProvider("sk_test_wrong", sandbox.base_url)
    with pytest.raises(ProviderError) as caught:
        await wrong.start(REQUEST, idempotency_key="k")
    assert caught.value.code == "authentication_error"
    assert not sandbox.sessions
    await wrong.aclose()


async def test_an_unreachable_stripe_is_a_provider_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    gone = StripeProvider(SANDBOX_API_KEY, f"http://127.0.0.1:{port}", max_network_retries=0)
    with pytest.raises(ProviderError) as caught:
        await gone.start(REQUEST, idempotency_key="k")
    assert caught.value.code == "api_connection_error"
    await gone.aclose()


def test_a_zero_amount_never_reaches_stripe() -> None:
    from popdrop.commerce.payments import checkout_session_params
    from popdrop.core.errors import PopdropError

    with pytest.raises(PopdropError) as caught:
        checkout_session_params(replace(REQUEST, amount_minor=0, lines=()))
    assert caught.value.reason == "invalid_request"


def test_no_secret_key_means_no_online_provider(settings: Settings) -> None:
    assert provider_from_settings(settings.model_copy(update={"stripe_secret_key": ""})) is None
    configured = settings.model_copy(
        update={"stripe_secret_key": "sk_test_x", "stripe_api_base": "http://127.0.0.1:9/"}
    )
    provider = provider_from_settings(configured)
    assert provider is not None
    assert (provider.name, provider.api_base) == ("stripe", "http://127.0.0.1:9")
