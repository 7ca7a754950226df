"""What every browser test shares: Debian's chromium (never a downloaded browser), its
launch flags and the skip when it is missing (the `shots` fixture is in conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.server import Server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium"),
]


def run_cli(server: Server, *commands: tuple[str, ...]) -> None:
    """Run `popdrop` commands against a test server (org, user, token…), each must pass."""
    for args in commands:
        done = server.cli(*args)
        assert done.returncode == 0, f"popdrop {' '.join(args)}: {done.stderr}"


def log_in(page: Any, email: str, password: str) -> None:
    """Fill and send the login form the page shows (the caller opened /login or a page
    that sent it there)."""
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
