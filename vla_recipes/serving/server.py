"""openpi's policy-server protocol over WebSocket, with micro-batching across clients.

Exactly what ``openpi_client.websocket_client_policy.WebsocketClientPolicy`` expects: on connect the server sends
one msgpack frame of metadata; then each binary msgpack-numpy frame holding an observation dict is answered with
``{"actions": (action_horizon, action_dim) float32, "server_timing": {"infer_ms": ..., "prev_total_ms": ...}}``
(plus ``batch_size``: how many requests shared the model call). ``GET /healthz`` answers 200 ``OK``. With an api key,
a connection must send ``Authorization: Api-Key <key>`` (what the openpi client sends for ``api_key=``).

Unlike openpi's server, which sends a traceback and closes the connection on any error, a bad request gets one text
frame ``"bad request: <what and the fix>"`` (the openpi client raises it as a ``RuntimeError``) and the connection
stays open; a frame over ``max_message_bytes`` closes that connection with code 1009 (message too big) before it is
read. Nothing a client sends stops the server or other clients. SIGTERM / SIGINT stop it gracefully: no new
connections, requests in flight are answered, then connections close with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import logging
import signal
import threading
import time

import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.frames import CloseCode

from vla_recipes.serving.batcher import MicroBatcher
from vla_recipes.serving.codec import packb, unpackb
from vla_recipes.serving.observation import BadRequest
from vla_recipes.serving.policy import ServedPolicy

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # four 640x480 RGB cameras are 3.7 MB
SHUTDOWN_TIMEOUT_S = 60.0


class PolicyServer:
    """Serves a :class:`ServedPolicy`. ``port=0`` picks a free port (see ``port`` once ``ready`` is set)."""

    def __init__(
        self,
        policy: ServedPolicy,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.policy, self.host, self.port = policy, host, port
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.max_message_bytes = max_message_bytes
        self._authorization = f"Api-Key {api_key}" if api_key else None
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._in_flight = 0
        self._connections = 0
        self._idle: asyncio.Condition | None = None
        self._batcher: MicroBatcher | None = None

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered."""
        return self._in_flight

    def run(self) -> None:
        """Serve until SIGTERM / SIGINT (blocking; call from the main thread)."""
        asyncio.run(self.serve(handle_signals=True))

    def stop(self) -> None:
        """Ask a running server to shut down gracefully; safe from any thread."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended (stopped twice): nothing to stop
                self._loop.call_soon_threadsafe(self._stop.set)

    async def serve(self, handle_signals: bool = False) -> None:
        self._loop, self._stop, self._idle = asyncio.get_running_loop(), asyncio.Event(), asyncio.Condition()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        batcher = MicroBatcher(
            self.policy.predict_each,
            self.max_batch,
            self.max_wait_ms,
            more_may_come=lambda: self._in_flight < self._connections,  # a client waiting for an answer sends nothing
        )
        batcher.start()
        self._batcher = batcher
        async with serve(
            self._handle,
            self.host,
            self.port,
            compression=None,
            max_size=self.max_message_bytes,
            process_request=self._process_request,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            address = f"{self.host}:{self.port}"
            logger.info("serving on ws://%s (health check: http://%s/healthz)", address, address)
            self.ready.set()
            await self._stop.wait()
            logger.info("shutting down: answering the requests in flight")
            server.close(close_connections=False)  # no new connections
            batcher.flush()  # requests waiting for batch partners run now
            async with self._idle:
                try:
                    await asyncio.wait_for(self._idle.wait_for(lambda: self._in_flight == 0), SHUTDOWN_TIMEOUT_S)
                except TimeoutError:
                    logger.warning("requests still in flight after %.0f s; closing anyway", SHUTDOWN_TIMEOUT_S)
            closing = [ws.close(CloseCode.GOING_AWAY, "server shutting down") for ws in server.connections]
            await asyncio.gather(*closing)
            await server.wait_closed()
        await batcher.close()
        self.ready.clear()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._authorization is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), self._authorization.encode()):
                logger.warning("refused %s: missing or wrong api key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong api key\n")
        return None

    async def _handle(self, websocket: ServerConnection) -> None:
        logger.info("connection from %s opened", websocket.remote_address)
        prev_total_ms = None
        self._connections += 1
        try:
            await websocket.send(packb(self.policy.metadata))
            while True:
                message = await websocket.recv()
                start = time.monotonic()
                await self._begin()
                try:
                    answer = await self._answer(message, prev_total_ms)
                    await websocket.send(answer)
                finally:
                    await self._end()
                prev_total_ms = (time.monotonic() - start) * 1000
        except websockets.ConnectionClosed:
            logger.info("connection from %s closed", websocket.remote_address)
        finally:
            self._connections -= 1

    async def _answer(self, message: bytes | str, prev_total_ms: float | None) -> bytes | str:
        """The response frame: actions, or a text frame saying what went wrong."""
        start = time.monotonic()
        if self._stop.is_set():
            return "server error: the server is shutting down"
        try:
            if isinstance(message, str):
                raise BadRequest("send observations as binary msgpack frames, not text")
            try:
                observation = unpackb(message)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            actions, batch_size = await self._batcher.submit(self.policy.spec.parse(observation))
        except BadRequest as e:
            logger.info("bad request: %s", e)
            return f"bad request: {e}"
        except Exception as e:
            logger.exception("request failed")
            return f"server error: {type(e).__name__}: {e}"
        timing = {"infer_ms": (time.monotonic() - start) * 1000, "batch_size": batch_size}
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        return packb({"actions": actions, "server_timing": timing})

    async def _begin(self) -> None:
        async with self._idle:
            self._in_flight += 1

    async def _end(self) -> None:
        async with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()
