"""ASGI servers compared in one run: uvicorn against Granian, serving the same app.

1. Seed (service layer): an org with a `vouchers:redeem` token and N short links.
2. Serve the app with `popdrop serve --server uvicorn`, then `--server granian`, then
   uvicorn again, then Granian again (interleaved, so a change in the machine's speed
   during the run hits both), each with the same worker count, and drive from C
   keep-alive connections (a separate load-generator process):
   a. the no-database HTTP ceiling: `POST /api/v1/vouchers/validate {"code": "x"}` (auth
      from the token cache, body validation, a JSON `malformed` refusal; bench/_ceiling.py);
   b. one database hot path: short-link redirects `/s/{slug}` (bench/redirect.py: the
      cached view, a fresh click id, the click batched in memory, a 302).
3. After each server's SIGTERM (its graceful stop must flush the last click batch), check
   the database: one click row per 302 answered so far (0 lost).

Prints req/s per server and path and the ratio granian/uvicorn. The JSON line's
`rate_per_s` is the faster server's ceiling rate, `limit_per_s` the other's. Exits
non-zero only on a correctness failure (5xx answers, connection errors, lost clicks, a
server that fails to start or stop), never on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import _common as common
import _loadgen
import redirect
from popdrop.core.db import Database
from redeem import free_port, wait_ready
from redirect import get, stored_clicks

SERVERS = ("uvicorn", "granian")
DEFAULT_URL = common.DEFAULT_PG_URL.rsplit("/", 1)[0] + "/popdrop_bench_servers"
# The ceiling's malformed codes would trip the guessing guard (429) after 30: lift it.
GUARD_OFF = {
    "POPDROP_GUESS_LIMIT_PER_ADDRESS": "100000000",
    "POPDROP_GUESS_LIMIT_PER_TOKEN": "100000000",
    "POPDROP_GUESS_LIMIT_PER_ORG": "100000000",
}


@dataclass
class Seeded:
    org_id: int
    token: str
    slugs: list[str]


@dataclass
class Round:
    server: str
    ceiling: _loadgen.LoadResult
    redirect: _loadgen.LoadResult
    stopped_in: float  # seconds from SIGTERM to exit
    exit_code: int | None
    log: str  # the server's output (shown when something failed)


async def seed(url: str, count: int) -> Seeded:
    """The redirect bench's links (`redirect.seed`), and a token for the ceiling's calls."""
    links = await redirect.seed(url, count)
    db = Database(url, pool_size=1, max_overflow=0)
    try:
        async with db.transaction() as session:
            token = await common.seed_token(session, links.org_id, frozenset({"vouchers:redeem"}))
    finally:
        await db.dispose()
    return Seeded(links.org_id, token, links.slugs)


@contextmanager
def serving(
    url: str, workers: int, kind: str, stopped: dict[str, object], settle: float = 0.0
) -> Iterator[int]:
    """`popdrop serve --server KIND` on a free port, ready (/readyz) before the body runs;
    stopped with SIGTERM afterwards (the time it took and its exit code go to `stopped`)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="popdrop-bench-") as tmp:
        # A small pool (the same for both): the ceiling needs no database and the
        # redirects only the click batch's writer; PostgreSQL's connections are shared.
        env = common.server_env(
            url, tmp, **GUARD_OFF, POPDROP_DB_POOL_SIZE="4", POPDROP_DB_MAX_OVERFLOW="4"
        )
        command = [common.POPDROP_BIN, "serve", "--port", str(port)]
        command += ["--workers", str(workers), "--no-access-log", "--server", kind]
        with open(Path(tmp) / "server.log", "w+") as log:
            proc = subprocess.Popen(command, env=env, cwd=tmp, stdout=log, stderr=log)
            try:
                wait_ready(port, proc, log)
                # /readyz is answered by the first worker up; the others may still be
                # starting (uvicorn spawns fresh interpreters): let them all come up.
                time.sleep(settle)
                yield port
            finally:
                asked = time.monotonic()
                proc.terminate()
                try:
                    stopped["code"] = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    stopped["code"] = None  # did not stop gracefully
                stopped["seconds"] = time.monotonic() - asked
                log.seek(0)
                stopped["log"] = log.read()


