"""Rendering: personalisation, escaping, sandbox, strict variables, link tracking, SMS length."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popdrop.core.errors import PopdropError
from popdrop.drops.render import (
    DEFAULT_EMAIL_LAYOUT,
    CompiledEmail,
    EventInfo,
    build_context,
    compile_email,
    compile_sms,
    compile_template,
    render_email,
    render_sms,
    sms_encoding,
    sms_length,
    sms_segments,
)
from popdrop.drops.tracking import add_utm, extract_links, html_to_text, rewrite_html_links

BASE = "https://pop.example"
UNSUB = "https://pop.example/u/unsub-token?c=1"
PREFS = "https://pop.example/preferences/pref-token"


class Signer:
    """A tracker that records what it was asked to sign."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, url: str) -> str:
        self.seen.append(url)
        return f"t{len(self.seen)}"


def context(first_name: str | None = "Ada", **custom: object) -> dict[str, object]:
    return build_context(
        first_name=first_name,
        locale="fr",
        voucher_code="K7M-Q9X-P2R",
        voucher_url="https://pop.example/v/signed-voucher",
        event=EventInfo(
            "Spring drop",
            datetime(2025, 6, 14, 16, 0, tzinfo=UTC),
            "Europe/Paris",
            "https://pop.example/e/spring",
        ),
        unsubscribe_url=UNSUB,
        preferences_url=PREFS,
        organization="Atelier & Co",
        custom=custom or None,
    )


def email(html: str, text: str | None = None, subject: str = "Hi") -> CompiledEmail:
    return compile_email(subject, text, html)


# --------------------------------------------------------------------- personalisation


def test_personalisation_across_parts() -> None:
    compiled = compile_email(
        "{{ first_name | fallback('friend') }}, {{ event.title }} opens {{ event.time }}",
        "Hello {{ first_name }}, your code {{ voucher_code }} ({{ bundle }}).",
        "<p>Hello {{ first_name }}</p><p>{{ event.starts_at }}</p>",
        preheader="Your code: {{ voucher_code }}",
        custom_vars={"bundle"},
    )
    out = render_email(
        compiled, context(bundle="Tote + tee"), tracker=Signer(), base_url=BASE, campaign="spring"
    )
    # 16:00 UTC is 18:00 in Paris in June (CEST): the event's zone, not the server's.
    assert out.subject == "Ada, Spring drop opens 18:00"
    assert out.text.startswith("Hello Ada, your code K7M-Q9X-P2R (Tote + tee).")
    assert out.html is not None
    assert "<p>Sat 14 Jun 2025, 18:00 CEST</p>" in out.html
    assert "Your code: K7M-Q9X-P2R" in out.html  # preheader
    assert '<html lang="fr">' in out.html
    assert "Atelier &amp; Co" in out.html  # escaped in the layout too

    nameless = render_email(
        compiled,
        context(first_name=None, bundle="x"),
        tracker=Signer(),
        base_url=BASE,
        campaign="spring",
    )
    assert nameless.subject.startswith("friend, ")


def test_default_layout_footer_and_structure() -> None:
    out = render_email(
        email("<p>Body</p>"),
        context(),
        tracker=Signer(),
        base_url=BASE,
        campaign="c",
        logo_url="https://pop.example/logo.png",
    )
    html = out.html or ""
    assert html.startswith("<!DOCTYPE html>")
    assert 'width="600"' in html and "max-width:600px" in html
    assert 'name="color-scheme" content="light dark"' in html
    assert "prefers-color-scheme: dark" in html
    assert 'alt="Atelier &amp; Co"' in html  # the logo has alt text
    # The footer shows the real unsubscribe / preferences URLs, HTML-escaped, untracked.
    assert f'<a href="{UNSUB.replace("&", "&amp;")}"' in html and ">Unsubscribe</a>" in html
    assert f'href="{PREFS}"' in html
    assert "/r/" not in html  # no trackable link in this body
    # Text part: the opt-out is there too.
    assert out.text.endswith(f"Unsubscribe: {UNSUB}")
    # Without a layout, just the body.
    bare = render_email(
        email("<p>Body</p>"), context(), tracker=Signer(), base_url=BASE, campaign="c", layout=None
    )
    assert bare.html == "<p>Body</p>"
    assert "{{ body }}" in DEFAULT_EMAIL_LAYOUT


def test_subject_cannot_inject_headers() -> None:
    compiled = compile_email("Hi {{ first_name }}", "t", None)
    out = render_email(
        compiled,
        context("Ada\r\nBcc: victim@example.org"),
        tracker=Signer(),
        base_url=BASE,
        campaign="c",
    )
    assert "\n" not in out.subject and "\r" not in out.subject


