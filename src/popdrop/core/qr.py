"""Every QR code the product shows, made in one place (segno).

Always a regular QR code, never a Micro QR: segno picks Micro QR for short payloads
(a bare voucher code) unless told not to, and phone cameras, ZBar and the browsers'
`BarcodeDetector` do not read Micro QR. Error correction level M (15 %), and segno may
raise it when the symbol has room (`boost_error`, its default).
"""

from __future__ import annotations

import io

import segno
from markupsafe import Markup, escape

DARK = "#111"
LIGHT = "#fff"


def make(payload: str) -> segno.QRCode:
    """The QR code of `payload`: a regular QR code (never Micro QR), level M."""
    return segno.make(payload, error="m", micro=False)


def svg_inline(payload: str) -> Markup:
    """An `<svg>` element for a page: no fixed size (a viewBox) so CSS scales it."""
    svg = make(payload).svg_inline(omitsize=True, dark=DARK, light=LIGHT)
    return Markup(svg)  # noqa: S704 (segno's markup of our own payload)


def svg_bytes(
    payload: str, *, scale: int = 8, border: int = 4, caption: str | None = None
) -> bytes:
    """A standalone SVG document (an `<img>` source); `caption` is printed under the code
    (the picture stays square, so an `<img>` of equal width and height shows it whole)."""
    code = make(payload)
    if caption is None:
        buffer = io.BytesIO()
        code.save(buffer, kind="svg", scale=scale, border=border, dark=DARK, light=LIGHT)
        return buffer.getvalue()
    size = code.symbol_size(scale=1, border=border)[0]  # in modules
    band = 6  # modules of caption under the code; as much room beside it keeps it square
    full = size + band
    inner = code.svg_inline(scale=1, border=border, dark=DARK, light=LIGHT)
    inner = inner.replace("<svg ", f'<svg x="{band / 2}" y="0" ', 1)
    text = (
        f'<text x="{full / 2}" y="{size + band / 2}" text-anchor="middle" '
        f'dominant-baseline="middle" font-family="ui-monospace, Menlo, Consolas, monospace" '
        f'font-size="3.6" font-weight="700" fill="{DARK}">{escape(caption)}</text>'
    )
    document = (
        f'<?xml version="1.0" encoding="utf-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {full} {full}" width="{full * scale}" height="{full * scale}">'
        f'<rect width="{full}" height="{full}" fill="{LIGHT}"/>{inner}{text}</svg>'
    )
    return document.encode()


def png_bytes(payload: str, *, scale: int = 8, border: int = 4) -> bytes:
    """A PNG (Telegram photos, decoders in tests)."""
    buffer = io.BytesIO()
    make(payload).save(buffer, kind="png", scale=scale, border=border, dark=DARK, light=LIGHT)
    return buffer.getvalue()