def drive(
    port: int, requests: list[bytes], clients: int, warmup: float, duration: float
) -> _loadgen.LoadResult:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_loadgen.run, port, requests, clients, warmup, duration).result()


def one_round(
    url: str, seeded: Seeded, kind: str, args: argparse.Namespace, warmup: float, duration: float
) -> Round:
    stopped: dict[str, object] = {}
    with serving(url, args.workers, kind, stopped, args.settle) as port:
        body = json.dumps({"code": "x"}).encode()
        validate = _loadgen.post_json(port, "/api/v1/vouchers/validate", body, seeded.token)
        ceiling = drive(port, [validate] * 1_000_000, args.clients, warmup, duration)
        paths = [get(port, f"/s/{slug}") for slug in seeded.slugs]
        redirect = drive(port, paths * (1_000_000 // len(paths)), args.clients, warmup, duration)
    seconds = stopped.get("seconds") or 0.0
    code = stopped.get("code")
    return Round(
        kind,
        ceiling,
        redirect,
        float(seconds),  # type: ignore[arg-type]
        None if code is None else int(code),  # type: ignore[call-overload]
        str(stopped.get("log", "")),
    )


def server_errors(result: _loadgen.LoadResult) -> int:
    return sum(n for status, n in result.statuses.items() if status >= 500)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of about a minute")
    parser.add_argument("--database-url", help=f"default: {DEFAULT_URL}")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--duration", type=float, help="measured seconds a phase (8; quick 3)")
    parser.add_argument("--rounds", type=int, help="rounds per server, interleaved (3; quick 2)")
    parser.add_argument("--links", type=int, default=200, help="short links to spread over")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds after /readyz before driving"
    )
    args = parser.parse_args()
    url = args.database_url or os.environ.get("POPDROP_BENCH_SERVERS_DATABASE_URL") or DEFAULT_URL
    duration = args.duration or (3.0 if args.quick else 8.0)
    warmup = 1.0 if args.quick else 2.0
    rounds = args.rounds or (2 if args.quick else 3)

    started = time.monotonic()
    seeded = asyncio.run(seed(url, args.links))
    print(f"seeded {args.links} short links in {time.monotonic() - started:.1f}s")
    load_before = os.getloadavg()
    print(
        "load average before measuring: "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + " (other work on the machine skews figures; compare ratios)"
    )

    done: list[Round] = []
    lost = mismatch = 0
    redirected = 0
    for i in range(rounds):
        for kind in SERVERS:
            result = one_round(url, seeded, kind, args, warmup, duration)
            done.append(result)
            # The server has stopped: its graceful stop flushed the last click batch.
            redirected += result.redirect.statuses.get(302, 0)
            rows, counters = asyncio.run(stored_clicks(url, seeded.org_id))
            lost = max(redirected - rows, 0)
            mismatch = int(counters != rows)
            print(
                f"round {i + 1} {kind:8} ceiling {result.ceiling.rate:7.0f} req/s, "
                f"redirects {result.redirect.rate:7.0f} /s, stopped in "
                f"{result.stopped_in:.1f}s (exit {result.exit_code}); clicks lost so far {lost}"
            )
            failed = server_errors(result.ceiling) + server_errors(result.redirect)
            if failed or result.exit_code != 0:
                print(
                    f"  answers: ceiling {dict(result.ceiling.statuses)}, "
                    f"redirects {dict(result.redirect.statuses)}; server log tail:"
                )
                print("  " + "\n  ".join(result.log.strip().splitlines()[-15:]))
    load_after = os.getloadavg()

    figures: dict[str, dict[str, object]] = {}
    for kind in SERVERS:
        mine = [r for r in done if r.server == kind]
        figures[kind] = {
            "ceiling_per_s": round(mean([r.ceiling.rate for r in mine]), 1),
            "redirect_per_s": round(mean([r.redirect.rate for r in mine]), 1),
            "ceiling_rounds": [round(r.ceiling.rate, 1) for r in mine],
            "redirect_rounds": [round(r.redirect.rate, 1) for r in mine],
            "ceiling_p99_ms": round(max(r.ceiling.percentile_ms(0.99) for r in mine), 2),
            "redirect_p99_ms": round(max(r.redirect.percentile_ms(0.99) for r in mine), 2),
            "server_errors": sum(
                server_errors(r.ceiling) + server_errors(r.redirect) for r in mine
            ),
            "connection_errors": sum(r.ceiling.errors + r.redirect.errors for r in mine),
            "unexpected_statuses": sorted(
                {s for r in mine for s in r.ceiling.statuses if s != 422}
                | {s for r in mine for s in r.redirect.statuses if s != 302}
            ),
            "stopped_gracefully": all(r.exit_code is not None for r in mine),
            "stop_seconds_max": round(max(r.stopped_in for r in mine), 2),
        }
    uv, gr = figures["uvicorn"], figures["granian"]
    ceiling_ratio = float(gr["ceiling_per_s"]) / max(float(uv["ceiling_per_s"]), 1e-9)  # type: ignore[arg-type]
    redirect_ratio = float(gr["redirect_per_s"]) / max(float(uv["redirect_per_s"]), 1e-9)  # type: ignore[arg-type]
    winner = "granian" if ceiling_ratio > 1 else "uvicorn"
    other = "uvicorn" if winner == "granian" else "granian"

    print(f"clients {args.clients}, server workers {args.workers}, {rounds} rounds per server")
    for kind in SERVERS:
        f = figures[kind]
        print(
            f"{kind:8} ceiling {f['ceiling_per_s']:>9} req/s {f['ceiling_rounds']}, "
            f"redirects {f['redirect_per_s']:>9} /s {f['redirect_rounds']}"
        )
    print(f"ratio granian/uvicorn: ceiling {ceiling_ratio:.2f}, redirects {redirect_ratio:.2f}")
    print(
        "load average before/after: "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + " / "
        + ", ".join(f"{x:.2f}" for x in load_after)
    )
    errors_5xx = int(uv["server_errors"]) + int(gr["server_errors"])  # type: ignore[call-overload]
    conn_errors = int(uv["connection_errors"]) + int(gr["connection_errors"])  # type: ignore[call-overload]
    graceful = bool(uv["stopped_gracefully"]) and bool(gr["stopped_gracefully"])
    print(
        f"checks: 5xx {errors_5xx}, connection errors {conn_errors}, clicks lost {lost}, "
        f"counters {'agree' if not mismatch else 'DISAGREE'}, "
        f"every server stopped on SIGTERM: {graceful}"
    )
    common.emit(
        {
            "bench": "servers",
            "rate_per_s": figures[winner]["ceiling_per_s"],
            "limit_per_s": figures[other]["ceiling_per_s"],
            "ratio": round(ceiling_ratio, 3),
            "ratio_means": "granian / uvicorn, no-DB ceiling (rate: the faster server's)",
            "winner": winner,
            "redirect_ratio": round(redirect_ratio, 3),
            "servers": figures,
            "load_avg": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in load_after],
            "server_errors": errors_5xx,
            "connection_errors": conn_errors,
            "lost_clicks": lost,
            "counters_agree": not mismatch,
            "stopped_gracefully": graceful,
            "clients": args.clients,
            "workers": args.workers,
            "rounds": rounds,
            "seconds_per_phase": duration,
        }
    )
    return 1 if errors_5xx or conn_errors or lost or mismatch or not graceful else 0


if __name__ == "__main__":
    sys.exit(main())
