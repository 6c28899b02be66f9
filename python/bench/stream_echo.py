"""Calls/s of one worker over one Batches stream (the node's), from a grpc.aio client.

    python bench/stream_echo.py [--function echo] [--inflight 16] [--seconds 5]
                                [--app demo --app-dir examples]

Starts its own worker (the demo app unless --app) on a temporary socket and
stops it after.
The client shares the machine's cores with the worker, so this is a floor
for the worker's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from pyfleet._proto import worker_pb2, worker_pb2_grpc  # noqa: E402

SECRET = "bench"


async def run(
    target: str, function: str, payload: bytes, inflight: int, seconds: float
) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stream = worker_pb2_grpc.WorkerStub(channel).Batches(metadata=(("pyfleet-secret", SECRET),))
        slots = asyncio.Semaphore(inflight)
        done = 0
        stop_at = time.monotonic() + seconds

        async def reader() -> None:
            nonlocal done
            async for batch in stream:
                for result in batch.results:
                    if result.kind == worker_pb2.Result.END:
                        if result.HasField("error"):
                            raise RuntimeError(result.error)
                        done += 1
                        slots.release()

        async def writer() -> None:
            call_id = 0
            while time.monotonic() < stop_at:
                await slots.acquire()
                # As the node sends them: the calls that can go together, in one message.
                calls = []
                while True:
                    call_id += 1
                    calls.append(worker_pb2.Call(id=call_id, function=function, payload=payload))
                    if slots.locked():
                        break
                    await slots.acquire()
                await stream.write(worker_pb2.CallBatch(calls=calls))
            for _ in range(inflight):
                await slots.acquire()

        start = time.monotonic()
        read_task = asyncio.create_task(reader())
        write_task = asyncio.create_task(writer())
        # A failed call ends the reader; it must not leave the writer waiting.
        await asyncio.wait([read_task, write_task], return_when=asyncio.FIRST_COMPLETED)
        elapsed = time.monotonic() - start
        if read_task.done():
            write_task.cancel()
            read_task.result()
        await stream.done_writing()
        read_task.cancel()
        return done, elapsed


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--function", default="echo")
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16, help="the worker's --concurrency")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--app", default="demo", help="the worker's --app")
    parser.add_argument("--app-dir", default=str(HERE / "examples"), help="the worker's --app-dir")
    parser.add_argument(
        "--payload",
        default='{"message":"' + "x" * 82 + '","n":1}',
        help="request body; the default is 100 bytes of JSON for echo",
    )
    args = parser.parse_args()
    payload = args.payload.encode()

    tmp = tempfile.mkdtemp(prefix="pf-bench-", dir="/tmp")
    sock = os.path.join(tmp, "w.sock")
    # The secret on a pipe, as the node passes it.
    secret_end, write_end = os.pipe()
    os.write(write_end, SECRET.encode())
    os.close(write_end)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pyfleet.worker",
            "--app",
            args.app,
            "--app-dir",
            args.app_dir,
            "--socket",
            sock,
            "--worker-id",
            "bench",
            "--concurrency",
            str(args.concurrency),
        ],
        cwd=HERE,
        env={**os.environ, "PYFLEET_WORKER_SECRET_FD": str(secret_end)},
        pass_fds=(secret_end,),
        stdout=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    os.close(secret_end)
    try:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        assert line.startswith("PYFLEET-READY "), line
        cpu_before = cpu_seconds(worker.pid)
        done, elapsed = asyncio.run(
            run("unix:" + sock, args.function, payload, args.inflight, args.seconds)
        )
        cpu = cpu_seconds(worker.pid) - cpu_before
        print(
            f"{args.function}: {done} calls in {elapsed:.2f} s = {done / elapsed:,.0f} calls/s, "
            f"worker CPU {cpu / done * 1e6:.0f} us/call "
            f"({args.inflight} in flight, worker --concurrency {args.concurrency})"
        )
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
