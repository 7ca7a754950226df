"""Content rendering for drops: sandboxed Jinja2 per channel, link tracking, the default
email layout and SMS length rules. Pure: no database, no I/O.

The flow for one recipient:

    compiled = compile_email(subject, text, html, custom_vars={"bundle"})   # once per drop
    ctx = build_context(first_name=..., voucher_code=..., unsubscribe_url=..., ...)
    email = render_email(compiled, ctx, tracker=sign, base_url=..., campaign=drop.slug)

Templates run in `ImmutableSandboxedEnvironment` (no `__class__` escapes, no mutating
lists/dicts) with `StrictUndefined`, and compiling checks every variable name against the
known context, so a typo fails the preview with its line number instead of a send.

Every render is bounded (`_CappedEnvironment`): at most `MAX_RENDER_CHARS` of output per
part (`template_too_large`) and `MAX_RENDER_SECONDS` of work (`template_too_slow`), both
422 and both given at preview, seed test, create (a trial render) and send time. The
bound holds inside a render too, not only on its output: `*`, `**` and `+` are
intercepted, the string-multiplying filters and `str` methods (join, replace, indent,
wordwrap, format, …) have their result size estimated before they run, every loop checks
the clock per item, and `namespace` and `lipsum` (the ways to grow a value across loop
iterations or for free) are not available.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import re
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from html import escape, unescape
from html.parser import HTMLParser
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from popdrop.core.errors import PopdropError

Medium = Literal["email", "sms"]
SmsEncoding = Literal["GSM-7", "UCS-2"]
Tracker = Callable[[str], str]  # destination URL (UTM added) → signed token for /r/{token}

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


def _fallback(value: Any, default: str = "there") -> Any:
    """`{{ first_name | fallback("friend") }}`: the default when the value is missing,
    None or blank. Checks Undefined first: StrictUndefined raises on bool()."""
    if isinstance(value, Undefined) or value is None:
        return default
    if isinstance(value, str) and not value.strip():
        return default
    return value


# ------------------------------------------------------------------------- render caps

# An email part past 1 MB is no email (Gmail clips at 102 KB); a render past 2 s is a loop.
MAX_RENDER_CHARS = 1_000_000
MAX_RENDER_SECONDS = 2.0
LOOP_GUARD = "popdrop_loop_guard"  # wraps every {% for %} iterable (see `_guard_loops`)


class _LimitExceeded(Exception):
    """Internal: raised inside a render, turned into PopdropError by `CompiledTemplate`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Budget:
    deadline: float

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(
                "template_too_slow", f"it took more than {MAX_RENDER_SECONDS:g} s to render"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "popdrop_render_budget", default=None
)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick()


def _too_large(size: int) -> _LimitExceeded:
    return _LimitExceeded(
        "template_too_large",
        f"it would produce about {size:,} characters (the limit is {MAX_RENDER_CHARS:,})",
    )


def _check_size(size: int) -> None:
    if size > MAX_RENDER_CHARS:
        raise _too_large(size)


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict) else 0


def _check_args(args: Iterable[Any]) -> None:
    for arg in args:
        # An int argument is a width or a count; none legitimately exceeds the output cap.
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_RENDER_CHARS:
            raise _too_large(abs(arg))
        _check_size(_sized(arg))


_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width of a million or more in a format spec


def _join_items(separator: Any, iterable: Any) -> list[Any]:
    """The items of a join, materialized (a generator can be counted only once), after
    checking that the separators alone stay under the cap."""
    items = list(iterable)
    _check_size(len(str(separator)) * len(items))
    return items


