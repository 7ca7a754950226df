"""The customer's pages: the public event page's Buy buttons (a variant, a bundle), its
Bundles section, the checkout page `/checkout/{token}` and the order confirmation
`/orders/view/{token}`.

Rules these pages keep:
- No account: the checkout token (`core.links.read_checkout`) names one hold and its
  organization; the confirmation token (`core.links.read_order_view`) one order. A bad
  token gets a plain "this link doesn't look right" page, never a 500.
- Everything works without JavaScript: one plain form (CSRF double-submit, like every
  public form) whose buttons apply a code, pay online or choose pay at pickup. Script only
  makes the hold's countdown tick (`/static/event-public.js`, which degrades to the
  expiry time the server wrote) and polls the confirmation while a payment is confirmed.
- Prices come from `commerce.orders.quote` (the same engine the order is placed with):
  every discount is shown with its name and why it applies; a refused code is shown with
  its reason and left out of the order.
- A hold already in an order goes to that order's confirmation; an expired or ended hold
  says so and links back to the event page. A refusal shows the page again with the
  reason and its status code.
- Times are shown on the event's clock (`core.localtime`).
- Bundles: the public page (an `inventory` page, which may not import commerce) loads
  its Bundles section from `/e/{event_id}/bundles` (htmx; without script a plain link to
  the same route shows it as a page). Buy → `catalog.take_bundle` for this browser (all
  components or none) → the checkout of the first hold. The checkout token names one
  hold, so the page takes along the holds that same take made (`bundle_hold_ids`: same
  contact, lane, window and creation instant, together exactly an active bundle's
  components): the order is placed with all of them and priced as the bundle. A
  component that cannot be held is a page naming it and the reason; nothing is held.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData

from popdrop.accounts.service import Principal, system_principal
from popdrop.commerce import catalog, orders, pickup, pricing, settlement
from popdrop.commerce.api import stripe_provider
from popdrop.commerce.catalog_schemas import BundleOut
from popdrop.commerce.lifecycle import (
    OrderSource,
    OrderStatus,
    PaymentMethod,
    PaymentStatus,
)
from popdrop.commerce.models import Bundle, BundleComponent, Order, OrderLine, Payment
from popdrop.commerce.schemas import OrderCreate
from popdrop.core import links, qr
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.ratelimit import GUESSING_REASONS
from popdrop.events.lifecycle import OPEN_EVENT_STATUSES
from popdrop.events.models import Event, Lane, PickupWindow, TimeSlot
from popdrop.inventory import service as inventory
from popdrop.inventory.lifecycle import HoldStatus
from popdrop.inventory.models import Hold, Product, Variant
from popdrop.inventory.schemas import HoldCreate
from popdrop.rsvp.api import public_guarded
from popdrop.web.auth import check_csrf
from popdrop.web.clicks import click_ids_of, remember_click
from popdrop.web.context import AppContext, client_address, get_ctx, route_of
from popdrop.web.pagekit import is_htmx
from popdrop.web.params import Ctx, ItemId
from popdrop.web.security import NO_STORE, PAGE_CSP
from popdrop.web.templating import render

router = APIRouter(include_in_schema=False)

# What the public pages may do on an organization's behalf: price and place an order
# for the hold named by a signed link, and take a hold from the public event page.
BUYER_SCOPES = frozenset({"orders:read", "orders:write", "holds:write"})
BUYER_COOKIE = "popdrop_buyer"  # a random id per browser: the per-person limit's key
MAX_BUY_QTY = 10
_FRIENDLY = {
    "receipt_email": "an email address like you@example.com",
    "receipt_phone": "a phone number like +33 6 12 34 56 78",
}
MAX_CODE_LENGTH = 64
_TROUBLE = {
    "link_invalid": "This link doesn't look right. Open the message again and tap the link.",
    "hold_expired": "Your reservation has expired, so the items went back on sale.",
    "hold_ended": "This reservation has ended.",
    "event_closed": "This event no longer sells.",
}


def buyer(org_id: int) -> Principal:
    return system_principal(org_id, "web:checkout", scopes=BUYER_SCOPES)


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    response = render(request, name, context, status=status)
    response.headers.update(NO_STORE)  # the URL is a bearer link
    response.headers["X-Robots-Tag"] = "noindex"
    ctx = get_ctx(request)
    if stripe_provider(ctx) is not None:
        response.headers["Content-Security-Policy"] = pay_csp(ctx.settings.stripe_api_base)
    return response


# Stripe's hosted Checkout pages live here (the API base is another host).
STRIPE_CHECKOUT_ORIGIN = "https://checkout.stripe.com"


def pay_csp(api_base: str) -> str:
    """The page policy, but a form may also land on the provider's hosted page: browsers
    apply `form-action` to the redirect a form's answer makes (Pay now → 303 → the
    provider), so 'self' alone would block it. The API base's origin is the sandbox's."""
    parts = urlsplit(api_base)
    origins = {STRIPE_CHECKOUT_ORIGIN}
    if parts.scheme in ("http", "https") and parts.netloc:
        origins.add(f"{parts.scheme}://{parts.netloc}")
    allowed = " ".join(sorted(origins))
    return PAGE_CSP.replace("form-action 'self'", f"form-action 'self' {allowed}")


def _trouble(
    request: Request, error: PopdropError, context: dict[str, Any] | None = None
) -> Response:
    data = dict(context or {})
    data["trouble"] = _TROUBLE.get(error.reason, error.message)
    data["reason"] = error.reason
    return _page(request, "commerce/checkout_trouble.html", data, status=error.status)


# ---------------------------------------------------------------- reads


@dataclass
class HoldView:
    """A hold with what the checkout page shows around it."""

    hold: Hold
    event: Event
    lane: Lane
    product: Product
    variant: Variant
    slot: TimeSlot | None

    def live(self, now: datetime) -> bool:
        return self.hold.status == HoldStatus.ACTIVE and self.hold.expires_at > now


async def load_hold(session: AsyncSession, hold_id: int, org_id: int) -> HoldView:
    row = (
        await session.execute(
            select(Hold, Event, Lane, Variant, Product)
            .join(Event, Event.id == Hold.event_id)
            .join(Lane, Lane.id == Hold.lane_id)
            .join(Variant, Variant.id == Hold.variant_id)
            .join(Product, Product.id == Variant.product_id)
            .where(Hold.id == hold_id, Hold.org_id == org_id)
        )
    ).first()
    if row is None:
        raise PopdropError("link_invalid", "this link is not valid")
    hold, event, lane, variant, product = row
    slot = await session.get(TimeSlot, hold.slot_id) if hold.slot_id is not None else None
    return HoldView(hold, event, lane, product, variant, slot)


async def order_of_hold(session: AsyncSession, hold_id: int, org_id: int) -> int | None:
    order_id = await session.scalar(
        select(OrderLine.order_id).where(OrderLine.hold_id == hold_id, OrderLine.org_id == org_id)
    )
    return int(order_id) if order_id is not None else None


async def bundle_hold_ids(session: AsyncSession, hold: Hold) -> list[int]:
    """The holds a checkout link's hold stands for: itself, or every hold of the bundle
    take that made it (`catalog.take_bundle` holds each component with the same contact,
    lane, window and `now`). The group counts only when its variants and quantities are
    exactly an active bundle's components, so two separate buys are never merged."""
    if hold.contact_ref is None:
        return [hold.id]
    same_slot = Hold.slot_id.is_(None) if hold.slot_id is None else Hold.slot_id == hold.slot_id
    in_order = select(OrderLine.id).where(OrderLine.hold_id == Hold.id).correlate(Hold).exists()
    group = (
        await session.execute(
            select(Hold.id, Hold.variant_id, Hold.qty).where(
                Hold.org_id == hold.org_id,
                Hold.event_id == hold.event_id,
                Hold.contact_ref == hold.contact_ref,
                Hold.lane_id == hold.lane_id,
                same_slot,
                Hold.created_at == hold.created_at,
                Hold.status == HoldStatus.ACTIVE,
                ~in_order,
            )
        )
    ).all()
    if len(group) < 2 or hold.id not in {row.id for row in group}:
        return [hold.id]
    taken = sorted((row.variant_id, row.qty) for row in group)
    components: dict[int, list[tuple[int, int]]] = {}
    for bundle_id, variant_id, qty in await session.execute(
        select(BundleComponent.bundle_id, BundleComponent.variant_id, BundleComponent.qty)
        .join(Bundle, Bundle.id == BundleComponent.bundle_id)
        .where(
            Bundle.event_id == hold.event_id,
            Bundle.org_id == hold.org_id,
            Bundle.active.is_(True),
        )
    ):
        components.setdefault(bundle_id, []).append((variant_id, qty))
    if any(sorted(parts) == taken for parts in components.values()):
        return sorted(row.id for row in group)
    return [hold.id]


