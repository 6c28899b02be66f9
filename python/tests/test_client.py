"""The blocking Client against a real poolnode and its real workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import pyfleet
from conftest import PYTHON_DIR, Node, alive, locate, wait_gone
from pyfleet import (
    BadRequest,
    Cancelled,
    Client,
    DeadlineExceeded,
    NotFound,
    PayloadTooLarge,
    RemoteError,
    SessionLost,
    Unavailable,
    WorkerLost,
)

StartNode = Callable[..., Node]


@pytest.fixture
def client(node: Node) -> Iterator[Client]:
    with Client(node.url, pool="default") as c:
        yield c


# ------------------------------------------------------------------- calls


def test_call_json(client: Client) -> None:
    assert client.call("echo", {"hi": 1}, timeout=5.0) == {"hi": 1}
    assert client.call("echo") is None  # no payload is JSON null
    assert client.call("echo", [1, "two", None], request_id="r-1") == [1, "two", None]


def test_call_raw(client: Client) -> None:
    assert client.call("reverse", b"abc\x00\xff", raw=True) == b"\xff\x00cba"


def test_call_to_a_node(client: Client, node: Node) -> None:
    assert client.call("echo", 7, node=node.name) == 7
    # No node of that name listens: the server says nobody does.
    with pytest.raises(Unavailable) as e:
        client.call("echo", 7, node="no-such-node")
    assert e.value.type == "NoResponders"


def test_call_of_a_generator_is_its_items(client: Client) -> None:
    assert client.call("count", {"n": 3}) == [0, 1, 2]
    assert client.call("count", {"n": 0}) == []


def test_bad_input_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(ValueError, match="must not contain '.'"):
        client.call("a.b")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        client.call("echo", 1, timeout=-1)
    with pytest.raises(ValueError, match="payload is not JSON"):
        client.call("echo", float("nan"))
    with pytest.raises(TypeError, match="raw=True sends bytes"):
        client.call("reverse", "text", raw=True)
    with pytest.raises(ValueError, match="pool 'a b' must be one subject token"):
        Client("nats://127.0.0.1:1", pool="a b")


# ----------------------------------------------------------------- streams


def test_stream_items_as_they_are_produced(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with client.stream("gated", {"gate": str(gate)}, timeout=30) as items:
        # The function waits for the gate after its first item: getting
        # that item before opening the gate shows it came as produced.
        assert next(items) == 0
        gate.touch()
        assert list(items) == [1]


def test_stream(client: Client, node: Node) -> None:
    s = client.stream("count", {"n": 3})
    assert list(s) == [0, 1, 2]
    assert s.node == node.name
    # A plain function's value is its one item.
    assert list(client.stream("echo", "one")) == ["one"]


def test_stream_error_after_items(client: Client) -> None:
    got = []
    with pytest.raises(RemoteError) as e:
        for item in client.stream("count_then_fail"):
            got.append(item)
    assert got == [0, 1]
    assert (e.value.code, e.value.type, e.value.message) == (500, "ValueError", "no more")


def test_stream_closed_early(client: Client) -> None:
    s = client.stream("count", {"n": 1000})
    assert next(s) == 0
    s.close()
    assert list(s) == []
    assert client.call("echo", 1) == 1


# ---------------------------------------------------------------- sessions


def test_session_keeps_its_worker(client: Client, node: Node) -> None:
    with client.session() as s:
        first = s.call("pid")
        assert s.node == node.name
        assert [s.call("pid") for _ in range(10)] == [first] * 10
        assert list(s.stream("count", {"n": 2})) == [0, 1]
    # Two sessions on a two-worker node: each keeps its own worker.
    with client.session("k-1") as a, client.session("k-2") as b:
        assert a.key == "k-1"
        pa, pb = a.call("pid"), b.call("pid")
        assert [a.call("pid") for _ in range(5)] == [pa] * 5
        assert [b.call("pid") for _ in range(5)] == [pb] * 5


def test_session_lost(client: Client, node: Node) -> None:
    with client.session() as s:
        worker, supervised = locate(s.call("whereami"))
        # Once the node has seen its worker die (a call sent before that
        # meets the dead worker: WorkerLost).
        with client.events(timeout=60.0, kind="crashed") as events:
            os.kill(worker, signal.SIGKILL)
            assert any(ev.get("pid") == supervised for ev in events)
        with pytest.raises(SessionLost) as e:
            s.call("pid")
    assert e.value.code == 410 and e.value.node == node.name
    # The node replaced the worker: new calls are served.
    assert client.call("echo", 1, timeout=30) == 1


# ------------------------------------------------------------------ errors


def test_bad_request_is_the_class_a_function_raises(client: Client, node: Node) -> None:
    assert BadRequest is pyfleet.app.BadRequest
    assert issubclass(BadRequest, RemoteError)
    with pytest.raises(BadRequest) as e:
        client.call("bad", 5)
    assert (e.value.code, e.value.type, e.value.message) == (400, "BadRequest", "you asked wrong: 5")
    assert e.value.node == node.name
    # The node's own 400: a deadline over its --max-timeout (1 h).
    with pytest.raises(BadRequest, match="Pyfleet-Timeout"):
        client.call("echo", 1, timeout=7200)


def test_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as e:
        client.call("no_such_function")
    assert (e.value.code, e.value.type) == (404, "NotFound")


def test_deadline_exceeded(client: Client) -> None:
    with pytest.raises(DeadlineExceeded) as e:
        client.call("sleep", 3000, timeout=0.3)
    assert (e.value.code, e.value.type) == (408, "DeadlineExceeded")


def test_payload_too_large(client: Client) -> None:
    # The node's 413: a reply over the NATS max payload (1 MB).
    with pytest.raises(PayloadTooLarge) as e:
        client.call("big", 2 << 20)
    assert (e.value.code, e.value.type) == (413, "TooLarge")
    # A request over it never leaves the client.
    with pytest.raises(PayloadTooLarge):
        client.call("echo", "x" * (2 << 20))


def test_unavailable(node: Node) -> None:
    with Client(node.url, pool="nobody") as c:
        with pytest.raises(Unavailable) as e:
            c.call("echo", 1)
    assert (e.value.code, e.value.type) == (503, "NoResponders")
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        Client("nats://127.0.0.1:1", connect_wait=1)


def test_worker_lost(client: Client, node: Node) -> None:
    with pytest.raises(WorkerLost) as e:
        client.call("die", timeout=30)
    assert (e.value.code, e.value.type, e.value.node) == (500, "WorkerLost", node.name)


def test_other_500_is_a_remote_error_with_the_remote_type(client: Client, node: Node) -> None:
    with pytest.raises(RemoteError) as e:
        client.call("fail")
    assert type(e.value) is RemoteError
    assert (e.value.code, e.value.type, e.value.message) == (500, "RuntimeError", "this function always fails")
    assert e.value.node == node.name
    assert str(e.value) == f"500 RuntimeError: this function always fails (node {node.name})"


# -------------------------------------------------------------------- jobs


def test_submit_and_result(client: Client, node: Node) -> None:
    job = client.submit("echo", {"x": 1})
    assert len(job.id) == 16 and not job.duplicate
    assert job.result(timeout=30.0) == {"x": 1}
    # The stored result, read again, and by a handle from another client.
    assert job.result(timeout=30.0) == {"x": 1}
    with Client(node.url) as other:
        assert other.job(job.id).result(timeout=30.0) == {"x": 1}


def test_submit_with_id_raw_and_streamed(client: Client) -> None:
    job = client.submit("reverse", b"xyz", job_id="raw-job-1", raw=True)
    assert job.id == "raw-job-1"
    assert job.result(timeout=30) == b"zyx"
    assert client.submit("count", {"n": 3}).result(timeout=30) == [0, 1, 2]
    again = client.submit("reverse", b"other", job_id="raw-job-1", raw=True)
    assert again.duplicate
    assert again.result(timeout=30) == b"zyx"


def test_job_raises_the_stored_error(client: Client, node: Node) -> None:
    # A 400 is dead-lettered at once, its error stored as the result.
    job = client.submit("bad", "j")
    with pytest.raises(BadRequest) as e:
        job.result(timeout=30)
    assert e.value.message == "you asked wrong: 'j'" and e.value.node == node.name
    with pytest.raises(NotFound):
        client.submit("no_such_function").result(timeout=30)


def test_job_result_timeout(client: Client) -> None:
    job = client.submit("sleep", 2000)
    with pytest.raises(TimeoutError, match=f"no result for job {job.id}"):
        job.result(timeout=0.2)
    assert job.result(timeout=30) == 2000


def test_job_dead_letter_when_the_result_cannot_be_stored(start_node: StartNode) -> None:
    """A full results stream: the node dead-letters the job with the error
    it could not store; result() finds it in the dead letters, as
    `submit job --wait` does."""
    n = start_node(workers=1)

    async def fill_results() -> None:
        import nats
        from nats.js.api import DiscardPolicy

        nc = await nats.connect(n.url)
        js = nc.jetstream()
        await js.delete_stream("PYFLEET_RESULTS")
        await js.add_stream(
            name="PYFLEET_RESULTS", subjects=["pyfleet.result.>"], max_msgs=1, discard=DiscardPolicy.NEW
        )
        await js.publish("pyfleet.result.default.filler", b'"filler"')
        await nc.close()

    asyncio.run(fill_results())
    with Client(n.url) as c:
        job = c.submit("echo", {"a": 1}, job_id="full-1")
        with pytest.raises(Unavailable) as e:
            job.result(timeout=60)
    assert e.value.type == "ResultRefused"
    assert "refused to store the job's result" in e.value.message


def _wait_state(job: Any, state: str, timeout: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        info = job.info()
        if info["state"] == state:
            return info
        assert time.monotonic() < end, f"job {job.id} never {state}: {info}"
        time.sleep(0.02)


def test_job_status(client: Client, node: Node) -> None:
    job = client.submit("sleep", 1500, job_id="py-status-1")
    info = _wait_state(job, "running")
    assert info["node"] == node.name and info["attempts"] == 1 and info["function"] == "sleep"
    assert info["seq"] == job.seq and info["submitted"] and info["started"]
    assert job.result(timeout=30) == 1500
    info = _wait_state(job, "done")
    assert info["worker"] and info["finished"] and "error" not in info
    assert job.status() == "done" and job.progress() is None
    assert client.job("py-status-1").status() == "done"

    bad = client.submit("bad", "j")
    info = _wait_state(bad, "failed")
    assert info["error"] == {"code": 400, "type": "BadRequest", "message": "you asked wrong: 'j'"}

    # No node serves this pool: the job is as its submitter left it.
    with Client(node.url, pool="py-status-idle") as idle:
        pending = idle.submit("echo", 1, job_id="a:b")  # not a plain key: encoded
        info = pending.info()
        assert info["state"] == "pending" and info["attempts"] == 0 and info["id"] == "a:b"
        with pytest.raises(NotFound) as e:
            idle.job("never-submitted").status()
        assert e.value.type == "NoStatus"


def test_job_cancel(start_node: StartNode) -> None:
    """A pending job is cancelled before any node takes it; a running async
    job and a running sync one are stopped; result() raises Cancelled."""
    n = start_node(workers=2)
    with Client(n.url, pool="py-cancel-idle") as idle:
        pending = idle.submit("echo", 1)
        assert pending.cancel() is True
        assert pending.status() == "cancelled"
        assert pending.cancel() is False  # ended already
    with Client(n.url) as c:
        for fn in ("nap", "sleep"):
            job = c.submit(fn, 60_000)
            _wait_state(job, "running")
            assert job.cancel() is True
            with pytest.raises(Cancelled) as e:
                job.result(timeout=30)
            assert (e.value.code, e.value.type) == (499, "Cancelled")
            assert job.info()["state"] == "cancelled"
        done = c.submit("echo", 2)
        assert done.result(timeout=30) == 2
        _wait_state(done, "done")
        assert done.cancel() is False
        assert c.call("echo", "after") == "after"


# ----------------------------------------------------------- nodes, events


def test_nodes(client: Client, node: Node) -> None:
    rows = client.nodes()
    assert [r["node"] for r in rows] == [node.name]
    row = rows[0]
    assert row["pool"] == "default" and row["workers"] == 2
    assert isinstance(row["busy"], int) and isinstance(row["handled"], int)
    assert row["containment"] in ("cgroup", "pidns", "group")
    assert node.name in [r["node"] for r in client.nodes("*")]
    assert client.nodes("other-pool") == []


def test_typed_function_and_functions(client: Client, node: Node) -> None:
    assert client.call("resize", {"url": "u"}) == {"url": "u", "width": 256}
    with pytest.raises(BadRequest) as e:
        client.call("resize", {"url": "u", "width": "wide"})
    assert e.value.message == "width: expected `int`, got `str`"
    with pytest.raises(BadRequest) as e:
        client.call("resize", {"width": 1})
    assert e.value.message == "url: missing required field (expected str)"
    fns = {f["name"]: f for f in client.functions()}
    assert {"echo", "reverse", "count", "resize"} <= set(fns)
    resize = fns["resize"]
    assert resize["nodes"] == [node.name] and resize["pool"] == "default"
    assert not resize["raw"] and not resize["stream"]
    assert resize["input_schema"] == {
        "type": "object",
        "properties": {"url": {"type": "string"}, "width": {"type": "integer", "default": 256}},
        "additionalProperties": False,
        "required": ["url"],
    }
    assert resize["output_schema"]["$defs"]["Thumb"]["required"] == ["url", "width"]
    assert fns["echo"]["input_schema"] == {} and fns["count"]["stream"]
    assert fns["reverse"]["raw"] and fns["reverse"]["input_schema"] is None
    assert client.functions("other-pool") == []


def test_events(client: Client, node: Node) -> None:
    events = client.events(timeout=60.0)
    worker, supervised = locate(client.call("whereami"))
    os.kill(worker, signal.SIGKILL)
    seen = []
    for ev in events:
        seen.append(ev["kind"])
        if ev["kind"] == "crashed" and ev.get("pid") == supervised:
            assert ev["node"] == node.name and ev["pool"] == "default"
            break
    else:
        pytest.fail(f"no crashed event for {worker}; saw {seen}")
    events.close()
    assert client.call("echo", 1, timeout=30) == 1
    # With a timeout and nothing happening, the iteration ends by itself.
    assert list(client.events(timeout=0.2, kind="node_stopped")) == []


# ------------------------------------------------------------ a dead node


def test_call_fails_fast_when_its_node_is_killed(start_node: StartNode, tmp_path: Path) -> None:
    """The node holding a call dies (SIGKILL) while NATS lives on (another
    node's embedded server): the call fails in seconds, by the missing
    heartbeats, not at its 120 s deadline."""
    nats_host = start_node(workers=1)
    victim = start_node(workers=1, nats=nats_host.url, extra=("--pool", "victim"))
    started = tmp_path / "started"
    with Client(nats_host.url, pool="victim") as c:
        failed: list[BaseException] = []
        took: list[float] = []

        def call() -> None:
            try:
                c.call("hold", {"started": str(started), "ms": 100_000}, timeout=120)
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                failed.append(exc)
            took.append(time.monotonic() - killed_at[0])

        killed_at = [0.0]
        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), "the call never started"
        killed_at[0] = time.monotonic()
        victim.kill()
        t.join(120)
        assert not t.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], WorkerLost), failed
    assert failed[0].node == victim.name and failed[0].type == "NodeLost"
    print(f"the call failed {took[0]:.2f} s after the node was killed")
    # Seconds, not the deadline: bounded far below the 120 s the call allowed.
    assert took[0] < 60, took
    # The node's guardian kills its workers; stop() waits for that.


# ------------------------------------------------------------ concurrency


def test_thousand_calls_from_eight_threads(client: Client) -> None:
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: client.call("echo", {"i": i}, timeout=60), range(1000)))
    assert got == [{"i": i} for i in range(1000)]


def test_close(node: Node) -> None:
    c = Client(node.url)
    assert c.call("echo", 1) == 1
    c.close()
    c.close()  # twice is fine
    with pytest.raises(Unavailable, match="closed"):
        c.call("echo", 1)
    assert not c._thread.is_alive()


def test_close_wakes_waiting_calls(node: Node) -> None:
    c = Client(node.url)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            c.call("sleep", 1500, timeout=30)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)  # lets the call go out; either way it must end below
    c.close()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Unavailable), errors


def test_heartbeats_off(node: Node) -> None:
    with Client(node.url, heartbeat=None) as c:
        assert c.call("sleep", 50) == 50
        assert list(c.stream("count", {"n": 2})) == [0, 1]


# ----------------------------------------------------------------- imports


def test_workers_and_pyfleet_import_without_nats() -> None:
    """`import pyfleet` (and the worker runtime) must not need nats-py;
    asking for the client without it says what to install."""
    code = (
        "import sys; sys.modules['nats'] = None\n"  # makes `import nats` fail
        "import pyfleet, pyfleet.worker\n"
        "assert pyfleet.BadRequest and pyfleet.RemoteError\n"
        "try:\n"
        "    pyfleet.Client\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PYTHON_DIR, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pyfleet[client]'" in out.stdout
    code = "import sys, pyfleet.worker; print('nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PYTHON_DIR, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_nats_auth_options_pass_through(start_node: StartNode) -> None:
    n = start_node(workers=1, extra=("--nats-user", "pyfleet", "--nats-password", "s3cret-Pw"))
    with Client(n.url, user="pyfleet", password="s3cret-Pw") as c:
        assert c.call("echo", "in") == "in"
    with pytest.raises(Unavailable, match="cannot connect to NATS") as e:
        Client(n.url, user="pyfleet", password="wrong", connect_wait=2)
    assert "wrong" not in str(e.value)


def test_submit_with_priority(client: Client) -> None:
    # Each level is its own subject and consumer (docs/protocol.md,
    # "Priorities"); the order they run in is test/priorityrate_test.go's.
    for p in ("high", "normal", "low"):
        assert client.submit("echo", {"p": p}, priority=p).result(timeout=30) == {"p": p}
    with pytest.raises(ValueError, match="priority 'urgent': want 'high', 'normal' or 'low'"):
        client.submit("echo", 1, priority="urgent")


def test_nodes_detail(client: Client, node: Node) -> None:
    before = client.nodes(detail=True)[0]["detail"]["functions"].get("echo", {}).get("calls", 0)
    assert client.call("echo", {"x": 1}) == {"x": 1}
    (row,) = client.nodes(detail=True, wait=1)
    d = row["detail"]
    assert d["node"] == node.name and d["pool"] == "default" and d["draining"] is False
    assert d["load"]["workers"] == 2 and len(d["workers"]) == 2
    procs = node.processes()
    for w in d["workers"]:
        # The host's pid of the interpreter, not the one its namespace gives it.
        assert w["pid"] in procs and alive(w["pid"])
        assert w["rss_bytes"] > 0 and w["age_s"] > 0 and w["state"] in ("idle", "busy")
        assert w["last_event"]["worker"] == w["name"]
    echo = d["functions"]["echo"]
    assert echo["calls"] == before + 1 and echo["recent"] >= 1
    assert 0 < echo["p50_ms"] <= echo["p99_ms"]
    assert "detail" not in client.nodes()[0]

