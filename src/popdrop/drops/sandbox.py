"""The drop templates' sandbox: a Jinja2 `ImmutableSandboxedEnvironment` whose every render is
bounded. At most `MAX_RENDER_CHARS` of output per part (`template_too_large`) and
`MAX_RENDER_SECONDS` of work (`template_too_slow`): `*`, `**` and `+` are intercepted, the
string-multiplying filters and `str` methods have their result size estimated before they
run, every loop checks the clock per item (`LOOP_GUARD`), and `namespace` and `lipsum` are
not available. `render.py` compiles and renders with the two environments built here.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment


def fallback(value: Any, default: str = "there") -> Any:
    """`{{ first_name | fallback("friend") }}`: the default when the value is missing,
    None or blank. Checks Undefined first: StrictUndefined raises on bool()."""
    if isinstance(value, Undefined) or value is None:
        return default
    if isinstance(value, str) and not value.strip():
        return default
    return value


# An email part past 1 MB is no email (Gmail clips at 102 KB); a render past 2 s is a loop.
MAX_RENDER_CHARS = 1_000_000
MAX_RENDER_SECONDS = 2.0
LOOP_GUARD = "popdrop_loop_guard"  # wraps every {% for %} iterable (see `_guard_loops`)


class LimitExceeded(Exception):
    """Internal: raised inside a render, turned into PopdropError by `CompiledTemplate`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Budget:
    deadline: float

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(
                "template_too_slow", f"it took more than {MAX_RENDER_SECONDS:g} s to render"
            )


BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "popdrop_render_budget", default=None
)


def _tick() -> None:
    budget = BUDGET.get()
    if budget is not None:
        budget.tick()


def _too_large(size: int) -> LimitExceeded:
    return LimitExceeded(
        "template_too_large",
        f"it would produce about {size:,} characters (the limit is {MAX_RENDER_CHARS:,})",
    )


def check_size(size: int) -> None:
    if size > MAX_RENDER_CHARS:
        raise _too_large(size)


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict) else 0


def _check_args(args: Iterable[Any]) -> None:
    for arg in args:
        # An int argument is a width or a count; none legitimately exceeds the output cap.
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_RENDER_CHARS:
            raise _too_large(abs(arg))
        check_size(_sized(arg))


_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width of a million or more in a format spec


def _join_items(separator: Any, iterable: Any) -> list[Any]:
    """The items of a join, materialized (a generator can be counted only once), after
    checking that the separators alone stay under the cap."""
    items = list(iterable)
    check_size(len(str(separator)) * len(items))
    return items


def _estimate(name: str, subject: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse the few operations whose result can dwarf their inputs, before they run."""
    text = subject if isinstance(subject, str) else ""
    first = args[0] if args else None
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        hits = len(text) + 1 if not old else text.count(old)
        check_size(len(text) + hits * len(new))
    elif name == "expandtabs":
        size = first if isinstance(first, int) else int(kwargs.get("tabsize", 8))
        check_size(len(text) + text.count("\t") * size)
    elif name == "indent":
        width = first if first is not None else kwargs.get("width", 4)
        per_line = width if isinstance(width, int) else len(str(width))
        check_size(len(text) + (text.count("\n") + 1) * per_line)
    elif name == "wordwrap":
        width = first if isinstance(first, int) else int(kwargs.get("width", 79))
        wrap = str(kwargs.get("wrapstring") or (args[2] if len(args) > 2 else "") or "\n")
        check_size(len(text) + (len(text) // max(width, 1) + 1) * len(wrap))
    elif name == "urlize":
        extra = sum(len(str(v)) for v in (*args, *kwargs.values()) if isinstance(v, str))
        check_size(len(text) * 2 + (text.count(".") + 1) * extra)
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
        check_size(_sized(result))
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
                    check_size(_sized(seq) * max(times, 0))
        elif operator == "+":
            check_size(_sized(left) + _sized(right))
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
        check_size(_sized(result))
        return result


def _make_env(autoescape: bool) -> ImmutableSandboxedEnvironment:
    env = _CappedEnvironment(
        autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=False
    )
    env.filters["fallback"] = fallback
    env.filters = {name: _capped_filter(name, f) for name, f in env.filters.items()}
    # `namespace` is the one way to carry a value across loop iterations (doubling it 40
    # times is a terabyte); `lipsum(n)` is n paragraphs of filler nobody sends.
    del env.globals["namespace"], env.globals["lipsum"]
    env.globals[LOOP_GUARD] = _loop_guard
    return env


# Two environments: HTML parts autoescape (a first name of "<script>" stays text), plain
# parts (subject, text, SMS) must not, or "Tom & Jerry" would arrive as "Tom &amp; Jerry".
HTML_ENV = _make_env(autoescape=True)
TEXT_ENV = _make_env(autoescape=False)