def test_text_part_derived_from_html_when_missing() -> None:
    out = render_email(
        email(
            "<h1>Drop</h1><p>Go <a href='https://shop.example/x'>shop now</a>.</p>"
            "<style>p{color:red}</style><ul><li>one</li><li>two</li></ul>"
        ),
        context(),
        tracker=Signer(),
        base_url=BASE,
        campaign="c",
    )
    assert out.text.startswith("Drop\n\nGo shop now (https://pop.example/r/t1).")
    assert "- one\n- two" in out.text
    assert "color:red" not in out.text
    assert html_to_text("<p>a</p><p>b</p>") == "a\n\nb"


# ---------------------------------------------------------------- escaping & sandbox


def test_autoescape_of_first_name_in_html_only() -> None:
    evil = "<script>alert(1)</script> & co"
    compiled = compile_email(
        "Hi {{ first_name }}", "Hi {{ first_name }}", "<p>Hi {{ first_name }}</p>"
    )
    out = render_email(compiled, context(evil), tracker=Signer(), base_url=BASE, campaign="c")
    assert out.html is not None
    assert "<script>alert(1)</script>" not in out.html
    assert "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt; &amp; co</p>" in out.html
    # Plain parts are not HTML: escaping them would show "&lt;" to the reader.
    assert out.subject == "Hi " + evil
    assert out.text.startswith("Hi " + evil)


def test_strict_undefined_typo_fails_with_line_number() -> None:
    source = "<p>Hello</p>\n<p>{{ event.title }}</p>\n<p>Hi {{ frist_name }}</p>"
    with pytest.raises(PopdropError) as err:
        compile_template(source, "html", html=True)
    assert err.value.reason == "invalid_request"
    assert err.value.message.startswith("html template, line 3: unknown variable 'frist_name'")
    assert "did you mean 'first_name'" in err.value.message
    assert err.value.detail == {"part": "html", "line": 3}

    # With the static check off, StrictUndefined still refuses at render (the preview),
    # naming the line, instead of rendering an empty string into a real send.
    lax = compile_template("line one\nline two {{ nickname }}", "text", custom_vars=None)
    with pytest.raises(PopdropError) as err:
        lax.render(context())
    assert err.value.message == "text template, line 2: 'nickname' is undefined"
    # Attribute typos on a known variable are caught at render the same way.
    attr = compile_template("{{ event.titel }}", "subject")
    with pytest.raises(PopdropError, match=r"subject template, line 1: .*titel"):
        attr.render(context())


def test_syntax_error_reports_line() -> None:
    with pytest.raises(PopdropError) as err:
        compile_sms("Hi {{ first_name }}\n{% if voucher_code %}\ncode {{ voucher_code }")
    assert err.value.reason == "invalid_request"
    assert err.value.message.startswith("sms template, line 3:")


def test_loop_and_set_variables_are_not_unknown() -> None:
    compiled = compile_template(
        "{% set greeting = 'Hi' %}{% for i in range(2) %}{{ greeting }}{{ loop.index }}"
        "{% endfor %}",
        "text",
    )
    assert compiled.render(context()) == "Hi1Hi2"


def test_custom_vars_must_be_declared_and_not_reserved() -> None:
    with pytest.raises(PopdropError, match="unknown variable 'bundle'"):
        compile_sms("{{ bundle }}")
    assert (
        compile_sms("{{ bundle }}", custom_vars={"bundle"}).body.render(context(bundle="Tote"))
        == "Tote"
    )
    with pytest.raises(PopdropError, match="unknown time zone"):
        build_context(
            first_name="x",
            event=EventInfo("E", datetime(2025, 1, 1, tzinfo=UTC), "Mars/Olympus"),
        )
    with pytest.raises(PopdropError, match="reserved"):
        context(first_name="x", voucher_code="oops")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ first_name['__class__'] }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_private_attributes_refused_at_compile(source: str) -> None:
    with pytest.raises(PopdropError) as err:
        compile_template(source, "html", html=True)
    assert "is not allowed" in err.value.message


@pytest.mark.parametrize(
    "source",
    [
        "{{ first_name|attr('__class__') }}",  # a dynamic name the static check can't see
        "{{ first_name|attr('_' ~ '_class__') }}",
        "{% set x = [] %}{{ x.append(1) }}",  # immutable sandbox: no mutating containers
    ],
)
def test_sandbox_blocks_escapes_at_render(source: str) -> None:
    compiled = compile_template(source, "html", html=True)
    with pytest.raises(PopdropError) as err:
        compiled.render(context())
    assert err.value.reason == "invalid_request"
    assert "unsafe" in err.value.message or "not safely callable" in err.value.message


