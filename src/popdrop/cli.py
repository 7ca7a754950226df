"""The `popdrop` command (Typer + Rich)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from popdrop.accounts import service as accounts
from popdrop.accounts.service import ROLES, Principal
from popdrop.core import audit, links
from popdrop.core.clock import SystemClock
from popdrop.core.config import Settings
from popdrop.core.csvsafe import SafeWriter
from popdrop.core.db import Database
from popdrop.core.errors import PopdropError
from popdrop.core.migrate import current_revision, upgrade
from popdrop.core.signing import Signer

app = typer.Typer(
    help="popdrop: micro-events with chat as the control plane.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
user_app = typer.Typer(help="Operator accounts.", no_args_is_help=True)
org_app = typer.Typer(help="Organizations (tenants).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
vouchers_app = typer.Typer(help="The voucher vault.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit ledger.", no_args_is_help=True)
contacts_app = typer.Typer(
    help="The audience: import, export, erase and purge contacts.", no_args_is_help=True
)
consent_app = typer.Typer(help="The consent ledger.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.add_typer(vouchers_app, name="vouchers")
app.add_typer(audit_app, name="audit")
app.add_typer(contacts_app, name="contacts")
app.add_typer(consent_app, name="consent")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")

OrgOption = Annotated[str, typer.Option("--org", help="Organization slug.")]


def _run(make: Callable[[Settings, Database, Signer], Awaitable[T]]) -> T:
    """Run one async command with a database; show refusals as `reason: message`."""
    settings = Settings()
    audit.configure(chains=settings.audit_chains)

    async def main() -> T:
        db = Database(settings.resolved_database_url, pool_size=2, max_overflow=2)
        try:
            return await make(settings, db, Signer(settings.resolved_secret_key))
        finally:
            await db.dispose()

    try:
        return asyncio.run(main())
    except PopdropError as error:
        err.print(f"[red]{error.reason}[/red]: {error.message}")
        raise typer.Exit(2) from error


def _cli_principal(org_id: int) -> Principal:
    return accounts.system_principal(org_id, f"cli:{getpass.getuser()}", role="owner")


def _now() -> datetime:
    return SystemClock().now()


# ---------------------------------------------------------------- serve / demo / db


SERVERS = ("uvicorn", "granian")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request (JSON).")] = True,
    server: Annotated[
        str | None,
        typer.Option(
            help="ASGI server: uvicorn or granian (default: POPDROP_SERVER, else uvicorn). "
            "Both run the same app the same way: lifespan start/stop, WebSockets, SSE, "
            "graceful stop on SIGTERM, forwarded headers only from POPDROP_TRUSTED_PROXIES.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Migrate the database, then serve the API and pages (uvicorn or granian). Each server
    process also runs the worker tick; without POPDROP_BROKER_URL it sends drops itself."""
    settings = Settings()
    kind = server or settings.server
    if kind not in SERVERS:
        err.print(f"[red]invalid_request[/red]: --server must be one of {', '.join(SERVERS)}")
        raise typer.Exit(2)
    asyncio.run(upgrade(settings.resolved_database_url))
    settings.resolved_secret_key  # noqa: B018 (create the key before workers race for it)
    os.environ["POPDROP_LOG_REQUESTS"] = "1" if access_log else "0"
    console.print(
        f"popdrop serving on http://{host}:{port}  ({kind}, database: {_db_label(settings)})",
        soft_wrap=True,
    )
    if kind == "granian":
        _serve_granian(host, port, workers)
        return
    import uvicorn

    uvicorn.run(
        "popdrop.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        # Forwarded headers are read by the app, from POPDROP_TRUSTED_PROXIES only
        # (uvicorn's own default would believe any local peer).
        proxy_headers=False,
        # The supervisor kills (SIGKILL: no graceful stop, its click batch lost) a worker
        # that misses a health ping; its 5 s default fired on a busy 2-core machine.
        timeout_worker_healthcheck=30,
    )


