"""Run a real `popdrop serve` process for tests that need one (schemathesis, browser)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

POPDROP = [sys.executable, "-m", "popdrop"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    base_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*POPDROP, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def server_env(data_dir: Path, database_url: str | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "POPDROP_DATA_DIR": str(data_dir),
        "POPDROP_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{data_dir / 'popdrop.db'}",
        "POPDROP_SECRET_KEY": "server-test-secret-" + "s" * 32,
        "POPDROP_LOG_LEVEL": "WARNING",
        "POPDROP_LOG_REQUESTS": "0",
    }


@contextmanager
def running_server(data_dir: Path, database_url: str | None = None) -> Iterator[Server]:
    port = free_port()
    env = server_env(data_dir, database_url)
    env["POPDROP_BASE_URL"] = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*POPDROP, "serve", "--port", str(port), "--no-access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in 60 s")
            time.sleep(0.2)
        yield Server(base_url, env, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
