"""Who is asking for a short link: a person's browser (which class of device) or a bot.

Rules: the user agent is read here and never stored; only the device class leaves this
module. A request is a bot's (not counted as a click) when its user agent names a
crawler, a link-preview fetcher, a monitor or an HTTP library, when it is empty, when it
is a HEAD, or when the browser says it is only prefetching (`Sec-Purpose`/`Purpose:
prefetch`, `X-Moz: prefetch`) — a chat app unfurling an SMS link must not count as a
visit. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re

from popdrop.attribution.models import DeviceClass

# Crawlers, link unfurlers, uptime monitors, HTTP libraries and headless browsers.
_BOT = re.compile(
    r"bot\b|bot/|crawl|spider|slurp|preview|facebookexternalhit|facebot|embedly|"
    r"whatsapp|telegrambot|skypeuripreview|slackbot|discordbot|twitterbot|linkedinbot|"
    r"pinterest|bingpreview|google-?inspectiontool|googleother|feedfetcher|mediapartners|"
    r"apis-google|headless|phantomjs|lighthouse|pingdom|uptime|monitor|statuscake|"
    r"curl/|wget/|python-requests|python-httpx|aiohttp|go-http-client|okhttp|java/|"
    r"libwww|httpclient|axios/|node-fetch|postman|insomnia|scrapy|ahrefs|semrush|mj12|"
    r"yandex|baiduspider|duckduckbot|applebot|petalbot|bytespider|gptbot|ccbot|"
    r"proofpoint|barracuda|mimecast|safelinks|urldefense",
    re.IGNORECASE,
)
_TABLET = re.compile(r"ipad|tablet|kindle|silk/|playbook|(android(?!.*mobile))", re.IGNORECASE)
_MOBILE = re.compile(
    r"mobile|iphone|ipod|android|blackberry|opera mini|iemobile|windows phone|webos",
    re.IGNORECASE,
)
_DESKTOP = re.compile(r"windows nt|macintosh|x11|cros|linux x86_64", re.IGNORECASE)
_PREFETCH_HEADERS = ("sec-purpose", "purpose", "x-moz", "x-purpose")


@functools.lru_cache(maxsize=2048)  # a burst comes from a handful of browsers
def device_class(user_agent: str) -> DeviceClass:
    if not user_agent.strip() or _BOT.search(user_agent):
        return DeviceClass.BOT
    if _TABLET.search(user_agent):
        return DeviceClass.TABLET
    if _MOBILE.search(user_agent):
        return DeviceClass.MOBILE
    if _DESKTOP.search(user_agent):
        return DeviceClass.DESKTOP
    return DeviceClass.OTHER


def is_prefetch(headers: dict[str, str] | object) -> bool:
    """True when the request says it is a prefetch or prerender, not a visit."""
    get = getattr(headers, "get", None)
    if get is None:
        return False
    for name in _PREFETCH_HEADERS:
        value = get(name)
        if value and ("prefetch" in value.lower() or "prerender" in value.lower()):
            return True
    return False


def is_bot(method: str, user_agent: str, headers: object) -> bool:
    return method == "HEAD" or device_class(user_agent) is DeviceClass.BOT or is_prefetch(headers)
