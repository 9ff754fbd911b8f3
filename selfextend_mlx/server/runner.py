"""Running the server: uvicorn serves HTTP in a background thread while the calling (main)
thread runs the engine, so every MLX call happens on the thread that loaded the model.

Ctrl-C and SIGTERM stop it within seconds: the running request is cancelled at its next
prefill step or token (its client gets a "shutting down" error), queued ones get a 503, open
connections are closed, and serve() returns normally. A second signal forces the exit.
"""

import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import SelfExtendError
from .app import ServerOptions, create_app
from .engine import Engine

GRACE_SECONDS = 3  # how long open connections may take to finish once stopping
START_SECONDS = 30
REQUEST_SECONDS = 10.0  # a connection must have sent a request's headers within this


class RequestDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: a connection
    that sends nothing, or trickles its headers, is closed after REQUEST_SECONDS instead of
    holding a socket for ever (uvicorn's keep-alive timeout only starts after a response).
    Such connections hold no place in app.RequestLimit, which counts requests: when uvicorn's
    concurrency limit counted them, 80 of them locked every client out with a plain-text 503."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(REQUEST_SECONDS, self._expire)

    def _expire(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request under way
        if waiting and not self.transport.is_closing():
            self.transport.close()


class SignalWatch:
    """Ctrl-C and SIGTERM acted on at once, by a thread of their own: on_signal() runs for each
    one (it must be safe on any thread). Python runs its signal handlers on the main thread only
    once it is back in the interpreter, and there the engine may be inside one MLX call (a
    prefill step) for a second or more: /health went on saying ok meanwhile. The C-level
    handler writes each signal's number to a wakeup socket this thread reads at once; the
    Python-level handlers do nothing (they only keep the default action, exiting, away).
    Enter and exit on the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[], None]):
        self.on_signal = on_signal

    def __enter__(self):
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in self.SIGNALS}
        self._thread = threading.Thread(target=self._watch, name="signals", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while data := self._read.recv(64):  # b"" once __exit__ closes the other end
            for signum in data:
                if signum in self.SIGNALS:
                    self.on_signal()

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._write.close()
        self._thread.join(5)
        self._read.close()


def is_local(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: a free one), or one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise SelfExtendError(f"cannot listen on {host!r}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = ": pick another with --port" if port else ""
        raise SelfExtendError(f"cannot listen on {host}:{port}: {error.strerror}{hint}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(
    engine: Engine,
    options: ServerOptions = ServerOptions(),
    *,
    log: Callable[[str], None] = print,
    on_ready: Callable[[str], None] = print,
    sock: Optional[socket.socket] = None,
) -> None:
    """Serve `engine` until Ctrl-C or SIGTERM; on_ready(url) once requests are accepted.
    `sock`: bound already (so that a port in use fails before the model loads)."""
    sock = sock or bind(options.host, options.port)
    config = uvicorn.Config(
        create_app(engine, options, log),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_SECONDS,
        http=RequestDeadline,  # no limit_concurrency: app.RequestLimit answers a JSON 503 instead, and
        # counts requests only (uvicorn's counted idle connections too, and answered in plain text)
    )
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)

    def stop() -> None:
        if engine.stopping:
            server.force_exit = True
        engine.stopping = True
        server.should_exit = True

    with sock, SignalWatch(stop):  # signals are heard until the HTTP thread has finished too
        try:
            http.start()
            deadline = time.monotonic() + START_SECONDS
            while not server.started:
                if not http.is_alive() or time.monotonic() > deadline:
                    raise SelfExtendError(f"the HTTP server did not start on {options.host}:{options.port}")
                time.sleep(0.02)
            on_ready(url_of(sock))
            engine.run_forever(should_stop=lambda: not http.is_alive())
        finally:
            engine.stopping = True
            server.should_exit = True
            http.join(GRACE_SECONDS + 5)
