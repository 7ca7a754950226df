"""The public link of a waiting-list offer: `/w/{token}`, a signed bearer token naming the
event and carrying the offer's voucher code (the link is the code, as a claim link is).

The token does not expire by itself: the offer's own deadline decides (a link opened
after it is answered `expired` by `claim_offer`), so the message, the page and the API
can never disagree about when the offer ends.
"""

from __future__ import annotations

from typing import Any

from popdrop.core.errors import PopdropError
from popdrop.core.signing import Signer

OFFER_LINK_PURPOSE = "waitlist-offer"


def offer_token(signer: Signer, event_id: int, code: str) -> str:
    return signer.sign(OFFER_LINK_PURPOSE, {"e": event_id, "c": code})


def offer_link(signer: Signer, base_url: str, event_id: int, code: str) -> str:
    return f"{base_url.rstrip('/')}/w/{offer_token(signer, event_id, code)}"


def read_offer_token(signer: Signer, token: str) -> tuple[int, str]:
    """(event id, voucher code) of an offer link, or `link_invalid`. Needs no database."""
    payload: Any = signer.unsign(OFFER_LINK_PURPOSE, token)
    if not isinstance(payload, dict):
        raise PopdropError("link_invalid", "this link is not valid")
    event_id, code = payload.get("e"), payload.get("c")
    if not isinstance(event_id, int) or not isinstance(code, str):
        raise PopdropError("link_invalid", "this link is not valid")
    return event_id, code
