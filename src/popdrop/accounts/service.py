"""Organizations, operator accounts and API tokens.

Every service call that reads tenant data takes the caller's `Principal`; the org_id it
carries is applied in the query itself, so tenancy does not depend on the router.

Password login keeps two more rules:
- Failed logins are counted per account (the email as typed, whether or not it exists) and
  per client address; past either limit, password login is refused with `login_locked`
  (429) until the counting window ends, the right password included. The refusal is the
  same for an existing and an unknown email, so it does not reveal which accounts exist.
- A session carries the user's `session_version`; logging out bumps it, which ends every
  session of that account (a replayed cookie is refused, not just forgotten by the browser).

Scopes: a role's scopes are `ROLES[role]`; a token holds the scopes it was made with, never
more than its creator's. Events and RSVPs have their own scopes (`events:*`, `rsvps:*`);
a token holding `vouchers:read`/`vouchers:write` also gets them (`IMPLIED_SCOPES`,
applied by `resolve_token`), because those routes were guarded by the voucher scopes
before, and tokens made then must keep working. A role may have no scope at all (the
partner, until its report exists): it still logs in and sees the home page.

A revoked token is refused at once: resolved tokens are cached per process for
`token_cache_seconds`, and `revoke_token` empties that cache here and signals
`TOKENS_REVOKED` after commit, which `web.revocation` relays to every server process over
Redis when it is configured.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from popdrop.accounts.models import ApiToken, Organization, User
from popdrop.core.cache import ProcessCache
from popdrop.core.db import after_commit, signal_after_commit
from popdrop.core.errors import PopdropError, not_found
from popdrop.core.ratelimit import FailureCounter, address_key
from popdrop.core.schemas import is_clean_text
from popdrop.core.signing import Signer

_HOST = {
    "events:read",
    "events:write",
    "rsvps:read",
    "rsvps:write",
    "vouchers:read",
    "vouchers:write",
    "vouchers:redeem",
    "audit:read",
    "inventory:write",
    "holds:write",
    "checkin",
    "tickets:write",
    "audience:read",
    "audience:write",
    "drops:read",
    "drops:write",
    "chat:read",
    "chat:write",
    "orders:read",
    "orders:write",
    "orders:pickup",
    "pos:read",
    "pos:write",
    "pos:redeem",
    "metrics:read",
    "roi:read",
}
ROLES: dict[str, frozenset[str]] = {
    "owner": frozenset({*_HOST, "tokens:write"}),
    "host": frozenset(_HOST),
    "volunteer": frozenset({"checkin", "orders:pickup"}),
    # A partner reads the orders of the events it partners (commerce filters by event),
    # its own POS connections and sales, and its till redeems vault codes (`pos:redeem`);
    # and its own ROI report for the events it partners (`roi:read`).
    "partner": frozenset({"orders:read", "pos:read", "pos:redeem", "roi:read"}),
}
SCOPES: frozenset[str] = frozenset().union(*ROLES.values())
# Events and RSVPs were guarded by the voucher scopes before they had their own, so a
# token holding `vouchers:read`/`vouchers:write` keeps reaching them: its scopes are
# widened by this table whenever the token is resolved. Only this direction: a token with
# `events:read` alone reads events and RSVPs' events, never vouchers.
IMPLIED_SCOPES: dict[str, frozenset[str]] = {
    "vouchers:read": frozenset({"events:read", "rsvps:read"}),
    "vouchers:write": frozenset({"events:write", "rsvps:write"}),
}
TOKEN_PREFIX = "pd_"  # noqa: S105 (a public marker, not a secret)
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_hasher = PasswordHasher()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an operator (via session) or an API token."""

    org_id: int
    actor: str
    role: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    acts_for: str | None = None  # a partner token's partner login (email)

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PopdropError("forbidden", f"this needs the {scope!r} permission")


def partner_email(principal: Principal) -> str:
    """The partner login a `partner` principal stands for: a partner token's `acts_for`,
    or the logged-in partner user's email."""
    if principal.acts_for:
        return principal.acts_for
    return principal.actor.split(":", 1)[1] if ":" in principal.actor else principal.actor


def with_implied(scopes: frozenset[str]) -> frozenset[str]:
    """`scopes` plus every scope they imply (`IMPLIED_SCOPES`; one level, no chains)."""
    return scopes.union(*(IMPLIED_SCOPES.get(scope, frozenset()) for scope in scopes))