def _serve_granian(host: str, port: int, workers: int) -> None:
    """The same app under Granian (a Rust HTTP core): ASGI with lifespan, so every worker
    process runs the app's start-up and, on SIGTERM/SIGINT, its shutdown (the last click
    batch flushed, background tasks stopped). Granian reads no forwarded headers by itself
    (its proxy middleware is opt-in), so the app's POPDROP_TRUSTED_PROXIES rule is the only
    one; the app writes its own access log. A worker that dies is started again, as
    uvicorn does (Granian stops everything on a crash loop)."""
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    Server(
        "popdrop.app:create_app",
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.auto,  # uvloop when installed, as uvicorn picks it
        websockets=True,
        log_level=LogLevels.warning,
        log_access=False,
        respawn_failed_workers=True,
    ).serve(target_loader=_granian_app)


def _granian_app(_target: str) -> Any:
    """Build the app in a Granian worker. A forked worker inherits the main process's
    signal handlers, which only flag the main's own loop: a SIGTERM that came while the
    worker was still importing would be swallowed and the stop would wait for it forever.
    Until Granian installs its own handlers (right after this), a signal ends the worker
    at once: it has served nothing and started no background work yet."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from popdrop.app import create_app

    return create_app()


@app.command()
def worker() -> None:
    """Run a background worker: the periodic tick (start due scheduled drops, decide A/B
    tests, lapse expired waiting-list offers, send the notification outbox, deliver due
    chat messages) and drop sends. With POPDROP_BROKER_URL=redis://… it consumes the shared
    Redis stream, so several workers share the work; killing one loses nothing (its rows
    are claimed again when their lease runs out)."""
    from popdrop.core.clock import SystemClock
    from popdrop.worker import Worker

    settings = Settings()
    asyncio.run(upgrade(settings.resolved_database_url))

    async def main() -> None:
        db = Database(settings.resolved_database_url, pool_size=4, max_overflow=4)
        background = Worker(settings, db, Signer(settings.resolved_secret_key), SystemClock())
        console.print(
            f"popdrop worker {background.sender.worker} "
            f"(broker: {'redis' if settings.broker_url else 'in-process'}, "
            f"mail: {settings.mail_transport}, database: {_db_label(settings)})",
            soft_wrap=True,
        )
        try:
            await background.run(receive=settings.broker_url is not None)
        finally:
            await background.close()
            await db.dispose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def _db_label(settings: Settings) -> str:
    url = settings.resolved_database_url
    return url.split("@")[-1] if "@" in url else url


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "heads",
) -> None:
    """Apply schema migrations (serve and demo do this on start)."""
    settings = Settings()
    asyncio.run(upgrade(settings.resolved_database_url, revision))
    rev = asyncio.run(current_revision(settings.resolved_database_url))
    console.print(f"database at revision [bold]{rev}[/bold] ({_db_label(settings)})")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database."""
    settings = Settings()
    rev = asyncio.run(current_revision(settings.resolved_database_url))
    console.print(rev or "empty database (run `popdrop db upgrade`)")


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve after seeding.")
    ] = True,
) -> None:
    """Seed a demo organization: owner, vouchers, a weekend pop-up event (slots, lanes,
    stock, RSVPs), its chat flow, an audience and a drop, then serve."""
    from popdrop.demo import seed

    settings = Settings()
    if "POPDROP_BASE_URL" not in os.environ:
        # Links printed and signed by the demo must point at the port it serves on.
        settings.base_url = f"http://127.0.0.1:{port}"
        os.environ["POPDROP_BASE_URL"] = settings.base_url
    sandbox_line = _demo_payments(settings, port)
    asyncio.run(upgrade(settings.resolved_database_url))
    info = _run(lambda s, db, signer: seed(s, db, signer))
    console.rule("popdrop demo")
    # soft_wrap: long links and tokens must stay on one line to be copied whole.
    for line in (
        f"Open     {links.login_url(settings.base_url)}",
        f"Login    [bold]{info['email']}[/bold]  password [bold]{info['password']}[/bold]",
        f"API      Authorization: Bearer {info['token']}",
        f"Codes    {info['codes_file']}  (e.g. {info['sample_code']})",
        f"Claim    {info['sample_link']}",
        f"Event    {info['event_url']}  (poster short link: {info['short_link']})",
        f"Links    {info['links_url']}  (short links, QR, clicks, promo codes)",
        f"POS      {info['pos_url']}  (a partner till's sales, attributed by code)",
        f"Chat     {info['chat_url']}  (flows: {settings.base_url}/chat/flows)",
        f"Checkout {info['checkout_url']}  (a fresh 15-minute hold)",
        f"Orders   {settings.base_url}/events/{info['event_id']}/orders  · payments: "
        f"{sandbox_line}",
        f"Door     {settings.base_url}/scan/{info['event_id']}  (scanner) · "
        f"guests: {settings.base_url}/events/{info['event_id']}/guests",
        f"Audience {info['audience']}",
        f"Drop     {info['drop']}",
        f"Insights {info['insights']}",
        f"Report   {info['report_url']}  (the café's ROI report, no login; .pdf / .csv)",
        f"API docs {settings.base_url}/api/docs",
    ):
        console.print(line, soft_wrap=True)
    console.rule()
    if serve_after:
        serve(port=port)


