"""The template of a node started with --preload: imports the app once, then
forks workers from it on the node's request (lifecycle/preload.go is the
other side; README "Preloaded workers" says what an app must not do at
import time).

Protocol, one JSON object per SOCK_SEQPACKET message on the socket
PYFLEET_TEMPLATE_FD names:
    template -> node  {"ready": PID} | {"error": "..."}     once, after the import
    node -> template  {"id": N, "argv": [...], "env": [...], "dir": "...", "node": PID,
                       "cgroup": bool}  with fds [stdout, stderr, extra..., cgroup dir]
    template -> node  {"id": N, "pid": PID} | {"id": N, "error": "..."}
    node -> template  {"id": N, "go": true|false}   (true: the node has registered PID as its own)
    template -> node  {"id": N, "adopted": PID}   PID is now the node's child (after go true)

N numbers one worker's dialogue; the node may ask for the next worker
before an earlier one's dialogue is over, and the answers come in the
order the forks finish.

Each worker is forked twice: the template forks an intermediate, the
intermediate forks the worker, and the template kills and reaps the
intermediate once the node says go. The worker is then re-parented to the
node, a child subreaper (lifecycle/subreaper.go), which waits for it and
reaps it exactly as it does a spawned worker.
"""

from __future__ import annotations

import array
import ctypes
import gc
import json
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time

# Before anything imports grpc (see worker.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from . import process  # noqa: E402
from . import worker as worker_main  # noqa: E402

TEMPLATE_FD_ENV = "PYFLEET_TEMPLATE_FD"
EXIT_USAGE = 2
EXIT_IMPORT = 3
EXIT_UNSAFE = 4
# A forked worker that could not become what a spawned one is.
EXIT_SETUP = 70
MAX_MESSAGE = 1 << 20
MAX_FDS = 64
PR_SET_PDEATHSIG = 1
# How long a worker waits to be re-parented to the node.
ADOPT_TIMEOUT_S = 10.0


def send(sock: socket.socket, msg: dict) -> None:
    sock.send(json.dumps(msg, separators=(",", ":")).encode())


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One message and the fds that came with it; None at EOF (the node is gone)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def thread_violation() -> str:
    """Why forking now would be unsafe, or "": a thread other than this one
    holds whatever locks it held at the fork forever in the child."""
    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    if names or tasks > 1:
        shown = ", ".join(names) if names else "started outside Python's threading"
        return f"{max(len(names) + 1, tasks)} threads alive after the app's import ({shown})"
    return ""


def main() -> int:
    value = os.environ.pop(TEMPLATE_FD_ENV, "")
    try:
        sock = socket.socket(fileno=int(value))
    except (ValueError, OSError) as exc:
        print(f"pyfleet template: bad {TEMPLATE_FD_ENV}={value!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = sys.argv[1:]
    # --argv-room is padding: the room a worker's command line is written
    # into (see set_cmdline).
    if len(args) not in (4, 6) or args[0] != "--app" or args[2] != "--app-dir" or args[4:5] not in ([], ["--argv-room"]):
        print("usage: python -m pyfleet.template --app MODULE[:ATTR] --app-dir DIR [--argv-room PADDING]", file=sys.stderr)
        return EXIT_USAGE
    # The template has no lifeline of its own: it reads the node's socket,
    # whose EOF is the node's death, and its parent-death signal is set by
    # the node's fork.
    try:
        process.import_app(args[1], args[3])
    except process.AppImportFailed:
        send(sock, {"error": "the app failed to import (the traceback is in the template's log)"})
        return EXIT_IMPORT
    sys.stdout.flush()
    sys.stderr.flush()
    why = thread_violation()
    if why:
        send(sock, {"error": why})
        return EXIT_UNSAFE
    # Everything the import made is kept out of the collector's reach: a
    # collection in a worker would otherwise write to (and so copy) every
    # page holding an object's GC header, pages the workers share with
    # the template.
    gc.freeze()
    send(sock, {"ready": os.getpid()})
    try:
        return Forker(sock).serve()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"pyfleet template: {exc}", file=sys.stderr)
        return 1


