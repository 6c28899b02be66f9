"""The per-call cost of pyfleet.Context against a plain ``payload``
function, in two ways (docs/benchmarks.md, "The call context").

    python bench/context_cost.py [--seconds 5]

1. In process: ``calls.call_sync`` of one call frame, a plain function
   against one taking a context (a Context built per call, as the stream
   builds it, with a sink that drops frames). Best of 5 runs of timeit.
2. Through a worker: bench/stream_echo.py against tests/apps/ctx_app.py,
   ``plain`` against ``ctx_echo`` (a context it does not use) and
   ``ctx_progress`` (one ctx.progress per call), at worker --concurrency 1
   (a plain function runs inline on the loop there, a context function on
   a call thread) and 4.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from pyfleet import App, Context  # noqa: E402
from pyfleet._proto import worker_pb2  # noqa: E402
from pyfleet.calls import call_sync  # noqa: E402

PAYLOAD = ('{"message":"' + "x" * 82 + '","n":1}').encode()


def in_process() -> None:
    app = App()

    @app.function
    def plain(payload):  # type: ignore[no-untyped-def]
        return payload

    @app.function
    def with_ctx(payload, ctx: Context):  # type: ignore[no-untyped-def]
        return payload

    @app.function
    def with_progress(payload, ctx: Context):  # type: ignore[no-untyped-def]
        ctx.progress(1)
        return payload

    frames: list[object] = []

    def sink(kind: str, payload: bytes, level: str) -> None:
        frames.append(payload)

    def schedule(delay: float, cb: object) -> None:
        pass  # the held value is never released here: only its hold is timed

    call = worker_pb2.Call(id=1, function="plain", payload=PAYLOAD, timeout_ms=60_000, request_id="r")
    specs = app.functions
    cases = {
        "plain": lambda: call_sync(call, specs["plain"]),
        "context": lambda: call_sync(call, specs["with_ctx"], Context(call, sink, schedule)),
        "context + progress": lambda: call_sync(call, specs["with_progress"], Context(call, sink, schedule)),
    }
    n = 100_000
    base = None
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
        base = base or best
        print(f"in process, {name:<20} {best:6.2f} us/call  (+{best - base:5.2f})")


def through_worker(seconds: float) -> None:
    app_dir = HERE / "tests" / "apps"
    for concurrency in (1, 4):
        for function in ("plain", "ctx_echo", "ctx_progress"):
            out = subprocess.run(
                [sys.executable, str(HERE / "bench" / "stream_echo.py"), "--app", "ctx_app",
                 "--app-dir", str(app_dir), "--function", function, "--concurrency", str(concurrency),
                 "--inflight", "16", "--seconds", str(seconds)],
                cwd=HERE, capture_output=True, text=True, check=True,
            )  # fmt: skip
            print("worker, " + out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    in_process()
    through_worker(args.seconds)


if __name__ == "__main__":
    main()
