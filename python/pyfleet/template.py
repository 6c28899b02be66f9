"""The template of a node started with --preload: imports the app once, then
forks workers from it on the node's request (lifecycle/preload.go is the
other side; README "Preloaded workers" says what an app must not do at
import time).

Protocol, one JSON object per SOCK_SEQPACKET message on the socket
PYFLEET_TEMPLATE_FD names:
    template -> node  {"ready": PID} | {"error": "..."}     once, after the import
    node -> template  {"id": N, "argv": [...], "env": [...], "dir": "...", "node": PID,
                       "cgroup": bool, "pidns": null | {"init": PATH,
                       "parent": "PID", "userns": bool}}
                      with fds [stdout, stderr, extra..., cgroup dir, status]
                      (the cgroup dir with "cgroup", the status pipe with "pidns")
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

With "pidns" each worker gets a PID namespace of its own, as a spawned one
does (lifecycle/pidns.go), although the template lives in the node's: the
intermediate unshares the PID and mount namespaces (and, without root, a
user namespace mapping its ids to themselves) and forks A, PID 1 of the new
namespace. A enters the worker's cgroup ("cgroup"), forks the worker W (PID
2, which waits on a pipe before running anything of the app) and execs the
node's init in its adopt mode (lifecycle/pidinit/pidinit.go), which keeps W
as its child. A's pid is the one the node registers and is re-parented to the
node; the init then sets itself up as a started one does, lets W go, and
reports W's exit on the status pipe.
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
# From <linux/sched.h> and <linux/prctl.h>, <linux/capability.h>: Python
# 3.11's os has no unshare.
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_SYS_ADMIN = 21
LINUX_CAPABILITY_VERSION_3 = 0x20080522
INIT_ARG = "__pyfleet_init"  # lifecycle/pidinit.Arg
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
        app, _ = process.import_app(args[1], args[3])
        process.describe_functions(app)
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
        # Intermediates killed and not yet reaped, by pidfd: id,
        # intermediate pid, and the worker's pid to report adopted (0: none).
        self.dying: dict[int, tuple[int, int, int]] = {}

    def serve(self) -> int:
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.data == "died":
                        self.died(key.fileobj)  # type: ignore[arg-type]
                        continue
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
            for _, middle, _ in self.dying.values():
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
        if not data or data.startswith(b"E"):
            del self.pending[ident]
            os.kill(middle, signal.SIGKILL)
            os.waitpid(middle, 0)
            why = data[1:].decode(errors="replace") if data else "it died"
            send(self.sock, {"id": ident, "error": f"the intermediate process could not fork the worker: {why}"})
            return
        pid = int(data)
        self.pending[ident][1] = pid
        send(self.sock, {"id": ident, "pid": pid})

    def go(self, ident: int, take: bool) -> None:
        """The node has registered the worker (or will not take it): the
        intermediate goes, and the worker is re-parented to the node.
        Without go the node did not take the worker, which is then killed
        as an orphan once re-parented (or waits in vain and exits).

        The intermediate is reaped when its pidfd says it died, not waited
        for here: a dying process needs the CPU to tear down its copy of
        the template, and with a hundred workers starting that took the
        one thread serving every fork 3 ms a worker (0.4 s of 1.1 s for
        100; test/bench/notes.md)."""
        middle, pid = self.pending.pop(ident)
        pidfd = os.pidfd_open(middle)
        os.kill(middle, signal.SIGKILL)
        self.dying[pidfd] = (ident, middle, pid if take else 0)
        self.sel.register(pidfd, selectors.EVENT_READ, "died")

    def died(self, pidfd: int) -> None:
        """An intermediate killed by go is dead: reaped, its worker is the
        node's child now, which the node learns from adopted."""
        self.sel.unregister(pidfd)
        os.close(pidfd)
        ident, middle, adopted = self.dying.pop(pidfd)
        os.waitpid(middle, 0)
        if adopted:
            send(self.sock, {"id": ident, "adopted": adopted})


def intermediate(sock: socket.socket, report_w: int, req: dict, fds: list[int]) -> None:
    """Forks the worker (in a PID namespace: its init, which forks the
    worker), tells the template its pid, and waits to be killed by the
    template once the node said go."""
    ns = req.get("pidns")
    if ns:
        try:
            enter_namespaces(bool(ns.get("userns")))
        except OSError as exc:
            os.write(report_w, f"E{exc}".encode())
            raise
    # Its end closes when the intermediate dies: a worker forked here (or
    # the init of one) blocks on the other end instead of polling for its
    # new parent.
    gone_r, gone_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_w)
        os.close(gone_w)
        if ns:
            become_init(sock, req, fds, gone_r)  # never returns
        become_worker(sock, req, fds, gone=gone_r)  # never returns
    os.close(gone_r)
    if ns:
        # As A does itself: whichever comes first, A leads its group
        # before the node learns its pid (the node kills the init's
        # group). A that has exec'd refuses.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
    os.write(report_w, str(pid).encode())
    while True:
        signal.pause()


