"""Content rendering for drops: sandboxed Jinja2 per channel, link tracking, the default
email layout and SMS length rules. Pure: no database, no I/O.

The flow for one recipient:

    compiled = compile_email(subject, text, html, custom_vars={"bundle"})   # once per drop
    ctx = build_context(first_name=..., voucher_code=..., unsubscribe_url=..., ...)
    email = render_email(compiled, ctx, tracker=sign, base_url=..., campaign=drop.slug)

Templates run in `ImmutableSandboxedEnvironment` (no `__class__` escapes, no mutating
lists/dicts) with `StrictUndefined`, and compiling checks every variable name against the
known context, so a typo fails the preview with its line number instead of a send.

Every render is bounded by the sandbox (`drops.sandbox`: output size and time, 422
`template_too_large` / `template_too_slow`, given at preview, seed test, create and send
time). Links and the text fallback are in `drops.tracking`.
"""

from __future__ import annotations

import difflib
import functools
import re
import time
import traceback
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import Template, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from popdrop.core.errors import PopdropError
from popdrop.drops.sandbox import (
    BUDGET,
    HTML_ENV,
    LOOP_GUARD,
    MAX_RENDER_SECONDS,
    TEXT_ENV,
    Budget,
    LimitExceeded,
    check_size,
)
from popdrop.drops.tracking import (
    Link,
    LinkTracker,
    Shortener,
    Tracker,
    html_to_text,
    rewrite_html_links,
    untracked,
)

Medium = Literal["email", "sms"]
SmsEncoding = Literal["GSM-7", "UCS-2"]

# Names every template may use; `build_context` fills all of them (None when not known).
RESERVED_VARS: frozenset[str] = frozenset(
    {
        "first_name",
        "locale",
        "voucher_code",
        "voucher_url",
        "event",
        "unsubscribe_url",
        "preferences_url",
        "organization",
    }
)


# ---------------------------------------------------------------------------- context


@dataclass(frozen=True)
class EventInfo:
    title: str
    starts_at: datetime  # UTC-aware, as stored
    timezone: str  # IANA name, the event's own
    url: str | None = None


def format_event_time(starts_at: datetime, timezone: str) -> str:
    """'Sat 14 Jun 2025, 18:00 CEST': shown in the event's zone, never the server's."""
    try:
        local = starts_at.astimezone(ZoneInfo(timezone))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise PopdropError("invalid_request", f"unknown time zone {timezone!r}") from exc
    return f"{local:%a} {local.day} {local:%b %Y, %H:%M %Z}"


