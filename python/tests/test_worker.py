"""Real worker processes, driven over their Unix socket like a poolnode would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import APPS, EXAMPLES, SECRET, Conn, Result, Worker, alive, error, value, wait_gone
from pyfleet._proto import worker_pb2, worker_pb2_grpc

StartWorker = Callable[..., Worker]
Connect = Callable[..., Conn]


# ---------------------------------------------------------------- the demo app


def test_handshake(demo: Worker) -> None:
    hs = demo.ready()
    assert hs["v"] == 2 and hs["pid"] == demo.proc.pid
    functions = {f["name"]: (f["raw"], f["stream"]) for f in hs["functions"]}
    assert functions == {
        "echo": (False, False),
        "sleep": (False, False),
        "fail": (False, False),
        "count": (False, True),
        "cpu": (False, False),
        "spawn": (False, False),
        "sum": (False, False),
        "scale": (False, False),
        "reverse": (True, False),
        "slow_async": (False, False),
    }
    # Each function's schemas (pyfleet/typed.py), none for raw bytes.
    by_name = {f["name"]: f for f in hs["functions"]}
    assert by_name["scale"]["input_schema"] == {
        "type": "object",
        "properties": {
            "values": {"type": "array", "items": {"type": "number"}},
            "factor": {"type": "number", "default": 2.0},
        },
        "additionalProperties": False,
        "required": ["values"],
    }
    assert by_name["scale"]["output_schema"] == {"type": "array", "items": {"type": "number"}}
    assert by_name["echo"]["input_schema"] == {} and by_name["count"]["output_schema"] == {"type": "integer"}
    assert "input_schema" not in by_name["reverse"] and "output_schema" not in by_name["reverse"]
    # The handshake is one compact line.
    assert demo.handshake_line() == "PYFLEET-READY " + json.dumps(hs, separators=(",", ":"))


def test_echo(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    frame = conn.call("echo", '{"a": [1, 2.5, "é", null]}'.encode())
    assert frame.kind == Result.END
    # Compact JSON, UTF-8 not escaped.
    assert frame.payload == '{"a":[1,2.5,"é",null]}'.encode()


def test_typed_function(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    assert conn.call("scale", b'{"values":[1,2.5]}').payload == b"[2.0,5.0]"
    frame = conn.call("scale", b'{"values":"x"}')
    assert frame.error.code == 400 and frame.error.type == "BadRequest"
    assert frame.error.message == "values: expected `array`, got `str`"
    frame = conn.call("scale", b'{"values":[1],"factr":3}')
    assert frame.error.code == 400 and frame.error.message == "factr: unknown field"


def test_empty_payload_is_null(demo: Worker, connect: Connect) -> None:
    assert connect(demo).call("echo", b"").payload == b"null"


def test_malformed_json(demo: Worker, connect: Connect) -> None:
    code, typ, message = error(connect(demo).call("echo", b"{nope"))
    assert (code, typ) == (400, "BadRequest")
    assert message.startswith("malformed JSON: ")
    code, typ, message = error(connect(demo).call("echo", b"\xff\xfe\xfa"))
    assert (code, typ) == (400, "BadRequest")


def test_unknown_function(demo: Worker, connect: Connect) -> None:
    code, typ, message = error(connect(demo).call("nope", b"1"))
    assert (code, typ) == (404, "NotFound")
    assert "'nope'" in message


def test_exception_is_500_and_traceback_goes_to_stderr(demo: Worker, connect: Connect) -> None:
    frame = connect(demo).call("fail")
    assert error(frame) == (500, "RuntimeError", "this function always fails")
    assert b"Traceback" not in frame.SerializeToString()
    deadline = time.monotonic() + 5
    while "Traceback" not in demo.stderr() and time.monotonic() < deadline:
        time.sleep(0.02)
    log = demo.stderr()
    assert "pyfleet: fail raised" in log and "Traceback" in log and "always fails" in log


def test_bad_request_from_function(demo: Worker, connect: Connect) -> None:
    code, typ, _ = error(connect(demo).call("sleep", {"ms": "soon"}))
    assert (code, typ) == (400, "BadRequest")


def test_generator_streams_in_order(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    frames = conn.frames(conn.send("count", {"n": 50}))
    assert [f.kind for f in frames] == [Result.CHUNK] * 50 + [Result.END]
    assert [json.loads(f.payload) for f in frames[:-1]] == list(range(50))
    assert not frames[-1].HasField("error") and frames[-1].payload == b""


def test_async_function(demo: Worker, connect: Connect) -> None:
    assert value(connect(demo).call("sum", [1, 2, 3.5])) == 6.5


def test_raw_function(demo: Worker, connect: Connect) -> None:
    assert connect(demo).call("reverse", b"\x00abc\xff").payload == b"\xffcba\x00"


def test_async_deadline(demo: Worker, connect: Connect) -> None:
    start = time.monotonic()
    frame = connect(demo).call("slow_async", {"ms": 10_000}, timeout_ms=100)
    assert time.monotonic() - start < 2
    code, typ, message = error(frame)
    assert (code, typ) == (408, "DeadlineExceeded")
    assert "100 ms" in message


def test_async_deadlines_each_their_own(demo: Worker, connect: Connect) -> None:
    """One timer serves every async call's deadline: a call sent later with
    an earlier deadline is cut at its own, a call that ends first is left
    alone, and one with a later deadline is cut at that one."""
    conn = connect(demo)
    start = time.monotonic()
    late = conn.send("slow_async", {"ms": 10_000}, timeout_ms=1500)
    early = conn.send("slow_async", {"ms": 10_000}, timeout_ms=200)
    quick = conn.send("slow_async", {"ms": 10}, timeout_ms=100_000)
    none = conn.send("slow_async", {"ms": 400})
    assert error(conn.frames(early)[-1])[:2] == (408, "DeadlineExceeded")
    assert not conn.ended(late), "the earlier deadline waited for the later one"
    ends = conn.ends([late, quick, none])
    assert error(ends[late][-1])[:2] == (408, "DeadlineExceeded")
    assert time.monotonic() - start >= 1.5
    assert value(ends[quick][-1]) == {"slept_ms": 10}
    assert value(ends[none][-1]) == {"slept_ms": 400}
    # Past every deadline, the stream still serves and still cuts.
    assert error(conn.call("slow_async", {"ms": 10_000}, timeout_ms=100))[:2] == (408, "DeadlineExceeded")


def test_deadline_not_reached(demo: Worker, connect: Connect) -> None:
    assert value(connect(demo).call("slow_async", {"ms": 10}, timeout_ms=5000)) == {"slept_ms": 10}


def test_cancel(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    call_id = conn.send("slow_async", {"ms": 10_000})
    time.sleep(0.1)
    conn.cancel(call_id)
    frames = conn.frames(call_id)
    assert len(frames) == 1 and error(frames[0])[:2] == (499, "Cancelled")
    # Cancelling again, or cancelling calls that are gone or unknown, sends nothing.
    conn.cancel(call_id)
    conn.cancel(999)
    assert value(conn.call("echo", 1)) == 1
    assert len(conn.frames(call_id)) == 1


def test_cancel_does_not_stop_sync_calls(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    call_id = conn.send("sleep", 200)
    conn.cancel(call_id)
    frames = conn.frames(call_id)
    assert len(frames) == 1 and value(frames[0]) == {"slept_ms": 200}


def test_sync_calls_run_concurrently(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    start = time.monotonic()
    ids = [conn.send("sleep", 400) for _ in range(4)]  # the demo worker has --concurrency 4
    for call_id in ids:
        assert value(conn.frames(call_id)[0]) == {"slept_ms": 400}
    assert time.monotonic() - start < 1.2


def test_loop_answers_while_threads_are_busy(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    busy = [conn.send("cpu", {"ms": 800}), conn.send("sleep", 800)]
    time.sleep(0.1)
    start = time.monotonic()
    assert value(conn.call("sum", [1, 1])) == 2
    assert time.monotonic() - start < 0.5
    for call_id in busy:
        conn.frames(call_id)


def test_many_calls_interleave(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    sent = {conn.send("echo", {"i": i}): i for i in range(300)}
    sent.update({conn.send("sum", [i, 1]): i + 1 for i in range(300)})
    for call_id, want in sent.items():
        frames = conn.frames(call_id)
        assert len(frames) == 1
        got = value(frames[0])
        assert got == (want if isinstance(got, int) else {"i": want})


def test_stream_opens_with_an_empty_batch(demo: Worker, connect: Connect) -> None:
    # The node's dial waits for this first message before it calls the
    # worker ready (pool/worker.go, awaitGreeting); nothing is sent first.
    conn = connect(demo)
    conn.wait_greeted()
    assert conn.acks == 0


def test_silent_message_is_acked_with_an_empty_batch(demo: Worker, connect: Connect) -> None:
    # The node holds frames back while the worker is busy with its last
    # message (pool/worker.go); the empty batch tells it to stop waiting.
    conn = connect(demo)
    call_id = conn.send("sleep", 300)
    conn.wait_acked()
    assert not conn.ended(call_id)  # the ack came before the END
    assert value(conn.frames(call_id)[0]) == {"slept_ms": 300}


def test_several_calls_in_one_message(demo: Worker, connect: Connect) -> None:
    conn = connect(demo)
    calls = [
        worker_pb2.Call(id=conn.next_id(), function=f, payload=p)
        for f, p in [("echo", b"1"), ("sum", b"[1,2]"), ("count", b"2"), ("nope", b"")]
    ]
    conn.send_batch(calls)
    got = conn.ends([c.id for c in calls])
    assert [[f.payload for f in got[c.id]] for c in calls[:3]] == [
        [b"1"],
        [b"3"],
        [b"0", b"1", b""],
    ]
    assert error(got[calls[3].id][0])[:2] == (404, "NotFound")


def test_serve_is_not_served(demo: Worker) -> None:
    # Only what the node uses (Batches, health) and the benchmark's Unary.
    with grpc.insecure_channel(demo.target) as channel:
        serve = channel.stream_stream("/pyfleet.worker.v1.Worker/Serve")
        with pytest.raises(grpc.RpcError) as info:
            list(serve(iter(()), metadata=(("pyfleet-secret", SECRET),), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("function", "payload", "timeout_ms", "want"),
    [
        ("echo", b'{"a":1}', 0, b'{"a":1}'),
        ("sum", b"[1,2]", 0, b"3"),
        ("reverse", b"ab", 0, b"ba"),
        ("slow_async", b'{"ms":10000}', 100, (408, "DeadlineExceeded")),
        ("count", b"3", 0, (400, "BadRequest")),
        ("nope", b"", 0, (404, "NotFound")),
        ("fail", b"", 0, (500, "RuntimeError")),
    ],
)
def test_unary_for_the_benchmark(
    demo: Worker, function: str, payload: bytes, timeout_ms: int, want: Any
) -> None:
    # The benchmark's direct ceiling (test/bench/load.go) calls Unary.
    with grpc.insecure_channel(demo.target) as channel:
        frame = worker_pb2_grpc.WorkerStub(channel).Unary(
            worker_pb2.Call(id=7, function=function, payload=payload, timeout_ms=timeout_ms),
            metadata=(("pyfleet-secret", SECRET),),
            timeout=10,
        )
    assert frame.id == 7 and frame.kind == Result.END
    if isinstance(want, bytes):
        assert frame.payload == want, frame
    else:
        assert error(frame)[:2] == want


# ---------------------------------------------------------------- awkward apps


def test_garbage_at_import_still_gives_a_handshake_line(odd: Worker) -> None:
    hs = odd.ready()
    assert "bad_request" in [f["name"] for f in hs["functions"]]
    assert odd.stdout[0] == "garbage at import {not json"
    assert odd.stdout[1] == "unfinished line"
    assert odd.stdout[2].startswith("PYFLEET-READY {")


def test_bad_request(odd: Worker, connect: Connect) -> None:
    assert error(connect(odd).call("bad_request")) == (400, "BadRequest", "you asked wrong")


@pytest.mark.parametrize("function", ["not_json", "nan"])
def test_result_not_json(odd: Worker, connect: Connect, function: str) -> None:
    code, typ, message = error(connect(odd).call(function))
    assert (code, typ) == (500, "TypeError")
    assert "not JSON-serialisable" in message


def test_raw_must_return_bytes(odd: Worker, connect: Connect) -> None:
    conn = connect(odd)
    code, typ, message = error(conn.call("raw_str", b"x"))
    assert (code, typ) == (500, "TypeError") and "must be bytes" in message
    assert conn.call("raw_view", b"ok").payload == b"ok!"


def test_async_generator(odd: Worker, connect: Connect) -> None:
    conn = connect(odd)
    frames = conn.frames(conn.send("agen", {"n": 20}))
    assert [json.loads(f.payload) for f in frames[:-1]] == [{"i": i} for i in range(20)]
    assert frames[-1].kind == Result.END and not frames[-1].HasField("error")


def test_generator_that_raises(odd: Worker, connect: Connect) -> None:
    conn = connect(odd)
    frames = conn.frames(conn.send("gen_fails"))
    assert [f.payload for f in frames[:-1]] == [b"1", b"2"]
    assert error(frames[-1]) == (500, "ValueError", "broke after two")


def test_raw_generator(odd: Worker, connect: Connect) -> None:
    conn = connect(odd)
    frames = conn.frames(conn.send("raw_gen", b"abc"))
    assert [f.payload for f in frames] == [b"a", b"b", b"c", b""]


def test_long_stream_is_not_lost(odd: Worker, connect: Connect) -> None:
    # More chunks than the worker queues at once: the generator must wait, not drop.
    conn = connect(odd)
    frames = conn.frames(conn.send("big_count", {"n": 5000}), timeout=60)
    assert len(frames) == 5001
    assert [int(f.payload) for f in frames[:-1]] == list(range(5000))


def test_cancelled_function_that_raises_still_ends_once(odd: Worker, connect: Connect) -> None:
    conn = connect(odd)
    call_id = conn.send("ignore_cancel_then_fail")
    time.sleep(0.1)
    conn.cancel(call_id)
    frames = conn.frames(call_id)
    assert len(frames) == 1 and error(frames[0])[:2] == (500, "KeyError")


def test_sys_exit_in_a_function_is_a_500(odd: Worker, connect: Connect) -> None:
    conn = connect(odd)
    assert error(conn.call("exits"))[:2] == (500, "SystemExit")
    assert odd.proc.poll() is None
    assert value(conn.call("env")) is not None


def test_secret_is_not_inherited_but_markers_are(odd: Worker, connect: Connect) -> None:
    env = value(connect(odd).call("env"))
    assert "PYFLEET_WORKER_SECRET_FD" not in env
    assert env["PYFLEET_WORKER_RUN"] == "test-run"


def _secret_pipe_fds(pid: int, inode: int) -> list[str]:
    """The fds of pid that are the secret's pipe."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # an fd closed while listing
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"pipe:[{inode}]":
                fds.append(fd)
    return fds