class Forker:
    """The template's side of the fork dialogue, for several workers at
    once: the node asks for the next worker while earlier ones wait for
    their intermediate to fork or for the node's go, so that only the
    template's own fork of each intermediate is serial. One thread, one
    selector: the template must stay single-threaded to fork safely."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        # id -> [intermediate pid, worker pid or 0 until it is known]
        self.pending: dict[int, list[int]] = {}

    def serve(self) -> int:
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.data is not None:
                        self.reported(key.fileobj, key.data)  # type: ignore[arg-type]
                        continue
                    req, fds = recv(self.sock)
                    if req is None:
                        return 0
                    try:
                        if "argv" in req:
                            self.fork(req, fds)
                        else:
                            self.go(int(req["id"]), bool(req.get("go")))
                    finally:
                        for fd in fds:
                            os.close(fd)
        finally:
            # The node is gone or broke the protocol: nothing it did not
            # take is left behind.
            for middle, pid in self.pending.values():
                for victim in (pid, middle):
                    if victim:
                        os.kill(victim, signal.SIGKILL)
                os.waitpid(middle, 0)

    def fork(self, req: dict, fds: list[int]) -> None:
        ident = int(req["id"])
        why = thread_violation()
        if why:
            send(self.sock, {"id": ident, "error": why})
            return
        sys.stdout.flush()
        sys.stderr.flush()
        report_r, report_w = os.pipe()
        middle = os.fork()
        if middle == 0:
            try:
                os.close(report_r)
                intermediate(self.sock, report_w, req, fds)
            finally:
                os._exit(EXIT_SETUP)
        os.close(report_w)
        self.pending[ident] = [middle, 0]
        self.sel.register(report_r, selectors.EVENT_READ, ident)

    def reported(self, report_r: int, ident: int) -> None:
        """The intermediate wrote the worker's pid, or died without."""
        self.sel.unregister(report_r)
        try:
            data = os.read(report_r, 32)
        finally:
            os.close(report_r)
        middle = self.pending[ident][0]
        if not data:
            del self.pending[ident]
            os.kill(middle, signal.SIGKILL)
            os.waitpid(middle, 0)
            send(self.sock, {"id": ident, "error": "the intermediate process died before it forked the worker"})
            return
        pid = int(data)
        self.pending[ident][1] = pid
        send(self.sock, {"id": ident, "pid": pid})

    def go(self, ident: int, take: bool) -> None:
        """The node has registered the worker (or will not take it): the
        intermediate goes, and the worker is re-parented to the node.
        Without go the node did not take the worker, which is then killed
        as an orphan once re-parented (or waits in vain and exits)."""
        middle, pid = self.pending.pop(ident)
        os.kill(middle, signal.SIGKILL)
        os.waitpid(middle, 0)
        if take:
            send(self.sock, {"id": ident, "adopted": pid})


def intermediate(sock: socket.socket, report_w: int, req: dict, fds: list[int]) -> None:
    """Forks the worker, tells the template its pid, and waits to be
    killed by the template once the node said go."""
    # Its end closes when it dies: the worker blocks on the other end
    # instead of polling for its new parent.
    gone_r, gone_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_w)
        os.close(gone_w)
        become_worker(sock, req, fds, gone_r)  # never returns
    os.close(gone_r)
    os.write(report_w, str(pid).encode())
    while True:
        signal.pause()