def build_context(
    *,
    first_name: str | None,
    locale: str = "en",
    voucher_code: str | None = None,
    voucher_url: str | None = None,
    event: EventInfo | None = None,
    unsubscribe_url: str | None = None,
    preferences_url: str | None = None,
    organization: str | None = None,
    custom: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The template context for one recipient. Custom variables may not shadow a reserved
    name: a drop variable called `first_name` would silently replace the contact's."""
    ctx: dict[str, Any] = {
        "first_name": (first_name or "").strip(),
        "locale": locale,
        "voucher_code": voucher_code,
        "voucher_url": voucher_url,
        "event": None,
        "unsubscribe_url": unsubscribe_url,
        "preferences_url": preferences_url,
        "organization": organization,
    }
    if event is not None:
        starts_at = format_event_time(event.starts_at, event.timezone)  # validates the zone
        local = event.starts_at.astimezone(ZoneInfo(event.timezone))
        ctx["event"] = {
            "title": event.title,
            "starts_at": starts_at,
            "date": f"{local:%a} {local.day} {local:%b %Y}",
            "time": f"{local:%H:%M}",
            "timezone": event.timezone,
            "starts_at_iso": local.isoformat(),
            "url": event.url,
        }
    for key, value in (custom or {}).items():
        if key in RESERVED_VARS:
            raise PopdropError("invalid_request", f"custom variable {key!r} is a reserved name")
        ctx[key] = value
    return ctx


# -------------------------------------------------------------------------- templates


@dataclass(frozen=True, eq=False)
class CompiledTemplate:
    part: str  # "subject", "text", "html", "preheader", "sms" — named in error messages
    source: str
    template: Template

    def render(self, context: Mapping[str, Any]) -> str:
        budget = Budget(time.monotonic() + MAX_RENDER_SECONDS)
        token = BUDGET.set(budget)
        try:
            out: list[str] = []
            size = 0
            for chunk in self.template.generate(context):
                size += len(chunk)
                check_size(size)
                budget.tick()
                out.append(chunk)
            return "".join(out)
        except LimitExceeded as exc:
            raise PopdropError(
                exc.reason,
                f"{self.part} template: {exc}",
                status=422,
                detail={"part": self.part, "line": _template_line(exc, self.part)},
            ) from None
        except Exception as exc:  # user content: any failure is the template's fault
            line = _template_line(exc, self.part)
            where = f"{self.part} template" + (f", line {line}" if line else "")
            raise PopdropError(
                "invalid_request",
                f"{where}: {exc}",
                detail={"part": self.part, "line": line},
            ) from exc
        finally:
            BUDGET.reset(token)


def _filename(part: str) -> str:
    return f"<popdrop:{part}>"


def _template_line(exc: BaseException, part: str) -> int | None:
    """Jinja rewrites tracebacks so template frames carry the template's own line numbers;
    the innermost frame with our filename is where it failed."""
    lines = [
        f.lineno
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename == _filename(part) and f.lineno
    ]
    return lines[-1] if lines else None


def _error(part: str, line: int | None, message: str) -> PopdropError:
    where = f"{part} template" + (f", line {line}" if line else "")
    return PopdropError(
        "invalid_request", f"{where}: {message}", detail={"part": part, "line": line}
    )


def _check_names(
    ast: nodes.Template, part: str, env: ImmutableSandboxedEnvironment, known: frozenset[str] | None
) -> None:
    # Attributes starting with "_" are refused before the sandbox ever sees them: no
    # legitimate template needs them and it makes the intent plain in the preview.
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value if isinstance(node.arg.value, str) else None
        if name is not None and name.startswith("_"):
            raise _error(part, node.lineno, f"access to {name!r} is not allowed")
    if known is None:
        return
    allowed = known | RESERVED_VARS | set(env.globals)
    unknown = meta.find_undeclared_variables(ast) - allowed
    if not unknown:
        return
    first = min(
        (n for n in ast.find_all(nodes.Name) if n.ctx == "load" and n.name in unknown),
        key=lambda n: n.lineno,
    )
    hint = difflib.get_close_matches(first.name, sorted(allowed - set(env.globals)), n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise _error(part, first.lineno, f"unknown variable {first.name!r}{suggestion}")


def _guard_loops(ast: nodes.Template) -> None:
    """Route every loop's iterable through `_loop_guard` (after the name check: the guard
    is ours, not the author's)."""
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Call(
            nodes.Name(LOOP_GUARD, "load", lineno=loop.lineno),
            [loop.iter],
            [],
            None,
            None,
            lineno=loop.lineno,
        )


@functools.lru_cache(maxsize=512)
def _compile_cached(
    source: str, part: str, html: bool, known: frozenset[str] | None
) -> CompiledTemplate:
    env = HTML_ENV if html else TEXT_ENV
    try:
        ast = env.parse(source, name=part, filename=_filename(part))
    except TemplateSyntaxError as exc:
        raise _error(part, exc.lineno, exc.message or "syntax error") from exc
    _check_names(ast, part, env, known)
    _guard_loops(ast)
    code = env.compile(ast, name=part, filename=_filename(part))
    # A plain dict, not the ChainMap `make_globals` returns: Jinja copies the globals into
    # every render's context, and iterating a ChainMap made that ~15 µs per render.
    template = env.template_class.from_code(env, code, dict(env.make_globals(None)), None)
    return CompiledTemplate(part=part, source=source, template=template)


def compile_template(
    source: str, part: str, *, html: bool = False, custom_vars: Iterable[str] | None = ()
) -> CompiledTemplate:
    """Compile one template, or raise `PopdropError("invalid_request")` naming the part
    and line: syntax errors, `_private` attribute access, and (unless `custom_vars` is
    None) variables that are neither reserved nor declared custom. Cached by source."""
    known = None if custom_vars is None else frozenset(custom_vars)
    return _compile_cached(source, part, html, known)


@dataclass(frozen=True, eq=False)
class CompiledEmail:
    subject: CompiledTemplate
    text: CompiledTemplate | None  # None: derived from the HTML part at render time
    html: CompiledTemplate | None  # None: a plain-text email
    preheader: CompiledTemplate | None = None


@dataclass(frozen=True, eq=False)
class CompiledSms:
    body: CompiledTemplate


def compile_email(
    subject: str,
    text: str | None,
    html: str | None,
    *,
    preheader: str | None = None,
    custom_vars: Iterable[str] | None = (),
) -> CompiledEmail:
    if not subject.strip():
        raise _error("subject", None, "the subject is empty")
    if not (text or "").strip() and not (html or "").strip():
        raise _error("text", None, "an email needs a text or an HTML part")
    names = None if custom_vars is None else frozenset(custom_vars)
    return CompiledEmail(
        subject=compile_template(subject, "subject", custom_vars=names),
        text=compile_template(text, "text", custom_vars=names) if text else None,
        html=compile_template(html, "html", html=True, custom_vars=names) if html else None,
        preheader=(
            compile_template(preheader, "preheader", custom_vars=names) if preheader else None
        ),
    )


def compile_sms(body: str, *, custom_vars: Iterable[str] | None = ()) -> CompiledSms:
    if not body.strip():
        raise _error("sms", None, "the SMS body is empty")
    names = None if custom_vars is None else frozenset(custom_vars)
    return CompiledSms(body=compile_template(body, "sms", custom_vars=names))


def check_render_limits(compiled: CompiledEmail | CompiledSms) -> None:
    """A trial render with sample values, at create time: a template that would blow the
    size or time cap is refused now (`template_too_large` / `template_too_slow`), not at
    send time. Other failures are left to the preview: sample values are not a contact's."""
    sample = build_context(
        first_name="Sample",
        voucher_code="SAMPLE-CODE",
        voucher_url="https://example.invalid/v",
        event=EventInfo(
            "Sample event",
            datetime(2030, 1, 1, 12, tzinfo=ZoneInfo("UTC")),
            "UTC",
            "https://example.invalid/e",
        ),
        unsubscribe_url="https://example.invalid/u",
        preferences_url="https://example.invalid/p",
        organization="Sample",
    )
    parts: list[CompiledTemplate | None]
    if isinstance(compiled, CompiledSms):
        parts = [compiled.body]
    else:
        parts = [compiled.subject, compiled.text, compiled.html, compiled.preheader]
    for part in parts:
        if part is None:
            continue
        try:
            part.render(sample)
        except PopdropError as error:
            if error.reason in ("template_too_large", "template_too_slow"):
                raise


# ----------------------------------------------------------------------- email layout

# One 600px column of nested tables (the only layout every client, Outlook included,
# agrees on), all styles inline, a <style> block only for what inline CSS cannot say (phone
# width, dark mode). Colours are mid-contrast greys that survive the forced inversion of
# Gmail/Outlook dark modes. The preheader is the hidden text inboxes show after the subject;
# the invisible filler after it stops clients from padding the preview with body text.
DEFAULT_EMAIL_LAYOUT = """<!DOCTYPE html>
<html lang="{{ locale }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="x-apple-disable-message-reformatting">
<meta name="color-scheme" content="light dark">
<meta name="supported-color-schemes" content="light dark">
<title>{{ subject }}</title>
<style>
  @media only screen and (max-width: 620px) {
    .pd-container { width: 100% !important; }
    .pd-content { padding: 20px !important; }
  }
  @media (prefers-color-scheme: dark) {
    .pd-bg { background-color: #1c1c1e !important; }
    .pd-card { background-color: #2c2c2e !important; color: #f2f2f7 !important; }
    .pd-card a { color: #8ab4f8 !important; }
    .pd-footer, .pd-footer a { color: #aeaeb2 !important; }
  }
</style>
</head>
<body class="pd-bg" style="margin:0;padding:0;width:100%;background-color:#f2f2f7;">
<div style="display:none;max-height:0;max-width:0;overflow:hidden;opacity:0;mso-hide:all;\
font-size:1px;line-height:1px;color:#f2f2f7;">{{ preheader }}\
{% for _ in range(40) %}&#8199;&#847; {% endfor %}</div>
<table role="presentation" class="pd-bg" width="100%" cellpadding="0" cellspacing="0" \
border="0" style="background-color:#f2f2f7;">
<tr><td align="center" style="padding:24px 12px;">
<table role="presentation" class="pd-container" width="600" cellpadding="0" cellspacing="0" \
border="0" style="width:600px;max-width:600px;">
{%- if organization %}
<tr><td style="padding:0 8px 12px 8px;font-family:-apple-system,BlinkMacSystemFont,'Segoe UI',\
Roboto,Helvetica,Arial,sans-serif;font-size:14px;font-weight:600;color:#48484a;">\
{% if logo_url %}<img src="{{ logo_url }}" alt="{{ organization }}" height="32" \
style="display:block;height:32px;border:0;">{% else %}{{ organization }}{% endif %}</td></tr>
{%- endif %}
<tr><td class="pd-card pd-content" style="background-color:#ffffff;border-radius:8px;\
padding:32px;font-family:-apple-system,BlinkMacSystemFont,'Segoe UI',Roboto,Helvetica,Arial,\
sans-serif;font-size:16px;line-height:1.5;color:#1c1c1e;">
{{ body }}
</td></tr>
<tr><td class="pd-footer" style="padding:16px 8px;font-family:-apple-system,\
BlinkMacSystemFont,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;font-size:12px;\
line-height:1.5;color:#636366;text-align:center;">
{%- if organization %}You get this email because you signed up for drops from \
{{ organization }}.<br>{% endif %}
{%- if unsubscribe_url %}
<a href="{{ unsubscribe_url }}" style="color:#636366;text-decoration:underline;">Unsubscribe</a>
{%- endif %}
{%- if preferences_url %} &middot; <a href="{{ preferences_url }}" \
style="color:#636366;text-decoration:underline;">Email preferences</a>{% endif %}
</td></tr>
</table>
</td></tr>
</table>
</body>
</html>
"""

_LAYOUT_VARS = frozenset({"body", "subject", "preheader", "logo_url"})
# The layout values that change with every message. When the layout only prints them
# (`{{ subject }}`) or tests them (`{% if unsubscribe_url %}`), it is rendered once per
# (locale, organization, logo, which of them are set) with placeholders, and each message
# only joins the pieces: ~5 µs instead of a ~50 µs Jinja render.
_PER_MESSAGE = ("subject", "preheader", "body", "unsubscribe_url", "preferences_url")
_SLOT = "\ue000{}\ue001"
_SLOTS = re.compile("\ue000([a-z_]+)\ue001")


def _only_printed_or_tested(source: str) -> bool:
    ast = HTML_ENV.parse(source)
    allowed: set[int] = set()
    for output in ast.find_all(nodes.Output):
        allowed.update(id(n) for n in output.nodes if isinstance(n, nodes.Name))
    for branch in ast.find_all(nodes.If):
        if isinstance(branch.test, nodes.Name):
            allowed.add(id(branch.test))
    return all(
        id(name) in allowed
        for name in ast.find_all(nodes.Name)
        if name.name in _PER_MESSAGE and name.ctx == "load"
    )


@functools.lru_cache(maxsize=256)
def _layout_pieces(
    source: str, locale: str, organization: str | None, logo_url: str | None, present: str
) -> tuple[str, ...] | None:
    """The layout split around its per-message values: even items are literal HTML, odd
    items name a value. None when the layout uses a value in a way this cannot replay."""
    if not _only_printed_or_tested(source):
        return None
    values: dict[str, Any] = {name: _SLOT.format(name) for name in present.split(",") if name}
    values |= {name: "" for name in _PER_MESSAGE if name not in values}
    page = _compile_cached(source, "layout", True, None).render(
        {"locale": locale, "organization": organization, "logo_url": logo_url, **values}
    )
    if "\ue000" in source or "\ue000" in (organization or "") + (logo_url or "") + locale:
        return None
    return tuple(_SLOTS.split(page))


def _render_layout(source: str, values: dict[str, Any]) -> str:
    present = ",".join(name for name in _PER_MESSAGE if values.get(name))
    pieces = _layout_pieces(
        source, values["locale"], values["organization"], values["logo_url"], present
    )
    if pieces is None:
        return _compile_cached(source, "layout", True, None).render(values)
    out = list(pieces)
    for i in range(1, len(out), 2):
        value = values[out[i]]
        out[i] = str(Markup.escape(value))  # as autoescape would; Markup passes as is
    return "".join(out)


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str | None
    links: tuple[Link, ...]  # tracked links only, in first-seen order


@dataclass(frozen=True)
class RenderedSms:
    body: str
    segments: int
    encoding: SmsEncoding
    links: tuple[Link, ...]


def render_email(
    compiled: CompiledEmail,
    context: Mapping[str, Any],
    *,
    tracker: Tracker,
    base_url: str,
    campaign: str,
    medium: Medium = "email",
    layout: str | None = DEFAULT_EMAIL_LAYOUT,
    logo_url: str | None = None,
    no_track: Collection[str] = (),
) -> RenderedEmail:
    """Render one recipient's email. Links in the drop's HTML and text are rewritten to
    `{base_url}/r/{token}`; the layout's own links (unsubscribe, preferences) are added
    after the rewrite because they must never go through the redirect."""
    links = LinkTracker(
        tracker,
        base_url,
        medium,
        campaign,
        skip=untracked(context, no_track),
    )
    # A subject is a header: newlines in it (from a variable) would inject headers.
    subject = " ".join(compiled.subject.render(context).split())
    preheader = " ".join(compiled.preheader.render(context).split()) if compiled.preheader else ""
    html: str | None = None
    body_html: str | None = None
    if compiled.html is not None:
        body_html = rewrite_html_links(compiled.html.render(context), links.rewrite)
        if layout is None:
            html = body_html
        else:
            html = _render_layout(
                layout,
                {
                    "locale": context.get("locale") or "en",
                    "organization": context.get("organization"),
                    "unsubscribe_url": context.get("unsubscribe_url"),
                    "preferences_url": context.get("preferences_url"),
                    "subject": subject,
                    "preheader": preheader,
                    "logo_url": logo_url,
                    # Safe: produced by the autoescaping HTML render, then only re-emitted
                    # with escaped attributes by the href rewriter.
                    "body": Markup(body_html),  # noqa: S704
                },
            )
    if compiled.text is not None:
        text = links.rewrite_text(compiled.text.render(context)).strip()
    else:
        text = html_to_text(body_html or "")
    unsubscribe = context.get("unsubscribe_url")
    if unsubscribe and unsubscribe not in text:
        # The text part needs the opt-out as much as the HTML footer does.
        text += f"\n\n--\nUnsubscribe: {unsubscribe}"
    return RenderedEmail(subject=subject, text=text, html=html, links=tuple(links.links.values()))


def render_sms(
    compiled: CompiledSms,
    context: Mapping[str, Any],
    *,
    tracker: Tracker,
    base_url: str,
    campaign: str,
    medium: Medium = "sms",
    no_track: Collection[str] = (),
    shortener: Shortener | None = None,
) -> RenderedSms:
    """Render one recipient's SMS; segments are counted after the URLs are rewritten,
    since the tracked URL (the short link where `shortener` gives one) is what the
    carrier bills."""
    links = LinkTracker(
        tracker,
        base_url,
        medium,
        campaign,
        skip=untracked(context, no_track),
        shortener=shortener,
    )
    body = links.rewrite_text(compiled.body.render(context)).strip()
    info = sms_length(body)
    return RenderedSms(
        body=body, segments=info.segments, encoding=info.encoding, links=tuple(links.links.values())
    )


# ------------------------------------------------------------------------ SMS length

# GSM 03.38 default alphabet (one septet each) and its extension table (escape + char,
# two septets). Anything else forces UCS-2 for the whole message.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")


@dataclass(frozen=True)
class SmsLength:
    encoding: SmsEncoding
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2
    segments: int


def sms_encoding(text: str) -> SmsEncoding:
    return "GSM-7" if all(c in _GSM7_BASIC or c in _GSM7_EXTENDED for c in text) else "UCS-2"


def _count_segments(units: list[int], single: int, multi: int) -> int:
    total = sum(units)
    if total == 0:
        return 0
    if total <= single:
        return 1
    # Concatenated parts lose room to the UDH (153 septets / 67 code units), and a
    # character never straddles two parts: an escape pair or a surrogate pair that does
    # not fit starts the next one.
    segments, used = 1, 0
    for size in units:
        if used + size > multi:
            segments += 1
            used = 0
        used += size
    return segments


def sms_length(text: str) -> SmsLength:
    """Encoding and segment count, for "2 SMS segments" in the editor and for billing."""
    if sms_encoding(text) == "GSM-7":
        units = [2 if c in _GSM7_EXTENDED else 1 for c in text]
        return SmsLength("GSM-7", sum(units), _count_segments(units, 160, 153))
    units = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return SmsLength("UCS-2", sum(units), _count_segments(units, 70, 67))


def sms_segments(text: str) -> int:
    return sms_length(text).segments
