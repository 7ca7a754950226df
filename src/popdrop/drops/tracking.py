"""Links in drop content and the plain-text fallback: UTM parameters, tracked `/r/{token}`
links (the tracker signs each destination; `no_track` keeps chosen ones as they are), or,
where a `shortener` gives one (SMS), a per-recipient short link `/s/{slug}/{recipient}`,
finding and rewriting `href`s in HTML without reparsing it, extracting links for the seed
test, and HTML → text for the text part. Pure: no database, no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from html import escape, unescape
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from popdrop.core.links import click_prefix

Tracker = Callable[[str], str]  # destination URL (UTM added) → signed token for /r/{token}
# destination URL (UTM added) → its absolute short URL, or None to keep the /r/{token} link
Shortener = Callable[[str], str | None]


@functools.lru_cache(maxsize=4096)  # the same shop links recur in every message of a drop
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
    tracked: str  # {base_url}/r/{token}, or the short link {base_url}/s/{slug}/{recipient}


def untracked(context: Mapping[str, Any], no_track: Collection[str]) -> set[str]:
    urls = {context.get("unsubscribe_url"), context.get("preferences_url"), *no_track}
    return {u for u in urls if isinstance(u, str) and u}


class LinkTracker:
    """Per message: decides which URLs are tracked and signs each destination once."""

    def __init__(
        self,
        tracker: Tracker,
        base_url: str,
        medium: str,
        campaign: str,
        skip: Collection[str],
        shortener: Shortener | None = None,
    ) -> None:
        self.tracker = tracker
        self.shortener = shortener
        self.prefix = click_prefix(base_url)
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
            short = self.shortener(destination) if self.shortener is not None else None
            tracked = short or self.prefix + self.tracker(destination)
            self.links[stripped] = Link(destination, tracked)
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
