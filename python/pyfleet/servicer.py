"""The worker's gRPC server on its Unix socket: the Worker service
(proto/worker.proto), gRPC health, and the secret every RPC must carry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from _operator import _compare_digest  # hmac.compare_digest, without importing hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from . import codec
from ._proto import worker_pb2_grpc
from .app import App
from .calls import call_async, call_sync, runs_inline
from .stream import Stream
from .threads import CallThreads

SERVICE_NAME = "pyfleet.worker.v1.Worker"
SECRET_METADATA = "pyfleet-secret"
# The node enforces its own limit (413); this one only has to be above it.
MAX_MESSAGE_BYTES = 64 << 20


class Servicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, app: App, calls: CallThreads, concurrency: int) -> None:
        self._functions = dict(app.functions)
        self._calls = calls
        self._concurrency = concurrency
        self._streams: set[Stream] = set()
        self._draining = False

    async def Batches(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # The stream the node uses (pool/worker.go): one per worker.
        stream = Stream(self._functions, self._calls, self._concurrency)
        self._streams.add(stream)
        if self._draining:
            stream.drain()
        try:
            await stream.run(context)
        finally:
            self._streams.discard(stream)

    async def Unary(self, call: codec.Call, context: grpc.aio.ServicerContext) -> codec.Result:
        # One call per RPC. The node does not use it; it is kept only for the
        # benchmark's direct ceiling (test/bench/load.go, make bench). It runs
        # the function the way a Batches stream does, without streaming.
        if self._draining:
            return codec.shutting_down(call)
        spec = self._functions.get(call.function)
        if spec is None:
            return codec.unknown_function(call)
        if spec.stream:
            return codec.error(
                call.id, 400, "BadRequest", f"{spec.name} streams: call it on Batches"
            )
        if spec.kind == "sync":
            if runs_inline(self._concurrency, spec.kind, spec.context is not None):
                return call_sync(call, spec)  # as a stream runs it: see Stream._start
            result: codec.Result = await self._calls.call(call_sync, call, spec)
            return result
        try:
            timeout = call.timeout_ms / 1000 if call.timeout_ms else None
            return await asyncio.wait_for(call_async(call, spec), timeout)
        except TimeoutError:
            return codec.stopped(call, spec, "DeadlineExceeded")

    def drain(self) -> None:
        """Refuse new calls; each stream ends once its calls have ended."""
        self._draining = True
        for stream in list(self._streams):
            stream.drain()


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC, health checks included, without the node's secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing pyfleet-secret")

        # A streaming handler never waits for a request message, so it can
        # refuse a call of any shape at once.
        self._deny = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SECRET_METADATA:
                if isinstance(value, str):
                    value = value.encode()
                if _compare_digest(value, self._secret):
                    return await continuation(handler_call_details)
                break
        return self._deny


class Server:
    """The gRPC server with the Worker service and health, behind SecretCheck."""

    def __init__(self, app: App, secret: str, calls: CallThreads, concurrency: int) -> None:
        self._server = grpc.aio.server(
            interceptors=[SecretCheck(secret)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # No bandwidth-delay probes: each is a ping frame that costs
                # this process about as much as a message, on a Unix socket
                # where the node sets fixed windows anyway.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        self._servicer = Servicer(app, calls, concurrency)
        worker_pb2_grpc.add_WorkerServicer_to_server(self._servicer, self._server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)

    async def start(self, socket_path: str) -> None:
        """Serves on socket_path, a file only this user can open."""
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
                os.unlink(socket_path)  # left by an earlier worker with this id
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            self._server.add_insecure_port("unix:" + socket_path)
        finally:
            os.umask(old_umask)
        await self._server.start()

    async def stop(self, grace: float) -> None:
        """Reports NOT_SERVING, refuses new calls, and returns once every
        stream has drained, or after the grace, cancelling what is left."""
        await self._health.enter_graceful_shutdown()
        self._servicer.drain()
        await self._server.stop(grace)
