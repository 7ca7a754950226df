"""Diagnostic, not part of `make bench`: the HTTP stack's own ceiling on this machine.

Drives `POST /api/v1/vouchers/validate {"code": "x"}` (auth from the token cache, body
validation, a `malformed` refusal: no database work) through the same `popdrop serve`
and load generator as bench/redeem.py. Run: `.venv/bin/python bench/_ceiling.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import _common as common
import _loadgen
import redeem

# The guessing guard would answer 429 after 30 malformed codes: lift it for this run.
os.environ["POPDROP_GUESS_LIMIT_PER_ADDRESS"] = "100000000"
os.environ["POPDROP_GUESS_LIMIT_PER_ORG"] = "100000000"


def main() -> None:
    url = common.DEFAULT_PG_URL
    seeded = asyncio.run(redeem.seed(url, 100))
    body = json.dumps({"code": "x"}).encode()
    with redeem.server(url, int(os.environ.get("WORKERS", "2"))) as port:
        requests = [_loadgen.post_json(port, "/api/v1/vouchers/validate", body, seeded.token)]
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(_loadgen.run, port, requests * 200_000, 32, 2, 6).result()
    print(
        f"HTTP stack alone: {result.rate:.0f} req/s, statuses {dict(result.statuses)}, "
        f"p50 {result.percentile_ms(0.5):.1f} ms"
    )


if __name__ == "__main__":
    main()