def _demo_payments(settings: Settings, port: int) -> str:
    """Online payments for the demo: the local Stripe sandbox (a fake that speaks Stripe's
    wire format and signs its webhooks) on the next port, unless a real Stripe key is set.
    The server reads the POPDROP_STRIPE_* variables set here."""
    if settings.stripe_secret_key:
        return f"Stripe at {settings.stripe_api_base}"
    from popdrop.commerce import stripe_sandbox

    sandbox = stripe_sandbox.StripeSandbox(
        webhook_url=f"{settings.base_url}/api/v1/payments/stripe/webhook"
    )
    serving = sandbox.serving_in_thread(port=port + 1)
    api_base = serving.__enter__()  # lives as long as the demo process
    os.environ["POPDROP_STRIPE_API_BASE"] = settings.stripe_api_base = api_base
    os.environ["POPDROP_STRIPE_SECRET_KEY"] = settings.stripe_secret_key = (
        stripe_sandbox.SANDBOX_API_KEY
    )
    os.environ["POPDROP_STRIPE_WEBHOOK_SECRETS"] = settings.stripe_webhook_secrets = (
        stripe_sandbox.SANDBOX_WEBHOOK_SECRET
    )
    return f"Stripe sandbox at {api_base} (test mode: no real money)"


# ---------------------------------------------------------------- org / user / token


@org_app.command("create")
def org_create(
    slug: Annotated[str, typer.Argument(help="Short id: lowercase letters, digits, dashes.")],
    name: Annotated[str, typer.Argument(help="Display name.")],
) -> None:
    """Create an organization (tenant)."""

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.transaction() as session:
            org = await accounts.create_organization(session, slug=slug, name=name, now=_now())
        console.print(f"organization {org.slug} (id {org.id}) created")

    _run(go)


@user_app.command("create")
def user_create(
    org: OrgOption,
    email: Annotated[str, typer.Option(help="Login email.")],
    role: Annotated[str, typer.Option(help=f"One of: {', '.join(ROLES)}.")] = "host",
    password: Annotated[
        str | None, typer.Option(help="Password (asked for when omitted; min. 10 characters).")
    ] = None,
) -> None:
    """Create an operator account."""
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.transaction() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            user = await accounts.create_user(
                session,
                org_id=organization.id,
                email=email,
                password=password or "",
                role=role,
                now=_now(),
            )
        console.print(f"user {user.email} ({user.role}) created in {org}")

    _run(go)


