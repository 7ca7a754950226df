"""The product's Prometheus counters (served by `/metrics` of the process that counts).

Rules this module keeps:
- Each counter is incremented where the work happens, in the service layer, so every
  path counts (API, pages, chat, worker), not only the HTTP routes. HTTP-level counters
  (requests, redemptions, scans) stay with their routers.
- Counters are per process: drops are counted by the process that sends them (the server
  with the in-process broker; a `popdrop worker` counts its own but serves no /metrics).
- A refusal is labelled with its `PopdropError.reason`, a bounded set of words, never with
  ids or user input, so the number of series stays small.
- Chat turns and holds are counted when the service returns or refuses, inside the
  caller's transaction: a transaction retried after a deadlock counts again.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

from prometheus_client import Counter

from popdrop.core.errors import PopdropError

DROP_MESSAGES = Counter(
    "popdrop_drop_messages_total",
    "Drop messages by channel and outcome (sent, delivered, failed, retry, skipped)",
    ["channel", "result"],
)
CHAT_TURNS = Counter("popdrop_chat_turns_total", "Inbound chat turns by channel", ["channel"])
HOLDS = Counter("popdrop_holds_total", "Hold requests: placed, or the refusal's reason", ["result"])
# Counted when the fold that moved them into the rollups commits (a folded event is counted
# once per process that folds it, and only one fold ever takes a given event).
FUNNEL_EVENTS = Counter(
    "popdrop_funnel_events_total",
    "Funnel log events folded into the rollups, by kind and channel ('none': no channel)",
    ["kind", "channel"],
)

P = ParamSpec("P")
R = TypeVar("R")
_OUTERMOST: dict[int, ContextVar[bool]] = {}  # per counter: a counted call is running


def drop_message(channel: str, status: str) -> None:
    """One drop message checkpointed with this send-row status."""
    DROP_MESSAGES.labels(channel, "retry" if status == "pending" else status).inc()


def funnel_events(kind: str, channel: str, n: int) -> None:
    """`n` events of this kind and channel reached the rollups."""
    FUNNEL_EVENTS.labels(kind, channel or "none").inc(n)


def counted(
    counter: Counter, ok: str
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Count each call of the decorated coroutine function in `counter` (one `result`
    label): `ok` when it returns, the reason when it raises a `PopdropError`. A call made
    while another counted call of the same counter is running (one service delegating to
    another) is not counted again."""
    running = _OUTERMOST.setdefault(id(counter), ContextVar(f"counting:{id(counter)}"))

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(function)
        async def counting(*args: P.args, **kwargs: P.kwargs) -> R:
            if running.get(False):
                return await function(*args, **kwargs)
            token = running.set(True)
            try:
                result = await function(*args, **kwargs)
            except PopdropError as error:
                counter.labels(error.reason).inc()
                raise
            finally:
                running.reset(token)
            counter.labels(ok).inc()
            return result

        return counting

    return decorate
