"""AsyncClient against a real poolnode: the same names as Client, awaited."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from conftest import Node, locate, wait_gone
from pyfleet import (
    AsyncClient,
    BadRequest,
    DeadlineExceeded,
    NotFound,
    PayloadTooLarge,
    RemoteError,
    SessionLost,
    Unavailable,
    WorkerLost,
)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_call_stream_raw(node: Node, tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncClient(node.url, pool="default") as c:
            assert await c.call("echo", {"hi": 1}, timeout=5.0) == {"hi": 1}
            assert await c.call("reverse", b"ab", raw=True) == b"ba"
            assert await c.call("count", {"n": 2}) == [0, 1]
            assert [i async for i in c.stream("count", {"n": 3})] == [0, 1, 2]
            gate = tmp_path / "gate"
            async with c.stream("gated", {"gate": str(gate)}) as items:
                assert await items.__anext__() == 0  # before the gate opens: as produced
                gate.touch()
                assert [i async for i in items] == [1]
            got = []
            with pytest.raises(RemoteError) as e:
                async for i in c.stream("count_then_fail"):
                    got.append(i)
            assert got == [0, 1] and e.value.type == "ValueError"

    run(main())


def test_typed_function_and_functions(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url) as c:
            assert await c.call("resize", {"url": "u", "width": 3}) == {"url": "u", "width": 3}
            with pytest.raises(BadRequest) as e:
                await c.call("resize", {"url": "u", "depth": 1})
            assert e.value.message == "depth: unknown field"
            fns = {f["name"]: f for f in await c.functions()}
            assert fns["resize"]["nodes"] == [node.name]
            assert fns["resize"]["input_schema"]["required"] == ["url"]
            assert fns["resize"]["output_schema"]["$ref"] == "#/$defs/Thumb"

    run(main())


def test_gather_of_a_thousand_calls(node: Node) -> None:
    async def main() -> list[object]:
        async with AsyncClient(node.url) as c:
            return await asyncio.gather(*(c.call("echo", i, timeout=60) for i in range(1000)))

    assert run(main()) == list(range(1000))


def test_errors(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url) as c:
            with pytest.raises(BadRequest, match="you asked wrong"):
                await c.call("bad")
            with pytest.raises(NotFound):
                await c.call("nope")
            with pytest.raises(DeadlineExceeded):
                await c.call("sleep", 3000, timeout=0.3)
            with pytest.raises(PayloadTooLarge):
                await c.call("big", 2 << 20)
            with pytest.raises(WorkerLost):
                await c.call("die", timeout=30)
            with pytest.raises(RemoteError) as e:
                await c.call("fail")
            assert type(e.value) is RemoteError and e.value.type == "RuntimeError"
        async with AsyncClient(node.url, pool="nobody") as c:
            with pytest.raises(Unavailable):
                await c.call("echo")
        with pytest.raises(RuntimeError, match="not connected"):
            await AsyncClient(node.url).call("echo")

    run(main())


def test_session(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url) as c:
            async with c.session() as s:
                first = await s.call("pid")
                assert s.node == node.name
                assert [await s.call("pid") for _ in range(5)] == [first] * 5
                assert [i async for i in s.stream("count", {"n": 2})] == [0, 1]
                # Once the node has seen its worker die (a call sent
                # before that meets the dead worker: WorkerLost).
                worker, supervised = locate(await s.call("whereami"))
                async with c.events(timeout=60.0, kind="crashed") as events:
                    os.kill(worker, signal.SIGKILL)
                    assert wait_gone(worker, 10)
                    async for ev in events:
                        if ev.get("pid") == supervised:
                            break
                    else:
                        pytest.fail("no crashed event")
                with pytest.raises(SessionLost):
                    await s.call("pid")

    run(main())


def test_jobs(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url) as c:
            job = await c.submit("echo", {"x": 1}, job_id="async-job-1")
            assert job.id == "async-job-1"
            assert await job.result(timeout=30.0) == {"x": 1}
            assert await c.job("async-job-1").result(timeout=30.0) == {"x": 1}
            with pytest.raises(BadRequest):
                await (await c.submit("bad", 1)).result(timeout=30)
            slow = await c.submit("sleep", 1000)
            with pytest.raises(TimeoutError):
                await slow.result(timeout=0.1)
            assert await slow.result(timeout=30) == 1000
            # The result is published before the status settles (as in
            # test_client.py's _wait_state): wait for it, within a bound.
            for _ in range(200):
                if await slow.status() == "done":
                    break
                await asyncio.sleep(0.05)
            assert await slow.status() == "done"
            info = await slow.info()
            assert info["node"] == node.name and info["attempts"] == 1
            assert await slow.progress() is None

    run(main())


def test_nodes_and_events(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url) as c:
            rows = await c.nodes()
            assert [(r["node"], r["workers"]) for r in rows] == [(node.name, 2)]
            async with c.events(timeout=60.0, kind="crashed") as events:
                worker, supervised = locate(await c.call("whereami"))
                os.kill(worker, signal.SIGKILL)
                async for ev in events:
                    if ev.get("pid") == supervised:
                        assert ev["kind"] == "crashed" and ev["node"] == node.name
                        break
                else:
                    pytest.fail("no crashed event")
            assert await c.call("echo", 1, timeout=30) == 1
            assert [ev async for ev in c.events(timeout=0.2, kind="node_stopped")] == []

    run(main())


def test_nodes_detail_async(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.url) as c:
            # An earlier test of the module may have killed a worker: wait for
            # its replacement rather than read the node mid-restart.
            for _ in range(60):
                (row,) = await c.nodes(detail=True)
                d = row["detail"]
                if len(d["workers"]) == 2:
                    break
            assert d["node"] == node.name and len(d["workers"]) == 2
            worker, _ = locate(await c.call("whereami"))
            # The detail names the same host pid as the worker's own answer.
            assert worker in [w["pid"] for w in (await c.nodes(detail=True))[0]["detail"]["workers"]]

    run(main())