def _view_url(ctx: AppContext, order_id: int, org_id: int) -> str:
    return links.order_view_url(ctx.signer, ctx.settings.base_url, order_id, org_id)


def _clean_codes(values: list[str], limit: int) -> list[str]:
    """Codes as typed, trimmed, de-duplicated (case-insensitive), at most `limit`."""
    seen: set[str] = set()
    kept: list[str] = []
    for raw in values:
        code = raw.strip()[:MAX_CODE_LENGTH]
        if code and code.upper() not in seen:
            seen.add(code.upper())
            kept.append(code)
    return kept[:limit]


# ---------------------------------------------------------------- checkout


@dataclass
class CheckoutForm:
    codes: list[str]
    code: str = ""
    receipt_email: str = ""
    receipt_phone: str = ""

    @classmethod
    def of(cls, data: FormData) -> CheckoutForm:
        removed = str(data.get("remove", "")).strip().upper()
        kept = [str(c) for c in data.getlist("codes") if str(c).strip().upper() != removed]
        return cls(
            codes=_clean_codes(kept, 20),
            code=str(data.get("code", "")).strip()[:MAX_CODE_LENGTH],
            receipt_email=str(data.get("receipt_email", "")).strip()[:254],
            receipt_phone=str(data.get("receipt_phone", "")).strip()[:32],
        )


