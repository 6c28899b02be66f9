"""Hostile frames on the Batches stream, the one the node uses: whatever a
frame carries, the worker answers each call with one well-formed END frame
(a value, or a 4xx/5xx error) and the stream goes on serving.

The node refuses most of these before a worker sees them (bus/validate.go);
the worker must survive them anyway. A payload it cannot decode is a 400,
never a 500 with a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import APPS, Conn, Result, Worker, error, value
from pyfleet._proto import worker_pb2

# The app's functions, one of each kind; any other name is a 404.
FUNCTIONS = ["echo", "aecho", "gecho", "agecho", "recho"]
RAW = {"recho"}
STREAMING = {"gecho", "agecho"}


@pytest.fixture(scope="module", params=[1, 4], ids=["concurrency1", "concurrency4"])
def mirror(request: pytest.FixtureRequest) -> Iterator[tuple[Worker, Conn]]:
    # Concurrency 1 runs sync functions on the event loop itself, where a
    # RecursionError would hit the worker's own stack; 4 runs them on threads.
    worker = Worker("mirror", APPS, concurrency=request.param)
    conn = None
    try:
        worker.ready()
        conn = Conn(worker.target)
        yield worker, conn
    finally:
        if conn is not None:
            conn.close()
        worker.kill()


def python_reads(payload: bytes) -> tuple[bool, Any]:
    """Whether the worker's decoder takes payload, and the value."""
    if not payload:
        return True, None
    try:
        return True, json.loads(payload.decode(), parse_constant=lambda c: 1 / 0)
    except (ValueError, RecursionError, ZeroDivisionError):
        return False, None


def encodable(v: Any) -> bool:
    try:
        json.dumps(v, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, TypeError):  # inf, and lone surrogates (UnicodeEncodeError)
        return False
    return True


def depth(payload: bytes) -> int:
    """How deeply payload nests, counting brackets outside strings well
    enough for the payloads of this file."""
    deepest = level = 0
    for b in payload:
        if b in b"[{":
            level += 1
            deepest = max(deepest, level)
        elif b in b"]}":
            level -= 1
    return deepest


def check_end(function: str, payload: bytes, frames: list[Result]) -> None:
    """Holds one call's frames to the promise: one END, well formed."""
    *chunks, end = frames
    assert end.kind == Result.END
    assert all(c.kind == Result.CHUNK for c in chunks)
    if function not in FUNCTIONS:
        assert error(end)[:2] == (404, "NotFound")
        return
    if function in RAW:
        assert value_bytes(end) == payload
        return
    ok, decoded = python_reads(payload)
    if depth(payload) > 900:
        # Near Python's recursion limit: whether decoding (here, and in the
        # worker, whose stack is deeper) or encoding back fails depends on
        # the stack, but the answer is a clean one either way.
        if end.HasField("error"):
            assert error(end)[:2] in ((400, "BadRequest"), (500, "TypeError")), end.error
        return
    if not ok:
        code, typ, message = error(end)
        assert (code, typ) == (400, "BadRequest"), message
        assert message.startswith(("malformed JSON: ", "JSON not accepted: ")), message
        assert not chunks
        return
    if end.HasField("error"):
        code, typ, message = error(end)
        # Only a value that cannot be encoded back fails after decoding:
        # the function's result, not the caller's payload (inf, a lone
        # surrogate; the node refuses both in the request).
        assert (code, typ) == (500, "TypeError") and not encodable(decoded), (code, typ, message)
        return
    got = [json.loads(c.payload) for c in chunks] if function in STREAMING else [value(end)]
    assert len(got) == 1
    assert json.dumps(got[0]) == json.dumps(decoded)


def value_bytes(frame: Result) -> bytes:
    assert not frame.HasField("error"), frame.error
    return frame.payload


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)

hostile_payloads = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4000, 6000).map(lambda n: b"7" * n),
    st.sampled_from(
        [
            b"1e999999",
            b"-1e400",
            b"NaN",
            b"[Infinity]",
            b'"\\ud800"',
            b'"\xff\xfe"',
            b"\xef\xbb\xbf{}",
            b"\x00",
            b"{",
        ]
    ),
    st.text(max_size=64).map(str.encode),
)

frames = st.builds(
    dict,
    function=st.one_of(st.sampled_from(FUNCTIONS), st.text(max_size=32)),
    payload=hostile_payloads,
    request_id=st.text(max_size=300),
    session=st.text(max_size=300),
    timeout_ms=st.one_of(st.just(0), st.integers(10_000, 2**32 - 1)),
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batch=st.lists(frames, min_size=1, max_size=5),
    cancels=st.lists(st.integers(0, 2**64 - 1), max_size=2),
)
def test_any_frame_gets_one_well_formed_end(
    mirror: tuple[Worker, Conn], batch: list[dict[str, Any]], cancels: list[int]
) -> None:
    worker, conn = mirror
    calls = [worker_pb2.Call(id=conn.next_id(), **f) for f in batch]
    # Cancels for ids nobody sent: ignored.
    calls += [worker_pb2.Call(id=c, cancel=True) for c in cancels if c > 1 << 40]
    conn.send_batch(calls)
    got = conn.ends([c.id for c in calls if not c.cancel])
    for f, call in zip(batch, calls, strict=False):
        check_end(f["function"], f["payload"], got[call.id])
    assert worker.proc.poll() is None, worker.stderr()


@pytest.mark.parametrize("function", ["echo", "aecho", "gecho", "agecho"])
@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"1" * 4301,  # ValueError: int_max_str_digits
        b"NaN",
        b"[-Infinity]",
        b"\xff\xfe",
    ],
    ids=["deep-array", "deep-object", "huge-int", "nan", "infinity", "not-utf8"],
)
def test_undecodable_payload_is_400(
    mirror: tuple[Worker, Conn], function: str, payload: bytes
) -> None:
    worker, conn = mirror
    logged = len(worker.stderr())
    call_id = conn.next_id()
    conn.send_batch([worker_pb2.Call(id=call_id, function=function, payload=payload)])
    (frame,) = conn.ends([call_id])[call_id]
    code, typ, message = error(frame)
    assert (code, typ) == (400, "BadRequest"), message
    assert len(message) < 500
    assert "Traceback" not in worker.stderr()[logged:]
    # The stream still serves.
    call_id = conn.next_id()
    conn.send_batch([worker_pb2.Call(id=call_id, function="echo", payload=b'{"still":"here"}')])
    assert value(conn.ends([call_id])[call_id][-1]) == {"still": "here"}
