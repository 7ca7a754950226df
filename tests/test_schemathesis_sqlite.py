"""The OpenAPI fuzz run (tests/schemathesis_run.py) on SQLite: whatever the input, a 4xx
with a `reason`, never a 500."""

from __future__ import annotations

import pytest

from tests.schemathesis_run import api_never_answers_500, fuzzed_server


def test_api_never_answers_500_on_sqlite(tmp_path_factory: pytest.TempPathFactory) -> None:
    with fuzzed_server("sqlite", tmp_path_factory) as server:
        api_never_answers_500(server)
