"""Helpers that start real worker processes and talk to them over gRPC.

Every process a test starts is killed (with its whole process group) and
reaped by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pyfleet._proto import worker_pb2, worker_pb2_grpc

PYTHON_DIR = Path(__file__).resolve().parent.parent
EXAMPLES = PYTHON_DIR / "examples"
APPS = Path(__file__).resolve().parent / "apps"
SECRET = "test-secret-0123456789"

Result = worker_pb2.Result


class Worker:
    """One `python -m pyfleet.worker` process, leader of its own process group."""

    def __init__(
        self,
        app: str = "demo",
        app_dir: Path = EXAMPLES,
        concurrency: int = 4,
        secret: str = SECRET,
        lifeline: bool = True,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        # Unix socket paths are limited to 107 bytes: keep the directory short.
        self.dir = tempfile.mkdtemp(prefix="pf-", dir="/tmp")
        self.socket = os.path.join(self.dir, "w.sock")
        self.target = "unix:" + self.socket
        self.stdout: list[str] = []
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.lifeline: int | None = None
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYFLEET_")}
        environ["PYFLEET_WORKER_RUN"] = "test-run"  # a marker the worker must keep
        pass_fds: tuple[int, ...] = ()
        # As the node does: the secret on a pipe whose write end is closed
        # before the start; "" passes none.
        self.secret_pipe: int | None = None  # its inode, to look for it in /proc
        secret_end = None
        if secret:
            secret_end, write_end = os.pipe()
            os.write(write_end, secret.encode())
            os.close(write_end)
            self.secret_pipe = os.fstat(secret_end).st_ino
            environ["PYFLEET_WORKER_SECRET_FD"] = str(secret_end)
            pass_fds += (secret_end,)
        read_end = None
        if lifeline:
            read_end, self.lifeline = os.pipe()
            environ["PYFLEET_WORKER_LIFELINE_FD"] = str(read_end)
            pass_fds += (read_end,)
        environ.update(env or {})
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyfleet.worker",
                    "--app",
                    app,
                    "--app-dir",
                    str(app_dir),
                    "--socket",
                    self.socket,
                    "--worker-id",
                    "w1",
                    "--concurrency",
                    str(concurrency),
                    *args,
                ],
                cwd=PYTHON_DIR,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                pass_fds=pass_fds,
                process_group=0,
                text=True,
            )
        for fd in (read_end, secret_end):
            if fd is not None:
                os.close(fd)
        self._first_line = threading.Event()
        self._handshake: str | None = None
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.stdout.append(line)
            if self._handshake is None and line.startswith(("PYFLEET-READY ", "PYFLEET-ERROR ")):
                self._handshake = line
                self._first_line.set()
        self._first_line.set()

    def handshake_line(self, timeout: float = 30) -> str:
        assert self._first_line.wait(timeout), f"no handshake; stderr: {self.stderr()}"
        assert self._handshake is not None, f"exited without handshake; stderr: {self.stderr()}"
        return self._handshake

    def ready(self) -> dict[str, Any]:
        line = self.handshake_line()
        assert line.startswith("PYFLEET-READY "), line
        return json.loads(line.removeprefix("PYFLEET-READY "))

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def close_lifeline(self) -> None:
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None

    def kill(self) -> None:
        # The worker leads its group: this takes whatever it started, too.
        # Safe after the worker is reaped: Linux does not reuse a pid that
        # is still some live process's group id.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.close_lifeline()
        shutil.rmtree(self.dir, ignore_errors=True)


class Conn:
    """A client for one Batches stream, the one the node uses: sends calls
    (each in a CallBatch of its own, or several together with send_batch),
    collects each call's frames by id."""

    def __init__(self, target: str, secret: str | None = SECRET) -> None:
        self.channel = grpc.insecure_channel(target)
        self._out: queue.Queue[worker_pb2.CallBatch | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._frames: dict[int, list[Result]] = defaultdict(list)
        self._cond = threading.Condition()
        self.closed = False
        self.error: grpc.RpcError | None = None
        # The worker's first message, an empty ResultBatch (the node waits
        # for it before it calls the worker ready).
        self.greeted = False
        self.acks = 0  # empty ResultBatches after it: the worker reads again
        metadata = (("pyfleet-secret", secret),) if secret is not None else ()
        responses = worker_pb2_grpc.WorkerStub(self.channel).Batches(
            iter(self._out.get, None), metadata=metadata
        )
        self._thread = threading.Thread(target=self._recv, args=(responses,), daemon=True)
        self._thread.start()

    def _recv(self, responses: Iterator[worker_pb2.ResultBatch]) -> None:
        try:
            for batch in responses:
                with self._cond:
                    if not self.greeted:
                        assert not batch.results, f"a first message with results: {batch}"
                        self.greeted = True
                    elif not batch.results:
                        self.acks += 1
                    for frame in batch.results:
                        self._frames[frame.id].append(frame)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def next_id(self) -> int:
        return next(self._ids)

    def send_batch(self, calls: list[worker_pb2.Call]) -> None:
        self._out.put(worker_pb2.CallBatch(calls=calls))

    def send(self, function: str, payload: bytes | Any = b"", timeout_ms: int = 0) -> int:
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        call_id = self.next_id()
        call = worker_pb2.Call(
            id=call_id,
            function=function,
            payload=payload,
            timeout_ms=timeout_ms,
            request_id=f"r{call_id}",
        )
        self.send_batch([call])
        return call_id

    def cancel(self, call_id: int) -> None:
        self.send_batch([worker_pb2.Call(id=call_id, cancel=True)])

    def half_close(self) -> None:
        self._out.put(None)

    def _ended(self, call_id: int) -> bool:
        frames = self._frames.get(call_id)
        return bool(frames and frames[-1].kind == Result.END)

    def ended(self, call_id: int) -> bool:
        """Whether the END frame of call_id has come (without waiting)."""
        with self._cond:
            return self._ended(call_id)

    def frames(self, call_id: int, timeout: float = 15) -> list[Result]:
        """Waits for the END frame of call_id; returns all its frames."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._ended(call_id) or self.closed, timeout)
            assert ok, f"no END for call {call_id}"
            frames = list(self._frames.get(call_id, []))
        assert frames and frames[-1].kind == Result.END, f"stream closed: {self.error}"
        return frames

    def ends(self, ids: list[int], timeout: float = 10) -> dict[int, list[Result]]:
        """Waits for the END frame of every id; returns (and forgets) each
        id's frames."""

        def ended() -> bool:
            return self.closed or all(self._ended(i) for i in ids)

        with self._cond:
            assert self._cond.wait_for(ended, timeout), f"no END for some of {ids}"
            assert not self.closed, f"stream closed: {self.error}"
            return {i: self._frames.pop(i) for i in ids}

    def call(self, function: str, payload: bytes | Any = b"", timeout_ms: int = 0) -> Result:
        frames = self.frames(self.send(function, payload, timeout_ms))
        assert len(frames) == 1, frames
        return frames[0]

    def wait_greeted(self, timeout: float = 15) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.greeted or self.closed, timeout), "no first message"
        assert self.greeted, f"stream closed before its first message: {self.error}"

    def wait_acked(self, timeout: float = 15) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.acks > 0, timeout), "no empty batch"

    def wait_closed(self, timeout: float = 15) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.closed, timeout), "stream still open"

    def close(self) -> None:
        self._out.put(None)
        self.channel.close()
        self._thread.join(10)


