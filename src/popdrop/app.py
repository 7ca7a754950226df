"""The app factory: API, pages, health, metrics, consistent JSON errors.

Rules it keeps: an outage of a dependency is never a 500. A lost or refused database
answers 503 `database_unavailable` with Retry-After (from the exception handlers, so the
connection stays usable); Redis is optional at run time (the guard counts in-process, the
relay and broker give up quietly) and `/readyz` names what is down: `degraded` with 200
while the database answers, 503 when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from popdrop import __version__
from popdrop.core import audit, sealing
from popdrop.core.clock import Clock, SystemClock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.logging import configure_logging, log
from popdrop.core.ratelimit import (
    REDIS_DOWN,
    FailureCounter,
    FallbackCounter,
    GuessGuard,
    MemoryCounter,
    RedisCounter,
    redis_client,
)
from popdrop.core.signing import Signer
from popdrop.web.auth import LoginRequired
from popdrop.web.context import AppContext, ForwardedMiddleware, parse_proxies
from popdrop.web.edge import EdgeMiddleware
from popdrop.web.revocation import TokenRevocations

STATIC_DIR = Path(__file__).resolve().parent / "web" / "static"
OPENAPI_URL = "/api/openapi.json"
# Swagger UI from the vendored files (scripts/vendor_static.sh), started by a script file:
# /api/docs works offline and runs under the ordinary page policy (no inline script).
_DOCS_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>popdrop API</title>
<link rel="icon" href="/favicon.ico">
<link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-spec="{OPENAPI_URL}"></div>
<script src="/static/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/static/api-docs.js"></script>
</body>
</html>
"""
_STATUS_REASON = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "invalid_request",
    422: "invalid_request",
    429: "rate_limited",
}


def build_context(settings: Settings, clock: Clock | None = None) -> AppContext:
    """The process's shared services, built from its settings (the composition root).

    Deployment constants that the domains read without being handed them are configured
    here too: the audit ledger's chain count, the secret keys that seal data at rest.
    """
    audit.configure(chains=settings.audit_chains)
    sealing.configure_from(settings)  # the keys that seal check-in keys at rest
    counter: FailureCounter = MemoryCounter()
    if settings.redis_url:
        counter = FallbackCounter(
            RedisCounter(settings.redis_url, timeout=settings.redis_timeout_seconds),
            retry_seconds=settings.redis_retry_seconds,
        )
    return AppContext(
        settings=settings,
        db=Database(
            settings.resolved_database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        ),
        signer=Signer(settings.resolved_secret_key),
        clock=clock or SystemClock(),
        guard=GuessGuard(
            counter,
            per_address=settings.guess_limit_per_address,
            per_token=settings.guess_limit_per_token,
            per_org=settings.guess_limit_per_org,
            window=settings.guess_window_seconds,
        ),
    )