async def _checkout_page(
    request: Request,
    ctx: AppContext,
    token: str,
    hold_id: int,
    org_id: int,
    form: CheckoutForm,
    *,
    problem: PopdropError | None = None,
    field_errors: dict[str, str] | None = None,
) -> Response:
    now = ctx.clock.now()
    async with ctx.db.reader() as session:
        view = await load_hold(session, hold_id, org_id)
        order_id = await order_of_hold(session, hold_id, org_id)
        if order_id is not None:
            return RedirectResponse(_view_url(ctx, order_id, org_id), status_code=303)
        if not view.live(now):
            reason = "hold_expired" if view.hold.status in ("active", "expired") else "hold_ended"
            error = PopdropError(reason, _TROUBLE[reason], status=410)
            return _trouble(request, error, {"event": view.event, "view": view})
        hold_ids = await bundle_hold_ids(session, view.hold)
        if form.codes:  # typed codes are guesses too: the vault's guessing guard
            await ctx.guard.check(org_id, client_address(request), route=route_of(request))
        try:
            priced = await orders.quote(
                session,
                ctx.signer,
                buyer(org_id),
                hold_ids=hold_ids,
                codes=form.codes,
                contact_ref=view.hold.contact_ref,
                now=now,
            )
        except PopdropError as error:
            if error.reason == "hold_expired":
                return _trouble(request, error, {"event": view.event, "view": view})
            raise
    for refusal in priced.refusals:
        if refusal.reason in GUESSING_REASONS:
            await ctx.guard.failed(org_id, client_address(request), route=route_of(request))
    breakdown = priced.breakdown
    refused = {r.ref.upper() for r in priced.refusals}
    methods = set(priced.payment_methods)
    online = PaymentMethod.STRIPE in methods
    context = {
        "token": token,
        "view": view,
        "event": view.event,
        "quote": priced,
        "breakdown": breakdown,
        "applied": [c for c in form.codes if c.upper() not in refused],
        "refusals": priced.refusals,
        "form": form,
        "errors": field_errors or {},
        "problem": problem,
        "pay_online": online and stripe_provider(ctx) is not None,
        "pay_at_pickup": PaymentMethod.PAY_AT_PICKUP in methods,
        "max_codes": priced.max_codes,
        "event_url": links.event_url(ctx.settings.base_url, view.event.id),
    }
    status = problem.status if problem is not None else (422 if field_errors else 200)
    return _page(request, "commerce/checkout.html", context, status=status)


