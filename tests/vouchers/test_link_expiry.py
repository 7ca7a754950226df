"""One claim-link expiry rule for the API, the pages and the CLI (`vouchers.service.link_expiry`).

The CLI used to ignore the TTL when a batch also had `valid_until`, so its links outlived
their codes; these tests pin the rule and the CLI case that drifted.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from popdrop.core.links import read_voucher_link
from popdrop.core.signing import Signer
from popdrop.vouchers.models import VoucherBatch
from popdrop.vouchers.service import DEFAULT_LINK_HOURS, link_expiry
from tests.server import running_server

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _batch(valid_until: datetime | None, ttl_seconds: int | None) -> VoucherBatch:
    return VoucherBatch(valid_until=valid_until, ttl_seconds=ttl_seconds)


def test_a_link_lives_until_the_batch_end_or_the_ttl_whichever_comes_first() -> None:
    week = NOW + timedelta(days=7)
    assert link_expiry(_batch(week, 3600), NOW) == NOW + timedelta(hours=1)
    assert link_expiry(_batch(NOW + timedelta(minutes=5), 3600), NOW) == NOW + timedelta(minutes=5)
    assert link_expiry(_batch(week, None), NOW) == week
    assert link_expiry(_batch(None, 600), NOW) == NOW + timedelta(minutes=10)
    assert link_expiry(_batch(None, None), NOW) == NOW + timedelta(hours=DEFAULT_LINK_HOURS)


def _link_expiry(signer: Signer, url: str) -> datetime:
    return read_voucher_link(signer, url.rsplit("/", 1)[1]).expires_at


def test_the_cli_honours_the_ttl_like_the_api_when_the_batch_also_ends(tmp_path: Path) -> None:
    valid_until = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    with running_server(tmp_path) as server:
        signer = Signer(server.env["POPDROP_SECRET_KEY"].encode())
        assert server.cli("org", "create", "shop", "Corner Shop").returncode == 0
        token = server.cli(
            "token", "create", "--org", "shop", "--name", "ops", "--scope", "vouchers:write"
        )
        assert token.returncode == 0, token.stderr
        api = httpx.post(
            f"{server.base_url}/api/v1/voucher-batches",
            params={"links": "true"},
            json={
                "name": "API",
                "quantity": 1,
                "valid_until": valid_until.isoformat(),
                "ttl_seconds": 3600,
            },
            headers={"Authorization": f"Bearer {token.stdout.strip()}"},
        )
        assert api.status_code == 201, api.text
        api_expiry = _link_expiry(signer, api.json()["links"][0])

        out = tmp_path / "codes.csv"
        issued = server.cli(
            "vouchers",
            "issue",
            "--org",
            "shop",
            "--name",
            "CLI",
            "--quantity",
            "1",
            "--valid-until",
            valid_until.isoformat(),
            "--ttl-hours",
            "1",
            "--out",
            str(out),
            "--links",
        )
        assert issued.returncode == 0, issued.stderr
        cli_expiry = _link_expiry(signer, next(csv.DictReader(out.open()))["link"])

    # Both are "an hour from issue", not the batch end a month away; the two issues ran
    # a few seconds apart, so they agree to within a minute.
    assert abs(cli_expiry - api_expiry) < timedelta(minutes=1)
    assert cli_expiry < valid_until - timedelta(days=29)
    assert abs(cli_expiry - datetime.now(UTC) - timedelta(hours=1)) < timedelta(minutes=2)
