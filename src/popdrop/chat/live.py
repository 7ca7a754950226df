"""The web chat sockets open in this process, so scheduled messages (reminders, the
day-after survey) and host messages reach a visitor who is connected right now.

A visitor who is not connected here (closed tab, another server process) gets them on
no channel: the web widget keeps its transcript in the browser, and web chat has no
address to reach someone who left. `popdrop serve` runs the worker tick in the same
process as the sockets, which is what makes this work there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]

_OPEN: dict[tuple[int, str], Send] = {}


def register(org_id: int, address: str, send: Send) -> None:
    _OPEN[(org_id, address)] = send


def unregister(org_id: int, address: str, send: Send) -> None:
    if _OPEN.get((org_id, address)) is send:
        del _OPEN[(org_id, address)]


async def push(org_id: int, address: str, frame: dict[str, Any]) -> bool:
    """Send `frame` to the visitor's open socket; False when they are not connected here."""
    send = _OPEN.get((org_id, address))
    if send is None:
        return False
    try:
        await send(frame)
    except Exception:  # closed meanwhile: the socket's own loop cleans up
        return False
    return True