def _read_token(ctx: AppContext, token: str) -> tuple[int, int]:
    return links.read_checkout(ctx.signer, token)


@router.get("/checkout/{token}")
async def checkout_page(request: Request, token: str, ctx: Ctx) -> Response:
    try:
        hold_id, org_id = _read_token(ctx, token)
        codes = _clean_codes([request.query_params.get("code", "")], 1)
        response = await _checkout_page(request, ctx, token, hold_id, org_id, CheckoutForm(codes))
        remember_click(request, response, secure=ctx.settings.base_url.startswith("https://"))
        return response
    except PopdropError as error:
        return _trouble(request, error)


@router.post("/checkout/{token}")
async def checkout_post(request: Request, token: str, ctx: Ctx) -> Response:
    """One form, three buttons: `action=apply` re-prices with the typed code,
    `action=pickup` places the order to pay at the lane, `action=pay` places it and sends
    the customer to the payment provider's hosted page."""
    try:
        hold_id, org_id = _read_token(ctx, token)
    except PopdropError as error:
        return _trouble(request, error)
    data = await request.form()
    form = CheckoutForm.of(data)
    action = str(data.get("action", "apply"))
    if form.code:
        form.codes = _clean_codes([*form.codes, form.code], 20)
        form.code = ""
    try:
        check_csrf(request, ctx, data)
    except PopdropError as error:
        return await _checkout_page(request, ctx, token, hold_id, org_id, form, problem=error)
    if action not in ("pickup", "pay"):
        try:
            return await _checkout_page(request, ctx, token, hold_id, org_id, form)
        except PopdropError as error:
            return _trouble(request, error)
    try:
        return await _place(request, ctx, token, hold_id, org_id, form, online=action == "pay")
    except PopdropError as error:
        try:
            fields = _field_errors(error)
            problem = None if fields else error
            return await _checkout_page(
                request, ctx, token, hold_id, org_id, form, problem=problem, field_errors=fields
            )
        except PopdropError as again:
            return _trouble(request, again)


def _field_errors(error: PopdropError) -> dict[str, str]:
    """A refusal of the receipt fields, shown next to the field it belongs to."""
    if error.reason != "invalid_request":
        return {}
    for name in ("receipt_email", "receipt_phone"):
        if error.message.startswith(name):
            return {name: error.message.split(":", 1)[-1].strip() or error.message}
    return {}


async def _place(
    request: Request,
    ctx: AppContext,
    token: str,
    hold_id: int,
    org_id: int,
    form: CheckoutForm,
    *,
    online: bool,
) -> Response:
    now = ctx.clock.now()
    principal = buyer(org_id)
    async with ctx.db.reader() as session:
        view = await load_hold(session, hold_id, org_id)
        existing = await order_of_hold(session, hold_id, org_id)
        hold_ids = await bundle_hold_ids(session, view.hold)
    if existing is not None:  # a second tap on the button: the order is there already
        return RedirectResponse(_view_url(ctx, existing, org_id), status_code=303)
    spec = _order_spec(hold_ids, form, view.hold.contact_ref, click_ids_of(request), online=online)
    provider = stripe_provider(ctx) if online else None
    if online and provider is None:
        raise PopdropError("invalid_request", "online payment is not available; pay at pickup")

    async def work(session: AsyncSession) -> Any:
        return await orders.place_order(session, ctx.signer, principal, spec, now=now)

    order = await ctx.db.in_transaction(work)
    view_url = _view_url(ctx, order.id, org_id)
    if provider is None:
        return RedirectResponse(view_url, status_code=303)
    # The order is committed: a provider refusal now leaves it pending, and its page
    # offers to pay again.
    try:
        started = await settlement.start_online_payment(
            ctx.db, principal, order.id, provider,
            signer=ctx.signer, base_url=ctx.settings.base_url, now=now,
        )  # fmt: skip
    except PopdropError:
        return RedirectResponse(f"{view_url}?failed=1", status_code=303)
    return RedirectResponse(started.redirect_url, status_code=303)


