"""pyfleet.Context on a worker's Batches stream, the one the node uses:
what a call knows of itself, its PROGRESS and LOG frames, cancel and
deadline. test_context_node.py drives the same app through a real node and
client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import APPS, Conn, Result, Worker, error, value
from pyfleet import App, Context, calls
from pyfleet._proto import worker_pb2


@pytest.fixture(scope="module", params=[1, 4], ids=["concurrency1", "concurrency4"])
def ctx_worker(request: pytest.FixtureRequest) -> Iterator[tuple[Worker, Conn, dict]]:
    worker = Worker("ctx_app", APPS, concurrency=request.param)
    conn = None
    try:
        hs = worker.ready()
        conn = Conn(worker.target)
        yield worker, conn, hs
    finally:
        if conn is not None:
            conn.close()
        worker.kill()


def send(conn: Conn, function: str, payload: object, **fields: object) -> int:
    call_id = conn.next_id()
    conn.send_batch(
        [
            worker_pb2.Call(
                id=call_id, function=function, payload=json.dumps(payload).encode(), **fields
            )
        ]
    )
    return call_id


def test_handshake_runs_context_functions_off_the_loop(ctx_worker: tuple[Worker, Conn, dict]) -> None:
    # Their frames must reach the node while they run, which the loop
    # cannot send while an inline call holds it.
    _, _, hs = ctx_worker
    inline = {f["name"]: f["inline"] for f in hs["functions"]}
    assert inline["info"] is False and inline["poll"] is False
    concurrency1 = inline["plain"]
    assert inline["plain"] is concurrency1  # plain functions keep the old rule


@pytest.mark.parametrize("function", ["info", "ainfo"])
def test_call_fields(ctx_worker: tuple[Worker, Conn, dict], function: str) -> None:
    _, conn, _ = ctx_worker
    before = time.time()
    frames = conn.frames(send(conn, function, {"x": 1}, request_id="req-7", timeout_ms=30_000))
    got = value(frames[-1])
    assert got["payload"] == {"x": 1}
    assert got["request_id"] == "req-7"
    assert got["job_id"] is None and got["attempt"] == 1
    assert before + 29 < got["deadline"] < time.time() + 30.5
    assert 25 < got["remaining"] <= 30
    assert got["cancelled"] is False


def test_job_fields(ctx_worker: tuple[Worker, Conn, dict]) -> None:
    _, conn, _ = ctx_worker
    frames = conn.frames(send(conn, "info", None, request_id="r", job_id="job-9", attempt=3))
    got = value(frames[-1])
    assert got["job_id"] == "job-9" and got["attempt"] == 3
    # No deadline in the frame: none in the context.
    assert got["deadline"] is None and got["remaining"] is None


def test_progress_is_rate_limited_and_the_last_value_comes_before_end(
    ctx_worker: tuple[Worker, Conn, dict],
) -> None:
    _, conn, _ = ctx_worker
    n = 20_000
    frames = conn.frames(send(conn, "flood", n))
    *progress, end = frames
    assert value(end) == n
    assert progress, "no PROGRESS frame"
    assert all(f.kind == Result.PROGRESS for f in progress)
    values = [json.loads(f.payload) for f in progress]
    assert values[-1] == n - 1  # the latest value is never lost
    assert values == sorted(values)
    # A tight loop of 20,000 reports is folded, whatever the machine's
    # speed: at most one frame per interval plus the first and the last.
    assert len(values) < n // 10, len(values)


def test_log_frames_whole_with_level_and_request_id(ctx_worker: tuple[Worker, Conn, dict]) -> None:
    _, conn, _ = ctx_worker
    frames = conn.frames(send(conn, "logs", {"who": "ann"}, request_id="log-1"))
    *logs, end = frames
    assert value(end) == "logged"
    assert [f.kind for f in logs] == [Result.LOG] * 4
    assert [f.level for f in logs] == ["INFO", "ERROR", "WARNING", "DEBUG"]
    assert {f.request_id for f in logs} == {"log-1"}
    assert logs[0].payload == b"hello ann"
    tb = logs[1].payload.decode()
    # One record: the message, the whole traceback, the multi-line text.
    assert tb.startswith("it failed for ann\nTraceback (most recent call last):")
    assert "ValueError: boom\nsecond line of the message" in tb


def test_cancel_seen_by_a_polling_sync_call(ctx_worker: tuple[Worker, Conn, dict], tmp_path: Path) -> None:
    _, conn, _ = ctx_worker
    started, out = tmp_path / "started", tmp_path / "out"
    call_id = send(conn, "poll", {"started": str(started), "out": str(out)}, timeout_ms=60_000)
    deadline = time.monotonic() + 15
    while not started.exists():
        assert time.monotonic() < deadline, "poll never started"
        time.sleep(0.01)
    assert not conn.ended(call_id)
    conn.cancel(call_id)
    assert value(conn.frames(call_id)[-1]) == "stopped"
    assert json.loads(out.read_text())["remaining"] > 30  # cancelled, not at its deadline


def test_deadline_turns_cancelled_true(ctx_worker: tuple[Worker, Conn, dict], tmp_path: Path) -> None:
    _, conn, _ = ctx_worker
    out = tmp_path / "out"
    frames = conn.frames(send(conn, "poll", {"started": str(tmp_path / "s"), "out": str(out)}, timeout_ms=300))
    assert value(frames[-1]) == "stopped"
    assert json.loads(out.read_text())["remaining"] == 0


def test_cancel_of_an_async_call(ctx_worker: tuple[Worker, Conn, dict], tmp_path: Path) -> None:
    _, conn, _ = ctx_worker
    started, out = tmp_path / "started", tmp_path / "out"
    call_id = send(conn, "asleep", {"started": str(started), "out": str(out)})
    deadline = time.monotonic() + 15
    while not started.exists():
        assert time.monotonic() < deadline, "asleep never started"
        time.sleep(0.01)
    conn.cancel(call_id)
    assert error(conn.frames(call_id)[-1])[:2] == (499, "Cancelled")
    assert json.loads(out.read_text()) == {"cancelled": True}


def test_context_parameter_shapes() -> None:
    from pyfleet.context import Context as C

    app = App()

    @app.function
    def first(ctx: Context, payload: int) -> None: ...

    @app.function
    def last(payload: int, ctx: "Context") -> None: ...

    @app.function
    def keyword(payload: int, *, ctx: Context) -> None: ...

    @app.function
    def alone(ctx: Context) -> None: ...

    @app.function
    def none(payload: int) -> None: ...

    specs = app.functions
    assert specs["first"].context == "ctx" and specs["last"].context == "ctx"
    assert specs["keyword"].context == "ctx" and specs["alone"].context == "ctx"
    assert specs["none"].context is None and specs["none"].binder.plain
    ctx = C(worker_pb2.Call(id=1))

    # The binder puts the body and the context where each signature wants
    # them (pyfleet/typed.py; calls.invoke injects the context).
    def f1(ctx: Context, payload: int) -> tuple:
        return (ctx, payload)

    def f2(payload: int, ctx: Context) -> tuple:
        return (ctx, payload)

    def f3(payload: int, *, ctx: Context) -> tuple:
        return (ctx, payload)

    def f4(ctx: Context) -> tuple:
        return (ctx, None)

    assert C(worker_pb2.Call(id=1)).remaining() == float("inf")
    a = App()
    for f in (f1, f2, f3, f4):
        a.function(f)
        spec = a.functions[f.__name__]
        assert spec.context == "ctx"
        body = b"5" if f is not f4 else b"{}"
        got = calls.invoke(worker_pb2.Call(id=1, payload=body), spec, ctx)
        assert got == (ctx, 5 if f is not f4 else None)

    with pytest.raises(ValueError, match="at most one"):

        @App().function
        def two(a: Context, b: Context) -> None: ...


def test_progress_needs_json() -> None:
    ctx = Context(worker_pb2.Call(id=1))
    with pytest.raises(TypeError, match="JSON"):
        ctx.progress(object())