def become_worker(sock: socket.socket, req: dict, fds: list[int], intermediate_gone: int) -> None:
    """Turns this forked child into what `python -m pyfleet.worker ARGV`
    spawned by the node would be, then runs it. Never returns."""
    code = EXIT_SETUP
    try:
        nextra = len(fds) - 2 - (1 if req.get("cgroup") else 0)
        if req.get("cgroup"):
            # Before anything of the app runs: every process it starts is
            # forked inside the cgroup.
            procs = os.open("cgroup.procs", os.O_WRONLY, dir_fd=fds[-1])
            try:
                os.write(procs, b"0")
            finally:
                os.close(procs)
        os.setpgid(0, 0)
        wait_for_intermediate(intermediate_gone)
        sock.close()
        place_fds(fds[0], fds[1], fds[2 : 2 + nextra])
        set_environment(req["env"])
        set_cmdline(req["argv"])
        os.chdir(req["dir"])
        wait_for_adoption(int(req["node"]))
        argv = req["argv"]
        if argv[1:3] != ["-m", "pyfleet.worker"]:
            raise ValueError(f"not a worker's command line: {argv[:3]}")
        sys.argv = ["pyfleet.worker"] + argv[3:]
        code = worker_main.main(argv[3:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the template
        print(f"pyfleet preloaded worker: {type(exc).__name__}: {exc}", file=sys.stderr)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def place_fds(out: int, err: int, extra: list[int]) -> None:
    """stdin /dev/null, stdout and stderr the node's pipes, extra files at 3
    and up, nothing else: what os/exec gives a spawned worker."""
    high = [os.dup(fd) for fd in [out, err, *extra]]
    high = [fcntl_dup_high(fd) for fd in high]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for target, fd in enumerate(high[:2], start=1):
        os.dup2(fd, target)
    for i, fd in enumerate(high[2:]):
        os.dup2(fd, 3 + i)
    os.closerange(3 + len(extra), max_fd())


def fcntl_dup_high(fd: int) -> int:
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 1000)
    os.close(fd)
    return new


def max_fd() -> int:
    try:
        return max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def set_environment(env: list[str]) -> None:
    """Replaces the environment, and what /proc/<pid>/environ shows: the
    node finds a worker's processes by the marks in it (lifecycle/marker.go),
    and a forked child would otherwise show the template's. The template
    was started with padding, so the worker's environment fits in place."""
    new = dict(kv.split("=", 1) for kv in env if "=" in kv)
    os.environ.clear()
    os.environ.update(new)
    block = b"".join(kv.encode() + b"\0" for kv in env)
    fields = _stat_fields()
    # env_start and env_end, the two fields before the last (exit_code).
    start, end = int(fields[-3]), int(fields[-2])
    if len(block) > end - start:
        raise ValueError(f"the environment ({len(block)} bytes) does not fit the template's ({end - start} bytes)")
    ctypes.memmove(start, block + b"\0" * (end - start - len(block)), end - start)


def _stat_fields() -> list[bytes]:
    with open("/proc/self/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def set_cmdline(argv: list[str]) -> None:
    """Shows the worker's command line in /proc/<pid>/cmdline (ps, the
    node's tools), written over the template's, which has room for it
    (--argv-room). One that does not fit leaves the template's."""
    fields = _stat_fields()
    # arg_start and arg_end come before env_start, env_end and exit_code.
    start, end = int(fields[-5]), int(fields[-4])
    block = b"".join(a.encode() + b"\0" for a in argv)
    if len(block) <= end - start:
        ctypes.memmove(start, block + b"\0" * (end - start - len(block)), end - start)


def wait_for_intermediate(gone: int) -> None:
    """Blocks until the intermediate has died, which the template makes it
    do once the node has registered this process: the pipe's other end was
    the intermediate's alone."""
    ready, _, _ = select.select([gone], [], [], ADOPT_TIMEOUT_S)
    if not ready:
        raise TimeoutError("the intermediate process did not exit: the node never took this worker")
    os.close(gone)


def wait_for_adoption(node: int) -> None:
    """Waits until the node is this process's parent (the template kills
    the intermediate once the node has registered us), then dies with the
    node as a spawned worker does."""
    # The intermediate's files close before the kernel re-parents its
    # child: a short wait at most.
    deadline = time.monotonic() + ADOPT_TIMEOUT_S
    while os.getppid() != node:
        if time.monotonic() > deadline:
            raise TimeoutError("not adopted by the node (is it a child subreaper?)")
        time.sleep(0.0002)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != node:
        os._exit(EXIT_SETUP)


if __name__ == "__main__":
    sys.exit(main())