def value(frame: Result) -> Any:
    assert not frame.HasField("error"), frame.error
    return json.loads(frame.payload)


def error(frame: Result) -> tuple[int, str, str]:
    assert frame.HasField("error"), frame
    return frame.error.code, frame.error.type, frame.error.message


def alive(pid: int) -> bool:
    """Whether pid runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def locate(where: dict[str, Any]) -> tuple[int, int]:
    """The host pid of the worker that answered whereami, and the pid the
    node's events name for it: the worker's own, or where the worker runs
    under the init of its own PID namespace (cgroup and pidns containment),
    the init's."""
    ns, inner = where["pidns"], where["pid"]
    host = inner
    if os.readlink("/proc/self/ns/pid") != ns:
        host = next(
            (
                int(p)
                for p in os.listdir("/proc")
                if p.isdigit() and _ns_of(p) == ns and _nspid(p)[-1:] == [inner]
            ),
            0,
        )
        assert host, f"no process is pid {inner} in {ns}"
    with open(f"/proc/{host}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        is_init = b"\0__pyfleet_init\0" in f.read()
    return host, ppid if is_init else host


def _ns_of(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _nspid(pid: str) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(*args: Any, **kwargs: Any) -> Worker:
        worker = Worker(*args, **kwargs)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture
def connect() -> Iterator[Callable[..., Conn]]:
    conns: list[Conn] = []

    def open_conn(worker: Worker, secret: str | None = SECRET) -> Conn:
        conn = Conn(worker.target, secret)
        conns.append(conn)
        return conn

    yield open_conn
    for conn in conns:
        conn.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[Worker]:
    """A demo worker shared by a module's tests that do not stop it."""
    worker = Worker()
    try:
        worker.ready()
        yield worker
    finally:
        worker.kill()


@pytest.fixture(scope="module")
def odd() -> Iterator[Worker]:
    worker = Worker("oddities", APPS)
    try:
        worker.ready()
        yield worker
    finally:
        worker.kill()


# ------------------------------------------------------------ real poolnodes

REPO = PYTHON_DIR.parent
POOLNODE = REPO / "bin" / "poolnode"
_node_seq = itertools.count(1)


class Node:
    """A bin/poolnode started by a test: an embedded NATS server on a random
    port (JetStream in its state dir), or on ``nats`` when given, serving
    ``app`` with real workers. ``stop()`` ends it and waits until every
    process it started is gone; a fixture must call it."""

    def __init__(
        self,
        app: Path = APPS / "client_app.py",
        workers: int = 2,
        extra: tuple[str, ...] = (),
        nats: str | None = None,
    ) -> None:
        if not POOLNODE.exists():
            pytest.fail(f"{POOLNODE} is missing: run `make build` (make test-py does)")
        self.name = f"py{os.getpid()}-{next(_node_seq)}"
        self.state = tempfile.mkdtemp(prefix="pf", dir="/tmp")
        self.url: str | None = nats
        self.log: list[str] = []
        self._serving = threading.Event()
        args = [
            str(POOLNODE),
            "--node", self.name,
            "--workers", str(workers),
            "--state-dir", self.state,
            "--python", sys.executable,
            "--log-format", "json",
            "--log-level", "info",
            "--app", str(app),
            *(("--nats", nats) if nats else ("--listen", "127.0.0.1:0")),
            *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._serving.wait(60):
            self.stop()
            raise AssertionError(f"poolnode {self.name} not serving after 60 s:\n" + "\n".join(self.log))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "embedded NATS server listening":
                self.url = entry.get("url")
            # The node's own "serving" comes once jobs are pulled too; bus
            # logs one under a logger name before that.
            if entry.get("msg") == "serving" and "logger" not in entry:
                self._serving.set()
        self._serving.set()

    def processes(self) -> list[int]:
        """Live processes carrying this node's worker marker: its workers
        and whatever they started."""
        marker = f"PYFLEET_WORKER_RUN={self.name}/".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if (env.startswith(marker) or b"\0" + marker in env) and alive(int(entry)):
                found.append(int(entry))
        return found

    def kill(self) -> None:
        """SIGKILL, as a crash would: the node's guardian then kills its workers."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        deadline = time.monotonic() + 15
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # do not leak into other tests
        shutil.rmtree(self.state, ignore_errors=True)
        assert not left, f"node {self.name} left processes {left}"


@pytest.fixture
def start_node() -> Iterator[Callable[..., Node]]:
    """Starts poolnodes; stops each (last first) and checks it left nothing."""
    nodes: list[Node] = []

    def start(*args: Any, **kwargs: Any) -> Node:
        node = Node(*args, **kwargs)
        nodes.append(node)
        return node

    yield start
    for node in reversed(nodes):
        node.stop()


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """A node of the client test app shared by a module's tests."""
    n = Node(workers=2, extra=("--concurrency", "4"))
    try:
        yield n
    finally:
        n.stop()