def system_principal(
    org_id: int, actor: str, *, scopes: frozenset[str] | None = None, role: str = "system"
) -> Principal:
    """The one constructor for work done on an organization's behalf without a user
    session or an API token: the worker, chat, the CLI, the demo, import jobs.

    `actor` names the job in the audit ledger ("system:drops", "cli:alice"); `scopes`
    default to those of `role` (so `role="owner"` gets what an owner gets), and the role
    "system" has none of its own, so a system principal always lists what it may do.
    """
    if scopes is None:
        if role not in ROLES:
            raise ValueError(f"a {role!r} principal needs explicit scopes")
        scopes = ROLES[role]
    return Principal(org_id, actor, role, scopes)


def principal_for_user(user: User) -> Principal:
    return Principal(user.org_id, f"user:{user.email}", user.role, ROLES[user.role])


def principal_id(principal: Principal) -> str:
    """Who is calling, in at most 64 characters and stable across a token's renaming:
    `token:<id>` for an API token, else the actor (hashed when longer). Binds an
    `Idempotency-Key` to its caller."""
    if principal.role in ("token", "partner") and principal.actor.startswith("token:"):
        return ":".join(principal.actor.split(":", 2)[:2])
    if len(principal.actor) <= 64:
        return principal.actor
    kind = principal.actor.split(":", 1)[0][:16]
    return f"{kind}:sha256:{hashlib.sha256(principal.actor.encode()).hexdigest()[:40]}"


async def create_organization(
    session: AsyncSession, *, slug: str, name: str, now: datetime
) -> Organization:
    if not _SLUG.match(slug):
        raise PopdropError("invalid_request", "slug: lowercase letters, digits and dashes")
    org = Organization(slug=slug, name=name, created_at=now)
    session.add(org)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise PopdropError("conflict", f"organization {slug!r} exists") from exc
    return org


async def get_organization_by_slug(session: AsyncSession, slug: str) -> Organization:
    org = await session.scalar(select(Organization).where(Organization.slug == slug))
    if org is None:
        raise not_found(f"organization {slug!r}")
    return org


async def create_user(
    session: AsyncSession, *, org_id: int, email: str, password: str, role: str, now: datetime
) -> User:
    if role not in ROLES:
        raise PopdropError("invalid_request", f"role must be one of {', '.join(ROLES)}")
    if len(password) < 10:
        raise PopdropError("invalid_request", "password: at least 10 characters")
    user = User(
        org_id=org_id,
        email=email.strip().lower(),
        password_hash=_hasher.hash(password),
        role=role,
        created_at=now,
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise PopdropError("conflict", f"user {email!r} exists") from exc
    return user


# Verifying against a real hash when the user is unknown keeps timing the same.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


async def authenticate(session: AsyncSession, email: str, password: str) -> User:
    if not is_clean_text(email) or not is_clean_text(password) or len(email) > 254:
        raise PopdropError("unauthorized", "wrong email or password")
    user = await session.scalar(select(User).where(User.email == email.strip().lower()))
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError) as exc:
        raise PopdropError("unauthorized", "wrong email or password") from exc
    if user is None or user.disabled_at is not None:
        raise PopdropError("unauthorized", "wrong email or password")
    return user


async def get_user(session: AsyncSession, user_id: int) -> User | None:
    user = await session.get(User, user_id)
    if user is None or user.disabled_at is not None:
        return None
    return user


async def session_user(session: AsyncSession, user_id: int, version: int) -> User | None:
    """The user a session cookie names, if that session has not been ended by a logout."""
    user = await get_user(session, user_id)
    if user is None or user.session_version != version:
        return None
    return user


async def end_sessions(session: AsyncSession, user_id: int, version: int) -> None:
    """Logout: bump the version so every cookie carrying `version` is refused from now on.
    Conditional on the version, so a replayed old logout does not end a newer session."""
    await session.execute(
        update(User)
        .where(User.id == user_id, User.session_version == version)
        .values(session_version=User.session_version + 1)
    )


class LoginThrottle:
    """Failed password logins per account and per address, in fixed windows of the shared
    failure counter (Redis when configured). Accounts are keyed by a keyed hash of the email,
    so the store never holds an address book."""

    def __init__(
        self,
        counter: FailureCounter,
        signer: Signer,
        *,
        per_account: int,
        per_address: int,
        window: int,
    ) -> None:
        self.counter = counter
        self.signer = signer
        self.per_account = per_account
        self.per_address = per_address
        self.window = window

    def _keys(self, email: str, address: str) -> list[str]:
        account = self.signer.keyed_hash("login\x00" + email.strip().lower()).hex()[:32]
        return [f"login:acct:{account}", f"login:addr:{address_key(address)}"]

    async def check(self, email: str, address: str) -> None:
        """Raise `login_locked` (429, Retry-After) while this account or address is locked.

        Failures of this window and the one before count together, so a lock reached just
        before a window ends does not lift a second later: at most `per_account` failures
        fit in any two consecutive windows."""
        keys = self._keys(email, address)
        before = await self.counter.counts(keys, self.window, ago=1)
        now = await self.counter.counts(keys, self.window)
        limits = (self.per_account, self.per_address)
        if not any(b + n >= limit for b, n, limit in zip(before, now, limits, strict=True)):
            return
        retry = max(self.window - int(time.time()) % self.window, 1)
        if any(n >= limit for n, limit in zip(now, limits, strict=True)):
            retry += self.window  # this window's failures alone keep the next one locked
        minutes = (retry + 59) // 60
        raise PopdropError(
            "login_locked",
            "too many failed logins: password login is paused for this account or "
            f"network; try again in {minutes} minute{'s' if minutes != 1 else ''}",
            status=429,
            headers={"Retry-After": str(retry)},
            detail={"retry_after": retry},
        )

    async def failed(self, email: str, address: str) -> None:
        await self.counter.add(self._keys(email, address), self.window)


