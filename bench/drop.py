"""Drop of N recipients to a local SMTP peer: render+enqueue, delivery against raw SMTP, RSS.

1. Seed (PostgreSQL, its own database): an organization and N contacts with email consent,
   a third each hot / warm / cold; a drop with per-bucket email content (subject, text,
   HTML with two tracked links), a per-recipient voucher, its seed test overridden.
2. Render+enqueue (target >= 5,000 msg/s): `service.start_drop` freezes the recipients
   into send rows, then every message is rendered as the sender does it (compiled variant,
   signed links, per-recipient code, `render_email`, RFC 8058 headers) by a fleet of
   worker processes (default: one per core, `--render-processes`), each reading its share
   of the frozen rows and their contacts in chunks; they are started before the clock, as
   a worker fleet is up before a drop starts. Rate = N / (freeze + render). The CPU time
   per message (summed over the workers) is printed too: it does not depend on the load.
3. Delivery: `pipeline.Sender` with `smtp.SmtpPool` (C connections, the worker's batch
   size and concurrency) sends every row to an aiosmtpd peer running in a separate
   process (so it never shares this process's GIL). Every row must end `sent` and the
   peer must count N messages.
4. The limit, same run, same peer: plain aiosmtplib `sendmail` over C persistent
   connections, with bytes rendered by the product (so the same sizes), timed in two
   halves, one right before delivery and one right after, so a load that drifts during
   the run weighs on both sides alike. Limit = raw messages / raw seconds; ratio =
   delivery rate / limit (target >= 0.8). The CPU time per message of this process and
   of the peer, in each phase, says which side bounds the rate.
5. Peak RSS of this process (`ru_maxrss`; the peer is a child, not counted): < 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import sys
import time
import unicodedata
from datetime import timedelta
from multiprocessing import get_context
from typing import Any

import aiosmtplib
from sqlalchemy import func, select

import _common as common
from popdrop.accounts.service import ROLES, Principal
from popdrop.audience import settings, unsubscribe
from popdrop.audience.models import Contact
from popdrop.core.clock import SystemClock
from popdrop.core.config import Settings
from popdrop.core.db import Database
from popdrop.core.identity import identity_hash
from popdrop.core.migrate import upgrade
from popdrop.drops import content
from popdrop.drops import service as drops
from popdrop.drops.models import Drop, DropVariant, SendRow
from popdrop.drops.pipeline import Sender
from popdrop.drops.schemas import DropCreate
from popdrop.outbound.smtp import SmtpPool, render_message
from popdrop.outbound.transports import OutboundEmail
from popdrop.vouchers import codes
from popdrop.vouchers.models import VoucherBatch

FULL = 100_000
QUICK = 10_000
TARGET_RENDER_PER_S = 5_000.0
TARGET_RATIO = 0.8
TARGET_RSS_MB = 300.0
BASE_URL = "https://pop.example"
CHUNK = 2_000  # rows read per query in the render pass
SAMPLES = 500  # rendered messages kept for the raw SMTP limit (cycled)

FIRST = ["Ana", "Bruno", "Chloé", "Dario", "Emma", "Farid", "Gaëlle", "Hugo", "Inès", "Jules"]
# Mailbox providers take ASCII local parts: "Gaëlle" signs up as "gaelle".
ASCII_FIRST = [
    unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower() for name in FIRST
]
HTML = """\
<h1>{{ first_name }}, the {bucket} drop is on</h1>
<p>Eight hours only, at the Tram Depot pop-up: sneakers, vinyl and a coffee bar.
Show this code at the till for your discount: <strong>{{ voucher_code }}</strong>.</p>
<p><a href="https://shop.example/drop?ref={bucket}">See what is in the drop</a></p>
<p><a href="https://shop.example/map">How to find us</a></p>
<p>Doors open at 10:00; the first hour is for invited guests only.</p>
"""
TEXT = """\
{{ first_name }}, the {bucket} drop is on. Eight hours only, at the Tram Depot pop-up.
Your code: {{ voucher_code }}
See what is in the drop: https://shop.example/drop?ref={bucket}
How to find us: https://shop.example/map
"""


def drop_spec() -> DropCreate:
    email = {
        bucket: {
            "subject": f"{{{{ first_name }}}}, your {bucket} invite: the drop is on",
            "text": TEXT.replace("{bucket}", bucket),
            "html": HTML.replace("{bucket}", bucket),
        }
        for bucket in ("hot", "warm", "cold")
    }
    email["default"] = email["cold"]
    return DropCreate.model_validate(
        {
            "name": "Bench drop",
            "channels": ["email"],
            "from_email": "drops@popdrop.example",
            "from_name": "Tram Depot",
            "variants": [{"name": "A", "content": {"email": email}}],
            "voucher": {"discount_kind": "percent", "discount_value": 15},
            "quiet_start_hour": 0,
            "quiet_end_hour": 0,  # no quiet hours: the bench measures throughput
        }
    )


# ---------------------------------------------------------------- the SMTP peer (child)


def _peer_main(port: int, counter: Any, stop: Any) -> None:
    """A counting aiosmtpd sink; runs in its own process until `stop` is set."""
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            counter.value += 1  # one writer (the controller's thread): no lock needed
            return "250 OK"

    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        stop.wait()
    finally:
        controller.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- seeding


async def seed_contacts(url: str, org_id: int, n: int) -> None:
    """N consenting contacts by COPY: a third each hot / warm / cold."""
    now = common.now()
    ages = [timedelta(days=2), timedelta(days=30), timedelta(days=200)]
    records = []
    for i in range(n):
        email = f"{ASCII_FIRST[i % len(FIRST)]}.{i}@inbox.example"
        records.append(
            (
                org_id,
                email,
                identity_hash(common.SIGNER, "email", email),
                FIRST[i % len(FIRST)],
                "granted",
                "none",
                "none",
                "all",
                now,
                now,
                now - ages[i % 3],
            )
        )
    conn = await common.pg_connect(url)
    try:
        await conn.copy_records_to_table(
            "contacts",
            records=records,
            columns=[
                "org_id",
                "email",
                "email_hash",
                "first_name",
                "consent_email",
                "consent_sms",
                "consent_chat",
                "frequency",
                "created_at",
                "updated_at",
                "last_engaged_at",
            ],
        )
        await conn.execute("ANALYZE contacts")
    finally:
        await conn.close()


# ---------------------------------------------------------------- (a) render + enqueue


async def render_share(
    url: str, org_id: int, drop_id: int, share: int, shares: int, keep_samples: bool
) -> dict[str, Any]:
    """Render this worker's share of the frozen rows (`id % shares == share`) exactly as
    `Sender._prepare` does, reading rows and contacts in chunks."""
    db = Database(url, pool_size=2, max_overflow=0)
    cpu = time.process_time()
    now = common.now()
    try:
        async with db.reader() as session:
            drop = await session.get(Drop, drop_id)
            assert drop is not None and drop.voucher_batch_id is not None
            variant_row = await session.scalar(
                select(DropVariant).where(DropVariant.drop_id == drop_id)
            )
            assert variant_row is not None
            batch = await session.get(VoucherBatch, drop.voucher_batch_id)
            assert batch is not None
            recency = await settings.get_settings(session, org_id)
        variant = content.compile_variant(variant_row.content)
        rendered = 0
        size = 0
        samples: list[bytes] = []
        sample_to: list[str] = []
        after = 0
        while True:
            async with db.reader() as session:
                rows = (
                    await session.execute(
                        select(SendRow.id, SendRow.contact_id)
                        .where(
                            SendRow.drop_id == drop_id,
                            SendRow.id > after,
                            SendRow.id % shares == share,
                        )
                        .order_by(SendRow.id)
                        .limit(CHUNK)
                    )
                ).all()
                if not rows:
                    break
                contacts = {
                    c.id: c
                    for c in (
                        await session.scalars(
                            select(Contact).where(Contact.id.in_([r.contact_id for r in rows]))
                        )
                    ).all()
                }
            for row_id, contact_id in rows:
                # What `Sender._prepare` does before the provider call (the code is derived
                # as `vouchers.issue_derived` derives it; its insert belongs to delivery).
                contact = contacts[contact_id]
                code = codes.format_code(
                    codes.derived_code(
                        batch.prefix,
                        common.SIGNER.mac(
                            "voucher-derived", f"{batch.id}:drop:{drop_id}:{contact_id}"
                        ),
                    )
                )
                bucket = settings.bucket_of(
                    contact.last_engaged_at, now, recency.hot_days, recency.warm_days
                )
                links = content.Links(common.SIGNER, BASE_URL, drop, row_id, contact)
                values = content.context_for(drop, contact, None, (0, code), links)
                email = variant.render_email(bucket, values, links)
                headers = unsubscribe.unsubscribe_headers_for(links.unsubscribe_url)
                size += len(email.subject) + len(email.text) + len(email.html or "")
                rendered += 1
                if keep_samples and len(samples) < SAMPLES:
                    assert contact.email is not None
                    samples.append(
                        render_message(
                            OutboundEmail(
                                message_id=f"<drop-{drop_id}.contact-{contact_id}.email@popdrop>",
                                to=contact.email,
                                from_address=drop.from_email,
                                from_name=drop.from_name,
                                subject=email.subject,
                                text=email.text,
                                html=email.html,
                                headers=headers,
                            )
                        )
                    )
                    sample_to.append(contact.email)
            after = rows[-1][0]
    finally:
        await db.dispose()
    return {
        "rendered": rendered,
        "size": size,
        "cpu_seconds": time.process_time() - cpu,
        "samples": samples,
        "sample_to": sample_to,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _render_main(
    url: str, org_id: int, drop_id: int, share: int, shares: int, ready: Any, go: Any, out: Any
) -> None:
    """A render worker process: ready (imported, connected) before the clock starts, as a
    running worker fleet is when a drop starts."""
    ready.release()
    go.wait()
    out.put((share, asyncio.run(render_share(url, org_id, drop_id, share, shares, share == 0))))


async def freeze_and_render(
    db: Database, url: str, org_id: int, drop_id: int, processes: int
) -> tuple[float, float, int, list[bytes], list[str], float, float]:
    """(freeze s, render s, messages rendered, sample bytes, sample recipients, render CPU
    s, peak RSS MB of a render worker): the freeze here, the render by `processes` worker
    processes in parallel, each its share of the rows."""
    mp = get_context("spawn")
    ready = mp.Semaphore(0)
    go = mp.Event()
    out = mp.Queue()
    workers = [
        mp.Process(target=_render_main, args=(url, org_id, drop_id, k, processes, ready, go, out))
        for k in range(processes)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        await asyncio.to_thread(ready.acquire)
    owner = Principal(org_id, "bench:owner", "owner", ROLES["owner"])
    started = time.perf_counter()
    async with db.transaction() as session:
        await drops.start_drop(session, owner, drop_id, now=common.now())
    frozen = time.perf_counter()
    go.set()
    results = [await asyncio.to_thread(out.get) for _ in workers]
    done = time.perf_counter()
    for worker in workers:
        worker.join(timeout=30)
    shares = dict(results)
    rendered = sum(r["rendered"] for r in shares.values())
    size = sum(r["size"] for r in shares.values())
    cpu = sum(r["cpu_seconds"] for r in shares.values())
    rss = max(r["rss_mb"] for r in shares.values())
    print(f"  average rendered content: {size / max(rendered, 1):.0f} characters", flush=True)
    return (
        frozen - started,
        done - frozen,
        rendered,
        shares[0]["samples"],
        shares[0]["sample_to"],
        cpu,
        rss,
    )


# ---------------------------------------------------------------- (b) delivery, (c) raw


async def deliver(db: Database, port: int, connections: int, batch_size: int) -> tuple[float, int]:
    """Send every due row through the product's Sender + SmtpPool; (seconds, rows handled)."""
    pool = SmtpPool("127.0.0.1", port, size=connections)
    sender = Sender(
        db,
        common.SIGNER,
        SystemClock(),
        BASE_URL,
        email=pool,
        lease_seconds=60.0,
        batch_size=batch_size,
        concurrency=2 * connections,  # as worker.Worker configures it
        in_flight=connections,
    )
    started = time.perf_counter()
    try:
        handled = await sender.run_until_idle()
    finally:
        await pool.close()
    return time.perf_counter() - started, handled