def _order_spec(
    hold_ids: list[int],
    form: CheckoutForm,
    contact_ref: str | None,
    click_ids: list[str],
    *,
    online: bool,
) -> OrderCreate:
    """The order to place; a receipt field that does not validate is refused as
    `invalid_request` naming the field (shown next to it)."""
    # Chat holds carry the conversation's contact ("contact:7") or the chat ("chat:12").
    from_chat = contact_ref is not None and contact_ref.startswith(("chat:", "contact:"))
    data = {
        "hold_ids": hold_ids,
        "codes": form.codes,
        "source": OrderSource.CHAT if from_chat else OrderSource.WEB,
        "source_ref": contact_ref if from_chat else None,
        "contact_ref": contact_ref,
        "receipt_email": form.receipt_email or None,
        "receipt_phone": form.receipt_phone or None,
        "click_ids": click_ids,
        "payment_method": PaymentMethod.STRIPE if online else PaymentMethod.PAY_AT_PICKUP,
    }
    try:
        return OrderCreate.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else "order"
        message = _FRIENDLY.get(name, str(first.get("msg", "not valid")))
        raise PopdropError("invalid_request", f"{name}: {message}") from exc


# ---------------------------------------------------------------- the public Buy button


async def _open_event(ctx: AppContext, event_id: int) -> Event | None:
    async with ctx.db.reader() as session:
        return await session.scalar(
            select(Event).where(Event.id == event_id, Event.status.in_(OPEN_EVENT_STATUSES))
        )


def _to_checkout(
    request: Request, ctx: AppContext, event: Event, hold_id: int, contact_ref: str
) -> Response:
    """303 to the hold's checkout; a first buy also keeps the browser's buyer id."""
    url = links.checkout_url(ctx.signer, ctx.settings.base_url, hold_id, event.org_id)
    response = RedirectResponse(url, status_code=303)
    if not request.cookies.get(BUYER_COOKIE):
        response.set_cookie(
            BUYER_COOKIE,
            contact_ref.removeprefix("web:"),
            max_age=180 * 24 * 3600,
            httponly=True,
            samesite="lax",
            secure=ctx.settings.base_url.startswith("https://"),
        )
    return response


@router.post("/e/{event_id}/buy")
async def buy(request: Request, event_id: ItemId, ctx: Ctx) -> Response:
    """The public event page's Buy button: a hold for this browser, then its checkout.
    A refusal (sold out, not open yet) is shown as a page with a link back."""
    data = await request.form()
    event = await _open_event(ctx, event_id)
    if event is None:
        return _trouble(request, PopdropError("not_found", "this event is not on sale"))
    context = {"event": event}
    try:
        check_csrf(request, ctx, data)
        spec = _buy_spec(data, request)
    except PopdropError as error:
        return _trouble(request, error, context)
    principal = system_principal(event.org_id, "web:buy", scopes=BUYER_SCOPES)

    async def call() -> Any:
        async with ctx.db.reader() as session:
            await _check_lane(session, event, spec.lane_id, spec.slot_id)
        return await inventory.take_hold(ctx.db, principal, spec, now=ctx.clock.now())

    try:
        hold = await public_guarded(ctx, request, event.org_id, call)
    except PopdropError as error:
        if error.reason == "rate_limited":
            raise
        return _trouble(request, error, context)
    return _to_checkout(request, ctx, event, hold.id, spec.contact_ref or "")


def _int_field(data: FormData, name: str, *, default: int | None = None) -> int | None:
    raw = str(data.get(name, "")).strip()
    if not raw:
        return default
    if not raw.isdecimal() or len(raw) > 18:
        raise PopdropError("invalid_request", f"{name}: a whole number")
    return int(raw)


def _buyer_ref(request: Request) -> str:
    """This browser's contact: its buyer cookie, or a new random id (set on the answer)."""
    buyer_id = request.cookies.get(BUYER_COOKIE, "")
    if not (buyer_id.isalnum() and 8 <= len(buyer_id) <= 40):
        buyer_id = secrets.token_hex(8)
    return f"web:{buyer_id}"


