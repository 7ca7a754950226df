"""The `popdrop` command, run as a real process against a fresh SQLite database."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import httpx
import pytest

from tests.server import running_server

COMMANDS = [
    [],
    ["serve"],
    ["worker"],
    ["demo"],
    ["db", "upgrade"],
    ["db", "current"],
    ["org", "create"],
    ["user", "create"],
    ["token", "create"],
    ["token", "list"],
    ["token", "revoke"],
    ["vouchers", "issue"],
    ["vouchers", "revoke"],
    ["vouchers", "export"],
    ["vouchers", "list"],
    ["audit", "verify"],
    ["contacts", "import"],
    ["contacts", "export"],
    ["contacts", "erase"],
    ["contacts", "purge"],
    ["consent", "export"],
    ["checkin", "rotate-keys"],
    ["chat", "publish"],
    ["chat", "flows"],
    ["metrics", "rebuild"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "popdrop")
def test_every_command_explains_itself(command: list[str], tmp_path: Path) -> None:
    import subprocess

    from tests.server import POPDROP, server_env

    done = subprocess.run(
        [*POPDROP, *command, "--help"],
        env=server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout


def test_a_host_runs_the_vault_from_the_command_line(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        assert server.cli("org", "create", "shop", "Corner Shop").returncode == 0
        dup = server.cli("org", "create", "shop", "Again")
        assert dup.returncode == 2 and "conflict" in dup.stderr
        user = server.cli(
            "user",
            "create",
            "--org",
            "shop",
            "--email",
            "Host@Shop.test",
            "--role",
            "host",
            "--password",
            "correct horse battery",
        )
        assert user.returncode == 0, user.stderr
        short = server.cli(
            "user", "create", "--org", "shop", "--email", "x@shop.test", "--password", "short"
        )
        assert short.returncode == 2 and "invalid_request" in short.stderr

        token = server.cli(
            "token", "create", "--org", "shop", "--name", "till", "--scope", "vouchers:redeem"
        )
        assert token.returncode == 0, token.stderr
        bearer = {"Authorization": f"Bearer {token.stdout.strip()}"}

        out = tmp_path / "codes.csv"
        issued = server.cli(
            "vouchers",
            "issue",
            "--org",
            "shop",
            "--name",
            "Sat",
            "--quantity",
            "30",
            "--tag",
            "sat",
            "--out",
            str(out),
            "--links",
        )
        assert issued.returncode == 0, issued.stderr
        rows = list(csv.DictReader(out.open()))
        assert len(rows) == 30 and all(r["link"].startswith(server.base_url + "/v/") for r in rows)
        again = server.cli(
            "vouchers",
            "issue",
            "--org",
            "shop",
            "--name",
            "Sat",
            "--quantity",
            "1",
            "--out",
            str(out),
        )
        assert again.returncode != 0  # never overwrite a codes file

        redeemed = httpx.post(
            f"{server.base_url}/api/v1/vouchers/redeem",
            json={"code": rows[0]["code"]},
            headers=bearer,
        )
        assert redeemed.status_code == 200
        claim = httpx.get(rows[1]["link"])
        assert claim.status_code == 200 and rows[1]["code"] in claim.text

        revoked = server.cli("vouchers", "revoke", "--org", "shop", "--tag", "sat")
        assert revoked.returncode == 0 and "revoked 30 code(s)" in revoked.stdout
        assert httpx.get(rows[1]["link"]).status_code == 410

        exported = server.cli("vouchers", "export", "--org", "shop", "--batch", "1")
        lines = exported.stdout.strip().splitlines()
        assert len(lines) == 31
        assert {line.split(",")[1] for line in lines[1:]} == {"revoked"}
        assert sorted(line.split(",")[2] for line in lines[1:]).count("1") == 1  # the used one
        assert rows[2]["code"] not in exported.stdout

        listed = server.cli("vouchers", "list", "--org", "shop")
        assert "Sat" in listed.stdout
        verify = server.cli("audit", "verify")
        assert verify.returncode == 0 and verify.stdout.startswith("OK ")


def test_demo_seeds_a_weekend_pop_up_and_can_run_twice(tmp_path: Path) -> None:
    import subprocess

    from tests.server import POPDROP, server_env

    env = server_env(tmp_path)
    for _ in range(2):
        done = subprocess.run(
            [*POPDROP, "demo", "--no-serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "owner@demo.popdrop.test" in done.stdout and "/e/1" in done.stdout
        assert "/scan/1" in done.stdout and "/events/1/guests" in done.stdout
        assert "/drops/1" in done.stdout and "/mailbox" in done.stdout  # where the VIP drop is
        # A fresh checkout link (a new hold) at every start, and where orders are.
        assert "/checkout/" in done.stdout and "/events/1/orders" in done.stdout
        assert "Stripe sandbox at http://127.0.0.1:" in done.stdout
    with running_server(tmp_path) as server:
        token = next(
            line.split("Bearer ", 1)[1].strip()
            for line in done.stdout.splitlines()
            if "Bearer " in line
        )
        headers = {"Authorization": f"Bearer {token}"}
        events = httpx.get(f"{server.base_url}/api/v1/events", headers=headers).json()
        # The weekend pop-up, and last month's (its funnel fills the insights and reports).
        assert sorted((e["slug"], e["status"]) for e in events) == [
            ("autumn-pop-up", "published"),
            ("weekend-pop-up", "published"),
        ]
        events = [e for e in events if e["slug"] == "weekend-pop-up"]
        stock = httpx.get(
            f"{server.base_url}/api/v1/events/{events[0]['id']}/availability", headers=headers
        ).json()
        # 10 variant x lane rows and the cold-brew taster (a sample) at the front desk.
        assert len(stock) == 11 and all(row["available"] > 0 for row in stock)
        # The demo sold: a bundle with the weekend code (paid), cold brews with the
        # buy-2-get-1 rule (pay at pickup) and a tote (paid); two tasters given out.
        orders = httpx.get(
            f"{server.base_url}/api/v1/orders",
            params={"event_id": events[0]["id"]},
            headers=headers,
        ).json()
        summary = sorted(
            (o["status"], o["total_minor"], [line["title"] for line in o["lines"]]) for o in orders
        )
        assert summary == [
            ("paid", 1_500, ["Canvas tote"]),
            ("paid", 11_815, ["Drop sneaker (EU 42)", "Canvas tote"]),
            ("pending", 800, ["Cold brew"]),
        ], summary
        samples = httpx.get(
            f"{server.base_url}/api/v1/events/{events[0]['id']}/samples", headers=headers
        ).json()
        assert samples["samples"] == 2, samples
        [paid_by] = samples["allocations"]
        assert paid_by["allocated_to"].startswith("partner:") and paid_by["cost_minor"] == 160
        rsvps = httpx.get(
            f"{server.base_url}/api/v1/events/{events[0]['id']}/rsvps", headers=headers
        )
        assert rsvps.status_code == 200 and len(rsvps.json()) == 3
        # The VIP drop (made once): its seed test passed, and the server's in-process
        # worker sends its A/B test half into the development mailbox.
        deadline = time.monotonic() + 30
        while True:
            drops = httpx.get(f"{server.base_url}/api/v1/drops", headers=headers).json()
            assert [(d["name"], d["seed_status"]) for d in drops] == [
                ("Saturday VIP drop", "passed")
            ]
            counts = drops[0]["counts"]
            # The development mailbox confirms what it stored: those rows are delivered.
            if counts.get("delivered", 0) and not counts.get("pending"):
                break
            assert time.monotonic() < deadline, drops
            time.sleep(0.5)
        assert drops[0]["status"] == "sending" and counts["held"] > 0
        assert all(e["ok"] for e in drops[0]["seed_report"])


def test_a_host_imports_the_same_list_twice_and_nothing_changes(tmp_path: Path) -> None:
    import subprocess

    from tests.server import POPDROP, server_env

    env = server_env(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*POPDROP, *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )

    assert cli("db", "upgrade").returncode == 0
    assert cli("org", "create", "shop", "Corner Shop").returncode == 0
    source = tmp_path / "list.csv"
    source.write_text(
        "email,phone,first_name,tags,consent_email,consent_proof\n"
        "ann@shop.example,06 12 34 56 78,Ann,vip,yes,paper form\n"
        "bob@shop.example,,Bob,,yes,\n"
        "not-an-email,,Carl,,,\n"
        "ANN@shop.example,,Ann again,,,\n"
    )
    report = tmp_path / "report.csv"
    first = cli(
        "contacts",
        "import",
        "--org",
        "shop",
        str(source),
        "--region",
        "FR",
        "--report",
        str(report),
    )
    assert first.returncode == 0, first.stderr
    assert "4 rows: 2 created, 0 updated, 0 unchanged, 2 refused" in first.stdout
    problems = list(csv.DictReader(report.open()))
    assert [(p["line"], p["reason"], p["refused"]) for p in problems] == [
        ("3", "consent_without_proof", "no"),
        ("4", "bad_email", "yes"),
        ("5", "duplicate", "yes"),
    ]
    ledger, contacts = tmp_path / "consent.csv", tmp_path / "contacts.csv"
    assert cli("consent", "export", "--org", "shop", "--out", str(ledger)).returncode == 0
    assert cli("contacts", "export", "--org", "shop", "--out", str(contacts)).returncode == 0
    exported = (ledger.read_text(), contacts.read_text())

    second = cli("contacts", "import", "--org", "shop", str(source), "--region", "FR")
    assert second.returncode == 0, second.stderr
    assert "4 rows: 0 created, 0 updated, 2 unchanged, 2 refused" in second.stdout
    assert "line 4: bad_email" in second.stderr
    assert cli("consent", "export", "--org", "shop", "--out", str(ledger)).returncode == 0
    assert cli("contacts", "export", "--org", "shop", "--out", str(contacts)).returncode == 0
    assert (ledger.read_text(), contacts.read_text()) == exported
    rows = list(csv.DictReader(contacts.open()))
    assert [(r["email"], r["phone"], r["consent_email"]) for r in rows] == [
        ("ann@shop.example", "+33612345678", "granted"),
        ("bob@shop.example", "", "none"),
    ]
    sendable = tmp_path / "sendable.csv"
    assert (
        cli(
            "contacts", "export", "--org", "shop", "--sendable", "email", "--out", str(sendable)
        ).returncode
        == 0
    )
    assert [r["email"] for r in csv.DictReader(sendable.open())] == ["ann@shop.example"]

    erased = cli("contacts", "erase", "--org", "shop", "--email", "Ann@Shop.example")
    assert erased.returncode == 0, erased.stderr
    third = cli("contacts", "import", "--org", "shop", str(source), "--region", "FR")
    assert "0 created, 0 updated, 1 unchanged, 3 refused" in third.stdout
    assert "line 2: suppressed" in third.stderr
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("email,shoe_size\nx@shop.example,42\n")
    refused = cli("contacts", "import", "--org", "shop", str(unknown))
    assert refused.returncode == 2 and "shoe_size" in refused.stderr
    purge = cli("contacts", "purge", "--org", "shop")
    assert purge.returncode == 2 and "retention" in purge.stderr
