"""Run every benchmark in bench/ in turn (same flags), then list their JSON result lines.

Usage: python bench/run_all.py [--quick] [other flags passed to every benchmark]
Every `bench/*.py` not starting with `_` runs, in name order: audience, chat, checkin,
checkout (paid orders under contention, against pgbench on the same SQL),
drop, holds, issue, pos (signed POS sales ingested, against pgbench on the same SQL),
redeem, redirect (short-link redirects against the HTTP ceiling, 0 clicks lost),
streams (API latency under 400 live-stock streams).
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