def _estimate(name: str, subject: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse the few operations whose result can dwarf their inputs, before they run."""
    text = subject if isinstance(subject, str) else ""
    first = args[0] if args else None
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        hits = len(text) + 1 if not old else text.count(old)
        _check_size(len(text) + hits * len(new))
    elif name == "expandtabs":
        size = first if isinstance(first, int) else int(kwargs.get("tabsize", 8))
        _check_size(len(text) + text.count("\t") * size)
    elif name == "indent":
        width = first if first is not None else kwargs.get("width", 4)
        per_line = width if isinstance(width, int) else len(str(width))
        _check_size(len(text) + (text.count("\n") + 1) * per_line)
    elif name == "wordwrap":
        width = first if isinstance(first, int) else int(kwargs.get("width", 79))
        wrap = str(kwargs.get("wrapstring") or (args[2] if len(args) > 2 else "") or "\n")
        _check_size(len(text) + (len(text) // max(width, 1) + 1) * len(wrap))
    elif name == "urlize":
        extra = sum(len(str(v)) for v in (*args, *kwargs.values()) if isinstance(v, str))
        _check_size(len(text) * 2 + (text.count(".") + 1) * extra)
    elif name in ("format", "format_map") and _WIDE_FORMAT.search(text):
        raise _too_large(MAX_RENDER_CHARS + 1)
    return None


def _capped_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps `jinja_pass_arg` (pass_context & co.)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_args((*args, *kwargs.values()))
        # The filtered value is the first argument after an optional context/eval context.
        offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        subject = args[offset] if len(args) > offset else None
        rest = args[offset + 1 :]
        if name == "join":
            separator = rest[0] if rest else kwargs.get("d", "")
            args = (*args[:offset], _join_items(separator, subject or ()), *rest)
        else:
            _estimate(name, subject, rest, kwargs)
        result = func(*args, **kwargs)
        _check_size(_sized(result))
        return result

    return guarded


def _loop_guard(iterable: Any) -> Iterator[Any]:
    """Every `{% for %}` iterates through this: the clock is checked per item, so nested
    loops cannot run unbounded even when they print nothing."""
    for item in iterable:
        _tick()
        yield item


class _CappedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})  # also stops compile-time folding

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and _sized(seq):
                    _check_size(_sized(seq) * max(times, 0))
        elif operator == "+":
            _check_size(_sized(left) + _sized(right))
        elif operator == "**" and isinstance(left, int | float) and isinstance(right, int | float):
            # A huge power is pure CPU; the digits of a few thousand bits are plenty.
            bits = abs(int(left)).bit_length() * max(int(right), 0)
            if bits > 10_000:
                raise _too_large(bits)
        return super().call_binop(context, operator, left, right)

    def call(
        __self,  # the base class's parameter names, kept for the override
        __context: Any,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        _tick()
        _check_args((*args, *kwargs.values()))
        # The sandbox hands `str.format` over wrapped; the bound method is `__wrapped__`.
        method = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            name = getattr(method, "__name__", "")
            if name == "join" and args:
                args = (_join_items(owner, args[0]), *args[1:])
            else:
                _estimate(name, owner, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        _check_size(_sized(result))
        return result


def _make_env(autoescape: bool) -> ImmutableSandboxedEnvironment:
    env = _CappedEnvironment(
        autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=False
    )
    env.filters["fallback"] = _fallback
    env.filters = {name: _capped_filter(name, f) for name, f in env.filters.items()}
    # `namespace` is the one way to carry a value across loop iterations (doubling it 40
    # times is a terabyte); `lipsum(n)` is n paragraphs of filler nobody sends.
    del env.globals["namespace"], env.globals["lipsum"]
    env.globals[LOOP_GUARD] = _loop_guard
    return env


# Two environments: HTML parts autoescape (a first name of "<script>" stays text), plain
# parts (subject, text, SMS) must not, or "Tom & Jerry" would arrive as "Tom &amp; Jerry".
_HTML_ENV = _make_env(autoescape=True)
_TEXT_ENV = _make_env(autoescape=False)


@dataclass(frozen=True, eq=False)
class CompiledTemplate:
    part: str  # "subject", "text", "html", "preheader", "sms" — named in error messages
    source: str
    template: Template

    def render(self, context: Mapping[str, Any]) -> str:
        budget = _Budget(time.monotonic() + MAX_RENDER_SECONDS)
        token = _BUDGET.set(budget)
        try:
            out: list[str] = []
            size = 0
            for chunk in self.template.generate(context):
                size += len(chunk)
                _check_size(size)
                budget.tick()
                out.append(chunk)
            return "".join(out)
        except _LimitExceeded as exc:
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
            _BUDGET.reset(token)


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
    env = _HTML_ENV if html else _TEXT_ENV
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


# ------------------------------------------------------------------------------ links


@functools.lru_cache(maxsize=4096)  # the same shop links recur in every message of a drop
@functools.lru_cache(maxsize=4096)  # a drop's links repeat in every message
def add_utm(url: str, medium: str, campaign: str) -> str:
    """Append utm_source=popdrop, utm_medium and utm_campaign — unless the URL already
    carries any utm_* parameter (the author's tagging wins, all of it). The existing query
    string is kept byte for byte; only the new pair list is encoded."""
    parts = urlsplit(url)
    keys = (k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    if any(k.startswith("utm_") for k in keys):
        return url
    extra = urlencode({"utm_source": "popdrop", "utm_medium": medium, "utm_campaign": campaign})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


# A URL in plain text ends at whitespace or a character that cannot appear unescaped in
# one; trailing punctuation ("see https://x.io/a.") is trimmed afterwards.
_TEXT_URL = re.compile(r"https?://[^\s<>\"'`{}|\\^\[\]]+", re.IGNORECASE)
_TRAILING = ".,;:!?*'\""


def _trim(url: str) -> str:
    while url and (url[-1] in _TRAILING or (url[-1] == ")" and url.count("(") < url.count(")"))):
        url = url[:-1]
    return url


@dataclass(frozen=True)
class Link:
    url: str  # the destination, UTM parameters included
    tracked: str  # {base_url}/r/{token}


def _untracked(context: Mapping[str, Any], no_track: Collection[str]) -> set[str]:
    urls = {context.get("unsubscribe_url"), context.get("preferences_url"), *no_track}
    return {u for u in urls if isinstance(u, str) and u}


class _LinkTracker:
    """Per message: decides which URLs are tracked and signs each destination once."""

    def __init__(
        self,
        tracker: Tracker,
        base_url: str,
        medium: str,
        campaign: str,
        skip: Collection[str],
    ) -> None:
        self.tracker = tracker
        self.prefix = base_url.rstrip("/") + "/r/"
        self.medium = medium
        self.campaign = campaign
        self.skip = {s for s in skip if s}
        self.links: dict[str, Link] = {}

    def rewrite(self, url: str) -> str:
        stripped = url.strip()
        scheme = urlsplit(stripped).scheme.lower() if "://" in stripped else ""
        # Only web links: mailto:, tel:, sms:, "#anchor" and relative links stay as they
        # are, and so do unsubscribe/preferences (they must work without the redirect
        # and must not count as a click) and links that are already tracked.
        if scheme not in ("http", "https") or stripped in self.skip:
            return url
        if stripped.startswith(self.prefix):
            return url
        if stripped not in self.links:
            destination = add_utm(stripped, self.medium, self.campaign)
            self.links[stripped] = Link(destination, self.prefix + self.tracker(destination))
        return self.links[stripped].tracked

    def rewrite_text(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            url = _trim(m.group(0))
            return self.rewrite(url) + m.group(0)[len(url) :]

        return _TEXT_URL.sub(sub, text)


# Why a tokenizing regex and not `html.parser`: both are correct on what matters here, but
# the parser walks every tag in Python and cost ~1 ms per 4 KB email, a third of the send
# budget (bench target: 5,000 msg/s). So the regex below does what a parser would, in C:
# it scans the document once, left to right, and consumes as whole tokens the places where
# `<a href>` is NOT a link — comments, <script>/<style>/<title>/<textarea> raw text, CDATA,
# and every other tag whole (an attribute value may hold "<a href=…>") — so a match of the
# <a>/<area> branch is always a real start tag. Its attributes are
# then read with the HTML tokenizer's rules (quoted values may hold ">" or " href="), and
# only the first href's value is replaced; every other byte of the document is kept.
# Possessive quantifiers (Python ≥ 3.11) keep it linear on malformed input.
# tests/drops/test_render.py checks it against html.parser on tricky documents.
_HTML_TOKENS = re.compile(
    r"""
      <!--.*?(?:-->|\Z)
    | <(?P<raw>script|style|title|textarea)(?=[\s/>])[^>]*+>.*?(?:</(?P=raw)\s*>|\Z)
    | <!\[CDATA\[.*?(?:\]\]>|\Z)
    | <(?:a|area)(?=[\s/>])
      (?P<attrs>(?:\s++|/|[^\s"'>/=]++(?:\s*+=\s*+(?:"[^"]*+"|'[^']*+'|[^\s"'>]++))?+)*+)
      >
    | </?[a-zA-Z][^\s/>]*+
      (?:\s++|/|[^\s"'>/=]++(?:\s*+=\s*+(?:"[^"]*+"|'[^']*+'|[^\s"'>]++))?+)*+
      >
    """,
    re.IGNORECASE | re.DOTALL | re.VERBOSE,
)
_ATTR = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s"'>]+))?""")
# Any tag, for finding the text between tags (extract_links only).
_ANY_TAG = re.compile(r"""</?[a-zA-Z!?](?:[^"'>]|"[^"]*"|'[^']*')*>""")