async def raw_smtp(
    port: int, connections: int, messages: int, samples: list[bytes], to: list[str], sender: str
) -> float:
    """`messages` plain aiosmtplib sendmails over `connections` persistent connections."""
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port) for _ in range(connections)]
    for client in clients:
        await client.connect()
    next_index = 0

    async def pump(client: aiosmtplib.SMTP) -> None:
        nonlocal next_index
        while next_index < messages:
            i = next_index
            next_index += 1
            k = i % len(samples)
            await client.sendmail(sender, [to[k]], samples[k])

    started = time.perf_counter()
    await asyncio.gather(*(pump(c) for c in clients))
    seconds = time.perf_counter() - started
    for client in clients:
        await client.quit()
    return seconds


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace, url: str, port: int, counter: Any, peer_pid: int) -> int:
    n = args.recipients
    await common.reset_postgres(url)
    await upgrade(url)
    # The worker's pool (cli.worker): 4 + 4 overflow.
    db = Database(url, pool_size=4, max_overflow=4)
    try:
        async with db.transaction() as session:
            owner = await common.seed_org(session, "bench-drop")
            drop = await drops.create_drop(
                session, common.SIGNER, owner, drop_spec(), now=common.now()
            )
            await drops.override_seed(session, owner, drop.id, reason="bench", now=common.now())
            drop_id, from_email = drop.id, drop.from_email
        started = time.perf_counter()
        await seed_contacts(url, owner.org_id, n)
        print(f"seeded {n:,} contacts in {time.perf_counter() - started:.1f} s", flush=True)

        (
            freeze_s,
            render_s,
            rendered,
            samples,
            sample_to,
            render_cpu,
            render_rss,
        ) = await freeze_and_render(db, url, owner.org_id, drop_id, args.render_processes)
        render_rate = rendered / (freeze_s + render_s)
        print(
            f"render+enqueue  {freeze_s + render_s:7.1f} s  {render_rate:8.0f} msg/s   "
            f"(freeze {freeze_s:.1f} s, render {render_s:.1f} s by "
            f"{args.render_processes} worker processes, "
            f"{render_cpu / rendered * 1e6:.0f} us CPU per message)   "
            f"target {TARGET_RENDER_PER_S:.0f}, ratio {render_rate / TARGET_RENDER_PER_S:.2f}",
            flush=True,
        )
        message_bytes = sum(len(s) for s in samples) / len(samples)

        # The raw rate is a steady state: --quick times fewer messages to stay under a minute.
        raw_n = args.raw_messages or (min(n, 5_000) if args.quick else n)
        first_half = raw_n // 2
        raw_cpu = time.process_time()
        raw_peer_cpu = cpu_seconds(peer_pid)
        raw_s = await raw_smtp(port, args.connections, first_half, samples, sample_to, from_email)
        raw_cpu = time.process_time() - raw_cpu
        raw_peer_cpu = cpu_seconds(peer_pid) - raw_peer_cpu
        peer_before = counter.value
        print(f"  raw limit, first half: {first_half / raw_s:.0f} msg/s", flush=True)

        cpu = time.process_time()
        peer_cpu = cpu_seconds(peer_pid)
        deliver_s, handled = await deliver(db, port, args.connections, args.batch_size)
        deliver_cpu = time.process_time() - cpu
        deliver_peer_cpu = cpu_seconds(peer_pid) - peer_cpu
        delivered_rate = handled / deliver_s
        async with db.reader() as session:
            sent = int(
                await session.scalar(
                    select(func.count()).where(SendRow.drop_id == drop_id, SendRow.status == "sent")
                )
                or 0
            )
        peer_after_delivery = counter.value - peer_before
        print(
            f"delivery        {deliver_s:7.1f} s  {delivered_rate:8.0f} msg/s   "
            f"({sent:,} rows sent, peer got {peer_after_delivery:,}, "
            f"{args.connections} connections, batch {args.batch_size}, "
            f"~{message_bytes:.0f} bytes/message; CPU per message: this process "
            f"{deliver_cpu / max(handled, 1) * 1e6:.0f} us, peer "
            f"{deliver_peer_cpu / max(handled, 1) * 1e6:.0f} us)",
            flush=True,
        )

        cpu = time.process_time()
        peer_cpu = cpu_seconds(peer_pid)
        raw_s += await raw_smtp(
            port, args.connections, raw_n - first_half, samples, sample_to, from_email
        )
        raw_cpu += time.process_time() - cpu
        raw_peer_cpu += cpu_seconds(peer_pid) - peer_cpu
        raw_rate = raw_n / raw_s
        ratio = delivered_rate / raw_rate
        print(
            f"raw aiosmtplib  {raw_s:7.1f} s  {raw_rate:8.0f} msg/s   "
            f"({raw_n:,} messages, half before and half after delivery; CPU per message: "
            f"this process {raw_cpu / raw_n * 1e6:.0f} us, "
            f"peer {raw_peer_cpu / raw_n * 1e6:.0f} us)",
            flush=True,
        )
        print(
            f"delivery / raw  ratio {ratio:.3f}   (target >= {TARGET_RATIO})   "
            f"load average {' '.join(str(x) for x in common.load_average())}",
            flush=True,
        )
    finally:
        await db.dispose()
    # ru_maxrss is in KiB on Linux.
    peak_rss_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, render_rss)
    print(f"peak RSS        {peak_rss_mb:7.0f} MB   (target < {TARGET_RSS_MB:.0f} MB)", flush=True)
    complete = sent == n and peer_after_delivery == n
    common.emit(
        {
            "bench": "drop",
            "recipients": n,
            "connections": args.connections,
            "batch_size": args.batch_size,
            "message_bytes": round(message_bytes),
            "freeze_seconds": round(freeze_s, 2),
            "render_seconds": round(render_s, 2),
            "render_processes": args.render_processes,
            "render_cpu_us_per_message": round(render_cpu / rendered * 1e6, 1),
            "render_enqueue_per_s": round(render_rate, 1),
            "render_ratio_to_target": round(render_rate / TARGET_RENDER_PER_S, 3),
            "rate_per_s": round(delivered_rate, 1),
            "limit_per_s": round(raw_rate, 1),
            "ratio": round(ratio, 3),
            "target_ratio": TARGET_RATIO,
            "load_avg": common.load_average(),
            "delivery_seconds": round(deliver_s, 2),
            "delivery_cpu_us_per_message": round(deliver_cpu / max(handled, 1) * 1e6, 1),
            "delivery_peer_cpu_us_per_message": round(deliver_peer_cpu / max(handled, 1) * 1e6, 1),
            "raw_cpu_us_per_message": round(raw_cpu / raw_n * 1e6, 1),
            "raw_peer_cpu_us_per_message": round(raw_peer_cpu / raw_n * 1e6, 1),
            "delivered": sent,
            "peer_received": peer_after_delivery,
            "delivered_per_s": round(delivered_rate, 1),
            "raw_messages": raw_n,
            "raw_smtp_per_s": round(raw_rate, 1),
            "peak_rss_mb": round(peak_rss_mb, 1),
            "complete": complete,
        }
    )
    # Correctness only (every recipient got their message); the rates are ratios to read.
    return 0 if complete else 1