def _buy_spec(data: FormData, request: Request) -> HoldCreate:
    variant_id = _int_field(data, "variant_id")
    lane_id = _int_field(data, "lane_id")
    qty = _int_field(data, "qty", default=1)
    if variant_id is None or lane_id is None or qty is None or not 1 <= qty <= MAX_BUY_QTY:
        raise PopdropError("invalid_request", f"pick an item and 1 to {MAX_BUY_QTY} of it")
    return HoldCreate(
        variant_id=variant_id,
        lane_id=lane_id,
        qty=qty,
        slot_id=_int_field(data, "slot_id"),
        contact_ref=_buyer_ref(request),
    )


async def _check_lane(
    session: AsyncSession, event: Event, lane_id: int, slot_id: int | None
) -> None:
    """The lane and window belong to this event (the hold service checks the variant)."""
    lane = await session.scalar(
        select(Lane.id).where(Lane.id == lane_id, Lane.event_id == event.id)
    )
    if lane is None:
        raise PopdropError("not_found", "that pickup lane is not part of this event")
    if slot_id is not None:
        window = await session.scalar(
            select(PickupWindow.id).where(
                PickupWindow.lane_id == lane_id, PickupWindow.slot_id == slot_id
            )
        )
        if window is None:
            raise PopdropError("not_found", "that pickup window is not offered at this lane")


# ---------------------------------------------------------------- bundles on the public page


@dataclass
class BundleLane:
    """Where a bundle can be bought: a lane, how many whole bundles its stock makes, and
    its pickup windows still open (`full` when the window has no room for one bundle)."""

    lane: Lane
    available: int
    windows: list[tuple[TimeSlot, bool]]


@dataclass
class BundleOffer:
    bundle: BundleOut
    lanes: list[BundleLane]

    @property
    def saving_minor(self) -> int:
        return max(self.bundle.list_minor - self.bundle.price_minor, 0)

    @property
    def available(self) -> int:
        return max((lane.available for lane in self.lanes), default=0)


def _reader(org_id: int) -> Principal:
    return system_principal(org_id, "web:public", scopes=frozenset({"events:read"}))


