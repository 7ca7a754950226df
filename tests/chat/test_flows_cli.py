"""`popdrop chat publish` and `popdrop chat flows`, run as real processes against a fresh
SQLite database."""

from __future__ import annotations

import subprocess
from pathlib import Path

from popdrop.chat.flow import shipped_source
from tests.server import POPDROP, server_env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*POPDROP, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_a_host_publishes_a_flow_from_the_command_line(tmp_path: Path) -> None:
    env = {**server_env(tmp_path), "COLUMNS": "200"}
    for command in (["chat"], ["chat", "publish"], ["chat", "flows"]):
        helped = cli(env, *command, "--help")
        assert helped.returncode == 0 and "Usage:" in helped.stdout, helped.stderr
    assert cli(env, "db", "upgrade").returncode == 0
    assert cli(env, "org", "create", "shop", "Corner Shop").returncode == 0

    none = cli(env, "chat", "flows", "--org", "shop")
    assert none.returncode == 0 and "shipped flow" in none.stdout, none.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text("start: a\nnodes:\n  a: {type: jump, to: b}\n", encoding="utf-8")
    refused = cli(env, "chat", "publish", str(broken), "--org", "shop")
    assert refused.returncode == 2
    assert "invalid_flow" in refused.stderr
    assert f"{broken}:3: nodes.a.to: unknown node 'b'" in refused.stderr

    good = tmp_path / "flow.yaml"
    good.write_text(shipped_source("popup_drop"), encoding="utf-8")
    checked = cli(env, "chat", "publish", str(good), "--org", "shop", "--check")
    assert checked.returncode == 0 and "valid" in checked.stdout, checked.stderr
    assert "no popup_drop version" in cli(env, "chat", "flows", "--org", "shop").stdout

    published = cli(env, "chat", "publish", str(good), "--org", "shop")
    assert published.returncode == 0, published.stderr
    assert "popup_drop version 1 published" in published.stdout
    again = cli(env, "chat", "publish", str(good), "--org", "shop")
    assert "popup_drop version 2 published" in again.stdout
    listed = cli(env, "chat", "flows", "--org", "shop")
    assert listed.returncode == 0
    lines = [line for line in listed.stdout.splitlines() if "Pop-up drop" in line]
    assert len(lines) == 2 and lines[0].split()[1] == "2"  # newest first
    assert "next open" in lines[0]

    foreign = cli(env, "chat", "publish", str(good), "--org", "shop", "--event", "999")
    assert foreign.returncode == 2 and "not_found" in foreign.stderr
    nobody = cli(env, "chat", "flows", "--org", "no-such-org")
    assert nobody.returncode == 2 and "not_found" in nobody.stderr
