"""The pyfleet worker process: serves an App's functions to one poolnode over gRPC.

Started by poolnode, never by hand:

    python -m pyfleet.worker --app MODULE[:ATTR] --app-dir DIR --socket PATH \\
        --worker-id ID --concurrency N [--stop-grace SECONDS]

Environment: PYFLEET_WORKER_SECRET_FD (required: the read end of a pipe that
holds the secret every RPC must carry, and nothing else; read to EOF and
closed at start, so that neither /proc/<pid>/environ nor any child shows the
secret) and PYFLEET_WORKER_LIFELINE_FD (the read end of a pipe whose write end
only the node holds).

Stdout protocol, one line each:
    PYFLEET-READY {"v":2,"pid":...,"functions":[{"name":...,"raw":...,"stream":...,"inline":...,
                   "input_schema":{...},"output_schema":{...}}]}   (schemas: pyfleet/typed.py)
    PYFLEET-ERROR {"type":...,"message":...}   (the app failed to import; exit 3)
Every other stdout and stderr line is the app's, and the node logs it.

This module wires the others: process (plumbing), servicer (the gRPC
server), stream, threads, calls and codec (running the calls).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys

# gRPC's fork handlers cannot pause its poller thread ("Other threads are
# currently calling into gRPC, skipping fork() handlers") and only log noise
# when a function forks; forked children never use the worker's gRPC. Set
# before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from . import process  # noqa: E402
from .app import App  # noqa: E402
from .servicer import Server  # noqa: E402
from .threads import CallThreads  # noqa: E402

EXIT_USAGE = 2
EXIT_IMPORT = 3

# How long in-flight calls may finish after SIGTERM, unless --stop-grace
# says otherwise. The node kills the worker after its own grace anyway, so
# this only bounds a worker whose node stopped watching.
STOP_GRACE_S = 30.0


async def serve(app: App, args: argparse.Namespace, secret: str, at_line_start: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = process.stop_on_signals(loop)
    calls = CallThreads(loop, args.concurrency)
    server = Server(app, secret, calls, args.concurrency)
    await server.start(args.socket)
    process.announce_ready(app, args.concurrency, at_line_start)
    await stop.wait()
    await server.stop(args.stop_grace)
    calls.shutdown()
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyfleet.worker", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--app", required=True, help="MODULE[:ATTR], ATTR defaults to app")
    parser.add_argument("--app-dir", default=".", help="put first on sys.path")
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on")
    parser.add_argument("--worker-id", default="", help="the node's name for this worker")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight at once")
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=STOP_GRACE_S,
        metavar="SECONDS",
        help="how long calls may finish after SIGTERM",
    )
    return parser


# Built at import: a preloaded template builds it once, and its forked
# workers only parse. Building one looks up gettext translations on disk
# for every message, and cost a forked worker 3-6 ms of its ~20 ms of CPU
# to be ready (test/bench/notes.md).
_PARSER = _build_parser()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = _PARSER.parse_args(argv)
    if args.concurrency < 1:
        _PARSER.error("--concurrency must be at least 1")
    if args.stop_grace < 0:
        _PARSER.error("--stop-grace must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        secret = process.take_secret()
        # The node logs stdout line by line: the app's prints must not wait in a buffer.
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        process.arm_lifeline()
    except process.UsageError as exc:
        print(f"pyfleet worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    process.die_with_parent_after_fork()
    try:
        app, at_line_start = process.import_app(args.app, args.app_dir)
    except process.AppImportFailed:
        return EXIT_IMPORT
    code = asyncio.run(serve(app, args, secret, at_line_start))
    process.exit_if_threads_stuck(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
