"""A waiting-list offer names its slot as every page does: the window on the event's own
clock (`core.localtime.slot_label`), in the SMS, chat and email texts alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from popdrop.core.localtime import DASH
from popdrop.core.signing import Signer
from popdrop.outbound.outbox import Channel
from popdrop.usecases.notify import RenderContext, render_waitlist_offer

NOW = datetime(2030, 1, 10, 12, tzinfo=UTC)
SLOT = datetime(2030, 1, 11, 16, tzinfo=UTC)  # 11:00 in New York


class _Reader:
    """The one read the renderer makes: the offer, its event and its slot."""

    def __init__(self, *row: Any) -> None:
        self.row = row

    async def execute(self, _statement: Any) -> Any:
        return SimpleNamespace(first=lambda: self.row)


@pytest.mark.parametrize("channel", [Channel.SMS, Channel.CHAT, Channel.EMAIL])
async def test_offer_names_the_slot_on_the_event_clock(channel: Channel) -> None:
    offer = SimpleNamespace(status="open", places=1, expires_at=NOW + timedelta(hours=2))
    event = SimpleNamespace(id=7, title="Pop-up", timezone="America/New_York")
    slot = SimpleNamespace(starts_at=SLOT, ends_at=SLOT + timedelta(hours=2), label="Early")
    context = RenderContext(Signer(b"k" * 48), "https://pop.example", NOW)
    message = await render_waitlist_offer(
        _Reader(offer, event, slot),  # type: ignore[arg-type]
        SimpleNamespace(org_id=1, channel=channel),  # type: ignore[arg-type]
        {"offer": 1, "code": "ABCD-EFGH"},
        context,
    )
    assert message is not None
    assert f"(Early · Fri 11 Jan, 11:00{DASH}13:00 EST)" in message.text
    assert "Thu 10 Jan, 09:00 EST" in message.text  # the deadline, on the same clock
