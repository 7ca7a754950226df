"""Security headers for every HTTP response, pages and API alike.

Rules this module keeps:
- Pages run no inline script: `script-src 'self'` (page scripts are files under
  /static). Inline styles stay allowed (progress bars are sized by a style attribute, the
  chat widget injects its stylesheet); they cannot run code.
- Nothing of ours can be framed (`frame-ancestors 'none'`, `X-Frame-Options: DENY`)
  except the public chat page `/chat/{org_slug}`, which any site may embed in an iframe.
  The widget script itself (/static/chat-widget.js) is loaded cross-site by a script tag,
  which framing rules do not touch.
- /api/docs is a page like the others: Swagger UI is vendored under /static and started
  by a script file, so it needs no exception (and works offline).
- HSTS only when the base URL is https (over plain http it would be ignored, and a
  development server on 127.0.0.1 must not be pinned to https).
- A header a route set itself is left as it is.
- `NO_STORE` is the one header set for answers that must not be cached or leak a referrer
  (plaintext codes, signed links, personal data, CSV exports, live streams): routes add
  it themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

PAGE_CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        # Product and chat images may live on any host; data: for inline SVG/PNG.
        "img-src 'self' data: https: http:",
        "connect-src 'self'",  # fetch, EventSource and the chat WebSocket, same origin
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
EMBEDDABLE_CSP = PAGE_CSP.replace("frame-ancestors 'none'", "frame-ancestors *")
HSTS = "max-age=31536000"
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
# Route templates (as matched by the router) whose pages other sites may frame.
EMBEDDABLE_ROUTES = frozenset({"/chat/{org_slug}"})


def security_headers(route: str | None, *, https: bool) -> list[tuple[bytes, bytes]]:
    """The headers for a response whose request matched `route` (None: no route)."""
    csp = EMBEDDABLE_CSP if route in EMBEDDABLE_ROUTES else PAGE_CSP
    headers: list[tuple[bytes, bytes]] = [
        (b"content-security-policy", csp.encode()),
        (b"x-content-type-options", b"nosniff"),
        # Full URLs (ticket and unsubscribe links carry secrets) never leave the site.
        (b"referrer-policy", b"same-origin"),
    ]
    if route not in EMBEDDABLE_ROUTES:
        headers.append((b"x-frame-options", b"DENY"))
    if https:
        headers.append((b"strict-transport-security", HSTS.encode()))
    return headers


def add_missing(
    existing: Iterable[tuple[bytes, bytes]], extra: Iterable[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """`existing` plus each of `extra` whose name is not set yet."""
    headers = list(existing)
    present = {name.lower() for name, _ in headers}
    headers.extend((name, value) for name, value in extra if name not in present)
    return headers
