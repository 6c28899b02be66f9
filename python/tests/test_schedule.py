"""Delayed and recurring jobs (JetStream message schedules) against a real
poolnode with its embedded NATS server and real workers."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import nats
import pytest

from conftest import Node
from pyfleet import AsyncClient, BadRequest, Cancelled, Client


@pytest.fixture
def client(node: Node) -> Iterator[Client]:
    with Client(node.url, pool="default") as c:
        yield c


def wait_state(job, want: str, timeout: float = 30) -> dict:  # type: ignore[no-untyped-def]
    """The node stores a job's result before it writes its final status."""
    deadline = time.monotonic() + timeout
    while True:
        info = job.info()
        if info["state"] == want or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_delayed_job_is_scheduled_then_runs(client: Client) -> None:
    before = datetime.now(timezone.utc)
    job = client.submit("echo", "later", delay=1.5)
    assert job.at is not None and job.at >= before + timedelta(seconds=1.5)
    # Written at submission; only a stall of the whole delay could pass it.
    state = job.status()
    assert state == "scheduled" or datetime.now(timezone.utc) >= job.at
    assert job.result(timeout=60) == "later"
    info = wait_state(job, "done")
    assert info["state"] == "done" and info["attempts"] == 1
    started = datetime.fromisoformat(info["started"].replace("Z", "+00:00"))
    assert started >= job.at.replace(microsecond=0)


def test_delayed_job_keeps_its_priority(client: Client) -> None:
    # The schedule targets the priority's subject, so the job fired later is
    # fetched by that level's consumer, not dropped between levels.
    for level in ("high", "low"):
        job = client.submit("echo", level, delay=1, priority=level)
        assert job.status() == "scheduled" or datetime.now(timezone.utc) >= job.at
        assert job.result(timeout=60) == level
        assert wait_state(job, "done")["state"] == "done"


def test_at_datetime_async(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url, pool="default") as c:
            at = datetime.now(timezone.utc) + timedelta(seconds=1)
            job = await c.submit("echo", {"at": True}, at=at)
            assert job.at == at
            assert await job.result(timeout=60) == {"at": True}

    asyncio.run(main())


def test_cancel_a_scheduled_job(client: Client) -> None:
    job = client.submit("echo", "never", delay=3600)
    assert job.status() == "scheduled"
    assert job.cancel() is True
    # The cancel makes its schedule fire now, and the node settles it
    # without running it: the result says so long before the hour.
    with pytest.raises(Cancelled):
        job.result(timeout=60)
    info = job.info()
    assert info["state"] == "cancelled" and not info.get("worker")
    assert info.get("started") in (None, "0001-01-01T00:00:00Z")
    assert job.cancel() is False


def test_cron_schedule_fires_three_times(node: Node) -> None:
    async def main() -> None:
        nc = await nats.connect(node.url)
        try:
            sub = await nc.subscribe("py-cron.tick")
            async with AsyncClient(node.url, pool="default") as c:
                # Every second: the server's cron has a seconds field.
                s = await c.schedule("pytick", "* * * * * *", "echo", {"n": 1}, reply_to="py-cron.tick")
                assert s["pattern"] == "* * * * * *" and s["function"] == "echo"
                listed = await c.schedules()
                assert [(x["name"], x["cron"], x["function"], x["payload"]) for x in listed] == [
                    ("pytick", "* * * * * *", "echo", {"n": 1})
                ]
                ids = set()
                while len(ids) < 3:
                    msg = await sub.next_msg(timeout=30)
                    job_id = msg.headers["Pyfleet-Job-Id"]
                    assert re.fullmatch(r"pytick-[0-9]+", job_id) and msg.data == b'{"n":1}'
                    ids.add(job_id)
                assert await c.unschedule("pytick") is True
                assert await c.unschedule("pytick") is False
                assert await c.schedules() == []
        finally:
            await nc.close()

    asyncio.run(main())


def test_schedule_sync_list_and_remove(client: Client) -> None:
    client.schedule("nightly", "30 2 * * *", "echo", "n", timeout=60)
    (s,) = client.schedules()
    assert (s["name"], s["cron"], s["pattern"], s["payload"]) == ("nightly", "30 2 * * *", "0 30 2 * * *", "n")
    assert client.unschedule("nightly") is True
    assert client.schedules() == []


def test_bad_schedule_input_names_the_problem(client: Client) -> None:
    with pytest.raises(ValueError, match="is in the past"):
        client.submit("echo", 1, at=datetime.now(timezone.utc) - timedelta(minutes=1))
    with pytest.raises(ValueError, match="want a positive number of seconds"):
        client.submit("echo", 1, delay=-1)
    with pytest.raises(ValueError, match="not both"):
        client.submit("echo", 1, delay=1, at=datetime.now(timezone.utc) + timedelta(hours=1))
    with pytest.raises(ValueError, match=r"cron '\* \* \*': 3 fields"):
        client.schedule("bad", "* * *", "echo")
    with pytest.raises(ValueError, match="at least 1s"):
        client.schedule("bad", "@every 10ms", "echo")
    with pytest.raises(ValueError, match="unknown macro"):
        client.schedule("bad", "@fortnightly", "echo")
    with pytest.raises(BadRequest, match=r"cron '61 \* \* \* \*' \(0 61 \* \* \* \*\): the NATS server refuses"):
        client.schedule("bad", "61 * * * *", "echo")
    with pytest.raises(ValueError, match="schedule name"):
        client.schedule("a.b", "@hourly", "echo")
    assert client.schedules() == []