def create_app(settings: Settings | None = None, *, ctx: AppContext | None = None) -> FastAPI:
    settings = settings or (ctx.settings if ctx else Settings())
    configure_logging(settings.log_level)
    context = ctx or build_context(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        from popdrop.audience import import_jobs

        # An import interrupted by a restart picks up after its last committed chunk.
        await import_jobs.resume_jobs(context.db, context.signer, context.clock)
        from popdrop.chat import inbox
        from popdrop.worker import Worker

        # The server ticks and, with the in-process broker, sends drops itself; with
        # POPDROP_BROKER_URL set, `popdrop worker` processes consume what it enqueues.
        context.worker = Worker(settings, context.db, context.signer, context.clock)
        stop = asyncio.Event()
        background = asyncio.create_task(context.worker.run(receive=False, stop=stop))
        # With Redis, pushes for the web chat sockets held here may come from any process.
        relay = context.worker.chat_channels.web_relay
        listening = None
        if relay is not None:

            async def hand_over(org_id: int, address: str, inbox_id: int) -> int:
                return await inbox.hand_over(context.db, context.signer, org_id, address, inbox_id)

            listening = asyncio.create_task(relay.listen(hand_over))
        # With Redis, a token revoked in any process is refused here at once.
        revocations = TokenRevocations(settings.redis_url) if settings.redis_url else None
        watching = None
        if revocations is not None:
            revocations.publish_on_commit(context.db)
            watching = asyncio.create_task(revocations.listen())
        # Short-link clicks are batched in memory and written every ~100 ms, off the
        # redirect's path; the last batch is written on the way out.
        from popdrop.attribution.clicks import recorder_for

        clicks_stop = asyncio.Event()
        clicks = asyncio.create_task(recorder_for(context.db).run(clicks_stop))
        yield
        clicks_stop.set()
        await clicks
        for task in (listening, watching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if revocations is not None:
            await revocations.close()
        stop.set()
        await background
        await context.worker.close()
        await context.guard.counter.close()
        for probe in _probes(_app).values():
            await probe.aclose()
        await context.db.dispose()

    app = FastAPI(
        title="popdrop",
        version=__version__,
        description="Micro-events with chat as the control plane. Errors are "
        '`{"reason": "...", "message": "..."}` with a machine-readable reason.',
        docs_url=None,  # served by _install_docs, from the vendored Swagger UI
        openapi_url=OPENAPI_URL,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ctx = context
    _install_error_handlers(app)
    _install_health(app)
    _install_docs(app)

    from popdrop.attribution.api import public_router as attribution_public
    from popdrop.attribution.api import router as attribution_api
    from popdrop.attribution.pages import router as attribution_pages
    from popdrop.audience.api import router as audience_api
    from popdrop.audience.pages import public_router as audience_public_pages
    from popdrop.audience.pages import router as audience_pages
    from popdrop.chat.flow_pages import router as chat_flow_pages
    from popdrop.chat.flows_api import router as chat_flows_api
    from popdrop.chat.pages import router as chat_pages
    from popdrop.chat.sms_api import router as chat_sms_api
    from popdrop.chat.telegram_api import router as telegram_api
    from popdrop.chat.web import router as chat_web
    from popdrop.checkin.api import router as checkin_api
    from popdrop.checkin.pages import router as checkin_pages
    from popdrop.commerce.api import router as orders_api
    from popdrop.commerce.api import webhook_router as stripe_webhook
    from popdrop.commerce.catalog_api import router as catalog_api
    from popdrop.commerce.checkout_pages import router as checkout_pages
    from popdrop.commerce.pages import router as order_pages
    from popdrop.commerce.pickup_api import public_router as pickup_public
    from popdrop.commerce.pickup_api import router as pickup_api
    from popdrop.drops.api import public_router as drops_public
    from popdrop.drops.api import router as drops_api
    from popdrop.drops.pages import router as drops_pages
    from popdrop.events.api import public_router as events_public
    from popdrop.events.api import router as events_api
    from popdrop.events.home_pages import router as home_pages
    from popdrop.inventory.api import public_router as inventory_public
    from popdrop.inventory.api import router as inventory_api
    from popdrop.inventory.pages import router as event_pages
    from popdrop.inventory.parts_pages import router as part_pages
    from popdrop.partners.api import public_router as partners_public
    from popdrop.partners.api import router as partners_api
    from popdrop.partners.pages import router as partners_pages
    from popdrop.rsvp.api import router as rsvp_api
    from popdrop.rsvp.pages import router as rsvp_pages
    from popdrop.usecases.guest_list_pages import router as guest_pages
    from popdrop.usecases.metrics_api import router as metrics_api
    from popdrop.usecases.metrics_pages import router as metrics_pages
    from popdrop.usecases.partner_report_pages import public_router as partner_report_public
    from popdrop.usecases.partner_report_pages import router as partner_report_pages
    from popdrop.usecases.privacy_api import router as privacy_api
    from popdrop.usecases.privacy_pages import router as privacy_pages
    from popdrop.usecases.public_rsvp import router as public_rsvp
    from popdrop.usecases.survey_pages import public_router as survey_public
    from popdrop.usecases.survey_pages import router as survey_pages
    from popdrop.usecases.war_room_pages import router as war_room_pages
    from popdrop.vouchers.api import router as vouchers_api
    from popdrop.vouchers.pages import router as voucher_pages
    from popdrop.web.account_api import router as accounts_api
    from popdrop.web.pages import router as web_pages

    # The short-link redirect first: it is the hottest public route, and FastAPI matches
    # routes in order (each router ahead of it costs every redirect).
    for router in (
        attribution_public,
        partners_public,  # POS webhooks: a burst of a till's sales
        accounts_api,
        vouchers_api,
        events_api,
        events_public,
        inventory_api,
        inventory_public,
        public_rsvp,
        rsvp_api,
        rsvp_pages,
        web_pages,
        home_pages,
        voucher_pages,
        event_pages,
        part_pages,
        checkin_api,
        checkin_pages,
        catalog_api,
        pickup_api,
        pickup_public,
        orders_api,
        stripe_webhook,
        checkout_pages,
        order_pages,
        attribution_api,
        partners_api,
        attribution_pages,
        partners_pages,
        privacy_api,
        privacy_pages,
        guest_pages,
        audience_api,
        audience_pages,
        audience_public_pages,
        drops_api,
        drops_public,
        drops_pages,
        chat_flows_api,
        chat_flow_pages,
        chat_pages,  # before chat_web: /chat/console is not an organization's widget page
        chat_sms_api,
        telegram_api,
        chat_web,
        metrics_api,
        metrics_pages,
        war_room_pages,
        partner_report_pages,
        partner_report_public,
        survey_pages,
        survey_public,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.max_body_bytes,
        log_requests=settings.log_requests,
        https=settings.base_url.startswith("https://"),
    )
    # Outermost, so every layer sees the real client; a no-op unless proxies are configured.
    app.add_middleware(ForwardedMiddleware, trusted_proxies=parse_proxies(settings.trusted_proxies))
    return app


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    )


def error_response(request: Request, error: PopdropError) -> Response:
    if _wants_html(request):
        from popdrop.web.templating import render

        response: Response = render(request, "error.html", {"error": error}, status=error.status)
    else:
        response = JSONResponse(error.to_dict(), status_code=error.status)
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


DB_RETRY_AFTER_SECONDS = 2
# Local file errors are bugs or configuration, not a peer that went away.
_LOCAL_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)


def _asyncpg_outages() -> tuple[type[BaseException], ...]:
    try:
        import asyncpg.exceptions as pg
    except ImportError:  # SQLite-only installs
        return ()
    return (
        pg.PostgresConnectionError,  # 08xxx, ConnectionDoesNotExistError
        pg.OperatorInterventionError,  # 57xxx: admin shutdown, cannot connect now
        pg.InsufficientResourcesError,  # 53xxx: too many connections
        pg.InterfaceError,  # the connection is closed / in a bad state
    )


_PG_OUTAGES = _asyncpg_outages()


def outage_reason(exc: BaseException) -> str | None:
    """`database_unavailable` / `redis_unavailable` when `exc` (or what caused it) is a lost,
    refused or exhausted connection rather than a bug; None otherwise."""
    current: BaseException | None = exc
    for _ in range(8):  # the cause chain, bounded
        if current is None:
            return None
        if isinstance(current, RedisError):
            return "redis_unavailable"
        if isinstance(current, sa_exc.TimeoutError):  # the pool had no connection in time
            return "database_unavailable"
        if isinstance(current, sa_exc.DBAPIError) and (
            current.connection_invalidated
            or isinstance(current, sa_exc.OperationalError | sa_exc.InterfaceError)
        ):
            return "database_unavailable"
        if _PG_OUTAGES and isinstance(current, _PG_OUTAGES):
            return "database_unavailable"
        if isinstance(current, ConnectionError | TimeoutError):
            return "database_unavailable"
        # asyncio's "Multiple exceptions: Connect call failed" is an OSError without errno
        if (
            isinstance(current, OSError)
            and not isinstance(current, _LOCAL_OS_ERRORS)
            and (current.errno is None or current.errno in _NETWORK_ERRNOS)
        ):
            return "database_unavailable"
        cause = current.__cause__
        if cause is None and not current.__suppress_context__:
            cause = current.__context__
        current = cause
    return None


def outage_error(reason: str) -> PopdropError:
    what = "the database" if reason == "database_unavailable" else "a backing service"
    return PopdropError(
        reason,
        f"{what} is unavailable right now; try again shortly",
        status=503,
        headers={"Retry-After": str(DB_RETRY_AFTER_SECONDS)},
        detail={"retry_after": DB_RETRY_AFTER_SECONDS},
    )


_outage_logged = {"at": 0.0, "quiet": 0}


def _log_outage(request: Request, reason: str, exc: BaseException) -> None:
    """One line a second during an outage, with how many were kept quiet, not one a request."""
    now = time.monotonic()
    if now - _outage_logged["at"] < 1.0:
        _outage_logged["quiet"] += 1
        return
    quiet, _outage_logged["quiet"], _outage_logged["at"] = _outage_logged["quiet"], 0, now
    log.warning(
        "dependency unavailable",
        path=request.url.path,
        reason=reason,
        error=repr(exc),
        also_refused=quiet,
    )


def _crashed(request: Request, exc: BaseException) -> Response:
    log.error("unhandled", path=request.url.path, error=repr(exc), exc_info=exc)
    return JSONResponse(
        {"reason": "internal", "message": "something broke on our side; it is logged"},
        status_code=500,
    )


def _install_error_handlers(app: FastAPI) -> None:
    async def on_infrastructure(request: Request, exc: Exception) -> Response:
        # Registered per exception class (not as the catch-all), so Starlette answers
        # without re-raising and the client's keep-alive connection is not dropped.
        reason = outage_reason(exc)
        if reason is None:
            return _crashed(request, exc)
        _log_outage(request, reason, exc)
        return error_response(request, outage_error(reason))

    for kind in (sa_exc.SQLAlchemyError, OSError, RedisError, *_PG_OUTAGES):
        app.add_exception_handler(kind, on_infrastructure)

    @app.exception_handler(PopdropError)
    async def on_popdrop_error(request: Request, exc: PopdropError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        problems: list[dict[str, Any]] = [
            {"loc": [str(p) for p in e.get("loc", ())], "message": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"loc": [], "message": "invalid request"}
        message = f"{'.'.join(first['loc'][1:]) or 'body'}: {first['message']}"
        error = PopdropError("invalid_request", message, detail={"errors": problems})
        return error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, PopdropError):  # e.g. the body cap, hit while parsing
            return error_response(request, exc.__cause__)
        reason = _STATUS_REASON.get(exc.status_code, "invalid_request")
        error = PopdropError(
            reason, str(exc.detail), status=exc.status_code, headers=dict(exc.headers or {})
        )
        return error_response(request, error)

    @app.exception_handler(LoginRequired)
    async def on_login(request: Request, _exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        reason = outage_reason(exc)  # e.g. raised in a middleware, outside the handlers above
        if reason is not None:
            _log_outage(request, reason, exc)
            return error_response(request, outage_error(reason))
        return _crashed(request, exc)


def _install_health(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        """200 `ready`; 200 `degraded` naming the optional dependencies that are down
        (Redis for the guard and chat relay, the broker); 503 when the database is down."""
        ctx: AppContext = request.app.state.ctx
        try:
            async with ctx.db.reader() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:  # readiness reports, it does not raise
            return JSONResponse(
                {"reason": "unavailable", "message": f"database: {type(exc).__name__}"},
                status_code=503,
                headers={"Retry-After": str(DB_RETRY_AFTER_SECONDS)},
            )
        checks: dict[str, str] = {}
        probes = _probes(request.app)
        for name, url in (("redis", ctx.settings.redis_url), ("broker", ctx.settings.broker_url)):
            if not url:
                continue
            if url not in probes:
                probes[url] = redis_client(url, timeout=ctx.settings.redis_timeout_seconds)
            try:
                await probes[url].ping()
            except REDIS_DOWN as exc:
                checks[name] = f"unavailable: {type(exc).__name__}"
            else:
                checks[name] = "ok"
        down = sorted(name for name, state in checks.items() if state != "ok")
        return JSONResponse(
            {
                "status": "degraded" if down else "ready",
                "database": ctx.db.dialect,
                "dependencies": {"database": "ok", **checks},
                "degraded": down,
            }
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _install_docs(app: FastAPI) -> None:
    @app.get("/api/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(_DOCS_PAGE)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")


def _probes(app: FastAPI) -> dict[str, Redis]:
    """One fail-fast Redis client per URL for /readyz, kept on the app."""
    probes: dict[str, Redis] | None = getattr(app.state, "redis_probes", None)
    if probes is None:
        probes = {}
        app.state.redis_probes = probes
    return probes