def test_compiled_templates_are_cached() -> None:
    a = compile_template("Hello {{ first_name }} cache", "text")
    b = compile_template("Hello {{ first_name }} cache", "text")
    assert a is b
    assert compile_template("Hello {{ first_name }} cache", "subject") is not a


# -------------------------------------------------------------------------- links


def test_link_rewriting_keeps_utm_and_skips_special_links() -> None:
    html = (
        '<p><a href="https://shop.example/drop?size=M&amp;color=red#top">Shop</a>\n'
        "<a class='x' href='https://news.example/?utm_source=insta&utm_medium=story'>News</a>"
        '<a href="mailto:host@shop.example">Mail</a> <a href="tel:+33123456789">Call</a>'
        f' <a href="#details">Details</a> <a href="{UNSUB.replace("&", "&amp;")}">Stop</a>'
        f' <a href="{PREFS}">Prefs</a> <a href="/relative">Rel</a>'
        '<a href="https://shop.example/drop?size=M&amp;color=red#top">Again</a>'
        '<!-- <a href="https://hidden.example/">commented</a> -->'
        "<script>var s = \"<a href='https://script.example'>\";</script></p>"
    )
    signer = Signer()
    out = render_email(
        email(html, text="Shop: https://shop.example/drop?size=M&color=red#top. Bye"),
        context(),
        tracker=signer,
        base_url=BASE + "/",
        campaign="spring-drop",
    )
    body = out.html or ""
    # Every web link goes through /r/{token}; the same URL is signed once per message.
    assert '<a href="https://pop.example/r/t1">Shop</a>' in body
    # Only the href value changes; the rest of the tag is kept byte for byte.
    assert """<a class='x' href="https://pop.example/r/t2">News</a>""" in body
    assert body.count("https://pop.example/r/t1") == 2
    # Untouched: mailto, tel, anchors, relative, unsubscribe/preferences, comments, scripts.
    for kept in (
        'href="mailto:host@shop.example"',
        'href="tel:+33123456789"',
        'href="#details"',
        'href="/relative"',
        f'href="{PREFS}"',
        "https://hidden.example/",
        "<a href='https://script.example'>",
    ):
        assert kept in body, kept
    assert f'<a href="{UNSUB.replace("&", "&amp;")}">Stop</a>' in body

    # What was signed: our UTM tags appended, the fragment kept last; the author's own
    # UTM tags left exactly as written.
    assert signer.seen == [
        "https://shop.example/drop?size=M&color=red&utm_source=popdrop&utm_medium=email"
        "&utm_campaign=spring-drop#top",
        "https://news.example/?utm_source=insta&utm_medium=story",
    ]
    assert [link.tracked for link in out.links] == [
        "https://pop.example/r/t1",
        "https://pop.example/r/t2",
    ]
    # The text part reuses the same token; trailing sentence punctuation is not the URL's.
    assert out.text.startswith("Shop: https://pop.example/r/t1. Bye")
    assert UNSUB in out.text


