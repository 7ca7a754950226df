"""The floor plan is enforced: `lint-imports` keeps the contracts in pyproject.toml on the
real tree and fails on a copy of it with one import that goes up a floor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_up_a_floor_breaks_the_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "popdrop", tmp_path / "popdrop")
    clock = tmp_path / "popdrop" / "core" / "clock.py"
    clock.write_text(clock.read_text() + "\nimport popdrop.chat.turn  # up a floor\n")
    service = tmp_path / "popdrop" / "vouchers" / "service.py"
    service.write_text(service.read_text() + "\nimport fastapi  # HTTP in a service\n")
    events = tmp_path / "popdrop" / "events" / "service.py"
    events.write_text(events.read_text() + "\nimport popdrop.inventory.service  # up a floor\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "the floor plan" in result.stdout and "BROKEN" in result.stdout
    assert "popdrop.events.service -> popdrop.inventory.service" in result.stdout
    assert "core imports no domain" in result.stdout
    assert "popdrop.core.clock -> popdrop.chat.turn" in result.stdout
    assert "no FastAPI or Starlette in a service module BROKEN" in result.stdout