def test_secret_is_not_readable_from_proc(start_worker: StartWorker, connect: Connect) -> None:
    """The secret is in neither the worker's environment (as the kernel shows
    it: /proc/<pid>/environ is the environment at exec, whatever os.environ
    says later) nor a child's, and the pipe it came on is closed: a child the
    app starts cannot read it. The markers are there, for the reaper."""
    worker = start_worker()
    worker.ready()
    conn = connect(worker)
    child = value(conn.call("spawn", {"seconds": 60}))["pid"]
    assert worker.secret_pipe is not None
    for pid in (worker.proc.pid, child):
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
        assert SECRET.encode() not in environ
        assert b"PYFLEET_WORKER_RUN=test-run\0" in environ
        assert _secret_pipe_fds(pid, worker.secret_pipe) == []
    assert value(conn.call("echo", {"still": "served"})) == {"still": "served"}


# ---------------------------------------------------------------- security and health


@pytest.mark.parametrize("secret", ["wrong", None])
def test_wrong_secret(demo: Worker, connect: Connect, secret: str | None) -> None:
    conn = connect(demo, secret=secret)
    conn.send("echo", 1)
    conn.wait_closed()
    assert conn.error is not None and conn.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert conn.error.details() == "bad or missing pyfleet-secret"
    with grpc.insecure_channel(demo.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        metadata = (("pyfleet-secret", secret),) if secret else ()
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health(demo: Worker) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pyfleet.worker.v1.Worker"):
            reply = health.Check(
                health_pb2.HealthCheckRequest(service=service),
                metadata=(("pyfleet-secret", SECRET),),
                timeout=5,
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_socket_is_private(demo: Worker) -> None:
    assert stat.S_IMODE(os.stat(demo.socket).st_mode) == 0o600


# ---------------------------------------------------------------- stopping


def test_sigterm_when_idle_exits_0(start_worker: StartWorker) -> None:
    worker = start_worker()
    worker.ready()
    start = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert time.monotonic() - start < 5


def test_sigterm_lets_calls_finish_and_refuses_new_ones(
    start_worker: StartWorker, connect: Connect
) -> None:
    worker = start_worker()
    worker.ready()
    conn = connect(worker)
    slow = conn.send("sleep", 700)
    slow_async = conn.send("slow_async", {"ms": 700})
    time.sleep(0.2)
    worker.proc.send_signal(signal.SIGTERM)
    # An echo answered before the worker handled the signal is fine; once
    # it has, new calls are refused while the slow ones run on.
    deadline = time.monotonic() + 5
    while True:
        frame = conn.call("echo", 1)
        if frame.HasField("error") or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    code, typ, _ = error(frame)
    assert (code, typ) == (503, "Unavailable")
    assert value(conn.frames(slow)[0]) == {"slept_ms": 700}
    assert value(conn.frames(slow_async)[0]) == {"slept_ms": 700}
    conn.wait_closed()
    assert conn.error is None  # the worker ended the stream cleanly
    assert worker.wait() == 0


def test_half_close_finishes_calls_then_ends_stream(
    start_worker: StartWorker, connect: Connect
) -> None:
    worker = start_worker()
    worker.ready()
    conn = connect(worker)
    call_id = conn.send("slow_async", {"ms": 300})
    conn.half_close()
    assert value(conn.frames(call_id)[0]) == {"slept_ms": 300}
    conn.wait_closed()
    assert conn.error is None
    assert worker.proc.poll() is None  # the worker still serves other streams
    assert value(connect(worker).call("echo", 2)) == 2


def test_stream_close_cancels_async_calls(start_worker: StartWorker, connect: Connect) -> None:
    worker = start_worker("oddities", APPS)
    worker.ready()
    marker = os.path.join(worker.dir, "cancelled")
    conn = connect(worker)
    conn.send("mark_when_cancelled", {"path": marker})
    time.sleep(0.2)
    conn.channel.close()  # the node went away
    deadline = time.monotonic() + 5
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.path.exists(marker)


def test_lifeline_takes_the_worker_and_its_children(
    start_worker: StartWorker, connect: Connect
) -> None:
    worker = start_worker()
    worker.ready()
    child = value(connect(worker).call("spawn", {"seconds": 600}))["pid"]
    assert alive(child)
    worker.close_lifeline()  # the node died
    assert worker.wait(5) == -signal.SIGKILL
    assert wait_gone(child), f"child {child} survived the worker"


def test_forked_children_die_with_the_worker(start_worker: StartWorker, connect: Connect) -> None:
    worker = start_worker("oddities", APPS)
    worker.ready()
    child = value(connect(worker).call("fork_child", {"seconds": 600}))["pid"]
    assert alive(child)
    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker alone, not its group
    assert worker.wait(5) == -signal.SIGKILL
    assert wait_gone(child), f"forked child {child} survived the worker"


def test_sigterm_to_a_forked_child_does_not_stop_the_worker(
    start_worker: StartWorker, connect: Connect
) -> None:
    """A forked child shares the worker's event-loop wakeup socket; a SIGTERM
    it gets (multiprocessing's Pool.terminate sends one to each pool process)
    must end the child only, not reach the worker's stop handler."""
    worker = start_worker("oddities", APPS, concurrency=1)
    worker.ready()
    conn = connect(worker)
    child = value(conn.call("fork_child", {"seconds": 600}))["pid"]
    os.kill(child, signal.SIGTERM)
    assert wait_gone(child), f"forked child {child} ignored SIGTERM"
    time.sleep(0.3)  # a stop the signal caused would have begun by now
    assert worker.proc.poll() is None, "the worker stopped when its child got SIGTERM"
    assert value(conn.call("env", {})) is not None


def test_calls_still_running_after_the_grace_do_not_hold_the_exit(
    start_worker: StartWorker, connect: Connect
) -> None:
    worker = start_worker(args=("--stop-grace", "0.5"))
    worker.ready()
    conn = connect(worker)
    conn.send("sleep", 60_000)
    conn.send("slow_async", {"ms": 60_000})
    time.sleep(0.2)
    start = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert time.monotonic() - start < 5


def test_second_signal_stops_at_once(start_worker: StartWorker, connect: Connect) -> None:
    worker = start_worker()
    worker.ready()
    connect(worker).send("sleep", 60_000)
    time.sleep(0.2)
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.proc.send_signal(signal.SIGINT)
    assert worker.wait(5) == 0


def test_lifeline_that_is_not_a_pipe_is_refused(start_worker: StartWorker) -> None:
    worker = start_worker(lifeline=False, env={"PYFLEET_WORKER_LIFELINE_FD": "0"})
    assert worker.wait() == 2
    assert "not a pipe" in worker.stderr()


def test_missing_secret_is_refused(start_worker: StartWorker) -> None:
    worker = start_worker(secret="")
    assert worker.wait() == 2
    assert "PYFLEET_WORKER_SECRET_FD is not set" in worker.stderr()


@pytest.mark.parametrize(
    ("fd", "message"),
    [
        ("1", "not a pipe of its own"),
        ("x", "invalid literal"),
        ("987", "Bad file descriptor"),
    ],
)
def test_bad_secret_fd_is_refused(start_worker: StartWorker, fd: str, message: str) -> None:
    worker = start_worker(secret="", env={"PYFLEET_WORKER_SECRET_FD": fd})
    assert worker.wait() == 2
    assert f"bad PYFLEET_WORKER_SECRET_FD='{fd}'" in worker.stderr()
    assert message in worker.stderr()


def test_empty_secret_pipe_is_refused(start_worker: StartWorker) -> None:
    worker = start_worker(secret=" \n")
    assert worker.wait() == 2
    assert "the pipe held no secret" in worker.stderr()


# ---------------------------------------------------------------- import failures


@pytest.mark.parametrize(
    ("app", "app_dir", "typ", "message"),
    [
        ("nope", EXAMPLES, "ModuleNotFoundError", "No module named 'nope'"),
        ("broken_syntax", APPS, "SyntaxError", "invalid syntax"),
        ("raises_at_import", APPS, "RuntimeError", "config missing"),
        ("not_an_app", APPS, "TypeError", "not_an_app:app is a int, not a pyfleet.App"),
        ("demo:nope", EXAMPLES, "AttributeError", "module 'demo' has no attribute 'nope'"),
    ],
)
def test_import_failure(
    start_worker: StartWorker, app: str, app_dir: Any, typ: str, message: str
) -> None:
    worker = start_worker(app, app_dir)
    assert worker.wait() == 3
    line = worker.handshake_line()
    assert line.startswith("PYFLEET-ERROR ")
    err = json.loads(line.removeprefix("PYFLEET-ERROR "))
    assert err["type"] == typ and message in err["message"]
    assert [out for out in worker.stdout if out.startswith("PYFLEET-")] == [line]
    assert "Traceback" in worker.stderr()