@token_app.command("create")
def token_create(
    org: OrgOption,
    name: Annotated[str, typer.Option(help="What the token is for, e.g. 'pos-terminal-1'.")],
    role: Annotated[
        str | None,
        typer.Option(help=f"Every scope of this role: {', '.join(ROLES)}."),
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Repeat for each scope (added to --role's): {', '.join(sorted(accounts.SCOPES))}."
        ),
    ] = None,
    acts_for: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="A partner's token: the partner's login email (the contact email of its "
            "partner rows). It then sees only that partner's orders, POS sales, codes and "
            "links. Required with --role partner.",
        ),
    ] = None,
) -> None:
    """Create an API token from a role's scopes and/or single scopes; it is printed once
    and stored only as a keyed hash."""
    if role is not None and role not in ROLES:
        raise typer.BadParameter(f"one of {', '.join(ROLES)}", param_hint="--role")
    if role == "partner" and not acts_for:
        raise typer.BadParameter(
            "a partner token acts for one partner: give its login email", param_hint="--for"
        )
    if acts_for is not None and "@" not in acts_for:
        raise typer.BadParameter("an email address", param_hint="--for")
    chosen = [*(ROLES[role] if role else ()), *(scope or ())]

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.transaction() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            token, plaintext = await accounts.create_token(
                session,
                signer,
                org_id=organization.id,
                name=name,
                scopes=accounts.parse_scopes(chosen),
                created_by=f"cli:{getpass.getuser()}",
                now=_now(),
                acts_for=acts_for,
            )
        err.print(f"token {token.id} ({token.scopes}) — shown once, store it now:")
        print(plaintext)

    _run(go)


@token_app.command("list")
def token_list(org: OrgOption) -> None:
    """List an organization's API tokens, newest first (never the token itself)."""

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            tokens = await accounts.list_tokens(session, organization.id)
        table = Table("id", "name", "prefix", "scopes", "created", "by", "revoked")
        for t in tokens:
            table.add_row(
                str(t.id),
                t.name,
                f"{t.prefix}…",
                _scopes_label(frozenset(t.scopes.split())),
                f"{t.created_at:%Y-%m-%d %H:%M} UTC",
                t.created_by,
                f"{t.revoked_at:%Y-%m-%d %H:%M} UTC" if t.revoked_at else "",
            )
        console.print(table)

    _run(go)


def _scopes_label(scopes: frozenset[str]) -> str:
    """A role's name when the scopes are exactly that role's, else the scopes."""
    role = next((name for name, its in ROLES.items() if its and its == scopes), None)
    return f"role {role}" if role else ", ".join(sorted(scopes))


@token_app.command("revoke")
def token_revoke(
    org: OrgOption, token_id: Annotated[int, typer.Argument(help="Token id.")]
) -> None:
    """Revoke an API token (refused at once by every server when Redis is configured)."""
    from popdrop.web.revocation import TokenRevocations

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        revocations = TokenRevocations(settings.redis_url) if settings.redis_url else None
        if revocations is not None:
            revocations.publish_on_commit(db)
        try:
            async with db.transaction() as session:
                organization = await accounts.get_organization_by_slug(session, org)
                await accounts.revoke_token(
                    session, org_id=organization.id, token_id=token_id, now=_now()
                )
        finally:
            if revocations is not None:
                await revocations.close()
        console.print(f"token {token_id} revoked")

    _run(go)


# ---------------------------------------------------------------- vouchers


def _parse_when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{name}: ISO 8601, e.g. 2026-12-01T18:00+01:00") from exc
    if parsed.tzinfo is None:
        raise typer.BadParameter(f"{name}: add a time zone offset (e.g. +01:00 or Z)")
    return parsed.astimezone(UTC)


