"""What a request handler needs from the process: settings, database, signer, clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from popdrop.core.clock import Clock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.ratelimit import GuessGuard
from popdrop.core.signing import Signer


@dataclass
class AppContext:
    settings: Settings
    db: Database
    signer: Signer
    clock: Clock
    guard: GuessGuard
    worker: Any = None  # popdrop.worker.Worker while serving (in-process background work)


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
