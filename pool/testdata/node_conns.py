"""The worker's accepted connections from the node, for the test apps
beside it (app.py, crashy.py)."""
import os
import socket
import sys
from typing import Iterator


def socket_path() -> str:
    return sys.argv[sys.argv.index("--socket") + 1]


def node_connections() -> Iterator[socket.socket]:
    """Each open connection accepted on the worker's socket (not the
    listening one), as a socket object on gRPC's own fd: it is detached
    after the caller's loop body, so the fd stays gRPC's."""
    path = socket_path()
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            if (
                s.family == socket.AF_UNIX
                and s.getsockname() == path
                and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                yield s
        except OSError:
            pass
        finally:
            s.detach()
