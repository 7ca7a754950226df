"""Run every benchmark in bench/ in turn (same flags), then list their JSON result lines.

Usage: python bench/run_all.py [--quick] [other flags passed to every benchmark]
Every `bench/*.py` not starting with `_` runs, in name order, each against a limit measured
in the same run: audience (import / raw COPY), chat (turns / the same server's WebSocket echo),
checkin (scans / the no-DB HTTP ceiling, and / pgbench on the scan statement), checkout (paid
orders / pgbench on the same SQL), drop (delivery / raw aiosmtplib to the same peer), holds
(holds / pgbench on the hold SQL), issue (bulk issue / raw COPY), metrics (check-in with the
funnel log / without), pos (sales / pgbench), redeem (redemptions / pgbench on the same SQL),
redirect (redirects / the HTTP ceiling), servers (Granian / uvicorn on the same app), streams
(API latency with 400 live-stock streams / without).
Every result line holds `rate_per_s`, `limit_per_s`, `ratio` and `load_avg`.
Exits non-zero when any benchmark failed or printed no JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT = 30 * 60  # seconds per benchmark


def benchmarks() -> list[Path]:
    me = Path(__file__).resolve()
    return [p for p in sorted(HERE.glob("*.py")) if p != me and not p.name.startswith("_")]


def last_json(output: str) -> dict[str, object] | None:
    lines = output.strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def main() -> int:
    flags = sys.argv[1:]
    results: list[tuple[str, int, dict[str, object] | None]] = []
    for path in benchmarks():
        print(f"== {path.name} {' '.join(flags)}", flush=True)
        started = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, str(path), *flags],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired:
            code, out, err = -1, "", f"timed out after {TIMEOUT} s"
        print(out, end="")
        if code != 0:
            print(err, end="", file=sys.stderr)
        print(f"== {path.name}: exit {code} in {time.monotonic() - started:.1f} s\n", flush=True)
        results.append((path.name, code, last_json(out)))

    print("== results")
    failed = [name for name, code, result in results if code != 0 or result is None]
    for name, _code, result in results:
        print(json.dumps(result if result is not None else {"bench": name, "failed": True}))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
