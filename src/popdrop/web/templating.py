"""Jinja2 pages: one environment over the shared layout and each domain's templates."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape

from popdrop.core.localtime import slot_label
from popdrop.web.auth import attach_csrf_cookie, csrf_token
from popdrop.web.context import get_ctx

_ROOT = Path(__file__).resolve().parent.parent
# The shared layout first, then every package's own `templates/` (names are prefixed by
# the package, e.g. "events/detail.html"), so the kit names no domain.
_DIRS = [
    _ROOT / "web" / "templates",
    *sorted(d for d in _ROOT.glob("*/templates") if d.parent.name != "web"),
]

_env = Environment(
    loader=ChoiceLoader([FileSystemLoader(str(d)) for d in _DIRS]),
    autoescape=select_autoescape(["html", "xml"]),
)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


_env.filters["when"] = _when
_env.globals["slot_label"] = slot_label  # a slot's window on its event's clock
templates = Jinja2Templates(env=_env)


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, status: int = 200
) -> HTMLResponse:
    ctx = get_ctx(request)
    data = {"csrf": csrf_token(request, ctx), "app_name": "popdrop"}
    data.update(context or {})
    response = templates.TemplateResponse(request, name, data, status_code=status)
    attach_csrf_cookie(request, response)
    return response