def parse_scopes(scopes: list[str] | str) -> frozenset[str]:
    items = scopes.split() if isinstance(scopes, str) else scopes
    chosen = frozenset(s.strip() for s in items if s.strip())
    unknown = chosen - SCOPES
    if unknown:
        raise PopdropError(
            "invalid_request",
            f"unknown scope(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SCOPES))}",
        )
    if not chosen:
        raise PopdropError("invalid_request", "a token needs at least one scope")
    return chosen


async def create_token(
    session: AsyncSession,
    signer: Signer,
    *,
    org_id: int,
    name: str,
    scopes: frozenset[str],
    created_by: str,
    now: datetime,
    acts_for: str | None = None,
) -> tuple[ApiToken, str]:
    """Return the row and the plaintext token; the plaintext is never stored or shown again.

    `acts_for` (a partner login's email) makes it a partner's token: it resolves to the
    `partner` role, so it sees only that partner's data whatever its scopes."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        org_id=org_id,
        name=name,
        token_hash=signer.keyed_hash(plaintext),
        prefix=plaintext[:11],
        scopes=" ".join(sorted(scopes)),
        created_at=now,
        created_by=created_by,
        acts_for=acts_for.lower() if acts_for else None,
    )
    session.add(token)
    await session.flush()
    return token, plaintext


async def revoke_token(session: AsyncSession, *, org_id: int, token_id: int, now: datetime) -> None:
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.org_id == org_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(ApiToken.id)
    )
    if result.first() is None:
        raise not_found("token")
    forget_tokens()
    # Again once committed (a request resolving the token meanwhile still saw it live),
    # and every other process through the topic's listeners (web.revocation, over Redis).
    after_commit(session, _forget_tokens_now, key=TOKENS_REVOKED)
    signal_after_commit(session, TOKENS_REVOKED)


# Resolved tokens (by keyed hash) for a couple of seconds, so a burst does not re-read the
# table. A revocation empties it in this process at once and, through `TOKENS_REVOKED`
# (relayed over Redis when configured), in every other; without Redis, other processes
# notice within the TTL.
TOKEN_CACHE: ProcessCache[bytes, Principal] = ProcessCache(maxsize=10_000)
TOKENS_REVOKED = "accounts.tokens_revoked"  # after-commit topic of revoke_token


def forget_tokens() -> None:
    """Drop every resolved token of this process: the next call of each reads the table."""
    TOKEN_CACHE.clear()


async def _forget_tokens_now() -> None:
    forget_tokens()


def cached_token(signer: Signer, plaintext: str) -> Principal | None:
    """The principal of a token resolved moments ago, without touching the database."""
    return TOKEN_CACHE.get(signer.keyed_hash(plaintext))


async def resolve_token(
    session: AsyncSession, signer: Signer, plaintext: str, *, cache_ttl: float
) -> Principal:
    if not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) > 200:
        raise PopdropError("unauthorized", "not a popdrop API token")
    key = signer.keyed_hash(plaintext)
    cached = TOKEN_CACHE.get(key)
    if cached is not None:
        return cached
    token = await session.scalar(
        select(ApiToken).where(ApiToken.token_hash == key, ApiToken.revoked_at.is_(None))
    )
    if token is None:
        raise PopdropError("unauthorized", "unknown or revoked API token")
    scopes = with_implied(frozenset(token.scopes.split()))
    role = "partner" if token.acts_for else "token"
    principal = Principal(
        token.org_id, f"token:{token.id}:{token.name}", role, scopes, acts_for=token.acts_for
    )
    if cache_ttl > 0:
        TOKEN_CACHE.put(key, principal, cache_ttl)
    return principal


async def list_tokens(session: AsyncSession, org_id: int) -> list[ApiToken]:
    rows = await session.scalars(
        select(ApiToken).where(ApiToken.org_id == org_id).order_by(ApiToken.id.desc())
    )
    return list(rows)