async def bundle_offers(session: AsyncSession, event: Event, now: datetime) -> list[BundleOffer]:
    """The event's active bundles with, per lane that stocks every component, how many
    whole bundles are left (the scarcest component decides) and the open windows."""
    bundles = await catalog.list_bundles(session, _reader(event.org_id), event.id, active_only=True)
    if not bundles:
        return []
    stock = {
        (row.variant_id, row.lane_id): row.available
        for row in await inventory.availability(session, event.id, now)
    }
    lanes = list(
        await session.scalars(select(Lane).where(Lane.event_id == event.id).order_by(Lane.id))
    )
    windows = (
        await session.execute(
            select(PickupWindow, TimeSlot)
            .join(TimeSlot, TimeSlot.id == PickupWindow.slot_id)
            .where(PickupWindow.lane_id.in_([lane.id for lane in lanes]), TimeSlot.ends_at > now)
            .order_by(TimeSlot.starts_at, PickupWindow.id)
        )
    ).all()
    offers = []
    for bundle in bundles:
        units = sum(c.qty for c in bundle.components)  # a window counts every unit
        places = []
        for lane in lanes:
            counts = [stock.get((c.variant_id, lane.id)) for c in bundle.components]
            if not bundle.components or any(n is None for n in counts):
                continue
            left = min((n or 0) // c.qty for n, c in zip(counts, bundle.components, strict=True))
            lane_windows = [
                (slot, window.capacity - window.taken < units)
                for window, slot in windows
                if window.lane_id == lane.id
            ]
            places.append(BundleLane(lane, left, lane_windows))
        offers.append(BundleOffer(bundle, places))
    return offers


@router.get("/e/{event_id}/bundles")
async def bundles_section(request: Request, event_id: ItemId, ctx: Ctx) -> Response:
    """The public page's Bundles section: a fragment for htmx (empty when the event has
    none), a page of its own for a browser without script."""
    event = await _open_event(ctx, event_id)
    if event is None:
        raise not_found("event")
    now = ctx.clock.now()
    async with ctx.db.reader() as session:
        offers = await bundle_offers(session, event, now)
    context = {
        "event": event,
        "offers": offers,
        "selling": event.opens_at is None or event.opens_at <= now,
    }
    name = "commerce/_bundles.html" if is_htmx(request) else "commerce/bundles.html"
    response = render(request, name, context)
    response.headers.update(NO_STORE)  # live stock
    return response


@router.post("/e/{event_id}/buy-bundle")
async def buy_bundle(request: Request, event_id: ItemId, ctx: Ctx) -> Response:
    """A bundle's Buy button: every component held for this browser at the chosen lane
    and window (all or none), then the checkout, which takes all of them. A component
    that cannot be held is named with the reason, on a page; nothing stays held."""
    data = await request.form()
    event = await _open_event(ctx, event_id)
    if event is None:
        return _trouble(request, PopdropError("not_found", "this event is not on sale"))
    context: dict[str, Any] = {"event": event}
    try:
        check_csrf(request, ctx, data)
        bundle_id = _int_field(data, "bundle_id")
        lane_id = _int_field(data, "lane_id")
        slot_id = _int_field(data, "slot_id")
        if bundle_id is None or lane_id is None:
            raise PopdropError("invalid_request", "pick a bundle and a pickup lane")
    except PopdropError as error:
        return _trouble(request, error, context)
    contact_ref = _buyer_ref(request)
    principal = system_principal(event.org_id, "web:buy", scopes=BUYER_SCOPES)
    now = ctx.clock.now()
    shown: BundleOut | None = None

    async def call() -> Any:
        nonlocal shown
        async with ctx.db.reader() as session:
            await _check_lane(session, event, lane_id, slot_id)
            shown = await _event_bundle(session, event, bundle_id)

        async def work(session: AsyncSession) -> Any:
            return await catalog.take_bundle(
                session, principal, bundle_id=bundle_id, lane_id=lane_id, slot_id=slot_id,
                contact_ref=contact_ref, now=now,
            )  # fmt: skip

        return await ctx.db.in_transaction(work)

    try:
        holds = await public_guarded(ctx, request, event.org_id, call)
    except PopdropError as error:
        if error.reason == "rate_limited":
            raise
        return _trouble(request, _bundle_refusal(error, shown), context)
    first = min(hold.id for hold in holds)
    return _to_checkout(request, ctx, event, first, contact_ref)


async def _event_bundle(session: AsyncSession, event: Event, bundle_id: int) -> BundleOut:
    """An active bundle of this event, else 404 `not_found`."""
    try:
        bundle = await catalog.get_bundle(session, _reader(event.org_id), bundle_id)
    except PopdropError as error:
        raise not_found("bundle of this event") from error
    if bundle.event_id != event.id or not bundle.active:
        raise not_found("bundle of this event")
    return bundle


def _bundle_refusal(error: PopdropError, bundle: BundleOut | None) -> PopdropError:
    """The component's refusal, told with the bundle's and the component's names."""
    variant_id = error.detail.get("variant_id") if error.detail else None
    if bundle is None or variant_id is None:
        return error
    part = next((c.title for c in bundle.components if c.variant_id == variant_id), "an item")
    reasons = {
        "sold_out": "is sold out",
        "insufficient_stock": "has not enough left",
        "slot_full": "has no room left in this pickup window",
    }
    why = reasons.get(error.reason, error.message)
    message = (
        f"“{bundle.title}” can't be reserved: {part} {why}. Nothing was held; "
        "pick another pickup lane or window, or buy the items one by one."
    )
    return PopdropError(error.reason, message, status=error.status, detail=error.detail)


# ---------------------------------------------------------------- confirmation


@dataclass
class OrderPage:
    order: Order
    event: Event
    lane: Lane
    slot: TimeSlot | None
    lines: list[OrderLine]


async def load_order(session: AsyncSession, order_id: int, org_id: int) -> OrderPage:
    row = (
        await session.execute(
            select(Order, Event, Lane)
            .join(Event, Event.id == Order.event_id)
            .join(Lane, Lane.id == Order.lane_id)
            .where(Order.id == order_id, Order.org_id == org_id)
        )
    ).first()
    if row is None:
        raise PopdropError("link_invalid", "this link is not valid")
    order, event, lane = row
    slot = await session.get(TimeSlot, order.slot_id) if order.slot_id is not None else None
    lines = list(
        await session.scalars(
            select(OrderLine).where(OrderLine.order_id == order.id).order_by(OrderLine.id)
        )
    )
    return OrderPage(order, event, lane, slot, lines)


# What the customer reads for each status (pending is told apart by the payment method).
STATUS_TEXT = {
    OrderStatus.PAID: "Paid",
    OrderStatus.READY: "Ready for pickup",
    OrderStatus.PICKED_UP: "Picked up",
    OrderStatus.CANCELLED: "Cancelled",
    OrderStatus.EXPIRED: "Expired",
    OrderStatus.REFUNDED: "Refunded",
}


def status_text(order: Order) -> str:
    if order.status == OrderStatus.PENDING:
        if order.payment_method == PaymentMethod.PAY_AT_PICKUP:
            return "Reserved · pay at pickup"
        return "Pending payment"
    return STATUS_TEXT.get(OrderStatus(order.status), order.status)


async def _confirming(session: AsyncSession, order: Order) -> bool:
    """A payment was started at the provider and its webhook has not told us yet (the
    customer is back from the provider's page, or still on it)."""
    if order.status != OrderStatus.PENDING or order.payment_method != PaymentMethod.STRIPE:
        return False
    started = await session.scalar(
        select(Payment.id)
        .where(Payment.order_id == order.id, Payment.status == PaymentStatus.PENDING)
        .limit(1)
    )
    return started is not None


@router.get("/orders/view/{token}")
async def order_view(request: Request, token: str, ctx: Ctx) -> Response:
    now = ctx.clock.now()
    try:
        order_id, org_id = links.read_order_view(ctx.signer, token)
        async with ctx.db.reader() as session:
            page = await load_order(session, order_id, org_id)
            confirming = await _confirming(session, page.order)
            order = page.order
            show_qr = pickup.pickable(order) and not confirming
            secret = await pickup.order_secret(session, order, now=now) if show_qr else None
    except PopdropError as error:
        return _trouble(request, error)
    context = {
        "token": token,
        "page": page,
        "order": order,
        "event": page.event,
        "status_text": status_text(order),
        "confirming": confirming,
        "pay_failed": request.query_params.get("failed") == "1",
        "qr": qr.svg_inline(secret) if secret else None,
        "short_code": pickup.format_code(order.short_code),
        "can_pay": order.status == OrderStatus.PENDING
        and order.payment_method == PaymentMethod.STRIPE
        and stripe_provider(ctx) is not None,
        "breakdown": _breakdown(order),
    }
    return _page(request, "commerce/order_view.html", context)


def _breakdown(order: Order) -> pricing.Breakdown | None:
    """The breakdown stored on the order (the price the customer saw)."""
    try:
        return pricing.Breakdown.from_json(json.loads(order.breakdown))
    except (ValueError, KeyError, TypeError):
        return None


@router.get("/orders/view/{token}/state")
async def order_state(request: Request, token: str, ctx: Ctx) -> Response:
    """What the confirmation polls while a payment is confirmed: 204 while it is still
    pending; once it moved, `HX-Redirect` reloads the page."""
    try:
        order_id, org_id = links.read_order_view(ctx.signer, token)
        async with ctx.db.reader() as session:
            status = await session.scalar(
                select(Order.status).where(Order.id == order_id, Order.org_id == org_id)
            )
    except PopdropError:
        status = None
    if status == OrderStatus.PENDING:
        return Response(status_code=204, headers=NO_STORE)
    return Response(headers={"HX-Redirect": f"/orders/view/{token}", **NO_STORE})


@router.post("/orders/view/{token}/pay")
async def order_pay(request: Request, token: str, ctx: Ctx) -> Response:
    """Pay online again: a pending order whose customer left the provider's page."""
    try:
        check_csrf(request, ctx, await request.form())
        order_id, org_id = links.read_order_view(ctx.signer, token)
        provider = stripe_provider(ctx)
        if provider is None:
            raise PopdropError("invalid_request", "online payment is not available")
        started = await settlement.start_online_payment(
            ctx.db, buyer(org_id), order_id, provider,
            signer=ctx.signer, base_url=ctx.settings.base_url, now=ctx.clock.now(),
        )  # fmt: skip
    except PopdropError as error:
        return _trouble(request, error)
    return RedirectResponse(started.redirect_url, status_code=303)