def main() -> int:
    defaults = Settings(_env_file=None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--database-url", help=f"default: {common.DEFAULT_PG_URL}_drop")
    parser.add_argument(
        "--recipients", type=int, default=None, help=f"default {FULL:,} (quick {QUICK:,})"
    )
    parser.add_argument(
        "--connections", type=int, default=defaults.smtp_pool_size, help="SMTP connections"
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.send_batch_size, help="rows per claim"
    )
    parser.add_argument(
        "--render-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes rendering in parallel (default: one per core)",
    )
    parser.add_argument(
        "--raw-messages",
        type=int,
        default=None,
        help="messages for the raw limit (default N; quick: 5,000)",
    )
    args = parser.parse_args()
    args.recipients = args.recipients or (QUICK if args.quick else FULL)
    # Its own database: benches may run side by side, and each drops its schema.
    url = common.pg_url(args.database_url)
    if args.database_url is None:
        url = url.replace("/popdrop_bench", "/popdrop_bench_drop")
    mp = get_context("spawn")
    counter = mp.Value("q", 0, lock=False)
    stop = mp.Event()
    port = free_port()
    peer = mp.Process(target=_peer_main, args=(port, counter, stop), daemon=True)
    peer.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # wait for the peer's greeting port to accept
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or not peer.is_alive():
                    raise SystemExit("the SMTP peer did not start") from None
                time.sleep(0.05)
        assert peer.pid is not None
        return asyncio.run(run(args, url, port, counter, peer.pid))
    finally:
        stop.set()
        peer.join(timeout=10)
        if peer.is_alive():
            peer.kill()


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(code)