def _hrefs(html: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, url) of the first href value of every <a>/<area> start tag; the span
    includes any quotes, the url is entity-decoded (`&amp;` → `&`) as a browser reads it."""
    for token in _HTML_TOKENS.finditer(html):
        attrs = token.group("attrs")
        if attrs is None:
            continue
        offset = token.start("attrs")
        for attr in _ATTR.finditer(attrs):
            if attr.group(1).lower() != "href":
                continue
            raw = attr.group(2)
            if raw is not None:
                value = raw[1:-1] if raw[0] in "\"'" else raw
                yield offset + attr.start(2), offset + attr.end(2), unescape(value)
            break  # as in browsers, the first href counts


def rewrite_html_links(html: str, rewrite: Callable[[str], str]) -> str:
    """Apply `rewrite` to the href of every <a>/<area> start tag."""
    out: list[str] = []
    pos = 0
    for start, end, url in _hrefs(html):
        new = rewrite(url)
        if new != url:
            out.append(html[pos:start])
            out.append(f'"{escape(new)}"')
            pos = end
    out.append(html[pos:])
    return "".join(out)


def extract_links(html_or_text: str) -> list[str]:
    """Every link in a message: the hrefs of HTML anchors (any scheme, in order), then the
    http(s) URLs written as text outside tags. Duplicates are kept. The seed test follows
    them all."""
    found = [url for _, _, url in _hrefs(html_or_text)]
    is_html = _ANY_TAG.search(html_or_text) is not None
    text = html_or_text
    if is_html:
        # Drop comments/scripts first (their own token), then every tag; decode entities.
        text = _HTML_TOKENS.sub(" ", text)
        text = unescape(_ANY_TAG.sub(" ", text))
    found.extend(_trim(m.group(0)) for m in _TEXT_URL.finditer(text))
    return found


# ----------------------------------------------------------------------- html → text


class _TextExtractor(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "hr"}
    )
    _SKIP = frozenset({"style", "script", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_depth = 0
        self.href: str | None = None
        self.anchor_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip_depth += 1
        elif tag in self._BLOCK:
            self.out.append("\n")
        if tag == "li":
            self.out.append("- ")
        if tag == "a":
            self.href = dict(attrs).get("href")
            self.anchor_text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in ("p", "div", "table", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.out.append("\n")
        if tag == "a" and self.href:
            label = "".join(self.anchor_text).strip()
            if self.href.startswith(("http://", "https://")) and self.href != label:
                self.out.append(f" ({self.href})")
            self.href = None

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        self.out.append(data)
        if self.href is not None:
            self.anchor_text.append(data)


def html_to_text(html: str) -> str:
    """A readable text part from HTML, for emails written only in HTML."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.out).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


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
    ast = _HTML_ENV.parse(source)
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
    links = _LinkTracker(
        tracker,
        base_url,
        medium,
        campaign,
        skip=_untracked(context, no_track),
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
) -> RenderedSms:
    """Render one recipient's SMS; segments are counted after the URLs are rewritten,
    since the tracked URL is what the carrier bills."""
    links = _LinkTracker(
        tracker,
        base_url,
        medium,
        campaign,
        skip=_untracked(context, no_track),
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