def enter_namespaces(userns: bool) -> None:
    """Makes this process's next child PID 1 of a new PID namespace, in a
    new mount namespace: what lifecycle/pidns.go's namespaces() gives a
    started init. Without root also a user namespace in which this user's
    uid and gid map to themselves, where the init may mount /proc."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWPID | CLONE_NEWNS | (CLONE_NEWUSER if userns else 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    if userns:
        # setgroups first: an unprivileged gid_map is refused without it.
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capset(update) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    hdr = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    update(data)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def raise_ambient(cap: int) -> None:
    """Keeps cap through the exec of a non-root program (the init needs
    CAP_SYS_ADMIN in its user namespace to mount /proc; it drops it before
    the worker runs), as lifecycle/pidns.go's AmbientCaps does."""

    def add(data) -> None:
        data[cap // 32].inheritable |= 1 << (cap % 32)

    _capset(add)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"raise ambient capability {cap}: {os.strerror(err)}")


def drop_capabilities() -> None:
    """No capabilities, as a started worker has none in its user namespace:
    a forked one would keep those unshare gave its ancestor."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    def clear(data) -> None:
        for d in data:
            d.effective = d.permitted = d.inheritable = 0

    _capset(clear)


def enter_cgroup(dir_fd: int) -> None:
    """Before anything of the app runs: every process it starts is forked
    inside the cgroup."""
    procs = os.open("cgroup.procs", os.O_WRONLY, dir_fd=dir_fd)
    try:
        os.write(procs, b"0")
    finally:
        os.close(procs)


def become_init(sock: socket.socket, req: dict, fds: list[int], gone: int) -> None:
    """A, PID 1 of the worker's new namespace: enters the worker's cgroup,
    forks the worker, and execs the node's init to adopt it (lifecycle/
    pidinit/pidinit.go, adopt). Never returns."""
    try:
        os.setpgid(0, 0)
        ns = req["pidns"]
        status, worker_fds = fds[-1], fds[:-1]
        if req.get("cgroup"):
            enter_cgroup(worker_fds[-1])
        go_r, go_w = os.pipe()
        worker = os.fork()
        if worker == 0:
            os.close(go_w)
            os.close(status)
            os.close(gone)
            become_worker(sock, req, worker_fds, go=go_r)  # never returns
        os.close(go_r)
        sock.close()
        # The init's stdout and stderr are the worker's, as a started
        # init's are; 3 its status pipe, 4 the worker's go, 5 the pipe that
        # ends with the intermediate.
        place_fds(fds[0], fds[1], [status, go_w, gone])
        if ns.get("userns"):
            raise_ambient(CAP_SYS_ADMIN)
        env = dict(kv.split("=", 1) for kv in req["env"] if "=" in kv)
        # The worker's environment, so that the init carries its marks, and
        # its command line after the init's own, as a started init has both.
        argv = [ns["init"], INIT_ARG, "adopt", str(ns["parent"]), "3", str(worker), "4", "5", *req["argv"]]
        os.execve(ns["init"], argv, env)
    except BaseException as exc:  # noqa: BLE001 - never return into the template's code
        print(f"pyfleet preloaded worker's init: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        os._exit(EXIT_SETUP)


def become_worker(sock: socket.socket, req: dict, fds: list[int], go: int = -1, gone: int = -1) -> None:
    """Turns this forked child into what `python -m pyfleet.worker ARGV`
    spawned by the node would be, then runs it. Never returns. go, in a
    PID namespace, is the pipe on which the worker's init lets it run;
    gone, outside one, the pipe that closes when the intermediate dies."""
    code = EXIT_SETUP
    try:
        nextra = len(fds) - 2 - (1 if req.get("cgroup") else 0)
        if req.get("cgroup") and go < 0:
            enter_cgroup(fds[-1])
        os.setpgid(0, 0)
        if gone >= 0:
            wait_for_intermediate(gone)
        sock.close()
        extra = fds[2 : 2 + nextra]
        # go is placed after the worker's own fds, to be closed once read.
        place_fds(fds[0], fds[1], extra + ([go] if go >= 0 else []))
        set_environment(req["env"])
        set_cmdline(req["argv"])
        os.chdir(req["dir"])
        if go >= 0:
            wait_for_init(3 + len(extra), bool(req["pidns"].get("userns")))
        else:
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
    # Every variable is unset and set again, not only those that differ:
    # until putenv replaces it, an entry of C's environ points into the
    # block overwritten below, and children would inherit the overwrite.
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


def wait_for_init(go: int, userns: bool) -> None:
    """Waits for the worker's init to let it run (it has been adopted by
    the node and mounted the namespace's /proc), and drops what a started
    worker would not have."""
    try:
        released = os.read(go, 1)
    finally:
        os.close(go)
    if not released:
        raise RuntimeError("the worker's init exited before it let the worker run")
    if os.getppid() != 1:
        raise RuntimeError(f"the worker's parent is {os.getppid()}, not its namespace's init")
    if userns:
        drop_capabilities()


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