class _ParserHrefs(HTMLParser):
    """The reference: what the standard library's HTML parser calls an <a>/<area> href."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("a", "area"):
            href = next((v for k, v in attrs if k == "href"), None)
            if href is not None:
                self.hrefs.append(href)

    handle_startendtag = handle_starttag


def parser_hrefs(html: str) -> list[str]:
    parser = _ParserHrefs()
    parser.feed(html)
    parser.close()
    return parser.hrefs


TRICKY_HTML = [
    '<a href="https://a.example/?x=1&amp;y=2">a</a>',
    "<A HREF='https://a.example/upper'>a</A>",
    "<a href=https://a.example/unquoted>a</a>",
    '<a\n  class="btn"\n  href="https://a.example/multiline"\n>a</a>',
    '<a title="not > the end" href="https://a.example/gt">a</a>',
    "<a title=' href=\"https://decoy.example/\"' href='https://a.example/real'>a</a>",
    '<a data-href="https://decoy.example/" href="https://a.example/data">a</a>',
    '<a href="https://a.example/first" href="https://decoy.example/second">a</a>',
    '<abbr href="https://decoy.example/">x</abbr><address>https</address>',
    '<p title="<a href=https://decoy.example/in-attr>">x</p><a href="https://a.example/after">',
    '<!-- <a href="https://decoy.example/comment">x</a> -->',
    "<script>document.write('<a href=\"https://decoy.example/js\">')</script>",
    "<style>a[href='https://decoy.example/css'] { color: red }</style>",
    '<area shape="rect" href="https://a.example/area"/>',
    '<a href="https://a.example/self-closing"/>',
    "<a name=anchor>no href</a><a href>empty</a>",
    '<p>text https://a.example/bare</p><img src="https://decoy.example/img.png" alt="">',
]


@pytest.mark.parametrize("html", TRICKY_HTML)
def test_href_scanner_agrees_with_html_parser(html: str) -> None:
    ours = [u for u in extract_links(html) if "bare" not in u]
    assert ours == [u for u in parser_hrefs(html) if u], html
    assert not any("decoy" in u for u in ours)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                '<a href="https://a.example/{i}">x</a>',
                "<a class='c' href='https://b.example/{i}?q=1&amp;r=2'>x</a>",
                '<!-- <a href="https://decoy.example/{i}"> -->',
                '<script>var a = "<a href=https://decoy.example/{i}>";</script>',
                '<p title="<a href=https://decoy.example/{i}>">text</p>',
                "<br/>",
                "plain & text > here ",
                '<area href="https://c.example/{i}">',
            ]
        ),
        max_size=12,
    )
)
def test_href_rewriting_matches_parser_on_generated_documents(parts: list[str]) -> None:
    html = "".join(p.format(i=i) for i, p in enumerate(parts))
    rewritten = rewrite_html_links(html, lambda url: "https://t.example/r/" + url[8:9])
    assert parser_hrefs(rewritten) == [
        "https://t.example/r/" + url[8:9] for url in parser_hrefs(html)
    ]
    # Only href values changed: removing them leaves identical documents.
    assert len([p for p in parts if "decoy" in p]) == rewritten.count("decoy")


def test_scanner_is_linear_on_malformed_html() -> None:
    # Possessive quantifiers: no catastrophic backtracking on tags that never close.
    for bad in ("<a " + "x" * 100_000, "<a " + "a b=c " * 20_000 + "<", "<p " + 'a="b" ' * 20_000):
        started = time.perf_counter()
        extract_links(bad)
        rewrite_html_links(bad, lambda url: url + "!")
        assert time.perf_counter() - started < 2.0


def test_add_utm() -> None:
    assert add_utm("https://a.example/p", "email", "spring") == (
        "https://a.example/p?utm_source=popdrop&utm_medium=email&utm_campaign=spring"
    )
    assert add_utm("https://a.example/p?x=1#f", "sms", "a b") == (
        "https://a.example/p?x=1&utm_source=popdrop&utm_medium=sms&utm_campaign=a+b#f"
    )
    tagged = "https://a.example/?UTM_campaign=mine&q=%20x"
    assert add_utm(tagged, "email", "spring") == tagged


@given(st.text(alphabet="abcdefghijk0123456789-_.~%", min_size=0, max_size=20))
def test_add_utm_keeps_existing_query(value: str) -> None:
    url = f"https://a.example/path?keep={value}"
    tagged = add_utm(url, "email", "c")
    assert tagged.startswith(url + "&")
    assert parse_qs(urlsplit(tagged).query)["utm_medium"] == ["email"]


def test_extract_links() -> None:
    html = (
        '<a href="https://a.example/1">a</a> text https://b.example/2, and '
        "<a href='mailto:x@y.example'>m</a> (see https://c.example/3)."
        '<img src="https://img.example/i.png" alt="">'
    )
    assert extract_links(html) == [
        "https://a.example/1",
        "mailto:x@y.example",
        "https://b.example/2",
        "https://c.example/3",
    ]
    assert extract_links("Code: https://pop.example/r/abc. STOP to opt out") == [
        "https://pop.example/r/abc"
    ]
    assert extract_links("Wiki https://w.example/A_(b) end") == ["https://w.example/A_(b)"]
    # Every tracked link of a rendered email is found.
    out = render_email(
        email('<a href="https://x.example/">x</a> <a href="{{ voucher_url }}">code</a>'),
        context(),
        tracker=Signer(),
        base_url=BASE,
        campaign="c",
    )
    found = extract_links(out.html or "")
    assert {link.tracked for link in out.links} <= set(found)
    assert UNSUB in found and PREFS in found


# ---------------------------------------------------------------------------- SMS


def test_render_sms() -> None:
    compiled = compile_sms(
        "{{ first_name }}, {{ event.title }} {{ event.time }}: code {{ voucher_code }} "
        "{{ voucher_url }} STOP to opt out"
    )
    signer = Signer()
    out = render_sms(compiled, context(), tracker=signer, base_url=BASE, campaign="spring")
    assert (
        out.body
        == "Ada, Spring drop 18:00: code K7M-Q9X-P2R https://pop.example/r/t1 STOP to opt out"
    )
    assert signer.seen == [
        "https://pop.example/v/signed-voucher?utm_source=popdrop&utm_medium=sms&utm_campaign=spring"
    ]
    assert (out.encoding, out.segments) == ("GSM-7", 1)
    emoji = render_sms(
        compile_sms("{{ first_name }} 🎉 drop!"),
        context(),
        tracker=signer,
        base_url=BASE,
        campaign="c",
    )
    assert (emoji.encoding, emoji.segments, emoji.links) == ("UCS-2", 1, ())


def test_sms_segments_gsm7() -> None:
    assert sms_encoding("Hello Zoé, à 18:00? £5 @ Ça") == "GSM-7"  # é, à, £, @, Ç are GSM-7
    assert sms_length("").segments == 0
    assert sms_segments("a" * 160) == 1
    assert sms_segments("a" * 161) == 2
    assert sms_segments("a" * 306) == 2  # 2 x 153
    assert sms_segments("a" * 307) == 3
    # Extension characters (€ [ ] { } ~ ^ | \) take two septets.
    assert sms_length("€" * 80) == sms_length("€" * 80).__class__("GSM-7", 160, 1)
    assert sms_segments("€" * 80 + "a") == 2
    # An escape pair never straddles two parts: 152 + "€" needs a second part.
    assert sms_segments("a" * 152 + "€" + "a" * 153) == 3


def test_sms_segments_ucs2_and_emoji() -> None:
    assert sms_encoding("Drop tonight 🎉") == "UCS-2"
    assert sms_encoding("Привет") == "UCS-2"
    # GSM 03.38 has "Ç" but not "ç", "ë" or "ê": one of them switches the whole text.
    assert sms_encoding("Ç") == "GSM-7"
    assert sms_encoding("ça") == sms_encoding("Zoë") == sms_encoding("fête") == "UCS-2"
    assert sms_segments("ж" * 70) == 1
    assert sms_segments("ж" * 71) == 2
    assert sms_segments("ж" * 134) == 2  # 2 x 67
    assert sms_segments("ж" * 135) == 3
    # An emoji is a surrogate pair: two UTF-16 units.
    assert sms_length("🎉" * 35) == sms_length("🎉" * 35).__class__("UCS-2", 70, 1)
    assert sms_segments("🎉" * 36) == 2
    # One emoji turns a 100-character GSM text into two UCS-2 parts.
    assert sms_segments("a" * 100) == 1
    assert sms_segments("a" * 99 + "🎉") == 2


@given(
    subject=st.text(max_size=40),
    preheader=st.text(max_size=20),
    unsubscribe=st.one_of(st.none(), st.text(max_size=30)),
    organization=st.one_of(st.none(), st.text(max_size=20)),
)
@settings(max_examples=150, deadline=None)
def test_default_layout_joined_from_pieces_equals_a_jinja_render(
    subject: str, preheader: str, unsubscribe: str | None, organization: str | None
) -> None:
    """The layout is rendered once per (locale, organization, …) and then only joined per
    message: the result must be the very bytes a full Jinja render gives, escaping and all."""
    from markupsafe import Markup

    from popdrop.drops import render

    values = {
        "locale": "fr",
        "organization": organization,
        "unsubscribe_url": unsubscribe,
        "preferences_url": unsubscribe,
        "subject": subject,
        "preheader": preheader,
        "logo_url": None,
        "body": Markup("<p>Tom &amp; Jerry's <b>drop</b></p>"),
    }
    slow = render._compile_cached(DEFAULT_EMAIL_LAYOUT, "layout", True, None).render(values)
    assert render._render_layout(DEFAULT_EMAIL_LAYOUT, values) == slow


def test_a_layout_that_filters_a_per_message_value_is_rendered_in_full() -> None:
    from markupsafe import Markup

    from popdrop.drops import render

    layout = "<title>{{ subject|upper }}</title>{{ body }}"
    values = {
        "locale": "en",
        "organization": None,
        "unsubscribe_url": None,
        "preferences_url": None,
        "subject": "hi & bye",
        "preheader": "",
        "logo_url": None,
        "body": Markup("<p>x</p>"),
    }
    assert render._render_layout(layout, values) == "<title>HI &amp; BYE</title><p>x</p>"