@vouchers_app.command("issue")
def vouchers_issue(
    org: OrgOption,
    name: Annotated[str, typer.Option(help="Batch name, e.g. 'Saturday drop 10% off'.")],
    quantity: Annotated[int, typer.Option(help="How many codes.")],
    out: Annotated[Path, typer.Option(help="CSV file for the plaintext codes (shown once).")],
    max_uses: Annotated[int, typer.Option(help="Uses per code.")] = 1,
    prefix: Annotated[str | None, typer.Option(help="Code prefix (Crockford letters).")] = None,
    tag: Annotated[str | None, typer.Option(help="Tag, for revoking by tag.")] = None,
    valid_from: Annotated[str | None, typer.Option(help="ISO 8601 with offset.")] = None,
    valid_until: Annotated[str | None, typer.Option(help="ISO 8601 with offset.")] = None,
    ttl_hours: Annotated[float | None, typer.Option(help="Hours a code lives from issue.")] = None,
    per_contact_limit: Annotated[int | None, typer.Option(help="Uses per contact.")] = None,
    currency: Annotated[str, typer.Option(help="ISO 4217 currency.")] = "EUR",
    budget_minor: Annotated[int | None, typer.Option(help="Budget in minor units.")] = None,
    cost_per_use_minor: Annotated[int, typer.Option(help="Cost of one use (minor).")] = 0,
    discount_kind: Annotated[str, typer.Option(help="percent, fixed or free_item.")] = "percent",
    discount_value: Annotated[int, typer.Option(help="Percent, or minor units.")] = 10,
    description: Annotated[str, typer.Option(help="What the customer gets.")] = "",
    links: Annotated[bool, typer.Option(help="Add a signed claim link column.")] = False,
) -> None:
    """Issue a batch of codes with a progress bar; the plaintext goes only to --out."""
    from pydantic import ValidationError

    from popdrop.vouchers import service
    from popdrop.vouchers.schemas import BatchCreate

    if out.exists():
        raise typer.BadParameter(f"{out} exists; codes are written once, to a new file")
    try:
        spec = BatchCreate(
            name=name,
            quantity=quantity,
            max_uses=max_uses,
            prefix=prefix,
            tag=tag,
            valid_from=_parse_when(valid_from, "--valid-from"),
            valid_until=_parse_when(valid_until, "--valid-until"),
            ttl_seconds=int(ttl_hours * 3600) if ttl_hours else None,
            per_contact_limit=per_contact_limit,
            currency=currency,
            budget_minor=budget_minor,
            cost_per_use_minor=cost_per_use_minor,
            discount_kind=discount_kind,
            discount_value=discount_value,
            discount_description=description,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise typer.BadParameter(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        now = _now()
        with _progress() as progress:
            task = progress.add_task("issuing", total=quantity)
            async with db.transaction() as session:
                organization = await accounts.get_organization_by_slug(session, org)
                batch, codes = await service.issue_batch(
                    session,
                    signer,
                    _cli_principal(organization.id),
                    spec,
                    now=now,
                    progress=lambda done, total: progress.update(task, completed=done),
                )
        expiry = service.link_expiry(batch, now)
        with out.open("w", newline="") as handle:
            writer = SafeWriter(handle)
            writer.writerow(["code", "link"] if links else ["code"])
            for code in codes:
                row = [code]
                if links:
                    row.append(
                        service.make_link(signer, settings.base_url, code, expires_at=expiry)[0]
                    )
                writer.writerow(row)
        out.chmod(0o600)
        console.print(f"batch {batch.id}: {len(codes)} codes written to {out}")

    _run(go)


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


@vouchers_app.command("revoke")
def vouchers_revoke(
    org: OrgOption,
    code: Annotated[str | None, typer.Option(help="One code.")] = None,
    batch: Annotated[int | None, typer.Option(help="A whole batch by id.")] = None,
    tag: Annotated[str | None, typer.Option(help="Every batch with this tag.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit ledger).")] = "revoked",
) -> None:
    """Revoke one code, a batch, or a tag; links stop working at once."""
    from popdrop.vouchers import service

    if sum(x is not None for x in (code, batch, tag)) != 1:
        raise typer.BadParameter("give exactly one of --code, --batch, --tag")

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.transaction() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            principal = _cli_principal(organization.id)
            common: dict[str, Any] = {
                "reason": reason,
                "now": _now(),
            }
            if code is not None:
                count = await service.revoke_code(session, signer, principal, code=code, **common)
            elif batch is not None:
                count = await service.revoke_batch(session, principal, batch_id=batch, **common)
            else:
                count = await service.revoke_tag(session, principal, tag=tag or "", **common)
        console.print(f"revoked {count} code(s)")

    _run(go)


@vouchers_app.command("export")
def vouchers_export(
    org: OrgOption,
    batch: Annotated[int, typer.Option(help="Batch id.")],
    out: Annotated[Path | None, typer.Option(help="CSV file (default: stdout).")] = None,
) -> None:
    """Export every code's state in a batch as CSV (codes themselves are never stored)."""
    from popdrop.vouchers import service
    from popdrop.vouchers.api import to_csv

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            rows = await service.export_vouchers(
                session, _cli_principal(organization.id), batch, _now()
            )
        text = to_csv(rows)
        if out is None:
            sys.stdout.write(text)
        else:
            out.write_text(text)
            err.print(f"{len(rows)} rows written to {out}")

    _run(go)


@vouchers_app.command("list")
def vouchers_list(org: OrgOption) -> None:
    """List the batches of an organization."""
    from popdrop.vouchers import service

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            batches = await service.list_batches(session, _cli_principal(organization.id))
        table = Table("id", "name", "tag", "codes", "max uses", "valid until", "revoked")
        for b in batches:
            table.add_row(
                str(b.id),
                b.name,
                b.tag or "",
                str(b.quantity),
                str(b.max_uses),
                b.valid_until.isoformat() if b.valid_until else "",
                "yes" if b.revoked_at else "",
            )
        console.print(table)

    _run(go)


# ---------------------------------------------------------------- audit


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute every hash chain; print `OK <n> entries` or the first broken entry (exit 1)."""

    async def go(settings: Settings, db: Database, signer: Signer) -> audit.VerifyResult:
        async with db.reader() as session:
            return await audit.verify(session)

    result = _run(go)
    if result.ok:
        console.print(result.describe())
        return
    err.print(result.describe())
    raise typer.Exit(1)


# ---------------------------------------------------------------- contacts / consent


@contacts_app.command("import")
def contacts_import(
    org: OrgOption,
    file: Annotated[Path, typer.Argument(help="CSV file with a header row (UTF-8).")],
    region: Annotated[
        str | None, typer.Option(help="Region of phone numbers without +, e.g. FR.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="CSV file for the row-level report (line, reason).")
    ] = None,
) -> None:
    """Import contacts from CSV: dedupe on email/phone, never re-subscribe an opt-out.

    Columns: email, phone, first_name, locale, time_zone, tags, interests (separated by ;
    or |), source, lat, lon, consent_email, consent_sms (yes/no), consent_wording,
    consent_proof (consent without a proof is not imported), phone_region. Importing the
    same file again changes nothing.
    """
    from popdrop.audience import importer

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
        with _progress() as progress:
            task = progress.add_task("importing", total=None)
            result = await importer.import_file(
                db,
                signer,
                _cli_principal(organization.id),
                file,
                now=_now(),
                region=region,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        console.print(
            f"{result.total_rows} rows: {result.created} created, {result.updated} updated, "
            f"{result.unchanged} unchanged, {result.refused} refused"
        )
        notes = len(result.problems) - result.refused
        if notes:
            console.print(f"{notes} note(s) on rows that were imported (e.g. consent left out)")
        if report is not None:
            with report.open("w", newline="") as handle:
                writer = SafeWriter(handle)
                writer.writerow(["line", "reason", "field", "message", "refused"])
                for p in result.problems:
                    refused = "yes" if p.reason in importer.REFUSALS else "no"
                    writer.writerow([p.line, p.reason, p.field or "", p.message, refused])
            err.print(f"report: {len(result.problems)} line(s) written to {report}")
        elif result.problems:
            for p in result.problems[:20]:
                err.print(f"line {p.line}: {p.reason}: {p.message}")
            if len(result.problems) > 20:
                err.print(f"... {len(result.problems) - 20} more (use --report FILE)")

    _run(go)


async def _write_chunks(chunks: Any, out: Path) -> int:
    lines = 0
    with out.open("w", newline="") as handle:
        async for chunk in chunks:
            handle.write(chunk)
            lines += chunk.count("\n")
    return max(lines - 1, 0)


@contacts_app.command("export")
def contacts_export(
    org: OrgOption,
    out: Annotated[Path, typer.Option(help="CSV file to write.")],
    sendable: Annotated[
        str | None, typer.Option(help="Only contacts sendable right now on: email or sms.")
    ] = None,
    segment: Annotated[int | None, typer.Option(help="Only this saved segment's.")] = None,
) -> None:
    """Export contacts as CSV with the minimal fields (erased contacts never appear)."""
    from popdrop.audience import exports, segments

    if sendable not in (None, "email", "sms"):
        raise typer.BadParameter("--sendable: email or sms")

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            principal = _cli_principal(organization.id)
            rules = None
            if segment is not None:
                found = await segments.get_segment(session, principal, segment)
                rules = segments.segment_out(found).rules
            chunks = await exports.export_contacts(
                session,
                principal,
                now=_now(),
                sendable="email" if sendable == "email" else "sms" if sendable else None,
                rules=rules,
            )
            count = await _write_chunks(chunks, out)
        err.print(f"{count} contacts written to {out}")

    _run(go)


@consent_app.command("export")
def consent_export(
    org: OrgOption, out: Annotated[Path, typer.Option(help="CSV file to write.")]
) -> None:
    """Export the consent ledger (every grant and revoke, with wording and proof) as CSV."""
    from popdrop.audience import exports

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            chunks = await exports.export_consent(session, _cli_principal(organization.id))
            count = await _write_chunks(chunks, out)
        err.print(f"{count} consent events written to {out}")

    _run(go)


@contacts_app.command("erase")
def contacts_erase(
    org: OrgOption,
    email: Annotated[str | None, typer.Option(help="The person's email.")] = None,
    phone: Annotated[str | None, typer.Option(help="The person's phone (E.164).")] = None,
    contact_id: Annotated[int | None, typer.Option("--id", help="The contact id.")] = None,
) -> None:
    """Erase a person: their email and phone leave every table and their pending
    notifications are dropped; they stay suppressed."""
    from popdrop.usecases import privacy

    if sum(x is not None for x in (email, phone, contact_id)) != 1:
        raise typer.BadParameter("give exactly one of --email, --phone, --id")

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.transaction() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            principal = _cli_principal(organization.id)
            target = contact_id
            if target is None:
                found = await privacy.find_by_point(
                    session, signer, principal, email=email, phone=phone
                )
                target = found.id
            result = await privacy.erase_contact(
                session,
                signer,
                principal,
                target,
                now=_now(),
            )
        scrubbed = ", ".join(f"{k} {v}" for k, v in result.scrubbed.items() if v)
        console.print(
            f"contact {result.contact_id} erased" + (f" ({scrubbed})" if scrubbed else "")
        )

    _run(go)


@contacts_app.command("purge")
def contacts_purge(
    org: OrgOption,
    months: Annotated[
        int | None,
        typer.Option(help="Erase contacts not engaged for this long (default: the org's rule)."),
    ] = None,
) -> None:
    """Retention: erase every contact not engaged for N months."""
    from popdrop.usecases import privacy

    if months is not None and months < 1:
        raise typer.BadParameter("--months: at least 1")

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.transaction() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            result = await privacy.purge_inactive(
                session,
                signer,
                _cli_principal(organization.id),
                now=_now(),
                months=months,
            )
        console.print(
            f"{result.erased} contact(s) not engaged since {result.cutoff:%Y-%m-%d} erased"
        )

    _run(go)


# ---------------------------------------------------------------- chat

chat_app = typer.Typer(
    help="Chat flows: publish a version, list the versions.", no_args_is_help=True
)
app.add_typer(chat_app, name="chat")


@chat_app.command("publish")
def chat_publish(
    file: Annotated[Path, typer.Argument(help="The flow file (YAML; format: docs/chat.md).")],
    org: OrgOption,
    event: Annotated[
        int | None,
        typer.Option(help="Bind to this event id (default: each session's next open event)."),
    ] = None,
    key: Annotated[str, typer.Option(help="The flow key.")] = "popup_drop",
    check: Annotated[bool, typer.Option("--check", help="Validate only; store nothing.")] = False,
) -> None:
    """Validate a flow file and publish it as the next version (new conversations start on
    it; running ones keep theirs). Problems are listed with their line and field."""
    from popdrop.chat import flow_store
    from popdrop.chat.flow import FlowError, load_flow

    try:
        source = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        err.print(f"[red]invalid_request[/red]: {file}: {error}")
        raise typer.Exit(2) from error

    async def publish(db: Database) -> None:
        if check:
            flow = load_flow(source)
            console.print(f"{file}: valid ({flow.title or key}, {len(flow.nodes)} nodes)")
            return
        async with db.transaction() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            row = await flow_store.publish_flow(
                session,
                organization.id,
                key,
                source,
                now=_now(),
                event_id=event,
                created_by=f"cli:{getpass.getuser()}",
            )
        bound = f"event {row.event_id}" if row.event_id else "the next open event"
        console.print(f"{key} version {row.version} published ({row.title or 'untitled'}, {bound})")

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        try:
            await publish(db)
        except FlowError as error:
            err.print(f"[red]invalid_flow[/red]: {file} is not published", highlight=False)
            for problem in error.errors:
                where = f"{file}:{problem['line']}" if problem.get("line") else str(file)
                field = f" {problem['field']}:" if problem.get("field") else ""
                err.print(
                    f"  {where}:{field} {problem['message']}", soft_wrap=True, highlight=False
                )
            raise typer.Exit(2) from error

    _run(go)


@chat_app.command("flows")
def chat_flows(
    org: OrgOption,
    key: Annotated[str, typer.Option(help="The flow key.")] = "popup_drop",
) -> None:
    """The published versions of a flow, newest first (the first is what new sessions use)."""
    from popdrop.chat import flow_store

    async def go(settings: Settings, db: Database, signer: Signer) -> None:
        async with db.reader() as session:
            organization = await accounts.get_organization_by_slug(session, org)
            rows = await flow_store.list_versions(
                session, organization.id, flow_store.check_key(key)
            )
        if not rows:
            console.print(f"no {key} version published: new conversations use the shipped flow")
            return
        table = Table("version", "title", "event", "published", "by")
        for row in rows:
            table.add_row(
                str(row.version),
                row.title,
                str(row.event_id) if row.event_id else "next open",
                f"{row.created_at:%Y-%m-%d %H:%M} UTC",
                row.created_by,
            )
        console.print(table)

    _run(go)


# ---------------------------------------------------------------- check-in keys

checkin_app = typer.Typer(help="Check-in keys (sealed at rest).", no_args_is_help=True)
app.add_typer(checkin_app, name="checkin")


@checkin_app.command("rotate-keys")
def checkin_rotate_keys() -> None:
    """Seal every event's check-in private key under the current POPDROP_SECRET_KEY. After
    changing the key, run it with the old one in POPDROP_PREVIOUS_SECRET_KEYS; then the old
    one can go. Writes nothing when a key opens with none of them."""
    from popdrop.checkin import keys
    from popdrop.core import sealing

    async def go(settings: Settings, db: Database, signer: Signer) -> keys.Rotation:
        sealing.configure_from(settings)
        try:
            return await keys.rotate_all(db)
        except sealing.SealError as error:
            raise PopdropError("key_unreadable", str(error)) from error

    done = _run(go)
    console.print(
        f"{done.resealed} resealed, {done.sealed_raw} sealed (were raw), "
        f"{done.current} already current"
    )


# ---------------------------------------------------------------- metrics

metrics_app = typer.Typer(help="The funnel metrics (log and rollups).", no_args_is_help=True)
app.add_typer(metrics_app, name="metrics")


@metrics_app.command("rebuild")
def metrics_rebuild(
    org: Annotated[
        str | None, typer.Option("--org", help="Organization slug (default: every one).")
    ] = None,
) -> None:
    """Recompute the rollups from the funnel log (one organization, or every one).

    Pages and the API read the rollups: run this after restoring or repairing the log."""
    from sqlalchemy import select

    from popdrop.accounts.models import Organization
    from popdrop.metrics import rollups

    async def go(settings: Settings, db: Database, signer: Signer) -> list[tuple[str, int]]:
        async with db.reader() as session:
            if org is not None:
                found = [await accounts.get_organization_by_slug(session, org)]
            else:
                found = list(await session.scalars(select(Organization).order_by(Organization.id)))
            targets = [(o.slug, o.id) for o in found]
        return [(slug, await rollups.rebuild(db, org_id)) for slug, org_id in targets]

    for slug, events in _run(go):
        console.print(f"{slug}: rollups rebuilt from {events} events")
